"""Loss scaling in training (engine/loss_scaling.py, issue 13): in float32 with S a power of
two it changes no bit of the weights (x * 2**k / 2**k is exact), eager or recorded, classifier
or detector, one pass or several; an overflow skips the whole step (weights and velocities
unchanged), halves a dynamic scale, and training goes on; good steps grow it back; a scale that
falls to the floor stops the run with the divergence error; [net] loss_scale is AlexeyAB's
static scale; --loss-scale on the command line. The GPU's fp16 runs are under the gpu marker."""

import io
import os
import re
import sys
import textwrap

import numpy as np
import pytest

from engine import loss_scaling
from engine import train as training
from engine.backends.numpy_backend import NumpyBackend
from engine.cli import main
from engine.data import Dataset
from engine.distributed import SingleProcess
from engine.errors import ConfigError, TrainingError
from engine.loss_scaling import LossScaler
from engine.network import Network

from conftest import ROOT
from helpers import write_cfg
from test_recorded_steps import (BODY, YOLO_BODY, FakeArray, RecordingNumpy,  # noqa: F401
                                 fake_gpu, yolo_batches)

NET = {"batch": 4, "subdivisions": 1, "height": 6, "width": 6, "channels": 1,
       "learning_rate": 0.1, "momentum": 0.9, "decay": 0.001}
# The classifier of test_recorded_steps with batch norm in front (its backward is linear in
# the delta too, and its scale and bias gradients must be unscaled like the weights').
BN_BODY = BODY.replace("[convolutional]\n", "[convolutional]\nbatch_normalize=1\n", 1)


def classifier_batches(count, seed=3, batch=4):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(0, 1, (batch, 1, 6, 6)).astype(np.float32),
             np.eye(3, dtype=np.float32)[rng.integers(0, 3, batch)]) for _ in range(count)]


def detector_cfg(tmp_path, subdivisions=1):
    return write_cfg(tmp_path / f"y{subdivisions}.cfg",
                     dict(NET, subdivisions=subdivisions, height=16, width=16, channels=3),
                     YOLO_BODY)


def state_of(net, trainable=False):
    """Every parameter (or only those SGD changes: not BN's rolling statistics, which the
    forward moves) and velocity, as host copies."""
    return [net.ops.to_host(a).copy() for layer in net.layers
            for arrays in (layer.params, layer.velocities) for name, a in sorted(arrays.items())
            if not trainable or name in layer.updates]


def iterate(path, batches, runner, scaler=None, backend=RecordingNumpy, rate=0.1):
    """The batches through `runner` on a new network of `path`, with `scaler` attached as
    engine.train attaches it: (losses, network)."""
    net = Network(path, backend=backend(seed=5), quiet=True)
    net.loss_scaler = scaler
    run = runner(net, training.SINGLE_PROCESS)
    # copies: on numpy a recording's input buffer is the first batch it saw, set_ overwrites it
    losses = [run(images.copy(), truth.copy(), rate * (k + 1))
              for k, (images, truth) in enumerate(batches)]
    return losses, net


# ---- no overflow, S a power of two: not one bit changes -------------------------------------
@pytest.mark.parametrize("body, subdivisions, runner", [
    (BODY, 1, training.EagerSteps), (BN_BODY, 2, training.EagerSteps),
    (BN_BODY, 1, training.CapturedSteps)], ids=["eager", "bn-subdivisions", "recorded"])
