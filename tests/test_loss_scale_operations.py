"""The loss-scaling operations (engine/backends/operations.py: apply_loss_scale_,
flag_non_finite_, update_loss_scale_, sgd_update with a loss-scale state, and to_host_async,
which reads the state without waiting) on every backend, against numpy written from their
declarations. Under the `gpu` marker the CUDA backend runs them too."""

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


def update_rule(values, dynamic, growth_interval):
    """update_loss_scale_'s declaration in plain Python floats: (S, overflow, good, skipped)."""
    scale, overflow, good, skipped = values
    if overflow:
        return [scale / 2 if dynamic else scale, 0.0, 0.0, skipped + 1]
    good += 1
    if good >= growth_interval:
        return [scale * 2 if dynamic else scale, 0.0, 0.0, skipped]
    return [scale, 0.0, good, skipped]


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("values, growth_interval", [
    ([2.0 ** 16, 0.0, 0.0, 0.0], 2000),       # a good step counts
    ([2.0 ** 16, 1.0, 5.0, 3.0], 2000),       # an overflow: back off, count, reset
    ([0.375, 0.0, 2.0, 7.0], 3),              # the growth_interval-th good step
    ([2.0 ** -24, 1.0, 0.0, 40.0], 2000),     # below fp16's smallest value, exactly halved
    ([2.0 ** 16, 0.0, 1998.0, 1.0], 2000)])
def test_update_loss_scale(ops, values, growth_interval, dynamic):
    s = ops.asarray(np.array(values, np.float32))
    assert ops.update_loss_scale_(s, dynamic, growth_interval) is s
    np.testing.assert_array_equal(ops.to_host(s), update_rule(values, dynamic, growth_interval))


def test_update_loss_scale_over_iterations(ops):
    """The rule applied step after step on the backend's state, as Network.update issues it
    (the flag set by flag_non_finite_ in some steps): the same states as the Python rule."""
    s = ops.asarray(np.array([8.0, 0.0, 0.0, 0.0], np.float32))
    expected = [8.0, 0.0, 0.0, 0.0]
    bad = ops.asarray(np.array([np.inf], np.float32))
    for step in range(12):
        if step in (2, 3, 9):
            ops.flag_non_finite_(s, bad)
            expected[1] = 1.0
        ops.update_loss_scale_(s, True, 4)
        expected = update_rule(expected, True, 4)
        np.testing.assert_array_equal(ops.to_host(s), expected)
    assert expected == [2.0, 0.0, 2.0, 3.0]  # halved twice, doubled once, halved again


def test_to_host_async(ops, rng):
    """The read holds the values of the work issued before it, not of later work; value()
    returns them (waiting where needed), ready() never waits and is True once value() is
    known; a read's memory, reused by a later read, does not change a value taken before."""
    values = rng.standard_normal((4,)).astype(np.float32)
    s = ops.asarray(values.copy())
    first = ops.to_host_async(s)
    ops.apply_loss_scale_(s, ops.asarray(np.array([2.0, 0, 0, 0], np.float32)))
    second = ops.to_host_async(s)
    np.testing.assert_array_equal(first.value(), values)
    assert first.ready()
    np.testing.assert_array_equal(second.value(), values * 2)
    third = ops.to_host_async(ops.asarray(np.zeros(4, np.float32)))
    np.testing.assert_array_equal(third.value(), np.zeros(4))
    np.testing.assert_array_equal(first.value(), values)  # taken: kept
    assert isinstance(first.value(), np.ndarray) and first.value().dtype == np.float32
