"""Eager inference convolutions through cuDNN backend-API execution plans (cudnn_graph.
ConvolutionGraphs, CudaBackend._time_eager_graphs).

Without a GPU: the plain convolution graph (x, w -> y) recorded by the stand-in for libcudnn's
backend API of tests/test_fused_convolution.py and evaluated in float64 by its interpreter of
cuDNN's documented semantics, NCHW (KCRS filters) and NHWC (KRSC), against a plain numpy
convolution; which engines each precision takes by their numerical and behaviour notes; the
backend's choice on fakes (test_conv_workspace's fake cuDNN and clocks): a graph plan only where
it agreed with the eager algorithm and timed faster by the host's clock, never in recordings or
training, its workspace kept. On the GPU (-m gpu): eager against legacy outputs for mnist's and
cifar's batch-1 shapes in fp32 and tf32, the chosen plans timed faster, and mnist.cfg's whole
eager forward against the CPU backend."""

import ctypes
import itertools
import os
import time

import numpy as np
import pytest

from engine.backends.cuda import backend as cuda_backend
from engine.backends.cuda import cudnn_graph as cg
from engine.backends.cuda.cudnn import CUDNN_DATA_FLOAT, CUDNN_DATA_HALF
from engine.errors import BackendError

from test_conv_workspace import X2, MiB, W, X, forward, gpu  # noqa: F401 (gpu: a fixture)
from test_fused_convolution import (REFUSED, FakeGraphLibrary, convolution, evaluate, nhwc,
                                    strided)
from test_recorded_steps import FakeArray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARD_KIND = cg.CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR
DATA_KIND = cg.CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR
FILTER_KIND = cg.CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR
NOTE = {name: getattr(cg, "CUDNN_NUMERICAL_NOTE_" + name)
        for name in ("TENSOR_CORE", "DOWN_CONVERT_INPUTS", "REDUCED_PRECISION_REDUCTION", "FFT",
                     "NONDETERMINISTIC", "WINOGRAD", "WINOGRAD_TILE_4x4")}


class NotedGraphLibrary(FakeGraphLibrary):
    """FakeGraphLibrary whose engines have numerical and behaviour notes (by their rank in the
    heuristics' list: notes[rank], behaviours[rank]), per-rank workspaces, and whose executions
    advance a host clock ({"wall": ms}) by walls[rank] ms; each configuration notes the
    heuristics mode that gave it, each execution the rank it ran (`ran`)."""

    def __init__(self, notes=None, behaviours=None, walls=None, workspaces=None, clock=None,
                 **options):
        super().__init__(**options)
        self.notes, self.behaviours = notes or {}, behaviours or {}
        self.walls, self.workspaces = walls or {}, workspaces or {}
        self.clock = clock if clock is not None else {"wall": 0.0}
        self.ran = []
        self.ran_kinds = []  # the operation kind of each execution's graph

    def rank_of(self, plan_address):
        return self[self[plan_address].value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]].rank

    def cudnnBackendGetAttribute(self, descriptor, attribute, kind, requested, count, array):
        record = self.descriptors[descriptor.value]
        if attribute == cg.CUDNN_ATTR_ENGINECFG_ENGINE:
            assert record.kind == cg.CUDNN_BACKEND_ENGINECFG_DESCRIPTOR and record.finalized
            assert kind == cg.CUDNN_TYPE_BACKEND_DESCRIPTOR and requested == 1
            engine = self.descriptors[array[0]]
            assert engine.kind == cg.CUDNN_BACKEND_ENGINE_DESCRIPTOR
            engine.rank, engine.finalized = record.rank, True
            count._obj.value = 1
            return 0
        lists = {cg.CUDNN_ATTR_ENGINE_NUMERICAL_NOTE: (cg.CUDNN_TYPE_NUMERICAL_NOTE, self.notes),
                 cg.CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE: (cg.CUDNN_TYPE_BEHAVIOR_NOTE,
                                                      self.behaviours)}
        if attribute in lists:
            assert record.kind == cg.CUDNN_BACKEND_ENGINE_DESCRIPTOR and record.finalized
            expected_kind, by_rank = lists[attribute]
            assert kind == expected_kind
            values = by_rank.get(record.rank, [])
            count._obj.value = len(values)
            for index, value in enumerate(values[:requested]):
                array[index] = value
            return 0
        status = super().cudnnBackendGetAttribute(descriptor, attribute, kind, requested, count,
                                                  array)
        if attribute == cg.CUDNN_ATTR_ENGINEHEUR_RESULTS and array is not None:
            for address in array[:count._obj.value]:
                self[address].mode = record.value(cg.CUDNN_ATTR_ENGINEHEUR_MODE)[0]
        if attribute == cg.CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE:
            array._obj.value = self.workspaces.get(self.rank_of(descriptor.value),
                                                   self.workspace)
        return status

    def cudnnBackendExecute(self, handle, plan, pack):
        status = super().cudnnBackendExecute(handle, plan, pack)
        if status == 0:
            rank = self.rank_of(plan.value)
            self.ran.append(rank)
            self.ran_kinds.append(self.operations(plan.value)[0].kind)
            self.clock["wall"] += self.walls.get(rank, 1.0)
        return status


def graphs_of(library, exact=True, use="inference"):
    return cg.ConvolutionGraphs(cg.CudnnGraph(library, declare=False), ctypes.c_void_p(0xCAFE),
                                exact=exact, use=use)


def key(x_shape=(2, 8, 7, 6), w_shape=(16, 8, 3, 3), stride=1, padding=1, groups=1, dilation=1,
        dtype=np.float32, channels_last=False):
    return (x_shape, w_shape, stride, padding, groups, dilation, np.dtype(dtype), channels_last)


def tensors_by_uid(library):
    return {d.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID)[0]: d for d in library.descriptors.values()
            if d.kind == cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR}


def nchw(array):
    return np.ascontiguousarray(array).reshape(-1)


# ---- the graph -----------------------------------------------------------------------------------
# (x shape, w shape, stride, padding, groups, dilation): 3x3, 1x1 in two groups with stride 2,
# 5 filters with strides (2, 1) and dilation 2
GRAPH_SHAPES = [((2, 8, 7, 6), (16, 8, 3, 3), 1, 1, 1, 1),
                ((2, 8, 7, 6), (8, 4, 1, 1), 2, 0, 2, 1),
                ((1, 8, 9, 7), (5, 8, 3, 3), (2, 1), 2, 1, 2)]


@pytest.mark.parametrize("dtype,data_type,channels_last", [
    (np.float32, CUDNN_DATA_FLOAT, False), (np.float32, CUDNN_DATA_FLOAT, True),
    (np.float16, CUDNN_DATA_HALF, True)])
def test_the_graph_is_the_legacy_convolution(dtype, data_type, channels_last):
    """One operation, y = conv(x, w), on tensors X, W, Y (no bias, nothing virtual) of the
    storage type, laid out as the legacy descriptors (NCHW and KCRS, or NHWC and KRSC): run by
    cuDNN's documented semantics it is Darknet's convolution."""
    rng = np.random.default_rng(0)
    layout = nhwc if channels_last else nchw
    for x_shape, w_shape, stride, padding, groups, dilation in GRAPH_SHAPES:
        library = NotedGraphLibrary()
        (plan, *_) = graphs_of(library).candidates(key(x_shape, w_shape, stride, padding, groups,
                                                       dilation, dtype, channels_last))
        operations = library.operations(plan.plan.value)
        assert [o.kind for o in operations] == [
            cg.CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR]
        tensors = tensors_by_uid(library)
        assert sorted(tensors) == [cg.X_UID, cg.W_UID, cg.Y_UID]
        assert {t.value(cg.CUDNN_ATTR_TENSOR_DATA_TYPE)[0] for t in tensors.values()} == \
            {data_type}
        stride_y, stride_x = (stride, stride) if isinstance(stride, int) else stride
        x = rng.standard_normal(x_shape)
        w = rng.standard_normal(w_shape)
        expected = convolution(x, w, stride_y, stride_x, padding, dilation, groups)
        assert plan.y_shape == expected.shape
        y = np.full(expected.size, np.nan)
        evaluate(library, plan.plan.value, {cg.X_UID: layout(x), cg.W_UID: layout(w),
                                            cg.Y_UID: y})
        if channels_last:
            got = np.moveaxis(y.reshape(expected.shape[0], *expected.shape[2:],
                                        expected.shape[1]), -1, 1)
        else:
            got = y.reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def taps(w_shape, dy_shape, stride_y, stride_x, dilation, groups):
    """For each filter k and tap (r, s): (k, r, s, the index of the padded input's elements
    that tap reads for every output position: channels of k's group, rows, columns)."""
    f, c_group, kh, kw = w_shape
    _, _, oh, ow = dy_shape
    for k, r, s in itertools.product(range(f), range(kh), range(kw)):
        g = k // (f // groups)
        yield k, r, s, (slice(None), slice(g * c_group, (g + 1) * c_group),
                        slice(r * dilation, r * dilation + stride_y * (oh - 1) + 1, stride_y),
                        slice(s * dilation, s * dilation + stride_x * (ow - 1) + 1, stride_x))


