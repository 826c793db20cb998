"""engine/layers/*: every layer's backward pass on the numpy backend against float64 central
finite differences of a scalar loss.

Darknet's convention: backward(delta = -dL/dy) returns -dL/dx and *accumulates* -dL/dparam into
layer.updates. Parameters and inputs are float64, so the backend must keep that dtype
(test_ops_keep_float64 checks it op by op). In training mode the batch statistics of batch norm
are recomputed at every perturbed point, so the finite differences treat them as functions of x.
"""

import numpy as np
import pytest

from engine.backends.numpy_backend import NumpyBackend
from engine.backends.views import whole, window
from engine.layers.upsample import downsample_sum, upsample

from helpers import as_float64, build_layer

EPS = 1e-6
SAMPLES = 30  # finite differences per tensor (random entries); keeps the suite fast


def _compare(analytic, numeric, what):
    assert np.abs(numeric).max() > 1e-6, f"{what}: the loss does not depend on these values"
    scale = max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6 * scale, err_msg=what)


def _central_differences(cost, x):
    """d cost / d x for every entry of x, by float64 central differences."""
    numeric = np.zeros(x.size)
    for i in range(x.size):
        plus, minus = x.copy(), x.copy()
        plus.flat[i] += EPS
        minus.flat[i] -= EPS
        numeric[i] = (cost(plus) - cost(minus)) / (2 * EPS)
    return numeric


def _sample(size, rng):
    return rng.choice(size, min(size, SAMPLES), replace=False)


def check_gradients(layer, xs, train=True, reseed=None, params=("weights", "biases", "scales"),
                    delta_dtype=np.float64):
    """Compare layer.backward's input deltas and parameter updates with finite differences of
    L = sum(R * layer.forward(x)) for a fixed random R. `xs` is a list of float64 inputs."""
    ops = NumpyBackend(seed=0)
    rng = np.random.default_rng(11)

    def forward(inputs):
        if reseed is not None:
            ops.seed(reseed)  # dropout: the same mask at every evaluation
        return layer.forward(ops, inputs if layer.multi_input else inputs[0], train)

    y = forward(xs)
    assert y.dtype == np.float64, f"[{layer.type_name}] forward turned float64 into {y.dtype}"
    assert y.shape[1:] == tuple(layer.out_shape)
    r = rng.standard_normal(y.shape)

    def loss(inputs):
        return float((forward(inputs) * r).sum())

    base = loss(xs)  # leaves the layer's caches at xs for the backward pass
    for values in layer.updates.values():
        values[...] = 0
    result = layer.backward(ops, -r.copy(), True)
    deltas = result if layer.multi_input else [result]
    updates = {k: v.copy() for k, v in layer.updates.items()}

    for n, (x, d) in enumerate(zip(xs, deltas)):
        assert d.shape == x.shape and d.dtype == delta_dtype, f"input {n}: {d.shape} {d.dtype}"
        idx = _sample(x.size, rng)
        numeric = []
        for i in idx:
            plus, minus = [v.copy() for v in xs], [v.copy() for v in xs]
            plus[n].flat[i] += EPS
            minus[n].flat[i] -= EPS
            numeric.append((loss(plus) - loss(minus)) / (2 * EPS))
        _compare(-d.ravel()[idx], np.array(numeric), f"[{layer.type_name}] input {n} delta")

    checked = []
    for name in params:
        if name not in layer.updates:
            continue
        p = layer.params[name]
        idx = _sample(p.size, rng)
        numeric = []
        for i in idx:
            old = p.flat[i]
            p.flat[i] = old + EPS
            up = loss(xs)
            p.flat[i] = old - EPS
            down = loss(xs)
            p.flat[i] = old
            numeric.append((up - down) / (2 * EPS))
        _compare(-updates[name].ravel()[idx], np.array(numeric), f"[{layer.type_name}] {name} updates")
        checked.append(name)
    assert np.isfinite(base)
    return checked


def _x(shape, seed=5):
    return np.random.default_rng(seed).standard_normal(shape)


