"""pjreddie's [region] (YOLOv2) training loss: deltas against pjreddie's own for fixed batches
(tests/golden/L2_pjreddie_region_loss), the delta as the exact negative gradient of the loss it
implies (float64 differences), and `engine train` on a yolov2-tiny-style cfg."""

import io
import math
import os

import numpy as np
import pytest

from engine import cli
from engine.data import DataConfig
from engine.network import Network
from engine.train import train

from helpers import write_cfg
from test_yolo_training import CLASSES, _synthetic_set

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "L2_pjreddie_region_loss")
SETS = {"v2tiny": 0, "v2_rescore": 20000, "logistic": 100}


def _golden_truth(batch):
    truth = np.zeros((batch, 30, 5), np.float32)
    count = [0] * batch
    with open(os.path.join(GOLDEN, "truth.txt")) as f:
        for line in f:
            b, *values = line.split()
            b = int(b)
            truth[b, count[b]] = [float(v) for v in values]
            count[b] += 1
    return truth


@pytest.mark.parametrize("name", sorted(SETS))
def test_deltas_match_pjreddies(name):
    folder = os.path.join(GOLDEN, name)
    net = Network(os.path.join(folder, f"{name}.cfg"), quiet=True)
    layer = net.layers[2]
    x = np.fromfile(os.path.join(folder, "L02_input.bin"), np.float32).reshape((2,) + layer.in_shape)
    out = net.ops.to_host(layer.forward(net.ops, net.ops.asarray(x), True))
    cost, delta = layer.loss(out, _golden_truth(2), SETS[name])
    expected = np.fromfile(os.path.join(folder, "L02_delta.bin"), np.float32).reshape(delta.shape)
    np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-4)
    with open(os.path.join(folder, "L02_cost.txt")) as f:
        assert cost == pytest.approx(float(f.read()), rel=1e-5)


REGION_NET = """
[convolutional]
filters={filters}
size=1
activation=linear

[region]
anchors=0.6,0.7, 1.9,2.1, 3.3,5.5
bias_match=1
classes=3
coords=4
num=3
softmax=1
rescore=0
object_scale=5
noobject_scale=0.5
class_scale=1.5
coord_scale=2
thresh=2
"""


def test_delta_is_the_negative_gradient_of_the_implied_loss(tmp_path):
    """rescore=0, no prior (seen >= 12800), thresh above any IoU, one truth: the delta w.r.t.
    the layer input is minus the float64 gradient of noobject_scale * BCE(0, obj) everywhere
    but the assigned anchor, which has object_scale * BCE(1, obj), coord_scale * (2 - w*h) *
    (BCE on x, y through the logistic, half squared error on w, h) and class_scale * softmax
    cross-entropy."""
    cfg = write_cfg(tmp_path / "r.cfg", dict(batch=1, width=16, height=16, channels=2),
                    REGION_NET.format(filters=3 * 8))
    net = Network(cfg, quiet=True)
    layer = net.layers[1]
    z = np.random.default_rng(0).normal(0, 1, (1,) + layer.in_shape)
    truth = np.zeros((1, 30, 5), np.float32)
    truth[0, 0] = (0.6, 0.3, 0.2, 0.25, 2)
    out = net.ops.to_host(layer.forward(net.ops, net.ops.asarray(z.astype(np.float32)), True))
    _, delta = layer.loss(out, truth, 20000)
    t = [float(v) for v in truth[0, 0]]
    w = h = 16 // 16 * layer.in_shape[2]
    i, j = int(t[0] * w), int(t[1] * h)
    shapes = layer.anchors.astype(np.float64) / w
    inter = np.minimum(shapes[:, 0], t[2]) * np.minimum(shapes[:, 1], t[3])
    n = int(np.argmax(inter / (shapes[:, 0] * shapes[:, 1] + t[2] * t[3] - inter)))
    target = [t[0] * w - i, t[1] * h - j, math.log(t[2] * w / layer.anchors[n, 0]),
              math.log(t[3] * h / layer.anchors[n, 1])]

    def loss(zz):
        zz = zz.reshape(3, 8, h, w)
        sig = 1 / (1 + np.exp(-zz))
        bce = lambda y, p: -(y * np.log(p) + (1 - y) * np.log(1 - p))
        total = 0.5 * bce(0.0, sig[:, 4]).sum()
        total += 5 * bce(1.0, sig[n, 4, j, i]) - 0.5 * bce(0.0, sig[n, 4, j, i])
        scale = 2 * (2 - t[2] * t[3])
        total += scale * (bce(target[0], sig[n, 0, j, i]) + bce(target[1], sig[n, 1, j, i]))
        total += scale * 0.5 * ((target[2] - zz[n, 2, j, i]) ** 2 + (target[3] - zz[n, 3, j, i]) ** 2)
        logits = zz[n, 5:, j, i]
        total += -1.5 * (logits[2] - np.log(np.exp(logits).sum()))
        return total

    flat = z.reshape(-1).astype(np.float32).astype(np.float64)
    grad = np.zeros_like(flat)
    for k in range(len(flat)):
        up, down = flat.copy(), flat.copy()
        up[k] += 1e-6
        down[k] -= 1e-6
        grad[k] = (loss(up) - loss(down)) / 2e-6
    np.testing.assert_allclose(delta.reshape(-1), -grad, atol=2e-5)