def data_gradient(dy, w, x_shape, stride_y, stride_x, pad, dilation, groups):
    """dx of Darknet's convolution (test_fused_convolution.convolution) for y's gradient dy:
    each output's gradient scattered back through the filters, in plain loops."""
    n, c, h, width = x_shape
    padded = np.zeros((n, c, h + 2 * pad, width + 2 * pad))
    for k, r, s, read in taps(w.shape, dy.shape, stride_y, stride_x, dilation, groups):
        padded[read] += np.einsum("nhw,c->nchw", dy[:, k], w[k, :, r, s])
    return padded[:, :, pad:pad + h, pad:pad + width]


def filter_gradient(x, dy, w_shape, stride_y, stride_x, pad, dilation, groups):
    """dw of Darknet's convolution for y's gradient dy, in plain loops."""
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dw = np.zeros(w_shape)
    for k, r, s, read in taps(w_shape, dy.shape, stride_y, stride_x, dilation, groups):
        dw[k, :, r, s] = np.einsum("nchw,nhw->c", padded[read], dy[:, k])
    return dw


# Each backward operation's attribute prefix (cudnn_graph.h) and roles: (written, read, read).
BACKWARD = {"data": (DATA_KIND, "CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_", ("DX", "W", "DY")),
            "filter": (FILTER_KIND, "CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_",
                       ("DW", "X", "DY"))}


def evaluate_backward(library, plan, buffers):
    """Run a recorded backward-data or backward-filter plan on flat float64 buffers by unique
    id, by cuDNN's documented semantics: out = alpha * gradient + beta * out (out not read
    where beta is 0)."""
    (operation,) = library.operations(plan)
    direction = next(d for d, (kind, _, _) in BACKWARD.items() if kind == operation.kind)
    _, prefix, roles = BACKWARD[direction]

    def attribute(name):
        return operation.value(getattr(cg, prefix + name))[0]

    def tensor(name):
        descriptor = library[attribute(name)]
        assert descriptor.kind == cg.CUDNN_BACKEND_TENSOR_DESCRIPTOR and descriptor.finalized
        return strided(buffers[descriptor.value(cg.CUDNN_ATTR_TENSOR_UNIQUE_ID)[0]], descriptor)

    assert operation.finalized
    conv = library[attribute("CONV_DESC")]
    setting = {name: conv.value(getattr(cg, "CUDNN_ATTR_CONVOLUTION_" + name))
               for name in ("COMP_TYPE", "CONV_MODE", "SPATIAL_DIMS", "DILATIONS",
                            "FILTER_STRIDES", "PRE_PADDINGS", "POST_PADDINGS")}
    assert setting["COMP_TYPE"] == [CUDNN_DATA_FLOAT] and setting["CONV_MODE"] == [1]
    assert setting["SPATIAL_DIMS"] == [2]
    assert setting["PRE_PADDINGS"] == setting["POST_PADDINGS"]
    assert len(set(setting["PRE_PADDINGS"])) == len(set(setting["DILATIONS"])) == 1
    geometry = (*setting["FILTER_STRIDES"], setting["PRE_PADDINGS"][0],
                setting["DILATIONS"][0])
    out, a, dy = (tensor(name) for name in roles)
    if direction == "data":
        groups = out.shape[1] // a.shape[1]
        gradient = data_gradient(dy, a, out.shape, *geometry, groups)
    else:
        groups = a.shape[1] // out.shape[1]
        gradient = filter_gradient(a, dy, out.shape, *geometry, groups)
    alpha, beta = attribute("ALPHA"), attribute("BETA")
    out[...] = alpha * gradient + (beta * out if beta else 0.0)


@pytest.mark.parametrize("direction", ["data", "filter"])
@pytest.mark.parametrize("dtype,data_type,channels_last", [
    (np.float32, CUDNN_DATA_FLOAT, False), (np.float32, CUDNN_DATA_FLOAT, True),
    (np.float16, CUDNN_DATA_HALF, True)])
def test_the_backward_graphs_are_the_legacy_backward_calls(direction, dtype, data_type,
                                                           channels_last):
    """One backward operation on tensors X, W, Y of the storage type, laid out as the legacy
    descriptors: run by cuDNN's documented semantics, the backward data overwrites x's
    gradient (beta 0) with the gradient of Darknet's convolution, the backward filter adds
    the filters' gradient to what they hold (beta 1: the legacy call accumulates into the
    weight updates), for strides, padding, groups and dilation. The gradients also satisfy
    <conv(x, w), dy> = <x, dx> = <w, dw> with the forward's reference convolution."""
    rng = np.random.default_rng(1)
    layout = nhwc if channels_last else nchw
    for x_shape, w_shape, stride, padding, groups, dilation in GRAPH_SHAPES:
        library = NotedGraphLibrary()
        (plan, *_) = graphs_of(library, use=direction).candidates(
            key(x_shape, w_shape, stride, padding, groups, dilation, dtype, channels_last))
        assert [o.kind for o in library.operations(plan.plan.value)] == [BACKWARD[direction][0]]
        tensors = tensors_by_uid(library)
        assert sorted(tensors) == [cg.X_UID, cg.W_UID, cg.Y_UID]
        assert {t.value(cg.CUDNN_ATTR_TENSOR_DATA_TYPE)[0] for t in tensors.values()} == \
            {data_type}
        stride_y, stride_x = (stride, stride) if isinstance(stride, int) else stride
        x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
        y = convolution(x, w, stride_y, stride_x, padding, dilation, groups)
        assert plan.y_shape == y.shape
        dy = rng.standard_normal(y.shape)
        geometry = (stride_y, stride_x, padding, dilation, groups)
        if direction == "data":
            want = data_gradient(dy, w, x_shape, *geometry)
            written = np.full(x.size, np.nan)  # beta 0: never read
            buffers = {cg.X_UID: written, cg.W_UID: layout(w), cg.Y_UID: layout(dy)}
            np.testing.assert_allclose(np.sum(want * x), np.sum(y * dy), rtol=1e-9)
        else:
            held = rng.standard_normal(w_shape)  # the updates already accumulated
            gradient = filter_gradient(x, dy, w_shape, *geometry)
            want = held + gradient
            written = layout(held).copy()
            buffers = {cg.X_UID: layout(x), cg.W_UID: written, cg.Y_UID: layout(dy)}
            np.testing.assert_allclose(np.sum(gradient * w), np.sum(y * dy), rtol=1e-9)
        evaluate_backward(library, plan.plan.value, buffers)
        if channels_last:
            got = np.moveaxis(written.reshape(want.shape[0], *want.shape[2:], want.shape[1]),
                              -1, 1)
        else:
            got = written.reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_execute_binds_x_w_and_y_and_keep_destroys_the_others():
    library = NotedGraphLibrary(engines=3)
    graphs = graphs_of(library)
    shape = key()
    first, second, third = graphs.candidates(shape)
    graphs.execute(second, 0x1000, 0x2000, 0x3000, 0x4000)
    graphs.execute(second, 0x1000, 0x2000, 0x3000, 0x4000)
    (_, handle, plan, pack), _ = [c for c in library.calls if c[0] == "execute"]
    assert handle.value == 0xCAFE and plan == second.plan.value and second.ran
    assert library[pack].value(cg.CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS) == [cg.X_UID, cg.W_UID,
                                                                          cg.Y_UID]
    assert library[pack].value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS) == [0x1000, 0x2000,
                                                                             0x3000]
    assert library[pack].value(cg.CUDNN_ATTR_VARIANT_PACK_WORKSPACE) == [0x4000]
    assert len(second.variant_packs) == 1
    graphs.keep(shape, second)
    assert graphs.candidates(shape) == [second]
    assert library[first.plan.value].destroyed and library[third.plan.value].destroyed
    assert not library[second.plan.value].destroyed and not library[pack].destroyed
    graphs.keep(shape, None)
    assert graphs.candidates(shape) == [] and library.alive() == []


