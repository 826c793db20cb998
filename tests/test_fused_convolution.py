"""Convolution, bias and activation fused by cuDNN's graph API (engine/backends/cuda/
cudnn_graph.py, CudaBackend.conv_bias_forward).

Without a GPU: the graph built for each activation, recorded by a stand-in for libcudnn's
backend API and then evaluated in float64 by an interpreter of cuDNN's documented semantics
(tensor strides, convolution attributes, pointwise modes), against a plain numpy convolution
and Darknet's activations; every refusal (no engine, a finalize error, a first run that fails)
leading to the unfused path and remembered per shape; the backend's choice of path on fake
arrays. Where libcudnn.so.9 and its sub-libraries load (no GPU needed): the descriptors of each
graph finalize in the real cuDNN. On the GPU: fused against unfused, per operation and on whole
networks, in fp16 and bf16."""

import ctypes
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine import Network, activations
from engine.backends.cuda import backend as cuda_backend
from engine.backends.cuda import cudnn_graph as cg
from engine.backends.cuda import plan_cache
from engine.backends.cuda.cudnn import (
    CUDNN_DATA_BFLOAT16,
    CUDNN_DATA_FLOAT,
    CUDNN_DATA_HALF,
)
from engine.constants import LEAKY_SLOPE
from engine.errors import BackendError
from engine.precision import REDUCED

from test_recorded_steps import ClockEvent, FakeArray, FakeDevice, FakeKernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSED = 3000  # CUDNN_STATUS_NOT_SUPPORTED


# ---- a stand-in for the backend API --------------------------------------------------------------
class Descriptor:
    def __init__(self, kind):
        self.kind, self.attributes, self.finalized, self.destroyed = kind, {}, False, False

    def value(self, attribute):
        return self.attributes[attribute][1]


class FakeGraphLibrary:
    """libcudnn's backend API as far as cudnn_graph calls it: descriptors keep their attributes,
    every call is recorded; `engines` configurations come out of the heuristics, those at
    `refused_configs` fail to finalize, and `refuse(descriptor)` may fail any other finalize.
    A finalized plan's JSON (CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION, unless `serializes`
    is False) names its engine configuration's rank and its graph's tensors; a plan given such
    a JSON (and a handle) instead of an engine configuration finalizes from it alone."""

    def __init__(self, engines=2, refused_configs=(), workspace=0, refuse=None, version=92800,
                 serializes=True):
        self.descriptors, self.calls = {}, []
        self.addresses = itertools.count(0x10000, 0x100)
        self.engines, self.refused_configs, self.workspace = engines, refused_configs, workspace
        self.refuse = refuse or (lambda library, descriptor: 0)
        self.configs = []  # engine configurations handed out, in the heuristics' order
        self.execute_status = 0
        self.version, self.serializes = version, serializes

    def __getitem__(self, address):
        return self.descriptors[address]

    def cudnnBackendCreateDescriptor(self, kind, pointer):
        address = next(self.addresses)
        pointer._obj.value = address
        self.descriptors[address] = Descriptor(kind)
        self.calls.append(("create", kind, address))
        return 0

    def cudnnBackendSetAttribute(self, descriptor, attribute, kind, count, array):
        record = self.descriptors[descriptor.value]
        assert not record.finalized and not record.destroyed
        assert count == len(array)
        if kind == cg.CUDNN_TYPE_CHAR:  # text: counted with its terminating NUL
            assert array.raw[count - 1:] == b"\0" and b"\0" not in array.raw[:count - 1]
            record.attributes[attribute] = (kind, array.raw[:count - 1].decode())
        else:
            record.attributes[attribute] = (kind, list(array))
        self.calls.append(("set", descriptor.value, attribute))
        return 0

    def cudnnBackendFinalize(self, descriptor):
        record = self.descriptors[descriptor.value]
        self.calls.append(("finalize", descriptor.value))
        if cg.CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION in record.attributes:
            assert cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG not in record.attributes
            assert record.value(cg.CUDNN_ATTR_EXECUTION_PLAN_HANDLE)
            try:  # what cuDNN checks, as far as a stand-in can
                loaded = json.loads(record.value(cg.CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION))
                assert loaded["fake plan"] == "v1"
            except (ValueError, KeyError, TypeError, AssertionError):
                return REFUSED
        elif record.kind == cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR:
            config = record.value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]
            if self.descriptors[config].rank in self.refused_configs:
                return REFUSED
        status = self.refuse(self, record)
        if not status:
            record.finalized = True
        return status

    def cudnnBackendGetAttribute(self, descriptor, attribute, kind, requested, count, array):
        record = self.descriptors[descriptor.value]
        assert record.finalized
        self.calls.append(("get", descriptor.value, attribute))
        if attribute == cg.CUDNN_ATTR_ENGINEHEUR_RESULTS:
            assert kind == cg.CUDNN_TYPE_BACKEND_DESCRIPTOR
            if array is None:
                count._obj.value = self.engines
                return 0
            count._obj.value = min(requested, self.engines)
            for rank, address in enumerate(array[:count._obj.value]):
                config = self.descriptors[address]
                config.rank = rank  # in this heuristics' list
                assert config.kind == cg.CUDNN_BACKEND_ENGINECFG_DESCRIPTOR
                config.graph = record.value(cg.CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH)[0]
                config.finalized = True
                self.configs.append(address)
            return 0
        if attribute == cg.CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION:
            assert kind == cg.CUDNN_TYPE_CHAR
            if not self.serializes:
                return REFUSED
            text = self.plan_json(record).encode() + b"\0"
            count._obj.value = len(text)  # the NUL counted, as cudnn_graph.h says
            if array is not None:
                assert requested == len(text) and len(array) >= requested
                ctypes.memmove(array, text, requested)
            return 0
        assert attribute == cg.CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE and requested == 1
        count._obj.value = 1
        array._obj.value = self.workspace
        return 0

    def cudnnBackendDestroyDescriptor(self, descriptor):
        record = self.descriptors[descriptor.value]
        assert not record.destroyed, "destroyed twice"
        record.destroyed = True
        self.calls.append(("destroy", descriptor.value))
        return 0

    def cudnnBackendExecute(self, handle, plan, pack):
        self.calls.append(("execute", handle, plan.value, pack.value))
        return self.execute_status

    def cudnnGetErrorString(self, status):
        return b"CUDNN_STATUS_FAKE"

    def cudnnGetVersion(self):
        return self.version

    def plan_json(self, plan):
        """A finalized plan's serialised form: one it was loaded from, else its engine's rank
        and its graph's tensors in memory (unique id: dimensions)."""
        if cg.CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION in plan.attributes:
            return plan.value(cg.CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION)
        config = self[plan.value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]]
        tensors = {}
        for operation in self[config.graph].value(cg.CUDNN_ATTR_OPERATIONGRAPH_OPS):
            for kind, values in self[operation].attributes.values():
                for address in values if kind == cg.CUDNN_TYPE_BACKEND_DESCRIPTOR else ():
                    tensor = self[address]
                    if (tensor.kind == cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR
                            and not tensor.attributes.get(cg.CUDNN_ATTR_TENSOR_IS_VIRTUAL,
                                                          (0, [False]))[1][0]):
                        tensors[tensor.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID)[0]] = \
                            tensor.value(cg.CUDNN_ATTR_TENSOR_DIMENSIONS)
        return json.dumps({"fake plan": "v1", "engine": config.rank,
                           "tensors": {str(uid): tensors[uid] for uid in sorted(tensors)}})

    # what the calls built
    def kinds_created(self):
        return [kind for call, kind, *_ in self.calls if call == "create"]

    def alive(self):
        return [a for a, d in self.descriptors.items() if not d.destroyed]

    def operations(self, plan):
        config = self[self[plan].value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]]
        return [self[a] for a in self[config.graph].value(cg.CUDNN_ATTR_OPERATIONGRAPH_OPS)]


def fusions(library, handle=0xBEEF):
    return cg.FusedConvolutions(cg.CudnnGraph(library, declare=False), ctypes.c_void_p(handle))


# ---- cuDNN's semantics, from its documentation, in float64 ---------------------------------------
def convolution(x, w, stride_y, stride_x, pad, dilation, groups):
    """Cross-correlation of x (N, C, H, W) with w (F, C/groups, kh, kw), zero padding."""
    n, _, h, width = x.shape
    f, cg_, kh, kw = w.shape
    oh = (h + 2 * pad - dilation * (kh - 1) - 1) // stride_y + 1
    ow = (width + 2 * pad - dilation * (kw - 1) - 1) // stride_x + 1
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    y = np.zeros((n, f, oh, ow))
    for k in range(f):
        g = k // (f // groups)
        for r in range(kh):
            for s in range(kw):
                patch = padded[:, g * cg_:(g + 1) * cg_,
                               r * dilation:r * dilation + stride_y * (oh - 1) + 1:stride_y,
                               s * dilation:s * dilation + stride_x * (ow - 1) + 1:stride_x]
                y[:, k] += np.einsum("nchw,c->nhw", patch, w[k, :, r, s])
    return y