# ---- convolutional ------------------------------------------------------------------------------
CONV_CASES = {
    "3x3 pad=1 logistic": ("filters=4\nsize=3\nstride=1\npad=1\nactivation=logistic", (3, 5, 5)),
    "3x3 pad=1 BN leaky": ("batch_normalize=1\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky",
                          (3, 5, 5)),
    "3x3 stride=2 BN tanh": ("batch_normalize=1\nfilters=3\nsize=3\nstride=2\npad=1\nactivation=tanh",
                            (2, 7, 7)),
    "stride=2 no pad, even input": ("filters=2\nsize=3\nstride=2\nactivation=linear", (2, 8, 6)),
    "explicit padding=2, non-square": ("filters=3\nsize=3\npadding=2\nactivation=linear", (2, 4, 6)),
    "groups=2 BN": ("batch_normalize=1\nfilters=4\nsize=3\npad=1\ngroups=2\nactivation=linear",
                    (4, 5, 5)),
    "groups=2 no BN": ("filters=6\nsize=3\npad=1\ngroups=2\nactivation=logistic", (4, 4, 4)),
    "size=1": ("filters=3\nsize=1\nstride=1\nactivation=linear", (2, 4, 4)),
    "size=1 BN": ("batch_normalize=1\nfilters=3\nsize=1\nactivation=elu", (4, 3, 3)),
    "size=1 stride=2": ("filters=3\nsize=1\nstride=2\nactivation=linear", (2, 5, 5)),
    # training BN with an activation whose gradient needs its input: fused into BN's operations
    "BN mish": ("batch_normalize=1\nfilters=3\nsize=3\npad=1\nactivation=mish", (2, 4, 4)),
    "BN swish odd plane": ("batch_normalize=1\nfilters=3\nsize=3\npad=1\nactivation=swish",
                           (2, 5, 3)),
    "BN hard_mish": ("batch_normalize=1\nfilters=2\nsize=1\nactivation=hard_mish", (3, 3, 3)),
    "BN gelu": ("batch_normalize=1\nfilters=2\nsize=3\npad=1\nactivation=gelu", (2, 3, 3)),
    "swish": ("filters=3\nsize=3\npad=1\nactivation=swish", (2, 4, 4)),
    "BN normalize_channels_softmax": ("batch_normalize=1\nfilters=3\nsize=1\n"
                                      "activation=normalize_channels_softmax", (2, 3, 3)),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_convolutional_gradients(tmp_path, case):
    """Input deltas and weight/bias/scale updates of [convolutional] match finite differences."""
    text, shape = CONV_CASES[case]
    layer = as_float64(build_layer(tmp_path, "[convolutional]\n" + text, shape),
                       np.random.default_rng(2))
    checked = check_gradients(layer, [_x((2,) + shape)])
    expected = ["weights", "biases"] + (["scales"] if layer.batch_normalize else [])
    assert sorted(checked) == sorted(expected)


def test_convolutional_updates_accumulate_and_need_dx_false(tmp_path):
    """Two backward passes accumulate (Darknet's beta=1); need_dx=False returns None but gives
    the same parameter updates."""
    layer = as_float64(build_layer(tmp_path, "[convolutional]\nbatch_normalize=1\nfilters=2\nsize=3\n"
                                   "pad=1\nactivation=leaky", (2, 4, 4)), np.random.default_rng(1))
    ops = NumpyBackend()
    x, delta = _x((2, 2, 4, 4)), _x((2, 2, 4, 4), seed=9)
    layer.forward(ops, x, True)
    layer.backward(ops, delta.copy(), True)
    once = {k: v.copy() for k, v in layer.updates.items()}
    layer.forward(ops, x, True)
    assert layer.backward(ops, delta.copy(), False) is None
    for k, v in layer.updates.items():
        np.testing.assert_allclose(v, 2 * once[k], rtol=1e-12, atol=1e-12, err_msg=k)


# ---- connected ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape, batch", [
    ("output=5\nactivation=logistic", (3, 2, 2), 3),
    ("output=4\nactivation=linear", (7, 1, 1), 2),
    ("output=5\nbatch_normalize=1\nactivation=tanh", (6, 1, 1), 4),
    ("output=3\nbatch_normalize=1\nactivation=leaky", (2, 2, 3), 5),
    ("output=4\nbatch_normalize=1\nactivation=mish", (3, 1, 1), 5),
])
def test_connected_gradients(tmp_path, text, shape, batch):
    """[connected] with and without batch norm: input deltas, weights, biases, scales."""
    layer = as_float64(build_layer(tmp_path, "[connected]\n" + text, shape), np.random.default_rng(3))
    checked = check_gradients(layer, [_x((batch,) + shape)])
    assert "weights" in checked and "biases" in checked
    assert ("scales" in checked) == layer.batch_normalize


