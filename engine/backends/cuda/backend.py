"""CudaBackend: the operations of backends/numpy_backend.py (same signatures and semantics:
deltas are negative gradients, *_updates accumulate, in-place ops return their argument) on
PyCUDA GPUArrays, issued in order on one stream.

Convolutions and batch-norm training run in cuDNN, matrix products in cuBLAS, the rest in
kernels/*.cu. Inference batch norm is Darknet's rule (engine/batchnorm_rule.py) in our own
kernel, since cuDNN's inference call divides by sqrt(var+eps) and has no fused activation.
Layer geometry arrives as strided views (backends/views.py), walked by kernels/strided.cuh.

Precision (engine/precision.py): in fp16 or bf16 the activations and deltas the operations make
are stored in that type (every kernel is built for it: kernels/storage.cuh) and convolutions run
on tensor cores; parameters and their updates stay float32. An operation makes the operands it
combines one type: the first activation operand's, the others converted (a float32 parameter
used as an activation, such as a convolution's weights, is converted once when frozen).

Layout: in fp16 and bf16, convolutions (inference and training) store their outputs channels
last (NHWC), the layout cuDNN's tensor-core kernels read and write; given NCHW data they
transpose it on the way in and out, which cost 0.55 of YOLOv4's 1.89 ms of kernels at batch 1
and 20 of its 108 ms training step. Such an array keeps its NCHW shape and says
`channels_last`; the operations in CHANNELS_LAST_AWARE follow it (the strided views through
views.strides, bias, batch norm and pooling through their NHWC kernels, elementwise ones as
they are), every other operation is given NCHW copies of its operands (those it writes are
copied back): an operation that meets NHWC data where it does not expect it is slower, never
wrong.
"""

import contextlib
import functools
import itertools
import math
import time
import weakref

import numpy as np

from ... import activations, memory
from ...constants import PJREDDIE_BN_EPSILONS
from ...errors import BackendError
from ...precision import STORAGE_DTYPES, check_precision
from .. import views
from ..operations import HostRead, Operations, OutputsNow, ReadyRead
from ..yolo_truths import IOU_LOSSES, STATISTICS
from .cublas import Cublas
from .cudnn import (CUDNN_BATCHNORM_PER_ACTIVATION, CUDNN_BATCHNORM_SPATIAL, CUDNN_DEFAULT_MATH,
                    CUDNN_FMA_MATH, CUDNN_TENSOR_OP_MATH, Cudnn, lightest_near_fastest)
from . import cudnn_graph, host_copies
from .device import get_device
from .kernels import BLOCK, ROW_CHUNK, Kernels
from .libraries import check_gpu_dependencies

ACTIVATION_IDS = {name: index for index, name in enumerate(activations.NAMES)}
STEP_SLOTS = 1024  # pinned host slots set_step copies from; the stream is drained once per wrap
# Downloads of more than STAGED_MIN bytes into pageable numpy memory go through two pinned buffers
# of STAGE_CHUNK bytes, the DMA of one chunk overlapping the host's copy of the previous: 25%
# faster than one pageable copy for YOLOv3's 58 MB of batch-16 outputs on an H200 (uploads staged
# on one thread so measured slower than the pageable copy: see UPLOAD_STAGED_MIN).
STAGED_MIN = 1 << 20
STAGE_CHUNK = 4 << 20
# set_ copies host batches of more than UPLOAD_STAGED_MIN bytes into a page-locked buffer on
# several threads (host_copies.py) and sends that: batch 16 at 416x416 (33 MB) 5.3 -> 1.9 ms on an
# H200; a batch-1 image (2 MB) goes pageable (0.16 ms; 0.22 ms staged).
UPLOAD_STAGED_MIN = 8 << 20
# Channel planes of at least PLANES_MIN elements get the *_planes kernels (a block per piece of a
# plane, no division per element: 2.5 -> 1.6 ms for YOLOv3's 75 bias passes at batch 16 in fp16);
# smaller ones (MNIST's, CIFAR's) keep the one-thread-per-element kernels.
PLANES_MIN = 2048
# Rows of fewer elements than SHORT_ROW (a channels-last [route]'s: one position's channels) are
# copied a thread per 16 bytes (copy_vectors_kernel), longer ones a block per ROW_CHUNK
# (copy_rows_kernel: a block of 256 threads for a row of 64 halves left most of them idle).
SHORT_ROW = 2048
# A block of batch norm's reductions (kernels/batchnorm.cu) sums BN_CHUNK values of one plane;
# on NHWC arrays the rows of BN_NHWC_CHUNK values, of at most BN_REDUCE_THREADS packs each.
BN_CHUNK = 4096
BN_NHWC_CHUNK = 65536
BN_REDUCE_THREADS = 256
BN_NHWC_ROWS = 8  # rows per thread of the NHWC elementwise passes
# cuDNN's Find times each algorithm once, and on an H200 its order of the fastest few changes
# from run to run (a non-tensor-core algorithm won for 12 of YOLOv3's 75 convolutions in fp16).
# Its times also include issuing the calls, which for small convolutions is most of them (batch
# 1 at 416: 10-40 us of kernels, tens of us to issue), so it ranks algorithms of few kernels first.
# The first forward pass of a shape times every one of Find's candidates again, on the real
# arrays (FORWARD_REPEATS runs each after a warm-up), queued behind a HOLD_US wait on the GPU so
# that the events time the kernels alone, and keeps the fastest (of those within
# cudnn.NEAR_TIME of it, the one needing the least workspace). (Timed so, yolov4-tiny's batch-1
# forward in TF32 no longer runs 18 convolutions in a 43 us non-tensor-core kernel.)
# That choice is what a recording replays, where issuing costs nothing. An eager inference call
# pays cuDNN's host work too (20-30 us for one-kernel algorithms, 45-115 us for some
# IMPLICIT_PRECOMP_GEMM and Winograd ones on an H200: in cifar.cfg's eager batch-1 forward its
# calls took 122 us each on average, against 63 us with Find's order and 73 us since), so each
# candidate is also timed as eager calls run, back to back by the host's clock (EAGER_REPEATS
# calls), and eager inference calls use the fastest so timed unless the recordings' choice is
# within EAGER_MARGIN of it (then both run one algorithm: the same results).
# cuDNN 9's legacy call itself costs the host 53-102 us on small shapes, executing a finalized
# backend-API plan about 10 us (H200): on a shape's first eager inference call, plain
# convolution graph plans (cudnn_graph.ConvolutionGraphs) are timed the same way against that
# eager algorithm, and eager inference calls run the fastest where it agreed and was faster
# (_time_eager_graphs; ConvPlan.eager_graph). Eager training calls do the same for the forward,
# the backward data and the backward filter, each against the legacy call training makes
# (forward_algo, data_algo, filter_algo), deterministic engines only, on the shape's first
# eager call of that kind (_training_graph; ConvPlan.training_graphs). Recordings keep the
# legacy calls, whose algorithms were chosen by their kernels' time.
FORWARD_CANDIDATES = 8
FORWARD_REPEATS = 3
HOLD_US = 1000
EAGER_REPEATS = 10
EAGER_MARGIN = 1.1
# A training call whose legacy call takes longer than this by the host's clock (us per call)
# keeps it without timing graph plans: a plan saves the host tens of us, a few percent
# there, and timing EAGER_CANDIDATES plans EAGER_REPEATS times each would add seconds to a large
# detector's first training step, per shape and pass.
TRAINING_GRAPH_LONGEST_US = 1000
# A shape's graph plans are compared with the legacy call on a call whose legacy output is
# finite and not all zeros: an fp16 step that overflowed (dynamic loss scaling's first steps)
# or zero deltas would compare nothing. The choice waits for such a call (_choose_graph gives
# DEFERRED), at most GRAPH_DEFERRALS calls per shape and use, then keeps the legacy call.
GRAPH_DEFERRALS = 3
DEFERRED = "deferred"

# cuDNN's math per precision: exact float32 FMA; TF32 allowed; tensor cores for half data.
MATH_TYPES = {"fp32": CUDNN_FMA_MATH, "tf32": CUDNN_DEFAULT_MATH, "fp16": CUDNN_TENSOR_OP_MATH,
              "bf16": CUDNN_TENSOR_OP_MATH}
FLOAT32 = np.dtype(np.float32)

_RUNTIMES = {}  # (device, math type) -> (Device, Kernels, Cudnn, Cublas), made once


def _runtime(device_index, math_type):
    key = (device_index, math_type)
    if key not in _RUNTIMES:
        check_gpu_dependencies()  # a missing package or library: one line naming it
        device = get_device(device_index)
        stream = device.stream.handle
        kernels = next((r[1] for k, r in _RUNTIMES.items() if k[0] == device_index), None)
        _RUNTIMES[key] = (device, kernels or Kernels(device), Cudnn(stream, math_type),
                          Cublas(stream))
    return _RUNTIMES[key]


def _size(shape):
    return int(math.prod(int(n) for n in shape))  # np.prod costs ~4 us a call: many per layer


def _channels_last(array):
    """Whether a device array's elements are stored NHWC (see the module's docstring)."""
    return getattr(array, "channels_last", False)


def _stored(view, array):
    """A View of `array` with what _joint_walk needs of the array: its size, and its NCHW shape
    where its elements are stored channels last (else None)."""
    shape = tuple(int(n) for n in array.shape) if _channels_last(array) else None
    return view, int(array.size), shape


def _walk(view, array):
    """(elements, counts c1..c5, (offset, s0..s5)) of a View of `array`, as the kernels of
    strided.cuh take them."""
    n, counts, (walk,) = _joint_walk((_stored(view, array),))
    return n, counts, walk


@functools.lru_cache(maxsize=4096)
def _joint_walk(stored_views):
    """The geometry of views (_stored's triples) holding the same counts, walked together:
    (elements, counts c1..c5, one (offset, s0..s5) per view). Axes of one element are dropped
    and neighbouring axes that every view steps through as one are merged, so that the kernels
    divide the element index by as few counts as possible (a route's copy of one image: by
    none). Where an array is stored channels last, the axes are walked in the memory order of
    the last view (a copy's destination), so that neighbouring threads touch neighbouring
    channels. ValueError where a view does not fit its array."""
    geometries = []
    for view, size, channels_last in stored_views:
        views.check(view, size)
        geometries.append(views.strides(view, channels_last))
    counts = geometries[0][1]
    if any(g[1] != counts for g in geometries):
        raise ValueError(f"views {[v for v, _, _ in stored_views]} hold different counts")
    order = range(views.MAX_AXES)
    if any(channels_last for _, _, channels_last in stored_views):
        order = sorted(order, key=lambda k: -abs(geometries[-1][2][k]))
    axes = []  # [count, [step in each view]], outermost first
    for k in order:
        count = counts[k]
        if count == 1:
            continue
        steps = [g[2][k] for g in geometries]
        if axes and all(outer == inner * count for outer, inner in zip(axes[-1][1], steps)):
            axes[-1] = [axes[-1][0] * count, steps]
        else:
            axes.append([count, steps])
    # The outermost axis goes first (c0: the kernels never divide by it), counts of 1 (no
    # division either) between it and the others.
    axes = axes or [[1, [0] * len(geometries)]]
    axes = axes[:1] + [[1, [0] * len(geometries)]] * (views.MAX_AXES - len(axes)) + axes[1:]
    walks = tuple((g[0],) + tuple(steps[j] for _, steps in axes)
                  for j, g in enumerate(geometries))
    return _size(counts), tuple(count for count, _ in axes[1:]), walks


def _vector_rows(n, counts, *walks, vector):
    """For a joint walk (_joint_walk) that is rows of contiguous elements in every view, whole
    vectors of `vector` elements long and apart: (row length, one (offset, row step) per view)
    for copy_rows_kernel; else None."""
    if any(count != 1 for count in counts[:-1]):
        return None
    length = counts[-1]
    if length == 1:  # one axis: contiguous throughout, or not at all
        if any(walk[1] != 1 for walk in walks):
            return None
        length, steps = n, [(walk[0], 0) for walk in walks]
    elif any(walk[-1] != 1 for walk in walks):
        return None
    else:
        steps = [(walk[0], walk[1]) for walk in walks]
    if length % vector or any(offset % vector or step % vector for offset, step in steps):
        return None
    return length, *steps


def _lanes(view, axis, array):
    """The lanes of a softmax along `axis` of a View: _walk's geometry of their first elements
    (the view with one index on that axis), and the axis' count and element stride."""
    lanes = view._replace(window=tuple((start, 1, step) if k == axis else (start, count, step)
                                       for k, (start, count, step) in enumerate(view.window)))
    view, _, channels_last = _stored(view, array)
    _, _, steps = views.strides(view, channels_last)
    along = views.MAX_AXES - len(view.window) + axis
    return _walk(lanes, array) + (view.window[axis][1], steps[along])


