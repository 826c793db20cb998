"""Winograd's minimal filtering F(4x4, 3x3) and F(2x2, 3x3) for the CPU backend's 3x3 stride-1
convolutions.

Each 6x6 input tile (tiles 4 apart) and each 3x3 filter are taken into a 36-point domain where
the convolution is 36 independent products over channels: with V = B^T d B for the tiles and
U = G g G^T for the filters, one batched matrix product M[k] = V[k] @ U[k] (k = 0..35, V[k]
(tiles, C), U[k] (C, F), channels summed by BLAS) and the output transform Y = A^T M A give
each 4x4 output tile. That is 36 multiplications per 16 outputs per channel pair instead of 144
(Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015; the matrices are
theirs). Small maps (13x13) take F(2x2, 3x3): 4x4 tiles, 16 products per 4 outputs instead of
36. The transforms are separable: each is two small matrix products over one tile axis at a
time, also done by BLAS.

Rounding: the transforms' coefficients (up to 8 in A, 5 in B) make the result differ from the
direct sum by about 1e-5 of the layer's largest output in float32 (measured: 4e-6 .. 1.4e-5 on
random data; F(2x2, 3x3) about 1e-6), well inside the 1e-4 the Darknet golden files are matched
to. Layers too small for the transforms to pay stay on im2col (`fits`).

Layouts: x may be stored in any order (batch-innermost (C, H, W, B) after a training-path
convolution or the input image, channels-innermost (H, W, B, C) after an inference
convolution); the padded input is copied into (H, W, B, C) order (channels innermost, the
products' inner dimension; a plain copy when x already is), a tile's rows and columns are strided
views of it, and y is stored (H, W, B, F), so that each block's output tiles are stored as runs
of filters.
"""

import itertools

import numpy as np
from numpy.lib.stride_tricks import as_strided


class Variant:
    """F(m x m, 3x3): tile side m, input tile side alpha = m + 2, and the transform matrices
    (float64 for the filters, float32 for the data)."""

    def __init__(self, tile, b_t, g, a_t):
        self.tile, self.alpha = tile, tile + 2
        self.g = np.array(g, dtype=np.float64)
        self.b_t = np.array(b_t, dtype=np.float32)
        self.a_t = np.array(a_t, dtype=np.float32)
        # the point (i, i) whose products reach every output of a tile with weight 1 (A^T's
        # column i is all ones): a bias added to M there is added to the whole tile
        i = int(np.flatnonzero((self.a_t == 1).all(axis=0))[0])
        self.bias_point = i * self.alpha + i