# ---- pooling ------------------------------------------------------------------------------------
def _distinct(shape, seed=4):
    """Inputs whose values are all at least 0.1 apart, so the max never changes under EPS."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) * 0.1 - n * 0.05).reshape(shape)


@pytest.mark.parametrize("text, shape", [
    ("size=2\nstride=2", (2, 4, 4)),          # windows tile the input
    ("size=2\nstride=2", (2, 5, 5)),          # odd input: last window half outside
    ("size=2\nstride=1", (2, 4, 5)),          # keeps the size
    ("size=3\nstride=2", (1, 7, 7)),
    ("size=3\nstride=1", (2, 4, 5)),
    ("size=3\nstride=3\npadding=0", (1, 6, 7)),
    ("size=2\nstride=2\npadding=0", (1, 5, 5)),
])
def test_maxpool_gradients(tmp_path, text, shape):
    """[maxpool]: the delta goes to each window's maximum (finite differences on distinct inputs)."""
    layer = build_layer(tmp_path, "[maxpool]\n" + text, shape)
    assert check_gradients(layer, [_distinct((2,) + shape)]) == []


def test_avgpool_gradients(tmp_path):
    layer = build_layer(tmp_path, "[avgpool]", (3, 3, 4))
    check_gradients(layer, [_x((2, 3, 3, 4))])


# ---- dropout, activation, resampling ---------------------------------------------------------------
def test_dropout_gradients_with_fixed_mask(tmp_path):
    """[dropout] in training, with the same mask at every evaluation: delta = mask * delta."""
    layer = build_layer(tmp_path, "[dropout]\nprobability=0.3", (4, 3, 3))
    check_gradients(layer, [_x((3, 4, 3, 3))], reseed=123)
    ops = NumpyBackend(seed=123)
    y = layer.forward(ops, np.ones((3, 4, 3, 3)), True)
    kept = y != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(y[kept], 1 / 0.7)


def test_dropout_is_identity_at_inference(tmp_path):
    layer = build_layer(tmp_path, "[dropout]\nprobability=0.5", (4, 2, 2))
    x = _x((2, 4, 2, 2))
    np.testing.assert_array_equal(layer.forward(NumpyBackend(), x, False), x)


@pytest.mark.parametrize("activation", ["logistic", "loggy", "relu", "elu", "selu", "relie", "ramp",
                                        "linear", "tanh", "plse", "leaky", "stair", "hardtan", "lhtan",
                                        "mish", "swish", "hard_mish", "relu6", "gelu", "revleaky",
                                        "normalize_channels", "normalize_channels_softmax",
                                        "normalize_channels_softmax_maxval"])
def test_activation_layer_gradients(tmp_path, activation):
    """[activation]: delta * act'(x), for every activation (inputs spread over the kinks' sides)."""
    layer = build_layer(tmp_path, f"[activation]\nactivation={activation}", (3, 3, 3))
    check_gradients(layer, [3 * _x((2, 3, 3, 3))])


@pytest.mark.parametrize("text, shape", [
    ("stride=2", (2, 3, 3)),
    ("stride=3\nscale=0.5", (1, 2, 3)),
    ("stride=-2", (2, 4, 6)),                 # Darknet's reverse mode: sum-pooling
    ("stride=-2\nscale=0.25", (1, 4, 4)),
])
def test_upsample_gradients(tmp_path, text, shape):
    layer = build_layer(tmp_path, "[upsample]\n" + text, shape)
    check_gradients(layer, [_x((2,) + shape)])