def pointwise(mode, attributes, a, b=None):
    """cuDNN's pointwise modes as its documentation (cudnn_graph.h) defines them."""
    def parameter(attribute, default):
        return attributes[attribute][1][0] if attribute in attributes else default

    if mode == cg.CUDNN_POINTWISE_ADD:
        return a + b
    if mode == cg.CUDNN_POINTWISE_MUL:
        return a * b
    if mode == cg.CUDNN_POINTWISE_RELU_FWD:  # below the lower clip: its slope; above: clipped
        lower = parameter(cg.CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP, 0.0)
        upper = parameter(cg.CUDNN_ATTR_POINTWISE_RELU_UPPER_CLIP, np.inf)
        slope = parameter(cg.CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE, 0.0)
        return np.minimum(np.where(a < lower, lower + slope * (a - lower), a), upper)
    if mode == cg.CUDNN_POINTWISE_SIGMOID_FWD:
        return 1 / (1 + np.exp(-a))
    if mode == cg.CUDNN_POINTWISE_SWISH_FWD:
        return a / (1 + np.exp(-parameter(cg.CUDNN_ATTR_POINTWISE_SWISH_BETA, 1.0) * a))
    if mode == cg.CUDNN_POINTWISE_SOFTPLUS_FWD:
        beta = parameter(cg.CUDNN_ATTR_POINTWISE_SOFTPLUS_BETA, 1.0)
        return np.log1p(np.exp(beta * a)) / beta
    if mode == cg.CUDNN_POINTWISE_TANH_FWD:
        return np.tanh(a)
    raise AssertionError(f"pointwise mode {mode} not expected")


def strided(buffer, tensor):
    """The logical (NCHW-ordered) view of a flat buffer that a tensor descriptor describes."""
    dims = tensor.value(cg.CUDNN_ATTR_TENSOR_DIMENSIONS)
    strides = tensor.value(cg.CUDNN_ATTR_TENSOR_STRIDES)
    return np.lib.stride_tricks.as_strided(buffer, dims, [s * buffer.itemsize for s in strides])


def evaluate(library, plan, buffers):
    """Run a recorded plan's operations on flat float64 buffers by unique id (inputs read and
    outputs written through their descriptors' dimensions and strides)."""
    values = {}

    def read(address):
        tensor = library[address]
        if tensor.kind != cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR or not tensor.finalized:
            raise AssertionError("an operand that is not a finalized tensor")
        if address in values:
            return values[address]
        assert not tensor.attributes.get(cg.CUDNN_ATTR_TENSOR_IS_VIRTUAL, (0, [False]))[1][0]
        return strided(buffers[tensor.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID)[0]], tensor)

    for operation in library.operations(plan):
        assert operation.finalized
        if operation.kind == cg.CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR:
            def attribute(name, operation=operation):
                return operation.value(
                    getattr(cg, "CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_" + name))[0]

            assert attribute("ALPHA") == 1.0 and attribute("BETA") == 0.0
            conv = library[attribute("CONV_DESC")]
            setting = {name: conv.value(getattr(cg, "CUDNN_ATTR_CONVOLUTION_" + name))
                       for name in ("COMP_TYPE", "CONV_MODE", "SPATIAL_DIMS", "DILATIONS",
                                    "FILTER_STRIDES", "PRE_PADDINGS", "POST_PADDINGS")}
            assert setting["COMP_TYPE"] == [CUDNN_DATA_FLOAT]
            assert setting["CONV_MODE"] == [1]  # cross-correlation: Darknet does not flip
            assert setting["SPATIAL_DIMS"] == [2]
            assert setting["PRE_PADDINGS"] == setting["POST_PADDINGS"]
            assert len(set(setting["PRE_PADDINGS"])) == len(set(setting["DILATIONS"])) == 1
            x, w = read(attribute("X")), read(attribute("W"))
            groups = x.shape[1] // w.shape[1]
            y = convolution(x, w, *setting["FILTER_STRIDES"], setting["PRE_PADDINGS"][0],
                            setting["DILATIONS"][0], groups)
            output = attribute("Y")
        else:
            assert operation.kind == cg.CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR
            settings = library[operation.value(cg.CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR)[0]]
            assert settings.finalized
            assert settings.value(cg.CUDNN_ATTR_POINTWISE_MATH_PREC) == [CUDNN_DATA_FLOAT]
            a = read(operation.value(cg.CUDNN_ATTR_OPERATION_POINTWISE_XDESC)[0])
            b = (read(operation.value(cg.CUDNN_ATTR_OPERATION_POINTWISE_BDESC)[0])
                 if cg.CUDNN_ATTR_OPERATION_POINTWISE_BDESC in operation.attributes else None)
            y = pointwise(settings.value(cg.CUDNN_ATTR_POINTWISE_MODE)[0], settings.attributes,
                          a, b)
            output = operation.value(cg.CUDNN_ATTR_OPERATION_POINTWISE_YDESC)[0]
        tensor = library[output]
        if tensor.attributes.get(cg.CUDNN_ATTR_TENSOR_IS_VIRTUAL, (0, [False]))[1][0]:
            assert tensor.value(cg.CUDNN_ATTR_TENSOR_DATA_TYPE) == [CUDNN_DATA_FLOAT]
            values[output] = y
        else:
            strided(buffers[tensor.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID)[0]], tensor)[...] = y


def pointwise_modes(library, plan):
    """The pointwise operations of a plan's graph, in order, by mode name."""
    names = {v: k[len("CUDNN_POINTWISE_"):] for k, v in cg.ENUMS.items()
             if k.startswith("CUDNN_POINTWISE_")}
    modes = []
    for operation in library.operations(plan)[1:]:
        settings = library[operation.value(cg.CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR)[0]]
        modes.append(names[settings.value(cg.CUDNN_ATTR_POINTWISE_MODE)[0]])
    return modes


# (x shape, weights shape, stride, padding, groups, dilation): 3x3, 1x1 in two groups with
# stride 2, and 5 filters (not a multiple of 8) with strides (2, 1) and dilation 2.
SHAPES = [((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1),
          ((2, 8, 7, 6), (8, 4, 1, 1), 2, 0, 2, 1),
          ((1, 8, 9, 7), (5, 8, 3, 3), (2, 1), 2, 1, 2)]
# What each activation's graph is after the convolution, independently of ACTIVATION_STEPS.
EXPECTED_MODES = {"linear": ["ADD"], "relu": ["ADD", "RELU_FWD"], "leaky": ["ADD", "RELU_FWD"],
                  "logistic": ["ADD", "SIGMOID_FWD"], "swish": ["ADD", "SWISH_FWD"],
                  "mish": ["ADD", "SOFTPLUS_FWD", "TANH_FWD", "MUL"]}


def nhwc(array):
    return np.ascontiguousarray(np.moveaxis(array, 1, -1)).reshape(-1)


@pytest.mark.parametrize("activation", sorted(EXPECTED_MODES))
@pytest.mark.parametrize("dtype,data_type", [(np.float16, CUDNN_DATA_HALF),
                                             (np.uint16, CUDNN_DATA_BFLOAT16)])
def test_each_activations_graph_computes_darknets_layer(activation, dtype, data_type):
    """The graph of each shape and activation: its operations in order, x, the filters and y
    in the storage type and NHWC (KRSC), the bias float32, intermediates virtual floats; run by
    cuDNN's documented semantics it gives act(conv(x, w) + bias) with Darknet's activation."""
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        library = FakeGraphLibrary()
        plan = fusions(library).plan(*shape, dtype, activation)
        assert plan is not None and plan.bias_dtype == np.float32
        assert pointwise_modes(library, plan.plan.value) == EXPECTED_MODES[activation]
        x_shape, w_shape, stride, padding, groups, dilation = shape
        stride_y, stride_x = (stride, stride) if isinstance(stride, int) else stride
        x = rng.standard_normal(x_shape)
        w = rng.standard_normal(w_shape) * 0.3
        bias = rng.standard_normal(w_shape[0])
        expected = activations.activate(
            convolution(x, w, stride_y, stride_x, padding, dilation, groups)
            + bias[:, None, None], activation)
        assert expected.shape == plan.y_shape
        y = np.full(expected.size, np.nan)
        evaluate(library, plan.plan.value, {cg.X_UID: nhwc(x), cg.W_UID: nhwc(w),
                                            cg.BIAS_UID: bias, cg.Y_UID: y})
        got = np.moveaxis(y.reshape(plan.y_shape[0], *plan.y_shape[2:], plan.y_shape[1]), -1, 1)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=str(shape))
        tensors = {d.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID)[0]: d
                   for d in library.descriptors.values()
                   if d.kind == cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR}
        types = {uid: t.value(cg.CUDNN_ATTR_TENSOR_DATA_TYPE)[0] for uid, t in tensors.items()}
        assert types.pop(cg.X_UID) == types.pop(cg.W_UID) == types.pop(cg.Y_UID) == data_type
        assert types.pop(cg.BIAS_UID) == CUDNN_DATA_FLOAT
        assert set(types.values()) == {CUDNN_DATA_FLOAT}  # the virtual intermediates
        assert all(t.value(cg.CUDNN_ATTR_TENSOR_IS_VIRTUAL) == [True]
                   for uid, t in tensors.items() if uid >= cg.VIRTUAL_UID)
        assert all(t.value(cg.CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT) == [16] for t in tensors.values())


