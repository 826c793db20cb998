"""engine/network.py: the backward pass through a whole network (deltas summed where a layer
feeds several others) against float64 finite differences of the softmax cross-entropy."""

import numpy as np
import pytest

from engine.network import Network

from helpers import as_float64, write_cfg

BODY = """
[convolutional]
batch_normalize=1
filters=3
size=3
pad=1
activation=tanh

[maxpool]
size=2
stride=1

[convolutional]
filters=2
size=1
activation=logistic

[route]
layers=0,2

[avgpool]

[connected]
output=4
activation=linear

[softmax]
"""


def test_network_backward_matches_finite_differences(tmp_path):
    """Every trainable parameter of a network with a branch (layer 0 feeds the maxpool and the
    route) gets -d(cost)/d(param), batch statistics included."""
    path = write_cfg(tmp_path / "n.cfg", {"batch": 3, "height": 5, "width": 5, "channels": 2}, BODY)
    net = Network(path, quiet=True)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        as_float64(layer, rng)
    x = rng.standard_normal((3, 2, 5, 5))
    truth = np.eye(4)[[0, 3, 1]]

    def cost():
        net.forward(x, train=True)
        return net.cost_layer.cost(net.ops, truth)[0]

    cost()
    _, delta = net.cost_layer.cost(net.ops, truth)
    net.backward(delta)
    eps = 1e-6
    checked = 0
    for layer in net.layers:
        for name, updates in layer.updates.items():
            p = layer.params[name]
            for i in rng.choice(p.size, min(p.size, 12), replace=False):
                old = p.flat[i]
                p.flat[i] = old + eps
                up = cost()
                p.flat[i] = old - eps
                down = cost()
                p.flat[i] = old
                numeric = (up - down) / (2 * eps)
                assert abs(-updates.flat[i] - numeric) <= 1e-5 * max(1.0, abs(numeric)), \
                    (layer.index, name, i, -updates.flat[i], numeric)
                checked += 1
    assert checked == 42  # 12 or all of each: conv0 w,b,s; conv2 w,b; connected w,b


def test_predict_batches_and_shapes(tmp_path):
    """predict() takes (N, C, H, W) or flat rows, any N (split into batches), and gives the same
    rows as one forward pass."""
    path = write_cfg(tmp_path / "p.cfg", {"batch": 3, "height": 5, "width": 5, "channels": 2}, BODY)
    net = Network(path, quiet=True)
    images = np.random.default_rng(1).uniform(0, 1, (7, 2, 5, 5)).astype(np.float32)
    whole = net.ops.to_host(net.forward(net.ops.asarray(images), train=False)).reshape(7, -1)
    np.testing.assert_allclose(net.predict(images), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(net.predict(images.reshape(7, -1), batch_size=2), whole, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(net.predict(images).sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("folder,cfg,shape", [
    ("G1_mnist_trained", "mnist.cfg", (1, 28, 28)),
    ("G2a_core", "g2a_core.cfg", (3, 32, 32)),
])
def test_folded_batchnorm_gives_the_unfolded_outputs(folder, cfg, shape):
    """Folding each layer's inference BN into its weights changes no output (1e-5), and the
    folded network still matches real Darknet's outputs."""
    import os

    from conftest import GOLDEN

    root = os.path.join(GOLDEN, folder)
    inputs = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4").reshape((-1,) + shape)
    darknet = np.fromfile(os.path.join(root, "outputs.bin"), dtype="<f4").reshape(len(inputs), -1)
    net = Network(os.path.join(root, cfg), quiet=True)
    net.load_weights(os.path.join(root, "weights"))
    unfolded = net.predict(inputs, batch_size=len(inputs))
    assert any(getattr(layer, "batch_normalize", False) for layer in net.layers)
    net.fold_batchnorm()
    assert not any(getattr(layer, "batch_normalize", False) for layer in net.layers)
    folded = net.predict(inputs, batch_size=len(inputs))
    np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded, darknet, rtol=1e-4, atol=1e-5)


def test_what_kind_of_model(tmp_path):
    """The commands ask the network what it is (detect, map, test, train's dataset), not its
    layers' type names."""
    classifier = Network("cfg/mnist.cfg", quiet=True)
    assert classifier.is_classifier and not classifier.is_detector
    assert classifier.task == classifier.training_task == "classifier"
    assert classifier.detection_layers == []
    detector = Network("cfg/mnist-detect.cfg", quiet=True)
    assert detector.is_detector and detector.task == detector.training_task == "detector"
    assert [layer.type_name for layer in detector.detection_layers] == ["yolo", "yolo"]
    assert detector.detected_classes == 10 and detector.truth_boxes == 90  # [yolo] max default
    assert detector.layers_with_weights == max(
        layer.index for layer in detector.layers if layer.weight_order) + 1
    # a [yolo] head and a [softmax] loss in one network: neither kind of training
    mixed = write_cfg(tmp_path / "mixed.cfg", {"batch": 1, "height": 8, "width": 8, "channels": 1},
                      """
[convolutional]
filters=7
size=1
activation=linear

[route]
layers=-1

[yolo]
mask=0
anchors=2,2
num=1
classes=2

[route]
layers=0

[avgpool]

[softmax]
""")
    net = Network(mixed, quiet=True)
    assert net.is_detector
    with pytest.raises(Exception, match="both \\[yolo\\] and \\[softmax\\]"):
        net.training_task


def test_every_detection_layer_has_a_decoder():
    """net.detection_layers (the layers' outputs_boxes) and engine.detection's decoders name the
    same layer types."""
    from engine import detection
    from engine.layers import LAYER_TYPES

    assert {cls.type_name for cls in LAYER_TYPES.values() if cls.outputs_boxes} == \
        set(detection.DECODERS)
