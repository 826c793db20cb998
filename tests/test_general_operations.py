"""The general operations (strided views, broadcasting sums, reductions, pooling with explicit
geometry) and the layer helpers composed from them, on every backend: numpy always, CUDA under
the `gpu` marker (skipped without a GPU). Each is compared with plain-Python loops or a formula
written here, independently of both backends; the CUDA kernels' argument lists are checked
against the signatures the backend launches them with (no GPU needed)."""

import itertools
import os
import re

import numpy as np
import pytest

from engine import activations
from engine.backends import views
from engine.backends.cuda.kernels import KERNEL_DIR, SIGNATURES
from engine.backends.numpy_backend import FLOAT32_MAX, NumpyBackend
from engine.layers.anchor_activation import anchor_activate
from helpers import transcribed_strided_at
from engine.layers.channels import add_channel_slice_, channel_slice, concat_channels
from engine.layers.reorg import reorg
from engine.layers.upsample import downsample_sum, upsample


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def ops(request):
    if request.param == "cpu":
        return NumpyBackend(seed=0)
    from engine.backends.cuda import CudaBackend

    return CudaBackend(device=0, seed=0)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def host(ops, array):
    return np.asarray(ops.to_host(array), dtype=np.float64)


def reference_indexes(view):
    """Flat NCHW indexes of the view's elements in window order, by loops over the window."""
    shape, window, axes = view
    axes = tuple(range(len(shape))) if axes is None else axes
    result = []
    for m in itertools.product(*(range(count) for _, count, _ in window)):
        seen = [start + k * step for k, (start, _, step) in zip(m, window)]
        original = [0] * len(shape)
        for position, axis in enumerate(axes):
            original[axis] = seen[position]
        result.append(int(np.ravel_multi_index(original, shape)))
    return np.array(result, dtype=np.int64).reshape(view.counts)


# ---- strided_copy_ ------------------------------------------------------------------------------
COPIES = {
    "channel range into a wider array": (
        (2, 5, 3, 4), views.window((2, 5, 12), None, (1, 3, 1)),
        (2, 3, 3, 4), views.whole((2, 3, 12))),
    "every other cell, both sides strided": (
        (2, 3, 6, 6), views.window((2, 3, 6, 6), None, (0, 2, 1), (0, 3, 2), (1, 3, 2)),
        (2, 4, 9, 9), views.window((2, 4, 9, 9), None, (1, 2, 1), (0, 3, 3), (0, 3, 3))),
    "mirrored columns (negative step)": (
        (1, 2, 3, 5), views.whole((1, 2, 3, 5)),
        (1, 2, 4, 7), views.window((1, 2, 4, 7), None, None, (1, 3, 1), (6, 5, -1))),
    "repeated cells (step 0)": (
        (2, 3, 4, 6), views.whole((2, 3, 2, 2, 3, 2)),
        (2, 3, 2, 3), views.window((2, 3, 2, 1, 3, 1), None, None, None, (0, 2, 0), None,
                                   (0, 2, 0))),
    "permuted axes": (
        (2, 12, 2, 3), views.whole((2, 3, 2, 2, 3, 2)),
        (2, 3, 4, 6), views.whole((2, 2, 2, 3, 2, 3), axes=(0, 3, 4, 1, 5, 2))),
}


@pytest.mark.parametrize("case", list(COPIES))
@pytest.mark.parametrize("scale, shift, accumulate", [(1.0, 0.0, False), (-0.5, 0.25, False),
                                                      (2.0, 0.0, True), (1.0, -1.0, True)])
def test_strided_copy_matches_loops(ops, case, scale, shift, accumulate):
    dst_shape, dst_view, src_shape, src_view = COPIES[case]
    rng = np.random.default_rng(len(case))
    dst, src = randn(rng, *dst_shape), randn(rng, *src_shape)
    expected = dst.astype(np.float64).ravel()
    targets, sources = reference_indexes(dst_view).ravel(), reference_indexes(src_view).ravel()
    for t, s in zip(targets, sources):
        value = scale * float(src.flat[s]) + shift
        expected[t] = expected[t] + value if accumulate else value
    out = ops.strided_copy_(ops.asarray(dst), dst_view, ops.asarray(src), src_view, scale=scale,
                            shift=shift, accumulate=accumulate)
    np.testing.assert_allclose(host(ops, out).ravel(), expected, rtol=1e-6, atol=1e-6)


