"""Darknet's activations (src/activations.h): the function and its gradient, on numpy arrays.

Gradients are written in terms of the activation's *output*, as Darknet computes them, so a layer
needs to keep only its output for the backward pass. Each formula below is Darknet's; where
Darknet's arithmetic overflows (tanh as (e^2x-1)/(e^2x+1)) we use the equivalent stable form.
"""

import numpy as np

from .config import shorten
from .errors import ConfigError

NAMES = ("logistic", "loggy", "relu", "elu", "selu", "relie", "ramp", "linear", "tanh", "plse",
         "leaky", "stair", "hardtan", "lhtan")

SELU_LAMBDA = 1.0507
SELU_ALPHA = 1.6732


def check_name(name, where):
    """Darknet turns an unknown name into relu with a warning; we refuse it with a clear error."""
    if name not in NAMES:
        raise ConfigError(f"{where} unknown activation '{shorten(name)}'; expected one of "
                          f"{', '.join(NAMES)}")
    return name


def _logistic(x):
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x gives 0, the limit
        return 1.0 / (1.0 + np.exp(-x))


def activate(x, name):
    """Return act(x) as a new array of x's dtype."""
    f = x.dtype.type
    if name == "linear":
        return x.copy()
    if name == "leaky":
        return np.maximum(x, x * f(0.1))  # the same as x > 0 ? x : .1x, in one pass
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
        return np.where(x > 0, x, x * f(0.01))
    if name == "ramp":
        return x * (x > 0) + f(0.1) * x
    if name == "plse":
        return np.where(x < -4, f(0.01) * (x + 4),
                        np.where(x > 4, f(0.01) * (x - 4) + 1, f(0.125) * x + f(0.5))).astype(x.dtype)
    if name == "stair":
        n = np.floor(x)
        odd = np.mod(n, 2) != 0
        return np.where(odd, (x - n) + np.floor(x / 2), np.floor(x / 2)).astype(x.dtype)
    if name == "hardtan":
        return np.clip(x, -1, 1)
    if name == "lhtan":
        return np.where(x < 0, f(0.001) * x, np.where(x > 1, f(0.001) * (x - 1) + 1, x)).astype(x.dtype)
    raise ValueError(f"unknown activation {name}")


def gradient(y, name):
    """d act / d x, expressed through the output y = act(x), as Darknet does."""
    f = y.dtype.type
    one = np.ones_like(y)
    if name == "linear":
        return one
    if name == "leaky":
        return np.where(y > 0, one, f(0.1))
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
        return np.where(y > 0, one, f(0.01))
    if name == "ramp":
        return (y > 0).astype(y.dtype) + f(0.1)
    if name == "plse":
        return np.where((y < 0) | (y > 1), f(0.01), f(0.125))
    if name == "stair":
        # On the even steps the output is a constant integer; on the odd ones it has slope 1.
        return (np.floor(y) != y).astype(y.dtype)
    if name == "hardtan":
        return ((y > -1) & (y < 1)).astype(y.dtype)
    if name == "lhtan":
        return np.where((y > 0) & (y < 1), one, f(0.001))
    raise ValueError(f"unknown activation {name}")
