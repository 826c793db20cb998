"""Convolution, bias and activation as one cuDNN kernel: a small ctypes binding of cuDNN 9's
backend (graph) API (libcudnn.so.9) and the fused inference plans CudaBackend.conv_bias_forward
runs on NHWC fp16/bf16 data; also the plain convolution plans that eager convolutions run in
every precision where they time faster than the legacy call (ConvolutionGraphs: executing a
plan costs the host far less than cudnnConvolutionForward): inference forwards, and in training
the forward, the backward data and the backward filter.

The legacy cudnnConvolutionBiasActivationForward takes only ReLU and identity; Darknet's
detectors use leaky, mish, logistic, swish and linear. cuDNN's runtime-fusion engines (sm80 and
later) compile a graph of a convolution followed by pointwise operations into one kernel, so
the bias pass after each convolution (bias_activate_nhwc_kernel: 1.87 of yolov4's 5.76 ms of
kernels at batch 16 in fp16 on an H200) goes. A plan is made once per shape, on the first eager
call: the operation graph (FusedConvolutions.build), cuDNN's heuristics (mode A, then the
fallback mode), and the first of their engine configurations that finalizes within
WORKSPACE_LIMIT. A shape whose graph cuDNN refuses at any step (no engine, a finalize error, a
failing first run) is remembered as unfused and runs as before (conv_forward and add_bias_);
so is one whose fused kernel, on its first run, the backend found differing from the unfused
path (AGREEMENT) or slower.
Compiling a plan costs 0.05-0.75 s per shape (NVRTC), so each one is kept on disk
(plan_cache.py, PLANS_FOLDER): its JSON (CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION) after
it is made, every refusal, and the backend's verdicts; the next process on the same GPU model
and cuDNN loads the plan (FusedConvolutions.load: no graph, heuristics or compilation), still
checked and timed at its first run, and an entry that does not load is compiled again.
Executing a plan allocates nothing on the device and does not synchronise, so it can be
recorded into a CUDA graph.

Every function's argument types are declared in FUNCTIONS and the enum values in ENUMS
(tests/test_kernels_compile.py checks both against cudnn_graph.h where it is installed); every
status is checked, and a failure raises BackendError naming the call.
"""

import ctypes
import os
import sys
import time

import numpy as np

from ...constants import LEAKY_SLOPE
from ...errors import BackendError
from .cudnn import (
    CUDNN_CROSS_CORRELATION,
    CUDNN_DATA_FLOAT,
    CUDNN_FMA_MATH,
    DATA_TYPES,
    WINOGRAD_EXACT_MAX_SIZE,
    WORKSPACE_LIMIT,
)
from .libraries import CUDNN, load, nvrtc
from .plan_cache import RecordStore

# Enum values (cudnn_graph.h, cuDNN 9): only those used here.
CUDNN_STATUS_SUCCESS = 0
# cudnnBackendDescriptorType_t
CUDNN_BACKEND_POINTWISE_DESCRIPTOR = 0
CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR = 1
CUDNN_BACKEND_ENGINE_DESCRIPTOR = 2
CUDNN_BACKEND_ENGINECFG_DESCRIPTOR = 3
CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR = 4
CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR = 5
CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR = 10
CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR = 11
CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR = 12
CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR = 13
CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR = 15
CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR = 16
CUDNN_BACKEND_TENSOR_DESCRIPTOR = 17
# cudnnBackendAttributeType_t
CUDNN_TYPE_HANDLE = 0
CUDNN_TYPE_DATA_TYPE = 1
CUDNN_TYPE_BOOLEAN = 2
CUDNN_TYPE_INT64 = 3
CUDNN_TYPE_FLOAT = 4
CUDNN_TYPE_DOUBLE = 5
CUDNN_TYPE_VOID_PTR = 6
CUDNN_TYPE_CONVOLUTION_MODE = 7
CUDNN_TYPE_HEUR_MODE = 8
CUDNN_TYPE_NAN_PROPOGATION = 10  # (sic; deprecated in later cuDNN 9 releases, still taken)
CUDNN_TYPE_NUMERICAL_NOTE = 11
CUDNN_TYPE_POINTWISE_MODE = 14
CUDNN_TYPE_BACKEND_DESCRIPTOR = 15
CUDNN_TYPE_BEHAVIOR_NOTE = 19
CUDNN_TYPE_CHAR = 24
# cudnnBackendAttributeName_t
CUDNN_ATTR_POINTWISE_MODE = 0
CUDNN_ATTR_POINTWISE_MATH_PREC = 1
CUDNN_ATTR_POINTWISE_NAN_PROPAGATION = 2  # deprecated in later cuDNN 9 releases, still taken
CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP = 3
CUDNN_ATTR_POINTWISE_RELU_UPPER_CLIP = 4
CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE = 5
CUDNN_ATTR_POINTWISE_SOFTPLUS_BETA = 7
CUDNN_ATTR_POINTWISE_SWISH_BETA = 8
CUDNN_ATTR_CONVOLUTION_COMP_TYPE = 100
CUDNN_ATTR_CONVOLUTION_CONV_MODE = 101
CUDNN_ATTR_CONVOLUTION_DILATIONS = 102
CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES = 103
CUDNN_ATTR_CONVOLUTION_POST_PADDINGS = 104
CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS = 105
CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS = 106
CUDNN_ATTR_ENGINEHEUR_MODE = 200
CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH = 201
CUDNN_ATTR_ENGINEHEUR_RESULTS = 202
CUDNN_ATTR_ENGINECFG_ENGINE = 300
CUDNN_ATTR_EXECUTION_PLAN_HANDLE = 400  # deprecated in later cuDNN 9 releases, still taken
CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG = 401
CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE = 402
CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION = 405
CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA = 700
CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA = 701
CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC = 702
CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W = 703
CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X = 704
CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y = 705
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA = 706
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA = 707
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC = 708
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W = 709
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX = 710
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY = 711
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA = 712
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA = 713
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC = 714
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW = 715
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X = 716
CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY = 717
CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR = 750
CUDNN_ATTR_OPERATION_POINTWISE_XDESC = 751
CUDNN_ATTR_OPERATION_POINTWISE_BDESC = 752
CUDNN_ATTR_OPERATION_POINTWISE_YDESC = 753
CUDNN_ATTR_OPERATIONGRAPH_HANDLE = 800  # deprecated in later cuDNN 9 releases, still taken
CUDNN_ATTR_OPERATIONGRAPH_OPS = 801
CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT = 900
CUDNN_ATTR_TENSOR_DATA_TYPE = 901
CUDNN_ATTR_TENSOR_DIMENSIONS = 902
CUDNN_ATTR_TENSOR_STRIDES = 903
CUDNN_ATTR_TENSOR_UNIQUE_ID = 906
CUDNN_ATTR_TENSOR_IS_VIRTUAL = 907
CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS = 1000
CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS = 1001
CUDNN_ATTR_VARIANT_PACK_WORKSPACE = 1003
CUDNN_ATTR_ENGINE_NUMERICAL_NOTE = 1303
CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE = 1305
# cudnnPointwiseMode_t
CUDNN_POINTWISE_ADD = 0
CUDNN_POINTWISE_MUL = 1
CUDNN_POINTWISE_RELU_FWD = 100
CUDNN_POINTWISE_TANH_FWD = 101
CUDNN_POINTWISE_SIGMOID_FWD = 102
CUDNN_POINTWISE_SOFTPLUS_FWD = 105
CUDNN_POINTWISE_SWISH_FWD = 106
# cudnnNanPropagation_t
CUDNN_PROPAGATE_NAN = 1
# cudnnBackendHeurMode_t
CUDNN_HEUR_MODE_FALLBACK = 2
CUDNN_HEUR_MODE_A = 3
# cudnnBackendNumericalNote_t
CUDNN_NUMERICAL_NOTE_TENSOR_CORE = 0
CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS = 1
CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION = 2
CUDNN_NUMERICAL_NOTE_FFT = 3
CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC = 4
CUDNN_NUMERICAL_NOTE_WINOGRAD = 5
CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_4x4 = 6
CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_6x6 = 7
CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_13x13 = 8
# cudnnBackendBehaviorNote_t
CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION = 0

