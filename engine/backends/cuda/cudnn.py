"""A small ctypes binding of cuDNN's legacy API (libcudnn.so.9): convolution forward and
backward, batch normalisation forward training and backward, and layout transforms.

Every function's argument types are declared in FUNCTIONS (tests/test_kernels_compile.py checks
them against the cudnn headers where those are installed) and every status is checked: a failure
raises BackendError naming the call.
"""

import ctypes

import numpy as np

from ...constants import BN_MOMENTUM, BN_TRAINING_EPSILON
from ...errors import BackendError
from .libraries import CUDNN, load

# Enum values (cudnn_graph.h / cudnn_ops.h / cudnn_cnn.h, cuDNN 9).
CUDNN_STATUS_SUCCESS = 0
CUDNN_DATA_FLOAT = 0
CUDNN_DATA_HALF = 2
CUDNN_DATA_BFLOAT16 = 9
CUDNN_TENSOR_NCHW = 0
CUDNN_TENSOR_NHWC = 1
CUDNN_CROSS_CORRELATION = 1  # Darknet's convolution does not flip the kernel
CUDNN_DEFAULT_MATH = 0
CUDNN_TENSOR_OP_MATH = 1
CUDNN_FMA_MATH = 3           # plain float32 FMA: no TF32 rounding of the inputs
CUDNN_BATCHNORM_PER_ACTIVATION = 0
CUDNN_BATCHNORM_SPATIAL = 1
CUDNN_DETERMINISTIC = 1      # cudnnDeterminism_t
CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED = 7
CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED = 5
CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED = 5

ENUMS = {name: value for name, value in globals().items() if name.startswith("CUDNN_")}

# Algorithms whose measured times are within this factor of the fastest's count as equally
# fast: the one needing the least workspace is chosen. Find's timings of near-equal algorithms
# swap places between runs (mnist.cfg's first backward-filter convolution on an H200: 28 or 47
# MiB of workspace, run to run), and the process's memory with them.
NEAR_TIME = 1.05

P = ctypes.c_void_p
INT = ctypes.c_int
INT_P = ctypes.POINTER(ctypes.c_int)
SIZE = ctypes.c_size_t
SIZE_P = ctypes.POINTER(ctypes.c_size_t)
DOUBLE = ctypes.c_double


class AlgoPerf(ctypes.Structure):
    """cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t (the three share this layout)."""
    _fields_ = [("algo", ctypes.c_int), ("status", ctypes.c_int), ("time", ctypes.c_float),
                ("memory", ctypes.c_size_t), ("determinism", ctypes.c_int),
                ("mathType", ctypes.c_int), ("reserved", ctypes.c_int * 3)]


# name -> argument types (all return cudnnStatus_t except the two noted in RESTYPES).
FUNCTIONS = {
    "cudnnCreate": [P],
    "cudnnDestroy": [P],
    "cudnnSetStream": [P, P],
    "cudnnCreateTensorDescriptor": [P],
    "cudnnSetTensor4dDescriptor": [P, INT, INT, INT, INT, INT, INT],
    "cudnnCreateFilterDescriptor": [P],
    "cudnnSetFilter4dDescriptor": [P, INT, INT, INT, INT, INT, INT],
    "cudnnCreateConvolutionDescriptor": [P],
    "cudnnSetConvolution2dDescriptor": [P, INT, INT, INT, INT, INT, INT, INT, INT],
    "cudnnSetConvolutionGroupCount": [P, INT],
    "cudnnSetConvolutionMathType": [P, INT],
    "cudnnGetConvolution2dForwardOutputDim": [P, P, P, INT_P, INT_P, INT_P, INT_P],
    "cudnnFindConvolutionForwardAlgorithm": [P, P, P, P, P, INT, INT_P, P],
    "cudnnFindConvolutionBackwardDataAlgorithm": [P, P, P, P, P, INT, INT_P, P],
    "cudnnFindConvolutionBackwardFilterAlgorithm": [P, P, P, P, P, INT, INT_P, P],
    "cudnnConvolutionForward": [P, P, P, P, P, P, P, INT, P, SIZE, P, P, P],
    "cudnnConvolutionBackwardData": [P, P, P, P, P, P, P, INT, P, SIZE, P, P, P],
    "cudnnConvolutionBackwardFilter": [P, P, P, P, P, P, P, INT, P, SIZE, P, P, P],
    "cudnnBatchNormalizationForwardTraining": [P, INT, P, P, P, P, P, P, P, P, P, DOUBLE, P, P,
                                               DOUBLE, P, P],
    "cudnnBatchNormalizationBackward": [P, INT, P, P, P, P, P, P, P, P, P, P, P, P, P, P, DOUBLE,
                                        P, P],
    "cudnnTransformTensor": [P, P, P, P, P, P, P],
    "cudnnGetErrorString": [INT],
    "cudnnGetVersion": [],
}
RESTYPES = {"cudnnGetErrorString": ctypes.c_char_p, "cudnnGetVersion": ctypes.c_size_t}

