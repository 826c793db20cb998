"""Recorded training steps without a GPU: train.CapturedSteps on a numpy backend that records
as the CUDA backend does (the recording runs only when replayed, with the replay's learning
rate), and the CUDA backend's recording interface (recording(), set_step) on fake devices.
The real graphs run in tests/test_gpu_backend.py (-m gpu)."""

import numpy as np
import pytest

from engine import train as training
from engine.backends.cuda import backend as cuda_backend
from engine.backends.cuda import graph as cuda_graph
from engine.backends.numpy_backend import NumpyBackend
from engine.network import Network

from helpers import write_cfg

BODY = """
[convolutional]
filters=4
size=3
stride=2
pad=1
activation=leaky

[dropout]
probability=.25

[connected]
output=3
activation=linear

[softmax]
"""


class RecordingNumpy(NumpyBackend):
    """A numpy backend that records like CudaBackend: capture() runs nothing, each replay runs
    the step with the replay's learning rate where the recording passed 0.0."""

    can_record = True

    def __init__(self, seed=0):
        super().__init__(seed)
        self.replay_rate = None
        self.recordings = 0

    def capture(self, step):
        backend = self
        backend.recordings += 1

        class Replay:
            def replay(self, learning_rate=0.0):
                backend.replay_rate = learning_rate
                try:
                    self.cost = step()
                finally:
                    backend.replay_rate = None

            def last_cost(self):
                return self.cost

        return Replay()

    def sgd_update(self, param, gradient, velocity, learning_rate, momentum, decay, batch,
                   loss_scale=None):
        if self.replay_rate is not None:
            learning_rate = self.replay_rate
        return super().sgd_update(param, gradient, velocity, learning_rate, momentum, decay, batch,
                                  loss_scale)


def train_eagerly_and_recorded(path, batches, recorded):
    """The batches through EagerSteps, then through the `recorded` runner, each on a new network
    of `path` on a recording numpy backend, the rate 0.1 * (k + 1) at batch k: per runner
    (losses, seen, weights, recordings made)."""
    results = []
    for runner in (training.EagerSteps, recorded):
        net = Network(path, backend=RecordingNumpy(seed=5), quiet=True)
        run = runner(net, training.SINGLE_PROCESS)
        losses = [run(images, truth, 0.1 * (k + 1)) for k, (images, truth) in enumerate(batches)]
        weights = [net.ops.to_host(a).copy() for layer in net.layers for a in layer.params.values()]
        results.append((losses, net.seen, weights, net.ops.recordings))
    return results


def test_captured_steps_train_as_eager_steps(tmp_path):
    """The same batches and rates through CapturedSteps (one eager iteration, then a recording
    replayed) and EagerSteps: the same losses, `seen` and weights."""
    path = write_cfg(tmp_path / "r.cfg", {"batch": 4, "subdivisions": 1, "height": 6, "width": 6,
                                          "channels": 1, "learning_rate": 0.1, "momentum": 0.9,
                                          "decay": 0.001}, BODY)
    rng = np.random.default_rng(3)
    batches = [(rng.uniform(0, 1, (4, 1, 6, 6)).astype(np.float32),
                np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4)]) for _ in range(4)]
    (eager_losses, eager_seen, eager_weights, _), (losses, seen, weights, recordings) = \
        train_eagerly_and_recorded(path, batches, training.CapturedSteps)
    assert recordings == 1 and seen == eager_seen == 16
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-6)
    for got, want in zip(weights, eager_weights):
        np.testing.assert_array_equal(got, want)


# ---- the CUDA backend's recording interface, on fakes -------------------------------------------
class FakeArray:
    addresses = iter(range(4096, 1 << 40, 4096))

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), dtype
        self.size = int(np.prod(self.shape))
        self.ptr = self.gpudata = next(FakeArray.addresses)


class FakeStream:
    handles = iter(range(78, 1 << 20))

    def __init__(self, handle=None):
        self.handle = next(FakeStream.handles) if handle is None else handle
        self.synchronized = 0
        self.waited = []  # the events this stream was made to wait for

    def synchronize(self):
        self.synchronized += 1

    def wait_for_event(self, event):
        self.waited.append(event)


class FakeEvent:
    def __init__(self):
        self.recorded_on = None

    def record(self, stream):
        self.recorded_on = stream


