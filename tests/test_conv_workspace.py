"""The CUDA backend's cuDNN workspace, on fakes (no GPU): sized to the algorithms chosen for the
plans a backend uses (the timing of a shape's forward candidates holds the largest only while it
runs), grown again when a backward algorithm needs more, and never given back to the pool while a
recording whose cuDNN calls hold its address may be replayed. The fake cuDNN checks every call's
workspace as cuDNN would (refusing one smaller than the algorithm needs); the real calls run in
tests/test_gpu_backend.py (-m gpu)."""

import weakref

import numpy as np
import pytest

from engine.backends.cuda import backend as cuda_backend
from engine.backends.cuda import cudnn_graph
from engine.errors import BackendError

from test_recorded_steps import ClockEvent, FakeArray, FakeDevice, FakeKernels

MiB = 1 << 20
X, X2, X3 = (2, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)
W = (4, 3, 3, 3)
KINDS = {"cudnnFindConvolutionForwardAlgorithm": "forward",
         "cudnnFindConvolutionBackwardDataAlgorithm": "data",
         "cudnnFindConvolutionBackwardFilterAlgorithm": "filter"}


class TrackingDevice(FakeDevice):
    """FakeDevice whose live arrays can be looked up by address (an array no longer referenced
    is gone: back in the pool), and whose pool notes the largest workspace alive each time its
    held blocks are given back."""

    def __init__(self):
        super().__init__()
        self.live = weakref.WeakValueDictionary()
        self.pool.workspaces_at_release = []
        release = self.pool.free_held

        def free_held():
            self.pool.workspaces_at_release.append(self.largest_workspace())
            release()
        self.pool.free_held = free_held

    def empty(self, shape, dtype=np.float32):
        array = super().empty(shape, dtype)
        self.live[array.ptr] = array
        return array

    def workspaces(self):
        return [a for a in list(self.live.values()) if a.dtype == np.uint8]

    def largest_workspace(self):
        return max((a.size for a in self.workspaces()), default=0)


class FakeDnn:
    """cuDNN's convolution calls as ConvPlan and the backend make them. Descriptors are shapes;
    Find returns candidates[(kind, x shape)] (kind: forward, data, filter) as (algo, workspace
    bytes); each call refuses a workspace smaller than its algorithm needs, and an algorithm in
    `refused`, and advances the clock by costs[(kind, x shape, algo)] ms; the host's clock
    ("wall", what an eager call takes to issue and run) by wall_costs[(x shape, algo)] ms where
    given, else by the kernels' ms."""

    def __init__(self, device, clock):
        self.device, self.clock = device, clock
        self.plans = {}
        self.candidates, self.wall_costs, self.refused = {}, {}, set()
        self.calls = []  # (kind, x shape, algo, workspace address)

    def tensor(self, shape, dtype=None, channels_last=False):
        return tuple(shape)

    filter = tensor

    def convolution(self, padding, stride, groups, dilation):
        return (padding, stride, groups, dilation)

    def output_shape(self, conv, x, w):
        return (x[0], w[0], x[2], x[3])

    def find_candidates(self, name, *descriptors, filter_size=1):
        kind = KINDS[name]
        x_shape = descriptors[3] if kind == "data" else descriptors[0]
        return [(algo, need) for algo, need, _ in self.candidates[(kind, x_shape)]]

    def _run(self, kind, plan, algo, need, workspace):
        x_shape = plan.x_desc
        given = 0 if workspace is None else self.device.live[workspace].size
        if given < need or (kind, algo) in self.refused:
            raise BackendError(f"cuDNN refuses {kind} algorithm {algo}")
        self.calls.append((kind, x_shape, algo, workspace))
        costs = {a: ms for a, _, ms in self.candidates[(kind, x_shape)]}
        self.clock["now"] += costs[algo]
        self.clock["wall"] += self.wall_costs.get((x_shape, algo), costs[algo])

    def conv_forward(self, plan, x, w, y, workspace, eager=False):
        algo, need = ((plan.eager_algo, plan.eager_workspace) if eager
                      else (plan.forward_algo, plan.forward_workspace))
        self._run("forward", plan, algo, need, workspace)

    def conv_backward_filter(self, plan, x, dy, dw, workspace):
        self._run("filter", plan, plan.filter_algo, plan.filter_workspace, workspace)

    def conv_backward_data(self, plan, w, dy, dx, workspace):
        self._run("data", plan, plan.data_algo, plan.data_workspace, workspace)