def test_strided_copy_in_place_on_one_view(ops):
    """src may be dst with the same view: an affine map on part of an array."""
    rng = np.random.default_rng(3)
    x = randn(rng, 2, 6, 3, 3)
    part = views.window((2, 2, 3, 9), None, None, (0, 2, 1))
    expected = x.astype(np.float64).copy()
    expected.reshape(2, 2, 3, 9)[:, :, :2] = expected.reshape(2, 2, 3, 9)[:, :, :2] * 1.5 - 0.25
    y = ops.asarray(x)
    out = ops.strided_copy_(y, part, y, part, scale=1.5, shift=-0.25)
    np.testing.assert_allclose(host(ops, out), expected, rtol=1e-6, atol=1e-6)


def test_strided_copy_refuses_a_view_outside_its_array():
    ops = NumpyBackend()
    x = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(ValueError):
        ops.strided_copy_(x, views.window((1, 2, 9), None, (1, 2, 1)), x, views.whole((1, 2, 9)))
    with pytest.raises(ValueError):
        ops.strided_copy_(x, views.whole((2, 9)), x, views.whole((1, 2, 3, 4)))
    with pytest.raises(ValueError):  # the same number of elements, other counts
        ops.strided_copy_(x, views.whole((2, 9)), x, views.whole((1, 2, 9)))


def test_view_geometry_matches_loops():
    """views.strides (what the CUDA kernels walk) gives the indexes the loops give."""
    for _, view, _, src_view in COPIES.values():
        for v in (view, src_view):
            offset, counts, steps = views.strides(v)
            walked = [offset + sum(i * s for i, s in zip(m, steps))
                      for m in itertools.product(*(range(c) for c in counts))]
            np.testing.assert_array_equal(np.array(walked), reference_indexes(v).ravel())


