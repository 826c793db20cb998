"""Training batch norm with the activations whose gradient needs their input (mish, swish,
hard_mish, gelu: activations.INPUT_GRADIENT) fused in (layers/base.py's fusable): on the numpy
backend the fused operations give exactly what batch norm with a linear activation followed by
the layer's separate activation pass gave (the path before the fusion, which kept a copy of the
activation's input in `pre_activation`): outputs, deltas, scale and bias updates, rolling
statistics, and a whole training step of a network. Float64 finite differences of the fused
backward: tests/test_layers_gradients.py ("BN mish", "BN swish"...) and test_operations.py's
test_batchnorm_training."""

import sys

import numpy as np
import pytest

from engine import activations
from engine.backends.numpy_backend import NumpyBackend
from engine.layers import base
from engine.network import Network

FUSED = activations.INPUT_GRADIENT  # mish, swish, hard_mish, gelu


def unfused_rule(activation, train, normalized=False):
    """fusable as it was before training batch norm took these activations."""
    return activation not in activations.CHANNEL_NAMES and not (
        train and activation in activations.INPUT_GRADIENT)


def batch_innermost(x):
    """x laid out as a convolution's output on the numpy backend: (C, H, W, B) in memory."""
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def parameters(rng, n):
    return [rng.uniform(0.5, 1.5, n).astype(np.float32),  # scales
            rng.standard_normal(n).astype(np.float32),    # biases
            rng.standard_normal(n).astype(np.float32) * 0.1,  # rolling mean
            rng.uniform(0.5, 1.5, n).astype(np.float32)]  # rolling variance


def fused_step(ops, x, params, delta, activation, per_activation):
    scales, biases, mean, variance = params
    y, cache = ops.batchnorm_forward_train(x, scales, biases, mean, variance,
                                           per_activation=per_activation, activation=activation)
    updates = [np.zeros_like(scales), np.zeros_like(biases)]
    dx = ops.batchnorm_backward(delta.copy(), cache, scales, *updates)
    return y, dx, updates


def unfused_step(ops, x, params, delta, activation, per_activation):
    """Batch norm, then the activation as its own pass (the input kept), and their backward."""
    scales, biases, mean, variance = params
    z, cache = ops.batchnorm_forward_train(x, scales, biases, mean, variance,
                                           per_activation=per_activation)
    kept = ops.copy(z)
    y = ops.activate_(z, activation)
    d = ops.activation_input_backward_(kept, delta.copy(), activation)
    updates = [np.zeros_like(scales), np.zeros_like(biases)]
    dx = ops.batchnorm_backward(d, cache, scales, *updates)
    return y, dx, updates


@pytest.mark.parametrize("activation", FUSED)
@pytest.mark.parametrize("shape, per_activation, layout", [
    ((4, 3, 5, 7), False, "nchw"),            # odd planes
    ((2, 5, 13, 13), False, "batch_innermost"),  # a convolution's output, odd planes
    ((3, 4, 8, 8), False, "batch_innermost"),
    ((6, 7, 1, 1), False, "nchw"),            # a connected layer's output
    ((5, 2, 3, 3), True, "nchw")])            # per-activation statistics
