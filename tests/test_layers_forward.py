"""engine/layers/*: forward passes against plain numpy loops, and batch-norm semantics.

Convolution and Darknet's maxpool padding rule are recomputed output cell by output cell; batch
norm is checked against the rule in darknet-notes.md ("Our rule"): training uses the biased batch
variance with eps 1e-5 under the square root and moves the rolling statistics 1% toward the batch
mean and the *unbiased* variance; inference uses scale*(x-mean)/(sqrt(var)+1e-6)+bias.
"""

import numpy as np
import pytest

from engine.backends.numpy_backend import NumpyBackend

from helpers import as_float64, build_layer


def conv_reference(x, w, stride, padding, groups):
    b, c, h, wd = x.shape
    f, cg, k, _ = w.shape
    oh = (h + 2 * padding - k) // stride + 1
    ow = (wd + 2 * padding - k) // stride + 1
    xp = np.zeros((b, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    fg = f // groups
    y = np.zeros((b, f, oh, ow))
    for n in range(b):
        for o in range(f):
            g = o // fg
            for i in range(oh):
                for j in range(ow):
                    total = 0.0
                    for ci in range(cg):
                        for ki in range(k):
                            for kj in range(k):
                                total += w[o, ci, ki, kj] * xp[n, g * cg + ci, i * stride + ki,
                                                               j * stride + kj]
                    y[n, o, i, j] = total
    return y


def maxpool_reference(x, size, stride, padding):
    """Darknet's forward_maxpool_layer: windows start at -padding/2; the maximum starts at
    -FLT_MAX and outside cells are skipped."""
    b, c, h, w = x.shape
    oh = (h + padding - size) // stride + 1
    ow = (w + padding - size) // stride + 1
    offset = -(padding // 2)
    y = np.zeros((b, c, oh, ow))
    for n in range(b):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    best = -np.finfo(np.float32).max
                    for ki in range(size):
                        for kj in range(size):
                            r, col = offset + i * stride + ki, offset + j * stride + kj
                            if 0 <= r < h and 0 <= col < w:
                                best = max(best, x[n, ch, r, col])
                    y[n, ch, i, j] = best
    return y


@pytest.mark.parametrize("text, shape", [
    ("filters=3\nsize=3\nstride=1\npad=1", (2, 5, 5)),
    ("filters=4\nsize=3\nstride=2\npad=1", (3, 7, 6)),
    ("filters=2\nsize=3\nstride=2", (2, 8, 8)),
    ("filters=2\nsize=2\nstride=1\npadding=1", (1, 4, 5)),
    ("filters=4\nsize=3\npad=1\ngroups=2", (4, 5, 5)),
    ("filters=6\nsize=1\ngroups=3", (3, 4, 4)),
    ("filters=2\nsize=5\nstride=3\npadding=2", (2, 9, 7)),
])
def test_convolution_forward_matches_loops(tmp_path, text, shape):
    """conv (linear, no BN) equals a direct loop over output cells; output size as Darknet's
    (w + 2*padding - size)/stride + 1."""
    layer = as_float64(build_layer(tmp_path, f"[convolutional]\n{text}\nactivation=linear", shape),
                       np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2,) + shape)
    y = layer.forward(NumpyBackend(), x, False)
    want = conv_reference(x, layer.params["weights"], layer.stride, layer.padding, layer.groups)
    want += layer.params["biases"].reshape(1, -1, 1, 1)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("text, shape, out_hw", [
    ("size=2\nstride=2", (2, 4, 4), (2, 2)),
    ("size=2\nstride=2", (2, 5, 5), (3, 3)),
    ("size=2\nstride=1", (2, 5, 4), (5, 4)),     # size 2 stride 1 keeps the size
    ("size=3\nstride=1", (1, 4, 5), (4, 5)),
    ("size=3\nstride=2", (1, 7, 7), (4, 4)),
    ("size=3\nstride=2\npadding=0", (1, 7, 8), (3, 3)),
    ("size=4\nstride=2\npadding=3", (2, 6, 6), (3, 3)),
    ("size=13\nstride=1", (2, 4, 4), (4, 4)),         # SPP's window on a small map
    ("size=40\nstride=3", (1, 5, 6), (2, 2)),
    ("size=3\nstride=1\npadding=9", (1, 4, 4), (11, 11)),  # windows wholly outside: -FLT_MAX
])
def test_maxpool_forward_matches_darknet_rule(tmp_path, text, shape, out_hw):
    """maxpool output = (w + padding - size)/stride + 1, windows from -padding/2, -inf outside;
    inputs all negative so that a -inf (not 0) border matters."""
    layer = build_layer(tmp_path, "[maxpool]\n" + text, shape)
    assert layer.out_shape == (shape[0],) + out_hw
    x = -np.abs(np.random.default_rng(2).standard_normal((2,) + shape)) - 1
    y = layer.forward(NumpyBackend(), x, False)
    np.testing.assert_array_equal(y, maxpool_reference(x, layer.size, layer.stride, layer.padding))


def test_maxpool_larger_than_input_is_an_error(tmp_path):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=r"maxpool size=9 does not fit the 4x4x2 input"):
        build_layer(tmp_path, "[maxpool]\nsize=9\nstride=1\npadding=0", (2, 4, 4))


# ---- batch-norm semantics --------------------------------------------------------------------------
def _bn_layer(tmp_path, shape, text=""):
    layer = as_float64(build_layer(tmp_path, "[batchnorm]\n" + text, shape), np.random.default_rng(4))
    rng = np.random.default_rng(5)
    layer.params["rolling_mean"] = rng.uniform(-0.3, 0.3, layer.params["rolling_mean"].shape)
    layer.params["rolling_variance"] = rng.uniform(0.5, 1.5, layer.params["rolling_variance"].shape)
    return layer


def test_batchnorm_training_rule(tmp_path):
    """Training: biased variance, eps=1e-5 inside sqrt; rolling = 0.99*rolling + 0.01*batch stat,
    the variance's with the unbiased estimate (n/(n-1))."""
    layer = _bn_layer(tmp_path, (3, 2, 2))
    p = {k: v.copy() for k, v in layer.params.items()}
    x = np.random.default_rng(6).standard_normal((4, 3, 2, 2)) * 2 + 0.5
    y = layer.forward(NumpyBackend(), x, True)
    for ch in range(3):
        values = x[:, ch].ravel()
        n = values.size
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / n
        want = p["scales"][ch] * (x[:, ch] - mean) / np.sqrt(var + 1e-5) + p["biases"][ch]
        np.testing.assert_allclose(y[:, ch], want, rtol=1e-10, atol=1e-12)
        assert layer.params["rolling_mean"][ch] == pytest.approx(0.99 * p["rolling_mean"][ch] + 0.01 * mean)
        assert layer.params["rolling_variance"][ch] == pytest.approx(
            0.99 * p["rolling_variance"][ch] + 0.01 * var * n / (n - 1))


def test_batchnorm_inference_rule(tmp_path):
    """Inference: scale * (x - rolling_mean) / (sqrt(rolling_variance) + 1e-6) + bias, and the
    rolling statistics do not move."""
    layer = _bn_layer(tmp_path, (3, 2, 2))
    p = {k: v.copy() for k, v in layer.params.items()}
    x = np.random.default_rng(6).standard_normal((2, 3, 2, 2))
    y = layer.forward(NumpyBackend(), x, False)
    view = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
    want = view(p["scales"]) * (x - view(p["rolling_mean"])) / (np.sqrt(view(p["rolling_variance"]))
                                                             + 1e-6) + view(p["biases"])
    np.testing.assert_allclose(y, want, rtol=1e-12)
    for k in ("rolling_mean", "rolling_variance"):
        np.testing.assert_array_equal(layer.params[k], p[k])


def test_batchnorm_inside_conv_follows_the_same_rules(tmp_path):
    """A convolutional layer with batch_normalize=1: act(BN(W*x)) with no bias before BN, in
    training (batch statistics) and at inference (rolling statistics)."""
    layer = as_float64(build_layer(tmp_path, "[convolutional]\nbatch_normalize=1\nfilters=3\nsize=3\n"
                                   "pad=1\nactivation=leaky", (2, 4, 4)), np.random.default_rng(8))
    layer.params["rolling_variance"] = np.array([0.7, 1.2, 0.9])
    p = {k: v.copy() for k, v in layer.params.items()}
    x = np.random.default_rng(9).standard_normal((3, 2, 4, 4))
    z = conv_reference(x, p["weights"], 1, 1, 1)
    view = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
    leaky = lambda v: np.where(v > 0, v, 0.1 * v)  # noqa: E731

    y = layer.forward(NumpyBackend(), x, True)
    mean, var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    want = leaky(view(p["scales"]) * (z - view(mean)) / np.sqrt(view(var) + 1e-5) + view(p["biases"]))
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-12)
    count = z.size // 3
    np.testing.assert_allclose(layer.params["rolling_variance"],
                               0.99 * p["rolling_variance"] + 0.01 * var * count / (count - 1))

    rm, rv = layer.params["rolling_mean"].copy(), layer.params["rolling_variance"].copy()
    y = layer.forward(NumpyBackend(), x, False)
    want = leaky(view(p["scales"]) * (z - view(rm)) / (np.sqrt(view(rv)) + 1e-6) + view(p["biases"]))
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-12)