# ---- activate_ and softmax_ on a view ---------------------------------------------------------------
@pytest.mark.parametrize("activation", ["logistic", "leaky", "mish"])
def test_activate_on_a_view(ops, activation):
    rng = np.random.default_rng(4)
    x = randn(rng, 2, 12, 3, 2)
    view = views.window((2, 3, 4, 6), None, None, (1, 2, 1))
    expected = x.astype(np.float64).ravel()
    for index in reference_indexes(view).ravel():
        expected[index] = activations.activate(np.float64(x.flat[index]).reshape(1), activation)[0]
    out = ops.activate_(ops.asarray(x), activation, view)
    np.testing.assert_allclose(host(ops, out).ravel(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_along_an_axis_of_a_view(ops, axis):
    rng = np.random.default_rng(5 + axis)
    x = randn(rng, 2, 15, 2, 2) * 3
    view = views.window((2, 3, 5, 4), None, None, (2, 3, 1))
    indexes = reference_indexes(view)
    expected = x.astype(np.float64).ravel()
    lanes = np.moveaxis(indexes, axis, -1).reshape(-1, indexes.shape[axis])
    for lane in lanes:
        values = np.exp(expected[lane] - expected[lane].max())
        expected[lane] = values / values.sum()
    out = ops.softmax_(ops.asarray(x), view, axis)
    np.testing.assert_allclose(host(ops, out).ravel(), expected, rtol=1e-5, atol=1e-7)


# ---- broadcasting sums and reductions ---------------------------------------------------------------
@pytest.mark.parametrize("b_shape", [(2, 3, 4, 5), (1, 3, 1, 1), (2, 1, 4, 5), (2, 3, 1, 1)])
def test_add_broadcasts_with_weights(ops, b_shape):
    rng = np.random.default_rng(6)
    a, b = randn(rng, 2, 3, 4, 5), randn(rng, *b_shape)
    expected = 0.5 * a.astype(np.float64) + 2.0 * np.broadcast_to(b, a.shape)
    np.testing.assert_allclose(host(ops, ops.add(ops.asarray(a), ops.asarray(b), 0.5, 2.0)),
                               expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(host(ops, ops.add(ops.asarray(a), ops.asarray(b))),
                               a + np.broadcast_to(b, a.shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x_shape, shape", [
    ((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 3, 4, 5), (1, 1, 1, 1)), ((2, 3, 4, 5), (2, 1, 4, 5)),
    ((2, 3, 2, 3, 2, 3), (2, 3, 2, 1, 2, 1)), ((3, 1, 4, 2, 5, 2), (1, 1, 4, 1, 5, 1)),
    ((2, 5, 36), (2, 5, 1))])
def test_sum_to_matches_loops(ops, x_shape, shape):
    rng = np.random.default_rng(7)
    x = randn(rng, *x_shape)
    expected = np.zeros(shape)
    for index in itertools.product(*(range(n) for n in x_shape)):
        target = tuple(i if m != 1 else 0 for i, m in zip(index, shape))
        expected[target] += x[index]
    out = ops.sum_to(ops.asarray(x), shape, 0.5)
    np.testing.assert_allclose(host(ops, out), 0.5 * expected, rtol=1e-5, atol=1e-5)


# ---- pooling with explicit geometry ----------------------------------------------------------------
def loop_maxpool(x, size, stride, pad, out_h, out_w):
    b, c, h, w = x.shape
    y = np.full((b, c, out_h, out_w), -FLOAT32_MAX, np.float64)
    for i, j in itertools.product(range(out_h), range(out_w)):
        for r, s in itertools.product(range(size), range(size)):
            row, col = i * stride - pad + r, j * stride - pad + s
            if 0 <= row < h and 0 <= col < w:
                y[:, :, i, j] = np.maximum(y[:, :, i, j], x[:, :, row, col])
    return y


@pytest.mark.parametrize("size, stride, pad, out", [(2, 2, 0, 3), (3, 2, 1, 3), (2, 1, 0, 5),
                                                    (3, 1, 2, 8), (5, 3, 3, 4)])
def test_maxpool_takes_the_first_window_offset(ops, size, stride, pad, out):
    """The backends get the first window's offset (the layer computes Darknet's padding//2);
    windows beyond the input give -FLT_MAX."""
    rng = np.random.default_rng(size * 7 + pad)
    x = randn(rng, 2, 3, 6, 6)
    for train in (True, False):
        y, _ = ops.maxpool_forward(ops.asarray(x), size, stride, pad, out, out, train=train)
        np.testing.assert_array_equal(host(ops, y), loop_maxpool(x, size, stride, pad, out, out))


def test_local_avgpool_takes_the_first_window_offset(ops):
    rng = np.random.default_rng(8)
    x = randn(rng, 1, 2, 5, 5)
    size, stride, pad, out = 3, 2, 1, 3
    expected = np.zeros((1, 2, out, out))
    for i, j in itertools.product(range(out), range(out)):
        rows = range(max(i * stride - pad, 0), min(i * stride - pad + size, 5))
        cols = range(max(j * stride - pad, 0), min(j * stride - pad + size, 5))
        expected[:, :, i, j] = x[:, :, rows][:, :, :, cols].mean(axis=(2, 3))
    y = ops.local_avgpool(ops.asarray(x), size, stride, pad, out, out)
    np.testing.assert_allclose(host(ops, y), expected, rtol=1e-5, atol=1e-6)


# ---- the layer helpers composed from them ------------------------------------------------------------
def test_channel_helpers(ops):
    rng = np.random.default_rng(9)
    a, b = randn(rng, 2, 3, 4, 4), randn(rng, 2, 5, 4, 4)
    np.testing.assert_array_equal(host(ops, channel_slice(ops, ops.asarray(b), 1, 4)), b[:, 1:4])
    np.testing.assert_array_equal(
        host(ops, concat_channels(ops, [ops.asarray(a), (ops.asarray(b), 2, 5)])),
        np.concatenate([a, b[:, 2:5]], axis=1))
    expected = b.astype(np.float64)
    expected[:, 2:5] += a
    np.testing.assert_allclose(host(ops, add_channel_slice_(ops, ops.asarray(b), 2, ops.asarray(a))),
                               expected, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_upsample_and_its_adjoint(ops, scale):
    rng = np.random.default_rng(10)
    x = randn(rng, 2, 3, 3, 4)
    expected = np.zeros((2, 3, 6, 8))
    for i, j in itertools.product(range(6), range(8)):
        expected[:, :, i, j] = scale * x[:, :, i // 2, j // 2]
    y = upsample(ops, ops.asarray(x), 2, scale)
    np.testing.assert_allclose(host(ops, y), expected, rtol=1e-6)
    # <upsample(x), d> = <x, downsample_sum(d)>
    d = randn(rng, 2, 3, 6, 8)
    back = host(ops, downsample_sum(ops, ops.asarray(d), 2, scale))
    assert back.shape == x.shape
    np.testing.assert_allclose((expected * d).sum(), (x * back).sum(), rtol=1e-4)


def loop_reorg(x, stride, forward, dims):
    """Darknet's reorg_cpu, transcribed as loops."""
    c, h, w = dims
    b = x.shape[0]
    flat, out = x.ravel(), np.zeros(x.size)
    oc = c // (stride * stride)
    for n, k, j, i in itertools.product(range(b), range(c), range(h), range(w)):
        in_index = i + w * (j + h * (k + c * n))
        c2, offset = k % oc, k // oc
        w2, h2 = i * stride + offset % stride, j * stride + offset // stride
        out_index = w2 + w * stride * (h2 + h * stride * (c2 + oc * n))
        if forward:
            out[out_index] = flat[in_index]
        else:
            out[in_index] = flat[out_index]
    return out


@pytest.mark.parametrize("forward", [False, True])
def test_reorg_is_darknets(ops, forward):
    rng = np.random.default_rng(11)
    dims, out_shape = (8, 2, 3), (2, 4, 6) if forward else (8, 2, 3)
    x = randn(rng, 2, 8, 2, 3) if not forward else randn(rng, 2, 8, 2, 3)
    y = reorg(ops, ops.asarray(x), 2, forward, dims, out_shape)
    np.testing.assert_array_equal(host(ops, y).ravel(), loop_reorg(x, 2, forward, dims))


@pytest.mark.parametrize("softmax", [False, True])
def test_anchor_activate(ops, softmax):
    rng = np.random.default_rng(12)
    anchors, entries = 3, 7
    x = randn(rng, 2, anchors * entries, 3, 4) * 2
    y = host(ops, anchor_activate(ops, ops.asarray(x), anchors, ((0, 2), (4, 5)),
                                  (5, 7) if softmax else None, ((0, 2, 1.1, -0.05),)))
    grouped = x.astype(np.float64).reshape(2, anchors, entries, 3, 4)
    expected = grouped.copy()
    expected[:, :, [0, 1, 4]] = 1 / (1 + np.exp(-grouped[:, :, [0, 1, 4]]))
    if softmax:
        z = np.exp(grouped[:, :, 5:7] - grouped[:, :, 5:7].max(axis=2, keepdims=True))
        expected[:, :, 5:7] = z / z.sum(axis=2, keepdims=True)
    expected[:, :, :2] = expected[:, :, :2] * 1.1 - 0.05
    np.testing.assert_allclose(y, expected.reshape(x.shape), rtol=1e-5, atol=1e-6)


# ---- the CUDA kernels' argument lists ----------------------------------------------------------------
TYPE_LETTERS = {"int": "i", "unsigned": "I", "float": "f"}


def kernel_parameters(source, name):
    with open(os.path.join(KERNEL_DIR, source)) as handle:
        text = handle.read()
    macros = {"WINDOW_COUNTS": "int c1, int c2, int c3, int c4, int c5"}
    strides = "int offset, int s0, int s1, int s2, int s3, int s4, int s5"
    text = re.sub(r"WINDOW_STRIDES\(\w*\)", strides, text)
    for macro, expansion in macros.items():
        text = text.replace(macro, expansion)
    match = re.search(rf'extern "C" __global__ void {name}\(([^)]*)\)', text)
    assert match, name
    letters = ""
    for parameter in match.group(1).split(","):
        words = parameter.replace("const", "").split()
        letters += "P" if "*" in parameter else TYPE_LETTERS[words[0]]
    return letters


@pytest.mark.parametrize("kernel", sorted(SIGNATURES))
def test_kernel_arguments_match_the_launch_signature(kernel):
    """A kernel launched with the wrong argument list reads garbage on the GPU: check each
    kernel's parameters against the signature kernels.py prepares it with."""
    source, signature = SIGNATURES[kernel]
    assert kernel_parameters(source, kernel) == signature


# ---- the CUDA backend's geometry, through Python transcriptions of its kernels (no GPU) -------------
def transcribed_sum_to(x, counts, keep, scale):
    """strided.cu's sum_to_kernel, line by line, over every output element."""
    stride, step = [0] * 6, 1
    outputs = int(np.prod([c if keep >> k & 1 else 1 for k, c in enumerate(counts)]))
    out = np.zeros(outputs)
    for o in range(outputs):
        base, rest, reduced, step = 0, o, 1, 1
        for k in range(5, -1, -1):
            stride[k] = step
            step *= counts[k]
            if keep >> k & 1:
                base += (rest % counts[k]) * stride[k]
                rest //= counts[k]
            else:
                reduced *= counts[k]
        inner = next((k for k in range(5, -1, -1) if not keep >> k & 1 and counts[k] > 1), -1)
        inner_count = 1 if inner < 0 else counts[inner]
        inner_stride = 0 if inner < 0 else stride[inner]
        total = 0.0
        for r in range(reduced // inner_count):
            at, q = base, r
            for k in range(5, -1, -1):
                if not keep >> k & 1 and k != inner:
                    at += (q % counts[k]) * stride[k]
                    q //= counts[k]
            for j in range(inner_count):
                total += x.flat[at + j * inner_stride]
        out[o] = scale * total
    return out


@pytest.mark.parametrize("x_shape, shape", [
    ((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 3, 4, 5), (1, 1, 1, 1)), ((2, 3, 4, 5), (2, 1, 4, 5)),
    ((2, 3, 2, 3, 2, 3), (2, 3, 2, 1, 2, 1)), ((3, 1, 4, 2, 5, 2), (1, 1, 4, 1, 5, 1)),
    ((2, 5, 36), (2, 5, 1))])
def test_cuda_sum_to_geometry(x_shape, shape):
    from engine.backends.cuda.backend import _merged_axes

    x = randn(np.random.default_rng(13), *x_shape)
    counts, keep = _merged_axes(x_shape, shape)
    expected = NumpyBackend().sum_to(x, shape, 0.5)
    np.testing.assert_allclose(transcribed_sum_to(x, counts, keep, 0.5), expected.ravel(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(COPIES))
def test_cuda_view_walk(case):
    from engine.backends.cuda.backend import _walk

    dst_shape, dst_view, src_shape, src_view = COPIES[case]
    for shape, view in ((dst_shape, dst_view), (src_shape, src_view)):
        n, counts, walk = _walk(view, np.zeros(shape, np.float32))
        assert len(counts) == 5 and len(walk) == 7
        walked = [transcribed_strided_at(i, counts, walk) for i in range(n)]
        np.testing.assert_array_equal(walked, reference_indexes(view).ravel())


@pytest.mark.parametrize("axis", [1, 2])
def test_cuda_softmax_lanes(axis):
    from engine.backends.cuda.backend import _lanes

    view = views.window((2, 3, 5, 4), None, None, (2, 3, 1))
    n, counts, walk, count, stride = _lanes(view, axis, np.zeros(120, np.float32))
    lanes = [[transcribed_strided_at(i, counts, walk) + e * stride for e in range(count)]
             for i in range(n)]
    indexes = reference_indexes(view)
    expected = np.moveaxis(indexes, axis, -1).reshape(-1, indexes.shape[axis])
    np.testing.assert_array_equal(np.array(lanes), expected)


@pytest.mark.parametrize("case", list(COPIES))
def test_cuda_joint_walk_of_a_copy(case):
    """strided_copy_'s two views walked together (axes merged where both allow) pair the
    elements the loops pair."""
    from engine.backends.cuda.backend import _joint_walk

    dst_shape, dst_view, src_shape, src_view = COPIES[case]
    n, counts, (src_walk, dst_walk) = _joint_walk(((src_view, int(np.prod(src_shape)), None),
                                                   (dst_view, int(np.prod(dst_shape)), None)))
    for walk, view in ((src_walk, src_view), (dst_walk, dst_view)):
        walked = [transcribed_strided_at(i, counts, walk) for i in range(n)]
        np.testing.assert_array_equal(walked, reference_indexes(view).ravel())


def test_cuda_joint_walk_merges_a_routes_copy():
    """Copying a whole map into a channel range of one image needs no index division."""
    from engine.backends.cuda.backend import _joint_walk

    src = views.whole((1, 32, 208 * 208))
    dst = views.window((1, 96, 208 * 208), None, (32, 32, 1))
    n, counts, _ = _joint_walk(((src, 32 * 208 * 208, None), (dst, 96 * 208 * 208, None)))
    assert n == 32 * 208 * 208 and counts == (1, 1, 1, 1, 1)


def test_numpy_views_of_batch_innermost_arrays():
    """The numpy backend keeps convolution outputs batch-innermost; a view whose reshape would
    copy such an array is written through a copy and written back."""
    ops = NumpyBackend()
    rng = np.random.default_rng(14)
    x = ops.conv_forward(randn(rng, 3, 4, 5, 5), randn(rng, 6, 4, 1, 1), 1, 0, 1, train=True)
    assert not x.flags.c_contiguous  # (C, H, W, B) in memory
    expected = np.array(x, dtype=np.float64, order="C")
    flat = expected.reshape(18, 25)
    flat[2:9:3] = 2 * flat[2:9:3] + 1
    view = views.window((18, 25), (2, 3, 3))  # batch and channel merged: no numpy view of x
    ops.strided_copy_(x, view, x.copy(), view, scale=2.0, shift=1.0)
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    logistic = views.window((3, 2, 3, 25), None, None, (1, 2, 1))  # a view of x itself
    expected = np.array(x, dtype=np.float64, order="C")
    expected.reshape(3, 2, 3, 25)[:, :, 1:3] = 1 / (1 + np.exp(-expected.reshape(3, 2, 3, 25)[:, :, 1:3]))
    np.testing.assert_allclose(ops.activate_(x, "logistic", logistic), expected, rtol=1e-6)
