"""engine/activations.py: every Darknet activation and its gradient.

References: scalar re-implementations of Darknet's src/activations.h written here in plain
Python, float64 central finite differences, and real Darknet's outputs (golden G2d_activations).
"""

import math
import os

import numpy as np
import pytest

from engine import activations
from engine.errors import ConfigError

from conftest import GOLDEN


# ---- Darknet's formulas, one scalar at a time (src/activations.h) --------------------------------
def _stair(x):
    n = math.floor(x)
    if n % 2 == 0:
        return math.floor(x / 2.0)
    return (x - n) + math.floor(x / 2.0)


def _tanh(x):
    if x > 20:
        return 1.0
    return (math.exp(2 * x) - 1) / (math.exp(2 * x) + 1)


DARKNET = {
    "linear": lambda x: x,
    "logistic": lambda x: 1.0 / (1.0 + math.exp(-x)),
    "loggy": lambda x: 2.0 / (1.0 + math.exp(-x)) - 1,
    "relu": lambda x: x * (x > 0),
    "elu": lambda x: (x >= 0) * x + (x < 0) * (math.exp(x) - 1),
    "selu": lambda x: (x >= 0) * 1.0507 * x + (x < 0) * 1.0507 * 1.6732 * (math.exp(x) - 1),
    "relie": lambda x: x if x > 0 else 0.01 * x,
    "ramp": lambda x: x * (x > 0) + 0.1 * x,
    "leaky": lambda x: x if x > 0 else 0.1 * x,
    "tanh": _tanh,
    "plse": lambda x: 0.01 * (x + 4) if x < -4 else (0.01 * (x - 4) + 1 if x > 4 else 0.125 * x + 0.5),
    "lhtan": lambda x: 0.001 * x if x < 0 else (0.001 * (x - 1) + 1 if x > 1 else x),
    "hardtan": lambda x: -1.0 if x < -1 else (1.0 if x > 1 else x),
    "stair": _stair,
}

# Points where the function (or its derivative) is not smooth.
KINKS = {"relu": [0], "elu": [0], "selu": [0], "relie": [0], "ramp": [0], "leaky": [0],
         "plse": [-4, 4], "lhtan": [0, 1], "hardtan": [-1, 1], "stair": list(range(-10, 11))}


# AlexeyAB's additions (its src/activations.h and activations.c), one scalar at a time.
def _softplus(x, threshold=20.0):
    if x > threshold:
        return x
    if x < -threshold:
        return math.exp(x)
    return math.log(math.exp(x) + 1)


ALEXEYAB = {
    "mish": lambda x: x * math.tanh(_softplus(x)),
    "swish": lambda x: x / (1.0 + math.exp(-x)),
    "hard_mish": lambda x: x if x > 0 else (x * x / 2 + x if x > -2 else 0.0),
    "relu6": lambda x: min(max(x, 0.0), 6.0),
    "gelu": lambda x: 0.5 * x * (1 + math.tanh(0.797885 * x + 0.035677 * x ** 3)),
    "revleaky": lambda x: x if x > 0 else 0.1 * x,
}
ALEXEYAB_KINKS = {"hard_mish": [0, -2], "relu6": [0, 6], "revleaky": [0]}


def test_every_darknet_activation_is_known():
    """The engine implements the 14 activations pjreddie's Darknet parses and AlexeyAB's six
    elementwise additions (its channel-wise ones are CHANNEL_NAMES)."""
    assert set(activations.NAMES) == set(DARKNET) | set(ALEXEYAB)
    assert activations.NAMES[:14] == tuple(activations.NAMES[:14])  # kernel ids stay put