ENUMS = {name: value for name, value in globals().items() if name.startswith("CUDNN_")}
# For messages: an attribute's and a descriptor type's names.
ATTRIBUTE_NAMES = {v: k for k, v in ENUMS.items() if k.startswith("CUDNN_ATTR_")}
DESCRIPTOR_NAMES = {v: k for k, v in ENUMS.items() if k.startswith("CUDNN_BACKEND_")}

P = ctypes.c_void_p
INT = ctypes.c_int
INT64 = ctypes.c_int64
INT64_P = ctypes.POINTER(ctypes.c_int64)

# name -> argument types (all return cudnnStatus_t but cudnnGetErrorString).
FUNCTIONS = {
    "cudnnBackendCreateDescriptor": [INT, P],
    "cudnnBackendDestroyDescriptor": [P],
    "cudnnBackendFinalize": [P],
    "cudnnBackendSetAttribute": [P, INT, INT, INT64, P],
    "cudnnBackendGetAttribute": [P, INT, INT, INT64, INT64_P, P],
    "cudnnBackendExecute": [P, P, P],
    "cudnnGetErrorString": [INT],
    "cudnnGetCudartVersion": [],
    "cudnnGetVersion": [],
}
RESTYPES = {"cudnnGetErrorString": ctypes.c_char_p, "cudnnGetCudartVersion": ctypes.c_size_t,
            "cudnnGetVersion": ctypes.c_size_t}

# The C type of each attribute type's elements (enums are C ints, cuDNN's booleans C bools).
ELEMENT_TYPES = {
    CUDNN_TYPE_HANDLE: ctypes.c_void_p, CUDNN_TYPE_DATA_TYPE: ctypes.c_int,
    CUDNN_TYPE_BOOLEAN: ctypes.c_bool, CUDNN_TYPE_INT64: ctypes.c_int64,
    CUDNN_TYPE_FLOAT: ctypes.c_float, CUDNN_TYPE_DOUBLE: ctypes.c_double,
    CUDNN_TYPE_VOID_PTR: ctypes.c_void_p, CUDNN_TYPE_CONVOLUTION_MODE: ctypes.c_int,
    CUDNN_TYPE_HEUR_MODE: ctypes.c_int, CUDNN_TYPE_POINTWISE_MODE: ctypes.c_int,
    CUDNN_TYPE_NAN_PROPOGATION: ctypes.c_int, CUDNN_TYPE_NUMERICAL_NOTE: ctypes.c_int,
    CUDNN_TYPE_BEHAVIOR_NOTE: ctypes.c_int,
    CUDNN_TYPE_BACKEND_DESCRIPTOR: ctypes.c_void_p,
}

# The activations fused, each as the pointwise steps after the bias add: (output name, mode,
# {attribute: double value}, input names), "z" being the convolution plus bias; the last step
# writes y. ReLU's other settings are RELU_SETTINGS. Leaky is ReLU with a lower clip slope
# (engine/constants.py's LEAKY_SLOPE); swish
# is x * sigmoid(beta x) with beta 1 (Darknet's x * logistic(x)); mish, x * tanh(softplus(x)),
# is composed (cuDNN has no mish mode). Darknet's softplus switches to x above 20 and to e^x
# below -20 (MISH_THRESHOLD), where log(1 + e^x) equals them in float.
ACTIVATION_STEPS = {
    "linear": (),
    "relu": (("y", CUDNN_POINTWISE_RELU_FWD, {CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE: 0.0},
              ("z",)),),
    "leaky": (("y", CUDNN_POINTWISE_RELU_FWD,
               {CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE: LEAKY_SLOPE}, ("z",)),),
    "logistic": (("y", CUDNN_POINTWISE_SIGMOID_FWD, {}, ("z",)),),
    "swish": (("y", CUDNN_POINTWISE_SWISH_FWD, {CUDNN_ATTR_POINTWISE_SWISH_BETA: 1.0}, ("z",)),),
    "mish": (("softplus", CUDNN_POINTWISE_SOFTPLUS_FWD,
              {CUDNN_ATTR_POINTWISE_SOFTPLUS_BETA: 1.0}, ("z",)),
             ("tanh", CUDNN_POINTWISE_TANH_FWD, {}, ("softplus",)),
             ("y", CUDNN_POINTWISE_MUL, {}, ("z", "tanh"))),
}
FUSED_ACTIVATIONS = frozenset(ACTIVATION_STEPS)
# Set on every RELU_FWD as cuDNN's frontend sets them: NaNs propagated (the only choice cuDNN
# documents for ReLU), clipped below at 0 and above at float's largest value.
FLOAT_MAX = float(np.finfo(np.float32).max)
RELU_SETTINGS = ((CUDNN_ATTR_POINTWISE_NAN_PROPAGATION, CUDNN_TYPE_NAN_PROPOGATION,
                  CUDNN_PROPAGATE_NAN),
                 (CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP, CUDNN_TYPE_DOUBLE, 0.0),
                 (CUDNN_ATTR_POINTWISE_RELU_UPPER_CLIP, CUDNN_TYPE_DOUBLE, FLOAT_MAX))

# Unique ids of the tensors the variant pack binds; virtual tensors count up from VIRTUAL_UID.
X_UID, W_UID, BIAS_UID, Y_UID = 1, 2, 3, 4
VIRTUAL_UID = 100
# The convolution operations a graph may hold, by direction: the descriptor type, beta, and the
# attributes of alpha, beta, the convolution and the tensors in the forward's terms: x, w, y.
# The backward data writes x's gradient (DX) from w and y's gradient (DY), the backward filter
# w's gradient (DW) from x and DY; so a plan's variant pack binds X_UID, W_UID and Y_UID in
# every direction. Beta is the legacy calls' (cudnn.py): the filters' gradient accumulates into
# the layer's weight updates (1), the forward and the backward data overwrite (0).
CONVOLUTION_OPERATIONS = {
    "forward": (CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR, 0.0,
                (CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                 CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
                 CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                 CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
                 CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
                 CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y)),
    "data": (CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR, 0.0,
             (CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
              CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
              CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
              CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
              CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
              CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY)),
    "filter": (CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR, 1.0,
               (CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
                CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA,
                CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
                CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
                CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
                CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY)),
}
# Which of (x, w, y) each direction writes: its output's place in a plan's pointers.
WRITTEN = {"forward": 2, "data": 0, "filter": 1}
ALIGNMENT = 16  # bytes; a call whose pointers are not so aligned runs unfused
MAX_ENGINE_CONFIGS = 16  # of the heuristics' list, tried in order
# Heuristic modes asked in turn until a configuration finalizes: A (INSTANT's successor), then
# the functional fallback engines (the backend keeps a fused plan only where it times faster).
HEURISTIC_MODES = (("A", CUDNN_HEUR_MODE_A), ("FALLBACK", CUDNN_HEUR_MODE_FALLBACK))
MAX_VARIANT_PACKS = 256  # per plan, by pointers; more and the cache starts again
# A fused plan's first run must agree with the unfused path (conv_forward, add_bias_) within
# AGREEMENT relative RMS difference (plus ABSOLUTE_FLOOR per value), else its shape runs
# unfused: a guard against a graph that computes something else. The two round differently
# (the fused kernel once, the unfused path twice): about 3e-4 in fp16 and 2e-3 in bf16.
AGREEMENT = 3e-2
ABSOLUTE_FLOOR = 1 / 1024  # fp16's spacing at 1
# Plans on disk (plan_cache.RecordStore, in this folder of the engine's cache): a finalized
# plan's JSON (CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION), loaded instead of compiled by
# the next process, and the refusals, so a refused shape is not compiled
# again. Each entry is named by its shape key, bias type, the graph's make-up (GRAPH_FORMAT,
# raised when operations() changes, and the activation's steps), cuDNN's and CUDA's versions and
# the GPU's name and compute capability: a plan deserialises only on the GPU model and cuDNN
# it was made with.
PLANS_FOLDER = "cudnn-plans"
# Where a shape's plan or refusal came from (FusedConvolutions.origins, summary)
COMPILED, LOADED, REFUSAL_READ = "compiled", "loaded from disk", "refusal read from disk"
ORIGINS = (COMPILED, LOADED, REFUSAL_READ)
GRAPH_FORMAT = 1


