"""Winograd's minimal filtering F(4x4, 3x3) for the CPU backend's 3x3 stride-1 convolutions.

Each 6x6 input tile (tiles 4 apart) and each 3x3 filter are taken into a 36-point domain where
the convolution is 36 independent products over channels: with V = B^T d B for the tiles and
U = G g G^T for the filters, one batched matrix product M[k] = U[k] @ V[k] (k = 0..35, channels
summed by BLAS) and the output transform Y = A^T M A give each 4x4 output tile. That is 36
multiplications per 16 outputs per channel pair instead of 144 (Lavin and Gray, "Fast Algorithms
for Convolutional Neural Networks", 2015; the matrices are theirs). The transforms are separable:
each is two small matrix products over one tile axis at a time, also done by BLAS.

Rounding: the transforms' coefficients (up to 8 in A, 5 in B) make the result differ from the
direct sum by about 1e-5 of the layer's largest output in float32 (measured: 4e-6 .. 1.4e-5 on
random data), well inside the 1e-4 the Darknet golden files are matched to. Layers too small for
the transforms to pay stay on im2col (`fits`).

Arrays are batch-innermost as in numpy_backend: x's memory is (C, H, W, B), so a tile's rows
and columns are strided views, and the output tiles are written back into that layout.
"""

import numpy as np

TILE = 4            # outputs per tile side (m)
ALPHA = TILE + 2    # input tile side (m + r - 1)
B_T = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)
B_T32, A_T32 = B_T.astype(np.float32), A_T.astype(np.float32)

MIN_CHANNELS = 16      # below this the input transform costs more than the products it saves
BLOCK_ELEMENTS = 1 << 21  # transformed-input elements per block of tile rows (8 MiB)


def fits(x_shape, w_shape, stride, padding, groups, dilation):
    """Whether a convolution takes this path: 3x3, stride 1, padding 1, one group, no
    dilation, at least MIN_CHANNELS input channels."""
    return (w_shape[2:] == (3, 3) and stride == 1 and padding == 1 and groups == 1
            and dilation == 1 and x_shape[1] >= MIN_CHANNELS)


def transform_filters(weights):
    """U = G g G^T for every filter: (36, F, C) float32, computed in float64."""
    f, c = weights.shape[:2]
    g = np.asarray(weights, dtype=np.float64).reshape(f * c, 3, 3)
    u = np.matmul(np.matmul(G, g), G.T)  # (F*C, 6, 6)
    return np.ascontiguousarray(u.reshape(f, c, ALPHA * ALPHA).transpose(2, 0, 1),
                                dtype=np.float32)


def conv3x3(x, filters, f, batch_innermost, memory_order):
    """The 3x3 stride-1 padding-1 convolution of x (B, C, H, W) with transformed `filters`
    (36, F, C); returns y (B, F, H, W), batch-innermost. Block by block of tile rows so the
    transformed input stays in cache."""
    b, c, h, w = x.shape
    rows, cols = -(-h // TILE), -(-w // TILE)
    # the input zero-padded by 1 on the top and left, and to whole tiles on the bottom and right
    padded = np.zeros((c, rows * TILE + 2, cols * TILE + 2, b), x.dtype)
    padded[:, 1:1 + h, 1:1 + w] = memory_order(x)
    y = batch_innermost((b, f, h, w), x.dtype)
    ym = memory_order(y)
    step = max(1, BLOCK_ELEMENTS // (ALPHA * ALPHA * c * cols * b))
    buffer = np.empty(ALPHA * ALPHA * c * min(step, rows) * cols * b, x.dtype)
    for row0 in range(0, rows, step):
        n = min(step, rows - row0)
        d = buffer[:ALPHA * ALPHA * c * n * cols * b].reshape(ALPHA, ALPHA, c, n, cols, b)
        for i in range(ALPHA):  # gather: d[i, j, c, row, col] = the tile's cell (i, j)
            top = row0 * TILE + i
            for j in range(ALPHA):
                d[i, j] = padded[:, top:top + TILE * n:TILE, j:j + TILE * cols:TILE]
        points = c * n * cols * b
        # V = B^T d B: over i (one product), then over j (a product per i)
        v = np.matmul(B_T32, np.matmul(B_T32, d.reshape(ALPHA, ALPHA * points))
                      .reshape(ALPHA, ALPHA, points))
        m = np.matmul(filters, v.reshape(ALPHA * ALPHA, c, -1))  # (36, F, tiles)
        # Y = A^T M A, likewise: (4, 4, F, n, cols, B)
        out = np.matmul(A_T32, np.matmul(A_T32, m.reshape(ALPHA, -1))
                        .reshape(TILE, ALPHA, -1)).reshape(TILE, TILE, f, n, cols, b)
        # out[i, j, f, row, col] is y's cell (row*4 + i, col*4 + j)
        top, bottom = row0 * TILE, min((row0 + n) * TILE, h)
        full = out.transpose(2, 3, 0, 4, 1, 5).reshape(f, n * TILE, cols * TILE, b)
        ym[:, top:bottom] = full[:, :bottom - top, :w]
    return y
