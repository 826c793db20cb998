"""random=1 multi-scale training (engine/multiscale.py): Darknet's size schedule, a resized
network computing what a network built at that size computes with the same parameters, and
engine train resizing every 10 iterations and back."""

import numpy as np
import pytest

from engine import cli
from engine.errors import ConfigError
from engine.multiscale import MultiScale, resize_network
from engine.network import Network

from helpers import write_cfg
from test_evaluation import TINY_DETECTOR

BODY = TINY_DETECTOR.replace("num=3", "num=3\njitter=0\nrandom=1")


def _cfg(path, width=64, height=64, body=BODY, max_batches=12, **extra):
    return write_cfg(path, dict(batch=4, subdivisions=1, width=width, height=height, channels=3,
                                learning_rate=0.001, max_batches=max_batches, flip=0, **extra),
                     body)


def test_schedule_is_darknets():
    """init 96, step 32, coef 1.4: sizes (round(r * 3) + 1) * 32 for r in [1/1.4, 1.4], a
    shrinking factor that would enlarge keeping 96; the first block and the last 100 iterations
    at the largest, (round(4.2) + 1) * 32 = 160; one size per 10 iterations; seeded."""
    schedule = MultiScale(96, 96, 1.4, 32, seed=3)
    schedule.start(0, 1000)
    sizes = [schedule.size(count) for count in range(1000)]
    assert sizes[0] == (160, 160)
    assert set(sizes) == {(96, 96), (128, 128), (160, 160)}
    assert all(len(set(sizes[b:b + 10])) == 1 for b in range(0, 1000, 10))
    assert all(size == (160, 160) for size in sizes[910:])
    again = MultiScale(96, 96, 1.4, 32, seed=3)
    again.start(0, 1000)
    assert [again.size(c) for c in range(0, 1000, 10)] == sizes[::10]
    rng = np.random.default_rng([3, 7, 5])
    factor = rng.uniform(1, 1.4)
    factor = factor if rng.integers(2) else 1 / factor
    expected = int((np.round(factor * 3) + 1) * 32)
    expected = 96 if factor < 1 and expected > 96 else expected
    assert sizes[50] == (expected, expected)


def test_resized_network_equals_one_built_at_that_size(tmp_path):
    net = Network(_cfg(tmp_path / "a.cfg"), quiet=True, seed=1)
    weights = tmp_path / "w.weights"
    net.save_weights(str(weights))
    parameters = [id(v) for layer in net.layers for v in layer.params.values()]
    resize_network(net, 96, 32)
    assert net.input_shape == (3, 32, 96) and net.layers[-1].net_w == 96
    assert [id(v) for layer in net.layers for v in layer.params.values()] == parameters
    fresh = Network(_cfg(tmp_path / "b.cfg", width=96, height=32), quiet=True)
    fresh.load_weights(str(weights))
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 32, 96)).astype(np.float32)
    np.testing.assert_array_equal(net.forward(x, train=False), fresh.forward(x, train=False))
    resize_network(net, 64, 64)
    assert net.layer_shapes[-1] == (45, 16, 16)


def test_connected_layers_cannot_be_resized(tmp_path):
    body = "[connected]\noutput=4\nactivation=linear\n\n[softmax]\n"
    net = Network(write_cfg(tmp_path / "c.cfg", dict(batch=1, width=8, height=8, channels=1), body),
                  quiet=True)
    with pytest.raises(ConfigError, match="cannot be resized"):
        resize_network(net, 16, 16)
    assert net.input_shape == (1, 8, 8)


def test_engine_train_resizes_and_returns_to_the_cfg_size(tmp_path, monkeypatch):
    import engine.multiscale

    cli.main(["mnist-detection", str(tmp_path / "set"), "--train", "8", "--valid", "2", "--size",
              "64", "--min-digit", "10", "--max-digit", "24", "--max-digits", "2"])
    sizes = []
    original = engine.multiscale.resize_network

    def recording(net, width, height):
        sizes.append((width, height))
        return original(net, width, height)

    monkeypatch.setattr(engine.multiscale, "resize_network", recording)
    cfg = _cfg(tmp_path / "ms.cfg")
    assert cli.main(["train", cfg, "--data", str(tmp_path / "set" / "mnist-detect.data"), "--cpu",
                     "--backup", str(tmp_path / "b")]) == 0
    # 12 iterations, all within the last 100: the largest size, (round(1.4 * 2) + 1) * 32 = 128.
    assert sizes == [(128, 128), (64, 64)]
    Network(cfg, quiet=True).load_weights(str(tmp_path / "b" / "ms_final.weights"))


def test_dynamic_minibatch_is_refused(tmp_path):
    net = Network(_cfg(tmp_path / "d.cfg", dynamic_minibatch=1), quiet=True)
    with pytest.raises(ConfigError, match="dynamic_minibatch"):
        MultiScale.from_network(net, 0)
    assert MultiScale.from_network(Network(_cfg(tmp_path / "e.cfg", body=TINY_DETECTOR),
                                           quiet=True), 0) is None


@pytest.mark.gpu
def test_resized_network_on_the_gpu_equals_the_cpu(tmp_path):
    """Resizing on the GPU backend (new cuDNN shapes) computes what the CPU computes."""
    from engine.backends import get_backend

    cfg = _cfg(tmp_path / "g.cfg")
    cpu = Network(cfg, quiet=True, seed=2)
    gpu = Network(cfg, backend=get_backend("gpu"), quiet=True, seed=2)
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 96, 128)).astype(np.float32)
    for net in (cpu, gpu):
        net.forward(net.ops.asarray(np.zeros((2, 3, 64, 64), np.float32)), train=False)
        resize_network(net, 128, 96)
    np.testing.assert_allclose(gpu.ops.to_host(gpu.forward(gpu.ops.asarray(x), train=False)),
                               cpu.forward(x, train=False), atol=1e-4, rtol=1e-4)


def test_recorded_training_records_again_after_a_resize(tmp_path, monkeypatch):
    """On a backend that records iterations (a numpy one recording as the GPU's does), a detector
    trained with random=1 gets a new runner, so new recordings, at each new size: one made for
    the old size would copy the new batch into buffers of the old one."""
    import engine.cli
    from test_recorded_steps import RecordingNumpy

    cli.main(["mnist-detection", str(tmp_path / "set"), "--train", "8", "--valid", "2", "--size",
              "64", "--min-digit", "10", "--max-digit", "24", "--max-digits", "2"])
    backends = []

    def recording_backend(name, seed=0, **options):
        backends.append(RecordingNumpy(seed=seed))
        return backends[-1]
    monkeypatch.setattr(engine.cli, "get_backend", recording_backend)
    sizes = []
    original = engine.train.iteration_runner

    def runner(net, group):
        sizes.append(net.options.width)
        return original(net, group)
    monkeypatch.setattr(engine.train, "iteration_runner", runner)
    # 130 iterations: Darknet's schedule draws random sizes at iterations 10, 20 and 30, then
    # keeps the largest for the last 100
    cfg = _cfg(tmp_path / "ms.cfg", width=32, height=32, max_batches=130)
    assert cli.main(["train", cfg, "--data", str(tmp_path / "set" / "mnist-detect.data"), "--cpu",
                     "--backup", str(tmp_path / "b")]) == 0
    assert len(sizes) >= 4, sizes  # the cfg's size, then a runner per resize
    assert backends[-1].recordings == len(sizes) - 1  # one per size (PlannedCapturedSteps)