def test_classifier_weights_are_bit_identical_with_scaling(tmp_path, body, subdivisions, runner):
    path = write_cfg(tmp_path / "c.cfg", dict(NET, subdivisions=subdivisions), body)
    batches = classifier_batches(4)
    plain_losses, plain = iterate(path, batches, runner)
    for scaler in (LossScaler(2.0 ** 16), LossScaler(2.0 ** -3, dynamic=False)):
        losses, net = iterate(path, batches, runner, scaler)
        assert losses == plain_losses  # the cost is computed before the deltas are scaled
        assert scaler.skipped_steps == 0 and scaler.used_scale == scaler.scale
        assert scaler.known_iteration == len(batches) and not scaler.pending
        for got, want in zip(state_of(net), state_of(plain)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("subdivisions, runner", [
    (1, training.EagerSteps), (2, training.EagerSteps), (1, training.SplitCapturedSteps),
    (1, training.PlannedCapturedSteps)], ids=["eager", "subdivisions", "recorded", "planned"])
def test_detector_weights_are_bit_identical_with_scaling(tmp_path, subdivisions, runner):
    """Two [yolo] heads (AlexeyAB's loss, CIoU) and batch norm; SplitCapturedSteps replays the
    backward and update around the losses' host part, PlannedCapturedSteps the whole iteration
    with the truths' plans set before each replay."""
    path = detector_cfg(tmp_path, subdivisions)
    batches = yolo_batches(3)
    plain_losses, plain = iterate(path, batches, runner)
    scaler = LossScaler(2.0 ** 12)
    losses, net = iterate(path, batches, runner, scaler)
    assert losses == plain_losses and scaler.skipped_steps == 0
    for got, want in zip(state_of(net), state_of(plain)):
        np.testing.assert_array_equal(got, want)
    if runner is training.SplitCapturedSteps:
        assert net.ops.recordings == 2
    if runner is training.PlannedCapturedSteps:
        assert net.ops.recordings == 1


def test_the_backward_sees_scaled_deltas(tmp_path):
    """The bit-identity above would also hold if nothing were scaled: here the accumulated
    gradients of one forward/backward are exactly S times the unscaled ones."""
    path = detector_cfg(tmp_path)
    (images, truth), = yolo_batches(1)
    gradients = []
    for scale in (None, 2.0 ** 7):
        net = Network(path, backend=NumpyBackend(seed=5), quiet=True)
        if scale is not None:
            net.loss_scaler = LossScaler(scale)
            net.loss_scaler.start(net.ops)
        net.train_step(images, truth)
        gradients.append([g.copy() for layer in net.layers
                          for _, g in sorted(layer.updates.items())])
    assert any(np.abs(g).max() > 0 for g in gradients[0])
    for plain, scaled in zip(*gradients):
        np.testing.assert_array_equal(scaled, plain * np.float32(2.0 ** 7))


# ---- overflow: the step is skipped, the scale backs off and grows back -------------------------
def overflow_at(net, passes):
    """Make the delta of the cost layer infinite on the given forward/backward passes (counted
    from 1), as a loss that overflows fp16 would."""
    layer, count = net.cost_layer, {"n": 0}
    original = layer.cost

    def cost(ops, truth):
        value, delta = original(ops, truth)
        count["n"] += 1
        if count["n"] in passes:
            delta[0, 0] = np.inf  # a finite cost: only the scaled gradients see it
        return value, delta
    layer.cost = cost


@pytest.mark.parametrize("runner", [training.EagerSteps, training.CapturedSteps])
def test_an_overflow_skips_the_step_and_halves_the_scale(tmp_path, runner):
    path = write_cfg(tmp_path / "c.cfg", NET, BN_BODY)
    net = Network(path, backend=RecordingNumpy(seed=5), quiet=True)
    scaler = net.loss_scaler = LossScaler(2.0 ** 16, growth_interval=3)
    overflow_at(net, {2, 3})
    run = runner(net, training.SINGLE_PROCESS)
    history = []
    for images, truth in classifier_batches(7):
        before = state_of(net, trainable=True)
        loss = run(images, truth, 0.1)
        after = state_of(net, trainable=True)
        moved = any(not np.array_equal(a, b) for a, b in zip(before, after))
        history.append((scaler.used_scale, scaler.skipped, moved, np.isfinite(loss)))
        assert all(np.isfinite(a).all() for a in after)
        assert all(not g.any() for layer in net.layers for g in layer.updates.values())
    s = 2.0 ** 16
    assert history == [(s, False, True, True), (s, True, False, True),
                       (s / 2, True, False, True),          # halved, overflowed again
                       (s / 4, False, True, True), (s / 4, False, True, True),
                       (s / 4, False, True, True),          # three good steps: doubled
                       (s / 2, False, True, True)]
    assert scaler.skipped_steps == 2 and net.seen == 7 * 4  # skipped steps count as iterations


def test_a_static_scale_skips_but_keeps_its_value(tmp_path):
    path = write_cfg(tmp_path / "c.cfg", NET, BODY)
    net = Network(path, backend=NumpyBackend(seed=5), quiet=True)
    scaler = net.loss_scaler = LossScaler(8.0, dynamic=False, growth_interval=1)
    overflow_at(net, {1})
    run = training.EagerSteps(net, training.SINGLE_PROCESS)
    for images, truth in classifier_batches(3):
        run(images, truth, 0.1)
    assert scaler.scale == 8.0 and scaler.skipped_steps == 1


def classifier_dataset(count=16, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.uniform(0, 1, (count, 1, 6, 6)).astype(np.float32),
                   rng.integers(0, 3, count), 3, "random")


def train_lines(path, tmp_path, backend=None, **options):
    net = Network(path, backend=backend, quiet=True)
    out = io.StringIO()
    training.train(net, classifier_dataset(), str(tmp_path / "backup"), backup_every=0,
                   stream=out, **options)
    return net, out.getvalue()


def test_train_prints_the_scale_and_skipped_steps(tmp_path, monkeypatch):
    """engine.train's iteration line: the scale each iteration used and a skipped step; the
    learning-rate schedule goes on over skipped steps; the scaler is detached afterwards."""
    path = write_cfg(tmp_path / "c.cfg", dict(NET, max_batches=4, policy="steps", steps="2,3",
                                              scales=".5,.5"), BODY)
    original = NumpyBackend.flag_non_finite_
    calls = {"n": 0}

    def flag_second_iteration(self, state, array):
        calls["n"] += 1
        if calls["n"] == 5:  # among the second iteration's gradients (4 tensors per iteration)
            array = np.array([np.nan], np.float32)
        return original(self, state, array)
    monkeypatch.setattr(NumpyBackend, "flag_non_finite_", flag_second_iteration)
    net, text = train_lines(path, tmp_path, loss_scale="dynamic")
    lines = [line for line in text.splitlines() if re.match(r"\d+, ", line)]
    assert "Loss scaling: dynamic, from 65536" in text
    assert len(lines) == 4 and net.seen == 16 and net.loss_scaler is None
    assert lines[0].split("images")[1].startswith(", loss scale 65536  [")
    # on the CPU the host knows at once: the skip's own line right after its iteration's
    skip = "iteration 2: gradients overflowed, step skipped (1 so far); loss scale now 32768"
    assert text.count(skip) == 1 and text.splitlines().index(skip) == \
        text.splitlines().index(lines[1]) + 1
    assert ", loss scale 32768  [" in lines[1] and ", loss scale 32768  [" in lines[2]
    assert text.count("step skipped") == 1
    rates = [float(re.search(r"([\d.]+) rate", line).group(1)) for line in lines]
    assert rates == [0.1, 0.05, 0.025, 0.025]


def test_no_scaling_by_default_in_fp32(tmp_path):
    path = write_cfg(tmp_path / "c.cfg", dict(NET, max_batches=2), BODY)
    _, text = train_lines(path, tmp_path)
    assert "loss scale" not in text and "Loss scaling" not in text


def test_a_scale_below_the_floor_is_the_divergence_error(tmp_path, monkeypatch):
    path = write_cfg(tmp_path / "c.cfg", dict(NET, max_batches=100), BODY)
    monkeypatch.setattr(NumpyBackend, "flag_non_finite_",
                        lambda self, state, array: state.__setitem__(1, 1) or state)
    scaler = LossScaler(2.0 ** -21)
    with pytest.raises(TrainingError) as raised:
        train_lines(path, tmp_path, loss_scale=scaler)
    message = str(raised.value)
    assert "\n" not in message and "overflowed at every loss scale down to 5.96046e-08" in message
    assert "(4 steps skipped) at iteration 4" in message and "no weights were saved" in message
    assert scaler.scale == 2.0 ** -25


# ---- the host reads the state without waiting; it learns of skips late ------------------------
class LaggingNumpy(RecordingNumpy):
    """A recording numpy backend whose state reads arrive as a GPU's would when it runs `lag`
    iterations behind the host: a read is ready once `lag` later reads have started. Records
    the age of every read the host waited for (value() before ready()) and counts to_host."""

    def __init__(self, seed=0, lag=1):
        super().__init__(seed)
        self.lag, self.reads, self.waits, self.host_reads = lag, 0, [], 0

    def to_host(self, array):
        self.host_reads += 1
        return super().to_host(array)

    def to_host_async(self, array):
        self.reads += 1
        backend, number, values = self, self.reads, np.array(array, dtype=np.float32)

        class Read:
            def ready(self):
                return backend.reads - number >= backend.lag

            def value(self):
                if not self.ready():
                    backend.waits.append(backend.reads - number)
                return values
        return Read()


def test_skips_are_learned_late_and_the_device_decides(tmp_path):
    """The overflow test above with the state's reads one iteration late: the weights are the
    same (the device's state decides, not the host), each skip is learned one iteration later,
    once, and the host never waits."""
    path = write_cfg(tmp_path / "c.cfg", NET, BN_BODY)
    batches = classifier_batches(7)
    results = []
    for backend in (RecordingNumpy(seed=5), LaggingNumpy(seed=5, lag=1)):
        net = Network(path, backend=backend, quiet=True)
        scaler = net.loss_scaler = LossScaler(2.0 ** 16, growth_interval=3)
        overflow_at(net, {2, 3})
        run = training.CapturedSteps(net, training.SINGLE_PROCESS)
        learned = []
        for images, truth in batches:
            run(images.copy(), truth.copy(), 0.1)  # set_ writes into the first batch on numpy
            learned.append((scaler.known_iteration, scaler.take_skips()))
        scaler.settle()
        learned.append((scaler.known_iteration, scaler.take_skips()))
        results.append((learned, state_of(net), scaler))
    (at_once, plain, _), (late, weights, scaler) = results
    s = 2.0 ** 16
    skips = [loss_scaling.Skip(2, 1, s / 2), loss_scaling.Skip(3, 2, s / 4)]
    assert at_once == [(1, []), (2, skips[:1]), (3, skips[1:])] + [(n, []) for n in (4, 5, 6, 7, 7)]
    assert late == [(None, []), (1, []), (2, skips[:1]), (3, skips[1:])] + \
        [(n, []) for n in (4, 5, 6, 7)]
    assert scaler.scale == s / 2 and scaler.skipped_steps == 2 and scaler.good_steps == 1
    assert net.ops.waits == [0]  # only settle waits: for the last iteration's read
    for got, want in zip(weights, plain):
        np.testing.assert_array_equal(got, want)


def test_reads_wait_only_when_two_iterations_old(tmp_path):
    """A device far behind (reads never ready by themselves): the host waits for each read
    when it is MAX_LAG iterations old, never younger, so at most MAX_LAG reads are pending."""
    path = write_cfg(tmp_path / "c.cfg", NET, BODY)
    net = Network(path, backend=LaggingNumpy(seed=5, lag=100), quiet=True)
    scaler = net.loss_scaler = LossScaler()
    run = training.EagerSteps(net, training.SINGLE_PROCESS)
    for k, (images, truth) in enumerate(classifier_batches(6), 1):
        run(images, truth, 0.1)
        assert len(scaler.pending) == min(k, loss_scaling.MAX_LAG)
        assert scaler.known_iteration == (k - loss_scaling.MAX_LAG
                                          if k > loss_scaling.MAX_LAG else None)
    assert net.ops.waits == [loss_scaling.MAX_LAG] * 4
    scaler.settle()
    assert scaler.known_iteration == 6 and not scaler.pending


@pytest.mark.parametrize("runner, cfg", [(training.CapturedSteps, "classifier"),
                                         (training.SplitCapturedSteps, "detector"),
                                         (training.PlannedCapturedSteps, "detector")])
def test_recorded_iterations_make_no_host_read_for_the_scale(tmp_path, runner, cfg):
    """With scaling on, a recorded iteration reads from the backend exactly what it reads
    without (the losses' own reads), plus one asynchronous read of the state."""
    if cfg == "classifier":
        path, batches = write_cfg(tmp_path / "c.cfg", NET, BN_BODY), classifier_batches(4)
    else:
        path, batches = detector_cfg(tmp_path), yolo_batches(4)
    counts = []
    for scaler in (None, LossScaler(2.0 ** 10)):
        net = Network(path, backend=LaggingNumpy(seed=5), quiet=True)
        net.loss_scaler = scaler
        run = runner(net, training.SINGLE_PROCESS)
        per_iteration = []
        for images, truth in batches:
            before = net.ops.host_reads, net.ops.reads
            run(images.copy(), truth.copy(), 0.1)
            per_iteration.append((net.ops.host_reads - before[0], net.ops.reads - before[1]))
        counts.append(per_iteration[2:])  # the recorded ones (after the eager and recording)
        assert net.ops.waits == []
    plain, scaled = counts
    assert [reads for _, reads in plain] == [0, 0] and [reads for _, reads in scaled] == [1, 1]
    assert [host for host, _ in scaled] == [host for host, _ in plain]


def test_train_reports_every_late_skip_once(tmp_path, monkeypatch):
    """engine.train on a device two iterations behind: the skips of iterations 2 and 5 (of 6)
    each get their line once, after later iterations' lines (the last one after the loop,
    when train settles the reads), with exact counts and scales; the iteration lines show the
    latest scale the host knows."""
    path = write_cfg(tmp_path / "c.cfg", dict(NET, max_batches=6), BODY)
    original = NumpyBackend.flag_non_finite_
    calls = {"n": 0}

    def flag(self, state, array):
        calls["n"] += 1
        if calls["n"] in (5, 17):  # in iterations 2 and 5 (4 gradient tensors per iteration)
            array = np.array([np.inf], np.float32)
        return original(self, state, array)
    monkeypatch.setattr(NumpyBackend, "flag_non_finite_", flag)
    backend = LaggingNumpy(seed=5, lag=100)
    _, text = train_lines(path, tmp_path, backend=backend, loss_scale="dynamic")
    lines = text.splitlines()
    first = "iteration 2: gradients overflowed, step skipped (1 so far); loss scale now 32768"
    second = "iteration 5: gradients overflowed, step skipped (2 so far); loss scale now 16384"
    assert text.count("step skipped") == 2 and lines.count(first) == lines.count(second) == 1
    assert lines[lines.index(first) - 1].startswith("4, ")  # learned at iteration 4
    assert lines[lines.index(second) + 1].startswith("Saved ")  # settled after the loop
    scales = [re.search(r"loss scale (\d+)  \[", line).group(1) for line in lines
              if re.match(r"\d+, ", line)]
    assert scales == ["65536", "65536", "65536", "32768", "32768", "32768"]
    assert backend.waits == [2, 2, 2, 2, 1, 0]  # the last two only when train settles


def test_the_floor_is_seen_late_and_named_by_its_iteration(tmp_path, monkeypatch):
    """As the floor test above, the device two iterations ahead: the error names the
    iteration where the scale fell below the floor and its count, though it is raised when
    the host learns of it."""
    path = write_cfg(tmp_path / "c.cfg", dict(NET, max_batches=100), BODY)
    monkeypatch.setattr(NumpyBackend, "flag_non_finite_",
                        lambda self, state, array: state.__setitem__(1, 1) or state)
    backend = LaggingNumpy(seed=5, lag=100)
    with pytest.raises(TrainingError) as raised:
        train_lines(path, tmp_path, backend=backend, loss_scale=LossScaler(2.0 ** -21))
    message = str(raised.value)
    assert "overflowed at every loss scale down to 5.96046e-08 (4 steps skipped) at " \
        "iteration 4;" in message
    assert backend.reads == 6  # raised when iteration 4's read was waited for, at iteration 6


class TwoRanks(SingleProcess):
    size = 2


def test_ranks_stop_at_the_floor_together():
    """With several ranks the floor error waits until every rank has the read (MAX_LAG
    iterations), whatever reads arrived early on this one; alone, at once."""
    scaler = LossScaler(2.0 ** -24)
    scaler._learn(7, np.array([2.0 ** -25, 0, 0, 1], np.float32))
    checkpoints = training.Checkpoints(Network.__new__(Network), enabled=False)
    checkpoints.net.ops = NumpyBackend()
    training.check_loss_scale(scaler, checkpoints, TwoRanks(), 8)  # rank 1 may not know yet
    for group, iteration in ((TwoRanks(), 9), (training.SINGLE_PROCESS, 8), (TwoRanks(), None)):
        with pytest.raises(TrainingError, match="down to 5.96046e-08 .* at iteration 7;"):
            training.check_loss_scale(scaler, checkpoints, group, iteration)


# ---- [net] loss_scale (AlexeyAB) and --loss-scale -------------------------------------------
def test_net_loss_scale_is_alexeyabs_static_scale(tmp_path, capsys):
    """Accepted without "Unused field", a static scale of 8 in training, and the weights of
    the same run without it."""
    path = write_cfg(tmp_path / "s.cfg", dict(NET, max_batches=3, loss_scale=8), BODY)
    Network(path)  # not quiet: prints the layer table and any unused field
    assert "Unused field" not in capsys.readouterr().out
    scaled, text = train_lines(path, tmp_path)
    assert "Loss scaling: static, 8" in text and ", loss scale 8  [" in text
    plain, _ = train_lines(write_cfg(tmp_path / "p.cfg", dict(NET, max_batches=3), BODY),
                           tmp_path)
    for got, want in zip(state_of(scaled), state_of(plain)):
        np.testing.assert_array_equal(got, want)
    # the argument overrides the cfg
    _, text = train_lines(path, tmp_path, loss_scale="none")
    assert "loss scale" not in text


@pytest.mark.parametrize("value, expected", [("0", "expected a positive value"),
                                             ("-8", "expected a positive value"),
                                             ("eight", "a finite number"),
                                             ("inf", "a finite number")])
def test_a_bad_net_loss_scale_is_refused_with_its_line(tmp_path, value, expected):
    path = write_cfg(tmp_path / "b.cfg", dict(NET, loss_scale=value), BODY)
    with pytest.raises(ConfigError, match=rf"b\.cfg:10: \[net\] loss_scale.*{expected}"):
        Network(path, quiet=True)


def test_net_loss_scale_with_a_loss_alexeyab_does_not_scale_is_refused(tmp_path):
    """AlexeyAB scales [yolo] and [softmax] deltas only, while its update divides every
    gradient: with a [cost] loss that is a smaller learning rate, which is refused."""
    body = BODY.replace("[softmax]", "[cost]\ntype=sse")
    path = write_cfg(tmp_path / "c.cfg", dict(NET, max_batches=2, loss_scale=8), body)
    with pytest.raises(ConfigError, \
            match=r"c\.cfg:11: \[net\] loss_scale=8: .*delta of a \[cost\] loss \(layer 3\)"):
        train_lines(path, tmp_path)
    net, text = train_lines(path, tmp_path, loss_scale=8)  # ours scales every loss
    assert "Loss scaling: static, 8" in text


@pytest.mark.parametrize("text, expected", [("dynamic", "dynamic"), ("NONE", "none"),
                                            ("128", 128.0), ("0.5", 0.5)])
def test_loss_scale_settings(text, expected):
    assert loss_scaling.parse_setting(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "big"])