def _merged_axes(shape, out_shape):
    """x's `shape` and its sum's `out_shape` as at most six counts (adjacent axes that are both
    kept or both summed merged into one, then padded with 1s in front) and the bitmask of kept
    axes sum_to_kernel takes."""
    merged = []  # [count, kept]
    for n, m in zip(shape, out_shape):
        kept = m == n
        if n == 1:
            continue
        if merged and merged[-1][1] == kept:
            merged[-1][0] *= n
        else:
            merged.append([n, kept])
    if len(merged) > views.MAX_AXES:
        raise ValueError(f"cannot sum {shape} to {out_shape}: too many alternating axes")
    merged = [[1, True]] * (views.MAX_AXES - len(merged)) + merged
    keep = sum(1 << k for k, (_, kept) in enumerate(merged) if kept)
    return tuple(n for n, _ in merged), keep


def _activation_id(name):
    try:
        return ACTIVATION_IDS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name}") from None


class ConvPlan:
    """Descriptors, algorithms and workspace sizes for one convolution shape, found once (the
    backward ones at the first backward: find_backward). channels_last: x, the filters and y
    stored NHWC. The forward has two choices: forward_algo, the fastest kernels (recordings,
    training), and eager_algo, the fastest to issue and run (eager inference calls; see
    EAGER_MARGIN), unless eager_graph, a cuDNN backend-API plan of the same convolution timed
    faster still, runs them (_time_eager_graphs); eager training calls may run such plans of
    the forward, backward data and backward filter (training_graphs). `workspace` is what the
    chosen algorithms and plans need; timing_workspace, the most any forward candidate needs,
    is held only while they are timed (_time_forward_candidates)."""

    def __init__(self, dnn, x_shape, w_shape, stride, padding, groups, dilation=1,
                 dtype=FLOAT32, channels_last=False):
        self.x_desc = dnn.tensor(x_shape, dtype, channels_last)
        self.w_desc = dnn.filter(w_shape, dtype, channels_last)
        self.conv_desc = dnn.convolution(padding, stride, groups, dilation)
        self.y_shape = dnn.output_shape(self.conv_desc, self.x_desc, self.w_desc)
        self.y_desc = dnn.tensor(self.y_shape, dtype, channels_last)
        size = max(w_shape[2:])
        self.forward_candidates = dnn.find_candidates(
            "cudnnFindConvolutionForwardAlgorithm", self.x_desc, self.w_desc, self.conv_desc,
            self.y_desc, filter_size=size)[:FORWARD_CANDIDATES]
        self.forward_algo, self.forward_workspace = self.forward_candidates[0]
        self.eager_algo, self.eager_workspace = self.forward_algo, self.forward_workspace
        self.forward_timed = len(self.forward_candidates) == 1
        self.timing_workspace = max(memory for _, memory in self.forward_candidates)
        self.eager_graph = None     # a cudnn_graph.ExecutionPlan eager inference calls run
        self.graph_timed = False    # graph plans timed (at the first aligned eager call)
        # The plans eager training calls run, by use ("forward", "data", "filter": cudnn_graph.
        # GRAPH_USES), each chosen at its first aligned eager call (None: the legacy call; no
        # entry: not chosen yet).
        self.training_graphs = {}
        self.graph_deferrals = {}  # use -> calls whose legacy output compared nothing
        self.filter_size = size
        self.data_algo = self.filter_algo = None
        self.data_workspace = self.filter_workspace = 0

    def _graph_need(self, *uses):
        """Bytes the training graph plans kept for `uses` need."""
        return max((self.training_graphs[use].workspace for use in uses
                    if self.training_graphs.get(use) is not None), default=0)

    @property
    def forward_need(self):
        """Bytes the chosen forward algorithms and graph plans need (recorded and eager)."""
        graph = self.eager_graph.workspace if self.eager_graph is not None else 0
        return max(self.forward_workspace, self.eager_workspace, graph,
                   self._graph_need("forward"))

    @property
    def workspace(self):
        """Bytes the chosen algorithms and plans need: the forward's and, once found, the
        backward's."""
        return max(self.forward_need, self.data_workspace, self.filter_workspace,
                   self._graph_need("data", "filter"))

    def find_backward(self, dnn):
        """The backward algorithms: Find's first of each, the others kept for next_backward."""
        self.data_candidates = dnn.find_candidates(
            "cudnnFindConvolutionBackwardDataAlgorithm", self.w_desc, self.y_desc, self.conv_desc,
            self.x_desc, filter_size=self.filter_size)
        self.filter_candidates = dnn.find_candidates(
            "cudnnFindConvolutionBackwardFilterAlgorithm", self.x_desc, self.y_desc,
            self.conv_desc, self.w_desc, filter_size=self.filter_size)
        self.data_algo, self.data_workspace = self.data_candidates[0]
        self.filter_algo, self.filter_workspace = self.filter_candidates[0]

    def next_backward(self, which):
        """Move `which` ('data' or 'filter') to its next candidate (Find lists some algorithms
        that then refuse to run: NHWC fp16 filter gradients of 3x3 convolutions on an H200);
        False when none is left."""
        candidates = getattr(self, which + "_candidates")
        index = candidates.index((getattr(self, which + "_algo"),
                                  getattr(self, which + "_workspace")))
        if index + 1 == len(candidates):
            return False
        algo, workspace = candidates[index + 1]
        setattr(self, which + "_algo", algo)
        setattr(self, which + "_workspace", workspace)
        return True


class _Kept(list):
    """The arrays a recording keeps alive (recording()); a list that can be referred to
    weakly, so that the backend sees when the last recording that holds its workspace is gone."""


def read_key(array):
    """The spare page-locked buffers a to_host_async of `array` can reuse: by shape and type."""
    return tuple(int(n) for n in array.shape), np.dtype(array.dtype)


class PendingRead(HostRead):
    """to_host_async's read: a copy into page-locked memory on the stream, and an event after
    it; the memory and the event go back to the backend's spares once the value is taken."""

    def __init__(self, backend, slot):
        self.backend, self.slot, self.values = backend, slot, None

    def ready(self):
        return self.values is not None or self.slot[1].query()

    def value(self):
        if self.values is None:
            buffer, event = self.slot
            event.synchronize()
            self.values = buffer.copy()
            self.backend._spare_reads.setdefault(read_key(buffer), []).append(self.slot)
            self.slot = None
        return self.values


