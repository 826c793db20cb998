"""Darknet's activations (src/activations.h): the function and its gradient, on numpy arrays.

Gradients are written in terms of the activation's *output*, as Darknet computes them, so a layer
needs to keep only its output for the backward pass. Each formula below is Darknet's; where
Darknet's arithmetic overflows (tanh as (e^2x-1)/(e^2x+1)) we use the equivalent stable form.

AlexeyAB's fork adds mish, swish, hard_mish, gelu (their gradients need the activation's *input*:
INPUT_GRADIENT, `gradient_from_input`), relu6 and revleaky, and three activations that act across
the channels of each position (CHANNEL_NAMES: normalize_channels and its softmax variants), which
layers apply through the backend's `normalize_channels_` rather than elementwise.
Where AlexeyAB's code departs from its own formula we follow the formula and say so:
- relu6: AlexeyAB's CPU `activate()` has no case for it and returns 0; its GPU kernel computes
  min(max(x, 0), 6), which is what we compute.
- revleaky: forward is leaky on both of AlexeyAB's paths; its CPU gradient is leaky's (ours), its
  GPU kernel divides by leaky's gradient instead.
- gelu: AlexeyAB's backward evaluates gelu's derivative at the *output*; ours is the derivative
  at the input (the exact gradient, as finite differences check).
"""

import numpy as np

from .config import shorten
from .constants import (GELU_CUBIC, GELU_LINEAR, LEAKY_SLOPE, LHTAN_SLOPE, MISH_THRESHOLD,
                        NORMALIZE_CHANNELS_EPSILON, PLSE_OUTER_SLOPE, PLSE_SLOPE, RAMP_SLOPE,
                        RELIE_SLOPE, SELU_ALPHA, SELU_LAMBDA)
from .errors import ConfigError

NAMES = ("logistic", "loggy", "relu", "elu", "selu", "relie", "ramp", "linear", "tanh", "plse",
         "leaky", "stair", "hardtan", "lhtan",
         "mish", "swish", "hard_mish", "relu6", "gelu", "revleaky")  # the last six: AlexeyAB's

# Gradients computed from the activation's input (the layer keeps it while training).
INPUT_GRADIENT = ("mish", "swish", "hard_mish", "gelu")
# AlexeyAB's activations across the channels of each position (NORMALIZE_CHANNELS_EPSILON in
# the sum). The slopes and thresholds of every activation are engine/constants.py's.
CHANNEL_NAMES = ("normalize_channels", "normalize_channels_softmax",
                 "normalize_channels_softmax_maxval")


def check_name(name, where):
    """Darknet turns an unknown name into relu with a warning; we refuse it with a clear error."""
    if name not in NAMES and name not in CHANNEL_NAMES:
        raise ConfigError(f"{where} unknown activation '{shorten(name)}'; expected one of "
                          f"{', '.join(NAMES + CHANNEL_NAMES)}")
    return name


def _softplus(x):
    """AlexeyAB's softplus_activate(x, MISH_THRESHOLD)."""
    f = x.dtype.type
    with np.errstate(over="ignore"):
        middle = np.log1p(np.exp(np.minimum(x, f(MISH_THRESHOLD))))
    return np.where(x > MISH_THRESHOLD, x, np.where(x < -MISH_THRESHOLD, np.exp(x), middle))


def _gelu_inner(x):
    f = x.dtype.type
    return f(GELU_LINEAR) * x + f(GELU_CUBIC) * x * x * x


def _logistic(x):
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x gives 0, the limit
        return 1.0 / (1.0 + np.exp(-x))


def activate_(x, name):
    """x = act(x) in place; returns x. Leaky (the common case) needs no full-size temporary."""
    if name == "leaky":
        return _leaky(x, out=x)
    if name != "linear":
        x[...] = activate(x, name)
    return x


def activate_into(x, out, name):
    """out = act(x) (out may be a strided view, x another layout): the activation and a copy in
    one pass. Leaky needs only a temporary of x's size."""
    if name == "leaky":
        _leaky(x, out=out)
    elif name == "linear":
        np.copyto(out, x)
    else:
        out[...] = activate(x, name)
    return out