@pytest.fixture
def gpu(monkeypatch):
    """One fake GPU: its device, cuDNN (plans shared by every backend on it) and clock;
    gpu.backend() makes an fp32 CudaBackend on it."""
    clock = {"now": 0.0, "wall": 0.0}
    device = TrackingDevice()
    dnn = FakeDnn(device, clock)
    monkeypatch.setattr(cuda_backend, "_runtime",
                        lambda index, math_type: (device, FakeKernels(), dnn, None))
    # no backend-API graph plans for eager calls (tests/test_eager_graphs.py fakes those)
    monkeypatch.setattr(cudnn_graph, "convolution_graphs", lambda dnn, use="inference": None)

    class Gpu:
        pass

    made = Gpu()
    made.device, made.dnn, made.clock = device, dnn, clock

    def backend():
        ops = cuda_backend.CudaBackend(seed=1)
        ops.cuda.Event = lambda: ClockEvent(clock)
        ops._host_clock = lambda: clock["wall"]
        return ops

    made.backend = backend
    return made


def forward(ops, x_shape):
    return ops.conv_forward(FakeArray(x_shape), FakeArray(W), 1, 1, 1)


def backward(ops, x_shape):
    return ops.conv_backward(FakeArray(x_shape), FakeArray(W), FakeArray((x_shape[0], 4, 8, 8)),
                             1, 1, 1, FakeArray(W), True)


def test_the_workspace_fits_the_fastest_candidate_not_the_largest(gpu):
    """Candidates needing 1 MiB, 900 MiB and nothing, the last timed fastest: every candidate
    is timed in a workspace it fits, then the backend's workspace is what the fastest needs
    (none), the 900 MiB block dropped before the pool's held blocks go back to the driver, once;
    a later shape whose fastest needs more grows it; another backend on the GPU takes the plans
    at their chosen needs."""
    gpu.dnn.candidates[("forward", X)] = [(1, MiB, 2.0), (2, 900 * MiB, 3.0), (0, 0, 1.0)]
    ops = gpu.backend()
    forward(ops, X)
    assert {algo for _, _, algo, _ in gpu.dnn.calls} == {0, 1, 2}  # each ran (in a fit)
    assert gpu.dnn.calls[-1][2] == 0  # the layer's own call: the fastest
    assert ops._workspace is None and ops._workspace_size == 0
    assert gpu.device.workspaces() == []
    assert gpu.device.pool.released == 1 and gpu.device.pool.workspaces_at_release == [0]
    calls = len(gpu.dnn.calls)
    forward(ops, X)  # timed once per shape: one call, nothing released
    assert len(gpu.dnn.calls) == calls + 1 and gpu.device.pool.released == 1

    gpu.dnn.candidates[("forward", X2)] = [(2, 900 * MiB, 3.0), (1, MiB, 1.0)]
    forward(ops, X2)
    assert ops._workspace_size == MiB and gpu.dnn.calls[-1][2:] == (1, ops._workspace.ptr)
    assert gpu.device.pool.workspaces_at_release == [0, MiB]
    assert gpu.device.largest_workspace() == MiB

    other = gpu.backend()  # the same GPU: the plans are timed already
    forward(other, X)
    assert other._workspace is None
    forward(other, X2)
    assert other._workspace_size == MiB and gpu.device.pool.released == 2