# ---- which engines -------------------------------------------------------------------------------
def candidate_ranks(library, graphs, shape):
    return [library[library[p.plan.value].value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]]
            .rank for p in graphs.candidates(shape)]


@pytest.mark.parametrize("size,exact,expected", [
    (3, True, [0, 6, 7]),      # exact: no tensor cores, down conversion, reduced reduction, FFT
    (5, True, [0, 7]),         # and no Winograd for filters larger than 3x3
    (3, False, [0, 1, 2, 3]),  # tf32, fp16, bf16: any (at most EAGER_CANDIDATES)
    (5, False, [0, 1, 2, 3]),
])
def test_engines_by_their_notes(size, exact, expected):
    """Engines in the heuristics' order: 0 plain, 1 TENSOR_CORE, 2 DOWN_CONVERT_INPUTS,
    3 REDUCED_PRECISION_REDUCTION, 4 FFT, 5 compiled at run time, 6 WINOGRAD, 7
    NONDETERMINISTIC, 8 WINOGRAD_TILE_4x4 with TENSOR_CORE."""
    notes = {1: [NOTE["TENSOR_CORE"]], 2: [NOTE["DOWN_CONVERT_INPUTS"]],
             3: [NOTE["REDUCED_PRECISION_REDUCTION"]], 4: [NOTE["FFT"]],
             6: [NOTE["WINOGRAD"]], 7: [NOTE["NONDETERMINISTIC"]],
             8: [NOTE["WINOGRAD_TILE_4x4"], NOTE["TENSOR_CORE"]]}
    behaviours = {5: [cg.CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION]}
    library = NotedGraphLibrary(engines=9, notes=notes, behaviours=behaviours)
    graphs = graphs_of(library, exact=exact)
    shape = key(w_shape=(16, 8, size, size), padding=size // 2)
    assert candidate_ranks(library, graphs, shape) == expected
    engines = [d for d in library.descriptors.values()
               if d.kind == cg.CUDNN_BACKEND_ENGINE_DESCRIPTOR]
    assert engines and all(e.destroyed for e in engines)  # read, then released
    plans = [d for d in library.descriptors.values()
             if d.kind == cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR]
    assert len(plans) == len(expected)  # an engine left out is not finalized


def test_engine_refusal_names_the_notes():
    refusal = cg.engine_refusal
    assert refusal([NOTE["TENSOR_CORE"], NOTE["FFT"]], [], True, 3) == \
        "numerical note TENSOR_CORE, FFT"
    assert refusal([NOTE["WINOGRAD"], NOTE["NONDETERMINISTIC"]], [], True, 5) == \
        "numerical note WINOGRAD"
    assert refusal([NOTE["WINOGRAD"], NOTE["NONDETERMINISTIC"]], [], True, 3) is None
    assert refusal([NOTE["TENSOR_CORE"]], [], False, 5) is None
    assert refusal([], [cg.CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION], False, 1) == \
        "compiled at run time"


def test_the_fallback_mode_is_asked_only_where_mode_a_gave_no_plan():
    library = NotedGraphLibrary(engines=2, notes={0: [NOTE["TENSOR_CORE"]]})
    graphs = graphs_of(library)
    (plan,) = graphs.candidates(key())
    config = library[library[plan.plan.value].value(cg.CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG)[0]]
    assert (config.mode, config.rank) == (cg.CUDNN_HEUR_MODE_A, 1)
    assert library.kinds_created().count(cg.CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR) == 1

    library = NotedGraphLibrary(engines=2, notes={0: [NOTE["FFT"]], 1: [NOTE["FFT"]]})
    graphs = graphs_of(library)
    assert graphs.candidates(key()) == []
    assert library.kinds_created().count(cg.CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR) == 2
    assert graphs.refusals[key()] == (
        "convolution graph: mode A: none of 2 engine configurations taken (the first: "
        "numerical note FFT); mode FALLBACK: none of 2 engine configurations taken (the first: "
        "numerical note FFT)")


def refuse_kind(kind):
    return lambda library, descriptor: REFUSED if descriptor.kind == kind else 0


@pytest.mark.parametrize("library,reason", [
    (NotedGraphLibrary(engines=0), "mode A: no engine; mode FALLBACK: no engine"),
    (NotedGraphLibrary(engines=2, refused_configs=(0, 1)),
     "cudnnBackendFinalize(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR) failed"),
    (NotedGraphLibrary(workspace=cg.WORKSPACE_LIMIT + 1), "workspace of"),
    (NotedGraphLibrary(refuse=refuse_kind(cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)),
     "cudnnBackendFinalize(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)"),
])
def test_a_refused_shape_has_no_plan_and_is_not_tried_again(library, reason):
    graphs = graphs_of(library)
    assert graphs.candidates(key()) == []
    assert reason in graphs.refusals[key()]
    assert library.alive() == []
    calls = len(library.calls)
    assert graphs.candidates(key()) == [] and len(library.calls) == calls


def test_no_backend_api_means_no_graphs(monkeypatch):
    """Where libcudnn's backend API does not load (cuDNN before 9): None, made once."""
    def missing(cls):
        raise BackendError("the cuDNN library has no cudnnBackendExecute; cuDNN 9 is needed")

    monkeypatch.setattr(cg.CudnnGraph, "load", classmethod(missing))
    monkeypatch.setattr(cg, "_CONVOLUTION_GRAPHS", {})
    dnn = type("Dnn", (), {"handle": ctypes.c_void_p(1), "math_type": 3})()
    assert cg.convolution_graphs(dnn) is None and cg.convolution_graphs(dnn) is None
    library = NotedGraphLibrary()
    monkeypatch.setattr(cg.CudnnGraph, "load", classmethod(
        lambda cls: cls(library, declare=False)))
    other = type("Dnn", (), {"handle": ctypes.c_void_p(2), "math_type": 0})()
    made = cg.convolution_graphs(other)
    assert made is cg.convolution_graphs(other) and not made.exact  # math type 0: tf32
    fma = type("Dnn", (), {"handle": ctypes.c_void_p(3), "math_type": 3})()
    assert cg.convolution_graphs(fma).exact


# ---- the backend's choice, on fakes --------------------------------------------------------------
@pytest.fixture
def eager(gpu, monkeypatch):  # noqa: F811 (gpu: test_conv_workspace's fixture)
    """test_conv_workspace's fake GPU (fp32) with graph plans of every use (eager.uses;
    eager.graphs: inference's) from one NotedGraphLibrary on its host clock; eager.backend()
    makes a backend whose agreement check reads eager.errors (relative RMS difference of the
    plan of each rank, or of (operation kind, rank), against the legacy call) and whose other
    add_ calls (a gradient added to the updates) are noted in eager.added."""
    library = NotedGraphLibrary(engines=2, clock=gpu.clock)
    uses = {use: graphs_of(library, use=use) for use in cg.GRAPH_USES}
    monkeypatch.setattr(cg, "convolution_graphs", lambda dnn, use="inference": uses[use])
    gpu.library, gpu.graphs, gpu.uses, gpu.errors = library, uses["inference"], uses, {}
    gpu.added = []
    gpu.reference_scales = []  # the references' sums of squares, in turn (then 1.0 each)
    # the fakes' calls take 1-10 by the host's clock: training times plans up to 10 a call
    monkeypatch.setattr(cuda_backend, "TRAINING_GRAPH_LONGEST_US", 10_000_000)
    gpu.dnn.candidates[("forward", X)] = [(1, 0, 1.0), (0, 0, 2.0)]
    gpu.dnn.wall_costs[(X, 1)] = gpu.dnn.wall_costs[(X, 0)] = 5.0
    make = gpu.backend

    def backend():
        ops = make()

        def scale_(x, factor):  # the agreement check: the difference, in the graph's output
            assert factor == -1.0
            x.negated = True
            return x

        def add_(dst, src):
            if not getattr(dst, "negated", False):  # a gradient added to the weight updates
                gpu.added.append((dst.ptr, src.ptr))
                return dst
            assert not getattr(src, "negated", False)
            dst.difference = (library.ran_kinds[-1], library.ran[-1])
            return dst

        def sum_of_squares(x):
            difference = getattr(x, "difference", None)
            if difference is None:  # the reference's
                return gpu.reference_scales.pop(0) if gpu.reference_scales else 1.0
            del x.difference, x.negated
            return gpu.errors.get(difference, gpu.errors.get(difference[1], 1e-7)) ** 2

        ops.scale_, ops.add_, ops.sum_of_squares = scale_, add_, sum_of_squares
        return ops

    gpu.backend = backend
    return gpu


def executions(library):
    return [call for call in library.calls if call[0] == "execute"]


def only_plan(fake, x_shape=X):
    (plan,) = [p for k, p in fake.dnn.plans.items() if k[0] == x_shape]
    return plan


def test_a_graph_plan_faster_by_the_host_clock_is_kept_and_run(eager):
    """Eager calls of the legacy algorithm take 5 ms by the host's clock, the graph plans 3 and
    2: the second is kept, the first destroyed; eager inference calls run it from then on
    (the legacy call no more)."""
    eager.library.walls.update({0: 3.0, 1: 2.0})
    ops = eager.backend()
    y = forward(ops, X)
    plan = only_plan(eager)
    assert plan.graph_timed and plan.eager_graph is not None
    assert eager.library.rank_of(plan.eager_graph.plan.value) == 1
    assert eager.graphs.timings[plan.key] == (5.0, [3.0, 2.0])  # per call
    summary = eager.graphs.summary().splitlines()
    assert summary[0] == "eager convolution graphs: 1 of 1 shapes run a plan"
    assert summary[1] == (f"  x {X} w {W} stride 1 pad 1 groups 1 dilation 1 float32: plan; "
                          "legacy 5000000.0 us, plans 3000000.0, 2000000.0 us")
    (other,) = [d for a, d in eager.library.descriptors.items()
                if d.kind == cg.CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR
                and a != plan.eager_graph.plan.value]
    assert other.destroyed
    # the call's own output: the kept plan's, as every later eager call's
    assert eager.library.ran[-1] == 1 and y.shape == plan.y_shape
    pack = eager.library[executions(eager.library)[-1][3]]
    assert pack.value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)[2] == y.ptr
    legacy, runs = len(eager.dnn.calls), len(eager.library.ran)
    y = forward(ops, X)
    assert len(eager.dnn.calls) == legacy and eager.library.ran[runs:] == [1]
    pack = eager.library[executions(eager.library)[-1][3]]
    assert pack.value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)[2] == y.ptr