# An eager convolution's graph plan must agree with the legacy eager algorithm's output within
# (relative RMS difference, absolute floor per value) for the backend's precision, else it is
# not used: exact float32 sums the same float products in another order (a few 1e-7; 3x3
# Winograd, which exact float32 keeps, a few 1e-6), TF32 may round the inputs in one and not the
# other (about 1e-3), fp16 and bf16 as fused plans.
EAGER_AGREEMENT = {"fp32": (8e-6, 0.0), "tf32": (3e-3, 0.0),
                   "fp16": (AGREEMENT, ABSOLUTE_FLOOR), "bf16": (AGREEMENT, ABSOLUTE_FLOOR)}
# Of the heuristics' engine configurations for an eager convolution, at most this many become
# candidate plans (each timed on the shape's first eager call).
EAGER_CANDIDATES = 4
# Notes read per engine: cudnn_graph.h's CUDNN_NUMERICAL_NOTE_TYPE_COUNT (cuDNN 9.1 on) and
# CUDNN_BEHAVIOR_NOTE_TYPE_COUNT, what cuDNN's frontend asks for.
NUMERICAL_NOTES_LIMIT, BEHAVIOUR_NOTES_LIMIT = 10, 4
# Engines exact float32 (precision fp32: CUDNN_FMA_MATH in the legacy calls) leaves out: TF32 or
# half tensor cores, inputs converted down, reductions in less than float, FFT; Winograd too
# for filters larger than cudnn.WINOGRAD_EXACT_MAX_SIZE (as cudnn.find_candidates leaves out
# IMPRECISE_ALGORITHMS). Other precisions take any engine for inference (nondeterminism does
# not matter for an inference forward pass); training, in every precision, leaves out
# NONDETERMINISTIC engines (atomics: training is reproducible per process, as the legacy
# algorithms are chosen among cuDNN's deterministic ones) and REDUCED_PRECISION_REDUCTION ones
# (sums in half: the legacy calls sum in float, CUDNN_DATA_FLOAT, and a weight gradient is a
# sum over the whole batch).
EXACT_REFUSED_NOTES = (CUDNN_NUMERICAL_NOTE_TENSOR_CORE, CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS,
                       CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION, CUDNN_NUMERICAL_NOTE_FFT)
WINOGRAD_NOTES = (CUDNN_NUMERICAL_NOTE_WINOGRAD, CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_4x4,
                  CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_6x6, CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_13x13)
NOTE_NAMES = {v: k[len("CUDNN_NUMERICAL_NOTE_"):] for k, v in ENUMS.items()
              if k.startswith("CUDNN_NUMERICAL_NOTE_")}


def agrees(error, scale, size, relative=AGREEMENT, floor=ABSOLUTE_FLOOR):
    """Whether a sum of squared differences `error` is within `relative` (RMS) of a
    reference's sum of squares `scale` (size values), plus `floor` per value; False for NaN."""
    return error <= relative ** 2 * scale + size * floor ** 2


class CudnnGraph:
    """The backend API's calls on `lib` (libcudnn.so.9, or a stand-in with the same functions:
    declare=False), every status checked."""

    def __init__(self, lib, declare=True):
        if declare:
            for name, argtypes in FUNCTIONS.items():
                try:
                    function = getattr(lib, name)
                except AttributeError:
                    raise BackendError(f"the cuDNN library has no {name}; cuDNN 9 is "
                                       "needed") from None
                function.argtypes = argtypes
                function.restype = RESTYPES.get(name, ctypes.c_int)
        self.lib = lib
        self.kinds = {}  # descriptor address -> its type, for messages

    @classmethod
    def load(cls):
        return cls(load(CUDNN))

    def check(self, name, status):
        if status != CUDNN_STATUS_SUCCESS:
            message = self.lib.cudnnGetErrorString(status)
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
            raise BackendError(f"cuDNN call {name} failed: {message} (status {status})")

    def kind(self, descriptor):
        return DESCRIPTOR_NAMES.get(self.kinds.get(descriptor.value), "a descriptor")

    def create(self, kind):
        descriptor = P()
        self.check(f"cudnnBackendCreateDescriptor({DESCRIPTOR_NAMES.get(kind, kind)})",
                   self.lib.cudnnBackendCreateDescriptor(kind, ctypes.byref(descriptor)))
        self.kinds[descriptor.value] = kind
        return descriptor

    def set(self, descriptor, attribute, kind, values):
        """Set `attribute` to `values` (a list), given as an array of `kind`'s C type."""
        array = (ELEMENT_TYPES[kind] * len(values))(*values)
        self.check(f"cudnnBackendSetAttribute({ATTRIBUTE_NAMES.get(attribute, attribute)})",
                   self.lib.cudnnBackendSetAttribute(descriptor, attribute, kind, len(values),
                                                     array))

    def get_int64(self, descriptor, attribute):
        value, count = ctypes.c_int64(), ctypes.c_int64()
        self.check("cudnnBackendGetAttribute",
                   self.lib.cudnnBackendGetAttribute(descriptor, attribute, CUDNN_TYPE_INT64, 1,
                                                     ctypes.byref(count), ctypes.byref(value)))
        return value.value

    def get_text(self, descriptor, attribute):
        """A CUDNN_TYPE_CHAR attribute (a plan's JSON): its element count asked first (a
        zero-size request; cudnn_graph.h counts the terminating NUL), then read."""
        count, returned = ctypes.c_int64(), ctypes.c_int64()
        self.check("cudnnBackendGetAttribute",
                   self.lib.cudnnBackendGetAttribute(descriptor, attribute, CUDNN_TYPE_CHAR, 0,
                                                     ctypes.byref(count), None))
        text = ctypes.create_string_buffer(max(count.value, 0) + 1)  # NUL-ended whatever comes
        self.check("cudnnBackendGetAttribute",
                   self.lib.cudnnBackendGetAttribute(descriptor, attribute, CUDNN_TYPE_CHAR,
                                                     count.value, ctypes.byref(returned), text))
        return text.value.decode()

    def set_text(self, descriptor, attribute, text):
        """Set a CUDNN_TYPE_CHAR attribute to `text`, NUL-terminated and counted with its NUL
        (as get_text reads it and cuDNN's frontend hands it back in loadFromJson)."""
        data = ctypes.create_string_buffer(text.encode())
        self.check(f"cudnnBackendSetAttribute({ATTRIBUTE_NAMES.get(attribute, attribute)})",
                   self.lib.cudnnBackendSetAttribute(descriptor, attribute, CUDNN_TYPE_CHAR,
                                                     len(data), data))

    def version(self):
        """cudnnGetVersion: the library's version (e.g. 92800 for 9.28.0)."""
        return int(self.lib.cudnnGetVersion())

    def get_descriptors(self, descriptor, attribute, kind, limit, count=None):
        """Up to `limit` descriptors of an attribute, each made here as `kind` and filled in
        by cuDNN (the heuristics' engine configurations); `count`: how many the attribute
        holds, where known (else asked first)."""
        if count is None:
            count = ctypes.c_int64()
            self.check("cudnnBackendGetAttribute",
                       self.lib.cudnnBackendGetAttribute(descriptor, attribute,
                                                         CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                                         ctypes.byref(count), None))
            count = count.value
        count = min(count, limit)
        if count <= 0:
            return []
        made = [self.create(kind) for _ in range(count)]
        array = (P * count)(*made)
        returned = ctypes.c_int64()
        try:
            self.check("cudnnBackendGetAttribute",
                       self.lib.cudnnBackendGetAttribute(descriptor, attribute,
                                                         CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                                         ctypes.byref(returned), array))
        except BackendError:
            self.destroy(*made)
            raise
        self.destroy(*made[returned.value:])
        return made[:returned.value]

    def get_descriptor(self, descriptor, attribute, kind):
        """The one descriptor an attribute holds (an engine configuration's engine), made here
        as `kind` and filled in by cuDNN; BackendError where it holds none."""
        found = self.get_descriptors(descriptor, attribute, kind, 1, count=1)
        if not found:
            raise BackendError(f"cuDNN gave no {DESCRIPTOR_NAMES.get(kind, kind)} for "
                               f"{ATTRIBUTE_NAMES.get(attribute, attribute)}")
        return found[0]

    def get_ints(self, descriptor, attribute, kind, limit):
        """Up to `limit` values of an attribute whose elements are C ints (enums: an engine's
        numerical or behaviour notes), as a list of the values cuDNN returned."""
        array = (ELEMENT_TYPES[kind] * limit)()
        returned = ctypes.c_int64()
        self.check("cudnnBackendGetAttribute",
                   self.lib.cudnnBackendGetAttribute(descriptor, attribute, kind, limit,
                                                     ctypes.byref(returned), array))
        return [int(value) for value in array[:min(returned.value, limit)]]

    def finalize(self, descriptor):
        self.check(f"cudnnBackendFinalize({self.kind(descriptor)})",
                   self.lib.cudnnBackendFinalize(descriptor))

    def destroy(self, *descriptors):
        for descriptor in descriptors:
            self.kinds.pop(descriptor.value, None)
            self.check("cudnnBackendDestroyDescriptor",
                       self.lib.cudnnBackendDestroyDescriptor(descriptor))

    def execute(self, handle, plan, variant_pack):
        self.check("cudnnBackendExecute",
                   self.lib.cudnnBackendExecute(handle, plan, variant_pack))