WORKSPACE_LIMIT = 1 << 30
# cuDNN's non-fused Winograd algorithms round more as filters grow. Measured on an H200 against
# the CPU: 2e-3 to 5e-3 relative for 5x5 filters in all three directions, as far off as TF32;
# 2e-6 to 3e-5 for 3x3 ones, where they are also what makes cfg/cifar.cfg's wide layers fast
# (its exact-float32 training runs 1.4x slower without them). So exact float32 (the default)
# leaves them out for filters larger than 3x3 only; --tf32 allows them everywhere.
WINOGRAD_EXACT_MAX_SIZE = 3
IMPRECISE_ALGORITHMS = {
    "cudnnFindConvolutionForwardAlgorithm": CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    "cudnnFindConvolutionBackwardDataAlgorithm": CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    "cudnnFindConvolutionBackwardFilterAlgorithm":
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
}

# numpy dtype of the backend's arrays -> cuDNN's data type (bf16 values live in uint16 arrays).
DATA_TYPES = {np.dtype(np.float32): CUDNN_DATA_FLOAT, np.dtype(np.float16): CUDNN_DATA_HALF,
              np.dtype(np.uint16): CUDNN_DATA_BFLOAT16}

_ONE = ctypes.c_float(1.0)
_ZERO = ctypes.c_float(0.0)