@pytest.mark.parametrize("walls", [{0: 6.0, 1: 5.5}, {0: 5.0, 1: 5.0}])  # slower; as fast
def test_graph_plans_not_faster_leave_the_legacy_call(eager, walls):
    eager.library.walls.update(walls)
    ops = eager.backend()
    forward(ops, X)
    plan = only_plan(eager)
    assert plan.graph_timed and plan.eager_graph is None
    assert eager.graphs.candidates(plan.key) == [] and eager.library.alive() == []
    runs = len(eager.library.ran)
    forward(ops, X)
    assert eager.dnn.calls[-1][2] == plan.eager_algo and len(eager.library.ran) == runs


@pytest.mark.parametrize("error", [1e-4, float("nan")])
def test_a_graph_plan_that_differs_is_not_kept_however_fast(eager, error):
    """Exact float32 allows 8e-6 relative RMS difference (summation order): the fastest plan,
    differing by more (or NaN), is passed over for the next that agrees and is faster than the
    legacy call; it is not timed."""
    eager.library.walls.update({0: 1.0, 1: 2.0})
    eager.errors[0] = error
    ops = eager.backend()
    forward(ops, X)
    plan = only_plan(eager)
    assert eager.library.rank_of(plan.eager_graph.plan.value) == 1
    _, verdicts = eager.graphs.timings[plan.key]
    assert verdicts[0].startswith("differs: relative RMS difference ")
    assert verdicts[1] == 2.0
    assert "plans differs: relative RMS difference " in eager.graphs.summary()
    assert eager.library.ran.count(0) == 1  # its first run only


def test_tf32_allows_a_wider_difference(eager):
    eager.library.walls.update({0: 1.0, 1: 2.0})
    eager.errors[0] = 1e-3  # a TF32 rounding, against 3e-3
    ops = eager.backend()
    ops.precision = "tf32"
    forward(ops, X)
    assert eager.library.rank_of(only_plan(eager).eager_graph.plan.value) == 0


def test_recordings_never_run_graph_plans_and_training_has_its_own(eager):
    """Inference's plan is not training's: a training forward chooses its own (against
    forward_algo, the call training makes), and recordings, and inference calls while a fused
    plan is checked, run the legacy forward_algo."""
    eager.library.walls.update({0: 1.0, 1: 2.0})
    ops = eager.backend()
    forward(ops, X)
    plan = only_plan(eager)
    assert plan.eager_graph is not None and plan.training_graphs == {}
    runs = len(eager.library.ran)
    with ops.recording():
        forward(ops, X)
        ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
    assert eager.dnn.calls[-1][2] == plan.forward_algo
    assert len(eager.library.ran) == runs and plan.training_graphs == {}
    ops._eager_algorithms = False  # as while a fused plan is checked against the unfused path
    forward(ops, X)
    assert eager.dnn.calls[-1][2] == plan.forward_algo
    assert len(eager.library.ran) == runs
    ops._eager_algorithms = True
    ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
    chosen = plan.training_graphs["forward"]
    assert chosen is not None and chosen is not plan.eager_graph
    assert eager.uses["forward"].timings[plan.key] == (5.0, [1.0, 2.0])  # legacy, plans
    assert eager.library.ran_kinds[runs:] == [FORWARD_KIND] * len(eager.library.ran[runs:])
    assert eager.library.ran[-1] == 0  # the call's output: the plan kept (rank 0)


def test_a_shape_first_seen_in_training_or_recording_is_timed_at_its_first_eager_call(eager):
    eager.library.walls.update({0: 1.0})
    ops = eager.backend()
    with ops.recording():
        ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
        forward(ops, X)
    plan = only_plan(eager)
    assert not plan.forward_timed and eager.library.calls == []
    ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
    assert plan.forward_timed and not plan.graph_timed
    assert plan.training_graphs["forward"] is not None and eager.graphs.plans == {}
    forward(ops, X)
    assert plan.graph_timed and plan.eager_graph is not None


def test_a_plan_of_one_legacy_candidate_is_timed_too(eager):
    """A shape with a single Find candidate is never timed by _time_forward_candidates; its
    graph plans are still timed against it at its first eager call."""
    eager.dnn.candidates[("forward", X2)] = [(4, 0, 1.0)]
    eager.dnn.wall_costs[(X2, 4)] = 5.0
    eager.library.walls.update({0: 1.0})
    ops = eager.backend()
    forward(ops, X2)
    plan = only_plan(eager, X2)
    assert plan.forward_timed and plan.graph_timed and plan.eager_graph is not None


def test_a_refused_shape_runs_the_legacy_call(eager):
    eager.library.engines = 0
    ops = eager.backend()
    for _ in range(2):
        forward(ops, X)
    plan = only_plan(eager)
    assert plan.graph_timed and plan.eager_graph is None
    assert "no engine" in eager.graphs.refusals[plan.key]
    assert eager.graphs.summary().endswith(
        "float32: legacy: convolution graph: mode A: no engine; mode FALLBACK: no engine")
    assert eager.dnn.calls[-1][2] == plan.eager_algo
    assert eager.library.kinds_created().count(cg.CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR) == 1