def nhwc_strides(shape):
    """The strides of an NCHW-ordered shape (N, C, H, W) stored NHWC, in NCHW order (the backend
    API describes every tensor by its logical dimensions and their strides)."""
    _, c, h, w = shape
    return [c * h * w, 1, w * c, c]


def output_shape(x_shape, w_shape, stride, padding, dilation):
    """(N, F, out_h, out_w) of Darknet's convolution (operations.conv_forward's formula)."""
    stride_y, stride_x = (stride, stride) if isinstance(stride, int) else stride
    size_y, size_x = w_shape[2:]
    out = [(n + 2 * padding - dilation * (k - 1) - 1) // s + 1
           for n, k, s in ((x_shape[2], size_y, stride_y), (x_shape[3], size_x, stride_x))]
    return (int(x_shape[0]), int(w_shape[0]), *out)


def nchw_strides(shape):
    """The strides of an (N, C, H, W) shape stored NCHW (contiguous; the filters: KCRS)."""
    _, c, h, w = shape
    return [c * h * w, h * w, w, 1]


class ExecutionPlan:
    """One shape's finalized execution plan and what executing it needs."""

    def __init__(self, key, y_shape, plan, workspace, descriptors):
        self.key, self.y_shape, self.plan, self.workspace = key, y_shape, plan, workspace
        self.descriptors = descriptors  # every descriptor the plan refers to, kept alive
        self.variant_packs = {}         # (device pointers..., workspace) -> finalized pack
        self.ran = False                # executed once eagerly (capture may follow)

    def release(self, graph):
        """Destroy the plan, its variant packs and the descriptors it keeps."""
        graph.destroy(*self.variant_packs.values())
        self.variant_packs.clear()
        graph.destroy(self.plan, *self.descriptors)


class FusedPlan(ExecutionPlan):
    """A fused (convolution, bias, activation) plan; its bias is given in `bias_dtype`."""

    def __init__(self, key, y_shape, plan, workspace, descriptors, bias_dtype):
        super().__init__(key, y_shape, plan, workspace, descriptors)
        self.bias_dtype = bias_dtype    # numpy dtype the bias is given in


class GraphBuilder:
    """Makes the descriptors of one operation graph on a CudnnGraph, each appended to `made`
    as it is created, so that a refusal at any step can destroy them all."""

    def __init__(self, graph, made):
        self.graph, self.made = graph, made
        self.virtual_uids = iter(range(VIRTUAL_UID, VIRTUAL_UID + 64))

    def create(self, kind):
        descriptor = self.graph.create(kind)
        self.made.append(descriptor)
        return descriptor

    def tensor(self, shape, strides, data_type, uid=None):
        """A finalized tensor; virtual (an intermediate never in memory) where `uid` is None."""
        graph = self.graph
        descriptor = self.create(CUDNN_BACKEND_TENSOR_DESCRIPTOR)
        virtual = uid is None
        graph.set(descriptor, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64,
                  [next(self.virtual_uids) if virtual else uid])
        graph.set(descriptor, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, [data_type])
        graph.set(descriptor, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, list(shape))
        graph.set(descriptor, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides)
        graph.set(descriptor, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, [ALIGNMENT])
        if virtual:
            graph.set(descriptor, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, [True])
        graph.finalize(descriptor)
        return descriptor

    def convolution(self, direction, x, w, y, stride, padding, dilation):
        """The finalized operation of CONVOLUTION_OPERATIONS[direction] on tensor descriptors
        x, w, y (the forward's: for the backward passes, where its gradient is read or
        written): y = conv(x, w), Darknet's convolution, accumulated in float, padded alike on
        both sides; x's gradient from y's ("data"); w's gradient added to w ("filter"). Groups:
        the filters' C is x's C / groups (cuDNN infers the group count)."""
        graph = self.graph
        stride_y, stride_x = (stride, stride) if isinstance(stride, int) else stride
        convolution = self.create(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE,
                  [CUDNN_DATA_FLOAT])
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE,
                  [CUDNN_CROSS_CORRELATION])  # Darknet's convolution does not flip
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, [2])
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64,
                  [dilation, dilation])
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64,
                  [stride_y, stride_x])
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64,
                  [padding, padding])
        graph.set(convolution, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64,
                  [padding, padding])
        graph.finalize(convolution)

        kind, beta, (alpha_name, beta_name, convolution_name, *tensor_names) = \
            CONVOLUTION_OPERATIONS[direction]
        operation = self.create(kind)
        for name, tensor in zip(tensor_names, (x, w, y)):
            graph.set(operation, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, [tensor])
        graph.set(operation, convolution_name, CUDNN_TYPE_BACKEND_DESCRIPTOR, [convolution])
        graph.set(operation, alpha_name, CUDNN_TYPE_FLOAT, [1.0])
        graph.set(operation, beta_name, CUDNN_TYPE_FLOAT, [beta])
        graph.finalize(operation)
        return operation

    def operation_graph(self, handle, operations):
        """The finalized graph of `operations` on a cuDNN handle."""
        operation_graph = self.create(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)
        self.graph.set(operation_graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE,
                       [handle])
        self.graph.set(operation_graph, CUDNN_ATTR_OPERATIONGRAPH_OPS,
                       CUDNN_TYPE_BACKEND_DESCRIPTOR, operations)
        self.graph.finalize(operation_graph)
        return operation_graph

    def heuristic_configs(self, operation_graph, refusals):
        """For each of HEURISTIC_MODES in turn, (mode name, the engine configurations cuDNN's
        heuristics give for `operation_graph`, at most MAX_ENGINE_CONFIGS, kept in `made`); a
        mode that fails or gives none is noted in `refusals` and skipped."""
        graph = self.graph
        for mode_name, mode in HEURISTIC_MODES:
            try:
                heuristics = self.create(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)
                graph.set(heuristics, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH,
                          CUDNN_TYPE_BACKEND_DESCRIPTOR, [operation_graph])
                graph.set(heuristics, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, [mode])
                graph.finalize(heuristics)
                configs = graph.get_descriptors(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                CUDNN_BACKEND_ENGINECFG_DESCRIPTOR,
                                                MAX_ENGINE_CONFIGS)
            except BackendError as error:
                refusals.append(f"mode {mode_name}: {error}")
                continue
            self.made.extend(configs)
            if not configs:
                refusals.append(f"mode {mode_name}: no engine")
                continue
            yield mode_name, configs