def _leaky(x, out=None):
    return np.maximum(x, x * x.dtype.type(LEAKY_SLOPE), out=out)  # x > 0 ? x : slope*x, one pass


def activate(x, name):
    """Return act(x) as a new array of x's dtype."""
    f = x.dtype.type
    if name == "linear":
        return x.copy()
    if name == "leaky":
        return _leaky(x)
    if name == "relu":
        return x * (x > 0)
    if name == "logistic":
        return _logistic(x)
    if name == "loggy":
        return f(2) * _logistic(x) - f(1)
    if name == "tanh":
        return np.tanh(x)
    if name == "elu":
        return np.where(x >= 0, x, np.expm1(np.minimum(x, 0)))
    if name == "selu":
        return np.where(x >= 0, f(SELU_LAMBDA) * x,
                        f(SELU_LAMBDA * SELU_ALPHA) * np.expm1(np.minimum(x, 0)))
    if name == "relie":
        return np.where(x > 0, x, x * f(RELIE_SLOPE))
    if name == "ramp":
        return x * (x > 0) + f(RAMP_SLOPE) * x
    if name == "plse":
        return np.where(x < -4, f(PLSE_OUTER_SLOPE) * (x + 4),
                        np.where(x > 4, f(PLSE_OUTER_SLOPE) * (x - 4) + 1,
                                 f(PLSE_SLOPE) * x + f(0.5))).astype(x.dtype)
    if name == "stair":
        n = np.floor(x)
        odd = np.mod(n, 2) != 0
        return np.where(odd, (x - n) + np.floor(x / 2), np.floor(x / 2)).astype(x.dtype)
    if name == "hardtan":
        return np.clip(x, -1, 1)
    if name == "lhtan":
        return np.where(x < 0, f(LHTAN_SLOPE) * x,
                        np.where(x > 1, f(LHTAN_SLOPE) * (x - 1) + 1, x)).astype(x.dtype)
    if name == "mish":
        return (x * np.tanh(_softplus(x))).astype(x.dtype)
    if name == "swish":
        return x * _logistic(x)
    if name == "hard_mish":
        return np.where(x > 0, x, np.where(x > -2, x * x / 2 + x, 0)).astype(x.dtype)
    if name == "relu6":
        return np.clip(x, 0, 6)
    if name == "gelu":
        return (f(0.5) * x * (1 + np.tanh(_gelu_inner(x)))).astype(x.dtype)
    if name == "revleaky":
        return _leaky(x)
    raise ValueError(f"unknown activation {name}")


def gradient(y, name):
    """d act / d x, expressed through the output y = act(x), as Darknet does."""
    f = y.dtype.type
    if name == "leaky":  # (y > 0 ? 1 : slope) as (1 - slope) * (y > 0) + slope: where() is slow
        factor = (y > 0).astype(y.dtype)
        factor *= f(1 - LEAKY_SLOPE)
        factor += f(LEAKY_SLOPE)
        return factor
    one = np.ones_like(y)
    if name == "linear":
        return one
    if name == "relu":
        return (y > 0).astype(y.dtype)
    if name == "logistic":
        return (1 - y) * y
    if name == "loggy":
        s = (y + 1) / 2
        return 2 * (1 - s) * s
    if name == "tanh":
        return 1 - y * y
    if name == "elu":
        return np.where(y >= 0, one, y + 1)
    if name == "selu":
        return np.where(y >= 0, f(SELU_LAMBDA), y + f(SELU_LAMBDA * SELU_ALPHA))
    if name == "relie":
        return np.where(y > 0, one, f(RELIE_SLOPE))
    if name == "ramp":
        return (y > 0).astype(y.dtype) + f(RAMP_SLOPE)
    if name == "plse":
        return np.where((y < 0) | (y > 1), f(PLSE_OUTER_SLOPE), f(PLSE_SLOPE))
    if name == "stair":
        # On the even steps the output is a constant integer; on the odd ones it has slope 1.
        return (np.floor(y) != y).astype(y.dtype)
    if name == "hardtan":
        return ((y > -1) & (y < 1)).astype(y.dtype)
    if name == "lhtan":
        return np.where((y > 0) & (y < 1), one, f(LHTAN_SLOPE))
    if name == "relu6":
        return ((y > 0) & (y < 6)).astype(y.dtype)
    if name == "revleaky":
        return np.where(y > 0, one, f(LEAKY_SLOPE))
    raise ValueError(f"unknown activation {name}")