@pytest.mark.parametrize("name", sorted(ALEXEYAB))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alexeyab_activation_matches_its_formula(name, dtype):
    """mish (with softplus's threshold 20: x = 25 takes the `x` branch, -25 the exp branch),
    swish, hard_mish, relu6, gelu, revleaky against AlexeyAB's scalar formulas."""
    x = np.concatenate([_points(), [-25.0, -20.5, 20.5, 25.0, 5.9, 6.0, 6.1, -2.0, -1.99]])
    x = x.astype(dtype)
    got = activations.activate(x.copy(), name)
    assert got.dtype == dtype and got.shape == x.shape
    want = np.array([ALEXEYAB[name](float(v)) for v in x])
    tol = 1e-12 if dtype == np.float64 else 3e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(ALEXEYAB))
def test_alexeyab_gradient_matches_finite_differences(name):
    """The gradients (from the input for mish, swish, hard_mish, gelu; from the output for relu6
    and revleaky) equal float64 central differences away from kinks."""
    x = np.concatenate([_points(), [-25.0, -19.0, 19.0, 25.0]])
    kinks = np.array(ALEXEYAB_KINKS.get(name, [1e9]), dtype=np.float64)
    x = x[np.abs(x[:, None] - kinks[None]).min(axis=1) > 1e-2]
    eps = 1e-6
    numeric = (activations.activate(x + eps, name) - activations.activate(x - eps, name)) / (2 * eps)
    if name in activations.INPUT_GRADIENT:
        analytic = activations.gradient_from_input(x.copy(), name)
    else:
        analytic = activations.gradient(activations.activate(x.copy(), name), name)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def _normalize_channels_reference(x, name):
    """AlexeyAB's activate_array_normalize_channels(_softmax), loop by loop (float64)."""
    b, c, h, w = x.shape
    y = np.zeros_like(x)
    for n in range(b):
        for j in range(h):
            for i in range(w):
                values = [float(x[n, k, j, i]) for k in range(c)]
                if name == "normalize_channels":
                    total = 1e-4 + sum(v for v in values if v > 0)
                    out = [v / total if v > 0 else 0.0 for v in values]
                else:
                    shift = max(values) if name.endswith("maxval") else 0.0
                    total = 1e-4 + sum(math.exp(v - shift) for v in values)
                    out = [math.exp(v - shift) / total for v in values]
                y[n, :, j, i] = out
    return y


@pytest.mark.parametrize("name", activations.CHANNEL_NAMES)
def test_normalize_channels_forward_and_gradient(name):
    """normalize_channels and its softmax variants act across channels at each position; their
    backward is the exact gradient (float64 central differences of a random projection)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 3, 4)) * 2
    np.testing.assert_allclose(activations.normalize_channels(x, name),
                               _normalize_channels_reference(x, name), rtol=1e-12, atol=1e-14)
    r = rng.standard_normal(x.shape)
    analytic = activations.normalize_channels_backward(x, r.copy(), name)
    eps = 1e-6
    for index in rng.choice(x.size, 25, replace=False):
        plus, minus = x.copy(), x.copy()
        plus.flat[index] += eps
        minus.flat[index] -= eps
        numeric = ((activations.normalize_channels(plus, name) -
                    activations.normalize_channels(minus, name)) * r).sum() / (2 * eps)
        assert abs(analytic.flat[index] - numeric) <= 1e-6 * max(1, abs(numeric)), index


def _points():
    rng = np.random.default_rng(0)
    special = [-8.5, -4.5, -4.0, -3.5, -1.5, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 1.5, 2.0,
               2.5, 3.0, 3.5, 4.0, 4.5, 8.5]
    return np.concatenate([special, rng.uniform(-9, 9, 200)])


@pytest.mark.parametrize("name", sorted(DARKNET))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activate_matches_darknet_formula(name, dtype):
    """activate(x) equals Darknet's scalar formula at special points and random ones."""
    x = _points().astype(dtype)
    got = activations.activate(x.copy(), name)
    assert got.dtype == dtype and got.shape == x.shape
    want = np.array([DARKNET[name](float(v)) for v in x])
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(DARKNET))
def test_gradient_matches_finite_differences(name):
    """gradient(act(x)) equals the float64 central difference of act at x, away from kinks."""
    x = _points()
    kinks = np.array(KINKS.get(name, [1e9]), dtype=np.float64)
    x = x[np.abs(x[:, None] - kinks[None]).min(axis=1) > 1e-2]
    eps = 1e-6
    numeric = (activations.activate(x + eps, name) - activations.activate(x - eps, name)) / (2 * eps)
    analytic = activations.gradient(activations.activate(x.copy(), name), name)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(DARKNET))
