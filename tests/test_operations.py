"""The operation set (engine/backends/operations.py): both backends implement exactly what it
declares, with its signatures."""

import ast
import glob
import inspect
import os

import numpy as np
import pytest

from engine import activations, constants
from engine.backends.cuda.backend import CudaBackend  # importable without a GPU (nothing loads)
from engine.backends.numpy_backend import NumpyBackend
from engine.backends.operations import Operations
from engine.errors import BackendError
from engine.network import Network
from engine.train import CapturedSteps, EagerSteps, iteration_runner

from helpers import write_cfg

BACKEND_CLASSES = [NumpyBackend, CudaBackend]


def public_members(cls):
    """The class-level public names: operations, properties, capabilities (instance attributes
    are a backend's own state, not part of the set)."""
    return {name for name in dir(cls) if not name.startswith("_")}


DECLARED = public_members(Operations)


def test_the_set_is_declared():
    abstract = Operations.__abstractmethods__
    assert {"conv_forward", "batchnorm_forward_train", "sgd_update", "name", "device_name"} <= abstract
    assert {"can_record", "capture", "last_cost"} <= DECLARED - abstract  # with defaults
    for name in DECLARED:
        member = inspect.getattr_static(Operations, name)
        doc = member.__doc__ if not isinstance(member, bool) else None
        assert name in ("can_record", "precision", "computes_into_concatenations") or (
            doc and len(doc.split()) >= 5), \
            f"{name}: no docstring"


@pytest.mark.parametrize("backend_class", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_implements_every_operation(backend_class):
    assert issubclass(backend_class, Operations)
    assert not backend_class.__abstractmethods__, "missing operations"


@pytest.mark.parametrize("backend_class", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_adds_no_undeclared_public_member(backend_class):
    undeclared = public_members(backend_class) - DECLARED
    assert not undeclared, f"declare these in engine/backends/operations.py: {sorted(undeclared)}"


@pytest.mark.parametrize("backend_class", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_signatures_are_the_declared_ones(backend_class):
    for name in sorted(DECLARED):
        declared = inspect.getattr_static(Operations, name)
        if not callable(declared) or isinstance(declared, property):
            continue
        implemented = inspect.getattr_static(backend_class, name)
        assert callable(implemented), name
        assert inspect.signature(implemented) == inspect.signature(declared), name


def test_a_backend_missing_an_operation_cannot_be_made():
    incomplete = type("Incomplete", (Operations,), {
        name: getattr(NumpyBackend, name) for name in Operations.__abstractmethods__
        if name != "conv_forward"})
    with pytest.raises(TypeError, match="conv_forward"):
        incomplete()


# ---- capabilities ----------------------------------------------------------------------------
def test_capabilities_have_defaults():
    ops = NumpyBackend()
    assert ops.can_record is False
    assert ops.precision == "fp32"  # the CPU computes in fp32 only (engine/precision.py)
    with pytest.raises(BackendError, match="cannot record"):
        ops.capture(lambda: None)
    assert CudaBackend.can_record is True


def test_recording_follows_the_declared_capability(tmp_path):
    """Recorded inference and recorded training iterations are used exactly where the backend
    declares can_record (no probing for a `capture` attribute)."""
    cfg = write_cfg(tmp_path / "small.cfg", {"batch": 2, "height": 4, "width": 4, "channels": 1},
                    "[connected]\noutput=3\nactivation=linear\n\n[softmax]\n")
    plain = Network(cfg, quiet=True)
    assert plain._inference is None and type(iteration_runner(plain, None)) is EagerSteps

    class RecordingBackend(NumpyBackend):
        can_record = True

    recording = Network(cfg, backend=RecordingBackend(), quiet=True)
    assert recording._inference is not None
    assert type(iteration_runner(recording, None)) is CapturedSteps


# ==== the operations, on every backend, against plain numpy references =========================
# `ops` is the numpy backend always and the CUDA backend under the `gpu` marker (skipped where no
# GPU is usable). References are float64 numpy written from the declaration (loops where the
# geometry matters, finite differences for gradients), independent of the backends' code.
# To test a new operation: a test function taking `ops` and `rng`, arguments built as float32
# numpy arrays, `call(ops, "name", ...)` and `assert_close` against the reference.

TOLERANCE = 1e-4  # relative to the reference's largest magnitude (float32 vs float64 sums)
FLT_MAX = float(np.finfo(np.float32).max)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def to_backend(ops, value):
    if isinstance(value, np.ndarray) and value.dtype == np.float32:
        return ops.asarray(value.copy())  # a copy: numpy's asarray may return the array itself
    if isinstance(value, list):
        return [to_backend(ops, v) for v in value]
    return value


def to_numpy(ops, value):
    """float32 backend arrays -> numpy; anything else (opaque caches, int winners) unchanged."""
    if getattr(value, "dtype", None) == np.float32 and hasattr(value, "shape"):
        return np.asarray(ops.to_host(value)).reshape(value.shape)
    return value


def call(ops, name, *args, **kwargs):
    """ops.<name>(*args, **kwargs) with the float32 numpy arrays among args (and in lists) copied
    to the backend. Returns (result, args after the call): float32 arrays back in numpy, the
    elements of a returned tuple likewise, anything else as the backend gave it."""
    moved = [to_backend(ops, a) for a in args]
    result = getattr(ops, name)(*moved, **kwargs)
    if isinstance(result, tuple):
        result = tuple(to_numpy(ops, r) for r in result)
    else:
        result = to_numpy(ops, result)
    return result, [to_numpy(ops, a) for a in moved]


def assert_close(actual, expected, what="", tolerance=TOLERANCE):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.size == 0:
        return
    error = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12)
    assert error <= tolerance, f"{what}: relative error {error:.3g}"


def numeric_gradient(function, x, delta, step=1e-4):
    """d sum(function(x) * delta) / dx by central differences, in float64."""
    x = x.astype(np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + step
        up = np.sum(function(x) * delta)
        x[index] = saved - step
        down = np.sum(function(x) * delta)
        x[index] = saved
        grad[index] = (up - down) / (2 * step)
    return grad


# ---- identity, memory, elementwise -------------------------------------------------------------
def test_identity_and_memory(ops, rng):
    assert ops.name in ("cpu", "gpu") and isinstance(ops.device_name, str)
    assert ops.available_memory() > 0
    x = randn(rng, 2, 3, 4, 5)
    device = ops.asarray(x)
    np.testing.assert_array_equal(ops.to_host(device), x)
    np.testing.assert_array_equal(ops.to_host(ops.copy(device)), x)
    np.testing.assert_array_equal(ops.to_host(ops.zeros((3, 4))), np.zeros((3, 4)))
    blank = ops.empty((3, 4))
    assert ops.to_host(blank).shape == (3, 4) and ops.to_host(blank).dtype == np.float32
    if ops.name == "cpu":  # like=: the dtype of another array (float64 in gradient checks)
        assert ops.zeros((2,), like=np.zeros(1)).dtype == ops.empty((2,), like=np.zeros(1)).dtype \
            == np.float64
    np.testing.assert_array_equal(ops.to_host(ops.reshape(device, (2, 60))), x.reshape(2, 60))
    target = ops.zeros((2, 3, 4, 5))
    assert ops.set_(target, x.reshape(-1)) is target
    np.testing.assert_array_equal(ops.to_host(target), x)
    assert ops.freeze_(device) is device
    np.testing.assert_array_equal(ops.to_host(device), x)
    ops.synchronize()


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_all_finite(ops, rng, bad):
    x = randn(rng, 2, 3, 4, 5)
    if bad is not None:
        x[1, 2, 3, 4] = bad
    assert ops.all_finite(ops.asarray(x)) is (bad is None)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 1, 1, 7)])  # GPU: 16-byte packs, values
