"""engine/weights.py: Darknet .weights read/write, header variants, partial files, errors,
atomic writes, and real Darknet's weights (golden G1_mnist_trained)."""

import os
import struct

import numpy as np
import pytest

from engine.errors import WeightsError
from engine.network import Network

from conftest import GOLDEN
from helpers import write_cfg

BODY = """
[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=3
size=1
activation=logistic

[batchnorm]

[connected]
output=5
batch_normalize=1
activation=leaky

[dropout]
probability=.5

[connected]
output=3
activation=linear

[softmax]
"""


def _net(tmp_path, seed=0):
    path = tmp_path / "w.cfg"
    if not path.exists():
        write_cfg(path, {"batch": 4, "height": 6, "width": 6, "channels": 2}, BODY)
    return Network(str(path), seed=seed, quiet=True)


def _randomise(net, seed=1):
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        for name, value in layer.params.items():
            low = 0.2 if name == "rolling_variance" else -1
            layer.params[name] = rng.uniform(low, 1.5, value.shape).astype(np.float32)
        if layer.type_name == "batchnorm":
            # Darknet's format stores no biases for a standalone [batchnorm]: keep them at 0
            layer.params["biases"][:] = 0
    net.seen = 123456789012  # needs 64 bits
    return net


def _images(seed=2):
    return np.random.default_rng(seed).uniform(0, 1, (5, 2, 6, 6)).astype(np.float32)


def test_round_trip_identical_arrays_and_predictions(tmp_path):
    a = _randomise(_net(tmp_path))
    path = str(tmp_path / "a.weights")
    a.save_weights(path)
    b = _net(tmp_path, seed=9)
    covered = b.load_weights(path)
    assert covered == 7  # the last layer with parameters is index 6
    assert b.seen == a.seen
    for la, lb in zip(a.layers, b.layers):
        assert set(la.params) == set(lb.params)
        for name in la.weight_order:
            np.testing.assert_array_equal(la.params[name], lb.params[name], err_msg=f"{la.index} {name}")
    np.testing.assert_array_equal(a.predict(_images()), b.predict(_images()))
    # writing again gives the same bytes
    b.save_weights(str(tmp_path / "b.weights"))
    assert open(path, "rb").read() == open(tmp_path / "b.weights", "rb").read()


def test_file_layout_is_darknets(tmp_path):
    """Header 0.2.0 + uint64 seen; conv: biases, scales, mean, variance, weights; [batchnorm]:
    scales, mean, variance; connected: biases, weights, then scales, mean, variance."""
    net = _randomise(_net(tmp_path))
    path = tmp_path / "l.weights"
    net.save_weights(str(path))
    data = path.read_bytes()
    assert struct.unpack_from("<3iQ", data) == (0, 2, 0, 123456789012)
    offset = 20

    def take(n):
        nonlocal offset
        values = np.frombuffer(data, "<f4", n, offset)
        offset += 4 * n
        return values

    conv1, _, conv2, bn, fc1, _, fc2, _ = net.layers
    p = conv1.params
    for name in ("biases", "scales", "rolling_mean", "rolling_variance"):
        np.testing.assert_array_equal(take(4), p[name])
    np.testing.assert_array_equal(take(4 * 2 * 9).reshape(4, 2, 3, 3), p["weights"])
    np.testing.assert_array_equal(take(3), conv2.params["biases"])
    np.testing.assert_array_equal(take(3 * 4).reshape(3, 4, 1, 1), conv2.params["weights"])
    for name in ("scales", "rolling_mean", "rolling_variance"):
        np.testing.assert_array_equal(take(3), bn.params[name])
    np.testing.assert_array_equal(take(5), fc1.params["biases"])
    np.testing.assert_array_equal(take(5 * 27).reshape(5, 27), fc1.params["weights"])
    for name in ("scales", "rolling_mean", "rolling_variance"):
        np.testing.assert_array_equal(take(5), fc1.params[name])
    np.testing.assert_array_equal(take(3), fc2.params["biases"])
    np.testing.assert_array_equal(take(15).reshape(3, 5), fc2.params["weights"])
    assert offset == len(data)


