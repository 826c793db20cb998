"""The CPU backend's inference paths (README, "CPU inference speed"): Winograd convolutions,
cached filters for frozen weights, maxpool without argmax, the equal-shape shortcut and the
backend's own threads, each against plain float64 numpy or the training path."""

import itertools
import os

import numpy as np
import pytest
from conftest import CFG

from engine.backends import numpy_backend, winograd
from engine.backends.numpy_backend import NumpyBackend
from engine.errors import BackendError
from engine.layers.channels import concat_channels
from engine.layers.upsample import upsample
from engine.network import Network

YOLOV3_TINY = os.path.join(CFG, "yolov3-tiny.cfg")
YOLOV4_TINY = os.path.join(CFG, "yolov4-tiny.cfg")


def assert_kept_outputs_equal(before, after):
    """Every layer output `before` kept (not None: a plan may skip some) equals `after`'s."""
    for index, (a, b) in enumerate(zip(before, after)):
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=f"layer {index}")


def direct_conv(x, w, padding):
    """float64 reference: y[b, f, i, j] = sum_c,di,dj w[f, c, di, dj] x[b, c, i+di-p, j+dj-p]."""
    b, _, h, wd = x.shape
    f, _, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h, out_w = h + 2 * padding - k + 1, wd + 2 * padding - k + 1
    y = np.zeros((b, f, out_h, out_w))
    for di in range(k):
        for dj in range(k):
            y += np.einsum("bchw,fc->bfhw", xp[:, :, di:di + out_h, dj:dj + out_w],
                           w[:, :, di, dj].astype(np.float64))
    return y


def relative_error(got, expected):
    return np.abs(got - expected).max() / np.abs(expected).max()


# shapes cover both variants (F4 from 20x20 up, F2 below), sides that are not whole tiles,
# batches, and maps cut into several blocks of tile rows
@pytest.mark.parametrize("batch, channels, filters, height, width", [
    (1, 16, 32, 13, 13), (2, 32, 24, 26, 27), (3, 20, 8, 7, 5), (1, 64, 16, 52, 49),
    (1, 128, 40, 24, 24), (2, 16, 16, 41, 21), (1, 16, 8, 118, 61)])