def test_leaky_slope_and_swish_beta_are_darknets():
    """The parameters the graph gives cuDNN: leaky's slope is Darknet's (0.1), relu's 0, both
    with NaNs propagated, a lower clip at 0 and none above (float's largest value, as cuDNN's
    frontend sets them); swish's beta 1, softplus's beta 1 (Darknet's mish)."""
    assert LEAKY_SLOPE == 0.1 and activations.activate(np.array([-2.0]), "leaky")[0] == -0.2
    parameters = {}
    for activation in ("leaky", "relu", "swish", "mish"):
        library = FakeGraphLibrary()
        fusions(library).plan((1, 8, 4, 4), (8, 8, 1, 1), 1, 0, 1, 1, np.float16, activation)
        for descriptor in library.descriptors.values():
            if descriptor.kind == cg.CUDNN_BACKEND_POINTWISE_DESCRIPTOR:
                for attribute, (kind, values) in descriptor.attributes.items():
                    if attribute not in (cg.CUDNN_ATTR_POINTWISE_MODE,
                                         cg.CUDNN_ATTR_POINTWISE_MATH_PREC):
                        parameters[activation, attribute] = (kind, values)
    double, largest = cg.CUDNN_TYPE_DOUBLE, float(np.finfo(np.float32).max)
    relu = {cg.CUDNN_ATTR_POINTWISE_NAN_PROPAGATION: (cg.CUDNN_TYPE_NAN_PROPOGATION, [1]),
            cg.CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP: (double, [0.0]),
            cg.CUDNN_ATTR_POINTWISE_RELU_UPPER_CLIP: (double, [largest])}
    expected = {("swish", cg.CUDNN_ATTR_POINTWISE_SWISH_BETA): (double, [1.0]),
                ("mish", cg.CUDNN_ATTR_POINTWISE_SOFTPLUS_BETA): (double, [1.0])}
    for activation, slope in (("leaky", 0.1), ("relu", 0.0)):
        expected[activation, cg.CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE] = (double, [slope])
        expected.update({(activation, attribute): v for attribute, v in relu.items()})
    assert parameters == expected


def test_the_fallback_modes_configs_are_tried_when_mode_as_all_fail():
    """Mode A's configurations (each refused here) first, then the fallback mode's."""
    modes = []

    def refuse_mode_a(library, descriptor):
        if descriptor.kind == cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR:
            config = library[descriptor.value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]]
            modes.append(config.mode)
            return REFUSED if config.mode == cg.CUDNN_HEUR_MODE_A else 0
        return 0

    library = FakeGraphLibrary(engines=2, refuse=refuse_mode_a)
    get = library.cudnnBackendGetAttribute

    def get_noting_the_mode(descriptor, attribute, kind, requested, count, array):
        status = get(descriptor, attribute, kind, requested, count, array)
        if attribute == cg.CUDNN_ATTR_ENGINEHEUR_RESULTS and array is not None:
            for address in array[:count._obj.value]:
                library[address].mode = library[descriptor.value].value(
                    cg.CUDNN_ATTR_ENGINEHEUR_MODE)[0]
        return status

    library.cudnnBackendGetAttribute = get_noting_the_mode
    plan = fusions(library).plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "relu")
    assert plan is not None
    assert modes == [cg.CUDNN_HEUR_MODE_A] * 2 + [cg.CUDNN_HEUR_MODE_FALLBACK]


def test_plan_uses_the_heuristics_and_the_first_config_that_finalizes():
    library = FakeGraphLibrary(engines=4, refused_configs=(0, 1), workspace=4096)
    made = fusions(library, handle=0xCAFE)
    plan = made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky")
    heuristics = [d for d in library.descriptors.values()
                  if d.kind == cg.CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR]
    assert len(heuristics) == 1
    assert heuristics[0].value(cg.CUDNN_ATTR_ENGINEHEUR_MODE) == [cg.CUDNN_HEUR_MODE_A]
    chosen = library[plan.plan.value]
    assert chosen.value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG) == [library.configs[2]]
    assert chosen.value(cg.CUDNN_ATTR_EXECUTION_PLAN_HANDLE) == [0xCAFE]
    graph = library[library[library.configs[2]].graph]
    assert graph.value(cg.CUDNN_ATTR_OPERATIONGRAPH_HANDLE) == [0xCAFE]
    assert plan.workspace == 4096 and plan.y_shape == (2, 16, 7, 6)
    plans = [d for d in library.descriptors.values()
             if d.kind == cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR]
    assert [p.destroyed for p in plans] == [True, True, False]  # the refused ones released
    # made once per shape: the same plan, no further calls
    calls = len(library.calls)
    assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky") is plan
    assert len(library.calls) == calls
    # another activation, stride or type is another plan
    assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "mish") is not plan
    assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 2, 1, 1, 1, np.float16, "leaky") is not plan
    assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.uint16, "leaky") is not plan


def refuse_kind(kind):
    return lambda library, descriptor: REFUSED if descriptor.kind == kind else 0


@pytest.mark.parametrize("library,reason", [
    (FakeGraphLibrary(engines=0), "mode A: no engine; mode FALLBACK: no engine"),
    (FakeGraphLibrary(engines=3, refused_configs=(0, 1, 2)),
     ("mode A: none of 3 engine configurations finalized (the first: cuDNN call "
      "cudnnBackendFinalize(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR) failed")),
    (FakeGraphLibrary(workspace=cg.WORKSPACE_LIMIT + 1),
     ("; mode FALLBACK: none of 2 engine configurations finalized (the first: workspace of "
      f"{cg.WORKSPACE_LIMIT + 1} bytes)")),
    (FakeGraphLibrary(refuse=refuse_kind(cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)),
     "cudnnBackendFinalize(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)"),
    (FakeGraphLibrary(refuse=refuse_kind(
        cg.CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)), "CUDNN_STATUS_FAKE"),
    (FakeGraphLibrary(refuse=refuse_kind(cg.CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)),
     "mode A: cuDNN call cudnnBackendFinalize(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR) failed"),
])
def test_a_refused_graph_is_remembered_as_unfused(library, reason):
    """Each step cuDNN may refuse: no plan (the shape runs unfused), the reason kept, every
    descriptor made released, and the shape not tried again."""
    made = fusions(library)
    shape = ((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky")
    assert made.plan(*shape) is None
    assert reason in made.refusals[made.key(*shape)]
    assert library.alive() == []
    assert library.kinds_created().count(cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR) == 2 * 6  # 2 tries
    calls = len(library.calls)
    assert made.plan(*shape) is None and len(library.calls) == calls


def test_a_graph_refused_with_a_float32_bias_is_tried_with_the_storage_types():
    """Some engines may take the bias only in the data's type: the second try, whose plan says
    so (the backend then gives the bias converted)."""
    def float_bias_refused(library, descriptor):
        if descriptor.kind != cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR:
            return 0
        bias = [d for d in library.descriptors.values()
                if d.kind == cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR and not d.destroyed
                and d.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID) == [cg.BIAS_UID]]
        return REFUSED if bias[-1].value(cg.CUDNN_ATTR_TENSOR_DATA_TYPE) == [0] else 0

    library = FakeGraphLibrary(refuse=float_bias_refused)
    made = fusions(library)
    plan = made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.uint16, "mish")
    assert plan is not None and plan.bias_dtype == np.uint16
    bias = [d for a, d in library.descriptors.items() if a in library.alive()
            and d.kind == cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR
            and d.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID) == [cg.BIAS_UID]]
    assert [b.value(cg.CUDNN_ATTR_TENSOR_DATA_TYPE) for b in bias] == [[CUDNN_DATA_BFLOAT16]]
    # the next shape of this type tries the bf16 bias first: no refused try
    graphs = library.kinds_created().count(cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)
    assert made.plan((2, 8, 7, 6), (16, 8, 1, 1), 1, 0, 1, 1, np.uint16, "leaky").bias_dtype \
        == np.uint16
    assert library.kinds_created().count(cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR) == graphs + 1
    # fp16 has its own order: float32 first (refused here), then fp16
    assert made.plan((2, 8, 7, 6), (16, 8, 1, 1), 1, 0, 1, 1, np.float16, "leaky").bias_dtype \
        == np.float16
    assert library.kinds_created().count(cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR) == graphs + 3


def test_unfused_activations_and_types_build_nothing():
    library = FakeGraphLibrary()
    made = fusions(library)
    for activation in ("tanh", "hard_mish", "gelu", "elu", "normalize_channels"):
        assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, activation) is None
    assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.int8, "leaky") is None
    assert library.calls == []


def test_execute_binds_pointers_once_per_set_and_runs_on_the_handle():
    library = FakeGraphLibrary()
    made = fusions(library, handle=0xCAFE)
    plan = made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky")
    assert not plan.ran
    made.execute(plan, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000)
    made.execute(plan, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000)
    made.execute(plan, 0x1100, 0x2000, 0x3000, 0x4100, None)
    assert plan.ran
    executions = [call for call in library.calls if call[0] == "execute"]
    assert len(executions) == 3 and len(plan.variant_packs) == 2
    assert {call[1].value for call in executions} == {0xCAFE}
    assert {call[2] for call in executions} == {plan.plan.value}
    first, second = (library[call[3]] for call in executions[::2])
    assert executions[0][3] == executions[1][3]  # the same pack for the same pointers
    assert first.value(cg.CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS) == [cg.X_UID, cg.W_UID,
                                                                   cg.BIAS_UID, cg.Y_UID]
    assert first.value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS) == [0x1000, 0x2000, 0x3000,
                                                                      0x4000]
    assert first.value(cg.CUDNN_ATTR_VARIANT_PACK_WORKSPACE) == [0x5000]
    assert second.value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)[::3] == [0x1100, 0x4100]
    assert second.value(cg.CUDNN_ATTR_VARIANT_PACK_WORKSPACE) == [None]
    assert first.finalized and second.finalized
    library.execute_status = REFUSED
    with pytest.raises(BackendError, match=r"cudnnBackendExecute failed: CUDNN_STATUS_FAKE"):
        made.execute(plan, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000)
    made.refuse(plan, "it failed after running")
    assert made.retired == [plan] and library[plan.plan.value].destroyed is False
    assert made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky") is None
    never_ran = made.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "mish")
    made.refuse(never_ran, "its first run failed")
    assert made.retired == [plan] and library[never_ran.plan.value].destroyed
    assert all(library[d.value].destroyed for d in never_ran.descriptors)


