"""The loss-scaling operations (engine/backends/operations.py: apply_loss_scale_,
flag_non_finite_, and sgd_update with a loss-scale state) on every backend, against numpy
written from their declarations. Under the `gpu` marker the CUDA backend runs them too."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(13)


def state(ops, scale, overflow=0.0):
    return ops.asarray(np.array([scale, overflow], dtype=np.float32))


@pytest.mark.parametrize("scale", [2.0 ** 16, 8.0, 0.375])
def test_apply_loss_scale(ops, rng, scale):
    delta = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    s = state(ops, scale)
    x = ops.asarray(delta.copy())
    assert ops.apply_loss_scale_(x, s) is x
    # one float32 multiplication per element: exact for a power of two
    np.testing.assert_array_equal(ops.to_host(x), delta * np.float32(scale))
    np.testing.assert_array_equal(ops.to_host(s), [scale, 0.0])  # the state is only read


@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_flag_non_finite(ops, rng, bad):
    values = rng.standard_normal((7, 3, 3, 3)).astype(np.float32) * 1e30
    if bad is not None:
        values[5, 1, 2, 0] = bad
    s = state(ops, 4.0)
    assert ops.flag_non_finite_(s, ops.asarray(values)) is s
    np.testing.assert_array_equal(ops.to_host(s), [4.0, 0.0 if bad is None else 1.0])
    # the flag only ever gets set: a finite array after a bad one leaves it set
    ops.flag_non_finite_(s, ops.asarray(np.ones(4, np.float32)))
    np.testing.assert_array_equal(ops.to_host(s), [4.0, 0.0 if bad is None else 1.0])


@pytest.mark.parametrize("scale, decay", [(2.0 ** 10, 0.0), (2.0 ** 10, 0.0005), (3.0, 0.0005)])
def test_sgd_update_with_loss_scale(ops, rng, scale, decay):
    """gradient / S into Darknet's step: for S a power of two, bit for bit the unscaled step of
    the same backend on the unscaled gradient; for any S, that step to float32 rounding."""
    param, gradient, velocity = (rng.standard_normal((7, 3, 3, 3)).astype(np.float32)
                                 for _ in range(3))
    scaled = (gradient.astype(np.float64) * scale).astype(np.float32)
    p, g, v = (ops.asarray(a.copy()) for a in (param, scaled, velocity))
    ops.sgd_update(p, g, v, 0.1, 0.9, decay, 128, loss_scale=state(ops, scale))
    p0, g0, v0 = (ops.asarray(a.copy()) for a in (param, gradient, velocity))
    ops.sgd_update(p0, g0, v0, 0.1, 0.9, decay, 128)
    assert not ops.to_host(g).any()  # consumed
    unscaled = scaled.astype(np.float64) / scale
    expected_v = 0.9 * velocity.astype(np.float64) + unscaled - decay * 128 * param
    np.testing.assert_allclose(ops.to_host(v), expected_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.to_host(p), param + 0.1 / 128 * expected_v, rtol=1e-5,
                               atol=1e-6)
    if scale == 2.0 ** 10:
        np.testing.assert_array_equal(ops.to_host(p), ops.to_host(p0))
        np.testing.assert_array_equal(ops.to_host(v), ops.to_host(v0))


def test_sgd_update_skipped_on_overflow(ops, rng):
    """With the overflow flag set the step is skipped: param and velocity unchanged (bit for
    bit, NaN and infinite gradients included), the gradient zeroed."""
    param, gradient, velocity = (rng.standard_normal((5, 4)).astype(np.float32)
                                 for _ in range(3))
    gradient[0, 0], gradient[1, 1] = np.inf, np.nan
    p, g, v = (ops.asarray(a.copy()) for a in (param, gradient, velocity))
    s = state(ops, 2.0 ** 16, 1.0)
    ops.sgd_update(p, g, v, 0.1, 0.9, 0.0005, 64, loss_scale=s)
    np.testing.assert_array_equal(ops.to_host(p), param)
    np.testing.assert_array_equal(ops.to_host(v), velocity)
    assert not ops.to_host(g).any()
    np.testing.assert_array_equal(ops.to_host(s), [2.0 ** 16, 1.0])


def test_one_flag_over_every_gradient_then_all_or_none_step(ops, rng):
    """What Network.update issues: every gradient checked into one flag, then each step reads
    it, so one bad tensor skips the others' steps too."""
    params = [rng.standard_normal(n).astype(np.float32) for n in (3, 8, 5)]
    grads = [rng.standard_normal(n).astype(np.float32) for n in (3, 8, 5)]
    grads[2][4] = np.inf
    s = state(ops, 2.0)
    arrays = [(ops.asarray(p.copy()), ops.asarray(g.copy()), ops.zeros(p.shape))
              for p, g in zip(params, grads)]
    for _, g, _ in arrays:
        ops.flag_non_finite_(s, g)
    for p, g, v in arrays:
        ops.sgd_update(p, g, v, 0.5, 0.9, 0.0, 1, loss_scale=s)
    for (p, _, _), original in zip(arrays, params):
        np.testing.assert_array_equal(ops.to_host(p), original)