class ClockEvent:
    """An event that notes a fake clock's time ({"now": ms}) when recorded (fake timings)."""

    def __init__(self, clock):
        self.clock, self.time = clock, None

    def record(self, stream):
        self.time = self.clock["now"]

    def synchronize(self):
        pass

    def time_since(self, start):
        return self.time - start.time


class FakeCuda:
    def __init__(self):
        self.copies = []  # (device address, values) of memcpy_htod_async

    pagelocked_empty = staticmethod(np.empty)
    Stream, Event = FakeStream, FakeEvent
    Error = RuntimeError

    def memcpy_htod_async(self, address, values, stream):
        self.copies.append((address, np.array(values)))

    def memset_d32_async(self, address, value, count, stream):
        pass

    def memcpy_dtoh_async(self, host, address, stream):
        host[...] = 2.5


class FakePool:
    """PyCUDA's DeviceMemoryPool as far as the backend calls it: how often its held blocks
    were given back to the driver."""

    def __init__(self):
        self.released = 0

    def free_held(self):
        self.released += 1


class FakeDevice:
    def __init__(self):
        self.cuda, self.stream, self.keep_alive = FakeCuda(), FakeStream(77), None
        self.index, self.name = 0, "fake"
        self.pool = FakePool()

    def memory_free(self):
        return 1 << 34

    def empty(self, shape, dtype=np.float32):
        array = FakeArray(shape, dtype)
        if self.keep_alive is not None:
            self.keep_alive.append(array)
        return array


class FakeKernels:
    def __init__(self):
        self.launches = []

    def launch(self, name, n, *args, dtype=None):
        self.launches.append((name, args))


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_runtime",
                        lambda device, math_type: (FakeDevice(), FakeKernels(), None, None))
    return cuda_backend.CudaBackend(seed=11)


def test_cuda_recording_interface(fake_gpu):
    """Outside a recording the kernels get the learning rate and seed as arguments (null
    addresses); inside, the addresses of the step values set_step refreshes; allocations are
    kept with the recording; a loss reads 0.0 until last_cost."""
    ops, launches = fake_gpu, fake_gpu.kernels.launches
    param, gradient, velocity = FakeArray((3,)), FakeArray((3,)), FakeArray((3,))
    x = FakeArray((2, 3))
    ops.sgd_update(param, gradient, velocity, 0.1, 0.9, 0.0, 1)
    ops.dropout_forward(x, 0.5)
    assert launches[-2][1][5] == 0 and launches[-1][1][7] == 0
    with ops.recording() as kept:
        ops.sgd_update(param, gradient, velocity, 0.1, 0.9, 0.0, 1)
        y, mask = ops.dropout_forward(x, 0.5)
        cost, _ = ops.sse(x, FakeArray((2, 3)))
    step_values = ops._step_values.ptr
    assert launches[-3][1][5] == step_values and launches[-2][1][7] == step_values + 4
    assert y in kept and mask in kept and ops.device.keep_alive is None
    assert cost == 0.0 and ops.last_cost() == 2.5
    assert ops.sse(x, FakeArray((2, 3)))[0] == 2.5  # eager again

    copies, stream = ops.cuda.copies, ops.stream
    synchronized = stream.synchronized
    for step in range(1, cuda_backend.STEP_SLOTS + 2):
        ops.set_step(0.25 * step, step)
    address, values = copies[-1]
    step = cuda_backend.STEP_SLOTS + 1
    assert address == step_values
    assert values[0] == np.float32(0.25 * step).view(np.uint32)
    assert values[1] == (11 * 0x9E3779B1 + step) & 0xFFFFFFFF
    assert stream.synchronized == synchronized + 1  # once per wrap of the pinned slots


class FakeDriver:
    class CUresult:
        CUDA_SUCCESS = 0

    class CUstreamCaptureMode:
        CU_STREAM_CAPTURE_MODE_RELAXED = 1

    CUstream = staticmethod(lambda handle: ("stream", handle))

    def __init__(self):
        self.launched = 0

    def cuStreamBeginCapture(self, stream, mode):
        return (0,)

    def cuStreamEndCapture(self, stream):
        return (0, "graph")

    def cuGraphInstantiate(self, graph, flags):
        return (0, "executable")

    def cuGraphLaunch(self, executable, stream):
        self.launched += 1
        return (0,)

    # events (graph.HostReader)
    class CUevent_flags:
        CU_EVENT_DISABLE_TIMING = 2

    class CUevent_record_flags:
        CU_EVENT_RECORD_EXTERNAL = 1

    events = []

    def cuEventCreate(self, flags):
        self.events.append(["event", flags])
        return (0, self.events[-1])

    def cuEventRecord(self, event, stream):
        event.append(("record", stream))
        return (0,)

    def cuEventRecordWithFlags(self, event, stream, flags):
        event.append(("record", stream, flags))
        return (0,)

    def cuEventSynchronize(self, event):
        event.append("synchronize")
        return (0,)

    def cuEventDestroy(self, event):
        return (0,)