def test_upsample_forward_is_nearest_neighbour(tmp_path):
    """Upsample copies each cell into a stride x stride block times scale; stride<0 sums blocks."""
    up = build_layer(tmp_path, "[upsample]\nstride=2\nscale=3", (1, 2, 2))
    x = _x((1, 1, 2, 2))
    y = up.forward(NumpyBackend(), x, False)
    for i in range(4):
        for j in range(4):
            assert y[0, 0, i, j] == pytest.approx(3 * x[0, 0, i // 2, j // 2])
    down = build_layer(tmp_path, "[upsample]\nstride=-2", (1, 4, 4))
    x = _x((1, 1, 4, 4))
    y = down.forward(NumpyBackend(), x, False)
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 1, 0] == pytest.approx(x[0, 0, 2:4, 0:2].sum())


# ---- route ---------------------------------------------------------------------------------------
def test_route_several_inputs(tmp_path):
    """[route] layers=0,-1 concatenates channels in the listed order; deltas split back."""
    shapes = [(2, 3, 3), (5, 2, 2), (4, 3, 3)]
    layer = build_layer(tmp_path, "[route]\nlayers=0,-1", shapes[-1], layer_shapes=shapes)
    assert layer.input_indices == [0, 2] and layer.out_shape == (6, 3, 3)
    a, b = _x((2, 2, 3, 3)), _x((2, 4, 3, 3), seed=6)
    y = layer.forward(NumpyBackend(), [a, b], False)
    np.testing.assert_array_equal(y[:, :2], a)
    np.testing.assert_array_equal(y[:, 2:], b)
    check_gradients(layer, [a, b])


def test_route_groups(tmp_path):
    """groups=2 group_id=1 takes the second half of each input's channels; the other half gets
    no delta."""
    shapes = [(2, 3, 3), (4, 3, 3)]
    layer = build_layer(tmp_path, "[route]\nlayers=0,1\ngroups=2\ngroup_id=1", shapes[-1],
                        layer_shapes=shapes)
    assert layer.out_shape == (3, 3, 3)
    a, b = _x((2, 2, 3, 3)), _x((2, 4, 3, 3), seed=6)
    y = layer.forward(NumpyBackend(), [a, b], False)
    np.testing.assert_array_equal(y[:, :1], a[:, 1:])
    np.testing.assert_array_equal(y[:, 1:], b[:, 2:])
    check_gradients(layer, [a, b])


def test_route_single_input(tmp_path):
    shapes = [(3, 2, 2), (1, 1, 1)]
    layer = build_layer(tmp_path, "[route]\nlayers=-2", shapes[-1], layer_shapes=shapes)
    check_gradients(layer, [_x((2, 3, 2, 2))])


# ---- batch norm (standalone) ------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape, batch", [
    ("", (3, 3, 3), 3),                        # SPATIAL: per channel over batch and space
    ("per_activation=1", (2, 2, 3), 4),        # PER_ACTIVATION: per element over the batch
    ("", (4, 1, 1), 5),
])
def test_batchnorm_gradients(tmp_path, text, shape, batch):
    """[batchnorm] in training mode: the finite differences recompute the batch statistics."""
    layer = as_float64(build_layer(tmp_path, "[batchnorm]\n" + text, shape), np.random.default_rng(7))
    assert sorted(check_gradients(layer, [_x((batch,) + shape)])) == ["biases", "scales"]


# ---- losses --------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_softmax_cross_entropy_delta(tmp_path, groups):
    """[softmax] + cross-entropy: the delta handed back is -d(cost)/d(softmax input)."""
    layer = build_layer(tmp_path, f"[softmax]\ngroups={groups}", (6, 1, 1))
    ops = NumpyBackend()
    rng = np.random.default_rng(8)
    z = rng.standard_normal((3, 6, 1, 1))
    truth = np.zeros((3, 6))
    per = 6 // groups
    for b in range(3):
        for g in range(groups):
            truth[b, g * per + rng.integers(per)] = 1

    def cost(values):
        layer.forward(ops, values, True)
        return layer.cost(ops, truth)[0]

    # independent reference: softmax per group in float64, cross-entropy
    e = np.exp(z.reshape(3, groups, per))
    p = (e / e.sum(axis=2, keepdims=True)).reshape(3, 6)
    assert cost(z) == pytest.approx(float(-(truth * np.log(p)).sum()), rel=1e-6)
    np.testing.assert_allclose(layer.output.reshape(3, 6), p, rtol=1e-6)

    layer.forward(ops, z, True)
    _, delta = layer.cost(ops, truth)
    dx = layer.backward(ops, delta, True)
    numeric = _central_differences(cost, z)
    _compare(-np.asarray(dx, dtype=np.float64).ravel(), numeric, "softmax delta")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_cost_sse_delta(tmp_path, scale):
    """[cost] type=sse: cost = sum((truth - x)^2); delta = scale * (truth - x), which is
    -scale/2 * d(cost)/dx (Darknet's l2 rule)."""
    layer = build_layer(tmp_path, f"[cost]\ntype=sse\nscale={scale}", (4, 1, 1))
    ops = NumpyBackend()
    x = _x((3, 4, 1, 1))
    truth = np.random.default_rng(9).standard_normal((3, 4))

    def cost(values):
        layer.forward(ops, values, True)
        return layer.cost(ops, truth)[0]

    assert cost(x) == pytest.approx(float(((truth - x.reshape(3, 4)) ** 2).sum()), rel=1e-6)
    layer.forward(ops, x, True)
    delta = layer.backward(ops, layer.cost(ops, truth)[1], True)
    numeric = _central_differences(cost, x)
    _compare(np.asarray(delta, dtype=np.float64).ravel(), -scale / 2 * numeric, "sse delta")