V2_TINY = """
[convolutional]
batch_normalize=1
filters=8
size=3
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
pad=1
activation=leaky

[convolutional]
filters={filters}
size=1
activation=linear

[region]
anchors=0.8,0.8, 1.6,1.6, 2.8,2.8
bias_match=1
classes={classes}
coords=4
num=3
softmax=1
jitter=.2
rescore=1
object_scale=5
noobject_scale=1
class_scale=1
coord_scale=1
thresh=.6
random=0
"""


def test_yolov2_tiny_style_detector_loss_falls(tmp_path):
    """`train` on a yolov2-tiny-style cfg ([region], pjreddie's loss): the loss falls over 30
    iterations on 8 synthetic images, and the CLI takes the cfg as a detector."""
    cfg = write_cfg(tmp_path / "v2tiny-style.cfg",
                    dict(batch=8, subdivisions=1, width=32, height=32, channels=3,
                         learning_rate=0.01, momentum=0.9, decay=0.0005, max_batches=30),
                    V2_TINY.format(filters=3 * (5 + CLASSES), classes=CLASSES))
    net = Network(cfg, quiet=True)
    data = DataConfig(_synthetic_set(tmp_path))
    dataset = cli.training_set(net, data)
    assert dataset.truth.shape == (8, 30 * 5)
    stream = io.StringIO()
    train(net, dataset, str(tmp_path / "backup"), stream=stream)
    losses = [float(line.split(": ")[1].split(",")[0]) for line in stream.getvalue().splitlines()
              if line[:1].isdigit()]
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_region_map_file_is_refused_for_training(tmp_path):
    from engine.errors import ConfigError

    cfg = write_cfg(tmp_path / "m.cfg", dict(batch=1, width=16, height=16, channels=2),
                    REGION_NET.format(filters=24) + "map=data/x.map\n")
    with pytest.raises(ConfigError, match=r"m\.cfg:\d+: \[region\] map="):
        Network(cfg, quiet=True).layers[1].check_trainable()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["region", "alexeyab_yolo"])
def test_train_step_on_the_gpu_equals_the_cpu(tmp_path, kind):
    """The host losses ([region], AlexeyAB's [yolo]) on the CUDA backend: one training step's
    cost and parameter updates equal the CPU's."""
    from engine.backends import get_backend
    from test_alexeyab_yolo_loss import V4_HEAD
    from test_yolo_training import TINY_YOLO

    body = V2_TINY.format(filters=3 * (5 + CLASSES), classes=CLASSES) if kind == "region" else \
        TINY_YOLO.replace("num=4\n", "num=4\n" + V4_HEAD)
    cfg = write_cfg(tmp_path / "g.cfg", dict(batch=4, subdivisions=1, width=32, height=32,
                                             channels=3), body)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, 3, 32, 32)).astype(np.float32)
    truth = np.zeros((4, 30 * 5), np.float32)
    truth[:, :5] = (0.4, 0.6, 0.3, 0.35, 1)
    truth[:, 5:10] = (0.7, 0.2, 0.2, 0.15, 0)
    results = []
    for backend in ("cpu", "gpu"):
        net = Network(cfg, backend=get_backend(backend), quiet=True, seed=3)
        cost = net.train_step(net.ops.asarray(x), net.ops.asarray(truth[:, :net.cost_layer.max_boxes * 5]))
        results.append((cost, [net.ops.to_host(u) for layer in net.layers
                               for u in layer.updates.values()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-3)
    for cpu, gpu in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(gpu, cpu, atol=1e-3, rtol=1e-3)