def test_add_and_scale_in_place(ops, rng, shape):
    x, y = randn(rng, *shape), randn(rng, *shape)
    (result, (dst, _)) = call(ops, "add_", x, y)
    assert_close(result, x + y.astype(np.float64), "add_")
    assert_close(dst, x + y.astype(np.float64), "add_ in place")
    result, (dst, _) = call(ops, "scale_", x, 0.37)
    assert_close(dst, x * 0.37, "scale_")


# Points away from every activation's breakpoints (and from integers, for stair), where finite
# differences are exact enough.
def activation_points(rng, shape):
    x = rng.uniform(-6.5, 6.5, shape)
    x = np.where(np.abs(x - np.round(x)) < 0.05, x + 0.1, x)
    return x.astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 1, 1, 7)])  # GPU: 16-byte packs, values
@pytest.mark.parametrize("name", activations.NAMES)
def test_activations(ops, rng, name, shape):
    """activate_ against activations.py in float64 (checked against Darknet's formulas in
    test_activations.py); the gradient against finite differences of that function."""
    x = activation_points(rng, shape)
    y, (x_after, _) = call(ops, "activate_", x, name)
    expected = activations.activate(x.astype(np.float64), name)
    assert_close(y, expected, f"{name} forward")
    assert_close(x_after, expected, f"{name} in place")
    delta = randn(rng, *x.shape)
    numeric = numeric_gradient(lambda v: activations.activate(v, name), x, delta)
    if name in activations.INPUT_GRADIENT:
        result, _ = call(ops, "activation_input_backward_", x, delta, name)
    else:
        result, _ = call(ops, "activation_backward_", expected.astype(np.float32), delta, name)
    assert_close(result, numeric, f"{name} gradient", tolerance=1e-3)
    # at the breakpoints of the piecewise ones: the value, and the one-sided gradient Darknet's
    # formulas give there (activations.gradient, through the output)
    points = np.array([-6, -4.5, -4, -2, -1, 0, 0.5, 1, 2, 4, 4.5, 6], np.float32).reshape(1, 1, 3, 4)
    y, _ = call(ops, "activate_", points, name)
    assert_close(y, activations.activate(points.astype(np.float64), name), f"{name} breakpoints")
    ones = np.ones_like(points)
    if name in activations.INPUT_GRADIENT:
        result, _ = call(ops, "activation_input_backward_", points, ones, name)
        expected = activations.gradient_from_input(points.astype(np.float64), name)
    else:
        result, _ = call(ops, "activation_backward_", y, ones, name)
        expected = activations.gradient(y.astype(np.float64), name)
    assert_close(result, expected, f"{name} gradient at the breakpoints")