def test_of_near_equal_forward_algorithms_the_lighter_is_kept(gpu):
    """Timed within NEAR_TIME of the fastest, the candidate needing less workspace is kept (for
    recordings and, being within EAGER_MARGIN, for eager calls); one slower than that is not."""
    from engine.backends.cuda.cudnn import NEAR_TIME

    gpu.dnn.candidates[("forward", X)] = [(1, 5 * MiB, 1.0), (3, 2 * MiB, 0.99 * NEAR_TIME)]
    gpu.dnn.candidates[("forward", X2)] = [(1, 5 * MiB, 1.0), (3, 2 * MiB, 1.02 * NEAR_TIME)]
    ops = gpu.backend()
    forward(ops, X)
    forward(ops, X2)
    chosen = {key[0]: (plan.forward_algo, plan.eager_algo, plan.forward_workspace)
              for key, plan in gpu.dnn.plans.items()}
    assert chosen == {X: (3, 3, 2 * MiB), X2: (1, 1, 5 * MiB)}
    assert ops._workspace_size == 5 * MiB


def test_training_keeps_the_largest_of_forward_and_backward_needs(gpu):
    """A backward's algorithms (found at its first backward) grow the workspace, and again when
    Find's first refuses to run and the next needs more; a later forward shape's timing then
    fits it to the largest need among the plans this backend uses, backward ones included. A
    backend that only runs the plan forward counts its forward need only."""
    dnn = gpu.dnn
    dnn.candidates[("forward", X)] = [(0, 0, 1.0), (2, 900 * MiB, 2.0)]
    dnn.candidates[("data", X)] = [(0, 2 * MiB, 1.0)]
    dnn.candidates[("filter", X)] = [(5, 3 * MiB, 1.0), (6, 5 * MiB, 1.0)]
    dnn.refused.add(("filter", 5))
    ops = gpu.backend()
    forward(ops, X)
    assert ops._workspace_size == 0
    backward(ops, X)
    assert ops._workspace_size == 5 * MiB
    assert [call[:3] for call in dnn.calls[-2:]] == [("filter", X, 6), ("data", X, 0)]

    dnn.candidates[("forward", X2)] = [(2, 900 * MiB, 2.0), (1, MiB, 1.0)]
    forward(ops, X2)
    assert ops._workspace_size == 5 * MiB and gpu.device.pool.released == 2
    assert gpu.device.largest_workspace() == 5 * MiB
    forward(ops, X)  # forward again after a backward: its backward need still counts
    assert ops._workspace_need() == 5 * MiB

    inference = gpu.backend()
    forward(inference, X)
    forward(inference, X2)
    assert inference._workspace_size == MiB


def test_a_recorded_workspace_outlives_its_replacement(gpu):
    """A workspace a recording's calls used stays alive (kept with the recording, not given
    back to the pool) when a later shape's timing replaces it, the new one is used from then
    on, and the old goes back to the pool when the recording does; without a recording the one
    replaced goes back at once."""
    dnn = gpu.dnn
    dnn.candidates[("forward", X)] = [(1, MiB, 1.0), (3, 2 * MiB, 2.0)]
    ops = gpu.backend()
    forward(ops, X)
    recorded = weakref.ref(ops._workspace)
    assert ops._workspace_size == MiB
    with ops.recording() as kept:
        forward(ops, X)
    assert dnn.calls[-1][3] == recorded().ptr and recorded() in kept

    dnn.candidates[("forward", X2)] = [(2, 900 * MiB, 2.0), (4, 4 * MiB, 1.0)]
    forward(ops, X2)
    assert ops._workspace_size == 4 * MiB and recorded() is not None
    assert dnn.calls[-1][3] == ops._workspace.ptr != recorded().ptr
    assert gpu.device.pool.workspaces_at_release[-1] == 4 * MiB
    del kept  # the recording is gone: nothing holds its workspace
    assert recorded() is None

    replaced = weakref.ref(ops._workspace)
    dnn.candidates[("forward", X3)] = [(7, 8 * MiB, 1.0)]  # one candidate: not timed
    forward(ops, X3)
    assert ops._workspace_size == 8 * MiB and replaced() is None