def test_fused_operations_equal_the_unfused_ones(activation, shape, per_activation, layout):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    if layout == "batch_innermost":
        x = batch_innermost(x)
    delta = rng.standard_normal(shape).astype(np.float32)
    n = int(np.prod(shape[1:])) if per_activation else shape[1]
    params = parameters(rng, n)
    fused_params, unfused_params = [p.copy() for p in params], [p.copy() for p in params]
    ops = NumpyBackend()
    y, dx, updates = fused_step(ops, x, fused_params, delta, activation, per_activation)
    y0, dx0, updates0 = unfused_step(ops, x, unfused_params, delta, activation, per_activation)
    np.testing.assert_array_equal(y, y0, "outputs")
    np.testing.assert_array_equal(dx, dx0, "deltas")
    np.testing.assert_array_equal(updates[0], updates0[0], "scale updates")
    np.testing.assert_array_equal(updates[1], updates0[1], "bias updates")
    np.testing.assert_array_equal(fused_params[2], unfused_params[2], "rolling mean")
    np.testing.assert_array_equal(fused_params[3], unfused_params[3], "rolling variance")
    assert not np.array_equal(fused_params[2], params[2])  # the statistics did move
    # against an independent float64 reference of act(BN(x)) and its delta
    x64 = x.astype(np.float64)
    axes = (0,) if per_activation else (0, 2, 3)
    mean, var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    shape_p = (1,) + tuple(shape[1:]) if per_activation else (1, -1, 1, 1)
    normal = (x64 - mean) / np.sqrt(var + 1e-5)
    z = params[0].astype(np.float64).reshape(shape_p) * normal + params[1].reshape(shape_p)
    np.testing.assert_allclose(y, activations.activate(z, activation), rtol=2e-4, atol=2e-5)
    d = delta * activations.gradient_from_input(z, activation)
    np.testing.assert_allclose(updates[1], d.sum(axis=axes).reshape(-1), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(updates[0], (d * normal).sum(axis=axes).reshape(-1), rtol=1e-3,
                               atol=1e-4)


NET = """[net]
batch=4
subdivisions=1
height=13
width=13
channels=3
momentum=0.9
decay=0.0005
learning_rate=0.01

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=mish

[route]
layers=-1
groups=2
group_id=1

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=swish

[route]
layers=-1,-3

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=6
size=1
stride=1
pad=0
activation=hard_mish

[connected]
output=5
batch_normalize=1
activation=mish

[connected]
output=3
activation=gelu

[cost]
type=sse
"""


def train_twice(path, monkeypatch, fused):
    """Two training steps (forward, backward, update) of the network at `path`; returns every
    layer's output, updates before each update, parameters and velocities after."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(base, "fusable", unfused_rule)
        net = Network(str(path), backend=NumpyBackend(seed=1), seed=1, quiet=True)
        rng = np.random.default_rng(5)
        x = rng.random((4, 3, 13, 13), dtype=np.float32)
        truth = rng.random((4, 3), dtype=np.float32)
        record = []
        for _ in range(2):
            record.append(net.train_step(x, truth))
            record += [np.array(out) for out in net.outputs]
            record += [u.copy() for layer in net.layers for u in layer.updates.values()]
            kept = [hasattr(layer, "pre_activation") for layer in net.layers]
            net.update(0.01)
            record += [p.copy() for layer in net.layers for p in layer.params.values()]
            record += [v.copy() for layer in net.layers for v in layer.velocities.values()]
        return record, kept


def test_network_trains_the_same_fused_and_unfused(tmp_path, monkeypatch):
    path = tmp_path / "net.cfg"
    path.write_text(NET)
    fused, kept_fused = train_twice(path, monkeypatch, True)
    unfused, kept_unfused = train_twice(path, monkeypatch, False)
    # the unfused path kept the input of every batch-normalised INPUT_GRADIENT activation
    # (layers 0, 2, 5, 6), the fused one only that of [connected] gelu, which has no batch norm
    assert kept_unfused == [True, False, True, False, False, True, True, True, False]
    assert kept_fused == [False, False, False, False, False, False, False, True, False]
    assert len(fused) == len(unfused)
    for k, (got, want) in enumerate(zip(fused, unfused)):
        np.testing.assert_array_equal(got, want, f"record {k}")


# ---- copies per training step ------------------------------------------------------------------
RESIDUAL_NET = """[net]
batch=2
subdivisions=1
height=8
width=8
channels=3
momentum=0.9
decay=0.0005
learning_rate=0.01

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=mish

[convolutional]
batch_normalize=1
filters=4
size=1
stride=1
pad=0
activation=mish

[shortcut]
from=-2
activation=linear

[route]
layers=-1,-3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=swish

[shortcut]
from=-3
activation=leaky

[route]
layers=-1
groups=2
group_id=0

[connected]
output=3
activation=linear

[cost]
type=sse
"""


def run_step(path, private_deltas=False):
    """One training step and update; with `private_deltas`, every layer's backward gets a copy
    of its delta and hands back copies (nothing can alias). Returns (every value the step
    made, the ops.copy calls layers and the network made)."""
    ops = NumpyBackend(seed=1)
    copies = []
    backend_copy = ops.copy

    def counted_copy(array):
        if not sys._getframe(1).f_globals["__name__"].startswith("engine.backends"):
            copies.append(array.shape)  # a layer's or the network's (not a backend's own)
        return backend_copy(array)
    net = Network(str(path), backend=ops, seed=1, quiet=True)
    ops.copy = counted_copy
    if private_deltas:
        for layer in net.layers:
            def backward(ops, delta, need_dx, _backward=layer.backward, _multi=layer.multi_input):
                result = _backward(ops, backend_copy(delta), need_dx)
                if _multi:
                    return [None if d is None else backend_copy(d) for d in result]
                return None if result is None else backend_copy(result)
            layer.backward = backward
    rng = np.random.default_rng(2)
    cost = net.train_step(rng.random((2, 3, 8, 8), dtype=np.float32),
                          rng.random((2, 3), dtype=np.float32))
    values = [cost] + [np.array(out) for out in net.outputs]
    values += [u.copy() for layer in net.layers for u in layer.updates.values()]
    net.update(0.01)
    values += [p.copy() for layer in net.layers for p in layer.params.values()]
    return values, copies


def test_training_step_copies_only_what_two_owners_need(tmp_path):
    """Each layer owns the delta it is handed: a [shortcut] copies its delta once (its two
    inputs each get their own), a [route] and the network copy none, and batch norm with mish
    or swish keeps no copy of its input in the layer (numpy's own batch norm keeps z; the
    GPU's recomputes it). The values are those of a step where no delta could be shared."""
    path = tmp_path / "net.cfg"
    path.write_text(RESIDUAL_NET)
    values, copies = run_step(path)
    assert copies == [(2, 4, 8, 8), (2, 4, 8, 8)]  # the two shortcuts' second delta
    private, _ = run_step(path, private_deltas=True)
    assert len(values) == len(private)
    for k, (got, want) in enumerate(zip(values, private)):
        np.testing.assert_array_equal(got, want, f"value {k}")