def test_bad_loss_scale_settings(text):
    with pytest.raises(ConfigError, match="expected dynamic, none or a positive number"):
        loss_scaling.parse_setting(text)


def cli_setup(tmp_path, **net):
    mnist = os.path.join(ROOT, "data", "mnist")
    cfg = write_cfg(tmp_path / "small.cfg", dict(NET, height=28, width=28, batch=8,
                                                 **dict({"max_batches": 3}, **net)), BODY.replace(
        "output=3", "output=10"))
    (tmp_path / "small.data").write_text(textwrap.dedent(f"""\
        classes=10
        train={mnist}/t10k-images.idx3-ubyte.gz
        train_labels={mnist}/t10k-labels.idx1-ubyte.gz
        labels={ROOT}/cfg/mnist.labels
        backup={tmp_path}/backup
        """))
    return cfg


def test_cli_loss_scale(tmp_path, capsys):
    cfg = cli_setup(tmp_path)
    assert main(["train", cfg, "--cpu", "--loss-scale", "1024"]) == 0
    out = capsys.readouterr().out
    assert "Loss scaling: static, 1024" in out and out.count(", loss scale 1024  [") == 3
    assert main(["train", cfg, "--cpu", "--loss-scale", "lots", "--clear"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("engine train: error: --loss-scale lots: expected dynamic, none or a "
                           "positive number")


def test_cli_scale_floor_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """Every step overflowing: dynamic scaling halves from 2**16 to below 2**-24 (41 skipped
    steps), then one line naming the last good weights, exit code 1."""
    cfg = cli_setup(tmp_path, max_batches=100)
    monkeypatch.setattr(NumpyBackend, "flag_non_finite_",
                        lambda self, state, array: state.__setitem__(1, 1) or state)
    assert main(["train", cfg, "--cpu", "--loss-scale", "dynamic", "--backup-every", "20"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("engine train: error: the gradients overflowed at every loss scale "
                          "down to 5.96046e-08 (41 steps skipped) at iteration 41; the last good "
                          "weights are ")
    assert "small.backup (iteration 40)" in err


# ---- data-parallel: the flag after the allreduce is every rank's -------------------------------
RANK_OVERFLOWS = """
import sys
import numpy as np
from mpi4py import MPI
sys.argv = ["engine", "train", "small.cfg", "--cpu", "--backup", "two", "--loss-scale", "64"]
import engine.layers.softmax as softmax
from engine.cli import main
original = softmax.SoftmaxLayer.cost
calls = {"n": 0}

def cost(self, ops, truth):
    value, delta = original(self, ops, truth)
    calls["n"] += 1
    if MPI.COMM_WORLD.Get_rank() == 1 and calls["n"] == 2:  # rank 1's 2nd iteration only
        delta[0, 0] = np.inf
    return value, delta

softmax.SoftmaxLayer.cost = cost
sys.exit(main())
"""


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Two CPU ranks; rank 1's gradients overflow in iteration 2: the allreduce hands the inf
    to rank 0 too, both skip (rank 0 prints it), and the closing replica check passes."""
    pytest.importorskip("mpi4py")
    from test_distributed import MPIEXEC, run
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not installed (pip install -e .[dist])")
    cli_setup(tmp_path)
    (tmp_path / "overflow.py").write_text(RANK_OVERFLOWS)
    result = run([MPIEXEC, "-n", "2", sys.executable, "overflow.py"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    lines = [line for line in result.stdout.splitlines() if re.match(r"\d+, ", line)]
    assert len(lines) == 3
    assert result.stdout.count("step skipped") == 1  # rank 0 alone prints
    assert "iteration 2: gradients overflowed, step skipped (1 so far); loss scale now 64" \
        in result.stdout


def test_cuda_kernels_read_the_state_from_device_memory(fake_gpu):
    """On the CUDA backend (fake device) every loss-scaling kernel gets the state's address,
    never S as a number, so a recorded iteration reads each iteration's S; sgd_kernel gets a
    null address without loss scaling."""
    ops, launches = fake_gpu, fake_gpu.kernels.launches
    state, delta = FakeArray((2,)), FakeArray((4, 6, 2, 2), np.float16)
    param, gradient, velocity = FakeArray((3,)), FakeArray((3,)), FakeArray((3,))
    ops.sgd_update(param, gradient, velocity, 0.1, 0.9, 0.0, 1)
    assert launches[-1][0] == "sgd_kernel" and launches[-1][1][-1] == 0
    ops.sgd_update(param, gradient, velocity, 0.1, 0.9, 0.0, 1, loss_scale=state)
    assert launches[-1][1][-1] == state.ptr
    assert ops.apply_loss_scale_(delta, state) is delta
    assert launches[-1] == ("loss_scale_kernel", (delta.ptr, delta.size, state.ptr))
    assert ops.flag_non_finite_(state, gradient) is state
    assert launches[-1] == ("flag_non_finite_kernel", (gradient.ptr, gradient.size, state.ptr))
    assert ops.update_loss_scale_(state, True, 2000) is state
    assert launches[-1] == ("update_loss_scale_kernel", (state.ptr, 1, 2000))
    ops.update_loss_scale_(state, False, 7)
    assert launches[-1] == ("update_loss_scale_kernel", (state.ptr, 0, 7))


class FakeEvent:
    def __init__(self):
        self.recorded, self.done, self.waited = [], False, 0

    def record(self, stream):
        self.recorded.append(stream)

    def query(self):
        return self.done

    def synchronize(self):
        self.waited += 1
        self.done = True


def test_cuda_state_reads_do_not_wait(fake_gpu, monkeypatch):
    """The CUDA backend's to_host_async: a copy on the stream into page-locked memory and an
    event after it, no synchronisation; ready() asks the event, value() waits on it; the
    memory and event are reused by the next read once a value is taken, which keeps it."""
    ops = fake_gpu
    copies = iter(range(1, 100))
    monkeypatch.setattr(ops.cuda, "Event", FakeEvent, raising=False)
    monkeypatch.setattr(ops.cuda, "memcpy_dtoh_async",
                        lambda host, address, stream: host.fill(next(copies)), raising=False)
    state = FakeArray((4,))
    synchronized = ops.stream.synchronized
    first = ops.to_host_async(state)
    event = first.slot[1]
    assert event.recorded == [ops.stream] and not first.ready()
    assert ops.stream.synchronized == synchronized
    np.testing.assert_array_equal(first.value(), [1, 1, 1, 1])
    assert event.waited == 1 and first.ready()
    second = ops.to_host_async(state)
    assert second.slot[1] is event  # reused
    np.testing.assert_array_equal(second.value(), [2, 2, 2, 2])
    np.testing.assert_array_equal(first.value(), [1, 1, 1, 1])
    assert ops.stream.synchronized == synchronized


# ---- the GPU (pytest -m gpu): fp32 bit for bit; fp16 with dynamic scaling ---------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["classifier", "detector"])
def test_gpu_fp32_recorded_weights_are_bit_identical_with_scaling(tmp_path, kind):
    """As the CPU test, on the GPU's recorded iterations (CapturedSteps for the classifier,
    PlannedCapturedSteps for the detector) in fp32: runs on one backend (the same cuDNN
    algorithms), its random source seeded anew for each. Bit for bit where two unscaled runs
    are (batch norm's sums are atomic adds), else as close as those two are to each other."""
    from engine.backends.cuda import CudaBackend
    if kind == "classifier":
        path, batches = write_cfg(tmp_path / "c.cfg", NET, BN_BODY), classifier_batches(5)
    else:
        path, batches = detector_cfg(tmp_path), yolo_batches(5)
    ops = CudaBackend(device=0, seed=5)

    def run(scaler):
        ops.seed(5)
        net = Network(path, backend=ops, seed=5, quiet=True)
        net.loss_scaler = scaler
        runner = training.iteration_runner(net, training.SINGLE_PROCESS)
        losses = [runner(images.copy(), truth.copy(), 0.05) for images, truth in batches]
        assert isinstance(runner, training.CapturedSteps)  # PlannedCapturedSteps is one too
        if scaler is not None:
            scaler.settle()
        return losses, state_of(net)
    (_, plain), (_, again) = run(None), run(None)
    scaler = LossScaler(2.0 ** 12)
    _, scaled = run(scaler)
    assert scaler.skipped_steps == 0
    for got, want, other in zip(scaled, plain, again):
        if np.array_equal(want, other):
            np.testing.assert_array_equal(got, want)
        else:
            spread = np.abs(want - other).max()
            np.testing.assert_allclose(got, want, rtol=0, atol=10 * spread)


def gpu_detector_runs(tmp_path, batches, scalers, overflow_iterations=(),
                      recorded=training.iteration_runner):
    """The batches through EagerSteps and the recording runner (`recorded`) on the GPU in
    fp16, each with its scaler: per runner (per iteration (loss, whether the weights moved),
    the skips the scaler reported once settled, weights, runner, scaler)."""
    from engine.backends.cuda import CudaBackend
    path = detector_cfg(tmp_path)
    results = []
    for runner, scaler in zip((training.EagerSteps, recorded), scalers):
        ops = CudaBackend(device=0, seed=5, precision="fp16")
        net = Network(path, backend=ops, seed=5, quiet=True)
        net.loss_scaler = scaler
        if overflow_iterations:
            overflow_on_device(net, overflow_iterations)
        run = runner(net, training.SINGLE_PROCESS)
        history, skips = [], []
        def parameters():  # what SGD changes (velocities are made at the first update)
            return [ops.to_host(a).copy() for layer in net.layers
                    for name, a in sorted(layer.params.items()) if name in layer.updates]
        for images, truth in batches:
            before = parameters()
            loss = run(images.copy(), truth.copy(), 0.05)
            moved = any(not np.array_equal(a, b) for a, b in zip(before, parameters()))
            history.append((loss, moved))
            skips += scaler.take_skips()
        scaler.settle()
        skips += scaler.take_skips()
        assert scaler.known_iteration == len(batches)
        results.append((history, skips, state_of(net), run, scaler))
    return results


def overflow_on_device(net, iterations):
    """As overflow_at, for the last [yolo] head (its host part, finish_cost, which the eager
    cost calls too, hands back its delta): one element made infinite on the device."""
    layer, count = net.cost_layers[-1], {"n": 0}
    original = layer.finish_cost

    def finish_cost(*args):
        value, delta = original(*args)
        count["n"] += 1
        if count["n"] in iterations:
            bad = net.ops.to_host(delta)
            bad.flat[0] = np.inf
            net.ops.set_(delta, bad)
        return value, delta
    layer.finish_cost = finish_cost


@pytest.mark.gpu
def test_gpu_fp16_dynamic_scaling_recorded_equals_eager(tmp_path):
    """fp16 training of the small detector with dynamic scaling from 2**16 (its first steps
    overflow fp16 and are skipped while the scale backs off, on the device): the recorded
    iterations (PlannedCapturedSteps: the scale's update inside the iteration's recording) skip
    the same steps, each reported once, reach the same scale and the eager iterations'
    weights."""
    batches = yolo_batches(16)
    (eager, eager_skips, eager_weights, _, eager_scaler), \
        (recorded, skips, weights, run, scaler) = gpu_detector_runs(
            tmp_path, batches, [LossScaler(), LossScaler()])
    assert type(run) is training.PlannedCapturedSteps and run.recording is not None
    assert skips == eager_skips and skips  # the same skipped iterations, S after each
    assert [skip.skipped_steps for skip in skips] == list(range(1, len(skips) + 1))
    assert scaler.scale == eager_scaler.scale == 2.0 ** 16 / 2 ** len(skips)
    assert scaler.skipped_steps == len(skips) and not scaler.pending
    skipped = {skip.iteration for skip in skips}
    for history in (eager, recorded):  # skipped steps leave the weights; the others train
        assert [moved for _, moved in history] == [k not in skipped
                                                   for k in range(1, len(batches) + 1)]
    assert history[-1][1]  # it trains in the end
    # fp16 rounding of other kernels: cuDNN's algorithm choices are made per backend, and the
    # eager steps' convolutions may run graph plans where the recordings make the legacy calls
    # (16 steps at learning rate 0.05 carry a gradient's rounding on: within 1e-2, or 1e-3 of
    # the tensor's largest value)
    np.testing.assert_allclose([h[0] for h in recorded], [h[0] for h in eager], rtol=1e-2)
    for got, want in zip(weights, eager_weights):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-2,
                                   atol=1e-3 * max(1.0, np.abs(want).max()))


@pytest.mark.gpu
def test_gpu_recorded_overflow_is_skipped(tmp_path):
    """An infinite delta in the 4th iteration (a recorded one) at a static scale: that step
    leaves weights and velocities unchanged on the GPU, is reported once, S stays; the others
    train. (SplitCapturedSteps: the infinity is put in by the host part between its two
    recordings; PlannedCapturedSteps has no host part to put it in.)"""
    batches = yolo_batches(6)
    (eager, eager_skips, _, _, _), (recorded, skips, weights, run, scaler) = gpu_detector_runs(
        tmp_path, batches, [LossScaler(8.0, dynamic=False), LossScaler(8.0, dynamic=False)],
        overflow_iterations={4}, recorded=training.SplitCapturedSteps)
    assert isinstance(run, training.SplitCapturedSteps) and run.backward is not None
    assert skips == eager_skips == [loss_scaling.Skip(4, 1, 8.0)]
    for history in (eager, recorded):
        assert [moved for _, moved in history] == [True, True, True, False, True, True]
    assert scaler.scale == 8.0 and scaler.good_steps == 2
    assert all(np.isfinite(w).all() for w in weights)