def test_misaligned_pointers_run_the_legacy_call(eager):
    eager.library.walls.update({0: 1.0})
    ops = eager.backend()
    x = FakeArray(X)
    x.ptr += 4  # a view starting one float in
    ops.conv_forward(x, FakeArray(W), 1, 1, 1)
    plan = only_plan(eager)
    assert not plan.graph_timed and eager.library.calls == []
    forward(ops, X)
    assert plan.eager_graph is not None
    runs = len(eager.library.ran)
    ops.conv_forward(x, FakeArray(W), 1, 1, 1)
    assert eager.dnn.calls[-1][2] == plan.eager_algo and len(eager.library.ran) == runs


def workspaces_given(fake, kept):
    """Plans of rank 0 and 1 needing 3 and 2 MiB, rank 0 the fastest (`kept`) or both slower
    than the legacy calls; returns the list the size of the workspace each execution gets is
    appended to, as it runs."""
    fake.library.workspaces.update({0: 3 * MiB, 1: 2 * MiB})
    fake.library.walls.update({0: 1.0, 1: 9.0} if kept else {0: 9.0, 1: 9.0})
    given = []
    execute = fake.library.cudnnBackendExecute

    def noting_execute(handle, plan, pack):
        workspace = fake.library[pack.value].value(cg.CUDNN_ATTR_VARIANT_PACK_WORKSPACE)[0]
        given.append(fake.device.live[workspace].size)
        return execute(handle, plan, pack)

    fake.library.cudnnBackendExecute = noting_execute
    return given


@pytest.mark.parametrize("kept", [True, False])
def test_the_workspace_covers_the_graph_plans_need(eager, kept):
    """Candidates needing 3 and 2 MiB (the legacy algorithms none): each runs in a workspace
    that holds it; a kept plan's need stays counted (its calls get the workspace), a plan not
    kept leaves none."""
    given = workspaces_given(eager, kept)
    ops = eager.backend()
    forward(ops, X)
    plan = only_plan(eager)
    # each candidate's first run and timed ones; a kept plan also computes the call's output
    assert len(given) == 2 + 2 * cuda_backend.EAGER_REPEATS + kept
    assert min(given) >= 3 * MiB
    if kept:
        assert plan.eager_graph.workspace == 3 * MiB and plan.forward_need == 3 * MiB
        assert ops._workspace_size == 3 * MiB
        forward(ops, X)
        pack = eager.library[executions(eager.library)[-1][3]]
        assert pack.value(cg.CUDNN_ATTR_VARIANT_PACK_WORKSPACE) == [ops._workspace.ptr]
    else:
        assert plan.eager_graph is None and ops._workspace is None


def test_no_graphs_where_the_backend_api_is_missing_or_turned_off(eager, monkeypatch):
    monkeypatch.setattr(cg, "convolution_graphs", lambda dnn, use="inference": None)
    ops = eager.backend()
    forward(ops, X)
    plan = only_plan(eager)
    assert plan.graph_timed and plan.eager_graph is None
    assert eager.dnn.calls[-1][2] == plan.eager_algo

    monkeypatch.setenv(cg.EAGER_GRAPHS_VARIABLE, "0")
    ops = eager.backend()
    assert ops.eager_graphs is False
    monkeypatch.setenv(cg.EAGER_GRAPHS_VARIABLE, "yes")
    with pytest.raises(BackendError, match=r"^ENGINE_EAGER_GRAPHS=yes: expected one of 1, 0$"):
        eager.backend()


def test_turned_off_nothing_is_built(eager, monkeypatch):
    monkeypatch.setenv(cg.EAGER_GRAPHS_VARIABLE, "0")
    ops = eager.backend()
    forward(ops, X)
    forward(ops, X)
    assert eager.library.calls == [] and not only_plan(eager).graph_timed


# ---- training, on fakes --------------------------------------------------------------------------
DY = (X[0], 4, 8, 8)  # y's gradient for X and W


@pytest.fixture
def training(eager):
    """eager's fake GPU with backward algorithms for X (data 2, filter 3: 5 a call by the
    host's clock, as the forward's), whose events are noted in order in training.events:
    ("legacy", kind, the array written), ("run", operation kind, the array written) for a
    graph plan's execution, ("zero", array) for every array zeroed, ("copy", source,
    destination) for every copy between arrays (addresses)."""
    dnn, library = eager.dnn, eager.library
    dnn.candidates[("data", X)] = [(2, 0, 1.0)]
    dnn.candidates[("filter", X)] = [(3, 0, 1.0)]
    dnn.wall_costs[(X, 2)] = dnn.wall_costs[(X, 3)] = 5.0
    events = eager.events = []
    legacy_filter, legacy_data = dnn.conv_backward_filter, dnn.conv_backward_data

    def conv_backward_filter(plan, x, dy, dw, workspace):
        legacy_filter(plan, x, dy, dw, workspace)
        events.append(("legacy", "filter", dw))

    def conv_backward_data(plan, w, dy, dx, workspace):
        legacy_data(plan, w, dy, dx, workspace)
        events.append(("legacy", "data", dx))

    dnn.conv_backward_filter, dnn.conv_backward_data = conv_backward_filter, conv_backward_data
    execute = library.cudnnBackendExecute

    def noting_execute(handle, plan, pack):
        status = execute(handle, plan, pack)
        pointers = library[pack.value].value(cg.CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)
        kind = library.ran_kinds[-1]
        written = {FORWARD_KIND: 2, DATA_KIND: 0, FILTER_KIND: 1}[kind]
        events.append(("run", kind, pointers[written]))
        return status

    library.cudnnBackendExecute = noting_execute
    make = eager.backend

    def backend():
        ops = make()

        def noting_zero(array):  # (fake arrays hold no values)
            events.append(("zero", array.ptr))
            return array

        def noting_copy(dst, src):
            events.append(("copy", src.ptr, dst.ptr))

        ops._copy_into = noting_copy

        ops._zero_ = noting_zero
        return ops

    eager.backend = backend
    return eager


def backward_step(ops, x=None, delta=None):
    """One conv_backward of X's shape (dx wanted): (the weight updates, dx)."""
    updates = FakeArray(W)
    dx = ops.conv_backward(x or FakeArray(X), FakeArray(W), delta or FakeArray(DY), 1, 1, 1,
                           updates, True)
    return updates, dx


def writes_to(events, address):
    return [event for event in events if event[-1] == address]


def test_backward_calls_run_plans_faster_by_the_host_clock(training):
    """Legacy backward calls take 5 ms, the plans 1 and 2: each pass keeps its rank-0 plan;
    the weight updates and dx are each written once per call, by the kept plan, never by the
    timing (which writes scratch arrays); a later call runs the plans only."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    ops = training.backend()
    updates, dx = backward_step(ops)
    plan = only_plan(training)
    for use in ("data", "filter"):
        assert training.library.rank_of(plan.training_graphs[use].plan.value) == 0
        assert training.uses[use].timings[plan.key] == (5.0, [1.0, 2.0])
    assert "forward" not in plan.training_graphs  # no forward ran
    assert writes_to(training.events, updates.ptr) == [("run", FILTER_KIND, updates.ptr)]
    assert writes_to(training.events, dx.ptr) == [("run", DATA_KIND, dx.ptr)]
    assert training.uses["filter"].summary().splitlines()[0] == \
        "eager backward-filter graphs: 1 of 1 shapes run a plan"
    del training.events[:]
    updates, dx = backward_step(ops)
    assert training.events == [("run", FILTER_KIND, updates.ptr), ("run", DATA_KIND, dx.ptr)]


def test_backward_filter_timing_checks_that_plans_accumulate(training):
    """The backward filter accumulates (beta 1): its legacy reference G is made into a zeroed
    scratch array, each candidate's compared first run onto a copy of G in another (what it
    adds is compared: 2G - its output); the timed repeats may accumulate anything; the real
    updates are written last, once."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    ops = training.backend()
    add_ = ops.add_

    def noting_add(dst, src):
        training.events.append(("add", dst.ptr, src.ptr))
        return add_(dst, src)

    ops.add_ = noting_add
    updates, _ = backward_step(ops)
    reference = next(e[1] for e in training.events if e[0] == "zero")
    trial = next(e[2] for e in training.events if e[:2] == ("legacy", "filter")
                 and e[2] != reference)
    assert len({reference, trial, updates.ptr}) == 3
    filter_events = [e for e in training.events if e[:2] in (("legacy", "filter"),
                                                            ("run", FILTER_KIND))
                     or e[0] in ("zero", "copy") or e == ("add", trial, reference)]
    repeats = cuda_backend.EAGER_REPEATS
    candidate = ([("copy", reference, trial), ("run", FILTER_KIND, trial)]
                 + [("add", trial, reference)] * 2 + [("run", FILTER_KIND, trial)] * repeats)
    assert filter_events == ([("zero", reference), ("legacy", "filter", reference)]
                             + [("legacy", "filter", trial)] * repeats + candidate * 2
                             + [("run", FILTER_KIND, updates.ptr)])


