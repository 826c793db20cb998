"""Initial weights as each Darknet fork draws them (make_convolutional_layer): both scale by
sqrt(2 / fan_in); pjreddie's draws from a standard normal, AlexeyAB's from uniform(-1, 1)."""

import numpy as np

import engine


def conv_weights(net):
    for layer in net.layers:
        if layer.type_name == "convolutional" and layer.batch_normalize:
            w = np.asarray(net.ops.to_host(layer.params["weights"]), dtype=np.float64)
            yield w, np.sqrt(2.0 / (w.size // w.shape[0]))


def test_alexeyab_cfg_draws_uniform_weights():
    net = engine.load("cfg/mnist-detect.cfg", seed=3)  # AlexeyAB's (route group_id)
    assert net.darknet == "alexeyab"
    for w, scale in conv_weights(net):
        assert np.abs(w).max() <= scale * (1 + 1e-6)  # bounded, as uniform(-1, 1) * scale
        if w.size >= 4000:
            assert abs(w.std() / (scale / np.sqrt(3)) - 1) < 0.05


def test_pjreddie_cfg_draws_normal_weights():
    net = engine.load("cfg/mnist.cfg", seed=3)
    assert net.darknet == "pjreddie"
    big = [(w, s) for w, s in conv_weights(net) if w.size >= 4000]
    assert big
    for w, scale in big:
        assert abs(w.std() / scale - 1) < 0.05
        assert np.abs(w).max() > scale * 2  # a normal's tail, which uniform(-1, 1) never reaches
