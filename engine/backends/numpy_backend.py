"""The CPU backend: every operation the layers use, on float32 numpy arrays in NCHW layout.

This module is also the reference the CUDA backend is tested against, so it favours plain,
vectorised numpy: convolution is im2col (a copy per kernel offset, never per pixel) followed by
one BLAS matrix product over the whole batch.

Sign convention (Darknet's): a "delta" is the negative gradient of the loss. Backward operations
*accumulate* parameter gradients into the `*_updates` arrays they are given (Darknet's beta=1),
and only `sgd_update` changes parameters.
"""

import numpy as np

from .. import activations

BN_EPSILON = 1e-5            # cuDNN's epsilon for batch statistics (training)
BN_INFERENCE_EPSILON = 1e-6  # Darknet's: added to the standard deviation (inference)
BN_MOMENTUM = 0.01           # exponentialAverageFactor for the rolling statistics


COLUMN_CACHE_BYTES = 512 << 20  # im2col buffers kept from forward for backward (training)


class NumpyBackend:
    name = "cpu"

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self._columns = {}  # (id(x), geometry) -> (x, columns), forward -> backward in training

    def seed(self, seed):
        self.rng = np.random.default_rng(seed)

    # ---- memory -------------------------------------------------------------------------------
    def asarray(self, host):
        return np.ascontiguousarray(host, dtype=np.float32)

    def to_host(self, array):
        return np.asarray(array, dtype=np.float32)

    def zeros(self, shape):
        return np.zeros(shape, dtype=np.float32)

    def copy(self, array):
        return array.copy()

    def reshape(self, array, shape):
        return array.reshape(shape)

    def add_(self, dst, src):
        """dst += src (used to sum deltas that reach one layer along several paths)."""
        dst += src
        return dst

    def synchronize(self):
        pass

    # ---- activation and bias ------------------------------------------------------------------
    def activate_(self, x, activation):
        """x = act(x), in place; returns x."""
        if activation != "linear":
            x[...] = activations.activate(x, activation)
        return x

    def activation_backward_(self, y, delta, activation):
        """delta *= act'(x), computed from the output y; in place, returns delta."""
        if activation == "leaky":
            # delta * (y > 0 ? 1 : .1) as arithmetic on the mask: numpy's where() is slow here.
            kept = delta * (y > 0)
            delta *= delta.dtype.type(0.1)
            kept *= delta.dtype.type(0.9)
            delta += kept
        elif activation != "linear":
            delta *= activations.gradient(y, activation)
        return delta

    def add_bias_(self, y, biases, activation="linear"):
        """y = act(y + biases per channel), in place."""
        y += biases.reshape(1, -1, 1, 1)
        return self.activate_(y, activation)

    def bias_backward(self, delta, bias_updates):
        bias_updates += delta.sum(axis=(0, 2, 3))

    def scale_(self, x, factor):
        x *= np.float32(factor)
        return x

    # ---- convolution --------------------------------------------------------------------------
    @staticmethod
    def _conv_geometry(x_shape, w_shape, stride, padding):
        _, _, h, w = x_shape
        size = w_shape[2]
        out_h = (h + 2 * padding - size) // stride + 1
        out_w = (w + 2 * padding - size) // stride + 1
        return size, out_h, out_w

    def _im2col(self, x, size, stride, padding, out_h, out_w):
        """(B, C, H, W) -> columns (C*size*size, B*out_h*out_w), one copy per kernel offset."""
        b, c = x.shape[:2]
        if size == 1 and stride == 1 and padding == 0:
            return x.transpose(1, 0, 2, 3).reshape(c, b * out_h * out_w)
        if padding:
            x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        xt = x.transpose(1, 0, 2, 3)
        cols = np.empty((c, size, size, b, out_h, out_w), dtype=x.dtype)
        for i in range(size):
            for j in range(size):
                cols[:, i, j] = xt[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
        return cols.reshape(c * size * size, b * out_h * out_w)

    def _col2im(self, cols, x_shape, size, stride, padding, out_h, out_w):
        """Inverse of _im2col: sum each column entry back into the input position it came from."""
        b, c, h, w = x_shape
        if size == 1 and stride == 1 and padding == 0:
            return cols.reshape(c, b, h, w).transpose(1, 0, 2, 3)
        cols = cols.reshape(c, size, size, b, out_h, out_w)
        dx = np.zeros((c, b, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
        for i in range(size):
            for j in range(size):
                dx[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride] += cols[:, i, j]
        return dx[:, :, padding:padding + h, padding:padding + w].transpose(1, 0, 2, 3)

    def _columns_for(self, x, group, c, size, stride, padding, out_h, out_w, keep=False,
                     reuse=False):
        """im2col of channel group `group` (c channels) of x. In training the forward pass keeps its columns
        (within COLUMN_CACHE_BYTES) so the backward pass need not rebuild them."""
        key = (id(x), group, size, stride, padding)
        if reuse:
            cached = self._columns.pop(key, None)
            if cached is not None and cached[0] is x:
                return cached[1]
        cols = self._im2col(x[:, group * c:(group + 1) * c], size, stride, padding, out_h, out_w)
        if keep:
            held = sum(v[1].nbytes for v in self._columns.values())
            while self._columns and held + cols.nbytes > COLUMN_CACHE_BYTES:
                held -= self._columns.pop(next(iter(self._columns)))[1].nbytes
            if cols.nbytes <= COLUMN_CACHE_BYTES:
                self._columns[key] = (x, cols)
        return cols

    def conv_forward(self, x, weights, stride, padding, groups, train=False):
        """y[b, f] = sum_c weights[f, c] (*) x[b, c]; weights (F, C/groups, k, k)."""
        b, c = x.shape[:2]
        f = weights.shape[0]
        size, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding)
        y = np.empty((f, b, out_h * out_w), dtype=x.dtype)
        cg, fg = c // groups, f // groups
        for g in range(groups):
            cols = self._columns_for(x, g, cg, size, stride, padding, out_h, out_w, keep=train)
            wg = weights[g * fg:(g + 1) * fg].reshape(fg, -1)
            np.matmul(wg, cols, out=y[g * fg:(g + 1) * fg].reshape(fg, -1))
        return np.ascontiguousarray(y.reshape(f, b, out_h, out_w).transpose(1, 0, 2, 3))

    def conv_backward(self, x, weights, delta, stride, padding, groups, weight_updates, need_dx):
        """weight_updates += delta (*) x; returns the delta for x (or None if not needed)."""
        b, c = x.shape[:2]
        f = weights.shape[0]
        size, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding)
        cg, fg = c // groups, f // groups
        delta_t = delta.transpose(1, 0, 2, 3).reshape(f, b * out_h * out_w)
        dx = np.empty(x.shape, dtype=x.dtype) if need_dx else None
        for g in range(groups):
            cols = self._columns_for(x, g, cg, size, stride, padding, out_h, out_w, reuse=True)
            dg = delta_t[g * fg:(g + 1) * fg]
            weight_updates[g * fg:(g + 1) * fg] += (dg @ cols.T).reshape(fg, cg, size, size)
            if need_dx:
                wg = weights[g * fg:(g + 1) * fg].reshape(fg, -1)
                dx[:, g * cg:(g + 1) * cg] = self._col2im(wg.T @ dg, (b, cg) + x.shape[2:], size,
                                                          stride, padding, out_h, out_w)
        return dx

    # ---- fully connected ----------------------------------------------------------------------
    def connected_forward(self, x, weights):
        """x (B, inputs, ...) flattened; weights (outputs, inputs) -> (B, outputs, 1, 1)."""
        b = x.shape[0]
        y = x.reshape(b, -1) @ weights.T
        return y.reshape(b, -1, 1, 1)

    def connected_backward(self, x, weights, delta, weight_updates, need_dx):
        b = x.shape[0]
        d = delta.reshape(b, -1)
        weight_updates += d.T @ x.reshape(b, -1)
        return (d @ weights).reshape(x.shape) if need_dx else None

    # ---- batch normalisation ------------------------------------------------------------------
    @staticmethod
    def _bn_layout(shape, per_activation):
        """(batch, statistics, positions): BN's view of an NCHW array. SPATIAL keeps one
        statistic per channel over batch and positions; PER_ACTIVATION one per element."""
        b = shape[0]
        if per_activation:
            return b, int(np.prod(shape[1:])), 1
        return b, shape[1], int(np.prod(shape[2:]))

    def batchnorm_forward_train(self, x, scales, biases, rolling_mean, rolling_variance,
                                per_activation=False):
        """cuDNN's training rule: biased batch variance, eps under the square root; the rolling
        statistics move by 1% toward the batch mean and the *unbiased* batch variance.
        Returns (y, cache) with y = scales * x_norm + biases."""
        b, n, positions = self._bn_layout(x.shape, per_activation)
        count = b * positions
        view = x.reshape(b, n, positions)
        mean = np.einsum("bns->n", view) / count
        x_norm = view - mean[:, None]
        variance = np.einsum("bns,bns->n", x_norm, x_norm) / count
        inv_std = 1 / np.sqrt(variance + x.dtype.type(BN_EPSILON))
        x_norm *= inv_std[:, None]
        rolling_mean *= 1 - BN_MOMENTUM
        rolling_mean += BN_MOMENTUM * mean.reshape(rolling_mean.shape)
        rolling_variance *= 1 - BN_MOMENTUM
        rolling_variance += (BN_MOMENTUM * count / max(count - 1, 1)) * \
            variance.reshape(rolling_variance.shape)
        y = x_norm * scales.reshape(n, 1)
        y += biases.reshape(n, 1)
        return y.reshape(x.shape), (x_norm, inv_std, per_activation)

    def batchnorm_forward_inference(self, x, scales, biases, rolling_mean, rolling_variance,
                                    per_activation=False, activation="linear"):
        """Darknet's inference rule, then the activation:
        act(scales * (x - mean) / (sqrt(var) + 1e-6) + biases), as one affine map per statistic."""
        b, n, positions = self._bn_layout(x.shape, per_activation)
        factor = scales.reshape(n) / (np.sqrt(rolling_variance.reshape(n)) +
                                      x.dtype.type(BN_INFERENCE_EPSILON))
        y = x.reshape(b, n, positions) * factor[:, None]
        y += (biases.reshape(n) - rolling_mean.reshape(n) * factor)[:, None]
        return self.activate_(y.reshape(x.shape), activation)

    def batchnorm_backward(self, delta, cache, scales, scale_updates, bias_updates):
        """Accumulates the scale and bias gradients; returns the delta for the BN input:
        dx = scale*inv_std * (delta - mean(delta) - x_norm * mean(delta * x_norm))."""
        x_norm, inv_std, per_activation = cache
        b, n, positions = self._bn_layout(delta.shape, per_activation)
        count = b * positions
        view = delta.reshape(b, n, positions)
        sum_delta = np.einsum("bns->n", view)
        sum_delta_xnorm = np.einsum("bns,bns->n", view, x_norm)
        bias_updates += sum_delta.reshape(bias_updates.shape)
        scale_updates += sum_delta_xnorm.reshape(scale_updates.shape)
        gain = scales.reshape(n) * inv_std
        dx = x_norm * (-gain * sum_delta_xnorm / count)[:, None]
        dx += view * gain[:, None]
        dx -= (gain * sum_delta / count)[:, None]
        return dx.reshape(delta.shape)

    # ---- pooling, resampling, dropout ---------------------------------------------------------
    @staticmethod
    def _pool_window(padded, i, j, stride, out_h, out_w):
        """The (B, C, out_h, out_w) view of the cells at offset (i, j) of every window."""
        return padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]

    @staticmethod
    def _pool_frame(in_shape, size, stride, padding, out_h, out_w):
        """(top, padded height, padded width): the frame every window fits in; the input sits at
        (top, top), where Darknet's windows start at -padding//2."""
        h, w = in_shape[2:]
        top = padding // 2
        return top, max((out_h - 1) * stride + size, top + h), max((out_w - 1) * stride + size, top + w)

    def maxpool_forward(self, x, size, stride, padding, out_h, out_w):
        """Darknet's maxpool: windows start at -padding//2; cells outside the input are -inf.
        Returns (y, argmax) where argmax is the window offset that won (the first on ties).
        One pass per window offset, elementwise (numpy's where/argmax are slow here)."""
        b, c, h, w = x.shape
        top, frame_h, frame_w = self._pool_frame(x.shape, size, stride, padding, out_h, out_w)
        if (top, frame_h, frame_w) == (0, h, w):
            padded = x
        else:
            padded = np.full((b, c, frame_h, frame_w), -np.inf, x.dtype)
            padded[:, :, top:top + h, top:top + w] = x
        if size == 2:
            return self._maxpool_2x2(padded, stride, out_h, out_w)
        index_type = np.int8 if size * size < 128 else np.int32
        y = self._pool_window(padded, 0, 0, stride, out_h, out_w).copy()
        argmax = np.zeros(y.shape, dtype=index_type)
        for offset in range(1, size * size):
            window = self._pool_window(padded, offset // size, offset % size, stride, out_h, out_w)
            better = (window > y).view(np.int8).astype(index_type, copy=False)
            np.maximum(y, window, out=y)
            argmax += better * (index_type(offset) - argmax)
        return y, argmax

    def _maxpool_2x2(self, padded, stride, out_h, out_w):
        """The common 2x2 window as a tournament: first-max of each pair, then of the pairs."""
        a, b, c, d = (self._pool_window(padded, i, j, stride, out_h, out_w)
                      for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        top, bottom = np.maximum(a, b), np.maximum(c, d)
        top_index = (b > a).view(np.int8)
        bottom_index = (d > c).view(np.int8) + np.int8(2)
        bottom_index -= top_index
        bottom_index *= (bottom > top).view(np.int8)
        bottom_index += top_index
        return np.maximum(top, bottom, out=top), bottom_index

    def maxpool_backward(self, delta, argmax, in_shape, size, stride, padding):
        b, c, h, w = in_shape
        out_h, out_w = delta.shape[2:]
        top, frame_h, frame_w = self._pool_frame(in_shape, size, stride, padding, out_h, out_w)
        # Windows that tile the frame cover each cell once: assign instead of accumulating.
        tiles = size == stride and (out_h * size, out_w * size) == (frame_h, frame_w)
        padded = (np.empty if tiles else np.zeros)((b, c, frame_h, frame_w), dtype=delta.dtype)
        for offset in range(size * size):
            window = self._pool_window(padded, offset // size, offset % size, stride, out_h, out_w)
            if tiles:
                np.multiply(delta, argmax == offset, out=window)
            else:
                window += delta * (argmax == offset)
        if (top, frame_h, frame_w) == (0, h, w):
            return padded
        return np.ascontiguousarray(padded[:, :, top:top + h, top:top + w])

    def avgpool_forward(self, x):
        """Darknet's [avgpool]: the global average of each channel."""
        return x.mean(axis=(2, 3), keepdims=True)

    def avgpool_backward(self, delta, in_shape):
        h, w = in_shape[2:]
        return np.broadcast_to(delta / (h * w), in_shape).copy()

    def upsample(self, x, stride, scale):
        """Nearest-neighbour upsampling by `stride`, times `scale`."""
        y = np.repeat(np.repeat(x, stride, axis=2), stride, axis=3)
        return y * np.float32(scale) if scale != 1 else y

    def downsample_sum(self, x, stride, scale):
        """The adjoint of upsample: sums each stride x stride block, times `scale`."""
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // stride, stride, w // stride, stride).sum(axis=(3, 5))
        return y * np.float32(scale) if scale != 1 else y

    def dropout_forward(self, x, probability):
        """Training: zero each input with `probability`, scale survivors by 1/(1-p).
        Returns (y, mask) where mask holds the per-element factor (0 or 1/(1-p))."""
        keep = self.rng.random(x.shape, dtype=np.float32) >= probability
        mask = keep * np.float32(1.0 / (1.0 - probability))
        return x * mask, mask

    def dropout_backward(self, delta, mask):
        return delta * mask

    # ---- outputs and losses -------------------------------------------------------------------
    def softmax(self, x, groups, temperature):
        """Softmax over each of `groups` contiguous blocks of every image's outputs."""
        b = x.shape[0]
        z = x.reshape(b, groups, -1) / np.float32(temperature)
        z = np.exp(z - z.max(axis=2, keepdims=True))
        z /= z.sum(axis=2, keepdims=True)
        return z.reshape(x.shape)

    def softmax_cross_entropy(self, probabilities, truth):
        """(cost summed over the batch, delta = truth - p) for a softmax output."""
        p = probabilities.reshape(truth.shape)
        with np.errstate(divide="ignore"):
            cost = float(-(truth * np.log(np.maximum(p, np.float32(1e-30)))).sum())
        return cost, (truth - p).reshape(probabilities.shape)

    def sse(self, output, truth):
        """Darknet's l2 cost: sum of squared errors; delta = truth - output."""
        diff = truth - output.reshape(truth.shape)
        return float((diff * diff).sum()), diff.reshape(output.shape)

    # ---- optimisation -------------------------------------------------------------------------
    def sgd_update(self, param, updates, learning_rate, momentum, decay, batch):
        """Darknet's SGD step for one tensor (updates hold summed negative gradients):
        u += -decay*batch*p;  p += lr/batch * u;  u *= momentum."""
        if decay:
            updates -= np.float32(decay * batch) * param
        param += np.float32(learning_rate / batch) * updates
        updates *= np.float32(momentum)

    # ---- channel plumbing (route) -------------------------------------------------------------
    def channel_slice(self, x, start, stop):
        return np.ascontiguousarray(x[:, start:stop])

    def concat_channels(self, xs):
        return np.concatenate(xs, axis=1)

    def add_channel_slice_(self, dst, start, src):
        dst[:, start:start + src.shape[1]] += src
        return dst

    # ---- detection-model ops (shortcut, yolo, region, reorg) ----------------------------------
    @staticmethod
    def _shortcut_windows(out_shape, add_shape):
        """Darknet's shortcut_cpu geometry: the overlapping channels, and for each map the
        positions that meet (the larger map is subsampled by the integer size ratio)."""
        (c2, h2, w2), (c1, h1, w1) = out_shape, add_shape
        stride, sample = max(w1 // w2, 1), max(w2 // w1, 1)
        minc, minh, minw = min(c1, c2), min(h1, h2), min(w1, w2)
        out_window = (slice(None), slice(0, minc), slice(0, minh * sample, sample),
                      slice(0, minw * sample, sample))
        add_window = (slice(None), slice(0, minc), slice(0, minh * stride, stride),
                      slice(0, minw * stride, stride))
        return out_window, add_window

    def shortcut_forward(self, x, add, alpha, beta):
        """Darknet's [shortcut] sum (shortcut_cpu), before the activation: a new array equal to
        x, except where the maps overlap: y = alpha*x + beta*add there. Overlap: channels
        0..min(C)-1; spatially, with stride = max(W_add//W_x, 1) and sample = max(W_x//W_add, 1),
        y[:, k, j*sample, i*sample] pairs with add[:, k, j*stride, i*stride] for
        j < min(H), i < min(W). Same shapes: y = alpha*x + beta*add everywhere."""
        out_window, add_window = self._shortcut_windows(x.shape[1:], add.shape[1:])
        y = x.copy()
        y[out_window] = np.float32(alpha) * x[out_window] + np.float32(beta) * add[add_window]
        return y

    def shortcut_backward(self, delta, add_shape, alpha, beta):
        """The exact gradient of shortcut_forward: returns (delta for x, delta for add), add's
        being a new (B,) + add_shape array (zero outside the overlap)."""
        out_window, add_window = self._shortcut_windows(delta.shape[1:], add_shape)
        dx = delta.copy()
        dx[out_window] *= np.float32(alpha)
        dadd = np.zeros((delta.shape[0],) + tuple(add_shape), dtype=delta.dtype)
        dadd[add_window] = np.float32(beta) * delta[out_window]
        return dx, dadd

    def anchor_activate(self, x, anchors, logistic_ranges, softmax_range=None):
        """YOLO/region output activation. x (B, anchors*E, H, W) holds, per anchor, E entries
        (x, y, w, h, objectness, classes...) each an H x W plane. Returns a new array: the
        logistic 1/(1+exp(-v)) on entries [start, stop) for each (start, stop) in
        `logistic_ranges`, a softmax over entries [start, stop) of `softmax_range` at each
        (anchor, position), and every other entry unchanged."""
        b, _, h, w = x.shape
        y = x.copy()
        grouped = y.reshape(b, anchors, -1, h, w)
        for start, stop in logistic_ranges:
            grouped[:, :, start:stop] = activations.activate(grouped[:, :, start:stop], "logistic")
        if softmax_range is not None:
            start, stop = softmax_range
            block = grouped[:, :, start:stop]
            block = np.exp(block - block.max(axis=2, keepdims=True))
            grouped[:, :, start:stop] = block / block.sum(axis=2, keepdims=True)
        return y

    def reorg(self, x, stride, forward, dims, out_shape):
        """Darknet's reorg_cpu(x, w, h, c, batch, stride, forward, out) on the layer's input dims
        (c, h, w) = `dims`; x and the result hold the same B*c*h*w values in another order, and
        the result has shape (B,) + out_shape. With oc = c/stride^2, (k, j, i) ranging over
        (c, h, w) and (k', j', i') = (k % oc, j*stride + (k//oc) // stride,
        i*stride + (k//oc) % stride) over (oc, h*stride, w*stride):
        forward=False: result(c,h,w)[k,j,i] = x viewed as (oc,h*s,w*s)[k',j',i'] (the
        non-reverse layer's forward, and the reverse layer's backward);
        forward=True: result viewed as (oc,h*s,w*s)[k',j',i'] = x(c,h,w)[k,j,i] (the inverse)."""
        c, h, w = dims
        b, oc = x.shape[0], c // (stride * stride)
        if forward:
            # x as (B, dy, dx, oc, j, i) -> (B, oc, j, dy, i, dx)
            y = x.reshape(b, stride, stride, oc, h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            # x as (B, oc, j, dy, i, dx) -> (B, dy, dx, oc, j, i)
            y = x.reshape(b, oc, h, stride, w, stride).transpose(0, 3, 5, 1, 2, 4)
        return np.ascontiguousarray(y).reshape((b,) + tuple(out_shape))

    def crop(self, x, top, left, height, width, flip, scale, shift):
        """Darknet's [crop] (forward_crop_layer): y[:, :, i, j] = x[:, :, top + i, col(j)] * scale
        + shift with col(j) = left + j, or W - left - 1 - j when `flip` (mirrored)."""
        w = x.shape[3]
        if flip:
            window = x[:, :, top:top + height, w - left - width:w - left][:, :, :, ::-1]
        else:
            window = x[:, :, top:top + height, left:left + width]
        return (window * np.float32(scale) + np.float32(shift)).astype(x.dtype, copy=False)