@pytest.mark.parametrize("walls", [{0: 6.0, 1: 5.5}, {0: 5.0, 1: 5.0}])  # slower; as fast
def test_backward_plans_not_faster_leave_the_legacy_calls(training, walls):
    training.library.walls.update(walls)
    ops = training.backend()
    updates, dx = backward_step(ops)
    plan = only_plan(training)
    assert plan.training_graphs == {"data": None, "filter": None}
    assert writes_to(training.events, updates.ptr) == [("legacy", "filter", updates.ptr)]
    assert writes_to(training.events, dx.ptr) == [("legacy", "data", dx.ptr)]
    assert training.library.alive() == []
    runs = len(training.library.ran)
    backward_step(ops)
    assert len(training.library.ran) == runs


def test_a_backward_plan_that_differs_is_not_kept(training):
    """The filter plan of rank 0 differs from the legacy gradient by 1e-4 (exact float32
    allows 8e-6): rank 1 is kept for the filter, rank 0 for the data."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    training.errors[(FILTER_KIND, 0)] = 1e-4
    ops = training.backend()
    backward_step(ops)
    plan = only_plan(training)
    assert training.library.rank_of(plan.training_graphs["filter"].plan.value) == 1
    assert training.library.rank_of(plan.training_graphs["data"].plan.value) == 0
    assert training.uses["filter"].timings[plan.key][1][0].startswith("differs: ")


def test_training_calls_longer_than_the_limit_time_no_plan(training):
    """A legacy backward filter of 20 a call (the limit 10): its plans are not timed (only
    built), the legacy call kept; the data pass (5) chooses as usual. Inference has no limit."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    training.dnn.wall_costs[(X, 3)] = 20.0
    training.dnn.wall_costs[(X, 1)] = 20.0  # the forward's algorithms
    training.dnn.wall_costs[(X, 0)] = 20.0
    ops = training.backend()
    updates, _ = backward_step(ops)
    plan = only_plan(training)
    assert plan.training_graphs["filter"] is None
    assert plan.training_graphs["data"] is not None
    assert training.uses["filter"].timings[plan.key] == (20.0, ["not timed: the legacy call "
                                                                "takes over 10000000 us"])
    assert [e[0] for e in training.events if e[:2] == ("run", FILTER_KIND)] == []
    assert writes_to(training.events, updates.ptr) == [("legacy", "filter", updates.ptr)]
    forward(ops, X)
    assert plan.eager_graph is not None


@pytest.mark.parametrize("bad", [np.inf, np.nan, 0.0])
def test_a_choice_waits_for_a_legacy_output_to_compare(training, bad):
    """A legacy output not finite (an fp16 step that overflowed) or all zeros compares
    nothing: that call runs the legacy calls and chooses nothing, the candidates kept; the next
    call whose legacy output has values chooses. Inference alike."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    ops = training.backend()
    training.reference_scales[:] = [bad, bad]  # the filter's, then the data's
    updates, dx = backward_step(ops)
    plan = only_plan(training)
    assert plan.training_graphs == {} and plan.graph_deferrals == {"data": 1, "filter": 1}
    assert writes_to(training.events, updates.ptr) == [("legacy", "filter", updates.ptr)]
    assert writes_to(training.events, dx.ptr) == [("legacy", "data", dx.ptr)]
    assert training.library.ran == [] and training.library.alive() != []
    backward_step(ops)
    for use in ("data", "filter"):
        assert training.library.rank_of(plan.training_graphs[use].plan.value) == 0
    training.reference_scales[:] = [bad]
    forward(ops, X)
    assert not plan.graph_timed and plan.eager_graph is None
    forward(ops, X)
    assert plan.graph_timed and plan.eager_graph is not None


def test_a_shape_whose_legacy_output_never_compares_keeps_the_legacy_call(training):
    """GRAPH_DEFERRALS calls in a row of infinite deltas: the last keeps the legacy call
    without timing a plan (nor choosing again)."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    ops = training.backend()
    deferrals = cuda_backend.GRAPH_DEFERRALS
    for call in range(deferrals):
        training.reference_scales[:] = [np.inf, np.inf]
        backward_step(ops)
    plan = only_plan(training)
    assert plan.training_graphs == {"data": None, "filter": None}
    assert training.uses["filter"].timings[plan.key][1] == [
        f"not compared: the legacy output was not finite or all zeros in {deferrals} calls"]
    assert training.library.ran == [] and training.library.alive() == []
    backward_step(ops)
    assert training.library.ran == []


def test_a_legacy_backward_cuDNN_refuses_fails_as_before_leaving_no_plan(training):
    training.dnn.refused.add(("filter", 3))  # its only candidate
    ops = training.backend()
    with pytest.raises(BackendError, match="cuDNN refuses filter algorithm 3"):
        backward_step(ops)
    assert training.library.alive() == [] and training.library.ran == []


@pytest.mark.parametrize("exact", [True, False])
def test_training_leaves_out_nondeterministic_and_half_summing_engines(exact):
    """In every precision, training's graphs (forward, data, filter) take no engine noted
    NONDETERMINISTIC or REDUCED_PRECISION_REDUCTION; inference's may (the latter not in exact
    float32)."""
    library = NotedGraphLibrary(engines=4, notes={1: [NOTE["NONDETERMINISTIC"]],
                                                  2: [NOTE["REDUCED_PRECISION_REDUCTION"]]})
    inference = [0, 1, 3] if exact else [0, 1, 2, 3]
    for use in cg.GRAPH_USES:
        graphs = graphs_of(library, exact, use)
        assert candidate_ranks(library, graphs, key()) == (inference if use == "inference"
                                                           else [0, 3]), use


def test_a_fast_nondeterministic_engine_runs_inference_only(training):
    training.library.notes[0] = [NOTE["NONDETERMINISTIC"]]
    training.library.walls.update({0: 0.5, 1: 2.0})
    ops = training.backend()
    forward(ops, X)
    ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
    backward_step(ops)
    plan = only_plan(training)
    assert training.library.rank_of(plan.eager_graph.plan.value) == 0
    for use in ("forward", "data", "filter"):
        assert training.library.rank_of(plan.training_graphs[use].plan.value) == 1, use


def test_recordings_run_the_legacy_backward_and_the_first_eager_call_chooses(training):
    training.library.walls.update({0: 1.0})
    ops = training.backend()
    with ops.recording():
        updates, dx = backward_step(ops)
    plan = only_plan(training)
    assert training.library.calls == [] and plan.training_graphs == {}
    assert [e[:2] for e in training.events] == [("legacy", "filter"), ("legacy", "data")]
    misaligned = FakeArray(X)
    misaligned.ptr += 4  # a view one float in: the plans declare 16-byte alignment
    updates, _ = backward_step(ops, x=misaligned)
    assert "filter" not in plan.training_graphs and plan.training_graphs["data"] is not None
    assert writes_to(training.events, updates.ptr) == [("legacy", "filter", updates.ptr)]
    backward_step(ops)
    assert plan.training_graphs["data"] is not None
    assert plan.training_graphs["filter"] is not None