def finalized_plan(graph, handle, config):
    """(execution plan, its workspace bytes) of an engine configuration on a cuDNN handle;
    BackendError (the plan destroyed) where cuDNN refuses it or it needs more workspace than
    WORKSPACE_LIMIT."""
    plan = graph.create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)
    try:
        graph.set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, [handle])
        graph.set(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                  [config])
        graph.finalize(plan)
        workspace = graph.get_int64(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)
        if workspace > WORKSPACE_LIMIT:
            raise BackendError(f"workspace of {workspace} bytes")
    except BackendError:
        graph.destroy(plan)
        raise
    return plan, workspace


def run_plan(graph, handle, plan, uids, pointers, workspace):
    """Execute an ExecutionPlan with the tensors of unique ids `uids` at device `pointers`
    (ints; workspace may be None), on the handle's stream. Host-side work only (a variant pack
    made once per set of pointers, at most MAX_VARIANT_PACKS per plan), so it can be captured
    into a CUDA graph."""
    key = (*pointers, workspace)
    pack = plan.variant_packs.get(key)
    if pack is None:
        if len(plan.variant_packs) >= MAX_VARIANT_PACKS:
            graph.destroy(*plan.variant_packs.values())
            plan.variant_packs.clear()
        pack = graph.create(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)
        try:
            graph.set(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, list(uids))
            graph.set(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                      list(pointers))
            graph.set(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, [workspace])
            graph.finalize(pack)
        except BackendError:
            graph.destroy(pack)
            raise
        plan.variant_packs[key] = pack
    graph.execute(handle, plan.plan, pack)
    plan.ran = True


