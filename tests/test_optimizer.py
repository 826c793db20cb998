"""The optimizer: Layer.update's SGD step (engine/layers/base.py, backend sgd_update), the
subdivision logic of engine/train.py's train_iteration, and every learning-rate policy of
Darknet's get_current_rate (src/network.c), against hand-written formulas."""

import math

import numpy as np
import pytest

from engine.backends.numpy_backend import NumpyBackend
from engine.config import read_cfg
from engine.network import NetOptions, Network
from engine.train import learning_rate, next_learning_rate, train_iteration

from helpers import as_float64, build_layer, write_cfg


# ---- one SGD step --------------------------------------------------------------------------------
def darknet_step(param, updates, lr, momentum, decay, batch):
    """Darknet's update_convolutional_layer for one tensor, element by element."""
    param, updates = param.copy().ravel(), updates.copy().ravel()
    for i in range(param.size):
        updates[i] += -decay * batch * param[i]
        param[i] += lr / batch * updates[i]
        updates[i] *= momentum
    return param, updates


def test_layer_update_is_darknet_sgd(tmp_path):
    """Weights get decay, biases and scales do not; momentum carries over (Darknet keeps it in
    its update buffer, we in the velocities: Darknet's buffer after a step is momentum times our
    velocity); the gradients are consumed; rolling stats are untouched. Two consecutive steps."""
    layer = as_float64(build_layer(tmp_path, "[convolutional]\nbatch_normalize=1\nfilters=3\nsize=3\n"
                                   "pad=1\nactivation=leaky", (2, 4, 4)), np.random.default_rng(0))
    rng = np.random.default_rng(1)
    lr, momentum, decay, batch = 0.05, 0.9, 0.0005, 16
    rolling = {k: layer.params[k].copy() for k in ("rolling_mean", "rolling_variance")}
    darknet_updates = {name: np.zeros(layer.updates[name].size) for name in layer.updates}
    assert layer.velocities == {}  # made at the first update
    for step in range(2):
        want = {}
        for name in ("weights", "biases", "scales"):
            gradient = rng.standard_normal(layer.updates[name].shape)
            layer.updates[name] += gradient
            darknet_updates[name] += gradient.ravel()
            d = decay if name == "weights" else 0.0
            want[name] = darknet_step(layer.params[name], darknet_updates[name], lr, momentum, d,
                                      batch)
            darknet_updates[name] = want[name][1]
        layer.update(NumpyBackend(), lr, momentum, decay, batch)
        for name, (param, updates) in want.items():
            # (the backend rounds lr/batch and decay*batch to float32 scalars: rtol 1e-6)
            np.testing.assert_allclose(layer.params[name].ravel(), param, rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(momentum * layer.velocities[name].ravel(), updates,
                                       rtol=1e-6, err_msg=name)
            assert not layer.updates[name].any(), name
    for k, v in rolling.items():
        np.testing.assert_array_equal(layer.params[k], v)


def test_train_iteration_is_one_hand_computed_darknet_step(tmp_path):
    """A [connected] linear layer + [softmax]: two iterations of train_iteration equal the update
    computed here from the softmax cross-entropy gradient, with momentum and decay."""
    path = write_cfg(tmp_path / "lin.cfg",
                     dict(batch=6, subdivisions=1, height=1, width=1, channels=5, learning_rate=0.3,
                          momentum=0.8, decay=0.01, policy="constant", max_batches=10),
                     "[connected]\noutput=3\nactivation=linear\n\n[softmax]\n")
    net = Network(path, quiet=True)
    fc = net.layers[0]
    fc.params["biases"][:] = np.array([0.1, -0.2, 0.05], dtype=np.float32)
    w = fc.params["weights"].astype(np.float64)
    b = fc.params["biases"].astype(np.float64)
    uw, ub = np.zeros_like(w), np.zeros_like(b)
    rng = np.random.default_rng(2)
    for _ in range(2):
        x = rng.uniform(0, 1, (6, 5)).astype(np.float32)
        truth = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
        z = x.astype(np.float64) @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        delta = truth - p                       # Darknet's delta: the negative gradient
        want_loss = -(truth * np.log(p)).sum() / 6
        uw += delta.T @ x
        ub += delta.sum(0)
        uw += -0.01 * 6 * w
        w = w + 0.3 / 6 * uw
        b = b + 0.3 / 6 * ub
        uw *= 0.8
        ub *= 0.8
        loss = train_iteration(net, x.reshape(6, 5, 1, 1), truth, 0.3)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(fc.params["weights"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fc.params["biases"], b, rtol=1e-5, atol=1e-6)
    assert net.seen == 12


SUBDIV_BODY = """
[convolutional]
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[connected]
output=3
activation=linear

[softmax]
"""


def test_subdivisions_accumulate_before_one_update(tmp_path):
    """batch=8 with subdivisions=2 (two mini-batches of 4, one update) gives the same weights as
    subdivisions=1 (one mini-batch of 8) on a network without BN or dropout."""
    nets = []
    for subdivisions in (1, 2):
        path = write_cfg(tmp_path / f"s{subdivisions}.cfg",
                         dict(batch=8, subdivisions=subdivisions, height=6, width=6, channels=1,
                              learning_rate=0.1, momentum=0.9, decay=0.0005, policy="constant"),
                         SUBDIV_BODY)
        nets.append(Network(path, seed=3, quiet=True))
    assert nets[1].options.mini_batch == 4
    rng = np.random.default_rng(4)
    calls = []
    for net in nets:
        original = net.train_step
        net.train_step = lambda a, t, original=original: (calls.append(a.shape[0]), original(a, t))[1]
    for _ in range(3):
        x = rng.uniform(0, 1, (8, 1, 6, 6)).astype(np.float32)
        truth = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
        losses = []
        for net in nets:
            losses.append(train_iteration(net, x, truth, 0.1))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert calls == [8, 4, 4] * 3
    assert nets[0].seen == nets[1].seen == 24
    for a, b in zip(*(n.layers for n in nets)):
        for name in a.params:
            np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-4, atol=1e-6,
                                       err_msg=f"layer {a.index} {name}")


# ---- learning-rate policies -----------------------------------------------------------------------
def _options(tmp_path, **net):
    values = dict(batch=1, height=1, width=1, channels=1, learning_rate=0.1, max_batches=200)
    values.update(net)
    return NetOptions(read_cfg(write_cfg(tmp_path / "lr.cfg", values, "[connected]\noutput=1"))[0])


ITERATIONS = [0, 1, 2, 9, 10, 11, 49, 50, 99, 100, 150, 200]


def _darknet_rate(policy, b, lr=0.1, **k):
    """get_current_rate from src/network.c, written out."""
    if b < k.get("burn_in", 0):
        return lr * (b / k["burn_in"]) ** k.get("power", 4)
    if policy == "constant":
        return lr
    if policy == "step":
        return lr * k["scale"] ** (b // k["step"])
    if policy == "steps":
        rate = lr
        for step, scale in zip(k["steps"], k["scales"]):
            if step > b:
                return rate
            rate *= scale
        return rate
    if policy == "exp":
        return lr * k["gamma"] ** b
    if policy == "poly":
        return lr * (1 - b / k["max_batches"]) ** k["power"]
    if policy == "sig":
        return lr * (1.0 / (1.0 + math.exp(k["gamma"] * (b - k["step"]))))
    raise AssertionError(policy)


@pytest.mark.parametrize("policy, net, formula", [
    ("constant", {}, {}),
    ("step", {"step": 10, "scale": 0.5}, {"step": 10, "scale": 0.5}),
    ("steps", {"steps": "10,50,100", "scales": ".1,.5,2"},
     {"steps": [10, 50, 100], "scales": [0.1, 0.5, 2.0]}),
    ("exp", {"gamma": 0.97}, {"gamma": 0.97}),
    ("poly", {"power": 2}, {"power": 2, "max_batches": 200}),
    ("poly", {}, {"power": 4, "max_batches": 200}),          # Darknet's default power is 4
    ("sig", {"gamma": 0.1, "step": 50}, {"gamma": 0.1, "step": 50}),
    ("steps", {"steps": "10,50", "scales": ".1,.1", "burn_in": 10, "power": 2},
     {"steps": [10, 50], "scales": [0.1, 0.1], "burn_in": 10, "power": 2}),
    ("poly", {"burn_in": 20, "power": 3}, {"burn_in": 20, "power": 3, "max_batches": 200}),
    ("constant", {"burn_in": 50}, {"burn_in": 50}),
])
def test_learning_rate_policy(tmp_path, policy, net, formula):
    options = _options(tmp_path, policy=policy, **net)
    for b in ITERATIONS:
        assert learning_rate(options, b) == pytest.approx(_darknet_rate(policy, b, **formula),
                                                          rel=1e-9, abs=1e-15), f"batch {b}"


def test_learning_rate_hand_values(tmp_path):
    """A few values worked out by hand."""
    o = _options(tmp_path, policy="step", step=10, scale=0.5)
    assert learning_rate(o, 25) == pytest.approx(0.025)
    o = _options(tmp_path, policy="steps", steps="10,50", scales=".1,.5")
    assert [learning_rate(o, b) for b in (9, 10, 49, 50)] == pytest.approx([0.1, 0.01, 0.01, 0.005])
    o = _options(tmp_path, policy="poly", power=2)
    assert learning_rate(o, 100) == pytest.approx(0.025)
    o = _options(tmp_path, policy="sig", gamma=1, step=5)
    assert learning_rate(o, 5) == pytest.approx(0.05)
    o = _options(tmp_path, policy="exp", gamma=0.5)
    assert learning_rate(o, 3) == pytest.approx(0.0125)
    o = _options(tmp_path, policy="constant", burn_in=100, power=4)
    assert learning_rate(o, 50) == pytest.approx(0.1 / 16)
    assert learning_rate(o, 0) == 0.0


def test_learning_rate_random_is_seeded_and_bounded(tmp_path):
    """random: lr * U(0,1)^power, reproducible from the rng, always within [0, lr]."""
    o = _options(tmp_path, policy="random", power=2)
    rates = [learning_rate(o, b, np.random.default_rng(7)) for b in range(3)]
    u = np.random.default_rng(7).random()
    assert rates == pytest.approx([0.1 * u ** 2] * 3)
    rng = np.random.default_rng(8)
    many = np.array([learning_rate(o, 5, rng) for _ in range(500)])
    assert (many >= 0).all() and (many <= 0.1).all() and many.std() > 0.01
    # U^2 has mean 1/3
    assert many.mean() == pytest.approx(0.1 / 3, rel=0.15)


def test_first_update_uses_batch_one(tmp_path):
    """As in Darknet, seen already counts the batch being trained when the rate is read: the first
    update of a burn_in schedule uses batch number 1, not 0 (the rate is not zero)."""
    path = write_cfg(tmp_path / "b.cfg",
                     dict(batch=2, height=1, width=1, channels=2, learning_rate=1.0, burn_in=4,
                          power=1, momentum=0, decay=0, max_batches=10),
                     "[connected]\noutput=2\nactivation=linear\n\n[softmax]\n")
    net = Network(path, quiet=True)
    fc = net.layers[0]
    before = fc.params["biases"].astype(np.float64)
    x = np.ones((2, 2, 1, 1), np.float32)
    truth = np.eye(2, dtype=np.float32)[[0, 1]]
    z = x.reshape(2, 2).astype(np.float64) @ fc.params["weights"].T.astype(np.float64) + before
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    rate = 1.0 * (1 / 4) ** 1                  # batch number 1 of a burn_in of 4
    assert next_learning_rate(net) == pytest.approx(rate)
    train_iteration(net, x, truth, next_learning_rate(net))
    assert net.seen == 2 and next_learning_rate(net) == pytest.approx(0.5)
    want = before + rate / 2 * (truth - p).sum(0)
    np.testing.assert_allclose(fc.params["biases"], want, rtol=1e-5)


def test_poly_without_max_batches_is_a_config_error(tmp_path):
    """Darknet divides by max_batches; without it we stop at the cfg, naming the key."""
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="policy=poly needs max_batches"):
        _options(tmp_path, policy="poly", max_batches=0)


def test_sig_far_past_its_step_is_zero_not_an_overflow(tmp_path):
    o = _options(tmp_path, policy="sig", gamma=1, step=5)
    assert learning_rate(o, 5000) == 0.0
    assert learning_rate(o, 40) == pytest.approx(0.1 / (1 + math.exp(35)))