@pytest.mark.parametrize("name", activations.CHANNEL_NAMES)
def test_normalize_channels(ops, rng, name):
    x, delta = randn(rng, 2, 4, 2, 3, scale=2), randn(rng, 2, 4, 2, 3)
    y, _ = call(ops, "normalize_channels", x, name)
    assert_close(y, activations.normalize_channels(x.astype(np.float64), name), name)
    result, _ = call(ops, "normalize_channels_backward_", x, delta, name)
    numeric = numeric_gradient(lambda v: activations.normalize_channels(v, name), x, delta)
    assert_close(result, numeric, f"{name} gradient", tolerance=1e-3)


# (2, 3, 48, 50): planes of 2400 elements, which the GPU walks in pieces (its *_planes kernels).
@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (6, 7, 1, 1), (2, 3, 48, 50)])
@pytest.mark.parametrize("activation", ["linear", "leaky", "logistic"])
def test_bias(ops, rng, shape, activation):
    y, biases = randn(rng, *shape), randn(rng, shape[1])
    result, _ = call(ops, "add_bias_", y, biases, activation)
    expected = activations.activate(y + biases.astype(np.float64).reshape(1, -1, 1, 1), activation)
    assert_close(result, expected, "add_bias_")
    start = randn(rng, shape[1])
    _, (_, updates) = call(ops, "bias_backward", y, start)
    assert_close(updates, start + y.astype(np.float64).sum(axis=(0, 2, 3)), "bias_backward")