class CudaBackend(Operations):
    name = "gpu"
    can_record = True  # CUDA graphs (graph.py; cuda-bindings is part of the [gpu] extra)

    def __init__(self, device=0, seed=0, allow_tf32=False, precision=None, channels_last=None,
                 fused=None):
        """precision (engine/precision.py): 'fp32' (the default, results match the CPU
        backend's), 'tf32' (TF32 tensor cores for convolutions, ~1e-3 relative error), 'fp16' or
        'bf16'; allow_tf32=True is the older spelling of 'tf32'. channels_last: whether
        convolutions store NHWC outputs (see the module's docstring); by default in fp16 and
        bf16, where it is faster. fused: whether inference convolutions on NHWC fp16/bf16 data
        run with their bias and activation as one cuDNN kernel (conv_bias_forward,
        cudnn_graph.py) where cuDNN can and it measured faster (True); "always": wherever
        cuDNN can (tests); False: never (an A/B); by default ENGINE_FUSED_CONVOLUTIONS's
        setting (1, 0 or always), else True."""
        self.precision = check_precision(precision or ("tf32" if allow_tf32 else "fp32"), "gpu")
        self.dtype = STORAGE_DTYPES[self.precision]  # of the activations operations make
        self.channels_last = (self.precision in ("fp16", "bf16") if channels_last is None
                              else bool(channels_last))
        fused = cudnn_graph.default_fused() if fused is None else fused
        self.fused = fused if fused == "always" else bool(fused)
        # eager convolutions may run graph plans (ConvPlan.eager_graph, .training_graphs)
        self.eager_graphs = cudnn_graph.default_eager_graphs()
        self.device, self.kernels, self.dnn, self.blas = _runtime(int(device),
                                                                  MATH_TYPES[self.precision])
        self._converted = {}  # id of a frozen float32 parameter -> (it, its copy in self.dtype)
        self._frozen = {}  # id of a frozen parameter -> it
        self._nhwc_filters = {}  # id of frozen convolution weights -> (them, their NHWC copy)
        self._constants = {}  # small host values used on the device (_constant)
        self._stage_buffers = self._stage_events = None  # pinned chunks for large host copies
        self._side_stream = None  # set_'s early copies
        # A recording's output copies run on a stream forked from the main one, so that the
        # copy of an output made early overlaps the later layers (output_reader); the fork
        # joins the main stream before the recording ends (_join_recorded_copies).
        self._copy_stream = None
        self._copies_forked = []  # the events this recording forked the copy stream at
        self._upload_stage = None  # set_'s (page-locked buffer, event after its last upload)
        self._spare_reads = {}  # (shape, dtype) -> [(page-locked buffer, event)] for to_host_async
        self.cuda = self.device.cuda
        self.stream = self.device.stream
        # One cuDNN workspace per backend, sized to the largest need of the algorithms chosen for
        # the plans it uses (_use_workspace, _fit_workspace); the recordings made while it was
        # this backend's keep it alive (recording()).
        self._workspace = None
        self._workspace_size = 0
        self._workspace_users = {}  # (id(plans dict), plan key) -> (plans dict, plan, need's name)
        self._workspace_holders = []  # weak references to the recordings that hold the workspace
        self._cost = self.device.empty((1,))
        self.seed(seed)
        # Recorded steps (recording, set_step; graph.py): while recording, the kernels read the
        # learning rate and dropout seed from _step_values on the device, so that each replay
        # can use new ones.
        self._recording = False
        # Eager inference convolutions run each plan's eager_algo (ConvPlan); off while a fused
        # plan is timed against the unfused path a recording would run (_fused_is_faster).
        self._eager_algorithms = True
        self._step_values = None  # device [learning rate (float32 bits), dropout seed]
        self._step_slots = None   # pinned host ring set_step copies from
        self._step_refreshes = 0

    def seed(self, seed):
        self._seed = int(seed) & 0xFFFFFFFF
        self._dropout_calls = itertools.count(1)

    def __repr__(self):
        return f"CudaBackend(GPU {self.device.index}: {self.device.name}, {self.precision})"

    @property
    def device_name(self):
        return f"GPU {self.device.index} ({self.device.name})"

    def available_memory(self):
        """Bytes this backend can still allocate: the GPU's free memory and what our pool holds
        for reuse, capped by ENGINE_MEMORY_LIMIT."""
        return memory.limited(self.device.memory_free())

    # ---- memory -------------------------------------------------------------------------------
    def _empty(self, shape, dtype=np.float32):
        return self.device.empty(shape, dtype)

    def _on_device(self, array):
        return array if hasattr(array, "gpudata") else self.asarray(array)

    def asarray(self, host):
        """A float32 device array of host's values (host data: images, parameters, truths)."""
        if hasattr(host, "gpudata"):
            return host
        host = np.ascontiguousarray(host, dtype=np.float32)
        array = self._empty(host.shape)
        if host.size:
            self.cuda.memcpy_htod_async(array.ptr, host, self.stream)
        return array

    def host_empty(self, shape):
        """Page-locked host memory: the copy engine reads it directly, asynchronously."""
        return self.cuda.pagelocked_empty(tuple(int(s) for s in shape), np.float32)

    def to_host(self, array):
        """numpy values of a device array: float32 for activations (fp16 or bf16 ones converted on
        the device), integers as they are."""
        if not hasattr(array, "gpudata"):
            return np.asarray(array, dtype=np.float32)
        if array.dtype in STORAGE_DTYPES.values():
            array = self._as_type(self._nchw(array), FLOAT32)
        host = np.empty(array.shape, dtype=array.dtype)
        if host.nbytes > STAGED_MIN:
            self._staged_download(array, host)
        elif host.size:
            self.cuda.memcpy_dtoh_async(host, array.ptr, self.stream)
        self.stream.synchronize()
        return host

    def _stages(self):
        if self._stage_buffers is None:
            self._stage_buffers = [self.cuda.pagelocked_empty(STAGE_CHUNK, np.uint8)
                                   for _ in range(2)]
            self._stage_events = [self.cuda.Event() for _ in range(2)]
        return self._stage_buffers, self._stage_events

    def _staged_download(self, array, host):
        """array's bytes into host through the pinned stages, pipelined."""
        buffers, events = self._stages()
        flat = host.reshape(-1).view(np.uint8)
        starts = range(0, host.nbytes, STAGE_CHUNK)

        def issue(k):
            start = starts[k]
            count = min(STAGE_CHUNK, host.nbytes - start)
            self.cuda.memcpy_dtoh_async(buffers[k % 2][:count], array.ptr + start, self.stream)
            events[k % 2].record(self.stream)
            return start, count

        pending = issue(0)
        for k in range(len(starts)):
            start, count = pending
            if k + 1 < len(starts):
                pending = issue(k + 1)
            events[k % 2].synchronize()
            flat[start:start + count] = buffers[k % 2][:count]

    def all_finite(self, array):
        """No NaN or infinity in a device array: one kernel, one int copied back."""
        if not hasattr(array, "gpudata"):
            return bool(np.isfinite(array).all())
        flag = self._empty((1,), np.int32)
        self.cuda.memset_d32_async(flag.ptr, 0, 1, self.stream)
        self.kernels.launch("nonfinite_kernel", array.size, array.ptr, flag.ptr, array.size,
                            dtype=array.dtype)
        found = np.empty(1, np.int32)
        self.cuda.memcpy_dtoh_async(found, flag.ptr, self.stream)
        self.stream.synchronize()
        return not found[0]

    def set_(self, dst, host, early=False):
        """Copy host data into an existing device array (a fixed buffer a graph reads); early:
        through a device buffer kept beside dst (_early_copy)."""
        integers = dst.dtype == np.int32  # an int_array (a plan): copied as is
        host = np.ascontiguousarray(host, dtype=np.int32 if integers else np.float32)
        if host.size != dst.size:
            raise BackendError(f"cannot copy {host.size} values into an array of {dst.size}")
        if host.size and integers:
            self.cuda.memcpy_htod_async(dst.ptr, host, self.stream)  # pageable: staged on return
        elif host.size and dst.dtype == FLOAT32 and early:
            self._early_copy(dst, host)
        elif host.nbytes > UPLOAD_STAGED_MIN and dst.dtype == FLOAT32 and not self._recording:
            self._staged_upload(dst, host)
        elif host.size and dst.dtype == FLOAT32:
            self.cuda.memcpy_htod_async(dst.ptr, host, self.stream)
        elif host.size:
            self._convert(self.asarray(host), dst)
        return dst

    def _staged_upload(self, dst, host):
        """host -> dst through a page-locked buffer that several threads fill (host_copies),
        once its previous upload has left it."""
        if self._upload_stage is None or self._upload_stage[0].nbytes < host.nbytes:
            if self._upload_stage is not None:
                self._upload_stage[1].synchronize()  # the smaller buffer's upload has left it
            self._upload_stage = (self.cuda.pagelocked_empty(host.nbytes, np.uint8),
                                  self.cuda.Event())
        buffer, sent = self._upload_stage
        sent.synchronize()
        staged = buffer[:host.nbytes].view(np.float32).reshape(host.shape)
        host_copies.copy(staged, host)
        self.cuda.memcpy_htod_async(dst.ptr, staged, self.stream)
        sent.record(self.stream)

    def _early_copy(self, dst, host):
        """host -> dst with the bus copy on a second stream, into a device buffer of dst's size
        (kept on dst), then a device copy into dst in this stream's order. A training batch
        (133 MB at batch 64 and 416x416) crosses the bus in about 2.5 ms on an H200: so it
        overlaps the previous iteration's backward instead of holding up the next forward."""
        if self._side_stream is None:
            self._side_stream = self.cuda.Stream()
        early = getattr(dst, "early_buffer", None)
        if early is None:  # (buffer, its copy is in, it is free again)
            early = dst.early_buffer = (self._empty(dst.shape), self.cuda.Event(),
                                        self.cuda.Event())
            early[2].record(self.stream)
        buffer, copied, free = early
        self._side_stream.wait_for_event(free)  # the last device copy has read it
        self.cuda.memcpy_htod_async(buffer.ptr, host, self._side_stream)
        copied.record(self._side_stream)
        self.stream.wait_for_event(copied)
        self.cuda.memcpy_dtod_async(dst.ptr, buffer.ptr, host.nbytes, self.stream)
        free.record(self.stream)

    def zeros(self, shape, like=None):
        """Zeros: float32, or of like's dtype (fp16 or bf16 activations)."""
        return self._zero_(self.empty(shape, like))

    def _zero_(self, array):
        if array.size and array.dtype.itemsize == 4:
            self.cuda.memset_d32_async(array.ptr, 0, array.size, self.stream)
        elif array.size:
            self.cuda.memset_d16_async(array.ptr, 0, array.size, self.stream)
        return array

    def empty(self, shape, like=None):
        """An uninitialised array (to be written whole before it is read): float32, or of
        like's dtype; stored channels last where like is and both are 4-D (a [route]'s or an
        [upsample]'s output made like its input)."""
        array = self._empty(shape, FLOAT32 if like is None else like.dtype)
        if len(shape) == 4 and _channels_last(like):
            array.channels_last = True
        return array

    def copy(self, array):
        result = self._empty(array.shape, array.dtype)
        if _channels_last(array):
            result.channels_last = True
        if array.size:
            self._copy_into(result, array)
        return result

    def reshape(self, array, shape):
        """NCHW values: an array stored channels last is copied into NCHW first (so writes
        into the result do not reach it; no layer writes through a reshape)."""
        return self.device.view(self._nchw(array), shape)

    def add_(self, dst, src):
        src = self._relayout(self._as_type(src, dst.dtype), _channels_last(dst))
        vec, width = self._packs(dst.size, dst, src)
        self.kernels.launch("add_kernel", dst.size // width, dst.ptr, src.ptr, dst.size, vec,
                            dtype=dst.dtype)
        return dst

    # ---- layout (channels last) ----------------------------------------------------------------
    def _relayout(self, array, channels_last):
        """`array` stored channels last (NHWC) or not (NCHW): itself, or a copy made so by
        cuDNN's transform."""
        if _channels_last(array) == bool(channels_last):
            return array
        result = self._empty(array.shape, array.dtype)
        if channels_last:
            result.channels_last = True
        if array.size:
            self.dnn.transform(array.shape, array.dtype, array.ptr, result.ptr, channels_last)
        return result

    def _nchw(self, array):
        return self._relayout(array, False)

    def _in_nchw(self, method, args, kwargs, writes):
        """method(*args, **kwargs) with NCHW copies of the arguments stored channels last (also
        inside list and tuple arguments), each copied once however often it appears; where the
        method `writes` its arguments, the copies' values are written back into them, and a
        copy it returns is replaced by its original."""
        copies = {}  # id of an original -> (original, its NCHW copy)

        def nchw(value):
            if _channels_last(value):
                if id(value) not in copies:
                    copies[id(value)] = (value, self._nchw(value))
                return copies[id(value)][1]
            if isinstance(value, (list, tuple)) and any(map(_channels_last, value)):
                return type(value)(nchw(v) for v in value)
            return value

        result = method(*map(nchw, args), **{k: nchw(v) for k, v in kwargs.items()})
        if writes:
            for original, copy in copies.values():
                self.dnn.transform(copy.shape, copy.dtype, copy.ptr, original.ptr, True)
                if result is copy:
                    result = original
        return result

    # ---- storage types (precision) -------------------------------------------------------------
    def _convert(self, src, dst, accumulate=False):
        """dst = src (or dst += src) between float32 and the other storage type, elementwise
        (dst is stored as src is)."""
        if _channels_last(src):
            dst.channels_last = True
        if src.dtype == FLOAT32:
            self.kernels.launch("from_float_kernel", src.size, src.ptr, dst.ptr, src.size,
                                dtype=dst.dtype)
        else:
            self.kernels.launch("to_float_kernel", src.size, src.ptr, dst.ptr, src.size,
                                int(accumulate), dtype=src.dtype)
        return dst

    def _as_type(self, array, dtype):
        """`array` stored as dtype: itself, the copy made when it was frozen, or a new
        conversion. Only float32 and this backend's storage type meet."""
        if array.dtype == dtype:
            return array
        cached = self._converted.get(id(array))
        if cached is not None and cached[0] is array and cached[1].dtype == dtype:
            return cached[1]
        return self._convert(array, self._empty(array.shape, dtype))

    def _activation(self, array):
        """An activation operand in this backend's storage type (the network's input, or a
        float32 parameter a layer uses as an activation, is converted)."""
        return self._as_type(array, self.dtype)

    def synchronize(self):
        self.stream.synchronize()

    def collectives(self, comm):
        """As NumpyBackend.collectives: GPU arrays are summed over the ranks by NCCL, on this
        backend's stream (ordered after the backward pass that filled them)."""
        from .nccl import NcclCommunicator

        return NcclCommunicator(comm, self)

    def freeze_(self, array):
        """Parameters become read-only for inference: in fp16 or bf16 their copy in that type is
        made once here (a convolution's weights are then not converted on every call)."""
        self._frozen[id(array)] = array
        if self.dtype != FLOAT32 and array.dtype == FLOAT32:
            self._converted[id(array)] = (array, self._convert(array, self._empty(array.shape,
                                                                                 self.dtype)))
        return array

    @contextlib.contextmanager
    def recording(self):
        """The state of this backend while a step is recorded (graph.py): the learning rate of
        sgd_update and the dropout seed are read from device memory that set_step refreshes
        before each replay, loss operations return 0.0 (last_cost reads a replay's), and every
        array allocated, and the cuDNN workspace, are kept alive with the recording:
        `with ops.recording() as kept:`."""
        if self._step_values is None:
            self._step_values = self._empty((2,), np.uint32)
            self._step_slots = self.cuda.pagelocked_empty((STEP_SLOTS, 2), np.uint32)
        kept = self.device.keep_alive = _Kept()
        if self._workspace is not None:
            # The recording's cuDNN calls keep the workspace's address: it must outlive every
            # recording that may be replayed, not just its time as this backend's workspace,
            # or the pool would hand it to another array that replays then overwrite. Kept in
            # the recording (rather than in a list on the backend) it goes back to the pool
            # with the last recording that holds it.
            kept.append(self._workspace)
            self._workspace_holders.append(weakref.ref(kept))
        self._recording = True
        try:
            yield kept
        finally:
            self._recording = False
            self.device.keep_alive = None

    def set_step(self, learning_rate, step):
        """The values the next replay of a recording reads: its learning rate, and its dropout
        seed, drawn from this backend's seed and `step` (the replay's number). Asynchronous, in
        stream order before the replay."""
        slot = self._step_refreshes % STEP_SLOTS
        if slot == 0 and self._step_refreshes:
            self.synchronize()  # every slot's copy has run before slots are reused
        self._step_refreshes += 1
        values = self._step_slots[slot]
        values[0] = np.float32(learning_rate).view(np.uint32)
        values[1] = (self._seed * 0x9E3779B1 + step) & 0xFFFFFFFF
        self.cuda.memcpy_htod_async(self._step_values.ptr, values, self.stream)

    def _step_value(self, index):
        """While recording, the device address of step value `index` (0: learning rate,
        1: dropout seed) that a kernel reads instead of its argument; otherwise 0 (none)."""
        return self._step_values.ptr + 4 * index if self._recording else 0

    def capture(self, step):
        """Record step() (issuing this backend's operations) into a CUDA graph; returns a
        CapturedStep whose replay(learning_rate) reruns it. Run step() once eagerly first, so
        every convolution plan and workspace exists before capture."""
        from .graph import CapturedStep

        return CapturedStep(self, step)

    # ---- activation and bias ------------------------------------------------------------------
    def activate_(self, x, activation, view=None):
        """x = act(x) in place, or only on the elements of a View (views.py)."""
        if activation == "linear":
            return x
        if view is None:
            vec, width = self._packs(x.size, x)
            self.kernels.launch("activate_kernel", x.size // width, x.ptr, x.size,
                                _activation_id(activation), vec, dtype=x.dtype)
            return x
        try:
            n, counts, walk = _walk(view, x)
        except ValueError:
            if not _channels_last(x):
                raise
            return self._in_nchw(self.activate_, (x, activation, view), {}, writes=True)
        self.kernels.launch("activate_strided_kernel", n, x.ptr, n, *counts, *walk,
                            _activation_id(activation), dtype=x.dtype)
        return x

    def activation_backward_(self, y, delta, activation):
        if activation != "linear":
            y = self._relayout(self._as_type(y, delta.dtype), _channels_last(delta))
            vec, width = self._packs(delta.size, delta, y)
            self.kernels.launch("gradient_kernel", delta.size // width, y.ptr, delta.ptr,
                                delta.size, _activation_id(activation), vec, dtype=delta.dtype)
        return delta

    def activation_input_backward_(self, x, delta, activation):
        x = self._relayout(self._as_type(x, delta.dtype), _channels_last(delta))
        vec, width = self._packs(delta.size, delta, x)
        self.kernels.launch("input_gradient_kernel", delta.size // width, x.ptr, delta.ptr,
                            delta.size, _activation_id(activation), vec, dtype=delta.dtype)
        return delta

    def _normalize_channels_launch(self, name, x, out, activation):
        spatial, channels = self._channel_layout(x.shape)
        positions = int(x.shape[0]) * spatial
        self.kernels.launch(name, positions, x.ptr, out.ptr, positions, channels, spatial,
                            activations.CHANNEL_NAMES.index(activation), dtype=out.dtype)

    def normalize_channels(self, x, activation):
        y = self._empty(x.shape, x.dtype)
        self._normalize_channels_launch("normalize_channels_kernel", x, y, activation)
        return y

    def normalize_channels_backward_(self, x, delta, activation):
        self._normalize_channels_launch("normalize_channels_backward_kernel",
                                        self._as_type(x, delta.dtype), delta, activation)
        return delta

    @staticmethod
    def _channel_layout(shape):
        """(spatial, channels) of an NCHW-like shape: element i has channel (i//spatial)%channels."""
        return _size(shape[2:]), int(shape[1]) if len(shape) > 1 else 1

    def _stored_channels(self, array):
        """(spatial, channels) as _channel_layout gives them for the array as it is stored:
        spatial 1 for NHWC (element i has channel i % channels)."""
        if _channels_last(array):
            return 1, int(array.shape[1])
        return self._channel_layout(array.shape)

    def add_bias_(self, y, biases, activation="linear"):
        """y = act(y + biases per channel), one pass."""
        spatial, channels = self._stored_channels(y)
        biases = self._as_type(biases, FLOAT32)
        if _channels_last(y):
            vec, width = self._packs(channels, y)
            self.kernels.launch("bias_activate_nhwc_kernel", y.size // width, y.ptr, biases.ptr,
                                y.size, channels, _activation_id(activation), vec,
                                dtype=y.dtype)
            return y
        if spatial >= PLANES_MIN:  # large maps: a block per piece of a channel plane
            self.kernels.launch_planes("bias_activate_planes_kernel", y.size // spatial, spatial,
                                       y.ptr, biases.ptr, spatial, channels,
                                       self.kernels.plane_chunks(spatial),
                                       _activation_id(activation), dtype=y.dtype)
            return y
        self.kernels.launch("bias_activate_kernel", y.size, y.ptr, biases.ptr, y.size,
                            spatial, channels, _activation_id(activation), dtype=y.dtype)
        return y

    def bias_backward(self, delta, bias_updates):
        spatial, channels = self._channel_layout(delta.shape)
        self.kernels.launch_blocks("bias_backward_kernel", channels, delta.ptr,
                                   bias_updates.ptr, int(delta.shape[0]), channels, spatial,
                                   dtype=delta.dtype)

    def scale_(self, x, factor):
        self.kernels.launch("scale_kernel", x.size, x.ptr, np.float32(factor), x.size,
                            dtype=x.dtype)
        return x

    # ---- convolution --------------------------------------------------------------------------
    def _plan(self, x_shape, w_shape, stride, padding, groups, dilation=1, channels_last=False,
              backward=False):
        """The ConvPlan of a shape (with its backward algorithms where `backward`);
        channels_last: its NHWC plan, or None where cuDNN has no algorithm for it."""
        stride = stride if isinstance(stride, int) else tuple(int(v) for v in stride)
        key = (tuple(x_shape), tuple(w_shape), stride, padding, groups, dilation, self.dtype,
               channels_last)
        # Plans live with the cuDNN handle, shared by every backend on this GPU: a shape's
        # algorithms are measured once per process, so runs with one seed compute alike.
        try:
            if key not in self.dnn.plans:
                plan = ConvPlan(self.dnn, x_shape, w_shape, stride, padding, groups, dilation,
                                self.dtype, channels_last)
                plan.key = key  # conv_backward drops a plan whose NHWC backward cuDNN refuses
                self.dnn.plans[key] = plan
            plan = self.dnn.plans[key]
            if backward and plan is not None and plan.data_algo is None:
                plan.find_backward(self.dnn)
        except BackendError:
            if not channels_last:
                raise
            plan = self.dnn.plans[key] = None  # this shape runs NCHW
        if plan is not None:
            self._use_workspace(self.dnn.plans, plan,
                                "workspace" if backward else "forward_need")
        return plan

    def _use_workspace(self, plans, plan, need):
        """Count plan's attribute `need` (its workspace bytes; a forward-only use of a ConvPlan:
        forward_need) among this backend's needs, and grow the workspace to it. `plans`
        holds plan under plan.key while it is in use (dnn.plans, a FusedConvolutions' plans):
        a plan dropped from it no longer counts. Plans are shared by every backend on a GPU,
        hence each backend's own record of what it uses."""
        entry = (id(plans), plan.key)
        known = self._workspace_users.get(entry)
        if known is not None and known[1] is plan and known[2] == "workspace":
            need = "workspace"  # it ran backward here before: its backward need still counts
        self._workspace_users[entry] = (plans, plan, need)
        self._reserve_workspace(getattr(plan, need))

    def _workspace_need(self):
        """The most workspace any plan this backend uses needs."""
        return max((getattr(plan, need) for plans, plan, need in self._workspace_users.values()
                    if plans.get(plan.key) is plan), default=0)

    def _reserve_workspace(self, size):
        """Make the workspace at least `size` bytes. The one it replaces goes back to the pool
        unless a recording holds it (recording())."""
        if size > self._workspace_size:
            self._replace_workspace(size)

    def _replace_workspace(self, size):
        self._workspace = self._empty((size,), np.uint8) if size else None
        self._workspace_size = size
        # made while recording: that recording holds it (device.keep_alive, via _empty)
        self._workspace_holders = ([weakref.ref(self.device.keep_alive)] if self._recording
                                   else [])

    def _fit_workspace(self, release=False):
        """After an eager first run that chose algorithms (a shape's timing, a fused plan's
        verdict): shrink the workspace to the largest need of the plans this backend uses,
        unless a live recording holds the current one (replacing it would add a block, not
        free one), then give the pool's held blocks (the larger workspace, and any smaller ones
        it had replaced) back to the driver; `release`: give them back even where nothing
        shrank (the arrays a fused plan's check made)."""
        if self._recording:
            return
        need = self._workspace_need()
        if need < self._workspace_size and not any(
                holder() is not None for holder in self._workspace_holders):
            self._replace_workspace(need)
            release = True
        if release:
            # Safe here: this is eager work, never inside a capture (whose graph could still
            # use a block freed then); a held block belongs to no live array or live
            # recording, and cuMemFree waits for the device's work on it to finish.
            self.device.pool.free_held()

    def _workspace_pointer(self):
        return self._workspace.ptr if self._workspace is not None else None

    def conv_forward(self, x, weights, stride, padding, groups, train=False, dilation=1):
        """In this backend's storage type: x and the weights are converted when they are not.
        With channels_last, y is stored NHWC (x and the weights rewritten so)."""
        typed = self._activation(weights)
        plan = None
        if self.channels_last and len(x.shape) == 4:
            plan = self._plan(x.shape, weights.shape, stride, padding, groups, dilation, True)
        if plan is None:
            x, weights = self._activation(self._nchw(x)), typed
            plan = self._plan(x.shape, weights.shape, stride, padding, groups, dilation)
            y = self._empty(plan.y_shape, self.dtype)
        else:
            x, weights = self._relayout(self._activation(x), True), self._nhwc_weights(weights,
                                                                                      typed)
            y = self._empty(plan.y_shape, self.dtype)
            y.channels_last = True
        if not plan.forward_timed and not self._recording:
            self._time_forward_candidates(plan, x, weights, y)
            self._fit_workspace()  # to the chosen algorithm's need (the timing held the most)
        eager = not train and not self._recording and self._eager_algorithms
        if eager and self.eager_graphs:
            if not plan.graph_timed:
                self._time_eager_graphs(plan, x, weights, y)
            if plan.eager_graph is not None and cudnn_graph.aligned(x.ptr, weights.ptr, y.ptr):
                cudnn_graph.convolution_graphs(self.dnn).execute(
                    plan.eager_graph, x.ptr, weights.ptr, y.ptr, self._workspace_pointer())
                return y

        def legacy(out):
            self.dnn.conv_forward(plan, x.ptr, weights.ptr, out.ptr, self._workspace_pointer(),
                                  eager=eager)

        if not (train and self._training_graph(plan, "forward", legacy,
                                                (x.ptr, weights.ptr, y.ptr), y)):
            legacy(y)
        return y

    def conv_bias_forward(self, x, weights, biases, activation, stride, padding, groups,
                          dilation=1):
        """Operations.conv_bias_forward. With channels last in fp16 or bf16 (and `fused`), one
        cuDNN runtime-fusion kernel computes act(conv + bias) into an NHWC y for the activations
        of cudnn_graph.ACTIVATION_STEPS, where cuDNN takes the shape's graph (a refusal is
        remembered per shape) and where, on its first run, it agreed with the unfused path and
        measured faster; otherwise conv_forward, then add_bias_. A shape's plan is made and
        first run on an eager call, never while recording (such a call runs unfused), so that a
        recording only issues kernels."""
        def unfused():
            y = self.conv_forward(x, weights, stride, padding, groups, train=False,
                                  dilation=dilation)
            return self.add_bias_(y, biases, activation)

        if (self.fused and self.channels_last and self.dtype != FLOAT32 and len(x.shape) == 4
                and activation in cudnn_graph.FUSED_ACTIVATIONS):
            fusions = cudnn_graph.fusions(self.dnn, self.device)  # plans kept on disk
            plan = fusions.plan(x.shape, weights.shape, stride, padding, groups, dilation,
                                self.dtype, activation, build=not self._recording)
            if plan is not None and (plan.ran or not self._recording):
                x_nhwc = self._relayout(self._activation(x), True)
                w_nhwc = self._nhwc_weights(weights, self._activation(weights))
                bias = self._as_type(biases, plan.bias_dtype)
                self._use_workspace(fusions.plans, plan, "workspace")
                y = self._empty(plan.y_shape, self.dtype)
                y.channels_last = True
                pointers = (x_nhwc.ptr, w_nhwc.ptr, bias.ptr, y.ptr)
                if cudnn_graph.aligned(*pointers):
                    first = not plan.ran
                    try:
                        fusions.execute(plan, *pointers, self._workspace_pointer())
                    except BackendError as error:
                        if not first and not self._recording:  # it ran before: a real failure
                            raise
                        # its first run, or its first recording: unfused from now on
                        fusions.refuse(plan, str(error) + (" (while recording)"
                                                           if self._recording else ""))
                    else:
                        if not first or self.fused == "always":
                            return y
                        kept = self._fused_is_faster(fusions, plan, pointers, y, unfused)
                        # The unfused outputs its check compared and timed, back to the driver
                        # (the pool would keep them: output-sized, rarely asked for again);
                        # a plan refused no longer counts among the workspace's needs.
                        self._fit_workspace(release=True)
                        if kept:
                            return y
                    if first and not self._recording:
                        self._fit_workspace()  # refused: its need no longer counts
        return unfused()

    def _fused_is_faster(self, fusions, plan, pointers, y, unfused):
        """On a fused plan's first (eager) run, into y: compare it with the unfused path
        (`unfused()`), then time both as _time_forward_candidates times convolution algorithms,
        and keep the fused plan where it agrees (cudnn_graph.AGREEMENT) and is not slower
        (cuDNN's heuristics rank the fused engines without measuring them). False where the
        unfused path is kept: the plan is dropped (fusions.timings keeps both times)."""
        reference = unfused()  # its first call also chooses the convolution's algorithm
        scale = self.sum_of_squares(reference)
        self.scale_(reference, -1.0)  # the difference in place: no second output-sized array
        self.add_(reference, y)
        difference = self._disagreement(reference, scale)
        if difference is not None:
            fusions.refuse(plan, f"differs from the unfused path: {difference}")
            return False
        start, end = self.cuda.Event(), self.cuda.Event()
        times = []
        self._eager_algorithms = False  # unfused as a recording would run it
        try:
            for run in (lambda: fusions.execute(plan, *pointers, self._workspace_pointer()),
                        unfused):
                self.kernels.launch("hold_kernel", 1, np.int32(HOLD_US))
                start.record(self.stream)
                for _ in range(FORWARD_REPEATS):
                    run()
                end.record(self.stream)
                end.synchronize()
                times.append(end.time_since(start) / FORWARD_REPEATS)
        finally:
            self._eager_algorithms = True
        fusions.timings[plan.key] = tuple(times)
        if times[0] <= times[1]:
            return True
        fusions.refuse(plan, f"slower than unfused ({times[0]:.4f} against {times[1]:.4f} ms)")
        return False

    def _nhwc_weights(self, weights, typed):
        """A convolution's weights (typed: in this backend's storage type) stored NHWC, as
        (F, k, k, C/groups); made once for frozen weights."""
        cached = self._nhwc_filters.get(id(weights))
        if cached is not None and cached[0] is weights:
            return cached[1]
        nhwc = self._relayout(typed, True)
        if self._frozen.get(id(weights)) is weights:
            self._nhwc_filters[id(weights)] = (weights, nhwc)
        return nhwc

    @staticmethod
    def _host_clock():
        return time.perf_counter()

    def _disagreement(self, difference, scale, relative=cudnn_graph.AGREEMENT,
                      floor=cudnn_graph.ABSOLUTE_FLOOR):
        """None where `difference` (an array: a reference minus another path's output) is
        within cudnn_graph.agrees(relative, floor) of the reference's sum of squares `scale`;
        else it in words (NaN disagrees)."""
        error = self.sum_of_squares(difference)
        if cudnn_graph.agrees(error, scale, int(difference.size), relative, floor):
            return None
        return f"relative RMS difference {np.sqrt(error / scale) if scale > 0 else np.inf:.3g}"

    def _eager_seconds(self, call):
        """Seconds by the host's clock for EAGER_REPEATS calls of call() issued back to back,
        as eager calls run, until the GPU has run them."""
        begin = self._host_clock()
        for _ in range(EAGER_REPEATS):
            call()
        self.synchronize()
        return self._host_clock() - begin

    def _time_eager_graphs(self, plan, x, weights, y):
        """On plan's first eager inference call with aligned pointers (where cuDNN 9's backend
        API loads): keep as plan.eager_graph the fastest graph plan of its shape
        (cudnn_graph.ConvolutionGraphs) where it agreed with the eager algorithm and timed
        faster (_choose_graph)."""
        graphs = cudnn_graph.convolution_graphs(self.dnn)
        if graphs is None:
            plan.graph_timed = True
            return
        if not cudnn_graph.aligned(x.ptr, weights.ptr, y.ptr):
            return  # the plans declare 16-byte alignment: timed at an aligned call
        chosen = self._choose_graph(graphs, plan, lambda out: self.dnn.conv_forward(
            plan, x.ptr, weights.ptr, out.ptr, self._workspace_pointer(), eager=True),
            (x.ptr, weights.ptr, y.ptr), y)
        if chosen is not DEFERRED:
            plan.graph_timed = True
            plan.eager_graph = chosen
        self._fit_workspace(release=True)  # to the chosen plan's need (the timing held most)

    def _training_graph(self, plan, use, legacy, pointers, output):
        """Whether an eager training call of `use` (cudnn_graph.GRAPH_USES: "forward",
        "data", "filter") ran through a graph plan into `output`, on `pointers` (x, w, y's
        roles: cudnn_graph.WRITTEN[use] is output's). Never while recording, nor where the
        plans are off, cuDNN 9's backend API does not load or the pointers are not aligned
        (False: the caller runs legacy(output), the legacy call). The shape's first such call
        chooses its plan against legacy (_choose_graph) and keeps it in plan.training_graphs;
        then it runs the chosen one (or returns False where none was kept)."""
        if self._recording or not self.eager_graphs or not cudnn_graph.aligned(*pointers):
            return False
        graphs = cudnn_graph.convolution_graphs(self.dnn, use)
        if graphs is None:
            return False
        if use not in plan.training_graphs:
            chosen = self._choose_graph(graphs, plan, legacy, pointers, output)
            if chosen is not DEFERRED:
                plan.training_graphs[use] = chosen
            self._fit_workspace(release=True)  # to the chosen plans' need
            if chosen is DEFERRED:
                return False
        chosen = plan.training_graphs[use]
        if chosen is None:
            return False
        graphs.execute(chosen, *pointers, self._workspace_pointer())
        return True

    def _copy_into(self, dst, src):
        """dst = src, arrays of one size, type and layout, in stream order."""
        self.cuda.memcpy_dtod_async(dst.ptr, src.ptr, src.nbytes, self.stream)

    def _choose_graph(self, graphs, plan, legacy, pointers, output):
        """Time each graph plan of plan's shape (`graphs`: a ConvolutionGraphs) and the legacy
        call (legacy(out): the legacy call's output into `out`, an array like `output`) as
        _time_forward_candidates times eager algorithms, every output into scratch arrays (the
        real output, and the weight updates a backward filter accumulates into, untouched: a
        plan's pointers are `pointers` with its output's replaced; in training, none where the
        legacy call takes longer than TRAINING_GRAPH_LONGEST_US). Returns the fastest plan
        whose output agreed with the legacy call's (EAGER_AGREEMENT for this precision) and
        that was faster, or None; the others are destroyed. The caller keeps it and then fits
        the workspace. DEFERRED (nothing destroyed or kept) where the legacy output was not
        finite or all zeros, up to GRAPH_DEFERRALS calls. A backward filter accumulates (beta
        1): the legacy gradient G is made into zeros, and each plan runs onto a copy of G,
        which must become 2G (its own G' added: 2G - (G + G') = G - G' is compared), so that a
        plan that overwrote is refused."""
        candidates = [candidate for candidate in graphs.candidates(plan.key)
                      if tuple(candidate.y_shape) == tuple(plan.y_shape)]
        if not candidates:
            return None
        accumulates = cudnn_graph.CONVOLUTION_OPERATIONS[graphs.direction][1] != 0.0
        written = cudnn_graph.WRITTEN[graphs.direction]
        reference = self.empty(output.shape, output)
        if accumulates:
            self._zero_(reference)
        try:  # first: a legacy backward call settles its algorithm (_backward_call)
            legacy(reference)
        except BackendError:  # the caller's legacy call would fail alike: no plan either
            graphs.keep(plan.key, None)
            raise
        scale = self.sum_of_squares(reference)  # (synchronises: nothing queued before a timing)
        times, verdicts = {}, []
        if not (np.isfinite(scale) and scale > 0):  # nothing to compare with (GRAPH_DEFERRALS)
            deferrals = plan.graph_deferrals.get(graphs.use, 0) + 1
            plan.graph_deferrals[graphs.use] = deferrals
            if deferrals < GRAPH_DEFERRALS:
                reference = None
                return DEFERRED
            verdicts.append(f"not compared: the legacy output was not finite or all zeros "
                            f"in {deferrals} calls")
            candidates = []
        self._reserve_workspace(max((candidate.workspace for candidate in candidates),
                                    default=0))
        workspace = self._workspace_pointer()
        trial = self.empty(output.shape, output)
        legacy_seconds = self._eager_seconds(lambda: legacy(trial))
        relative, floor = cudnn_graph.EAGER_AGREEMENT[self.precision]
        if graphs.training and legacy_seconds * 1e6 > TRAINING_GRAPH_LONGEST_US * EAGER_REPEATS:
            verdicts.append(f"not timed: the legacy call takes over "
                            f"{TRAINING_GRAPH_LONGEST_US} us")
            candidates = []
        for candidate in candidates:
            def run(candidate=candidate):
                graphs.execute(candidate, *(trial.ptr if k == written else pointer
                                            for k, pointer in enumerate(pointers)), workspace)

            if accumulates:
                self._copy_into(trial, reference)
            try:
                run()  # its first run: also its warm-up
            except BackendError as error:
                verdicts.append(str(error))
                continue
            self.scale_(trial, -1.0)
            self.add_(trial, reference)  # reference - trial
            if accumulates:
                self.add_(trial, reference)  # 2 reference - (reference + the plan's)
            difference = self._disagreement(trial, scale, relative, floor)
            if difference is not None:
                verdicts.append(f"differs: {difference}")
                continue
            times[candidate] = self._eager_seconds(run)
            verdicts.append(times[candidate])
        graphs.timings[plan.key] = (legacy_seconds / EAGER_REPEATS,  # per call
                                    [v / EAGER_REPEATS if isinstance(v, float) else v
                                     for v in verdicts])
        fastest = min(times, key=times.get, default=None)
        chosen = fastest if fastest is not None and times[fastest] < legacy_seconds else None
        graphs.keep(plan.key, chosen)
        # the scratch arrays back to the pool before the caller gives its held blocks to the
        # driver (the closures that timed them hold them: rebound, not deleted)
        reference = trial = None
        return chosen

    def _time_forward_candidates(self, plan, x, weights, y):
        """Keep the fastest of plan's forward algorithms (see FORWARD_CANDIDATES; of those
        within NEAR_TIME of it, the one needing the least workspace), timed on
        these arrays (in a workspace that holds any of them: _fit_workspace then shrinks it):
        by their kernels' time for recordings (forward_algo), by the host's clock over calls
        issued back to back for eager inference (eager_algo, see EAGER_MARGIN)."""
        self._reserve_workspace(plan.timing_workspace)
        start, end = self.cuda.Event(), self.cuda.Event()
        kernels = {}  # (algo, workspace) -> ms for FORWARD_REPEATS runs of its kernels
        eager = {}  # (algo, workspace) -> seconds for EAGER_REPEATS calls as eager ones run
        for algo, workspace in plan.forward_candidates:
            plan.forward_algo, plan.forward_workspace = algo, workspace
            try:  # Find lists some algorithms (in fp16, for some shapes) that then refuse to run
                self.dnn.conv_forward(plan, x.ptr, weights.ptr, y.ptr, self._workspace_pointer())
            except BackendError:
                continue
            self.kernels.launch("hold_kernel", 1, np.int32(HOLD_US))
            start.record(self.stream)
            for _ in range(FORWARD_REPEATS):
                self.dnn.conv_forward(plan, x.ptr, weights.ptr, y.ptr, self._workspace_pointer())
            end.record(self.stream)
            end.synchronize()
            kernels[(algo, workspace)] = end.time_since(start)
            eager[(algo, workspace)] = self._eager_seconds(lambda: self.dnn.conv_forward(
                plan, x.ptr, weights.ptr, y.ptr, self._workspace_pointer()))
        # none ran: keep Find's first, whose call reports the error
        plan.forward_algo, plan.forward_workspace = lightest_near_fastest(kernels) or \
            plan.forward_candidates[0]
        recorded = (plan.forward_algo, plan.forward_workspace)
        fastest = min(eager, key=eager.get, default=recorded)
        if recorded in eager and eager[recorded] <= EAGER_MARGIN * eager[fastest]:
            fastest = recorded
        plan.eager_algo, plan.eager_workspace = fastest
        plan.forward_timed = True

    def conv_backward(self, x, weights, delta, stride, padding, groups, weight_updates, need_dx,
                      dilation=1):
        """NHWC where x or delta is stored so (the forward's layout; the first layer's x, an
        image, is rewritten NHWC rather than its delta NCHW), giving an NHWC dx; the filters'
        gradient is then made NHWC by cuDNN and rewritten NCHW for the updates. A shape whose
        NHWC backward cuDNN refuses runs NCHW from then on."""
        if self.channels_last and (_channels_last(x) or _channels_last(delta)):
            plan = self._plan(x.shape, weights.shape, stride, padding, groups, dilation, True,
                              backward=True)
            if plan is not None:
                try:
                    return self._conv_backward(plan, True, x, weights, delta, weight_updates,
                                               need_dx)
                except BackendError:
                    self.dnn.plans[plan.key] = None
        plan = self._plan(x.shape, weights.shape, stride, padding, groups, dilation,
                          backward=True)
        return self._conv_backward(plan, False, x, weights, delta, weight_updates, need_dx)

    def _backward_call(self, plan, which, call):
        """call(workspace pointer) with plan's algorithm of `which` ('data' or 'filter'), or,
        where cuDNN refuses it when it runs (its checks come before any kernel: nothing is
        written), with the next candidate, kept from then on."""
        while True:
            try:
                return call(self._workspace_pointer())
            except BackendError:
                if not plan.next_backward(which):
                    raise
                self._reserve_workspace(plan.workspace)

    def _backward_pass(self, plan, which, call, pointers, output):
        """The backward `which` ('data' or 'filter') into `output`: through its graph plan on
        `pointers` (x, w, y's roles) where an eager call has one (_training_graph), else the
        legacy call(output pointer, workspace pointer) with _backward_call's fallback."""
        def legacy(out):
            self._backward_call(plan, which, lambda workspace: call(out.ptr, workspace))

        if not self._training_graph(plan, which, legacy, pointers, output):
            legacy(output)

    def _conv_backward(self, plan, channels_last, x, weights, delta, weight_updates, need_dx):
        typed = self._activation(weights)
        filters = self._nhwc_weights(weights, typed) if channels_last else typed
        x, delta = (self._relayout(self._activation(a), channels_last) for a in (x, delta))
        if weight_updates.dtype == self.dtype and not channels_last:
            gradient, into = None, weight_updates
        else:  # cuDNN's gradient in the storage type and x's layout, added to the updates last
            gradient = into = self._zero_(self._empty(weight_updates.shape, self.dtype))
            gradient.channels_last = channels_last
        # the filters' gradient added to `into` (beta 1)
        self._backward_pass(plan, "filter", lambda out, workspace: self.dnn.conv_backward_filter(
            plan, x.ptr, delta.ptr, out, workspace), (x.ptr, into.ptr, delta.ptr), into)
        dx = None
        if need_dx:
            dx = self._empty(x.shape, self.dtype)
            dx.channels_last = channels_last
            self._backward_pass(plan, "data", lambda out, workspace: self.dnn.conv_backward_data(
                plan, filters.ptr, delta.ptr, out, workspace), (dx.ptr, filters.ptr, delta.ptr),
                dx)
        if gradient is not None:
            gradient = self._nchw(gradient)
            if weight_updates.dtype == self.dtype:
                self.add_(weight_updates, gradient)
            else:
                self._convert(gradient, weight_updates, accumulate=True)
        return dx

    # ---- fully connected ----------------------------------------------------------------------
    def connected_forward(self, x, weights):
        """A float32 product in every precision (connected layers are small); its result is
        stored in x's type."""
        batch = int(x.shape[0])
        outputs, inputs = (int(s) for s in weights.shape)
        y = self._empty((batch, outputs, 1, 1))
        self.blas.gemm(False, True, batch, outputs, inputs, self._as_type(x, FLOAT32).ptr,
                       weights.ptr, y.ptr)
        return self._as_type(y, x.dtype)

    def connected_backward(self, x, weights, delta, weight_updates, need_dx):
        batch = int(x.shape[0])
        outputs, inputs = (int(s) for s in weights.shape)
        stored_as = delta.dtype
        x, delta = self._as_type(x, FLOAT32), self._as_type(delta, FLOAT32)
        # weight_updates (outputs x inputs) += delta^T @ x
        self.blas.gemm(True, False, outputs, inputs, batch, delta.ptr, x.ptr, weight_updates.ptr,
                       beta=1.0)
        if not need_dx:
            return None
        dx = self._empty(x.shape)
        self.blas.gemm(False, False, batch, inputs, outputs, delta.ptr, weights.ptr, dx.ptr)
        return self._as_type(dx, stored_as)

    # ---- batch normalisation ------------------------------------------------------------------
    @staticmethod
    def _bn_shapes(shape, per_activation):
        shape = tuple(int(s) for s in shape) + (1,) * (4 - len(shape))
        params = (1,) + shape[1:] if per_activation else (1, shape[1], 1, 1)
        mode = CUDNN_BATCHNORM_PER_ACTIVATION if per_activation else CUDNN_BATCHNORM_SPATIAL
        return shape, params, mode

    def batchnorm_forward_train(self, x, scales, biases, rolling_mean, rolling_variance,
                                per_activation=False, activation="linear"):
        """SPATIAL statistics in kernels/batchnorm.cu (cuDNN's NCHW kernels parallelise over
        channels: slow for few channels of large maps), the activation fused, mish and the other
        activations.INPUT_GRADIENT included (their backward recomputes z = scale * x_norm + bias
        from the cache's x, statistics, scales and biases); PER_ACTIVATION ones (dense layers)
        in cuDNN, then the activation (keeping a copy of z where its gradient needs it)."""
        save_mean = self._empty(scales.shape)
        save_inv_std = self._empty(scales.shape)
        if per_activation or not self._nhwc_batchnorm(x):
            x = self._nchw(x)
        y = self.empty(x.shape, like=x)
        if _channels_last(x):
            count, channels = x.size // int(x.shape[1]), int(x.shape[1])
            rows = max(1, BN_NHWC_CHUNK // channels)
            sums = self._channel_sums(channels)
            self.kernels.launch_blocks("bn_sums_nhwc_kernel", -(-count // rows), x.ptr, sums.ptr,
                                       count, channels, rows, dtype=x.dtype)
            self.kernels.launch("bn_statistics_kernel", channels, sums.ptr, save_mean.ptr,
                                save_inv_std.ptr, rolling_mean.ptr, rolling_variance.ptr,
                                channels, count)
            packs, groups = self._nhwc_row_groups(x)
            self.kernels.launch("bn_normalize_nhwc_kernel", packs * groups, x.ptr, y.ptr,
                                save_mean.ptr, save_inv_std.ptr, scales.ptr, biases.ptr, count,
                                channels, groups, _activation_id(activation), dtype=x.dtype)
            return y, (x, save_mean, save_inv_std, per_activation, y, activation, biases)
        if per_activation:
            shape, params, mode = self._bn_shapes(x.shape, per_activation)
            x_desc = self.dnn.tensor(shape, x.dtype)
            self.dnn.batchnorm_forward_train(mode, x_desc, x.ptr, y.ptr,
                                             self.dnn.tensor(params), scales.ptr, biases.ptr,
                                             rolling_mean.ptr, rolling_variance.ptr,
                                             save_mean.ptr, save_inv_std.ptr)
            kept = self.copy(y) if activation in activations.INPUT_GRADIENT else None
            y = self.activate_(y, activation)
            return y, (x, save_mean, save_inv_std, per_activation, y if kept is None else kept,
                       activation, biases)
        spatial, channels = self._channel_layout(x.shape)
        planes, chunks = x.size // spatial, -(-spatial // BN_CHUNK)
        vec, width = self._packs(spatial, x, y)
        sums = self._channel_sums(channels)
        self.kernels.launch_blocks("bn_sums_kernel", planes * chunks, x.ptr, sums.ptr, spatial,
                                   channels, BN_CHUNK, chunks, vec, dtype=x.dtype)
        self.kernels.launch("bn_statistics_kernel", channels, sums.ptr, save_mean.ptr,
                            save_inv_std.ptr, rolling_mean.ptr, rolling_variance.ptr, channels,
                            x.size // channels)
        self.kernels.launch("bn_normalize_kernel", x.size // width, x.ptr, y.ptr,
                            save_mean.ptr, save_inv_std.ptr, scales.ptr, biases.ptr, spatial,
                            channels, x.size, _activation_id(activation), vec, dtype=x.dtype)
        return y, (x, save_mean, save_inv_std, per_activation, y, activation, biases)

    @staticmethod
    def _nhwc_batchnorm(x):
        """Whether training batch norm takes x as it is stored, channels last: the NHWC kernels
        (kernels/batchnorm.cu) need whole 16-byte packs of channels, at most BN_REDUCE_THREADS
        packs, and x on 16 bytes (the arrays they make are)."""
        if not _channels_last(x):
            return False
        channels, width = int(x.shape[1]), 16 // x.dtype.itemsize
        return (channels % width == 0 and channels // width <= BN_REDUCE_THREADS
                and int(x.ptr) % 16 == 0)

    @staticmethod
    def _nhwc_row_groups(x):
        """(packs a row, row groups) of the NHWC elementwise batch-norm passes: a thread per
        pack column and group of BN_NHWC_ROWS rows (kernels/batchnorm.cu's FOR_NHWC_ROWS)."""
        channels = int(x.shape[1])
        count = x.size // channels
        return channels // (16 // x.dtype.itemsize), -(-count // BN_NHWC_ROWS)

    @staticmethod
    def _packs(length, *arrays):
        """(vec, values per thread) of the kernels that take 16-byte packs (kernels/packs.cuh):
        packs where `length` (a plane's values in batch norm, else the array's) is whole packs
        and every array starts on 16 bytes."""
        width = 16 // arrays[0].dtype.itemsize
        if length % width == 0 and all(int(a.ptr) % 16 == 0 for a in arrays):
            return 1, width
        return 0, 1

    def _channel_sums(self, channels):
        """Two zeroed float64 accumulators per channel (kernels/batchnorm.cu adds into them)."""
        sums = self._empty((channels, 2), np.float64)
        self.cuda.memset_d32_async(sums.ptr, 0, 4 * channels, self.stream)
        return sums

    def batchnorm_forward_inference(self, x, scales, biases, rolling_mean, rolling_variance,
                                    per_activation=False, activation="linear",
                                    epsilons=PJREDDIE_BN_EPSILONS):
        """Darknet's rule (engine/batchnorm_rule.py), optionally fused with the activation that
        follows: bn_inference_activate_kernel."""
        y = self._empty(x.shape, x.dtype)
        scales, biases, rolling_mean, rolling_variance = (
            self._as_type(a, FLOAT32) for a in (scales, biases, rolling_mean, rolling_variance))
        if per_activation:
            x = self._nchw(x)
            spatial, channels = 1, _size(x.shape[1:])
        else:
            spatial, channels = self._stored_channels(x)
            if _channels_last(x):
                y.channels_last = True
        if spatial >= PLANES_MIN:
            self.kernels.launch_planes(
                "bn_inference_activate_planes_kernel", x.size // spatial, spatial, x.ptr, y.ptr,
                rolling_mean.ptr, rolling_variance.ptr, scales.ptr, biases.ptr, spatial,
                channels, self.kernels.plane_chunks(spatial), _activation_id(activation),
                np.float32(epsilons[0]), np.float32(epsilons[1]), dtype=x.dtype)
            return y
        self.kernels.launch("bn_inference_activate_kernel", x.size, x.ptr, y.ptr,
                            rolling_mean.ptr, rolling_variance.ptr, scales.ptr,
                            biases.ptr, x.size, spatial, channels, _activation_id(activation),
                            np.float32(epsilons[0]), np.float32(epsilons[1]), dtype=x.dtype)
        return y

    def batchnorm_backward(self, delta, cache, scales, scale_updates, bias_updates):
        x, save_mean, save_inv_std, per_activation, kept, activation, biases = cache
        delta = self._relayout(self._as_type(delta, x.dtype), _channels_last(x))
        dx = self.empty(x.shape, like=x)
        if _channels_last(x):  # the forward took the NHWC kernels
            count, channels = x.size // int(x.shape[1]), int(x.shape[1])
            if int(delta.ptr) % 16:
                delta = self.copy(delta)
            rows = max(1, BN_NHWC_CHUNK // channels)
            act = _activation_id(activation)
            sums = self._channel_sums(channels)
            self.kernels.launch_blocks("bn_backward_sums_nhwc_kernel", -(-count // rows), x.ptr,
                                       kept.ptr, delta.ptr, save_mean.ptr, save_inv_std.ptr,
                                       scales.ptr, biases.ptr, sums.ptr, count, channels, rows,
                                       act, dtype=x.dtype)
            self.kernels.launch("bn_updates_kernel", channels, sums.ptr, scale_updates.ptr,
                                bias_updates.ptr, channels)
            packs, groups = self._nhwc_row_groups(x)
            self.kernels.launch("bn_backward_nhwc_kernel", packs * groups, x.ptr, kept.ptr,
                                delta.ptr, dx.ptr, save_mean.ptr, save_inv_std.ptr, scales.ptr,
                                biases.ptr, sums.ptr, count, channels, groups, act,
                                dtype=x.dtype)
            return dx
        if per_activation:  # kept: the activation's input where its gradient needs it, else y
            if activation in activations.INPUT_GRADIENT:
                delta = self.activation_input_backward_(kept, delta, activation)
            else:
                delta = self.activation_backward_(kept, delta, activation)
            shape, params, mode = self._bn_shapes(x.shape, per_activation)
            self.dnn.batchnorm_backward(mode, self.dnn.tensor(shape, x.dtype), x.ptr, delta.ptr,
                                        dx.ptr, self.dnn.tensor(params), scales.ptr,
                                        scale_updates.ptr, bias_updates.ptr,
                                        save_mean.ptr, save_inv_std.ptr)
            return dx
        spatial, channels = self._channel_layout(x.shape)
        planes, chunks = x.size // spatial, -(-spatial // BN_CHUNK)
        y = kept  # the output; its act' comes from it, or from z recomputed from x (the kernels)
        vec, width = self._packs(spatial, x, y, delta, dx)
        act = _activation_id(activation)
        sums = self._channel_sums(channels)
        self.kernels.launch_blocks("bn_backward_sums_kernel", planes * chunks, x.ptr, y.ptr,
                                   delta.ptr, save_mean.ptr, save_inv_std.ptr, scales.ptr,
                                   biases.ptr, sums.ptr, spatial, channels, BN_CHUNK, chunks, act,
                                   vec, dtype=x.dtype)
        self.kernels.launch("bn_updates_kernel", channels, sums.ptr, scale_updates.ptr,
                            bias_updates.ptr, channels)
        self.kernels.launch("bn_backward_kernel", x.size // width, x.ptr, y.ptr, delta.ptr,
                            dx.ptr, save_mean.ptr, save_inv_std.ptr, scales.ptr, biases.ptr,
                            sums.ptr, spatial, channels, x.size, x.size // channels, act, vec,
                            dtype=x.dtype)
        return dx

    # ---- pooling, resampling, dropout ---------------------------------------------------------
    def maxpool_forward(self, x, size, stride, pad, out_h, out_w, train=True):
        """Max pooling, the first window at (-pad, -pad) (as numpy_backend's). Returns
        (y, winner): winner holds the input cell (h*W+w) that won each window (also at
        inference: one kernel does both). x stored channels last gives y stored so (winner
        NCHW)."""
        b, c, h, w = (int(s) for s in x.shape)
        y = self._empty((b, c, out_h, out_w), x.dtype)
        winner = self._empty((b, c, out_h, out_w), np.int32)
        if _channels_last(x):
            y.channels_last = True
            self.kernels.launch("maxpool_forward_nhwc_kernel", y.size, x.ptr, y.ptr, winner.ptr,
                                y.size, c, h, w, out_h, out_w, size, stride, pad, dtype=x.dtype)
            return y, winner
        self.kernels.launch("maxpool_forward_kernel", y.size, x.ptr, y.ptr, winner.ptr,
                            y.size, h, w, out_h, out_w, size, stride, pad, dtype=x.dtype)
        return y, winner

    def maxpool_backward(self, delta, argmax, in_shape, size, stride, pad):
        """dx stored as delta is (argmax in NCHW order either way)."""
        b, c, h, w = (int(s) for s in in_shape)
        out_h, out_w = (int(s) for s in delta.shape[2:])
        if _channels_last(delta):
            if stride >= size:
                dx = self.zeros((b, c, h, w), like=delta)
                self.kernels.launch("maxpool_scatter_nhwc_kernel", delta.size, delta.ptr,
                                    argmax.ptr, dx.ptr, delta.size, c, out_h * out_w, h * w,
                                    dtype=delta.dtype)
                return dx
            dx = self.empty((b, c, h, w), like=delta)
            self.kernels.launch("maxpool_backward_nhwc_kernel", dx.size, delta.ptr, argmax.ptr,
                                dx.ptr, dx.size, c, h, w, out_h, out_w, size, stride, pad,
                                dtype=delta.dtype)
            return dx
        if stride >= size:
            dx = self.zeros((b, c, h, w), like=delta)
            self.kernels.launch("maxpool_scatter_kernel", delta.size, delta.ptr, argmax.ptr,
                                dx.ptr, delta.size, out_h * out_w, h * w, dtype=delta.dtype)
            return dx
        dx = self._empty((b, c, h, w), delta.dtype)
        self.kernels.launch("maxpool_backward_kernel", dx.size, delta.ptr, argmax.ptr,
                            dx.ptr, dx.size, h, w, out_h, out_w, size, stride, pad,
                            dtype=delta.dtype)
        return dx

    def dropout_forward(self, x, probability):
        """The mask comes from a hash of (seed, call number, element), drawn on the GPU; under a
        captured graph the seed is read from device memory so each replay draws anew."""
        y = self.empty(x.shape, like=x)
        mask = self.empty(x.shape, like=x)
        self.kernels.launch("dropout_forward_kernel", x.size, x.ptr, y.ptr, mask.ptr,
                            x.size, np.float32(probability), np.float32(1.0 / (1.0 - probability)),
                            np.uint32(self._seed), self._step_value(1),
                            np.uint32(next(self._dropout_calls) & 0xFFFFFFFF), dtype=x.dtype)
        return y, mask

    def dropout_backward(self, delta, mask):
        dx = self.empty(delta.shape, like=delta)
        mask = self._relayout(self._as_type(mask, delta.dtype), _channels_last(delta))
        self.kernels.launch("multiply_kernel", dx.size, delta.ptr, mask.ptr, dx.ptr,
                            dx.size, dtype=delta.dtype)
        return dx

    # ---- outputs and losses -------------------------------------------------------------------
    def softmax(self, x, groups, temperature):
        batch = int(x.shape[0])
        rows = batch * groups
        y = self._empty(x.shape, x.dtype)
        self.kernels.launch("softmax_kernel", rows, x.ptr, y.ptr, rows, x.size // rows,
                            np.float32(1.0 / temperature), dtype=x.dtype)
        return y

    def _cost_kernel(self, name, output, truth):
        """Runs a cost kernel: delta (shape of output) and the summed cost as a float."""
        truth = self._as_type(self._on_device(truth), FLOAT32)
        if truth.size != output.size:
            raise BackendError(f"truth has {truth.size} values for {output.size} outputs")
        delta = self._empty(output.shape, output.dtype)
        self.cuda.memset_d32_async(self._cost.ptr, 0, 1, self.stream)
        self.kernels.launch(name, max(output.size, 1), output.ptr, truth.ptr,
                            delta.ptr, self._cost.ptr, output.size, dtype=output.dtype)
        if self._recording:
            return 0.0, delta  # read after each replay with last_cost()
        return self.last_cost(), delta

    def last_cost(self):
        return float(self.to_host(self._cost)[0])

    def softmax_cross_entropy(self, probabilities, truth):
        return self._cost_kernel("cross_entropy_kernel", probabilities, truth)

    def sse(self, output, truth):
        return self._cost_kernel("sse_kernel", output, truth)

    # ---- the [yolo] losses' dense part and cell gathers (kernels/yolo_loss.cu) ------------------
    def truth_overlap(self, output, truths, anchors, entries, net_w, net_h, new_coords, classes,
                      class_gate):
        batch, channels, height, width = (int(s) for s in output.shape)
        count = channels // entries
        truths = self._as_type(self._on_device(truths), FLOAT32)
        rows = truths.size // (5 * batch) if batch else 0
        anchors = self._constant(np.asarray(anchors, dtype=np.float32).reshape(count, 2))
        best = self._empty((batch, count, height, width))
        index = self._empty((batch, count, height, width), np.int32)
        self.kernels.launch("truth_overlap_kernel", best.size, output.ptr, truths.ptr,
                            anchors.ptr, best.ptr, index.ptr, batch, count, entries, height,
                            width, rows, np.float32(net_w), np.float32(net_h), int(new_coords),
                            -1 if classes is None else int(classes),
                            np.float32(-1 if class_gate is None else class_gate),
                            dtype=output.dtype)
        return best, index

    def _constant(self, values):
        """A device copy of small host values (in their type), made once per distinct value (a
        recording may read it; no host copy can be recorded)."""
        values = np.ascontiguousarray(values)
        key = (values.dtype.str, values.shape, values.tobytes())
        if key not in self._constants:
            array = self._empty(values.shape, values.dtype)
            if values.size:
                self.cuda.memcpy_htod_async(array.ptr, values, self.stream)
            self._constants[key] = array
        return self._constants[key]

    def objectness_delta_(self, delta, output, best, entries, normalizer, ignore_thresh, smooth):
        output = self._as_type(output, delta.dtype)
        plane = int(output.shape[2]) * int(output.shape[3])
        self.kernels.launch("objectness_delta_kernel", best.size, delta.ptr, output.ptr,
                            best.ptr, best.size, int(output.shape[1]) // entries, entries, plane,
                            np.float32(normalizer), np.float32(ignore_thresh), int(smooth),
                            dtype=delta.dtype)
        return delta

    def _cell_args(self, x, cells, entries):
        _, channels, height, width = (int(s) for s in x.shape)
        cells = np.ascontiguousarray(cells, dtype=np.int32).reshape(-1, 4)
        device_cells = self._empty(cells.shape, np.int32)
        if cells.size:  # pageable and small: the copy is done when the call returns
            self.cuda.memcpy_htod_async(device_cells.ptr, cells, self.stream)
        return len(cells), device_cells, (channels // entries, entries, height, width)

    def gather_cells(self, x, cells, entries):
        count, device_cells, geometry = self._cell_args(x, cells, entries)
        if not count:
            return np.zeros((0, entries), np.float32)
        values = self._empty((count, entries))
        self.kernels.launch("gather_cells_kernel", values.size, x.ptr, device_cells.ptr,
                            values.ptr, count, *geometry, dtype=x.dtype)
        return self.to_host(values)

    def scatter_cells_(self, x, cells, values):
        entries = int(np.shape(values)[-1]) if np.size(values) else 1
        count, device_cells, geometry = self._cell_args(x, cells, entries)
        if not count:
            return x
        values = self.asarray(np.asarray(values, dtype=np.float32).reshape(count, entries))
        self.kernels.launch("scatter_cells_kernel", values.size, x.ptr, device_cells.ptr,
                            values.ptr, count, *geometry, dtype=x.dtype)
        return x

    def sum_of_squares(self, x):
        total = self._empty((1,), np.float64)
        self.cuda.memset_d32_async(total.ptr, 0, 2, self.stream)
        self.kernels.launch_blocks("sum_of_squares_kernel", -(-x.size // (4 * BLOCK)), x.ptr,
                                   total.ptr, x.size, dtype=x.dtype)
        host = np.empty(1, np.float64)
        self.cuda.memcpy_dtoh_async(host, total.ptr, self.stream)
        self.stream.synchronize()
        return float(host[0])

    def apply_truth_events_(self, delta, output, truths, plan, loss):
        """A thread per touched cell (kernels/yolo_truths.cu), then the whole delta's sum of
        squares into the statistics."""
        batch, channels, height, width = (int(s) for s in output.shape)
        entries = loss.entries
        truths = self._as_type(self._on_device(truths), FLOAT32)
        rows = truths.size // (5 * batch) if batch else 0
        capacity = (int(plan.size) - 3) // 3
        multipliers = loss.class_multipliers
        anchors = self._constant(np.asarray(loss.anchors, np.float32).reshape(-1, 2))
        numbers = self._constant(np.array(
            [loss.iou_normalizer, loss.obj_normalizer, loss.cls_normalizer, loss.max_delta,
             loss.label_smooth_eps] + ([] if multipliers is None else list(multipliers)),
            np.float64))
        cell_rows = self._empty((max(capacity, 1), entries))
        statistics = self._empty((len(STATISTICS),), np.float64)
        self.cuda.memset_d32_async(statistics.ptr, 0, 2 * len(STATISTICS), self.stream)
        output = self._as_type(output, delta.dtype)
        self.kernels.launch("truth_events_kernel", capacity, delta.ptr, output.ptr, truths.ptr,
                            plan.ptr, anchors.ptr, numbers.ptr, cell_rows.ptr, statistics.ptr,
                            capacity, channels // entries, entries, height, width, rows,
                            np.float32(loss.net_w), np.float32(loss.net_h),
                            int(loss.kind == "alexeyab"), IOU_LOSSES.index(loss.iou_loss),
                            int(loss.new_coords), loss.classes, int(multipliers is not None),
                            int(bool(loss.focal_loss)), int(bool(loss.objectness_smooth)),
                            int(loss.iou_thresh < 1), dtype=delta.dtype)
        self.kernels.launch_blocks("sum_of_squares_kernel", -(-delta.size // (4 * BLOCK)),
                                   delta.ptr, statistics.ptr, delta.size, dtype=delta.dtype)
        return statistics

    def int_array(self, host):
        host = np.ascontiguousarray(host, dtype=np.int32)
        array = self._empty(host.shape, np.int32)
        if host.size:  # pageable and small: the copy is done when the call returns
            self.cuda.memcpy_htod_async(array.ptr, host, self.stream)
        return array

    def float64_values(self, array):
        array = self._nchw(array)
        host = np.empty(array.shape, np.float64)
        if host.size:
            self.cuda.memcpy_dtoh_async(host, array.ptr, self.stream)
        self.stream.synchronize()
        return host

    def host_reader(self, array):
        from .graph import HostReader

        return HostReader(self, self._nchw(array))

    def output_reader(self, arrays):
        """Eagerly: to_host's arrays and all_finite's check, now. While recording: the outputs
        in float32, one finiteness flag for all of them and their copies into page-locked host
        buffers become part of the recording (graph.OutputReader), the copies on the copy
        stream, beside whatever the recording does after this point."""
        if not self._recording:
            return OutputsNow([self.to_host(a) for a in arrays],
                              all(self.all_finite(a) for a in arrays))
        from .graph import OutputReader

        arrays = [self._nchw(a) for a in arrays]
        floats = [self._as_type(a, FLOAT32) if a.dtype in STORAGE_DTYPES.values() else a
                  for a in arrays]
        flag = self._empty((1,), np.int32)
        self.cuda.memset_d32_async(flag.ptr, 0, 1, self.stream)
        for a in arrays:
            self.kernels.launch("nonfinite_kernel", a.size, a.ptr, flag.ptr, a.size,
                                dtype=a.dtype)
        return OutputReader(self, floats, flag, self._fork_copy_stream())

    def _fork_copy_stream(self):
        """The recording's copy stream, after the main stream's work so far."""
        if self._copy_stream is None:
            self._copy_stream = self.cuda.Stream()
        fork = self.cuda.Event()
        fork.record(self.stream)
        self._copy_stream.wait_for_event(fork)
        self._copies_forked.append(fork)
        return self._copy_stream

    def _join_recorded_copies(self):
        """The main stream waits for the copies output_reader forked while recording (a
        capture must end with every forked stream joined); graph.CapturedStep calls it."""
        forked, self._copies_forked = self._copies_forked, []
        if forked:
            join = self.cuda.Event()
            try:
                join.record(self._copy_stream)
                self.stream.wait_for_event(join)
            except self.cuda.Error:
                pass  # a capture already broken: ending it reports the failure

    # ---- optimisation -------------------------------------------------------------------------
    def sgd_update(self, param, gradient, velocity, learning_rate, momentum, decay, batch,
                   loss_scale=None):
        self.kernels.launch("sgd_kernel", param.size, param.ptr, gradient.ptr, velocity.ptr,
                            param.size, np.float32(learning_rate / batch), self._step_value(0),
                            np.float32(1.0 / batch), np.float32(momentum),
                            np.float32(decay * batch),
                            0 if loss_scale is None else loss_scale.ptr)

    # ---- loss scaling (kernels/loss_scale.cu; the state (S, overflow) stays on the device) ----
    def apply_loss_scale_(self, delta, loss_scale):
        self.kernels.launch("loss_scale_kernel", delta.size, delta.ptr, delta.size,
                            loss_scale.ptr, dtype=delta.dtype)
        return delta

    def flag_non_finite_(self, loss_scale, array):
        self.kernels.launch("flag_non_finite_kernel", array.size, array.ptr, array.size,
                            loss_scale.ptr, dtype=array.dtype)
        return loss_scale

    def update_loss_scale_(self, loss_scale, dynamic, growth_interval):
        self.kernels.launch("update_loss_scale_kernel", 1, loss_scale.ptr, int(bool(dynamic)),
                            int(growth_interval))
        return loss_scale

    def to_host_async(self, array):
        """A copy on the stream into page-locked memory (reused from earlier reads) and an
        event after it: the host goes on while the work issued before it runs."""
        if not hasattr(array, "gpudata"):
            return ReadyRead(np.array(array, dtype=np.float32))
        array = self._nchw(array)
        if array.dtype in STORAGE_DTYPES.values():
            array = self._as_type(array, FLOAT32)
        spares = self._spare_reads.get(read_key(array))
        slot = spares.pop() if spares else (self.cuda.pagelocked_empty(array.shape, array.dtype),
                                             self.cuda.Event())
        if array.size:
            self.cuda.memcpy_dtoh_async(slot[0], array.ptr, self.stream)
        slot[1].record(self.stream)
        return PendingRead(self, slot)

    # ---- broadcasting arithmetic and reductions ------------------------------------------------
    @staticmethod
    def _broadcast_strides(shape, full):
        """Element strides of a contiguous NCHW `shape` over (batch, channel, position) of the
        `full` shape, 0 along axes it is broadcast on."""
        b, c, h, w = (int(v) for v in shape)
        fb, fc, fh, fw = (int(v) for v in full)
        return (0 if b == 1 and fb != 1 else c * h * w, 0 if c == 1 and fc != 1 else h * w,
                0 if h * w == 1 and fh * fw != 1 else 1)

    def _broadcast_in_nchw(self, method, a, b, *args):
        """For multiply and add: where the operands' shapes differ (one broadcast) and one is
        stored channels last, the operation on NCHW copies; else None. Operands of one shape
        are made one layout (a's) and combined elementwise, the result stored as a is."""
        if tuple(a.shape) != tuple(b.shape) and (_channels_last(a) or _channels_last(b)):
            return self._in_nchw(method, (a, b) + args, {}, writes=False)
        return None

    def multiply(self, a, b):
        broadcast = self._broadcast_in_nchw(self.multiply, a, b)
        if broadcast is not None:
            return broadcast
        b = self._relayout(b, _channels_last(a))
        full = a.shape if a.size >= b.size else b.shape
        if a.shape != full:
            a, b = b, a
        b = self._as_type(b, a.dtype)
        y = self.empty(full, like=a)
        strides = self._broadcast_strides(b.shape, full)
        self.kernels.launch("broadcast_multiply_kernel", y.size, a.ptr, b.ptr, y.ptr, y.size,
                            int(full[1]), _size(full[2:]), *strides, dtype=a.dtype)
        return y

    def add(self, a, b, alpha=1.0, beta=1.0):
        """alpha*a + beta*b, b broadcast over its axes of size 1: one pass."""
        broadcast = self._broadcast_in_nchw(self.add, a, b, alpha, beta)
        if broadcast is not None:
            return broadcast
        b = self._relayout(self._as_type(b, a.dtype), _channels_last(a))
        y = self.empty(a.shape, like=a)
        if tuple(b.shape) == tuple(a.shape):  # a [shortcut]'s sum: no broadcast index arithmetic
            self.kernels.launch("add_scaled_kernel", y.size, a.ptr, b.ptr, y.ptr, y.size,
                                np.float32(alpha), np.float32(beta), dtype=a.dtype)
            return y
        strides = self._broadcast_strides(b.shape, a.shape)
        self.kernels.launch("broadcast_add_kernel", y.size, a.ptr, b.ptr, y.ptr, y.size,
                            int(a.shape[1]), _size(a.shape[2:]), *strides, np.float32(alpha),
                            np.float32(beta), dtype=a.dtype)
        return y

    def sum_to(self, x, shape, scale=1.0):
        """scale * the sum of x over the axes where `shape` has 1 and x does not."""
        y = self._empty(shape, x.dtype)
        counts, keep = _merged_axes(tuple(int(n) for n in x.shape),
                                    tuple(int(n) for n in shape))
        self.kernels.launch("sum_to_kernel", y.size, x.ptr, y.ptr, y.size, *counts, keep,
                            np.float32(scale), dtype=x.dtype)
        return y

    # ---- strided views (views.py) --------------------------------------------------------------
    def strided_copy_(self, dst, dst_view, src, src_view, scale=1.0, shift=0.0,
                      accumulate=False):
        """dst[dst_view] = scale * src[src_view] + shift (+= with accumulate): one kernel."""
        src = self._as_type(src, dst.dtype)
        try:
            n, counts, (src_walk, dst_walk) = _joint_walk((_stored(src_view, src),
                                                           _stored(dst_view, dst)))
        except ValueError:
            if not (_channels_last(src) or _channels_last(dst)):
                raise
            return self._in_nchw(self.strided_copy_, (dst, dst_view, src, src_view, scale, shift,
                                                      accumulate), {}, writes=True)
        rows = _vector_rows(n, counts, src_walk, dst_walk, vector=16 // dst.dtype.itemsize)
        if rows is not None and src.ptr % 16 == 0 and dst.ptr % 16 == 0:
            length, (src_offset, src_step), (dst_offset, dst_step) = rows
            steps = (src_offset, src_step, dst_offset, dst_step, np.float32(scale),
                     np.float32(shift), int(bool(accumulate)))
            if length < SHORT_ROW:
                vectors = length // (16 // dst.dtype.itemsize)
                self.kernels.launch("copy_vectors_kernel", n // length * vectors, src.ptr,
                                    dst.ptr, n // length * vectors, vectors, *steps,
                                    dtype=dst.dtype)
                return dst
            chunks = -(-length // ROW_CHUNK)
            self.kernels.launch_blocks("copy_rows_kernel", n // length * chunks, src.ptr,
                                       dst.ptr, length, chunks, *steps, dtype=dst.dtype)
            return dst
        self.kernels.launch("strided_copy_kernel", n, src.ptr, dst.ptr, n, *counts, *src_walk,
                            *dst_walk, np.float32(scale), np.float32(shift), int(bool(accumulate)),
                            dtype=dst.dtype)
        return dst

    def softmax_(self, x, view, axis):
        """Softmax along `axis` of the window of view in x, in place: a thread per lane."""
        try:
            n, counts, walk, count, stride = _lanes(view, axis, x)
        except ValueError:
            if not _channels_last(x):
                raise
            return self._in_nchw(self.softmax_, (x, view, axis), {}, writes=True)
        self.kernels.launch("softmax_strided_kernel", n, x.ptr, n, *counts, *walk, count, stride,
                            dtype=x.dtype)
        return x

    def channel_max(self, x, groups):
        b, c, h, w = (int(v) for v in x.shape)
        y = self._empty((b, groups, h, w), x.dtype)
        winner = self._empty((b, groups, h, w), np.int32)
        self.kernels.launch("channel_max_kernel", y.size, x.ptr, y.ptr, winner.ptr, y.size, c,
                            groups, h * w, dtype=x.dtype)
        return y, winner

    def channel_max_backward(self, delta, winner, in_shape):
        b, c, h, w = (int(v) for v in in_shape)
        dx = self._empty(in_shape, delta.dtype)
        self.kernels.launch("channel_max_backward_kernel", dx.size, delta.ptr, winner.ptr, dx.ptr,
                            dx.size, c, int(delta.shape[1]), h * w, dtype=delta.dtype)
        return dx

    def local_avgpool(self, x, size, stride, pad, out_h, out_w):
        b, c, h, w = (int(v) for v in x.shape)
        y = self._empty((b, c, out_h, out_w), x.dtype)
        self.kernels.launch("local_avgpool_kernel", y.size, x.ptr, y.ptr, y.size, c, h, w,
                            out_h, out_w, size, stride, pad, dtype=x.dtype)
        return y

    def local_avgpool_backward(self, delta, in_shape, size, stride, pad):
        b, c, h, w = (int(v) for v in in_shape)
        dx = self._empty(in_shape, delta.dtype)
        out_h, out_w = int(delta.shape[2]), int(delta.shape[3])
        self.kernels.launch("local_avgpool_backward_kernel", dx.size, delta.ptr, dx.ptr, dx.size,
                            c, h, w, out_h, out_w, size, stride, pad, dtype=delta.dtype)
        return dx


# Operations that follow arrays stored channels last (see the module's docstring); every other
# operation that takes arrays (NCHW_ONLY, below) sees NCHW copies (_in_nchw).
CHANNELS_LAST_AWARE = frozenset({
    "activate_", "activation_backward_", "activation_input_backward_", "add", "add_",
    "add_bias_", "all_finite", "apply_loss_scale_", "batchnorm_backward",
    "batchnorm_forward_inference", "batchnorm_forward_train", "channels_to_read",
    "conv_backward", "conv_bias_forward", "conv_bias_forward_into_", "conv_bias_maxpool_chain",
    "conv_bias_maxpool_forward", "conv_forward", "copy", "dropout_backward", "dropout_forward",
    "empty", "flag_non_finite_", "float64_values", "host_reader", "maxpool_backward",
    "maxpool_forward", "multiply", "output_reader", "reshape", "scale_", "softmax_",
    "strided_copy_", "sum_of_squares", "to_host", "to_host_async", "zeros"})
# Operations of no activation arrays (parameters, host values, the backend's state).
NO_ACTIVATIONS = frozenset({
    "asarray", "available_memory", "capture", "collectives", "freeze_", "host_empty",
    "int_array", "last_cost", "recording", "seed", "set_step", "sgd_update", "synchronize",
    "update_loss_scale_"})


def _given_nchw(method):
    """An operation written for NCHW arrays: given NCHW copies of channels-last operands, the
    copies of those an in-place operation (name ending in _) writes copied back."""
    writes = method.__name__.endswith("_")

    @functools.wraps(method)
    def operation(self, *args, **kwargs):
        # A backend that stores no activation NHWC makes no such operand: no search (host time
        # counts in eager fp32 and tf32).
        if not self.channels_last or not any(
                _channels_last(v) or isinstance(v, (list, tuple)) and any(map(_channels_last, v))
                for v in itertools.chain(args, kwargs.values())):
            return method(self, *args, **kwargs)
        return self._in_nchw(functools.partial(method, self), args, kwargs, writes)

    return operation


NCHW_ONLY = frozenset(name for name in dir(CudaBackend)
                      if not name.startswith("_") and callable(getattr(CudaBackend, name))
                      and name not in CHANNELS_LAST_AWARE | NO_ACTIVATIONS)
for _name in NCHW_ONLY:
    setattr(CudaBackend, _name, _given_nchw(getattr(CudaBackend, _name)))