def test_a_workspace_grown_while_recording_is_the_recordings(gpu):
    """A plan first used inside a recording (not timed there: Find's first) grows the workspace
    there; that recording holds the new one and the one it began with. While it lives, a fit
    does not replace the workspace (that would add a block, not free one); once it is gone, it
    does."""
    dnn = gpu.dnn
    dnn.candidates[("forward", X)] = [(1, MiB, 1.0), (3, 2 * MiB, 2.0)]
    dnn.candidates[("forward", X2)] = [(4, 4 * MiB, 2.0), (0, 0, 1.0)]
    ops = gpu.backend()
    forward(ops, X)
    before = weakref.ref(ops._workspace)
    with ops.recording() as kept:
        forward(ops, X2)
    assert dnn.calls[-1][2:] == (4, ops._workspace.ptr) and ops._workspace in kept
    assert before() in kept
    grown = weakref.ref(ops._workspace)
    (key, _), = [(k, p) for k, p in dnn.plans.items() if k[0] == X2]
    dnn.plans[key] = None  # (as conv_backward drops an NHWC plan cuDNN refuses)
    ops._fit_workspace()
    assert ops._workspace_size == 4 * MiB and gpu.device.pool.released == 1
    del kept
    assert before() is None and grown() is ops._workspace
    ops._fit_workspace()
    assert ops._workspace_size == MiB and grown() is None and gpu.device.pool.released == 2


def test_a_dropped_plan_no_longer_counts(gpu):
    """A plan dropped from the shared plans (an NHWC backward cuDNN refuses) leaves the
    backend's needs: the next fit shrinks past it."""
    dnn = gpu.dnn
    dnn.candidates[("forward", X)] = [(0, 0, 1.0), (3, 2 * MiB, 2.0)]
    dnn.candidates[("forward", X2)] = [(4, 3 * MiB, 1.0)]
    ops = gpu.backend()
    forward(ops, X2)  # one candidate: not timed, no fit
    assert ops._workspace_size == 3 * MiB and gpu.device.pool.released == 0
    forward(ops, X)
    assert ops._workspace_size == 3 * MiB
    (key, plan), = [(k, p) for k, p in dnn.plans.items() if k[0] == X2]
    dnn.plans[key] = None
    ops._fit_workspace()
    assert ops._workspace is None and gpu.device.pool.released == 1


def test_eager_inference_takes_the_fastest_to_issue_and_run(gpu):
    """Kernels alone, algorithm 1 is fastest; issued and run as eager calls (the host's work
    included), algorithm 0: eager inference calls run 0, recordings and training calls run 1,
    and the workspace holds what either needs. Where the recordings' choice is within
    EAGER_MARGIN of the eager fastest, eager calls run it too (the same results)."""
    dnn = gpu.dnn
    dnn.candidates[("forward", X)] = [(1, MiB, 1.0), (0, 0, 2.0)]
    dnn.wall_costs[(X, 1)], dnn.wall_costs[(X, 0)] = 5.0, 2.0
    ops = gpu.backend()
    forward(ops, X)
    assert dnn.calls[-1][2] == 0
    (plan,) = dnn.plans.values()
    assert (plan.forward_algo, plan.eager_algo) == (1, 0)
    assert ops._workspace_size == MiB  # the recordings' algorithm needs it
    with ops.recording():
        forward(ops, X)
    assert dnn.calls[-1][2] == 1
    ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
    assert dnn.calls[-1][2] == 1

    dnn.candidates[("forward", X2)] = [(1, MiB, 1.0), (0, 0, 2.0)]
    dnn.wall_costs[(X2, 1)] = 2.0 * cuda_backend.EAGER_MARGIN * 0.99  # within 0's margin
    forward(ops, X2)
    assert dnn.calls[-1][2] == 1