def gradient_from_input(x, name):
    """d act / d x at the input x, for the INPUT_GRADIENT activations (AlexeyAB's formulas)."""
    f = x.dtype.type
    if name == "mish":
        softplus = _softplus(x)
        tanh_sp = np.tanh(softplus)
        grad_sp = 1 - np.exp(-softplus)
        return (x * (1 - tanh_sp * tanh_sp) * grad_sp + tanh_sp).astype(x.dtype)
    if name == "swish":
        sigmoid = _logistic(x)
        y = x * sigmoid
        return y + sigmoid * (1 - y)
    if name == "hard_mish":
        return np.where(x > 0, f(1), np.where(x > -2, x + 1, f(0))).astype(x.dtype)
    if name == "gelu":
        inner = _gelu_inner(x)
        tanh_inner = np.tanh(inner)
        d_inner = f(GELU_LINEAR) + f(3 * GELU_CUBIC) * x * x
        return (f(0.5) * (1 + tanh_inner) + f(0.5) * x * (1 - tanh_inner * tanh_inner)
                * d_inner).astype(x.dtype)
    raise ValueError(f"activation {name} has no input gradient")


def normalize_channels(x, name):
    """AlexeyAB's activate_array_normalize_channels(_softmax): x (B, C, H, W), across C at each
    position. normalize_channels: positive values over (eps + their sum), others 0; _softmax:
    exp(x) / (eps + sum exp(x)); _softmax_maxval: the same with the channel maximum subtracted
    (eps: NORMALIZE_CHANNELS_EPSILON)."""
    f = x.dtype.type
    eps = f(NORMALIZE_CHANNELS_EPSILON)
    if name == "normalize_channels":
        positive = np.where(x > 0, x, f(0))
        return (positive / (eps + positive.sum(axis=1, keepdims=True))).astype(x.dtype)
    shift = x.max(axis=1, keepdims=True) if name == "normalize_channels_softmax_maxval" else f(0)
    e = np.exp(x - shift)
    return (e / (eps + e.sum(axis=1, keepdims=True))).astype(x.dtype)


def normalize_channels_backward(x, delta, name):
    """The exact gradient of normalize_channels at input x applied to delta (AlexeyAB's own
    backward is an approximation: delta * sum(out * delta))."""
    y = normalize_channels(x, name)
    inner = (y * delta).sum(axis=1, keepdims=True)
    if name == "normalize_channels":
        total = NORMALIZE_CHANNELS_EPSILON + np.where(x > 0, x, 0).sum(axis=1, keepdims=True)
        return np.where(x > 0, (delta - inner) / total, 0).astype(delta.dtype)
    # softmax with eps: y_k = e_k / (eps + S); dy_k/dx_j = y_k (kronecker_kj - y_j)
    dx = y * (delta - inner)
    if name == "normalize_channels_softmax_maxval":
        # the subtracted maximum m moves with its channel: dy_k/dm = -y_k * eps / (eps + S)
        shifted_sum = np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)
        ratio = NORMALIZE_CHANNELS_EPSILON / (NORMALIZE_CHANNELS_EPSILON + shifted_sum)
        winner = x.argmax(axis=1)[:, None]
        np.put_along_axis(dx, winner, np.take_along_axis(dx, winner, axis=1) - inner * ratio,
                          axis=1)
    return dx.astype(delta.dtype)