# ---- convolution and fully connected -----------------------------------------------------------
def conv_reference(x, w, stride, padding, groups, dilation=1):
    """Darknet's convolution by its definition, one kernel offset at a time, in float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    (b, _, h, width), (f, cg, k, _) = x.shape, w.shape
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    out_h = (h + 2 * padding - dilation * (k - 1) - 1) // sy + 1
    out_w = (width + 2 * padding - dilation * (k - 1) - 1) // sx + 1
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    y = np.zeros((b, f, out_h, out_w))
    fg = f // groups
    for g in range(groups):
        for i in range(k):
            for j in range(k):
                cells = xp[:, g * cg:(g + 1) * cg, i * dilation:i * dilation + sy * out_h:sy,
                           j * dilation:j * dilation + sx * out_w:sx][:, :, :out_h, :out_w]
                y[:, g * fg:(g + 1) * fg] += np.einsum("bchw,fc->bfhw", cells,
                                                       w[g * fg:(g + 1) * fg, :, i, j])
    return y


CONVOLUTIONS = [(3, 1, 1, 1, 1), (1, 1, 0, 1, 1), (3, 2, 1, 1, 1), (5, 1, 2, 1, 1), (3, 1, 1, 2, 1),
                (2, 2, 0, 4, 1), (3, 1, 2, 1, 2), (3, 2, 3, 1, 3), ((1, 2), 3, 1, 1, 1),
                ((3, 1), 3, 1, 1, 1)]


def conv_backward_reference(x, w, delta, stride, padding, groups, dilation=1):
    """The gradients of <conv(x, w), delta> by the definition, one kernel offset at a time:
    (dx, dw) in float64."""
    x, w, delta = (a.astype(np.float64) for a in (x, w, delta))
    (h, width), (f, cg, k, _) = x.shape[2:], w.shape
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    out_h, out_w = delta.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    fg = f // groups
    for g in range(groups):
        cs, fs = slice(g * cg, (g + 1) * cg), slice(g * fg, (g + 1) * fg)
        for i in range(k):
            for j in range(k):
                rows = slice(i * dilation, i * dilation + sy * out_h, sy)
                cols = slice(j * dilation, j * dilation + sx * out_w, sx)
                dw[fs, :, i, j] = np.einsum("bfhw,bchw->fc", delta[:, fs], xp[:, cs, rows, cols])
                dxp[:, cs, rows, cols] += np.einsum("bfhw,fc->bchw", delta[:, fs], w[fs, :, i, j])
    return dxp[:, :, padding:padding + h, padding:padding + width], dw


@pytest.mark.parametrize("case", CONVOLUTIONS, ids=str)
@pytest.mark.parametrize("train", [True, False])
def test_convolution(ops, rng, case, train):
    """Forward (train=False may take another algorithm, e.g. Winograd), then the accumulated
    weight gradient and the input delta, against the definition."""
    first, stride, padding, groups, dilation = case
    size, stride = (3, first) if isinstance(first, tuple) else (first, stride)
    x = randn(rng, 2, 8, 9, 10)
    w = randn(rng, 12, 8 // groups, size, size)
    y, _ = call(ops, "conv_forward", x, w, stride, padding, groups, train=train, dilation=dilation)
    assert_close(y, conv_reference(x, w, stride, padding, groups, dilation), "conv forward")
    if not train:
        return
    delta, start = randn(rng, *y.shape), randn(rng, *w.shape)
    dx, args = call(ops, "conv_backward", x, w, delta, stride, padding, groups, start, True,
                    dilation=dilation)
    expected_dx, expected_dw = conv_backward_reference(x, w, delta, stride, padding, groups,
                                                       dilation)
    assert_close(args[6], start + expected_dw, "conv weight updates (accumulated)")
    assert_close(dx, expected_dx, "conv delta")
    none, _ = call(ops, "conv_backward", x, w, delta, stride, padding, groups, start, False,
                   dilation=dilation)
    assert none is None


# 3x3 stride 1 on 16+ channels (numpy: Winograd, the bias added at one transform point; a
# 13x13 map takes F(2x2), 26x26 F(4x4)), strided, 1x1, grouped; elementwise activations
@pytest.mark.parametrize("case", [(3, 1, 1, 1, 13), (3, 1, 1, 1, 26), (3, 2, 1, 1, 13),
                                  (1, 1, 0, 1, 13), (3, 1, 1, 2, 13)], ids=str)
@pytest.mark.parametrize("activation", ["linear", "leaky", "logistic", "mish"])
def test_convolution_with_bias_and_activation(ops, rng, case, activation):
    """Inference's act(conv + biases) in one operation, against the definition."""
    size, stride, padding, groups, side = case
    x = randn(rng, 1, 16, side, side)
    w = randn(rng, 24, 16 // groups, size, size) / np.float32(np.sqrt(size * size * 16))
    biases = randn(rng, 24)
    y, _ = call(ops, "conv_bias_forward", x, w, biases, activation, stride, padding, groups)
    linear = conv_reference(x, w, stride, padding, groups) + biases.reshape(1, -1, 1, 1)
    assert_close(y, activations.activate(linear, activation), f"conv + bias + {activation}")


@pytest.mark.parametrize("case", [(3, 1, 1, 1, 13), (3, 1, 1, 1, 26), (3, 2, 1, 1, 13),
                                  (1, 1, 0, 1, 13), (3, 1, 1, 2, 13)], ids=str)
def test_convolution_into_a_concatenation(ops, rng, case):
    """conv_bias_forward_into_: the values of conv_bias_forward, returned and stored in the
    given channels of a route's output; its other channels untouched."""
    size, stride, padding, groups, side = case
    x = randn(rng, 1, 16, side, side)
    w = randn(rng, 24, 16 // groups, size, size) / np.float32(np.sqrt(size * size * 16))
    biases = randn(rng, 24)
    out_side = (side + 2 * padding - size) // stride + 1
    out = randn(rng, 1, 40, out_side, out_side)
    y, args = call(ops, "conv_bias_forward_into_", out, 8, x, w, biases, "leaky", stride,
                   padding, groups)
    expected = activations.activate(conv_reference(x, w, stride, padding, groups)
                                    + biases.reshape(1, -1, 1, 1), "leaky")
    assert_close(y, expected, "the convolution's values")
    assert_close(args[0][:, 8:32], expected, "stored in the route's channels")
    np.testing.assert_array_equal(args[0][:, :8], out[:, :8])
    np.testing.assert_array_equal(args[0][:, 32:], out[:, 32:])


# (conv size, padding, side, activation; pool size, stride, output side): Winograd maps of whole
# even tiles (F(4x4) 24x24, F(2x2) 12x12), an activation max does not commute with, a 2x2/1
# pool, an odd side, a 1x1 convolution (the last four: the two operations)
@pytest.mark.parametrize("case", [(3, 1, 24, "leaky", 2, 2, 12), (3, 1, 12, "relu", 2, 2, 6),
                                  (3, 1, 24, "logistic", 2, 2, 12), (3, 1, 13, "leaky", 2, 1, 13),
                                  (3, 1, 13, "leaky", 2, 2, 7), (1, 0, 12, "linear", 2, 2, 6)],
                         ids=str)
def test_convolution_then_maxpool(ops, rng, case):
    """Inference's conv + bias + activation and the [maxpool] of its output in one operation,
    against the two definitions."""
    size, padding, side, activation, k, pool_stride, pooled_side = case
    x = randn(rng, 1, 16, side, side)
    w = randn(rng, 24, 16, size, size) / np.float32(np.sqrt(size * size * 16))
    biases = randn(rng, 24)
    (pooled, none), _ = call(ops, "conv_bias_maxpool_forward", x, w, biases, activation, 1,
                             padding, 1, k, pool_stride, 0, (pooled_side, pooled_side))
    y = activations.activate(conv_reference(x, w, 1, padding, 1) + biases.reshape(1, -1, 1, 1),
                             activation)
    expected, _ = maxpool_reference(y, k, pool_stride, k - 1, pooled_side, pooled_side)
    assert_close(pooled, expected, "the maxima")
    assert none is None
    # into channels [8, 32) of a maxpool's output (a route's part), the output kept as well
    out = randn(rng, 1, 40, pooled_side, pooled_side)
    (into, kept), args = call(ops, "conv_bias_maxpool_forward", x, w, biases, activation, 1,
                              padding, 1, k, pool_stride, 0, (pooled_side, pooled_side), out, 8,
                              True)
    assert_close(into[:, 8:32], expected, "the maxima in the maxpool's output")
    assert_close(kept, y, "the convolution's output")
    np.testing.assert_array_equal(into[:, :8], out[:, :8])
    np.testing.assert_array_equal(into[:, 32:], out[:, 32:])


def test_convolution_maxpool_chain(ops, rng):
    """A chain of convolutions each pooled by the [maxpool] that alone reads it (a few input
    channels first, then Winograd's), in one operation, against the definitions stage by
    stage."""
    x = randn(rng, 1, 3, 24, 24)
    stages, expected = [], x
    for c, f, side in [(3, 16, 24), (16, 16, 12)]:
        w = randn(rng, f, c, 3, 3) / np.float32(np.sqrt(9 * c))
        biases = randn(rng, f)
        stages.append((to_backend(ops, w), to_backend(ops, biases), "leaky", 1, 1, 1, 2, 2, 0,
                       (side // 2, side // 2), 1))
        y = activations.activate(conv_reference(expected, w, 1, 1, 1)
                                 + biases.reshape(1, -1, 1, 1), "leaky")
        expected, _ = maxpool_reference(y, 2, 2, 1, side // 2, side // 2)
    pooled, _ = call(ops, "conv_bias_maxpool_chain", x, stages)
    assert_close(pooled, expected, "the last maxpool's output")


def test_computes_into_concatenations(ops, rng):
    """Where a backend says it computes into a route's buffer, the convolution's returned values
    are that buffer's channels (numpy: a view); elsewhere a separate array."""
    w, biases = to_backend(ops, randn(rng, 4, 4, 3, 3)), to_backend(ops, randn(rng, 4))
    # an inference convolution's output, and a route's buffer made like it (Network's plan)
    x = ops.conv_bias_forward(to_backend(ops, randn(rng, 1, 4, 6, 6)), w, biases, "linear", 1,
                              1, 1)
    out = ops.empty((1, 12, 6, 6), like=x)
    y = ops.conv_bias_forward_into_(out, 2, x, w, biases, "linear", 1, 1, 1)
    if ops.computes_into_concatenations:
        assert np.shares_memory(y, out)
    else:
        assert y.shape == (1, 4, 6, 6) and y.ptr != out.ptr


def test_channels_to_read(ops, rng):
    x = randn(rng, 2, 6, 3, 4)
    y, _ = call(ops, "channels_to_read", x, 2, 5)
    np.testing.assert_array_equal(y, x[:, 2:5])


def test_connected(ops, rng):
    x, w = randn(rng, 5, 7, 3, 3), randn(rng, 13, 63)
    y, _ = call(ops, "connected_forward", x, w)
    x64, w64 = x.reshape(5, -1).astype(np.float64), w.astype(np.float64)
    assert_close(y, (x64 @ w64.T).reshape(5, 13, 1, 1), "connected forward")
    delta, start = randn(rng, 5, 13, 1, 1), randn(rng, 13, 63)
    dx, args = call(ops, "connected_backward", x, w, delta, start, True)
    d64 = delta.reshape(5, 13).astype(np.float64)
    assert_close(args[3], start + d64.T @ x64, "connected weight updates")
    assert_close(dx, (d64 @ w64).reshape(x.shape), "connected delta")
    none, _ = call(ops, "connected_backward", x, w, delta, start, False)
    assert none is None


# ---- batch normalisation -----------------------------------------------------------------------
def bn_train_reference(x, scales, biases, per_activation):
    x = x.astype(np.float64)
    axes = (0,) if per_activation else (0, 2, 3)
    shape = (1,) + x.shape[1:] if per_activation else (1, -1, 1, 1)
    mean, variance = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    normal = (x - mean) / np.sqrt(variance + constants.BN_TRAINING_EPSILON)
    return (scales.reshape(shape) * normal + biases.reshape(shape), mean, variance, normal,
            x.size // mean.size)


@pytest.mark.parametrize("shape, per_activation", [((6, 5, 4, 3), False), ((16, 9, 1, 1), False),
                                                   ((4, 3, 2, 2), True)])
@pytest.mark.parametrize("activation", ["linear", "leaky", "logistic", "mish", "swish",
                                        "hard_mish", "gelu"])
def test_batchnorm_training(ops, rng, shape, per_activation, activation):
    """y = act(BN(x)) with the batch statistics; the backward through both (the activations
    whose gradient needs their input included: activations.INPUT_GRADIENT)."""
    x = randn(rng, *shape) * 3 + 1
    n = int(np.prod(shape[1:])) if per_activation else shape[1]
    scales = rng.uniform(0.5, 1.5, n).astype(np.float32)
    biases, mean0 = randn(rng, n), randn(rng, n, scale=0.1)
    variance0 = rng.uniform(0.5, 1.5, n).astype(np.float32)
    (y, cache), args = call(ops, "batchnorm_forward_train", x, scales, biases, mean0, variance0,
                            per_activation=per_activation, activation=activation)
    normalized, mean, variance, normal, count = bn_train_reference(x, scales, biases,
                                                                   per_activation)
    expected = activations.activate(normalized, activation)
    assert_close(y, expected, "BN forward")
    momentum = constants.BN_MOMENTUM
    assert_close(args[3], (1 - momentum) * mean0 + momentum * mean.reshape(-1), "rolling mean")
    unbiased = variance.reshape(-1) * count / (count - 1)
    assert_close(args[4], (1 - momentum) * variance0 + momentum * unbiased, "rolling variance")

    delta = randn(rng, *shape)
    su0, bu0 = randn(rng, n), randn(rng, n)
    moved = [to_backend(ops, a) for a in (delta, scales, su0, bu0)]
    dx = to_numpy(ops, ops.batchnorm_backward(moved[0], cache, moved[1], moved[2], moved[3]))
    axes = (0,) if per_activation else (0, 2, 3)
    slope = (activations.gradient_from_input(normalized, activation)
             if activation in activations.INPUT_GRADIENT
             else activations.gradient(expected, activation))
    through = delta * slope  # the delta of BN's output
    assert_close(to_numpy(ops, moved[3]), bu0 + through.sum(axis=axes).reshape(-1),
                 "BN bias updates")
    assert_close(to_numpy(ops, moved[2]), su0 + (through * normal).sum(axis=axes).reshape(-1),
                 "BN scale updates")
    # the delta through the activation and the batch statistics, by finite differences
    numeric = numeric_gradient(lambda v: activations.activate(
        bn_train_reference(v, scales, biases, per_activation)[0], activation), x, delta)
    assert_close(dx, numeric, "BN delta", tolerance=1e-3)


def test_host_empty(ops):
    """A float32 host array of the shape asked for, which asarray copies in."""
    host = ops.host_empty((2, 3, 4))
    assert isinstance(host, np.ndarray) and host.shape == (2, 3, 4) and host.dtype == np.float32
    host[...] = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(to_numpy(ops, ops.asarray(host)), host)


@pytest.mark.parametrize("epsilons", [constants.PJREDDIE_BN_EPSILONS,
                                      constants.ALEXEYAB_BN_EPSILONS])
@pytest.mark.parametrize("activation, per_activation", [("linear", False), ("mish", False),
                                                        ("leaky", True)])
@pytest.mark.parametrize("height", [4, 700])  # 700 x 3 cells: the GPU's *_planes kernel
def test_batchnorm_inference(ops, rng, epsilons, activation, per_activation, height):
    x = randn(rng, 2, 5, height, 3)
    n = 5 * height * 3 if per_activation else 5
    shape = (1, 5, height, 3) if per_activation else (1, 5, 1, 1)
    scales, biases, mean = randn(rng, n), randn(rng, n), randn(rng, n)
    variance = rng.uniform(0.005, 0.05, n).astype(np.float32)
    y, _ = call(ops, "batchnorm_forward_inference", x, scales, biases, mean, variance,
                per_activation, activation=activation, epsilons=epsilons)
    e0, e1 = epsilons
    f64 = [a.astype(np.float64).reshape(shape) for a in (scales, biases, mean, variance)]
    linear = f64[0] * (x - f64[2]) / (np.sqrt(f64[3] + e0) + e1) + f64[1]
    assert_close(y, activations.activate(linear, activation), "BN inference")


# ---- pooling, resampling, dropout --------------------------------------------------------------
def window(n, out_n, size, stride, padding):
    """For each output position, the input cells [first, last) its window covers."""
    start = -(padding // 2)
    return [(max(start + o * stride, 0), min(start + o * stride + size, n)) for o in range(out_n)]


def maxpool_reference(x, size, stride, padding, out_h, out_w):
    b, c, h, w = x.shape
    y = np.full((b, c, out_h, out_w), -FLT_MAX)
    winner = np.full((b, c, out_h, out_w, 2), -1)
    for oy, (y0, y1) in enumerate(window(h, out_h, size, stride, padding)):
        for ox, (x0, x1) in enumerate(window(w, out_w, size, stride, padding)):
            if y1 > y0 and x1 > x0:
                cells = x[:, :, y0:y1, x0:x1].reshape(b, c, -1)
                first = cells.argmax(axis=2)  # the first maximum in the window's row-major order
                y[:, :, oy, ox] = cells.max(axis=2)
                winner[:, :, oy, ox] = np.stack([y0 + first // (x1 - x0), x0 + first % (x1 - x0)],
                                                axis=-1)
    return y, winner


@pytest.mark.parametrize("size, stride, padding", [(2, 2, 1), (2, 1, 1), (3, 2, 2), (3, 1, 2),
                                                   (2, 2, 0), (5, 3, 4), (13, 1, 12), (40, 3, 39),
                                                   (3, 1, 9)])
def test_maxpool(ops, rng, size, stride, padding):
    x = randn(rng, 2, 3, 9, 8)
    x[0, 0, 0, :4] = 7.0  # ties: the first cell of the window wins
    out_h, out_w = (9 + padding - size) // stride + 1, (8 + padding - size) // stride + 1
    pad = padding // 2  # Darknet's rule (layers/maxpool.py); the operation takes the offset
    (y, argmax), _ = call(ops, "maxpool_forward", x, size, stride, pad, out_h, out_w)
    expected, winner = maxpool_reference(x, size, stride, padding, out_h, out_w)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    (inferred, _), _ = call(ops, "maxpool_forward", x, size, stride, pad, out_h, out_w,
                            train=False)
    np.testing.assert_array_equal(inferred, y)
    delta = randn(rng, *y.shape)
    dx = to_numpy(ops, ops.maxpool_backward(to_backend(ops, delta), argmax, x.shape, size, stride,
                                            pad))
    expected_dx = np.zeros(x.shape)
    for index in np.ndindex(y.shape):
        row, col = winner[index]
        if row >= 0:
            expected_dx[index[0], index[1], row, col] += delta[index]
    assert_close(dx, expected_dx, "maxpool delta")


def test_dropout(ops, rng):
    x, p = randn(rng, 16, 16, 8, 8), 0.3
    ops.seed(5)
    (y, mask), _ = call(ops, "dropout_forward", x, p)
    survivor = np.float32(1 / (1 - p))
    assert set(np.unique(mask)) <= {np.float32(0), survivor}
    assert abs((mask == 0).mean() - p) < 0.02
    assert_close(y, x * mask.astype(np.float64), "dropout forward")
    delta = randn(rng, *x.shape)
    dx, _ = call(ops, "dropout_backward", delta, mask)
    assert_close(dx, delta * mask.astype(np.float64), "dropout backward")
    (_, again), _ = call(ops, "dropout_forward", x, p)
    assert (again != mask).any(), "each call draws a new mask"
    ops.seed(5)
    (_, reseeded), _ = call(ops, "dropout_forward", x, p)
    np.testing.assert_array_equal(reseeded, mask)


def local_avgpool_reference(x, size, stride, padding, out_h, out_w):
    b, c, h, w = x.shape
    y = np.zeros((b, c, out_h, out_w))
    for oy, (y0, y1) in enumerate(window(h, out_h, size, stride, padding)):
        for ox, (x0, x1) in enumerate(window(w, out_w, size, stride, padding)):
            y[:, :, oy, ox] = x[:, :, y0:y1, x0:x1].astype(np.float64).mean(axis=(2, 3))
    return y


@pytest.mark.parametrize("size, stride, padding", [(3, 2, 2), (2, 1, 1), (3, 1, 0), (5, 2, 4)])
def test_local_avgpool(ops, rng, size, stride, padding):
    x = randn(rng, 2, 3, 7, 6)
    out_h, out_w = (7 + padding - size) // stride + 1, (6 + padding - size) // stride + 1
    y, _ = call(ops, "local_avgpool", x, size, stride, padding // 2, out_h, out_w)
    assert_close(y, local_avgpool_reference(x, size, stride, padding, out_h, out_w), "forward")
    delta = randn(rng, *y.shape)
    dx, _ = call(ops, "local_avgpool_backward", delta, x.shape, size, stride, padding // 2)
    numeric = numeric_gradient(lambda v: local_avgpool_reference(v, size, stride, padding, out_h,
                                                                 out_w), x, delta)
    assert_close(dx, numeric, "local_avgpool backward", tolerance=1e-3)


# ---- outputs and losses, optimisation ----------------------------------------------------------
@pytest.mark.parametrize("groups, temperature", [(1, 1.0), (2, 1.0), (5, 0.5)])
def test_softmax_and_costs(ops, rng, groups, temperature):
    x = randn(rng, 6, 10, 1, 1, scale=3)
    p, _ = call(ops, "softmax", x, groups, temperature)
    z = x.astype(np.float64).reshape(6, groups, -1) / temperature
    expected = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    assert_close(p, expected.reshape(x.shape), "softmax")
    truth = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 6)]
    (cost, delta), _ = call(ops, "softmax_cross_entropy", p, truth)
    p64 = p.astype(np.float64).reshape(6, 10)
    floor = constants.CROSS_ENTROPY_FLOOR
    assert cost == pytest.approx(-(truth * np.log(np.maximum(p64, floor))).sum(), rel=1e-4)
    assert_close(delta, (truth - p64).reshape(p.shape), "cross-entropy delta")
    target = randn(rng, 6, 10)
    (cost, delta), _ = call(ops, "sse", x, target)
    diff = target - x.astype(np.float64).reshape(6, 10)
    assert cost == pytest.approx((diff ** 2).sum(), rel=1e-4)
    assert_close(delta, diff.reshape(x.shape), "sse delta")


@pytest.mark.parametrize("decay", [0.0, 0.0005])
def test_sgd_update(ops, rng, decay):
    param, gradient, velocity = (randn(rng, 7, 3, 3, 3) for _ in range(3))
    _, (new_param, new_gradient, new_velocity, *_) = call(
        ops, "sgd_update", param, gradient, velocity, 0.1, 0.9, decay, 128)
    v = 0.9 * velocity.astype(np.float64) + gradient - decay * 128 * param
    assert_close(new_param, param + 0.1 / 128 * v, "param")
    assert_close(new_velocity, v, "velocity")
    assert not np.asarray(new_gradient).any()  # the gradient is consumed


# ---- broadcasting and channels -----------------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [((2, 5, 4, 3), (2, 5, 1, 1)),
                                              ((2, 5, 4, 3), (2, 1, 4, 3)),
                                              ((2, 5, 4, 3), (2, 5, 4, 3)),
                                              ((2, 5, 4, 3), (1, 5, 1, 1)),
                                              ((2, 5, 4, 3), (1, 1, 1, 1))])
def test_multiply_and_sum_to(ops, rng, a_shape, b_shape):
    a, b = randn(rng, *a_shape), randn(rng, *b_shape)
    expected = a.astype(np.float64) * b
    assert_close(call(ops, "multiply", a, b)[0], expected, "multiply")
    assert_close(call(ops, "multiply", b, a)[0], expected, "multiply, b first")
    summed, _ = call(ops, "sum_to", a, b_shape)
    axes = tuple(i for i, (n, m) in enumerate(zip(a_shape, b_shape)) if m == 1 and n != 1)
    assert_close(summed, a.astype(np.float64).sum(axis=axes, keepdims=True), "sum_to")


@pytest.mark.parametrize("channels, groups", [(6, 3), (5, 2)])
def test_channel_max(ops, rng, channels, groups):
    x = randn(rng, 2, channels, 4, 3)
    x[0, groups, 0, 0] = x[0, 0, 0, 0] = 9.0  # a tie: the first channel wins
    (y, winner), _ = call(ops, "channel_max", x, groups)
    expected = np.stack([x[:, g::groups].max(axis=1) for g in range(groups)], axis=1)
    np.testing.assert_array_equal(y, expected)
    delta = randn(rng, *y.shape)
    dx = to_numpy(ops, ops.channel_max_backward(to_backend(ops, delta), winner, x.shape))
    expected_dx = np.zeros(x.shape)
    for b, g, i, j in np.ndindex(y.shape):
        members = x[b, g::groups, i, j]
        expected_dx[b, g + groups * int(members.argmax()), i, j] = delta[b, g, i, j]
    assert_close(dx, expected_dx, "channel_max backward")


# ---- recording ---------------------------------------------------------------------------------
def test_recording_replays_the_step(ops, rng):
    """Where can_record: a recorded step (recording does not run it) replays on its buffers with
    each replay's learning rate, and last_cost reads the replayed loss; elsewhere capture and
    last_cost are clear errors."""
    if not ops.can_record:
        for refused in (lambda: ops.capture(lambda: None), ops.last_cost, ops.recording,
                        lambda: ops.set_step(0.1, 1)):
            with pytest.raises(BackendError, match="cannot record"):
                refused()
        return
    param, velocity, x = randn(rng, 4, 6), randn(rng, 4, 6), randn(rng, 3, 6, 1, 1)
    p, v, inputs, truth = (ops.asarray(a.copy()) for a in (param, velocity, x, x * 0))
    g = ops.zeros(param.shape)  # no gradient: each step only carries the momentum

    def step():
        cost, _ = ops.sse(inputs, truth)
        ops.sgd_update(p, g, v, 0.0, 0.9, 0.0, 1)  # the rate: the replay's, while recorded
        return cost

    step()  # eager, rate 0: p stays, v becomes 0.9 v0
    recording = ops.capture(step)
    recording.replay(0.5)  # v *= 0.9; p += 0.5 v
    v64 = velocity.astype(np.float64)
    assert_close(ops.to_host(p), param + 0.5 * 0.81 * v64, "replayed update")
    assert_close(ops.to_host(v), 0.81 * v64, "replayed momentum")
    cost = float((x.astype(np.float64) ** 2).sum())
    assert recording.last_cost() == pytest.approx(cost, rel=1e-5)
    assert ops.last_cost() == pytest.approx(cost, rel=1e-5)


# ---- data-parallel training --------------------------------------------------------------------
def test_collectives_sum_over_the_ranks(ops, rng):
    """One rank (this process): the sum over the ranks is the array itself, in place."""
    MPI = pytest.importorskip("mpi4py.MPI")
    x = randn(rng, 5, 4)
    a = ops.asarray(x.copy())
    summed = ops.collectives(MPI.COMM_WORLD).allreduce_sum_(a)
    assert_close(ops.to_host(summed), x * MPI.COMM_WORLD.Get_size(), "allreduce")
    assert_close(ops.to_host(a), x * MPI.COMM_WORLD.Get_size(), "in place")


# ---- every declared operation is exercised here ------------------------------------------------
def test_every_operation_is_tested():
    """A new operation is declared in operations.py and gets a test in a test_*operations.py
    file (ops.<name> or call(ops, "<name>", ...))."""
    used = set()
    for path in glob.glob(os.path.join(os.path.dirname(__file__), "test_*operations.py")):
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "ops":
                used.add(node.attr)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "call" and \
                    len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                used.add(node.args[1].value)
    untested = DECLARED - used
    assert not untested, f"operations without a test: {sorted(untested)}"