@pytest.mark.parametrize("cudart, wheel", [(12090, "nvidia-cuda-nvrtc-cu12"),
                                           (13000, "nvidia-cuda-nvrtc-cu13")])
def test_fusions_load_nvrtc_and_a_refusal_says_when_it_did_not(monkeypatch, capsys, cudart,
                                                               wheel):
    """fusions(dnn): one FusedConvolutions per cuDNN runtime, having loaded the NVRTC of
    cuDNN's CUDA major; where that failed, a refused shape's reason names the wheel (on stderr
    once)."""
    from engine.backends.cuda import libraries

    library = FakeGraphLibrary(engines=0)
    library.cudnnGetCudartVersion = lambda: cudart
    monkeypatch.setattr(cg.CudnnGraph, "load", classmethod(
        lambda cls: cls(library, declare=False)))
    loaded = []

    def load(wanted):
        loaded.append(wanted)
        raise BackendError(wanted.missing() + "; tried: nothing")

    monkeypatch.setattr(cg, "load", load)
    dnn = FakeDnn()
    made = cg.fusions(dnn)
    assert cg.fusions(dnn) is made and loaded == [libraries.nvrtc(cudart // 1000)]
    assert loaded[0].wheel == wheel and loaded[0].sonames == (f"libnvrtc.so.{cudart // 1000}",)
    for activation in ("leaky", "mish"):
        shape = ((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, activation)
        assert made.plan(*shape) is None
        assert made.refusals[made.key(*shape)].endswith(
            f"did not load: NVRTC not found (libnvrtc.so.{cudart // 1000}): install it with "
            f"pip install {wheel} (or pip install -e '.[gpu]'); tried: nothing")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cuDNN refused a fused convolution: ")


# ---- plans kept on disk (plan_cache) -------------------------------------------------------------
CONTEXT = {"cudnn": 92800, "cudart": 12090, "gpu": "NVIDIA H200", "capability": [9, 0]}
SHAPE = ((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky")
JSON_ATTRIBUTE = cg.CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION


def on_disk(folder, library=None, context=CONTEXT):
    """(library, FusedConvolutions) keeping plans in `folder`: each call stands for a new
    process (nothing in memory shared with the others but the folder)."""
    library = library or FakeGraphLibrary()
    return library, cg.FusedConvolutions(cg.CudnnGraph(library, declare=False),
                                         ctypes.c_void_p(0xBEEF),
                                         plan_cache.RecordStore(str(folder)), context)


def entries(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def record_of(folder):
    (name,) = entries(folder)
    return json.loads((folder / name).read_text())


def test_a_compiled_plan_is_written_and_the_next_process_loads_it(tmp_path):
    """The first process compiles the plan and writes its JSON; the next loads it: one
    execution plan descriptor given the JSON and the handle, finalized, its workspace read
    (no graph, heuristics or engine configuration), and runs it with the same unique ids."""
    first_library, first = on_disk(tmp_path)
    built = first.plan(*SHAPE)
    key = first.key(*SHAPE)
    assert built is not None and first.origins == {key: "compiled"}
    written = first_library.plan_json(first_library[built.plan.value])
    assert json.loads(written)["tensors"] == {"1": [2, 8, 7, 6], "2": [16, 8, 3, 3],
                                              "3": [1, 16, 1, 1], "4": [2, 16, 7, 6]}
    record = record_of(tmp_path)
    assert record["plan"] == written and record["identity"]["bias"] == "float32"
    assert record["identity"]["gpu"] == "NVIDIA H200"

    library, second = on_disk(tmp_path)
    plan = second.plan(*SHAPE)
    assert plan is not None and second.origins == {key: "loaded from disk"}
    address = plan.plan.value
    assert library.calls == [
        ("create", cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, address),
        ("set", address, JSON_ATTRIBUTE), ("set", address, cg.CUDNN_ATTR_EXECUTION_PLAN_HANDLE),
        ("finalize", address), ("get", address, cg.CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)]
    assert library[address].value(JSON_ATTRIBUTE) == written
    assert library[address].value(cg.CUDNN_ATTR_EXECUTION_PLAN_HANDLE) == [0xBEEF]
    assert (plan.y_shape, plan.bias_dtype, plan.workspace, plan.ran) == \
        (built.y_shape, built.bias_dtype, built.workspace, False)  # checked at its first run
    second.execute(plan, 0x1000, 0x2000, 0x3000, 0x4000, None)
    (_, handle, executed, pack), = executions(library)
    assert handle.value == 0xBEEF and executed == address
    assert library[pack].value(cg.CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS) == [
        cg.X_UID, cg.W_UID, cg.BIAS_UID, cg.Y_UID]
    assert key in second.build_seconds
    summary = second.summary().splitlines()
    assert summary[0].startswith("fused convolutions: 1 of 1 shapes; plans made in ")
    assert summary[0].endswith(f"(1 loaded from disk; plans on disk in {tmp_path})")
    assert ": fused (loaded from disk in " in summary[1]
    assert "(1 compiled; plans on disk in " in first.summary()
    assert entries(tmp_path) == [os.path.basename(second.store.path(second.identity(
        key, np.float32)))]  # nothing rewritten beside it
    second.refuse(plan, "slower than unfused")  # it ran: kept alive, as a compiled one
    assert second.retired == [plan] and not library[address].destroyed


@pytest.mark.parametrize("damage", [
    lambda data: data[:len(data) // 2],                    # cut short
    lambda data: b"",
    lambda data: b"\xff\xfe not a plan",                   # not UTF-8
    lambda data: b'{"format": 1}',                          # no identity
    lambda data: data.replace(b'"format": 1', b'"format": 0'),
    lambda data: data.replace(b'"x": [2, 8, 7, 6]', b'"x": [2, 8, 7, 7]'),  # another shape's
    lambda data: data.replace(b'"plan": ', b'"plans": '),  # no plan
    lambda data: data.replace(b'fake plan', b'fake plane'),  # a JSON cuDNN refuses
], ids=["truncated", "empty", "binary", "no identity", "other format", "other shape", "no plan",
        "refused by cuDNN"])
def test_a_damaged_entry_is_rebuilt_and_overwritten(tmp_path, damage):
    on_disk(tmp_path)[1].plan(*SHAPE)
    (name,) = entries(tmp_path)
    good = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(damage(good))
    library, made = on_disk(tmp_path)
    plan = made.plan(*SHAPE)
    assert plan is not None and made.origins[made.key(*SHAPE)] == "compiled"
    assert cg.CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR in library.kinds_created()
    assert entries(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() == good  # the same plan, written again
    assert [d for d in library.alive() if library[d].kind
            == cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR] == [plan.plan.value]


def test_a_plan_cudnn_does_not_finalize_from_disk_is_compiled_again(tmp_path):
    """A stale entry (another cuDNN build, a driver that refuses its kernel): its finalize
    fails, the descriptor is destroyed, the plan compiled and its new JSON written."""
    on_disk(tmp_path)[1].plan(*SHAPE)

    def refuse_loaded_plans(library, descriptor):
        return REFUSED if JSON_ATTRIBUTE in descriptor.attributes else 0

    library, made = on_disk(tmp_path, FakeGraphLibrary(engines=3, refused_configs=(0,),
                                                       refuse=refuse_loaded_plans))
    plan = made.plan(*SHAPE)
    assert plan is not None and made.origins[made.key(*SHAPE)] == "compiled"
    loaded = library.calls[0][2]
    assert library[loaded].destroyed and ("finalize", loaded) in library.calls
    assert json.loads(record_of(tmp_path)["plan"])["engine"] == 1  # the new plan's


def test_a_plan_whose_workspace_grew_past_the_limit_is_not_loaded(tmp_path):
    on_disk(tmp_path)[1].plan(*SHAPE)
    library, made = on_disk(tmp_path, FakeGraphLibrary(workspace=cg.WORKSPACE_LIMIT + 1))
    assert made.plan(*SHAPE) is None  # and compiled again: refused the same way
    assert library.alive() == []
    record = record_of(tmp_path)  # the plan's entry removed, the refusal written
    assert record["identity"]["entry"] == "refusal" and "workspace of" in record["refused"]


def test_refusals_are_kept_on_disk_and_not_compiled_again(tmp_path):
    """cuDNN's refusals and the backend's verdicts (refuse: slower, differing, a failed first
    run): the next process runs the shape unfused without making a descriptor."""
    shapes = [SHAPE, ((2, 8, 7, 6), (16, 8, 1, 1), 1, 0, 1, 1, np.float16, "mish")]
    _, first = on_disk(tmp_path, FakeGraphLibrary(engines=0))
    assert first.plan(*shapes[0]) is None
    _, first = on_disk(tmp_path)
    first.refuse(first.plan(*shapes[1]), "slower than unfused (3.0000 against 2.0000 ms)")
    library, made = on_disk(tmp_path, FakeGraphLibrary(engines=4))
    assert [made.plan(*shape) for shape in shapes] == [None, None]
    assert library.calls == []
    keys = [made.key(*shape) for shape in shapes]
    assert made.refusals[keys[0]] == "; ".join(
        ["fused convolution: mode A: no engine; mode FALLBACK: no engine"] * 2)  # both biases
    assert made.refusals[keys[1]] == "slower than unfused (3.0000 against 2.0000 ms)"
    assert set(made.origins.values()) == {"refusal read from disk"}
    assert "(2 refusal read from disk; " in made.summary()


def test_a_refusal_for_want_of_nvrtc_is_not_kept(tmp_path, capsys):
    _, made = on_disk(tmp_path, FakeGraphLibrary(engines=0))
    made.nvrtc_missing = "NVRTC not found"
    assert made.plan(*SHAPE) is None and entries(tmp_path) == []
    capsys.readouterr()
    _, made = on_disk(tmp_path)  # NVRTC installed since: compiled
    assert made.plan(*SHAPE) is not None


@pytest.mark.parametrize("change", [{"cudnn": 92900}, {"cudart": 13000}, {"gpu": "NVIDIA A100"},
                                    {"capability": [8, 0]}])
def test_another_cudnn_or_gpu_has_its_own_entries(tmp_path, change):
    on_disk(tmp_path)[1].plan(*SHAPE)
    library, made = on_disk(tmp_path, context={**CONTEXT, **change})
    assert made.plan(*SHAPE) is not None and made.origins[made.key(*SHAPE)] == "compiled"
    assert cg.CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR in library.kinds_created()
    assert len(entries(tmp_path)) == 2
    _, made = on_disk(tmp_path)  # the first context's entry is still there, and loads
    assert made.plan(*SHAPE) is not None
    assert made.origins[made.key(*SHAPE)] == "loaded from disk"


def test_every_part_of_a_plan_names_its_entry(tmp_path, monkeypatch):
    """Shape, geometry, type, activation, bias type, and the graph's make-up: each its own
    file (a changed graph, GRAPH_FORMAT or an activation's steps, never loads an old plan)."""
    _, made = on_disk(tmp_path)
    key = made.key(*SHAPE)
    names = {made.store.path(made.identity(key, np.float32)),
             made.store.path(made.identity(key, np.float16)),
             made.store.path(made.identity(key, None))}
    for index, other in ((0, (2, 8, 7, 7)), (1, (16, 8, 1, 1)), (2, 2), (2, (1, 2)), (3, 0),
                         (4, 2), (5, 2), (6, np.uint16), (7, "mish")):
        changed = list(SHAPE)
        changed[index] = other
        names.add(made.store.path(made.identity(made.key(*changed), np.float32)))
    monkeypatch.setattr(cg, "GRAPH_FORMAT", cg.GRAPH_FORMAT + 1)
    names.add(made.store.path(made.identity(key, np.float32)))
    monkeypatch.setitem(cg.ACTIVATION_STEPS, "leaky", cg.ACTIVATION_STEPS["relu"])
    names.add(made.store.path(made.identity(key, np.float32)))
    assert len(names) == 14


def test_an_unwritable_folder_runs_fused_and_says_so_once(tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    library, made = on_disk(blocker / "cudnn-plans")  # cannot be made
    plans = [made.plan(*SHAPE), made.plan((2, 8, 7, 6), (16, 8, 1, 1), 1, 0, 1, 1, np.float16,
                                          "mish")]
    assert all(plan is not None for plan in plans) and not made.store.writable
    for plan in plans:
        made.execute(plan, 0x1000, 0x2000, 0x3000, 0x4000, None)
    made.refuse(plans[1], "slower than unfused")  # no write tried
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: not keeping compiled plans on disk (")
    assert lines[0].endswith('set ENGINE_CACHE_DIR to a writable folder, or to "" to turn '
                             'this off')


def test_a_full_disk_still_reads_what_is_there(tmp_path, monkeypatch, capsys):
    on_disk(tmp_path)[1].plan(*SHAPE)

    def full(*args, **options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_cache.tempfile, "mkstemp", full)
    _, made = on_disk(tmp_path)
    assert made.plan(*SHAPE) is not None
    assert made.origins[made.key(*SHAPE)] == "loaded from disk"
    assert made.plan((1, 8, 4, 4), (8, 8, 1, 1), 1, 0, 1, 1, np.float16, "relu") is not None
    assert len(entries(tmp_path)) == 1
    assert "No space left on device" in capsys.readouterr().err


def test_writes_are_atomic(tmp_path, monkeypatch, capsys):
    """A record is written to a temporary file renamed over the entry: a failed rename leaves
    the old entry whole and no temporary file."""
    on_disk(tmp_path)[1].plan(*SHAPE)
    (name,) = entries(tmp_path)
    before = (tmp_path / name).read_bytes()
    renamed = []
    replace = os.replace

    def failing_replace(source, target):
        renamed.append((os.path.basename(source), os.path.basename(target)))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(plan_cache.os, "replace", failing_replace)
    _, made = on_disk(tmp_path)
    assert made.plan(*SHAPE[:-1], "mish") is not None  # compiled, its write failed
    written = os.path.basename(made.store.path(made.identity(made.key(*SHAPE[:-1], "mish"),
                                                             np.float32)))
    assert renamed[0][0].startswith(".writing-") and renamed[0][1] == written
    assert entries(tmp_path) == [name] and (tmp_path / name).read_bytes() == before
    monkeypatch.setattr(plan_cache.os, "replace", replace)
    assert "Input/output error" in capsys.readouterr().err


def test_a_plan_cudnn_does_not_serialise_is_not_kept(tmp_path):
    library, made = on_disk(tmp_path, FakeGraphLibrary(serializes=False))
    assert made.plan(*SHAPE) is not None and entries(tmp_path) == []


def test_the_cache_folder(monkeypatch, tmp_path):
    home = os.path.expanduser("~")
    assert plan_cache.cache_root({}) == os.path.join(home, ".cache", "darknet-engine")
    assert plan_cache.cache_root({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/darknet-engine"
    assert plan_cache.cache_root({"XDG_CACHE_HOME": "relative"}) == \
        os.path.join(home, ".cache", "darknet-engine")  # ignored, as the XDG spec says
    assert plan_cache.cache_root({"ENGINE_CACHE_DIR": "/e", "XDG_CACHE_HOME": "/x"}) == "/e"
    assert plan_cache.cache_root({"ENGINE_CACHE_DIR": ""}) is None
    # the test session's folder, never the user's (conftest.py)
    assert os.environ["ENGINE_CACHE_DIR"] and not os.environ["ENGINE_CACHE_DIR"].startswith(
        os.path.join(home, ".cache"))


def test_a_record_store_round_trip(tmp_path):
    store = plan_cache.RecordStore(str(tmp_path / "new" / "plans"))
    identity = {"capability": (9, 0), "name": "x"}  # a tuple comes back a list: still found
    assert store.read(identity) is None and not (tmp_path / "new").exists()  # made when written
    assert store.write(identity, {"plan": "text"})
    assert store.read(identity)["plan"] == "text"
    assert store.read({**identity, "name": "y"}) is None
    assert len(entries(tmp_path / "new" / "plans")) == 1


class FakeGpu:
    name = "NVIDIA H200"
    handle = type("Handle", (), {"compute_capability": lambda self: (9, 0)})()


@pytest.mark.parametrize("setting", ["folder", "", None])
def test_fusions_keep_plans_in_the_engines_cache(monkeypatch, tmp_path, setting):
    """fusions(dnn, device): plans under ENGINE_CACHE_DIR/cudnn-plans, named with cuDNN's and
    CUDA's versions and the GPU's model; ENGINE_CACHE_DIR="" or no device: nothing on disk."""
    library = FakeGraphLibrary()
    library.cudnnGetCudartVersion = lambda: 12090
    monkeypatch.setattr(cg.CudnnGraph, "load", classmethod(
        lambda cls: cls(library, declare=False)))
    monkeypatch.setattr(cg, "load", lambda wanted: None)
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path) if setting == "folder" else "")
    monkeypatch.setattr(cg, "_FUSIONS", {})
    made = cg.fusions(FakeDnn(), None if setting is None else FakeGpu())
    assert made.plan(*SHAPE) is not None
    if setting != "folder":
        assert made.store is None and entries(tmp_path) == []
        assert "; no plans on disk)" in made.summary()
        return
    assert made.store.folder == str(tmp_path / "cudnn-plans")
    assert made.context == CONTEXT
    assert record_of(tmp_path / "cudnn-plans")["identity"]["cudnn"] == 92800


def test_the_backend_gives_fusions_its_device(fake_fp16, monkeypatch):
    """The device names the plans on disk (its GPU model): conv_bias_forward passes it."""
    ops = fake_fp16()
    seen = []
    monkeypatch.setattr(cg, "fusions", lambda dnn, device=None: (
        seen.append((dnn, device)), fake_fp16.fusions)[1])
    ops.conv_bias_forward(*arguments())
    assert seen == [(ops.dnn, ops.device)] and ops.device is not None


def test_the_backend_runs_a_plan_from_disk_through_its_first_run_checks(fake_fp16, tmp_path):
    """A loaded plan is checked as a compiled one is: compared with the unfused path and timed
    on its first run; a slower one is refused, and the refusal kept for the next process."""
    _, first = on_disk(tmp_path)
    first.plan((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1, np.float16, "leaky")
    made = fake_fp16.fusions
    made.store, made.context = plan_cache.RecordStore(str(tmp_path)), CONTEXT
    ops = fake_fp16(fused=True)
    fake_fp16.clock.update(fused=3.0, unfused=2.0)
    assert ops.conv_bias_forward(*arguments()).unfused
    (key, plan), = made.plans.items()
    assert plan is None and made.origins[key] == "loaded from disk"
    assert made.refusals[key] == "slower than unfused (3.0000 against 2.0000 ms)"
    assert len(executions(fake_fp16.library)) == 1 + cuda_backend.FORWARD_REPEATS
    _, later = on_disk(tmp_path)
    assert later.plan(*key) is None and later.origins[key] == "refusal read from disk"


# ---- the backend's choice of path, on fakes ------------------------------------------------------
def launched(ops):
    """The names of the kernels a fake backend launched."""
    return [name for name, _ in ops.kernels.launches]


class FakeDnn:
    handle = ctypes.c_void_p(0xCAFE)

    def transform(self, shape, dtype, x, y, to_channels_last):
        pass


@pytest.fixture
def fake_fp16(monkeypatch):
    """make(**options): an fp16 CudaBackend on fakes (fused="always" unless `fused` is given)
    whose fused plans go to a FakeGraphLibrary, whose unfused path records its calls, and whose
    events read a clock that a fused run advances by clock["fused"] ms and an unfused one by
    clock["unfused"]."""
    monkeypatch.setattr(cuda_backend, "_runtime", lambda device, math_type: (
        FakeDevice(), FakeKernels(), FakeDnn(), None))
    library = FakeGraphLibrary()
    made = fusions(library, handle=0xCAFE)
    monkeypatch.setattr(cg, "fusions", lambda dnn, device=None: made)
    clock = {"now": 0.0, "fused": 1.0, "unfused": 2.0}
    execute = library.cudnnBackendExecute

    def timed_execute(*args):
        clock["now"] += clock["fused"]
        return execute(*args)

    library.cudnnBackendExecute = timed_execute

    def make(**options):
        options.setdefault("fused", "always")
        ops = cuda_backend.CudaBackend(precision="fp16", **options)
        ops.cuda = type("Cuda", (), {"pagelocked_empty": staticmethod(np.empty),
                                     "Event": lambda self: ClockEvent(clock)})()
        ops.unfused = []

        def conv_forward(x, weights, stride, padding, groups, train=False, dilation=1):
            ops.unfused.append("conv_forward")
            clock["now"] += clock["unfused"]
            y = FakeArray((2, 16, 7, 6), ops.dtype)
            y.unfused = True
            return y

        def add_bias_(y, biases, activation="linear"):
            ops.unfused.append("add_bias_")
            return y

        def scale_(x, factor):  # the agreement check's difference, in the unfused output
            assert factor == -1.0 and x.unfused and not getattr(x, "negated", False)
            x.negated = True
            return x

        def add_(dst, src):
            assert dst.negated and not getattr(src, "unfused", False)
            dst.difference = True
            return dst

        def sum_of_squares(x):
            return squares["error" if getattr(x, "difference", False) else "scale"]

        ops.conv_forward, ops.add_bias_ = conv_forward, add_bias_
        ops.scale_, ops.add_, ops.sum_of_squares = scale_, add_, sum_of_squares
        return ops

    squares = {"error": 1e-6, "scale": 1.0}  # the fused and unfused outputs' agreement
    make.library, make.fusions, make.clock, make.squares = library, made, clock, squares
    return make


def arguments(activation="leaky", stride=1):
    x = FakeArray((2, 8, 7, 6), np.float16)
    x.channels_last = True
    return (x, FakeArray((16, 8, 3, 3)), FakeArray((16,)), activation, stride, 1, 1)


def executions(library):
    return [call for call in library.calls if call[0] == "execute"]


def test_backend_runs_the_fused_plan_into_an_nhwc_output(fake_fp16):
    ops = fake_fp16()
    assert ops.fused
    x, weights, biases, *rest = arguments()
    y = ops.conv_bias_forward(x, weights, biases, *rest)
    assert y.channels_last and y.shape == (2, 16, 7, 6) and y.dtype == np.float16
    assert ops.unfused == []
    (_, handle, plan, pack), = executions(fake_fp16.library)
    assert handle.value == 0xCAFE and plan == fake_fp16.fusions.plans[
        next(iter(fake_fp16.fusions.plans))].plan.value
    pointers = fake_fp16.library[pack].value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)
    assert pointers[0] == x.ptr and pointers[2] == biases.ptr and pointers[3] == y.ptr
    assert pointers[1] != weights.ptr  # the weights converted to fp16 (and rewritten NHWC)
    assert launched(ops) == ["from_float_kernel"]  # "always": no timing
    # the same shape again: no new plan; dilation and the other geometry go into the key
    ops.conv_bias_forward(x, weights, biases, *rest)
    assert len(executions(fake_fp16.library)) == 2
    assert len(fake_fp16.fusions.plans) == 1


@pytest.mark.parametrize("options,activation,why", [
    ({"fused": False}, "leaky", "fused=False: the A/B"),
    ({"channels_last": False}, "leaky", "NCHW data"),
    ({}, "tanh", "an activation the graph does not take"),
])
def test_backend_runs_unfused_where_it_should(fake_fp16, options, activation, why):
    ops = fake_fp16(**options)
    ops.conv_bias_forward(*arguments(activation))
    assert ops.unfused == ["conv_forward", "add_bias_"], why
    assert executions(fake_fp16.library) == [] and fake_fp16.library.calls == []


def unfused_pairs(count):
    return ["conv_forward", "add_bias_"] * count


@pytest.mark.parametrize("fused_ms,unfused_ms", [(1.0, 2.0), (2.0, 2.0)])
def test_a_fused_plan_timed_faster_is_kept(fake_fp16, fused_ms, unfused_ms):
    """fused=True: the first run times the fused plan against the unfused path, each
    FORWARD_REPEATS times behind a hold kernel, and keeps the plan where it is not slower."""
    ops = fake_fp16(fused=True)
    fake_fp16.clock.update(fused=fused_ms, unfused=unfused_ms)
    y = ops.conv_bias_forward(*arguments())
    repeats = cuda_backend.FORWARD_REPEATS
    assert not getattr(y, "unfused", False) and y.channels_last
    assert len(executions(fake_fp16.library)) == 1 + repeats
    assert ops.unfused == unfused_pairs(1 + repeats)  # a first call, then the timed ones
    assert launched(ops).count("hold_kernel") == 2
    (key, plan), = fake_fp16.fusions.plans.items()
    assert plan is not None and fake_fp16.fusions.timings[key] == (fused_ms, unfused_ms)
    assert f"float16 leaky: fused; fused {fused_ms:.4f} ms, unfused {unfused_ms:.4f} ms " \
        "(compiled in " in fake_fp16.fusions.summary().splitlines()[1]
    ops.conv_bias_forward(*arguments())  # timed once per shape
    assert len(executions(fake_fp16.library)) == 2 + repeats
    assert ops.unfused == unfused_pairs(1 + repeats)


def test_a_fused_plan_timed_slower_is_dropped(fake_fp16):
    ops = fake_fp16(fused=True)
    fake_fp16.clock.update(fused=3.0, unfused=2.0)
    y = ops.conv_bias_forward(*arguments())
    assert y.unfused  # the unfused path's result, as every later call's
    repeats = cuda_backend.FORWARD_REPEATS
    assert len(executions(fake_fp16.library)) == 1 + repeats
    (key, plan), = fake_fp16.fusions.plans.items()
    assert plan is None and len(fake_fp16.fusions.retired) == 1  # it ran: kept alive
    assert fake_fp16.fusions.refusals[key] == "slower than unfused (3.0000 against 2.0000 ms)"
    assert ops.conv_bias_forward(*arguments()).unfused
    assert len(executions(fake_fp16.library)) == 1 + repeats


@pytest.mark.parametrize("fused_ms", [1.0, 3.0])
def test_a_fused_plans_workspace_counts_while_it_is_kept(fake_fp16, fused_ms):
    """A fused plan's workspace is reserved for its runs; a plan dropped (slower) no longer
    counts: the workspace shrinks to the other plans' needs (here none); a plan kept keeps it.
    Either way the pool's held blocks (the check's unfused outputs) go back to the driver once,
    after the first run's check."""
    ops = fake_fp16(fused=True)
    fake_fp16.library.workspace = 4096
    fake_fp16.clock.update(fused=fused_ms, unfused=2.0)
    ops.conv_bias_forward(*arguments())
    ops.conv_bias_forward(*arguments())
    kept = fused_ms < 2.0
    assert ops._workspace_size == (4096 if kept else 0)
    assert ops.device.pool.released == 1


@pytest.mark.parametrize("error,scale", [(1.0, 1.0), (float("nan"), 1.0), (1e-2, 0.0)])
def test_a_fused_plan_that_disagrees_with_unfused_is_dropped(fake_fp16, error, scale):
    """fused=True: the first run's output is compared with the unfused path's (relative RMS
    difference against cudnn_graph.AGREEMENT, NaN refused) before any timing."""
    ops = fake_fp16(fused=True)
    fake_fp16.squares.update(error=error, scale=scale)
    y = ops.conv_bias_forward(*arguments())
    assert y.unfused and len(executions(fake_fp16.library)) == 1
    assert launched(ops).count("hold_kernel") == 0  # not timed
    (key, plan), = fake_fp16.fusions.plans.items()
    assert plan is None and key not in fake_fp16.fusions.timings
    assert fake_fp16.fusions.refusals[key].startswith(
        "differs from the unfused path: relative RMS difference ")


def test_agreement_bounds():
    """Rounding-level differences pass (fp16: ~3e-4, bf16: ~2e-3 relative RMS), wrong
    values do not; an all-zero reference takes differences of ABSOLUTE_FLOOR per value."""
    size = 1000
    assert cg.agrees((2e-3) ** 2 * size, 1.0 * size, size)
    assert not cg.agrees((0.1) ** 2 * size, 1.0 * size, size)
    assert cg.agrees(0.5e-3 ** 2 * size, 0.0, size)
    assert not cg.agrees(float("nan"), 1.0, size) and not cg.agrees(float("inf"), 1.0, size)


@pytest.mark.parametrize("value,fused", [(None, True), ("1", True), ("0", False),
                                         ("always", "always")])
def test_the_default_comes_from_the_environment(fake_fp16, monkeypatch, value, fused):
    if value is None:
        monkeypatch.delenv(cg.FUSED_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cg.FUSED_VARIABLE, value)
    assert fake_fp16(fused=None).fused == fused
    assert fake_fp16(fused=False).fused is False  # the argument wins


def test_a_bad_environment_setting_is_one_line(fake_fp16, monkeypatch):
    monkeypatch.setenv(cg.FUSED_VARIABLE, "yes")
    with pytest.raises(BackendError, match=r"^ENGINE_FUSED_CONVOLUTIONS=yes: expected one of "
                                           r"1, 0, always$"):
        fake_fp16(fused=None)


def test_backend_in_fp32_runs_unfused(monkeypatch, fake_fp16):
    ops = fake_fp16(channels_last=True)
    ops.dtype = np.dtype(np.float32)  # an fp32 backend forced to channels last
    ops.conv_bias_forward(*arguments())
    assert ops.unfused == ["conv_forward", "add_bias_"] and fake_fp16.library.calls == []


def test_backend_falls_back_when_the_first_run_fails_and_remembers(fake_fp16):
    ops = fake_fp16()
    fake_fp16.library.execute_status = REFUSED
    ops.conv_bias_forward(*arguments())
    assert ops.unfused == ["conv_forward", "add_bias_"]
    assert len(executions(fake_fp16.library)) == 1
    assert fake_fp16.library.alive() == []
    ops.conv_bias_forward(*arguments())
    assert len(executions(fake_fp16.library)) == 1  # not tried again
    assert ops.unfused == ["conv_forward", "add_bias_"] * 2
    key = next(iter(fake_fp16.fusions.plans))
    assert "cudnnBackendExecute" in fake_fp16.fusions.refusals[key]
    summary = fake_fp16.fusions.summary().splitlines()
    assert summary[0].startswith("fused convolutions: 0 of 1 shapes; plans made in ")
    assert "leaky: unfused: cuDNN call cudnnBackendExecute failed" in summary[1]
    assert summary[1].endswith(" s)")


def test_a_plan_that_ran_raises_a_later_failure(fake_fp16):
    ops = fake_fp16()
    ops.conv_bias_forward(*arguments())
    fake_fp16.library.execute_status = REFUSED
    with pytest.raises(BackendError, match="cudnnBackendExecute"):
        ops.conv_bias_forward(*arguments())


def test_a_plan_that_fails_while_recording_falls_back(fake_fp16):
    """A fused plan that ran eagerly but fails to run while a CUDA graph is recorded (cuDNN
    refusing the capture) is dropped: that call and the later ones run unfused."""
    ops = fake_fp16()
    ops.conv_bias_forward(*arguments())
    fake_fp16.library.execute_status = REFUSED
    with ops.recording():
        y = ops.conv_bias_forward(*arguments())
    assert y.unfused and ops.unfused == unfused_pairs(1)
    key = next(iter(fake_fp16.fusions.plans))
    assert fake_fp16.fusions.plans[key] is None
    assert fake_fp16.fusions.refusals[key].endswith("(status 3000) (while recording)")
    retired, = fake_fp16.fusions.retired  # an earlier recording may replay its kernels
    assert not fake_fp16.library[retired.plan.value].destroyed


def test_no_plan_is_made_while_recording(fake_fp16):
    """A recording only issues kernels: a shape seen first while recording runs unfused (its
    plan is made at its next eager call); one run eagerly before runs fused."""
    ops = fake_fp16()
    ops.conv_bias_forward(*arguments("leaky"))
    with ops.recording():
        ops.conv_bias_forward(*arguments("leaky"))  # run eagerly before: fused
        assert ops.unfused == []
        ops.conv_bias_forward(*arguments("mish"))   # new: unfused, nothing made
        assert ops.unfused == ["conv_forward", "add_bias_"]
    assert len(fake_fp16.fusions.plans) == 1
    assert len(executions(fake_fp16.library)) == 2
    ops.conv_bias_forward(*arguments("mish"))
    assert len(fake_fp16.fusions.plans) == 2 and len(executions(fake_fp16.library)) == 3


def test_misaligned_pointers_run_unfused_and_keep_the_plan(fake_fp16):
    ops = fake_fp16()
    x, weights, biases, *rest = arguments()
    x.ptr += 2  # a view starting one half in
    ops.conv_bias_forward(x, weights, biases, *rest)
    assert ops.unfused == ["conv_forward", "add_bias_"]
    assert executions(fake_fp16.library) == [] and len(fake_fp16.fusions.plans) == 1
    assert next(iter(fake_fp16.fusions.plans.values())) is not None


def test_frozen_weights_are_converted_and_rewritten_once(fake_fp16):
    ops = fake_fp16()
    x, weights, biases, *rest = arguments()
    ops.freeze_(weights)
    ops.freeze_(biases)
    launches = len(launched(ops))
    for _ in range(2):
        ops.conv_bias_forward(x, weights, biases, *rest)
    assert len(launched(ops)) == launches  # no conversion per call
    packs = [fake_fp16.library[call[3]] for call in executions(fake_fp16.library)]
    pointers = [p.value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS) for p in packs]
    assert pointers[0][1] == pointers[1][1] == ops._nhwc_filters[id(weights)][1].ptr
    assert pointers[0][2] == pointers[1][2] == biases.ptr  # float32, as given


# ---- the real cuDNN, where it loads (no GPU needed) ----------------------------------------------
def real_graph():
    try:
        graph = cg.CudnnGraph.load()
    except BackendError as error:
        pytest.skip(f"no cuDNN 9 library: {error}")
    return graph


@pytest.mark.parametrize("activation", sorted(EXPECTED_MODES))
def test_descriptors_finalize_in_cudnn(activation):
    """Every tensor, convolution and operation descriptor of each graph is accepted by
    cuDNN's own finalize (which checks the dimensions, strides and groups of the convolution:
    a wrong output shape is refused), and all are destroyed cleanly. The operation graph, the
    heuristics and the plans need a GPU (tests below)."""
    graph = real_graph()
    made = cg.FusedConvolutions(graph, None)
    for shape in SHAPES:
        for dtype in (np.float16, np.uint16):
            descriptors = []
            try:
                _, operations = made.operations(made.key(*shape, dtype, activation),
                                                np.dtype(np.float32), descriptors)
            except BackendError as error:
                if "SUBLIBRARY" in str(error):
                    pytest.skip(f"cuDNN's sub-libraries do not load here: {error}")
                raise
            assert len(operations) == 1 + len(EXPECTED_MODES[activation])
            graph.destroy(*reversed(descriptors))


def test_cudnn_refuses_a_convolution_of_the_wrong_output_shape(monkeypatch):
    graph = real_graph()
    made = cg.FusedConvolutions(graph, None)
    real_output_shape = cg.output_shape

    def one_row_too_many(*arguments):
        n, f, h, w = real_output_shape(*arguments)
        return n, f, h + 1, w

    monkeypatch.setattr(cg, "output_shape", one_row_too_many)
    descriptors = []
    with pytest.raises(BackendError) as error:
        made.operations(made.key(*SHAPES[0], np.float16, "leaky"), np.dtype(np.float32),
                        descriptors)
    if "SUBLIBRARY" in str(error.value):
        pytest.skip(f"cuDNN's sub-libraries do not load here: {error.value}")
    assert "cudnnBackendFinalize(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)" in \
        str(error.value)
    graph.destroy(*reversed(descriptors))


# ---- on the GPU ---------------------------------------------------------------------------------
# (x shape, weights shape, stride, padding, groups): 3x3, 1x1, 3x3 with stride 2, channels not
# a multiple of 8 (13 filters; 12 input channels), groups, yolov4-tiny's first layers' sizes.
GPU_SHAPES = [((2, 16, 13, 11), (24, 16, 3, 3), 1, 1, 1),
              ((2, 16, 13, 11), (32, 16, 1, 1), 1, 0, 1),
              ((2, 16, 26, 20), (32, 16, 3, 3), 2, 1, 1),
              ((2, 16, 13, 11), (13, 16, 3, 3), 1, 1, 1),
              ((2, 12, 13, 11), (16, 12, 1, 1), 1, 0, 1),
              ((2, 32, 13, 11), (32, 16, 3, 3), 1, 1, 2),
              ((1, 32, 104, 104), (64, 32, 3, 3), 2, 1, 1)]
# Those every runtime-fusion engine should take (channels whole packs of 8, no groups): on an
# sm80+ GPU a refusal of these is a failure of the graph, not a limit of cuDNN.
MUST_FUSE = (0, 1, 2, 6)


@pytest.fixture(scope="module", params=REDUCED)
def fused_pair(request):
    """(backend fusing wherever cuDNN can, unfused backend) of one reduced precision, both
    channels last."""
    return (cuda_backend.CudaBackend(0, precision=request.param, fused="always"),
            cuda_backend.CudaBackend(0, precision=request.param, fused=False))


def relative_error(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", sorted(EXPECTED_MODES))
def test_fused_convolution_matches_unfused(fused_pair, activation):
    """conv_bias_forward fused against the unfused path (conv_forward, add_bias_) for each
    activation and shape, in fp16 and bf16: within the storage type's rounding (the fused
    kernel rounds once, the unfused path twice); the fused outputs NHWC; and the shapes of
    MUST_FUSE really fused (cudnn_graph's refusals say why not)."""
    fused = fused_pair[0]
    rng = np.random.default_rng(4)
    tolerance = {"fp16": 1e-2, "bf16": 3e-2}[fused.precision]
    for index, (x_shape, w_shape, stride, padding, groups) in enumerate(GPU_SHAPES):
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
        biases = rng.standard_normal(w_shape[0]).astype(np.float32)
        outputs, layouts = [], []
        for ops in fused_pair:
            weights, bias = ops.freeze_(ops.asarray(w)), ops.freeze_(ops.asarray(biases))
            x_nhwc = ops._relayout(ops._activation(ops.asarray(x)), True)  # as a layer gives it
            y = ops.conv_bias_forward(x_nhwc, weights, bias, activation, stride, padding, groups)
            layouts.append(getattr(y, "channels_last", False))
            outputs.append(ops.to_host(y))
        made = cg.fusions(fused.dnn)
        key = made.key(x_shape, w_shape, stride, padding, groups, 1, fused.dtype, activation)
        if made.plans.get(key) is not None:
            assert layouts[0], "a fused output is stored NHWC"
        elif index in MUST_FUSE:
            raise AssertionError(f"not fused: {made.refusals.get(key)}")
        error = relative_error(*outputs)
        assert error <= tolerance, (f"{x_shape} {w_shape} stride {stride} groups {groups} "
                                    f"{activation} in {fused.precision}: {error:.3g}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", REDUCED)
def test_the_default_times_fused_against_unfused(precision):
    """fused=True (the default): a shape's first call times the fused plan and the unfused
    path on the GPU (both times kept), and its output is right whichever wins."""
    ops = cuda_backend.CudaBackend(0, precision=precision, fused=True)
    unfused = cuda_backend.CudaBackend(0, precision=precision, fused=False)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 32, 52, 52)).astype(np.float32)
    w = (rng.standard_normal((64, 32, 3, 3)) * 0.06).astype(np.float32)
    biases = rng.standard_normal(64).astype(np.float32)
    outputs = []
    for backend in (ops, unfused):
        x_nhwc = backend._relayout(backend._activation(backend.asarray(x)), True)
        outputs.append(backend.to_host(backend.conv_bias_forward(
            x_nhwc, backend.freeze_(backend.asarray(w)), backend.freeze_(backend.asarray(biases)),
            "leaky", 1, 1, 1)))
    made = cg.fusions(ops.dnn)
    key = made.key(x.shape, w.shape, 1, 1, 1, 1, ops.dtype, "leaky")
    assert key in made.timings, made.refusals.get(key)
    fused_ms, unfused_ms = made.timings[key]
    assert 0 < fused_ms < 100 and 0 < unfused_ms < 100
    assert (made.plans[key] is not None) == (fused_ms <= unfused_ms)
    assert relative_error(*outputs) <= {"fp16": 1e-2, "bf16": 3e-2}[precision]


@pytest.mark.gpu
def test_fused_convolution_is_recorded_and_replayed(fused_pair):
    """A fused convolution captured into a CUDA graph replays to the eager values, and on new
    input values (zeros: y = mish(bias) in every position) computes from them."""
    fused, _ = fused_pair
    rng = np.random.default_rng(5)
    biases = rng.standard_normal(32).astype(np.float32)
    w = fused.freeze_(fused.asarray((rng.standard_normal((32, 16, 3, 3)) * 0.1)
                                    .astype(np.float32)))
    b = fused.freeze_(fused.asarray(biases))
    x = fused._relayout(fused._activation(fused.asarray(
        rng.standard_normal((2, 16, 20, 20)).astype(np.float32))), True)
    out = {}

    def step():
        out["y"] = fused.conv_bias_forward(x, w, b, "mish", 1, 1, 1)

    step()  # eager first: the plan is made and run
    eager = fused.to_host(out["y"])
    key = cg.FusedConvolutions.key(x.shape, w.shape, 1, 1, 1, 1, fused.dtype, "mish")
    plan = cg.fusions(fused.dnn).plans.get(key)
    assert plan is not None and plan.ran, cg.fusions(fused.dnn).refusals.get(key)
    captured = fused.capture(step)
    captured.replay()
    np.testing.assert_array_equal(fused.to_host(out["y"]), eager)
    fused._zero_(x)
    captured.replay()
    expected = np.broadcast_to(activations.activate(biases.astype(np.float64), "mish")
                               [None, :, None, None], eager.shape)
    assert relative_error(fused.to_host(out["y"]), expected) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("cfg", ["cfg/yolov4-tiny.cfg", "cfg/yolov3-tiny.cfg"])
def test_networks_predict_alike_fused_and_unfused(cfg, precision, tmp_path, monkeypatch):
    """predict, eager and recorded (the third call replays), BN folded: the fused backend's
    outputs are the unfused one's within the storage type's rounding, its replays equal, and
    it did fuse convolutions."""
    outputs = []
    executed = []  # the fused plans run (plans are shared by the process's backends, so an
    # earlier test may have made this network's: count runs, not plans made)
    execute = cg.FusedConvolutions.execute
    monkeypatch.setattr(cg.FusedConvolutions, "execute",
                        lambda self, plan, *pointers: (executed.append(plan.key),
                                                       execute(self, plan, *pointers))[1])
    for fused in (False, "always"):
        ops = cuda_backend.CudaBackend(0, precision=precision, fused=fused)
        net = Network(os.path.join(ROOT, cfg), seed=3, quiet=True, backend=ops)
        if not outputs:
            net.save_weights(str(tmp_path / "w.weights"))
        net.load_weights(str(tmp_path / "w.weights"))
        net.fold_batchnorm()
        images = np.random.default_rng(0).random((2,) + tuple(net.input_shape),
                                                 dtype=np.float32)
        runs = [net.predict(images, batch_size=2) for _ in range(4)]
        np.testing.assert_array_equal(runs[2], runs[3])
        assert relative_error(runs[0], runs[3]) <= 1e-2  # eager against replayed
        outputs.append(runs[3])
    assert executed, "no convolution of the network fused"
    error = relative_error(outputs[1], outputs[0])
    assert error <= {"fp16": 1e-2, "bf16": 3e-2}[precision], f"{cfg}: {error:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", REDUCED)
def test_a_plan_loaded_from_disk_computes_what_the_compiled_one_did(precision, tmp_path,
                                                                    monkeypatch):
    """A plan compiled and written, then loaded from its JSON by a fresh FusedConvolutions
    (no plan in memory: a new process as far as plans go) and run: bitwise the same output,
    and a capture of it replays."""
    ops = cuda_backend.CudaBackend(0, precision=precision, fused="always")
    cg.fusions(ops.dnn, ops.device)  # NVRTC loaded, as the backend's first call does
    rng = np.random.default_rng(7)
    x = ops._relayout(ops._activation(ops.asarray(
        rng.standard_normal((2, 32, 26, 26)).astype(np.float32))), True)
    w = ops.freeze_(ops.asarray((rng.standard_normal((64, 32, 3, 3)) * 0.06).astype(np.float32)))
    b = ops.freeze_(ops.asarray(rng.standard_normal(64).astype(np.float32)))
    key = cg.FusedConvolutions.key(x.shape, w.shape, 1, 1, 1, 1, ops.dtype, "mish")
    outputs, origins, seconds = [], [], []
    for _ in range(2):
        graph = cg.CudnnGraph.load()
        made = cg.FusedConvolutions(graph, ops.dnn.handle, plan_cache.RecordStore(str(tmp_path)),
                                    cg.disk_context(graph, ops.device))
        monkeypatch.setitem(cg._FUSIONS, id(ops.dnn), (ops.dnn, made))
        y = ops.conv_bias_forward(x, w, b, "mish", 1, 1, 1)
        assert made.plans.get(key) is not None, made.refusals.get(key)
        outputs.append(ops.to_host(y))
        origins.append(made.origins[key])
        seconds.append(made.build_seconds[key])
    assert origins == [cg.COMPILED, cg.LOADED]
    print(f"{precision} mish plan: compiled in {seconds[0]:.3f} s, loaded in {seconds[1]:.3f} s")
    assert seconds[1] < seconds[0], "loading the plan took longer than compiling it"
    np.testing.assert_array_equal(outputs[1], outputs[0])
    out = {}
    captured = ops.capture(lambda: out.update(y=ops.conv_bias_forward(x, w, b, "mish", 1, 1, 1)))
    captured.replay()
    np.testing.assert_array_equal(ops.to_host(out["y"]), outputs[0])


FIRST_PREDICT = """
import json, sys, time
import numpy as np
from engine import Network
from engine.backends.cuda import CudaBackend, cudnn_graph
ops = CudaBackend(0, precision="fp16")
net = Network(sys.argv[1], seed=3, quiet=True, backend=ops)
net.fold_batchnorm()
images = np.random.default_rng(0).random((1,) + tuple(net.input_shape), dtype=np.float32)
started = time.perf_counter()
net.predict(images, batch_size=1)
seconds = time.perf_counter() - started
made = cudnn_graph.fusions(ops.dnn)
print(json.dumps({"origins": list(made.origins.values()), "seconds": seconds,
                  "fused": sum(plan is not None for plan in made.plans.values()),
                  "summary": made.summary()}))
"""


@pytest.mark.gpu
def test_the_next_process_compiles_no_plan(tmp_path):
    """yolov4-tiny's first predict at batch 1 in fp16 (the default: fused where faster), in two
    processes sharing a cache folder: the first compiles its plans, the second compiles none
    (each shape's plan loaded, or its refusal read) and fuses the shapes the first kept."""
    environment = dict(os.environ, ENGINE_CACHE_DIR=str(tmp_path))
    results = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", FIRST_PREDICT,
                               os.path.join(ROOT, "cfg/yolov4-tiny.cfg")], cwd=ROOT,
                              env=environment, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = results
    print(f"first predict: {first['seconds']:.2f} s, then {second['seconds']:.2f} s")
    assert first["fused"] > 0 and cg.COMPILED in first["origins"], first["summary"]
    assert cg.COMPILED not in second["origins"], second["summary"]
    assert len(second["origins"]) == len(first["origins"]), second["summary"]
    assert second["origins"].count(cg.LOADED) == first["fused"], second["summary"]