def test_gradient_matches_darknet_gradient_rule(name):
    """Darknet computes gradients from the *output*; at kinks the rule picks a fixed side
    (e.g. relu'(0) = 0, leaky'(0) = 0.1). Checked against Darknet's own gradient formulas."""
    rules = {
        "linear": lambda y: 1.0,
        "logistic": lambda y: (1 - y) * y,
        "loggy": lambda y: 2 * (1 - (y + 1) / 2) * ((y + 1) / 2),
        "relu": lambda y: float(y > 0),
        "elu": lambda y: (y >= 0) + (y < 0) * (y + 1),
        "selu": lambda y: (y >= 0) * 1.0507 + (y < 0) * (y + 1.0507 * 1.6732),
        "relie": lambda y: 1.0 if y > 0 else 0.01,
        "ramp": lambda y: (y > 0) + 0.1,
        "leaky": lambda y: 1.0 if y > 0 else 0.1,
        "tanh": lambda y: 1 - y * y,
        "plse": lambda y: 0.01 if (y < 0 or y > 1) else 0.125,
        "lhtan": lambda y: 1.0 if (0 < y < 1) else 0.001,
        "hardtan": lambda y: 1.0 if (-1 < y < 1) else 0.0,
        "stair": lambda y: 0.0 if math.floor(y) == y else 1.0,
    }
    y = np.array([DARKNET[name](float(v)) for v in _points()])
    got = activations.gradient(y.copy(), name)
    want = np.array([rules[name](float(v)) for v in y])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_unknown_activation_is_a_clear_error():
    """Darknet silently falls back to relu; the engine refuses the name and lists valid ones."""
    with pytest.raises(ConfigError, match="unknown activation 'mysh'.*leaky"):
        activations.check_name("mysh", "x.cfg:3: [convolutional]")


# ---- real Darknet: golden G2d_activations -----------------------------------------------------------
G2D = os.path.join(GOLDEN, "G2d_activations")


def _read_layers_txt(folder):
    rows = []
    with open(os.path.join(folder, "layers.txt")) as handle:
        for line in handle:
            parts = line.split()
            if parts and parts[0].isdigit():
                rows.append(parts)
    return rows


def test_golden_g2d_every_layer_matches_darknet():
    """Every layer of G2d (conv, upsample x4, route, then one [activation] per Darknet activation)
    matches real Darknet's per-layer output to 1e-4 (relative to the layer's scale)."""
    import engine

    net = engine.load(os.path.join(G2D, "g2d_activations.cfg"), os.path.join(G2D, "weights"),
                      quiet=True)
    x = np.fromfile(os.path.join(G2D, "inputs.bin"), dtype="<f4").reshape(2, 16, 8, 8)
    out = net.forward(net.ops.asarray(x), train=False)
    files = sorted(os.listdir(os.path.join(G2D, "layers")))
    assert len(files) == len(net.layers) == 30
    checked = set()
    for name in files:
        index = int(name[1:3])
        want = np.fromfile(os.path.join(G2D, "layers", name), dtype="<f4").reshape(2, -1)
        got = net.ops.to_host(net.outputs[index]).reshape(2, -1)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{name} ({net.layers[index].activation})")
        checked.add(net.layers[index].activation)
    assert set(DARKNET) <= checked
    final = np.fromfile(os.path.join(G2D, "outputs.bin"), dtype="<f4").reshape(2, -1)
    np.testing.assert_allclose(net.ops.to_host(out).reshape(2, -1), final, atol=1e-4)