class FusedConvolutions:
    """The fused plans of one cuDNN handle, per shape: plan() finds or makes them (None: that
    shape runs unfused), execute() runs one."""

    def __init__(self, graph, handle, store=None, context=None):
        self.graph, self.handle = graph, handle
        # plans on disk (None: none), and what each entry's identity holds besides its shape
        # (the versions and the GPU: fusions())
        self.store, self.context = store, dict(context or {})
        self.origins = {}   # key -> COMPILED, LOADED or REFUSAL_READ
        self.plans = {}     # key -> FusedPlan, or None where cuDNN refused the graph
        self.refusals = {}  # key -> why (the BackendError's message), for diagnosis
        self.timings = {}   # key -> (fused, unfused) ms per run, measured on the first run
        # key -> seconds spent making (compiling or loading) its plan or being refused
        # (runtime-fusion engines compile their kernel with NVRTC when their plan is finalized)
        self.build_seconds = {}
        self.nvrtc_missing = None  # why NVRTC did not load (fusions()), if it did not
        self.nvrtc_said = False
        self.retired = []  # refused plans that ran, kept alive (refuse)
        self.bias_types = {}  # storage type -> the bias type its last plan took

    @staticmethod
    def key(x_shape, w_shape, stride, padding, groups, dilation, dtype, activation):
        stride = stride if isinstance(stride, int) else tuple(int(v) for v in stride)
        return (tuple(int(n) for n in x_shape), tuple(int(n) for n in w_shape), stride,
                int(padding), int(groups), int(dilation), np.dtype(dtype), activation)

    def plan(self, x_shape, w_shape, stride, padding, groups, dilation, dtype, activation,
             build=True):
        """The FusedPlan of a shape; None where it runs unfused: an activation not in
        ACTIVATION_STEPS, a graph cuDNN refused (remembered), or, with build=False (while a
        CUDA graph is being recorded, when nothing may be made), one not made yet."""
        if activation not in ACTIVATION_STEPS or np.dtype(dtype) not in DATA_TYPES:
            return None
        key = self.key(x_shape, w_shape, stride, padding, groups, dilation, dtype, activation)
        if key not in self.plans and build:
            self.plans[key] = None
            started = time.perf_counter()
            # The bias in float32 (as add_bias_ adds it), else in the storage type; first the
            # one that made the last plan of this type (a refusal can cost a compilation).
            order = [np.dtype(np.float32), np.dtype(dtype)]
            if self.bias_types.get(np.dtype(dtype)) == order[1]:
                order.reverse()
            order = list(dict.fromkeys(order))  # one try where the two are one type
            if not self.from_disk(key, order):
                self.compile(key, order)
            self.build_seconds[key] = time.perf_counter() - started
        return self.plans.get(key)

    def compile(self, key, order):
        """Build `key`'s plan with each bias type of `order` in turn (build), kept on disk; or
        its refusal, also kept on disk unless NVRTC's absence may have caused it."""
        reasons = []
        dtype = key[6]
        for bias_dtype in order:
            try:
                self.plans[key] = self.build(key, bias_dtype)
                self.bias_types[dtype] = bias_dtype
                break
            except BackendError as error:
                reasons.append(str(error))
        self.origins[key] = COMPILED
        if self.plans[key] is not None:
            self.save(self.plans[key])
            return
        self.refusals[key] = "; ".join(reasons)
        if not self.nvrtc_missing:
            self.save_refusal(key)
            return
        self.refusals[key] += (f"; NVRTC, which cuDNN compiles fused kernels with, "
                               f"did not load: {self.nvrtc_missing}")
        if not self.nvrtc_said:  # once: the cause is likely the same for all
            print(f"cuDNN refused a fused convolution: {self.refusals[key]}", file=sys.stderr)
            self.nvrtc_said = True

    # ---- plans on disk --------------------------------------------------------------------------
    def identity(self, key, bias_dtype):
        """What names `key`'s entry on disk: its plan with a bias of `bias_dtype`, or (None)
        its refusal."""
        x_shape, w_shape, stride, padding, groups, dilation, dtype, activation = key
        return {**self.context, "graph": GRAPH_FORMAT,
                "steps": repr((ACTIVATION_STEPS[activation], RELU_SETTINGS, ALIGNMENT)),
                "x": list(x_shape), "w": list(w_shape),
                "stride": stride if isinstance(stride, int) else list(stride),
                "padding": padding, "groups": groups, "dilation": dilation, "dtype": dtype.name,
                "activation": activation,
                "entry": "refusal" if bias_dtype is None else "plan",
                "bias": None if bias_dtype is None else np.dtype(bias_dtype).name}

    def from_disk(self, key, order):
        """Whether `key`'s refusal or plan (bias types in `order`) was on disk, now in
        self.refusals or self.plans. An entry that does not load (damaged, stale: a finalize
        error, too much workspace) is removed: the plan is then compiled and written again."""
        if self.store is None:
            return False
        refusal = self.store.read(self.identity(key, None))
        if refusal is not None and isinstance(refusal.get("refused"), str):
            self.refusals[key] = refusal["refused"]
            self.origins[key] = REFUSAL_READ
            return True
        for bias_dtype in order:
            identity = self.identity(key, bias_dtype)
            record = self.store.read(identity)
            if record is None:
                continue
            try:
                self.plans[key] = self.load(key, bias_dtype, str(record["plan"]))
            except (BackendError, KeyError):
                self.store.remove(identity)
                continue
            self.bias_types[key[6]] = bias_dtype
            self.origins[key] = LOADED
            return True
        return False

    def load(self, key, bias_dtype, text):
        """A FusedPlan from a plan's JSON: an execution plan made from it alone (its handle
        set, finalized: no graph, heuristics or compilation); the tensors' unique ids are
        X_UID..Y_UID as build gives them, y's shape comes from the key. BackendError where
        cuDNN refuses it or its workspace exceeds WORKSPACE_LIMIT (descriptor destroyed)."""
        x_shape, w_shape, stride, padding, _, dilation, _, _ = key
        plan = self.graph.create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)
        try:  # in the order of cuDNN's frontend (loadFromJson)
            self.graph.set_text(plan, CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION, text)
            self.graph.set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE,
                           [self.handle])
            self.graph.finalize(plan)
            workspace = self.graph.get_int64(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)
            if workspace > WORKSPACE_LIMIT:
                raise BackendError(f"workspace of {workspace} bytes")
        except BackendError:
            self.graph.destroy(plan)
            raise
        return FusedPlan(key, output_shape(x_shape, w_shape, stride, padding, dilation), plan,
                         workspace, [], bias_dtype)

    def save(self, plan):
        """Keep a compiled plan's JSON on disk; nothing where cuDNN does not serialise it."""
        if self.store is None:
            return
        try:
            text = self.graph.get_text(plan.plan, CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION)
        except (BackendError, UnicodeDecodeError):
            return
        if text:
            self.store.write(self.identity(plan.key, plan.bias_dtype), {"plan": text})

    def save_refusal(self, key):
        if self.store is not None:
            self.store.write(self.identity(key, None), {"refused": self.refusals[key]})

    def summary(self):
        """What happened to each shape, in words: how many run fused, and per shape that does
        not, why (cuDNN's refusal, or the timings), and whether its plan (or refusal) was
        compiled here or read from disk, in how long; e.g. for a benchmark's log."""
        fused = [key for key, plan in self.plans.items() if plan is not None]
        seconds = sum(self.build_seconds.values())
        origins = list(self.origins.values())
        counts = ", ".join(f"{origins.count(origin)} {origin}" for origin in ORIGINS
                           if origin in origins)
        disk = (f"plans on disk in {self.store.folder}" if self.store is not None
                else "no plans on disk")
        lines = [f"fused convolutions: {len(fused)} of {len(self.plans)} shapes; plans made "
                 + f"in {seconds:.1f} s ({counts or 'none'}; {disk})"]
        for key, plan in self.plans.items():
            x_shape, w_shape, stride, padding, groups, dilation, dtype, activation = key
            shape = (f"x {x_shape} w {w_shape} stride {stride} pad {padding} groups {groups} "
                     f"dilation {dilation} {dtype} {activation}")
            timing = self.timings.get(key)
            timed = f"; fused {timing[0]:.4f} ms, unfused {timing[1]:.4f} ms" if timing else ""
            what = "fused" if plan is not None else f"unfused: {self.refusals.get(key)}"
            made_in = (f" ({self.origins.get(key, 'made')} in {self.build_seconds[key]:.3f} s)"
                       if key in self.build_seconds else "")
            lines.append(f"  {shape}: {what}{timed}{made_in}")
        return "\n".join(lines)

    def refuse(self, plan, reason):
        """A plan that failed (or lost its timing): its shape runs unfused from now on, and in
        later processes (the refusal is kept on disk). One that ran is kept alive, never
        destroyed: a CUDA graph recorded with it may still launch the kernels its execution
        plan loaded."""
        self.plans[plan.key] = None
        self.refusals[plan.key] = reason
        self.save_refusal(plan.key)  # the next process runs this shape unfused at once
        if plan.ran:
            self.retired.append(plan)
        else:
            self.release(plan)

    def release(self, plan):
        plan.release(self.graph)

    # ---- building -------------------------------------------------------------------------------
    def build(self, key, bias_dtype):
        """The operation graph of `key` (conv -> add bias -> activation), cuDNN's heuristics
        for it, and the first engine configuration that finalizes into an execution plan within
        WORKSPACE_LIMIT; BackendError where none does (every descriptor made destroyed)."""
        made = []  # every descriptor, in order, destroyed on failure
        try:
            y_shape, operations = self.operations(key, bias_dtype, made)
            plan, workspace = self.execution_plan(operations, made)
        except BackendError:
            self.graph.destroy(*reversed(made))
            raise
        return FusedPlan(key, y_shape, plan, workspace, made, bias_dtype)

    def operations(self, key, bias_dtype, made):
        """(y's shape, the finalized operations of `key`'s graph: the convolution, the bias
        add, the activation's steps); every descriptor made is appended to `made`."""
        x_shape, w_shape, stride, padding, groups, dilation, dtype, activation = key
        data_type = DATA_TYPES[dtype]
        y_shape = output_shape(x_shape, w_shape, stride, padding, dilation)
        if min(y_shape) <= 0 or x_shape[1] != w_shape[1] * groups:
            raise BackendError(f"fused convolution: {x_shape} and {w_shape} in {groups} groups "
                               f"give {y_shape}")
        graph = self.graph
        builder = GraphBuilder(graph, made)
        tensor, create = builder.tensor, builder.create

        def pointwise(mode, parameters, inputs, output):
            settings = create(CUDNN_BACKEND_POINTWISE_DESCRIPTOR)
            graph.set(settings, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, [mode])
            graph.set(settings, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE,
                      [CUDNN_DATA_FLOAT])
            if mode == CUDNN_POINTWISE_RELU_FWD:
                for attribute, kind, value in RELU_SETTINGS:
                    graph.set(settings, attribute, kind, [value])
            for attribute, value in parameters.items():
                graph.set(settings, attribute, CUDNN_TYPE_DOUBLE, [float(value)])
            graph.finalize(settings)
            operation = create(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)
            graph.set(operation, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR,
                      CUDNN_TYPE_BACKEND_DESCRIPTOR, [settings])
            graph.set(operation, CUDNN_ATTR_OPERATION_POINTWISE_XDESC,
                      CUDNN_TYPE_BACKEND_DESCRIPTOR, [inputs[0]])
            if len(inputs) > 1:
                graph.set(operation, CUDNN_ATTR_OPERATION_POINTWISE_BDESC,
                          CUDNN_TYPE_BACKEND_DESCRIPTOR, [inputs[1]])
            graph.set(operation, CUDNN_ATTR_OPERATION_POINTWISE_YDESC,
                      CUDNN_TYPE_BACKEND_DESCRIPTOR, [output])
            graph.finalize(operation)
            return operation

        y_strides = nhwc_strides(y_shape)
        x = tensor(x_shape, nhwc_strides(x_shape), data_type, X_UID)
        w = tensor(w_shape, nhwc_strides(w_shape), data_type, W_UID)  # KRSC
        channels = y_shape[1]
        bias = tensor((1, channels, 1, 1), [channels, 1, channels, channels],
                      DATA_TYPES[bias_dtype], BIAS_UID)
        y = tensor(y_shape, y_strides, data_type, Y_UID)
        # intermediates in the compute type (float), never in memory
        convolved = tensor(y_shape, y_strides, CUDNN_DATA_FLOAT)
        steps = ACTIVATION_STEPS[activation]
        z = tensor(y_shape, y_strides, CUDNN_DATA_FLOAT) if steps else y
        forward = builder.convolution("forward", x, w, convolved, stride, padding, dilation)

        operations = [forward, pointwise(CUDNN_POINTWISE_ADD, {}, (convolved, bias), z)]
        tensors = {"z": z}
        for name, mode, parameters, inputs in steps:
            tensors[name] = y if name == "y" else tensor(y_shape, y_strides, CUDNN_DATA_FLOAT)
            operations.append(pointwise(mode, parameters, [tensors[i] for i in inputs],
                                        tensors[name]))
        return y_shape, operations

    def execution_plan(self, operations, made):
        """(execution plan, its workspace bytes) for a graph of finalized `operations`: the
        first of cuDNN's heuristics' engine configurations (HEURISTIC_MODES in turn) that
        finalizes within WORKSPACE_LIMIT; BackendError where none does."""
        builder = GraphBuilder(self.graph, made)
        operation_graph = builder.operation_graph(self.handle, operations)
        refusals = []
        for mode_name, configs in builder.heuristic_configs(operation_graph, refusals):
            refused = []
            for config in configs:  # the heuristics' order: the first that finalizes
                try:
                    return finalized_plan(self.graph, self.handle, config)
                except BackendError as error:
                    refused.append(str(error))
            refusals.append(f"mode {mode_name}: none of {len(configs)} engine configurations "
                            f"finalized (the first: {refused[0]})")
        raise BackendError(f"fused convolution: {'; '.join(refusals)}")

    # ---- running --------------------------------------------------------------------------------
    def execute(self, plan, x, weights, bias, y, workspace):
        """Run `plan` on device pointers (ints; workspace may be None): y = act(conv(x, weights)
        + bias), issued as run_plan does (it can be captured into a CUDA graph)."""
        run_plan(self.graph, self.handle, plan, (X_UID, W_UID, BIAS_UID, Y_UID),
                 (x, weights, bias, y), workspace)