F4 = Variant(4, b_t=[[4, 0, -5, 0, 1, 0],
                     [0, -4, -4, 1, 1, 0],
                     [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0],
                     [0, 4, 0, -5, 0, 1]],
             g=[[1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1]],
             a_t=[[1, 1, 1, 1, 1, 0],
                  [0, 1, -1, 2, -2, 0],
                  [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])
F2 = Variant(2, b_t=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
             g=[[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
             a_t=[[1, 1, 1, 0], [0, 1, -1, -1]])

MIN_CHANNELS = 16      # below this the input transform costs more than the products it saves
# Maps smaller than this (13x13 in YOLO) take F(2x2, 3x3): 4x4 tiles would waste half their
# outputs, and the 36-point filters (4x the direct ones) make the products memory-bound.
F4_MIN_SIDE = 20
# transformed-input elements per block of tile rows (512 KiB): larger blocks are fewer Python
# steps for the threads to take the GIL between (16 -> 32 channels on 208x208, two threads:
# 3.3 -> 2.7 ms, 52 -> 21 context switches per call; no layer slower, one thread the same)
BLOCK_ELEMENTS = 1 << 17
MIN_TILES = 64  # tiles per block at least, so that each block's products amortise the filters
# ... where the transformed filters are at most ROW_BLOCK_FILTER_ELEMENTS: they stay in the L3
# cache from block to block, and smaller blocks keep their transformed input and products in
# L2 (two threads: 128 -> 256 at 52x52 4.5 -> 3.3 ms, 256 -> 128 4.7 -> 3.8 with 13 tiles;
# 26 tiles about the same, networks 0.5-1% slower; larger filters, 256 -> 512 at 52x52,
# 15.4 -> 17.4 ms with 39 tiles, 25 with 13: those keep MIN_TILES)
SMALL_FILTERS_MIN_TILES = 13
# A small map (one block of MIN_TILES) whose transformed filters are at most this many elements
# (6 MiB) is split into one block of tile rows per thread rather than shared out by transform
# points (_shared_block): each thread then reads all the filters, which costs less than the
# second hand-off and the strided products of the shared block while they are this small
# (two threads: 128 -> 128 at 26x26 0.80 -> 0.59 ms, 128 -> 256 at 13x13 0.69 -> 0.47;
# 1.77M elements level or 4% slower, 2.36M 5-10% slower; README, "Ninth round")
ROW_BLOCK_FILTER_ELEMENTS = 3 << 19


def fits(x_shape, w_shape, stride, padding, groups, dilation):
    """Whether a convolution takes this path: 3x3, stride 1 (or (1, 1)), padding 1, one group, no
    dilation, at least MIN_CHANNELS input channels."""
    return (w_shape[2:] == (3, 3) and stride in (1, (1, 1)) and padding == 1 and groups == 1
            and dilation == 1 and x_shape[1] >= MIN_CHANNELS)


def row_ranges(count, step, threads=1):
    """[start, stop) ranges of about `step` rows covering `count` rows. On several threads, and
    with at least as many ranges as threads, the ranges are made a multiple of `threads` in
    number and even in size (differing by one row at most), so that no thread is left with one
    range more than the others (13 rows in steps of 5 on two threads: 3 + 3 | 3 + 4 rows, not
    5 + 3 | 5)."""
    ranges = -(-count // step)
    if threads == 1 or ranges < threads:
        return [(row, min(row + step, count)) for row in range(0, count, step)]
    ranges = min(count, ranges + (-ranges) % threads)
    bounds = [count * i // ranges for i in range(ranges + 1)]
    return list(itertools.pairwise(bounds))


def variant(h, w):
    """The variant for an h x w output map."""
    return F4 if min(h, w) >= F4_MIN_SIDE else F2


def transform_filters(weights, v):
    """U = G g G^T for every filter: (alpha^2, C, F) float32, computed in float64."""
    f, c = weights.shape[:2]
    g = np.asarray(weights, dtype=np.float64).reshape(f * c, 3, 3)
    u = np.matmul(np.matmul(v.g, g), v.g.T)  # (F*C, alpha, alpha)
    return np.ascontiguousarray(u.reshape(f, c, v.alpha * v.alpha).transpose(2, 1, 0),
                                dtype=np.float32)


def reshaped_view(a, shape):
    """a seen as `shape` without a copy (an error where that needs one: y may be a view of
    a larger array, which a copy would not write)."""
    return np.reshape(a, shape, copy=False)


def block_step(c, cols, b, v, filter_elements=None):
    """Tile rows per block: about BLOCK_ELEMENTS transformed input elements, MIN_TILES tiles
    at least (SMALL_FILTERS_MIN_TILES for transformed filters of `filter_elements` at most
    ROW_BLOCK_FILTER_ELEMENTS)."""
    small = filter_elements is not None and filter_elements <= ROW_BLOCK_FILTER_ELEMENTS
    least = SMALL_FILTERS_MIN_TILES if small else MIN_TILES
    return max(-(-least // (cols * b)), BLOCK_ELEMENTS // (v.alpha * v.alpha * c * cols * b))


def pools_in_tiles(h, w, v):
    """Whether conv3x3 can take an h x w map's 2x2/2 maxima inside its output tiles: whole
    tiles of an even side."""
    return v.tile % 2 == 0 and h % v.tile == 0 and w % v.tile == 0


def conv3x3(x, filters, f, v, run=None, threads=1, biases=None, finish=None, into=None,
            pooled=None, keep=False):
    """The 3x3 stride-1 padding-1 convolution of x (B, C, H, W) with `filters` transformed for
    variant v (alpha^2, C, F); returns y (B, F, H, W) stored channels innermost, (H, W, B, F) in
    memory (in `into`, written in place, if given: a view of a larger array): the output
    tiles' own order, so that they are stored as runs of filters and the
    next convolution reads runs of channels (about 10% of a layer). Block by block of tile
    rows so the transformed input stays in cache; `run` calls the blocks' tasks (on `threads`
    threads). With fewer blocks than threads (13x13 and 26x26 maps: one block), a block per
    thread where the filters are small (ROW_BLOCK_FILTER_ELEMENTS), else each block is
    shared out by transform points instead (_shared_block). `biases` (F,), if given, are added
    to every output and finish(src, dst), if given, stores each block of output tiles into y
    through an activation (dst = act(src), one pass while the block is in cache; without it,
    a copy). The bias costs almost nothing: it is added to the products of one point,
    v.bias_point, which the output transform carries into every output of its tile with
    weight 1. With `pooled` (H/2, W/2, B, F, possibly a view; pools_in_tiles), each block's
    2x2/2 maxima are taken inside its output tiles and stored there through `finish` (an
    activation that commutes with max); y is then stored (and returned) only if `keep`, else
    None is returned.

    Channels innermost: the input is copied once into (H, W, B, C) order, so the products are
    M[k] = V[k] @ U[k] with V[k] (tiles, C) and U[k] (C, F): BLAS reads the filters as one
    contiguous panel per point, 10% faster per network than U[k] @ V[k] over (C, tiles)
    (yolov3-tiny, yolov4-tiny, one thread)."""
    b, c, h, w = x.shape
    tile = v.tile
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.zeros((rows * tile + 2, cols * tile + 2, b, c), x.dtype)  # channels innermost
    padded[1:1 + h, 1:1 + w] = x.transpose(2, 3, 0, 1)  # a plain copy if x is channels-last
    if pooled is None or keep:
        ym = np.empty((h, w, b, f), x.dtype) if into is None else into  # (a view: y's storage)
    else:
        ym = None  # only the maxima are stored
    step = block_step(c, cols, b, v, filters.size)
    blocks = row_ranges(rows, min(step, rows), threads)
    if len(blocks) < threads <= rows and filters.size <= ROW_BLOCK_FILTER_ELEMENTS:
        blocks = row_ranges(rows, -(-rows // threads), threads)  # a block per thread
    if run is None:
        def run(tasks):
            for task in tasks:
                task()
    store = store_through(finish)
    tiles = tile_view(padded, v)  # a view, made once

    if len(blocks) < threads:
        if ym is None:  # (one block of a small map: pooled from y afterwards)
            ym = np.empty((h, w, b, f), x.dtype)
        for row0, row1 in blocks:
            _shared_block(padded, row0, row1, filters, v, ym, run, threads, biases, store)
        if pooled is not None:  # (the maxima over the window's rows, then its columns)
            cells = ym.reshape(h // 2, 2, w // 2, 2, b, f)
            row_max = np.maximum(cells[:, 0], cells[:, 1])
            np.maximum(row_max[:, :, 0], row_max[:, :, 1], out=pooled)
            if not keep:
                return None
        return ym.transpose(2, 3, 0, 1)

    def block_(row0, row1):
        n = row1 - row0
        out = block_tiles(tiles, filters, v, biases, row0, row1)
        if pooled is not None:
            store_pooled_tiles(out, store, pooled, row0)
            if ym is None:
                return
        top, bottom = row0 * tile, min((row0 + n) * tile, h)
        # out[i, j, row, col, b, f] is y's cell (row*tile + i, col*tile + j)
        tiled = out.transpose(2, 0, 3, 1, 4, 5)  # (row, i, col, j, b, f)
        if bottom - top == n * tile and w == cols * tile:  # whole tiles: one pass, into y
            store(tiled, reshaped_view(ym[top:bottom], tiled.shape))
        else:  # the last tiles hang over y's edge: through a contiguous copy
            full = tiled.reshape(n * tile, cols * tile, b, f)
            store(full[:bottom - top, :w], ym[top:bottom])

    run([lambda rows=rows: block_(*rows) for rows in blocks])
    return None if ym is None else ym.transpose(2, 3, 0, 1)


def tile_view(padded, v):
    """tiles[i, j, row, col, b, c] = cell (i, j) of tile (row, col) of a padded (H, W, B, C)
    input (tiles v.tile apart): a strided view (numpy's as_strided is Python code: made once
    per convolution, not per block)."""
    rows, cols = (padded.shape[0] - 2) // v.tile, (padded.shape[1] - 2) // v.tile
    sh, sw, sb, sc = padded.strides
    return as_strided(padded, (v.alpha, v.alpha, rows, cols) + padded.shape[2:],
                      (sh, sw, v.tile * sh, v.tile * sw, sb, sc), writeable=False)


def gather(tiles, row0, row1):
    """The tiles of tile rows [row0, row1), in one copy; C order, so that the transforms'
    reshapes are views."""
    return np.array(tiles[:, :, row0:row1], order="C")


def block_tiles(tiles, filters, v, biases, row0, row1):
    """The output tiles (tile, tile, rows, cols, B, F) of tile rows [row0, row1) before the
    activation: gather, V = B^T d B, M[k] = V[k] @ U[k] (biases added at v.bias_point),
    Y = A^T M A."""
    alpha, tile = v.alpha, v.tile
    d = gather(tiles, row0, row1)
    n, cols, b, c = d.shape[2:]
    points = n * cols * b * c
    # V = B^T d B: over i (one product), then over j (a product per i)
    t = np.matmul(v.b_t, d.reshape(alpha, alpha * points)).reshape(alpha, alpha, points)
    u = np.matmul(v.b_t, t).reshape(alpha * alpha, n * cols * b, c)
    m = np.matmul(u, filters)  # (alpha^2, tiles, F)
    if biases is not None:
        m[v.bias_point] += biases
    # Y = A^T M A, likewise
    t = np.matmul(v.a_t, m.reshape(alpha, -1)).reshape(tile, alpha, -1)
    return np.matmul(v.a_t, t).reshape(tile, tile, n, cols, b, filters.shape[2])


def store_pooled_tiles(out, store, pooled, row0):
    """The 2x2/2 maxima of output tiles out (tile, tile, rows, cols, B, F) of tile rows from
    row0, activated and stored by store(src, dst) into pooled (H/2, W/2, B, F): out[2p + di,
    2q + dj] is cell (di, dj) of the tiles' window (p, q): the maxima over di, then dj, then
    the activation (it commutes with max)."""
    tile, _, n, cols, b, f = out.shape
    half = tile // 2
    cells = out.reshape(half, 2, half, 2, n, cols, b, f)
    row_max = np.maximum(cells[:, 0], cells[:, 1])
    maxima = np.maximum(row_max[:, :, 0], row_max[:, :, 1])
    tiled = maxima.transpose(2, 0, 3, 1, 4, 5)  # (row, p, col, q, b, f)
    store(tiled, reshaped_view(pooled[row0 * half:(row0 + n) * half], tiled.shape))


def store_through(finish):
    """store(src, dst): dst = finish(src), or a plain copy without `finish`."""
    if finish is None:
        return lambda src, dst: np.copyto(dst, src)
    return finish


def _shared_block(padded, row0, row1, filters, v, ym, run, threads, biases, store):
    """Tile rows [row0, row1) of the padded input (H, W, B, C) as one block on several threads,
    in two steps. First each thread takes some rows i of the input transform (V's points
    i*alpha + j: its share of B^T d B, then of the products M[k] = V[k] @ U[k]); then each
    takes some rows i of the output transform (y's rows tile*row + i). Sharing the points
    rather than the filters leaves no work done twice: split by filters, every thread
    gathered and transformed the whole block (about a fifth of a 26x26 layer on two threads).
    The tiles are never gathered: each thread's B^T over the tiles' rows reads the padded
    rows in place (each tile row's alpha rows are one strided matrix), and B^T over their
    columns reads that product's windows in place (a copy of the block's overlapping tiles
    on the calling thread alone was a tenth of a 26x26 layer on two threads)."""
    alpha, tile = v.alpha, v.tile
    n, cols, b, c = row1 - row0, (padded.shape[1] - 2) // tile, padded.shape[2], padded.shape[3]
    f = filters.shape[2]
    top = row0 * tile
    row_length = padded.shape[1] * b * c
    item = padded.itemsize
    # rows[r, k] = padded row tile*(row0 + r) + k: the alpha input rows of tile row r, a view
    rows = as_strided(padded[top:], (n, alpha, row_length),
                      (tile * padded.strides[0], padded.strides[0], item), writeable=False)
    m = np.empty((alpha * alpha, n * cols * b, f), padded.dtype)

    def points_(i0, i1):
        k = i1 - i0
        t = np.matmul(v.b_t[i0:i1], rows)  # (n, k, W, B, C) in memory: B^T over tile rows
        tr, ti = t.strides[:2]
        # windows[i, r, s, q] = t's column tile*s + q of tile row r (B*C values), a view
        windows = as_strided(t, (k, n, cols, alpha, b * c),
                             (ti, tr, tile * b * c * item, b * c * item, item), writeable=False)
        # (i, r, s, j, B*C): V's point (i0 + i, j) of tile (r, s); C order asked for (numpy
        # would lay the batch axes out as the windows' strides are)
        u = np.matmul(v.b_t, windows, out=np.empty((k, n, cols, alpha, b * c), t.dtype))
        # the products, over V's point axes (i, j) and the batch, each (r*s tiles, C) @ (C, F)
        # read in place (row stride alpha*B*C) into m's rows (tile (r, s, b), F)
        u = reshaped_view(u.reshape(k, n, cols, alpha, b, c).transpose(0, 3, 4, 1, 2, 5),
                          (k, alpha, b, n * cols, c))
        out = m[i0 * alpha:i1 * alpha].reshape(k, alpha, n, cols, b, f).transpose(0, 1, 4, 2, 3,
                                                                                 5)
        np.matmul(u, filters[i0 * alpha:i1 * alpha].reshape(k, alpha, 1, c, f),
                  out=reshaped_view(out, (k, alpha, b, n * cols, f)))
        if biases is not None and i0 * alpha <= v.bias_point < i1 * alpha:
            m[v.bias_point] += biases

    h, w = ym.shape[:2]

    def outputs_(i0, i1):
        t = np.matmul(v.a_t[i0:i1], m.reshape(alpha, -1)).reshape(i1 - i0, alpha, -1)
        out = np.matmul(v.a_t, t).reshape(i1 - i0, tile, n, cols, b, f)
        for i in range(i0, i1):  # y's rows top + tile*row + i, columns tile*col + j
            y_rows = ym[top + i:min(h, top + n * tile):tile]
            for j in range(tile):
                y_cells = y_rows[:, j::tile]
                store(out[i - i0, j, :y_rows.shape[0], :y_cells.shape[1]], y_cells)

    run([lambda part=part: points_(*part) for part in row_ranges(alpha, -(-alpha // threads),
                                                                   threads)])
    run([lambda part=part: outputs_(*part) for part in row_ranges(tile, -(-tile // threads),
                                                                   threads)])