def _payload(net, transpose_connected=False):
    parts = []
    for layer in net.layers:
        for name in layer.weight_order:
            values = layer.params[name]
            if transpose_connected and name == "weights" and layer.type_name == "connected":
                values = values.T
            parts.append(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return b"".join(parts)


def test_version_0_1_has_32_bit_seen(tmp_path):
    a = _randomise(_net(tmp_path))
    path = tmp_path / "old.weights"
    path.write_bytes(struct.pack("<3ii", 0, 1, 0, 4242) + _payload(a))
    b = _net(tmp_path, seed=5)
    b.load_weights(str(path))
    assert b.seen == 4242
    np.testing.assert_array_equal(a.predict(_images()), b.predict(_images()))


@pytest.mark.parametrize("major, minor", [(0, 1001), (1001, 0)])
def test_transposed_connected_weights(tmp_path, major, minor):
    """major or minor above 1000: connected weights are stored [inputs][outputs]; seen is 32-bit."""
    a = _randomise(_net(tmp_path))
    path = tmp_path / "t.weights"
    path.write_bytes(struct.pack("<3ii", major, minor, 0, 77) + _payload(a, transpose_connected=True))
    b = _net(tmp_path, seed=5)
    b.load_weights(str(path))
    assert b.seen == 77
    for la, lb in zip(a.layers, b.layers):
        for name in la.weight_order:
            np.testing.assert_array_equal(la.params[name], lb.params[name], err_msg=f"{la.index} {name}")


def test_partial_file_fills_the_first_layers(tmp_path):
    """A file covering only the first layers (Darknet's `partial`) loads into the larger cfg."""
    a = _randomise(_net(tmp_path))
    path = str(tmp_path / "p.weights")
    a.save_weights(path, cutoff=3)       # conv, maxpool, conv
    assert os.path.getsize(path) == 20 + 4 * (4 * 4 + 4 * 2 * 9 + 3 + 3 * 4)
    b = _net(tmp_path, seed=5)
    fresh = {(l.index, k): v.copy() for l in b.layers for k, v in l.params.items()}
    assert b.load_weights(path) == 3
    for layer in b.layers:
        for name, value in layer.params.items():
            want = a.layers[layer.index].params[name] if layer.index < 3 else fresh[(layer.index, name)]
            np.testing.assert_array_equal(value, want, err_msg=f"{layer.index} {name}")


def _saved(tmp_path):
    a = _randomise(_net(tmp_path))
    path = tmp_path / "full.weights"
    a.save_weights(str(path))
    return path.read_bytes()


def _load_error(tmp_path, data):
    path = tmp_path / "bad.weights"
    path.write_bytes(data)
    net = _net(tmp_path, seed=5)
    before = {(l.index, k): v.copy() for l in net.layers for k, v in l.params.items()}
    with pytest.raises(WeightsError) as info:
        net.load_weights(str(path))
    # a failed load leaves the network as it was
    for layer in net.layers:
        for name, value in layer.params.items():
            np.testing.assert_array_equal(value, before[(layer.index, name)])
    assert str(path) in str(info.value)
    return str(info.value)


def test_truncated_inside_a_layer(tmp_path):
    data = _saved(tmp_path)
    message = _load_error(tmp_path, data[:20 + 4 * 10])      # inside conv1's parameters
    assert "ends inside layer 0 [convolutional]" in message
    assert "cut short or was written for another network" in message
    message = _load_error(tmp_path, data[:-4])
    assert "ends inside layer 6 [connected]" in message


def test_bytes_left_over(tmp_path):
    message = _load_error(tmp_path, _saved(tmp_path) + b"\0" * 12)
    assert "12 bytes more than" in message and "another (larger) network" in message


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    struct.pack("<3iQ", -1, 2, 0, 0) + b"\0" * 64,
    struct.pack("<3iQ", 0, 2, 999999, 0) + b"\0" * 64,
])
def test_unknown_header(tmp_path, data):
    assert "unknown header" in _load_error(tmp_path, data)