@pytest.mark.parametrize("kept", [True, False])
def test_the_workspace_covers_the_backward_plans_need(training, kept):
    """Candidates needing 3 and 2 MiB (the legacy algorithms none): each runs in a workspace
    that holds it; the kept filter and data plans' need counts in the shape's workspace (not
    in its forward need); none kept, none held."""
    given = workspaces_given(training, kept)
    ops = training.backend()
    backward_step(ops)
    plan = only_plan(training)
    assert min(given) >= 3 * MiB
    if kept:
        assert plan.workspace == 3 * MiB and plan.forward_need == 0
        assert ops._workspace_size == 3 * MiB
        inference = training.backend()  # forward only: the backward plans' need not counted
        inference.eager_graphs = False  # (nor an inference plan's)
        forward(inference, X)
        assert inference._workspace_size == 0
    else:
        assert plan.workspace == 0 and ops._workspace is None


def test_turned_off_training_builds_nothing(training, monkeypatch):
    monkeypatch.setenv(cg.EAGER_GRAPHS_VARIABLE, "0")
    ops = training.backend()
    ops.conv_forward(FakeArray(X), FakeArray(W), 1, 1, 1, train=True)
    backward_step(ops)
    assert training.library.calls == [] and only_plan(training).training_graphs == {}


def test_channels_last_backward_plans_write_the_gradient_scratch(training):
    """NHWC (the backend's channels-last path): the plans are the shape's NHWC ones, the
    filter plan writes the NHWC gradient scratch, which is added to the updates once."""
    training.library.walls.update({0: 1.0, 1: 2.0})
    training.dnn.transform = lambda shape, dtype, x, y, to_channels_last: None
    ops = training.backend()
    ops.channels_last = True
    x, delta = FakeArray(X), FakeArray(DY)
    x.channels_last = delta.channels_last = True
    updates, dx = backward_step(ops, x=x, delta=delta)
    plan = only_plan(training)
    assert plan.key[-1] is True and dx.channels_last
    assert plan.training_graphs["filter"] is not None
    assert writes_to(training.events, updates.ptr) == []
    (filtered,) = [e for e in training.events if e[:2] == ("run", FILTER_KIND)][-1:]
    assert filtered[2] != updates.ptr
    assert [dst for dst, _ in training.added] == [updates.ptr]
    assert writes_to(training.events, dx.ptr) == [("run", DATA_KIND, dx.ptr)]


# ---- on the GPU ---------------------------------------------------------------------------------
# mnist.cfg's and cifar.cfg's batch-1 convolutions: (x shape, w shape, padding)
BATCH1_SHAPES = {
    "mnist": [((1, 1, 28, 28), (32, 1, 3, 3), 1), ((1, 32, 14, 14), (64, 32, 3, 3), 1)],
    "cifar": [((1, 3, 28, 28), (128, 3, 3, 3), 1), ((1, 128, 28, 28), (128, 128, 3, 3), 1),
              ((1, 128, 14, 14), (256, 128, 3, 3), 1), ((1, 256, 7, 7), (512, 256, 3, 3), 1),
              ((1, 512, 7, 7), (10, 512, 1, 1), 0)],
}
GPU_TOLERANCE = {"fp32": 1e-5, "tf32": 1e-3}


def host_seconds(ops, function, *arguments):
    """Seconds per function(*arguments) by the host's clock: the best of 5 rounds of 40 calls
    issued back to back."""
    runs = []
    for _ in range(5):
        ops.synchronize()
        begin = time.perf_counter()
        for _ in range(40):
            function(*arguments)
        ops.synchronize()
        runs.append((time.perf_counter() - begin) / 40)
    return min(runs)


def relative_rms(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.sum((got - want) ** 2) / max(np.sum(want ** 2), 1e-300)))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("network", sorted(BATCH1_SHAPES))
def test_eager_graph_plans_agree_with_legacy_and_are_faster(network, precision):
    """For each batch-1 shape: the eager output (a graph plan's where one was kept) equals the
    legacy eager algorithm's within 1e-5 (fp32) / 1e-3 (tf32) relative RMS, and a kept plan
    issues and runs faster than the legacy call by the host's clock (best of 5 rounds of 40
    calls, with a 3 us allowance for timing noise)."""
    from engine.backends.cuda import CudaBackend

    ops = CudaBackend(device=0, seed=0, precision=precision)
    if cg.convolution_graphs(ops.dnn) is None:
        pytest.skip("cuDNN's backend API does not load")
    rng = np.random.default_rng(3)
    kept = 0
    for x_shape, w_shape, padding in BATCH1_SHAPES[network]:
        x = ops.asarray(rng.standard_normal(x_shape).astype(np.float32))
        w = ops.asarray((rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:])))
                        .astype(np.float32))
        ops.conv_forward(x, w, 1, padding, 1)  # the first eager call times the graph plans
        plan = ops._plan(x_shape, w_shape, 1, padding, 1)
        assert plan.graph_timed
        eager = ops.to_host(ops.conv_forward(x, w, 1, padding, 1))
        y = ops._empty(plan.y_shape, ops.dtype)
        workspace = ops._workspace_pointer()
        ops.dnn.conv_forward(plan, x.ptr, w.ptr, y.ptr, workspace, eager=True)
        error = relative_rms(eager, ops.to_host(y))
        assert error <= GPU_TOLERANCE[precision], (x_shape, w_shape, error)
        if plan.eager_graph is None:
            continue
        kept += 1
        graphs = cg.convolution_graphs(ops.dnn)
        graph = host_seconds(ops, graphs.execute, plan.eager_graph, x.ptr, w.ptr, y.ptr,
                             workspace)
        legacy = host_seconds(ops, ops.dnn.conv_forward, plan, x.ptr, w.ptr, y.ptr, workspace,
                              True)  # eager
        print(f"{network} {precision} {x_shape}x{w_shape}: graph plan {graph * 1e6:.1f} us, "
              f"legacy {legacy * 1e6:.1f} us per call")
        assert graph <= legacy + 3e-6, (x_shape, w_shape, graph, legacy)
    print(f"{network} {precision}: {kept} of {len(BATCH1_SHAPES[network])} shapes run graph "
          "plans")
    print(cg.convolution_graphs(ops.dnn).summary())


@pytest.mark.gpu
def test_mnist_eager_forward_on_the_gpu_equals_the_cpu(tmp_path):
    """cfg/mnist.cfg's whole eager inference forward (graph plans where kept) on the GPU against
    the CPU backend, same weights: within 1e-4."""
    from engine import Network
    from engine.backends.cuda import CudaBackend

    cfg = os.path.join(ROOT, "cfg", "mnist.cfg")
    cpu = Network(cfg, seed=2, quiet=True)
    cpu.save_weights(str(tmp_path / "w.weights"))
    ops = CudaBackend(device=0, seed=0)
    net = Network(cfg, seed=2, quiet=True, backend=ops)
    net.load_weights(str(tmp_path / "w.weights"))
    images = np.random.default_rng(0).random((1,) + tuple(net.input_shape), dtype=np.float32)
    want = cpu.ops.to_host(cpu.forward(cpu.ops.asarray(images), train=False))
    for _ in range(3):  # the first call times the plans; the later ones run the kept ones
        got = ops.to_host(net.forward(ops.asarray(images), train=False))
        error = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))
        assert error <= 1e-4, error
    graphs = cg.convolution_graphs(ops.dnn)
    kept = [p for p in ops.dnn.plans.values() if p is not None and p.eager_graph is not None]
    print(f"mnist eager forward: {len(kept)} convolutions run graph plans")
    if graphs is not None:
        print(graphs.summary())