def test_winograd_matches_the_direct_sum(batch, channels, filters, height, width):
    rng = np.random.default_rng(height * width + channels)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    w = (rng.standard_normal((filters, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    assert winograd.fits(x.shape, w.shape, 1, 1, 1, 1)
    ops = NumpyBackend()
    y = ops.conv_forward(x, w, 1, 1, 1, train=False)
    expected = direct_conv(x, w, 1)
    assert y.shape == expected.shape
    assert relative_error(y, expected) < 2e-5
    # the training path (im2col) is the float32 direct sum
    assert relative_error(ops.conv_forward(x, w, 1, 1, 1, train=True), expected) < 2e-6


# one block of tiles shared out by transform points on several threads (small maps whose
# filters are too large for a block per thread): tiles that hang over the map's edge (13x13 in
# F(2x2), 26x26 in F(4x4)), whole tiles, batches, 3 threads
@pytest.mark.parametrize("batch, channels, filters, height, width, threads, tasks", [
    (1, 32, 24, 13, 13, 2, [2, 2]), (1, 16, 40, 26, 26, 2, [2, 2]), (2, 24, 8, 24, 20, 2, [2, 2]),
    (1, 16, 8, 11, 7, 3, [2, 2]), (1, 16, 8, 20, 20, 3, [3, 2])])
def test_winograd_shared_out_by_points_matches_the_direct_sum(monkeypatch, batch, channels,
                                                               filters, height, width, threads,
                                                               tasks):
    monkeypatch.setattr(winograd, "ROW_BLOCK_FILTER_ELEMENTS", 0)
    rng = np.random.default_rng(height * width + filters)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    w = (rng.standard_normal((filters, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    v = winograd.variant(height, width)
    calls = []

    def run(tasks):  # one after the other, counting the steps
        calls.append(len(tasks))
        for task in tasks:
            task()
    y = winograd.conv3x3(x, winograd.transform_filters(w, v), filters, v, run, threads)
    # one block: points, then output rows, shared out (F(2x2)'s 4 rows of points in 2 parts)
    assert calls == tasks
    assert relative_error(y, direct_conv(x, w, 1)) < 2e-5
    np.testing.assert_allclose(y, winograd.conv3x3(x, winograd.transform_filters(w, v), filters,
                                                   v), rtol=0, atol=1e-6)


# a small map whose transformed filters are small takes one block of tile rows per thread (one
# hand-off) instead of the shared block: the same cases, and a layer's worth of channels
@pytest.mark.parametrize("batch, channels, filters, height, width, threads", [
    (1, 32, 24, 13, 13, 2), (1, 16, 40, 26, 26, 2), (2, 24, 8, 24, 20, 2), (1, 16, 8, 11, 7, 3),
    (1, 16, 8, 20, 20, 3), (1, 128, 128, 26, 26, 2), (1, 128, 256, 13, 13, 2)])
def test_small_filters_on_small_maps_take_a_block_of_rows_per_thread(
        monkeypatch, batch, channels, filters, height, width, threads):
    rng = np.random.default_rng(height * width + filters)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    w = (rng.standard_normal((filters, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    biases = rng.standard_normal(filters).astype(np.float32)
    v = winograd.variant(height, width)
    u = winograd.transform_filters(w, v)
    assert u.size <= winograd.ROW_BLOCK_FILTER_ELEMENTS
    calls = []

    def run(tasks):  # one after the other, counting the steps
        calls.append(len(tasks))
        for task in tasks:
            task()

    def conv(threads):
        return winograd.conv3x3(x, u, filters, v, run, threads, biases)
    y = conv(threads)
    assert calls == [threads]  # one step: a block of tile rows per thread
    expected = direct_conv(x, w, 1) + biases.reshape(1, -1, 1, 1)
    assert relative_error(y, expected) < 2e-5
    calls.clear()
    np.testing.assert_allclose(y, conv(1), rtol=0, atol=1e-5)  # one thread: one step
    assert len(calls) == 1
    # filters one element over the limit: the block shared out by points (two steps)
    monkeypatch.setattr(winograd, "ROW_BLOCK_FILTER_ELEMENTS", u.size - 1)
    calls.clear()
    np.testing.assert_allclose(y, conv(threads), rtol=0, atol=1e-5)
    assert len(calls) == 2


# maps cut into blocks of tile rows: small transformed filters (which stay in the L3 cache) take
# blocks of SMALL_FILTERS_MIN_TILES tiles at least, large ones MIN_TILES
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels, filters, side, small", [
    (128, 64, 52, True), (256, 32, 52, True), (64, 32, 50, True), (256, 256, 40, False)])
def test_small_filters_take_smaller_blocks(monkeypatch, threads, channels, filters, side, small):
    rng = np.random.default_rng(side + filters)
    x = rng.standard_normal((1, channels, side, side)).astype(np.float32)
    w = (rng.standard_normal((filters, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    v = winograd.variant(side, side)
    u = winograd.transform_filters(w, v)
    cols = -(-side // v.tile)
    step = winograd.block_step(channels, cols, 1, v, u.size)
    assert (u.size <= winograd.ROW_BLOCK_FILTER_ELEMENTS) == small
    tiles = winograd.SMALL_FILTERS_MIN_TILES if small else winograd.MIN_TILES
    assert step == max(-(-tiles // cols), winograd.BLOCK_ELEMENTS // (36 * channels * cols))
    assert small == (step < max(-(-winograd.MIN_TILES // cols),
                                winograd.BLOCK_ELEMENTS // (36 * channels * cols)))
    calls = []

    def run(tasks):
        calls.append(len(tasks))
        for task in tasks:
            task()
    y = winograd.conv3x3(x, u, filters, v, run, threads)
    assert calls == [len(winograd.row_ranges(cols, step, threads))]
    assert relative_error(y, direct_conv(x, w, 1)) < 2e-5
    # the blocks of MIN_TILES tiles: the same sums (each tile's own products)
    monkeypatch.setattr(winograd, "SMALL_FILTERS_MIN_TILES", winograd.MIN_TILES)
    np.testing.assert_allclose(y, winograd.conv3x3(x, u, filters, v, run, threads), rtol=0,
                               atol=1e-6)


def test_winograd_is_used_only_where_it_fits():
    fits = winograd.fits
    assert fits((1, 16, 8, 8), (4, 16, 3, 3), 1, 1, 1, 1)
    assert not fits((1, 8, 8, 8), (4, 8, 3, 3), 1, 1, 1, 1)      # too few channels
    assert fits((1, 16, 8, 8), (4, 16, 3, 3), (1, 1), 1, 1, 1)
    assert not fits((1, 16, 8, 8), (4, 16, 3, 3), 2, 1, 1, 1)    # strided
    assert not fits((1, 16, 8, 8), (4, 16, 3, 3), (1, 2), 1, 1, 1)
    assert not fits((1, 16, 8, 8), (4, 8, 3, 3), 1, 1, 2, 1)     # grouped
    assert not fits((1, 16, 8, 8), (4, 16, 3, 3), 1, 2, 1, 2)    # dilated
    assert not fits((1, 16, 8, 8), (4, 16, 1, 1), 1, 0, 1, 1)    # 1x1


def test_frozen_weights_are_transformed_once_and_forgotten_with_them():
    rng = np.random.default_rng(1)
    ops = NumpyBackend()
    x = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    writable = ops.conv_forward(x, w, 1, 1, 1)
    assert not ops._winograd_cache  # writable weights may change: nothing kept
    ops.freeze_(w)
    first = ops.conv_forward(x, w, 1, 1, 1)
    assert len(ops._winograd_cache) == 1
    np.testing.assert_array_equal(ops.conv_forward(x, w, 1, 1, 1), first)
    np.testing.assert_array_equal(first, writable)
    with pytest.raises(ValueError):
        w[0, 0, 0, 0] = 1.0  # frozen: no in-place change can make the cache stale
    del w
    assert not ops._winograd_cache


def test_folding_freezes_the_parameters():
    net = Network(YOLOV3_TINY, quiet=True).fold_batchnorm()
    arrays = [a for layer in net.layers for a in layer.params.values()]
    assert arrays and not any(a.flags.writeable for a in arrays)


def channels_innermost(x):
    """x (B, C, H, W) stored as (H, W, B, C), as inference convolutions store their outputs."""
    return np.ascontiguousarray(x.transpose(2, 3, 0, 1)).transpose(2, 3, 0, 1)


# (kernel, stride, padding, dilation, input channels): Winograd, strided, 1x1, dilated, 5x5,
# AlexeyAB's (stride_y, stride_x), few channels (im2col from a batch-innermost input)
@pytest.mark.parametrize("size, stride, padding, dilation, channels", [
    (3, 1, 1, 1, 16), (3, 2, 1, 1, 16), (1, 1, 0, 1, 24), (3, 1, 2, 2, 16), (5, 1, 2, 1, 8),
    (3, (2, 1), 1, 1, 16), (3, 1, 1, 1, 3), (1, 2, 0, 1, 16)])
@pytest.mark.parametrize("layout", ["batch-innermost", "channels-innermost"])
def test_inference_convolutions_are_channels_innermost(size, stride, padding, dilation,
                                                        channels, layout):
    """At inference a convolution stores its output channels innermost (whatever the input's
    layout): the values of the training path (im2col, checked against the definition in
    test_operations.py), float rounding apart."""
    rng = np.random.default_rng(size * 10 + channels)
    ops = NumpyBackend()
    x = rng.standard_normal((2, channels, 11, 12)).astype(np.float32)
    w = (rng.standard_normal((10, channels, size, size)) / size).astype(np.float32)
    expected = ops.conv_forward(x, w, stride, padding, 1, train=True, dilation=dilation)
    if layout == "channels-innermost":
        x = channels_innermost(x)
    y = ops.conv_forward(x, w, stride, padding, 1, train=False, dilation=dilation)
    assert y.shape == expected.shape and y.strides[1] == 4
    assert relative_error(y, expected) < 2e-5


@pytest.mark.parametrize("size, stride, padding, out", [(2, 2, 1, 4), (2, 1, 1, 8), (3, 2, 2, 4),
                                                        (5, 1, 4, 8), (9, 1, 8, 8), (1, 1, 0, 8),
                                                        (3, 3, 0, 2)])
@pytest.mark.parametrize("layout", ["batch-innermost", "channels-innermost"])
def test_inference_maxpool_gives_the_training_maxima(size, stride, padding, out, layout):
    rng = np.random.default_rng(size * 10 + stride)
    ops = NumpyBackend()
    x = ops.conv_forward(rng.standard_normal((2, 16, 8, 8)).astype(np.float32),
                         rng.standard_normal((16, 16, 1, 1)).astype(np.float32), 1, 0, 1,
                         train=True)  # batch-innermost, as after a convolution in training
    pad = padding // 2  # Darknet's rule, as layers/maxpool.py computes it
    trained, argmax = ops.maxpool_forward(x, size, stride, pad, out, out, train=True)
    if layout == "channels-innermost":
        x = channels_innermost(x)
    inferred, none = ops.maxpool_forward(x, size, stride, pad, out, out, train=False)
    assert none is None and argmax is not None
    np.testing.assert_array_equal(inferred, trained)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_inference_maxpool_of_whole_tiles_gives_the_training_maxima(size):
    """Windows that tile a channels-innermost input exactly take _maxpool_tiles."""
    rng = np.random.default_rng(size)
    ops = NumpyBackend()
    x = rng.standard_normal((2, 5, 4 * size, 3 * size)).astype(np.float32)
    trained, _ = ops.maxpool_forward(x, size, size, 0, 4, 3, train=True)
    inferred, _ = ops.maxpool_forward(channels_innermost(x), size, size, 0, 4, 3, train=False)
    assert inferred.strides[1] == 4
    np.testing.assert_array_equal(inferred, trained)
    # one image's channel slice of a route's output (a convolution wrote into it): in place
    route = channels_innermost(rng.standard_normal((1, 9, 4 * size, 3 * size)).astype(np.float32))
    part = route[:, 2:7]
    assert ops._tile_windows(part, size) is not None
    inferred, _ = ops.maxpool_forward(part, size, size, 0, 4, 3, train=False)
    trained, _ = ops.maxpool_forward(np.array(part), size, size, 0, 4, 3, train=True)
    np.testing.assert_array_equal(inferred, trained)


def test_channels_innermost_arrays_keep_their_layout_and_values():
    """Bias + activation, inference batch norm, copies and new arrays laid out like a
    channels-innermost input, and a route over such arrays: the values numpy gives on plain
    arrays."""
    rng = np.random.default_rng(5)
    ops = NumpyBackend()
    x = rng.standard_normal((2, 6, 5, 7)).astype(np.float32)
    biases = rng.standard_normal(6).astype(np.float32)
    stored = channels_innermost(x)
    biased = ops.add_bias_(stored.copy(order="K"), biases, "leaky")
    expected = x + biases.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(biased, np.maximum(expected, expected * np.float32(0.1)))
    statistics = [rng.uniform(0.5, 1.5, 6).astype(np.float32) for _ in range(4)]
    normalized = ops.batchnorm_forward_inference(stored, *statistics, activation="leaky")
    assert normalized.strides[1] == 4
    np.testing.assert_array_equal(
        normalized, ops.batchnorm_forward_inference(x, *statistics, activation="leaky"))
    for array in (ops.copy(stored), ops.empty(x.shape, like=stored)):
        assert array.strides[1] == 4
    np.testing.assert_array_equal(ops.copy(stored), x)
    routed = concat_channels(ops, [stored, (channels_innermost(x[:, :4]), 1, 3)])
    np.testing.assert_array_equal(routed, np.concatenate([x, x[:, 1:3]], axis=1))
    # nearest-neighbour upsampling (its source repeated along the innermost axis of the view:
    # taken in place from a channels-innermost source), by 2 and by 3 with a scale
    for stride, scale in [(2, 1.0), (3, 0.5)]:
        upsampled = upsample(ops, stored, stride, scale)
        assert upsampled.strides[1] == 4
        np.testing.assert_array_equal(
            upsampled, np.float32(scale) * x.repeat(stride, axis=2).repeat(stride, axis=3))


def test_equal_shape_shortcut_is_the_weighted_sum():
    rng = np.random.default_rng(2)
    ops = NumpyBackend()
    x, add = (rng.standard_normal((2, 4, 5, 5)).astype(np.float32) for _ in range(2))
    np.testing.assert_array_equal(ops.add(x, add), x + add)
    np.testing.assert_allclose(ops.add(x, add, 0.5, 2.0), 0.5 * x + 2.0 * add,
                               rtol=1e-6)


def test_own_threads_compute_what_one_thread_does(monkeypatch):
    net = Network(YOLOV3_TINY, quiet=True)
    x = np.random.default_rng(3).random((1, 3, 416, 416), dtype=np.float32)
    one = net.fold_batchnorm().predict(x)
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, "2")
    threaded = NumpyBackend()
    assert threaded.threads == 2
    net.ops = threaded
    # the same sums, blocked differently (filters shared out): float rounding apart
    assert relative_error(net.predict(x), one) < 1e-5


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("cfg, shared", [("yolov3-tiny.cfg", (5, 4)), ("yolov4-tiny.cfg", (6, 4))])
def test_a_network_s_small_maps_give_the_same_outputs_in_blocks_of_rows(monkeypatch, threads,
                                                                         cfg, shared):
    """Every layer's output of the tiny YOLOs with small filters in smaller blocks and, on small
    maps, in a block of tile rows per thread (the default), and without either
    (ROW_BLOCK_FILTER_ELEMENTS 0: MIN_TILES, small maps shared out by points), on 1 and 2
    threads (one thread shares nothing out)."""
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, threads)
    net = Network(os.path.join(CFG, cfg), quiet=True).fold_batchnorm()
    net.ops = NumpyBackend()
    x = np.random.default_rng(8).random((1, 3, 416, 416), dtype=np.float32)
    shared_blocks = []
    shared_block = winograd._shared_block

    def counted(*args):
        shared_blocks.append(1)
        return shared_block(*args)
    monkeypatch.setattr(winograd, "_shared_block", counted)
    outputs = {}
    for limit in (winograd.ROW_BLOCK_FILTER_ELEMENTS, 0):
        monkeypatch.setattr(winograd, "ROW_BLOCK_FILTER_ELEMENTS", limit)
        shared_blocks.clear()
        net.predict(x)
        outputs[limit] = ([np.array(o) for o in net.outputs], len(shared_blocks))
    (rows, shared_rows), (points, shared_points) = outputs.values()
    # the small maps' 3x3 layers shared out by points: all of them before, only those with
    # large filters now (yolov3-tiny's 128 -> 256 at 26x26 and yolov4-tiny's two 128 -> 128
    # at 26x26 take blocks of rows)
    assert (shared_points, shared_rows) == (shared if threads == "2" else (0, 0))
    assert [a.shape for a in rows] == [b.shape for b in points]
    for a, b in zip(rows, points):  # (None, shape (), for the convolutions' pooled away)
        if a.shape:
            assert relative_error(a, b) < 1e-6


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("case", [(3, 1, 16, 13), (3, 1, 16, 26), (3, 1, 16, 30), (3, 1, 8, 104),
                                  (3, 1, 16, 104), (3, 2, 16, 26), (1, 1, 16, 26),
                                  (3, 1, 64, 26)], ids=str)
def test_a_convolution_computes_into_its_route_s_channels(monkeypatch, threads, case):
    """Into a channels-innermost route output (strided rows): Winograd (one block shared out,
    several blocks, tiles over the edge), the column products (fused or not), in place."""
    size, stride, c, side = case
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, threads)
    ops = NumpyBackend()
    rng = np.random.default_rng(5)
    x = channels_innermost(rng.standard_normal((1, c, side, side)).astype(np.float32))
    w = (rng.standard_normal((24, c, size, size)) / np.sqrt(size * size * c)).astype(np.float32)
    biases = rng.standard_normal(24).astype(np.float32)
    out_side = (side + 2 * (size // 2) - size) // stride + 1
    out = ops.empty((1, 40, out_side, out_side), like=x)
    out[...] = 7.0
    y = ops.conv_bias_forward_into_(out, 8, x, w, biases, "leaky", stride, size // 2, 1)
    assert np.shares_memory(y, out)
    linear = direct_conv(x, w, size // 2)[:, :, ::stride, ::stride] + biases.reshape(1, -1, 1, 1)
    expected = np.where(linear > 0, linear, 0.1 * linear)
    assert relative_error(out[:, 8:32], expected) < 1e-5  # Winograd: float32 rounding
    assert (out[:, :8] == 7).all() and (out[:, 32:] == 7).all()


@pytest.mark.parametrize("activation", ["leaky", "linear", "logistic"])
@pytest.mark.parametrize("case", [(1, 1, 64, 13), (1, 1, 16, 26), (3, 2, 16, 26)], ids=str)
def test_small_maps_shared_filters_add_their_biases_and_activate(monkeypatch, activation,
                                                                  case):
    """The column products of a small map on two threads (one block of rows, its filters
    shared out): each share's biases and activation applied in its own block (no pass over
    the output afterwards), against the direct convolution."""
    size, stride, c, side = case
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, "2")
    ops = NumpyBackend()
    rng = np.random.default_rng(6)
    x = channels_innermost(rng.standard_normal((1, c, side, side)).astype(np.float32))
    w = (rng.standard_normal((37, c, size, size)) / np.sqrt(size * size * c)).astype(np.float32)
    biases = rng.standard_normal(37).astype(np.float32)
    y = ops.conv_bias_forward(x, w, biases, activation, stride, size // 2, 1)
    linear = direct_conv(x, w, size // 2)[:, :, ::stride, ::stride] + biases.reshape(1, -1, 1, 1)
    expected = {"leaky": np.where(linear > 0, linear, 0.1 * linear), "linear": linear,
                "logistic": 1 / (1 + np.exp(-linear))}[activation]
    assert relative_error(y, expected) < 1e-5


def test_a_network_s_convolutions_write_into_their_concatenations():
    """yolov4-tiny's inference plan (convolutions computing into their routes' outputs) gives
    every layer's output exactly as without it."""
    net = Network(YOLOV4_TINY, quiet=True)
    x = np.random.default_rng(4).random((1, 3, 416, 416), dtype=np.float32)
    net.predict(x)
    assert not net._concatenation_plan()  # batch norm not folded yet: no convolution planned
    net.fold_batchnorm()._pooled = {}  # (no route pooled for its maxpool: see below)
    planned = net.predict(x)
    assert len(net._concatenation_plan()) == 12  # both inputs of its six concatenations
    # its routes of one channel group read their input's channels in place (layer 2's upper
    # half, which lives in route 8's output)
    assert np.shares_memory(net.outputs[3], net.outputs[8])
    np.testing.assert_array_equal(net.outputs[3], net.outputs[2][:, 32:])
    outputs = [np.array(o) for o in net.outputs]
    net._plan = {}
    np.testing.assert_array_equal(net.predict(x), planned)
    for a, b in zip(net.outputs, outputs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("case", [(16, 104, 3, "leaky"), (16, 52, 3, "relu"), (24, 24, 3, "leaky"),
                                  (16, 12, 3, "linear"), (3, 106, 3, "leaky"), (16, 12, 1, "leaky"),
                                  (16, 60, 1, "relu")], ids=str)
def test_a_convolution_pools_its_blocks_as_the_maxpool_does(monkeypatch, threads, case):
    """conv_bias_maxpool_forward's 2x2/2 maxima taken inside Winograd's output tiles (F(4x4) in
    several blocks of tile rows; one block shared out on two threads; F(2x2)) or over the
    column products' blocks of row pairs (im2col from a batch-innermost input, 1x1 from a
    channels-innermost one, a small map's filters shared out) and activated after: exactly
    the maxpool of the convolution's output."""
    c, side, size, activation = case
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, threads)
    ops = NumpyBackend()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, c, side, side)).astype(np.float32)
    if c > 3:
        x = channels_innermost(x)
    w = (rng.standard_normal((24, c, size, size)) / np.sqrt(size * size * c)).astype(np.float32)
    biases = rng.standard_normal(24).astype(np.float32)
    pooled, none = ops.conv_bias_maxpool_forward(x, w, biases, activation, 1, size // 2, 1, 2, 2,
                                                 0, (side // 2, side // 2))
    y = ops.conv_bias_forward(x, w, biases, activation, 1, size // 2, 1)
    expected, _ = ops.maxpool_forward(y, 2, 2, 0, side // 2, side // 2, train=False)
    np.testing.assert_array_equal(pooled, expected)
    assert none is None
    # into channels [8, 32) of a maxpool's output (a route's part), the output kept as well
    out = ops.empty((1, 40, side // 2, side // 2), like=channels_innermost(x[:, :2]))
    out[...] = 7.0
    into, kept = ops.conv_bias_maxpool_forward(x, w, biases, activation, 1, size // 2, 1, 2, 2,
                                               0, (side // 2, side // 2), out, 8, True)
    assert into is out
    np.testing.assert_array_equal(out[:, 8:32], expected)
    np.testing.assert_array_equal(kept, y)
    assert (out[:, :8] == 7).all() and (out[:, 32:] == 7).all()


def test_a_network_s_convolutions_pool_for_their_maxpools():
    """yolov3-tiny's pooling plan (each convolution whose only reader is the maxpool after it
    computes that maxpool's output and keeps none of its own) gives every other layer's output
    exactly as without it."""
    net = Network(YOLOV3_TINY, quiet=True)
    x = np.random.default_rng(4).random((1, 3, 416, 416), dtype=np.float32)
    net.predict(x)
    assert not net._pooling_plan()  # batch norm not folded yet: no convolution planned
    planned = net.fold_batchnorm().predict(x)
    # (8 is also read by route 20; 10's pool, 2x2/1, is the two operations)
    assert sorted(net._pooling_plan()) == [0, 2, 4, 6, 10]
    assert all(net.outputs[i] is None for i in net._pooling_plan())
    outputs = list(net.outputs)
    net._pools = {}
    np.testing.assert_array_equal(net.predict(x), planned)
    assert_kept_outputs_equal(outputs, net.outputs)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("case", [((3, 16, 32), 104, 1), ((16, 16, 24, 8), 64, 1),
                                  ((3, 16, 16), 48, 2), ((3, 16), 48, 1)], ids=str)
def test_a_chain_of_pooled_convolutions_gives_each_stage_s_maxima(monkeypatch, threads, case):
    """conv_bias_maxpool_chain, its bands of rows on each thread (a few channels first: the
    column products; Winograd's F(4x4) after, several blocks per band; a batch of two), is
    exactly one conv_bias_maxpool_forward after the other; a chain the bands do not take
    (one stage) likewise."""
    channels, side, batch = case
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, threads)
    ops = NumpyBackend()
    rng = np.random.default_rng(side)
    x = rng.standard_normal((batch, channels[0], side, side)).astype(np.float32)
    if channels[0] > 3:
        x = channels_innermost(x)
    stages, expected = [], x
    for i, (c, f) in enumerate(itertools.pairwise(channels)):
        w = (rng.standard_normal((f, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        w.flags.writeable = False
        biases = rng.standard_normal(f).astype(np.float32)
        half = side >> (i + 1)
        stages.append((w, biases, ("leaky", "relu")[i % 2], 1, 1, 1, 2, 2, 0, (half, half), 1))
        expected, _ = ops.conv_bias_maxpool_forward(expected, *stages[-1][:10])
    banded = ops.threads > 1 and len(stages) > 1
    if banded:
        assert ops._chain_blocks(x, stages) is not None
    forks, fork_join = [], ops._fork_join  # (the bands: one fork-join, its switch interval)

    def counted(own, helpers):
        forks.append(len(helpers))
        return fork_join(own, helpers)
    monkeypatch.setattr(ops, "_fork_join", counted)
    np.testing.assert_array_equal(ops.conv_bias_maxpool_chain(x, stages), expected)
    if banded:
        assert forks == [ops.threads - 1]


def test_a_network_s_pooled_convolutions_run_as_one_chain(monkeypatch):
    """yolov3-tiny's convolutions 0, 2, 4, 6 and maxpools 1, 3, 5, 7 are one chain in predict
    (on two threads: bands of rows); every other layer's output as without it."""
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, "2")
    net = Network(YOLOV3_TINY, quiet=True, backend=NumpyBackend()).fold_batchnorm()
    x = np.random.default_rng(4).random((1, 3, 416, 416), dtype=np.float32)
    chained = net.predict(x)
    assert {k: [(c.index, p.index) for c, p in v] for k, v in net._chains().items()} == {
        0: [(0, 1), (2, 3), (4, 5), (6, 7)]}
    assert all(net.outputs[i] is None for i in range(7)) and net.outputs[7] is not None
    outputs = list(net.outputs)
    net._chained = {}
    np.testing.assert_array_equal(net.predict(x), chained)
    assert_kept_outputs_equal(outputs, net.outputs)


def test_predict_returns_the_layers_asked_for():
    """predict(layers=...) returns those layers' outputs, (N, C, H, W) each, over batches: the
    detection heads with the pooling plan, and a layer the plan would not keep (0, whose only
    reader is a maxpool) without it; the same values as forward's."""
    net = Network(YOLOV3_TINY, quiet=True).fold_batchnorm()
    x = np.random.default_rng(5).random((3, 3, 416, 416), dtype=np.float32)
    heads = [layer.index for layer in net.detection_layers]
    assert heads == [16, 23] and net.read_by_predict == [16, 23]
    got = net.predict(x, batch_size=2, layers=heads)
    assert net.outputs[0] is None  # the pooling plan ran (the last batch: one image)
    net.forward(x)
    for y, i in zip(got, heads):
        assert y.shape == (3,) + net.layer_shapes[i]
        np.testing.assert_allclose(y, net.outputs[i], rtol=1e-5, atol=1e-5)
    first, last = net.predict(x, batch_size=3, layers=[0, 23])
    assert net.outputs[0] is not None  # not planned away: asked for
    np.testing.assert_allclose(first, net.outputs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(net.predict(x, batch_size=3), last.reshape(3, -1))
    with pytest.raises(ValueError, match="layers 0-23"):
        net.predict(x, layers=[24])


@pytest.mark.parametrize("train", [False, True])
def test_forward_delivers_each_output_when_it_is_made(train):
    """forward(deliver={index: callback}) hands each such layer's output over as soon as the
    layer has made it (a recorded inference starts the copy to the host there): the array
    forward keeps, with its final values already (no later layer writes into it), once, in
    layer order; inference forwards with concatenations planned into routes included."""
    net = Network(YOLOV4_TINY, quiet=True)
    if not train:
        net.fold_batchnorm()
    x = np.random.default_rng(6).random((1, 3, 416, 416), dtype=np.float32)
    wanted = [2, 7, 30, 35, 37]  # a route's input, a route, a head, an upsample, a head
    seen = []
    net.forward(x, train=train, deliver={
        i: lambda y, i=i: seen.append((i, y, np.array(y))) for i in wanted})
    assert [i for i, _, _ in seen] == wanted
    for i, y, values in seen:
        assert y is net.outputs[i]
        np.testing.assert_array_equal(values, net.outputs[i], err_msg=f"layer {i}")


def test_a_network_s_routes_are_pooled_by_their_convolutions():
    """yolov4-tiny's routes read only by a maxpool (8, 16, 24) are never made: their
    convolutions pool their parts into the maxpool's output (keeping their own output where
    another layer reads it); every other layer's output as without the plans."""
    net = Network(YOLOV4_TINY, quiet=True).fold_batchnorm()
    x = np.random.default_rng(4).random((1, 3, 416, 416), dtype=np.float32)
    planned = net.predict(x)
    assert sorted(net._pooled_routes()) == [8, 16, 24]
    plan = net._pooling_plan()
    assert {j: (pool.index, at, keep) for j, (pool, at, keep) in plan.items()} == {
        2: (9, 0, True), 7: (9, 64, False), 10: (17, 0, True), 15: (17, 128, False),
        18: (25, 0, True), 23: (25, 256, True)}  # (23: route 34 reads it too)
    assert all(net.outputs[i] is None for i in (7, 8, 15, 16, 24))
    outputs = list(net.outputs)
    # forward (not predict) keeps every output, its routes written by their convolutions
    net.forward(x)
    assert len(net._concatenation_plan(pooling=False)) == 12
    assert all(o is not None for o in net.outputs)
    assert_kept_outputs_equal(outputs, net.outputs)
    net._pooled, net._pools, net._plan = {}, {}, {}
    np.testing.assert_array_equal(net.predict(x), planned)
    assert_kept_outputs_equal(outputs, net.outputs)


def test_a_bad_thread_count_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, "two")
    with pytest.raises(BackendError, match="ENGINE_CPU_THREADS=two"):
        NumpyBackend()


def test_shared_operations_shorten_the_switch_interval_and_set_it_back(monkeypatch):
    """While the backend's threads share an operation (_run, the chain) the interpreter's
    switch interval is SWITCH_INTERVAL; after it (also after a failed task) it is what it was;
    a shorter one set by the program is left alone."""
    import sys
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, "2")
    ops = NumpyBackend()
    before = sys.getswitchinterval()
    assert before > numpy_backend.SWITCH_INTERVAL  # (Python's default: 5 ms)
    seen = []

    def task():
        seen.append(sys.getswitchinterval())
    ops._run([task, task, task])
    assert seen == [pytest.approx(numpy_backend.SWITCH_INTERVAL)] * 3
    assert sys.getswitchinterval() == before

    def fails():
        raise ValueError("a task's error")
    with pytest.raises(ValueError, match="a task's error"):
        ops._run([task, fails])
    assert sys.getswitchinterval() == before
    # the chain hands its bands over through the same fork-join
    seen.clear()
    ops._fork_join(task, [task])
    assert seen == [pytest.approx(numpy_backend.SWITCH_INTERVAL)] * 2
    try:
        sys.setswitchinterval(1e-4)
        ops._run([task, task])
        assert seen[-1] == pytest.approx(1e-4)
        assert sys.getswitchinterval() == pytest.approx(1e-4)
    finally:
        sys.setswitchinterval(before)


def test_fork_join_hands_work_to_its_helpers_and_raises_their_errors(monkeypatch):
    """_fork_join: the helpers' calls run on other threads, their errors are raised in the
    calling thread (after every helper is done) and leave the helpers usable; a fork-join
    inside a task, or from a second thread while the helpers are busy, takes the pool."""
    import threading
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, "3")
    ops = NumpyBackend()
    ran = []

    def record():
        ran.append(threading.get_ident())
    ops._fork_join(record, [record, record])
    assert len(ran) == 3 and len(set(ran)) == 3 and ran.count(threading.get_ident()) == 1

    def fails():
        raise ValueError("a helper's error")
    ran.clear()
    with pytest.raises(ValueError, match="a helper's error"):
        ops._fork_join(record, [fails, record])
    assert len(ran) == 2  # the other helper finished its call too
    ran.clear()
    ops._fork_join(record, [record, record])
    assert len(ran) == 3
    # nested: a task's own fork-join finds the helpers busy and uses the pool
    inner = []

    def outer():
        ops._fork_join(lambda: inner.append(1), [lambda: inner.append(2)])
    ops._fork_join(outer, [record, record])
    assert sorted(inner) == [1, 2]
    # more calls than helpers: the pool takes them all
    ran.clear()
    ops._fork_join(record, [record] * 4)
    assert len(ran) == 5
    # two threads on one backend at once: each gets every task done
    totals = []

    def many():
        done = []
        for _ in range(50):
            ops._run([lambda: done.append(1)] * 6)
        totals.append(len(done))
    others = [threading.Thread(target=many) for _ in range(2)]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join()
    assert totals == [300, 300]