def engine_refusal(notes, behaviours, exact, filter_size, training=False):
    """Why an engine of these numerical and behaviour notes may not run an eager convolution
    (`exact`: in exact float32; filters of `filter_size`; `training`: a training pass, which
    must be deterministic and sum in float), or None. Engines compiled at run time are left out in every
    precision: NVRTC takes 0.05-0.75 s per plan, more than the host time they could save over
    a process, and nothing keeps these plans on disk."""
    if CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION in behaviours:
        return "compiled at run time"
    refused = set(EXACT_REFUSED_NOTES) if exact else set()
    if exact and filter_size > WINOGRAD_EXACT_MAX_SIZE:
        refused.update(WINOGRAD_NOTES)
    if training:
        refused.update((CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC,
                        CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION))
    named = [NOTE_NAMES.get(note, str(note)) for note in notes if note in refused]
    return f"numerical note {', '.join(named)}" if named else None


# The uses of plain convolution graphs (convolution_graphs): (direction, training). Eager
# inference forwards; in eager training steps the forward, the backward data and the backward
# filter, deterministic engines only.
GRAPH_USES = {"inference": ("forward", False), "forward": ("forward", True),
              "data": ("data", True), "filter": ("filter", True)}
# How ConvolutionGraphs.summary names each use.
USE_NAMES = {"inference": "eager convolution graphs",
             "forward": "eager training forward graphs",
             "data": "eager backward-data graphs", "filter": "eager backward-filter graphs"}