# mnist.cfg's training convolutions at its batch (128): (x shape, w shape, padding)
TRAINING_SHAPES = [((128, 1, 28, 28), (32, 1, 3, 3), 1), ((128, 32, 14, 14), (64, 32, 3, 3), 1)]
# A kept plan agreed with the legacy call within EAGER_AGREEMENT (tf32: 3e-3) at its choice.
TRAINING_TOLERANCE = {"fp32": 1e-5, "tf32": 3e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_training_graph_plans_agree_with_legacy_and_are_faster(precision):
    """For mnist's batch-128 training shapes: an eager training forward and backward (the
    first calls choose the plans) give the legacy calls' y, dx and filters' gradient within
    1e-5 (fp32) / 3e-3 (tf32) relative RMS, and the kept plans together issue and run faster
    than their legacy calls by the host's clock (each best of 5 rounds of 40 calls, 3 us
    allowance a plan: one shape's choice, made on 10 calls, may be overturned by the GPU's
    noise); prints the timings per shape and use."""
    from engine.backends.cuda import CudaBackend

    ops = CudaBackend(device=0, seed=0, precision=precision)
    if cg.convolution_graphs(ops.dnn, "filter") is None:
        pytest.skip("cuDNN's backend API does not load")
    rng = np.random.default_rng(5)
    kept = []  # (plan's seconds, legacy's) a call
    for x_shape, w_shape, padding in TRAINING_SHAPES:
        x = ops.asarray(rng.standard_normal(x_shape).astype(np.float32))
        w = ops.asarray((rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:])))
                        .astype(np.float32))
        y = ops.conv_forward(x, w, 1, padding, 1, train=True)
        dy = ops.asarray(rng.standard_normal(y.shape).astype(np.float32))
        updates = ops.zeros(w_shape)
        dx = ops.conv_backward(x, w, dy, 1, padding, 1, updates, True)
        plan = ops._plan(x_shape, w_shape, 1, padding, 1, backward=True)
        workspace = ops._workspace_pointer()
        references = {"forward": ops._empty(y.shape), "data": ops._empty(x_shape),
                      "filter": ops.zeros(w_shape)}
        legacy = {
            "forward": lambda out: ops.dnn.conv_forward(plan, x.ptr, w.ptr, out.ptr, workspace),
            "data": lambda out: ops.dnn.conv_backward_data(plan, w.ptr, dy.ptr, out.ptr,
                                                           workspace),
            "filter": lambda out: ops.dnn.conv_backward_filter(plan, x.ptr, dy.ptr, out.ptr,
                                                               workspace)}
        got = {"forward": y, "data": dx, "filter": updates}
        for use in ("forward", "data", "filter"):
            assert use in plan.training_graphs, use
            legacy[use](references[use])
            error = relative_rms(ops.to_host(got[use]), ops.to_host(references[use]))
            assert error <= TRAINING_TOLERANCE[precision], (x_shape, use, error)
            chosen = plan.training_graphs[use]
            if chosen is None:
                print(f"{precision} {x_shape}x{w_shape} {use}: legacy")
                continue
            scratch = references[use]
            pointers = [(x.ptr, w.ptr, scratch.ptr), (scratch.ptr, w.ptr, dy.ptr),
                        (x.ptr, scratch.ptr, dy.ptr)][["forward", "data", "filter"].index(use)]
            graphs = cg.convolution_graphs(ops.dnn, use)
            graph = host_seconds(ops, graphs.execute, chosen, *pointers, workspace)
            old = host_seconds(ops, legacy[use], scratch)
            print(f"{precision} {x_shape}x{w_shape} {use}: graph plan {graph * 1e6:.1f} us, "
                  f"legacy {old * 1e6:.1f} us per call")
            kept.append((graph, old))
    graph, old = (sum(times) for times in zip(*kept)) if kept else (0.0, 0.0)
    assert graph <= old + 3e-6 * len(kept), kept
    for use in ("forward", "data", "filter"):
        print(cg.convolution_graphs(ops.dnn, use).summary())


# A small cifar-like network: 3x3 convolutions with batch norm, a strided one, grouped ones,
# maxpool, a 1x1 convolution, avgpool, softmax.
CIFAR_LIKE = """[net]
batch=16
subdivisions=1
height=16
width=16
channels=3
momentum=0.9
decay=0.0005
learning_rate=0.1

[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=64
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=64
size=3
stride=1
pad=1
groups=4
activation=leaky

[convolutional]
filters=10
size=1
stride=1
pad=1
activation=leaky

[avgpool]

[softmax]
groups=1
"""


def cifar_like(folder):
    """CIFAR_LIKE written as a cfg file in `folder`; its path."""
    path = os.path.join(str(folder), "cifar-like.cfg")
    with open(path, "w") as handle:
        handle.write(CIFAR_LIKE)
    return path


def training_plans_kept(ops):
    """The (shape key, use) of every eager training call that runs a graph plan."""
    return [(key, use) for key, plan in ops.dnn.plans.items() if plan is not None
            for use, graph in plan.training_graphs.items() if graph is not None]


@pytest.mark.gpu
@pytest.mark.parametrize("network", ["mnist", "cifar-like"])
def test_eager_training_with_graph_plans_equals_the_cpu(network, tmp_path):
    """Two eager train_step + update steps of cfg/mnist.cfg (batch 128, dropout off) and of a
    small cifar-like network on the GPU, the first choosing the training plans, the second
    running the kept ones: every output, gradient, parameter and velocity equals the CPU
    backend's (test_gpu_backend.compare_training_step's tolerances); prints which shapes run
    plans."""
    from engine import Network
    from engine.backends.cuda import CudaBackend
    from engine.backends.numpy_backend import NumpyBackend
    from test_gpu_backend import compare_training_step, without_dropout

    cfg = os.path.join(ROOT, "cfg", "mnist.cfg") if network == "mnist" else cifar_like(tmp_path)
    ops = CudaBackend(device=0, seed=0)
    net_cpu = without_dropout(Network(cfg, backend=NumpyBackend(seed=1), seed=1, quiet=True))
    net_gpu = without_dropout(Network(cfg, backend=ops, seed=1, quiet=True))
    rng = np.random.default_rng(6)
    batch = net_cpu.options.mini_batch
    for _ in range(2):
        x = rng.random((batch,) + tuple(net_cpu.input_shape), dtype=np.float32)
        outputs = net_cpu.cost_layer.outputs
        truth = np.eye(outputs, dtype=np.float32)[rng.integers(0, outputs, batch)]
        compare_training_step(net_cpu, net_gpu, ops, x, truth, 0.05)
    print(f"{network}: {len(training_plans_kept(ops))} training calls (shape, use) run graph "
          f"plans")
    for use in ("forward", "data", "filter"):
        graphs = cg.convolution_graphs(ops.dnn, use)
        if graphs is not None:
            print(graphs.summary())


# fp16 and bf16 training with and without the plans: their gradients round apart (sums of
# half products in other orders) by about the storage type's precision
REDUCED_TRAINING_TOLERANCE = {"fp16": 4e-3, "bf16": 3e-2}  # test_reduced_precision's


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_training_plans_agree_with_the_legacy_calls(precision, tmp_path):
    """The cifar-like network in fp16 and bf16, from the same weights and inputs, eagerly with
    the training plans and with them off: in two train_step + update steps (the first choosing
    the plans, the second running them) every gradient agrees within the storage type's
    precision (largest difference over the largest value), the losses within 1e-2; some
    training call runs a plan."""
    from engine import Network
    from engine.backends.cuda import CudaBackend

    cfg = cifar_like(tmp_path)
    nets = []
    for plans in (True, False):
        ops = CudaBackend(device=0, seed=0, precision=precision)
        ops.eager_graphs = plans
        nets.append(Network(cfg, backend=ops, seed=1, quiet=True))
    with_plans, legacy = nets  # (the cifar-like network has no dropout)
    rng = np.random.default_rng(7)
    batch = with_plans.options.mini_batch
    tolerance = REDUCED_TRAINING_TOLERANCE[precision]
    for step in range(2):
        x = rng.random((batch,) + tuple(with_plans.input_shape), dtype=np.float32)
        outputs = with_plans.cost_layer.outputs
        truth = np.eye(outputs, dtype=np.float32)[rng.integers(0, outputs, batch)]
        losses = [net.train_step(net.ops.asarray(x), net.ops.asarray(truth)) for net in nets]
        assert abs(losses[0] - losses[1]) <= 1e-2 * abs(losses[1]), (step, losses)
        for got_layer, want_layer in zip(with_plans.layers, legacy.layers):
            for name, updates in want_layer.updates.items():
                want = legacy.ops.to_host(updates).astype(np.float64)
                got = with_plans.ops.to_host(got_layer.updates[name]).astype(np.float64)
                error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
                assert error <= tolerance, (step, got_layer.index, name, error)
        for net in nets:
            net.update(0.05)
    chosen = training_plans_kept(with_plans.ops)
    print(f"{precision}: {len(chosen)} training calls (shape, use) run graph plans")
    assert chosen