def test_too_short_for_a_header(tmp_path):
    assert "too short" in _load_error(tmp_path, b"\0" * 10)


def test_missing_file(tmp_path):
    net = _net(tmp_path)
    missing = str(tmp_path / "nope.weights")
    with pytest.raises(WeightsError, match="nope.weights: weights file not found"):
        net.load_weights(missing)


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch, broken):
    """Writes are atomic: if the write fails (here os.replace or os.fsync raises), the previous
    file under the final name is intact, no temporary file is left behind, and the error is a
    WeightsError (one line in the CLI)."""
    path = tmp_path / "keep.weights"
    _randomise(_net(tmp_path)).save_weights(str(path))
    previous = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, broken, fail)
    other = _randomise(_net(tmp_path), seed=3)
    with pytest.raises(WeightsError, match="keep.weights: cannot write weights file .No space left"):
        other.save_weights(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["keep.weights", "w.cfg"]


def test_unwritable_folder_is_a_weights_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="cannot write weights file"):
        _net(tmp_path).save_weights(str(tmp_path / "file" / "sub" / "x.weights"))


def test_save_creates_the_folder(tmp_path):
    net = _net(tmp_path)
    target = tmp_path / "backup" / "deeper" / "x.weights"
    net.save_weights(str(target))
    assert target.exists()


# ---- real Darknet ----------------------------------------------------------------------------------
G1 = os.path.join(GOLDEN, "G1_mnist_trained")


def test_golden_g1_mnist_trained_matches_darknet():
    """Weights trained by real Darknet load, and the softmax outputs on the first 64 MNIST test
    images match Darknet's to 1e-4 (inference BN uses Darknet's sqrt(var)+1e-6 rule)."""
    import engine

    net = engine.load(os.path.join(G1, "mnist.cfg"), os.path.join(G1, "weights"), quiet=True)
    assert net.seen == 256000
    x = np.fromfile(os.path.join(G1, "inputs.bin"), dtype="<f4").reshape(64, 1, 28, 28)
    want = np.fromfile(os.path.join(G1, "outputs.bin"), dtype="<f4").reshape(64, 10)
    got = net.predict(x, batch_size=64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and the same predicted classes as labels.txt (61/64 right)
    with open(os.path.join(G1, "labels.txt")) as handle:
        rows = [line.split() for line in handle if line.strip() and line.split()[0].isdigit()]
    argmax = [int(r[2]) for r in rows]
    assert list(got.argmax(1)) == argmax


def test_golden_g1_accuracy_on_10k_equals_darknets():
    """With Darknet-trained weights, top-1 on all 10000 MNIST test images is what
    `darknet classifier valid` reported for them: 0.9739 (within 2 images)."""
    import engine
    from engine.data import DataConfig
    from engine.train import evaluate

    root = os.path.dirname(os.path.dirname(GOLDEN))
    net = engine.load(os.path.join(G1, "mnist.cfg"), os.path.join(G1, "weights"), quiet=True)
    dataset = DataConfig(os.path.join(root, "cfg", "mnist.data")).dataset("valid", net.input_shape)
    top1, _ = evaluate(net, dataset, top=2, batch_size=500)
    assert len(dataset) == 10000 and abs(top1 - 0.9739) <= 2e-4, top1


SHIPPED = os.path.join(os.path.dirname(GOLDEN), "..", "weights", "mnist.weights")


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="weights/mnist.weights is not in the tree yet")
def test_shipped_mnist_weights_reach_99_3_percent():
    """The weights/mnist.weights this engine trained reach at least 99.3% top-1 on the 10k MNIST
    test set (the issue's bar)."""
    import engine
    from engine.data import DataConfig
    from engine.train import evaluate

    root = os.path.dirname(os.path.dirname(GOLDEN))
    net = engine.load(os.path.join(root, "cfg", "mnist.cfg"), SHIPPED, quiet=True)
    dataset = DataConfig(os.path.join(root, "cfg", "mnist.data")).dataset("valid", net.input_shape)
    top1, _ = evaluate(net, dataset, top=2, batch_size=500)
    assert top1 >= 0.993, top1