class ConvolutionGraphs:
    """Plain convolution graphs of one cuDNN handle and one use (GRAPH_USES: x, w -> y with
    no bias or activation; or a backward pass of it), per shape, for eager calls:
    cudnnBackendExecute of a finalized plan costs the host about 10 us where the legacy
    cudnnConvolutionForward costs 53-102 us (small shapes, cuDNN 9, H200). candidates() makes
    a shape's plans (none where cuDNN refuses: remembered), execute() runs one, keep() leaves
    the one the backend chose (or none)."""

    def __init__(self, graph, handle, exact=True, use="inference"):
        self.graph, self.handle = graph, handle
        self.exact = exact  # exact float32: engines of EXACT_REFUSED_NOTES left out
        self.use = use
        # the operation, and whether engines must be deterministic (training)
        self.direction, self.training = GRAPH_USES[use]
        self.plans = {}     # key -> [ExecutionPlan]: the candidates, after keep() the chosen
        self.shared = {}    # key -> the descriptors its plans share (tensors, graph, configs)
        self.refusals = {}  # key -> why it has no plan, for diagnosis
        # key -> (the legacy eager call's seconds, [each candidate's seconds or why not]),
        # per call, by the host's clock (CudaBackend._time_eager_graphs)
        self.timings = {}

    def candidates(self, key):
        """The candidate ExecutionPlans of a ConvPlan key (x shape, w shape, stride, padding,
        groups, dilation, dtype, channels_last): [] where cuDNN refused the graph or every
        engine (self.refusals says why), made once."""
        if key not in self.plans:
            made = []
            try:
                self.plans[key] = self.build(key, made)
                self.shared[key] = made
            except BackendError as error:
                self.graph.destroy(*reversed(made))
                self.plans[key] = []
                self.refusals[key] = str(error)
        return self.plans[key]

    def build(self, key, made):
        """Up to EAGER_CANDIDATES plans of `key`'s graph (this use's operation): x, the filters
        and y (or their gradients) stored as the legacy descriptors have them (NCHW and KCRS,
        or channels_last: NHWC and KRSC), cuDNN's heuristics (HEURISTIC_MODES, the next mode
        only where one gave no plan), the engines engine_refusal takes, finalized within
        WORKSPACE_LIMIT; BackendError where none is."""
        x_shape, w_shape, stride, padding, groups, dilation, dtype, channels_last = key
        y_shape = output_shape(x_shape, w_shape, stride, padding, dilation)
        if min(y_shape) <= 0 or x_shape[1] != w_shape[1] * groups:
            raise BackendError(f"convolution graph: {x_shape} and {w_shape} in {groups} groups "
                               f"give {y_shape}")
        data_type = DATA_TYPES[np.dtype(dtype)]
        strides = nhwc_strides if channels_last else nchw_strides
        builder = GraphBuilder(self.graph, made)
        x = builder.tensor(x_shape, strides(x_shape), data_type, X_UID)
        w = builder.tensor(w_shape, strides(w_shape), data_type, W_UID)
        y = builder.tensor(y_shape, strides(y_shape), data_type, Y_UID)
        operation = builder.convolution(self.direction, x, w, y, stride, padding, dilation)
        operation_graph = builder.operation_graph(self.handle, [operation])
        refusals, plans = [], []
        for mode_name, configs in builder.heuristic_configs(operation_graph, refusals):
            left_out = []
            for config in configs:
                if len(plans) == EAGER_CANDIDATES:
                    break
                try:
                    why = self.engine_refusal(config, max(w_shape[2:]))
                    if why is None:
                        plan, workspace = finalized_plan(self.graph, self.handle, config)
                        plans.append(ExecutionPlan(key, y_shape, plan, workspace, []))
                        continue
                except BackendError as error:
                    why = str(error)
                left_out.append(why)
            if plans:
                break
            refusals.append(f"mode {mode_name}: none of {len(configs)} engine configurations "
                            f"taken (the first: {left_out[0]})")
        if not plans:
            raise BackendError(f"convolution graph: {'; '.join(refusals)}")
        return plans

    def engine_refusal(self, config, filter_size):
        """engine_refusal for an engine configuration's engine, its notes read from cuDNN."""
        engine = self.graph.get_descriptor(config, CUDNN_ATTR_ENGINECFG_ENGINE,
                                           CUDNN_BACKEND_ENGINE_DESCRIPTOR)
        try:
            notes = self.graph.get_ints(engine, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                                        CUDNN_TYPE_NUMERICAL_NOTE, NUMERICAL_NOTES_LIMIT)
            behaviours = self.graph.get_ints(engine, CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
                                             CUDNN_TYPE_BEHAVIOR_NOTE, BEHAVIOUR_NOTES_LIMIT)
        finally:
            self.graph.destroy(engine)
        return engine_refusal(notes, behaviours, self.exact, filter_size, self.training)

    def execute(self, plan, x, weights, y, workspace):
        """Run `plan` on device pointers (ints; workspace may be None) of the forward's x,
        weights and y, or in the backward passes their gradients: y = conv(x, weights);
        x = dx from weights and y = dy ("data"); weights += dw from x and y = dy ("filter")."""
        run_plan(self.graph, self.handle, plan, (X_UID, W_UID, Y_UID), (x, weights, y),
                 workspace)

    def keep(self, key, chosen):
        """Of `key`'s candidates, keep `chosen` (None: none) and destroy the others (eager
        plans only: no recording holds them; the backend has synchronised after running
        them)."""
        for plan in self.plans.get(key, []):
            if plan is not chosen:
                plan.release(self.graph)
        self.plans[key] = [chosen] if chosen is not None else []
        if chosen is None:
            self.graph.destroy(*reversed(self.shared.pop(key, [])))

    def summary(self):
        """Each shape's outcome in words (e.g. for a benchmark's log): how many run a plan;
        per shape, the timings (us per call) or why it has no plan."""
        kept = sum(bool(plans) for plans in self.plans.values())
        lines = [f"{USE_NAMES[self.use]}: {kept} of {len(self.plans)} shapes run a plan"]
        for key, plans in self.plans.items():
            x_shape, w_shape, stride, padding, groups, dilation, dtype, channels_last = key
            shape = (f"x {x_shape} w {w_shape} stride {stride} pad {padding} groups {groups} "
                     f"dilation {dilation} {dtype}{' NHWC' if channels_last else ''}")
            timing = self.timings.get(key)
            if timing is None:
                what = f"legacy: {self.refusals[key]}" if key in self.refusals else "not timed"
            else:
                legacy, verdicts = timing
                each = ", ".join(f"{v * 1e6:.1f}" if isinstance(v, float) else v
                                 for v in verdicts)
                what = (f"{'plan' if plans else 'legacy'}; legacy {legacy * 1e6:.1f} us, "
                        f"plans {each} us")
            lines.append(f"  {shape}: {what}")
        return "\n".join(lines)


# (id of a cudnn.Cudnn runtime, use) -> (it, its ConvolutionGraphs or None)
_CONVOLUTION_GRAPHS = {}


def convolution_graphs(dnn, use="inference"):
    """The ConvolutionGraphs of a cudnn.Cudnn runtime for one of GRAPH_USES (one per handle
    and use, made once); None where cuDNN 9's backend API does not load (eager calls then stay
    with the legacy API)."""
    entry = _CONVOLUTION_GRAPHS.get((id(dnn), use))
    if entry is None or entry[0] is not dnn:
        try:
            made = ConvolutionGraphs(CudnnGraph.load(), dnn.handle,
                                     exact=dnn.math_type == CUDNN_FMA_MATH, use=use)
        except BackendError:
            made = None
        entry = _CONVOLUTION_GRAPHS[(id(dnn), use)] = (dnn, made)
    return entry[1]


def setting(variable, choices, default):
    """An environment variable's value among `choices` ({text: value}); BackendError naming
    the choices for any other."""
    value = os.environ.get(variable, default)
    if value not in choices:
        raise BackendError(f"{variable}={value}: expected one of {', '.join(choices)}")
    return choices[value]


# CudaBackend's default for `fused` (the backend's argument wins): 1 (fused where cuDNN can and
# it measures faster; also when unset), 0 (never: an A/B without changing code), always.
FUSED_VARIABLE = "ENGINE_FUSED_CONVOLUTIONS"
FUSED_SETTINGS = {"1": True, "0": False, "always": "always"}
# Whether eager convolutions (inference, and training's forward, backward data and backward
# filter) may run graph plans (ConvolutionGraphs): 1 (where one agreed and timed faster; also
# when unset), 0 (never: the legacy calls only, an A/B).
EAGER_GRAPHS_VARIABLE = "ENGINE_EAGER_GRAPHS"
EAGER_GRAPHS_SETTINGS = {"1": True, "0": False}


def default_fused():
    return setting(FUSED_VARIABLE, FUSED_SETTINGS, "1")


def default_eager_graphs():
    return setting(EAGER_GRAPHS_VARIABLE, EAGER_GRAPHS_SETTINGS, "1")


def aligned(*pointers):
    """Whether every device pointer is ALIGNMENT-aligned, as the plans' tensors declare (on
    every eager convolution: their bits or'ed, no generator)."""
    combined = 0
    for pointer in pointers:
        combined |= pointer
    return combined % ALIGNMENT == 0


def disk_context(graph, device):
    """What every plan on disk depends on besides its shape: cuDNN's version and its CUDA's,
    the GPU's model and compute capability (`device`: a device.Device)."""
    return {"cudnn": graph.version(), "cudart": int(graph.lib.cudnnGetCudartVersion()),
            "gpu": device.name, "capability": list(device.handle.compute_capability())}


_FUSIONS = {}  # id of a cudnn.Cudnn runtime -> (it, its FusedConvolutions)


def fusions(dnn, device=None):
    """The FusedConvolutions of a cudnn.Cudnn runtime (one per handle, made once), so that,
    as with the legacy plans, a shape's plan is made once per process and GPU, and, given the
    handle's `device` (device.Device), once per GPU model and cuDNN version on this machine:
    plans are kept on disk (plan_cache; not where `device` is None or the disk cache is off).
    The NVRTC of cuDNN's CUDA major, which it compiles its fused kernels with, is loaded here
    (libcudnn's dlopen of its soname then finds it); where it is not found, the first refusal
    says so."""
    entry = _FUSIONS.get(id(dnn))
    if entry is None or entry[0] is not dnn:
        graph = CudnnGraph.load()
        store = None if device is None else RecordStore.default(PLANS_FOLDER)
        made = FusedConvolutions(graph, dnn.handle, store,
                                 disk_context(graph, device) if store else None)
        try:
            load(nvrtc(int(graph.lib.cudnnGetCudartVersion()) // 1000))
        except BackendError as error:
            made.nvrtc_missing = str(error)
        entry = _FUSIONS[id(dnn)] = (dnn, made)
    return entry[1]