def test_spatial_and_per_activation_agree_on_cx1x1(tmp_path):
    """On C x 1 x 1 outputs SPATIAL and PER_ACTIVATION batch norm are the same thing: forward in
    training, backward (delta, scale and bias updates), rolling statistics, inference."""
    spatial = _bn_layer(tmp_path, (5, 1, 1))
    per_act = _bn_layer(tmp_path, (5, 1, 1), "per_activation=1")
    assert per_act.per_activation and not spatial.per_activation
    per_act.params = {k: v.copy() for k, v in spatial.params.items()}
    x = np.random.default_rng(10).standard_normal((6, 5, 1, 1))
    delta = np.random.default_rng(11).standard_normal((6, 5, 1, 1))
    ops = NumpyBackend()
    outputs = []
    for layer in (spatial, per_act):
        y = layer.forward(ops, x, True)
        dx = layer.backward(ops, delta.copy(), True)
        outputs.append((y, dx, layer.updates["scales"], layer.updates["biases"],
                        layer.params["rolling_mean"], layer.params["rolling_variance"],
                        layer.forward(ops, x, False)))
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_connected_bn_is_per_output_over_the_batch(tmp_path):
    """[connected] batch_normalize=1 normalises each output over the batch (C x 1 x 1)."""
    layer = as_float64(build_layer(tmp_path, "[connected]\noutput=4\nbatch_normalize=1\n"
                                   "activation=linear", (3, 1, 1)), np.random.default_rng(12))
    p = {k: v.copy() for k, v in layer.params.items()}
    x = np.random.default_rng(13).standard_normal((5, 3, 1, 1))
    y = layer.forward(NumpyBackend(), x, True).reshape(5, 4)
    z = x.reshape(5, 3) @ p["weights"].T
    want = p["scales"] * (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) + p["biases"]
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