class Cudnn:
    """A cuDNN handle on the device's stream, and the calls the backend makes."""

    def __init__(self, stream_handle, math_type=CUDNN_FMA_MATH):
        self.lib = load(CUDNN)
        for name, argtypes in FUNCTIONS.items():
            try:
                function = getattr(self.lib, name)
            except AttributeError:
                raise BackendError(f"the cuDNN library has no {name}; cuDNN 9 is needed") from None
            function.argtypes = argtypes
            function.restype = RESTYPES.get(name, ctypes.c_int)
        self.version = self.lib.cudnnGetVersion()
        handle = P()
        self.check("cudnnCreate", self.lib.cudnnCreate(ctypes.byref(handle)))
        self.handle = handle
        self.check("cudnnSetStream", self.lib.cudnnSetStream(handle, P(stream_handle)))
        self.math_type = math_type
        self.plans = {}  # convolution geometry -> its descriptors and chosen algorithms
        self._tensor_descriptors = {}

    def check(self, name, status):
        if status != CUDNN_STATUS_SUCCESS:
            message = self.lib.cudnnGetErrorString(status).decode(errors="replace")
            raise BackendError(f"cuDNN call {name} failed: {message} (status {status})")

    def call(self, name, *args):
        self.check(name, getattr(self.lib, name)(*args))

    # ---- descriptors ----------------------------------------------------------------------------
    def tensor(self, shape, dtype=np.float32, channels_last=False):
        """A cached descriptor of `dtype`'s values, stored NCHW or (channels_last) NHWC; the
        shape is given NCHW either way, and shapes of fewer than four dimensions get trailing
        1s."""
        shape = tuple(int(s) for s in shape) + (1,) * (4 - len(shape))
        layout = CUDNN_TENSOR_NHWC if channels_last else CUDNN_TENSOR_NCHW
        key = shape + (DATA_TYPES[np.dtype(dtype)], layout)
        descriptor = self._tensor_descriptors.get(key)
        if descriptor is None:
            descriptor = P()
            self.call("cudnnCreateTensorDescriptor", ctypes.byref(descriptor))
            self.call("cudnnSetTensor4dDescriptor", descriptor, layout, key[-2], *shape)
            self._tensor_descriptors[key] = descriptor
        return descriptor

    def filter(self, shape, dtype=np.float32, channels_last=False):
        descriptor = P()
        self.call("cudnnCreateFilterDescriptor", ctypes.byref(descriptor))
        self.call("cudnnSetFilter4dDescriptor", descriptor, DATA_TYPES[np.dtype(dtype)],
                  CUDNN_TENSOR_NHWC if channels_last else CUDNN_TENSOR_NCHW,
                  *(int(s) for s in shape))
        return descriptor

    def transform(self, shape, dtype, x, y, to_channels_last):
        """y = x, a 4-D array of an NCHW `shape` (filters: (F, C, k, k)) stored NCHW, rewritten
        NHWC (to_channels_last), or the other way round."""
        self.call("cudnnTransformTensor", self.handle, ctypes.byref(_ONE),
                  self.tensor(shape, dtype, not to_channels_last), x, ctypes.byref(_ZERO),
                  self.tensor(shape, dtype, to_channels_last), y)

    def convolution(self, padding, stride, groups, dilation=1):
        """A convolution that accumulates in float32 whatever its data type (cuDNN's
        PSEUDO_HALF / PSEUDO_BFLOAT16 configurations for half data)."""
        descriptor = P()
        self.call("cudnnCreateConvolutionDescriptor", ctypes.byref(descriptor))
        stride_y, stride_x = (stride, stride) if isinstance(stride, int) else stride
        self.call("cudnnSetConvolution2dDescriptor", descriptor, padding, padding, stride_y,
                  stride_x, dilation, dilation, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT)
        self.call("cudnnSetConvolutionGroupCount", descriptor, groups)
        self.call("cudnnSetConvolutionMathType", descriptor, self.math_type)
        return descriptor

    def output_shape(self, conv, x_desc, w_desc):
        dims = [ctypes.c_int() for _ in range(4)]
        self.call("cudnnGetConvolution2dForwardOutputDim", conv, x_desc, w_desc,
                  *(ctypes.byref(d) for d in dims))
        return tuple(d.value for d in dims)

    def find_candidates(self, name, *descriptors, filter_size=1):
        """The algorithms cuDNN measures for one convolution shape (done once per shape), the
        fastest first, among those within WORKSPACE_LIMIT and, in exact float32 with filters
        larger than WINOGRAD_EXACT_MAX_SIZE, not IMPRECISE_ALGORITHMS, deterministic ones before
        the others (some backward algorithms sum with atomics, so two runs with one seed would
        differ), except that the first is the one needing the least workspace of those within
        NEAR_TIME of the fastest; returns [(algo, workspace bytes)], one entry per algorithm."""
        results = (AlgoPerf * 8)()
        returned = ctypes.c_int()
        self.call(name, self.handle, *descriptors, 8, ctypes.byref(returned),
                  ctypes.byref(results))
        too_coarse = self.math_type == CUDNN_FMA_MATH and filter_size > WINOGRAD_EXACT_MAX_SIZE
        imprecise = IMPRECISE_ALGORITHMS[name] if too_coarse else None
        usable = [perf for perf in results[:returned.value]
                  if perf.status == CUDNN_STATUS_SUCCESS and perf.memory <= WORKSPACE_LIMIT
                  and perf.algo != imprecise]
        ordered = sorted(usable, key=lambda perf: perf.determinism != CUDNN_DETERMINISTIC)
        candidates, times = [], {}  # times: of those as deterministic as the first
        for perf in ordered:
            if perf.algo not in (algo for algo, _ in candidates):
                candidates.append((perf.algo, perf.memory))
                if perf.determinism == ordered[0].determinism:
                    times[candidates[-1]] = perf.time
        if not candidates:
            raise BackendError(f"cuDNN call {name}: no usable algorithm for this convolution")
        lightest = lightest_near_fastest(times)
        candidates.remove(lightest)
        return [lightest] + candidates

    # ---- calls ----------------------------------------------------------------------------------
    def conv_forward(self, plan, x, w, y, workspace, eager=False):
        """y = conv(x, w) by plan's forward_algo, or its eager_algo (an eager inference call)."""
        algo, need = ((plan.eager_algo, plan.eager_workspace) if eager
                      else (plan.forward_algo, plan.forward_workspace))
        self.call("cudnnConvolutionForward", self.handle, ctypes.byref(_ONE), plan.x_desc, x,
                  plan.w_desc, w, plan.conv_desc, algo, workspace, need, ctypes.byref(_ZERO),
                  plan.y_desc, y)

    def conv_backward_filter(self, plan, x, dy, dw, workspace):
        # beta = 1: the weight gradient accumulates into the layer's weight updates.
        self.call("cudnnConvolutionBackwardFilter", self.handle, ctypes.byref(_ONE), plan.x_desc, x,
                  plan.y_desc, dy, plan.conv_desc, plan.filter_algo, workspace,
                  plan.filter_workspace, ctypes.byref(_ONE), plan.w_desc, dw)

    def conv_backward_data(self, plan, w, dy, dx, workspace):
        self.call("cudnnConvolutionBackwardData", self.handle, ctypes.byref(_ONE), plan.w_desc, w,
                  plan.y_desc, dy, plan.conv_desc, plan.data_algo, workspace,
                  plan.data_workspace, ctypes.byref(_ZERO), plan.x_desc, dx)

    def batchnorm_forward_train(self, mode, x_desc, x, y, param_desc, scales, biases,
                                rolling_mean, rolling_variance, save_mean, save_inv_std):
        self.call("cudnnBatchNormalizationForwardTraining", self.handle, mode, ctypes.byref(_ONE),
                  ctypes.byref(_ZERO), x_desc, x, x_desc, y, param_desc, scales, biases,
                  BN_MOMENTUM, rolling_mean, rolling_variance, BN_TRAINING_EPSILON, save_mean,
                  save_inv_std)

    def batchnorm_backward(self, mode, x_desc, x, dy, dx, param_desc, scales, scale_updates,
                           bias_updates, save_mean, save_inv_std):
        # Linear in dy, so Darknet's deltas (negative gradients) give negative gradients back;
        # betaParamDiff = 1 accumulates them into the layer's updates.
        self.call("cudnnBatchNormalizationBackward", self.handle, mode, ctypes.byref(_ONE),
                  ctypes.byref(_ZERO), ctypes.byref(_ONE), ctypes.byref(_ONE), x_desc, x, x_desc,
                  dy, x_desc, dx, param_desc, scales, scale_updates, bias_updates, BN_TRAINING_EPSILON,
                  save_mean, save_inv_std)


def lightest_near_fastest(times):
    """Of {(algo, workspace bytes): time}, the one needing the least workspace among those
    within NEAR_TIME of the fastest (the first such in `times`' order on a tie); None if empty."""
    if not times:
        return None
    fastest = min(times.values())
    return min((choice for choice, time in times.items() if time <= NEAR_TIME * fastest),
               key=lambda choice: choice[1])
