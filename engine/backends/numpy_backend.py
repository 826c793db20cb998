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


class NumpyBackend:
    name = "cpu"

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

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
        if activation != "linear":
            delta *= activations.gradient(y, activation)
        return delta

    def add_bias_(self, y, biases):
        y += biases.reshape(1, -1, 1, 1)
        return y

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

    def conv_forward(self, x, weights, stride, padding, groups):
        """y[b, f] = sum_c weights[f, c] (*) x[b, c]; weights (F, C/groups, k, k)."""
        b, c = x.shape[:2]
        f = weights.shape[0]
        size, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding)
        y = np.empty((f, b, out_h * out_w), dtype=np.float32)
        cg, fg = c // groups, f // groups
        for g in range(groups):
            cols = self._im2col(x[:, g * cg:(g + 1) * cg], size, stride, padding, out_h, out_w)
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
        dx = np.empty(x.shape, dtype=np.float32) if need_dx else None
        for g in range(groups):
            xg = x[:, g * cg:(g + 1) * cg]
            cols = self._im2col(xg, size, stride, padding, out_h, out_w)
            dg = delta_t[g * fg:(g + 1) * fg]
            weight_updates[g * fg:(g + 1) * fg] += (dg @ cols.T).reshape(fg, cg, size, size)
            if need_dx:
                wg = weights[g * fg:(g + 1) * fg].reshape(fg, -1)
                dcols = wg.T @ dg
                dx[:, g * cg:(g + 1) * cg] = self._col2im(dcols, xg.shape, size, stride, padding,
                                                          out_h, out_w)
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
    def _bn_axes(per_activation):
        # SPATIAL: one statistic per channel over batch and space; PER_ACTIVATION: per element.
        return (0,) if per_activation else (0, 2, 3)

    @staticmethod
    def _bn_view(vector, shape, per_activation):
        return vector.reshape((1,) + shape[1:]) if per_activation else vector.reshape(1, -1, 1, 1)

    def batchnorm_forward_train(self, x, scales, biases, rolling_mean, rolling_variance,
                                per_activation=False):
        """cuDNN's training rule: biased batch variance, eps under the square root; the rolling
        statistics move by 1% toward the batch mean and the *unbiased* batch variance.
        Returns (y, cache) with y = scales * x_norm + biases."""
        axes = self._bn_axes(per_activation)
        count = x.size // rolling_mean.size
        mean = x.mean(axis=axes, keepdims=True)
        centered = x - mean
        variance = np.mean(centered * centered, axis=axes, keepdims=True)
        inv_std = 1.0 / np.sqrt(variance + np.float32(BN_EPSILON))
        x_norm = centered * inv_std
        unbiased = variance * (count / max(count - 1, 1))
        rolling_mean *= 1 - BN_MOMENTUM
        rolling_mean += BN_MOMENTUM * mean.reshape(rolling_mean.shape)
        rolling_variance *= 1 - BN_MOMENTUM
        rolling_variance += BN_MOMENTUM * unbiased.reshape(rolling_variance.shape)
        view = lambda v: self._bn_view(v, x.shape, per_activation)  # noqa: E731
        y = x_norm * view(scales) + view(biases)
        return y.astype(np.float32, copy=False), (x_norm, inv_std, per_activation)

    def batchnorm_forward_inference(self, x, scales, biases, rolling_mean, rolling_variance,
                                    per_activation=False):
        """Darknet's inference rule: scales * (x - mean) / (sqrt(var) + 1e-6) + biases."""
        view = lambda v: self._bn_view(v, x.shape, per_activation)  # noqa: E731
        std = np.sqrt(view(rolling_variance)) + np.float32(BN_INFERENCE_EPSILON)
        return ((x - view(rolling_mean)) / std * view(scales) + view(biases)).astype(np.float32)

    def batchnorm_backward(self, delta, cache, scales, scale_updates, bias_updates):
        """Accumulates the scale and bias gradients; returns the delta for the BN input."""
        x_norm, inv_std, per_activation = cache
        axes = self._bn_axes(per_activation)
        count = delta.size // scales.size
        sum_delta = delta.sum(axis=axes, keepdims=True)
        sum_delta_xnorm = (delta * x_norm).sum(axis=axes, keepdims=True)
        bias_updates += sum_delta.reshape(bias_updates.shape)
        scale_updates += sum_delta_xnorm.reshape(scale_updates.shape)
        scale = self._bn_view(scales, delta.shape, per_activation)
        dx = (scale * inv_std / count) * (count * delta - sum_delta - x_norm * sum_delta_xnorm)
        return dx.astype(np.float32, copy=False)

    # ---- pooling, resampling, dropout ---------------------------------------------------------
    def maxpool_forward(self, x, size, stride, padding, out_h, out_w):
        """Darknet's maxpool: windows start at -padding//2; cells outside the input are -inf.
        Returns (y, argmax) where argmax is the window offset that won (first one on ties)."""
        b, c, h, w = x.shape
        top = padding // 2
        need_h = (out_h - 1) * stride + size
        need_w = (out_w - 1) * stride + size
        padded = np.full((b, c, max(need_h, top + h), max(need_w, top + w)), -np.inf, np.float32)
        padded[:, :, top:top + h, top:top + w] = x
        windows = np.empty((size * size, b, c, out_h, out_w), dtype=np.float32)
        for i in range(size):
            for j in range(size):
                windows[i * size + j] = padded[:, :, i:i + stride * out_h:stride,
                                               j:j + stride * out_w:stride]
        argmax = windows.argmax(axis=0).astype(np.int8 if size * size < 128 else np.int32)
        y = np.take_along_axis(windows, argmax[None].astype(np.intp), axis=0)[0]
        return y, argmax

    def maxpool_backward(self, delta, argmax, in_shape, size, stride, padding):
        b, c, h, w = in_shape
        out_h, out_w = delta.shape[2:]
        top = padding // 2
        need_h = max((out_h - 1) * stride + size, top + h)
        need_w = max((out_w - 1) * stride + size, top + w)
        padded = np.zeros((b, c, need_h, need_w), dtype=np.float32)
        for i in range(size):
            for j in range(size):
                padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride] += \
                    np.where(argmax == i * size + j, delta, 0)
        return np.ascontiguousarray(padded[:, :, top:top + h, top:top + w])

    def avgpool_forward(self, x):
        """Darknet's [avgpool]: the global average of each channel."""
        return x.mean(axis=(2, 3), keepdims=True)

    def avgpool_backward(self, delta, in_shape):
        h, w = in_shape[2:]
        return np.broadcast_to(delta / np.float32(h * w), in_shape).astype(np.float32)

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
        return cost, (truth - p).reshape(probabilities.shape).astype(np.float32)

    def sse(self, output, truth):
        """Darknet's l2 cost: sum of squared errors; delta = truth - output."""
        diff = (truth - output.reshape(truth.shape)).astype(np.float32)
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