def test_captured_step_uses_the_recording_interface(fake_gpu, monkeypatch):
    driver = FakeDriver()
    monkeypatch.setattr(cuda_graph, "cuda_driver", lambda: driver)
    ops, seen = fake_gpu, []
    step = ops.capture(lambda: seen.append((ops._recording, ops.device.keep_alive is not None)))
    assert seen == [(True, True)] and not ops._recording
    step.replay(0.5)
    step.replay(0.25)
    assert driver.launched == 2
    (_, first), (_, second) = ops.cuda.copies[-2:]
    # a recording whose outputs are copied on the copy stream joins it before it ends
    heads = [FakeArray((1, 6, 2, 2))]
    ops.capture(lambda: ops.output_reader(heads))
    assert ops.stream.waited[-1].recorded_on is ops._copy_stream and not ops._copies_forked

    def broken(event, stream):  # a capture already invalidated: the driver refuses the join
        raise RuntimeError("capture invalidated")
    monkeypatch.setattr(FakeEvent, "record", broken, raising=False)
    with ops.recording():
        ops._copies_forked.append("a fork")
        ops._join_recorded_copies()  # leaves the failure to the end of the capture
    assert not ops._copies_forked  # and nothing stale for the next recording
    assert first[0] == np.float32(0.5).view(np.uint32)
    assert [first[1], second[1]] == [(11 * 0x9E3779B1 + n) & 0xFFFFFFFF for n in (1, 2)]


def test_host_reader_waits_for_its_point_only(fake_gpu, monkeypatch):
    """A reader copies its array into page-locked memory and records an event after the copy,
    in a recording an external event node (the plain record is for eager work); values()
    synchronises on that event alone, and returns the copy in float64."""
    driver = FakeDriver()
    monkeypatch.setattr(cuda_graph, "cuda_driver", lambda: driver)
    ops = fake_gpu
    statistics = FakeArray((5,), np.float64)
    synchronized = ops.stream.synchronized
    eager = ops.host_reader(statistics)
    with ops.recording():
        recorded = ops.host_reader(statistics)
    assert eager.copied.event[1] == recorded.copied.event[1] == 2  # no timing
    assert eager.copied.event[2] == ("record", ("stream", 77))
    assert recorded.copied.event[2] == ("record", ("stream", 77), 1)  # CU_EVENT_RECORD_EXTERNAL
    values = recorded.values()
    assert recorded.copied.event[-1] == "synchronize" and ops.stream.synchronized == synchronized
    assert values.dtype == np.float64 and list(values) == [2.5] * 5


def test_recorded_output_reader_copies_outputs_and_their_flag(fake_gpu, monkeypatch):
    """While recording, output_reader zeroes one flag, checks every output into it, copies the
    outputs and the flag into page-locked memory on the copy stream, forked from the main stream
    after the checks, and records an external event there after them; values() waits for that
    event alone and returns fresh float32 arrays and the flag's verdict. The main stream waits
    for the copy stream before the recording ends."""
    driver = FakeDriver()
    monkeypatch.setattr(cuda_graph, "cuda_driver", lambda: driver)
    ops, launches = fake_gpu, fake_gpu.kernels.launches
    heads = [FakeArray((1, 6, 2, 2)), FakeArray((1, 6, 4, 4))]
    synchronized = ops.stream.synchronized
    with ops.recording():
        reader = ops.output_reader(heads)
    assert [name for name, _ in launches[-2:]] == ["nonfinite_kernel"] * 2
    copies = ops._copy_stream
    assert copies is not ops.stream and len(copies.waited) == 1
    assert copies.waited[0].recorded_on is ops.stream  # forked after the checks
    assert reader.copied.event[2] == ("record", ("stream", copies.handle), 1)  # EXTERNAL
    with ops.recording():
        ops.output_reader(heads[:1])  # a second reader forks again, from the same stream
        assert len(copies.waited) == 2 and ops._copy_stream is copies
        ops._join_recorded_copies()
    assert ops.stream.waited[-1].recorded_on is copies and not ops._copies_forked
    reader.flag[...] = 0
    outputs, finite = reader.values()
    assert reader.copied.event[-1] == "synchronize" and ops.stream.synchronized == synchronized
    assert finite and [y.shape for y in outputs] == [(1, 6, 2, 2), (1, 6, 4, 4)]
    assert all(y.dtype == np.float32 and (y == 2.5).all() for y in outputs)
    outputs[0][...] = 0  # the caller's own arrays: the next values() is not changed
    reader.flag[...] = 1
    again, finite = reader.values()
    assert not finite and (again[0] == 2.5).all()