# ---- dtype ---------------------------------------------------------------------------------------
def test_ops_keep_float64():
    """Every backend op returns float64 for float64 inputs (the gradient checks rely on it)."""
    ops = NumpyBackend()
    x = _x((2, 4, 5, 5))
    w = _x((4, 2, 3, 3))
    v = np.abs(_x(4)) + 0.5
    results = {
        "conv_forward": ops.conv_forward(x, w, 1, 1, 2),
        "conv_backward": ops.conv_backward(x, w, _x((2, 4, 5, 5)), 1, 1, 2, np.zeros_like(w), True),
        "connected_forward": ops.connected_forward(x, _x((3, 100))),
        "connected_backward": ops.connected_backward(x, _x((3, 100)), _x((2, 3, 1, 1)),
                                                     np.zeros((3, 100)), True),
        "batchnorm_forward_train": ops.batchnorm_forward_train(x, v, v, v * 0, v.copy())[0],
        "batchnorm_forward_inference": ops.batchnorm_forward_inference(x, v, v, v * 0, v),
        "maxpool_forward": ops.maxpool_forward(x, 2, 1, 0, 5, 5)[0],
        "maxpool_forward tiled": ops.maxpool_forward(x[:, :, :4, :4], 2, 2, 0, 2, 2)[0],
        "strided_copy_": ops.strided_copy_(x.copy(), whole((2, 4, 5, 5)), x,
                                           window((2, 4, 5, 5), None, None, (4, 5, -1))),
        "upsample": upsample(ops, x, 2, 1.0),
        "softmax": ops.softmax(x.reshape(2, -1), 1, 1.0),
        "activate_": ops.activate_(x.copy(), "logistic"),
        "activation_backward_": ops.activation_backward_(ops.activate_(x.copy(), "leaky"), x.copy(),
                                                         "leaky"),
        "downsample_sum": downsample_sum(ops, x[:, :, :4, :4], 2, 1.0),
        "add": ops.add(x, x[:, :1], 0.5, 2.0),
        "sum_to": ops.sum_to(x, (1, 4, 1, 1), 0.5),
        "dropout_forward": ops.dropout_forward(x, 0.5)[0],
        "add_bias_": ops.add_bias_(x.copy(), v),
    }
    _, cache = ops.batchnorm_forward_train(x, v, v, v * 0, v.copy())
    results["batchnorm_backward"] = ops.batchnorm_backward(x, cache, v, v * 0, v * 0)
    _, argmax = ops.maxpool_forward(x, 2, 1, 0, 5, 5)
    results["maxpool_backward"] = ops.maxpool_backward(x, argmax, x.shape, 2, 1, 0)
    p = ops.softmax(x.reshape(2, -1), 1, 1.0)
    results["softmax_cross_entropy"] = ops.softmax_cross_entropy(p, np.eye(100)[:2])[1]
    results["sse"] = ops.sse(x, x * 0)[1]
    bad = {k: str(v.dtype) for k, v in results.items() if v.dtype != np.float64}
    assert not bad, f"ops that do not keep float64: {bad}"