YOLO_BODY = """
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=14
size=1
stride=1
activation=linear

[yolo]
mask=0,1
anchors=3,4, 6,5, 9,11, 14,12
classes=2
num=4
max=2

[route]
layers=-3

[convolutional]
filters=14
size=1
stride=1
activation=linear

[yolo]
mask=2,3
anchors=3,4, 6,5, 9,11, 14,12
classes=2
num=4
max=4
iou_loss=ciou
iou_normalizer=0.07
delta_normalizer=0.5
ignore_thresh=0.3
"""


YOLO_NET = {"batch": 4, "subdivisions": 1, "height": 16, "width": 16, "channels": 3,
            "learning_rate": 0.1, "momentum": 0.9, "decay": 0.001}
# the second head with predictions past truth_thresh: its truth part stays on the host
YOLO_BODY_TRUTH_THRESH = YOLO_BODY + "truth_thresh=0.4\n"


def yolo_batches(count=4, seed=4):
    """`count` batches of 4 images with 1 to 4 boxes each, for YOLO_BODY's detector."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        truth = np.zeros((4, 4 * 5), np.float32)
        for b in range(4):
            for r in range(int(rng.integers(1, 5))):
                w, h = rng.uniform(0.1, 0.6, 2)
                truth[b, 5 * r:5 * r + 5] = [rng.uniform(w / 2, 1 - w / 2),
                                             rng.uniform(h / 2, 1 - h / 2), w, h,
                                             rng.integers(0, 2)]
        batches.append((rng.uniform(0, 1, (4, 3, 16, 16)).astype(np.float32), truth))
    return batches


@pytest.mark.parametrize("runner, body, recorded", [
    (training.SplitCapturedSteps, YOLO_BODY_TRUTH_THRESH, 2),
    (training.SplitCapturedSteps, YOLO_BODY, 2),
    (training.PlannedCapturedSteps, YOLO_BODY, 1)])
def test_recorded_detector_steps_train_as_eager_steps(tmp_path, runner, body, recorded):
    """A detector (two [yolo] heads, AlexeyAB's loss, the first reading only 2 of the truth's 4
    rows) through SplitCapturedSteps (one eager iteration, then two recordings around the
    losses' host part; one head with truth_thresh < 1 or none) or PlannedCapturedSteps (one
    recording, the heads' plans set before each replay) and EagerSteps: the same losses,
    `seen` and weights."""
    path = write_cfg(tmp_path / "y.cfg", YOLO_NET, body)
    batches = yolo_batches()
    assert Network(path, quiet=True).truth_boxes == 4
    (eager_losses, eager_seen, eager_weights, _), (losses, seen, weights, recordings) = \
        train_eagerly_and_recorded(path, batches, runner)
    assert recordings == recorded and seen == eager_seen == 16
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-6)
    for got, want in zip(weights, eager_weights):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("body, net, runner", [
    (YOLO_BODY, {}, training.PlannedCapturedSteps),
    (YOLO_BODY_TRUTH_THRESH, {}, training.SplitCapturedSteps),
    (YOLO_BODY, {"batch": 8, "subdivisions": 2}, training.EagerSteps),
    (BODY, {"height": 6, "width": 6, "channels": 1}, training.CapturedSteps)])
def test_iteration_runner_choice(fake_gpu, tmp_path, body, net, runner):
    """On a backend that records (the CUDA one, on fakes): one recording per iteration for a
    detector whose heads' truth parts all run on the backend, two around the host part when a
    head's does not (truth_thresh < 1), none when a batch is several passes; a classifier's
    iteration is one recording."""
    path = write_cfg(tmp_path / "n.cfg", {**YOLO_NET, **net}, body)
    chosen = training.iteration_runner(Network(path, backend=fake_gpu, quiet=True),
                                       training.SINGLE_PROCESS)
    assert type(chosen) is runner
