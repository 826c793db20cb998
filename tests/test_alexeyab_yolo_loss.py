"""AlexeyAB's [yolo] training loss (engine.layers.alexeyab_yolo_loss): its deltas against
AlexeyAB's own for fixed batches (tests/golden/L1_alexeyab_yolo_loss), the IoU-loss derivatives
against finite differences where they are gradients, which loss a cfg trains with, and
`engine train` on a yolov4-tiny-style cfg."""

import io
import math
import os

import numpy as np
import pytest

from engine import boxes as box_c  # AlexeyAB's box.c (Box, box_iou_kind, dx_box_iou)
from engine.network import Network
from engine.train import train
from engine.data import DataConfig

from conftest import CFG
from test_yolo_training import TINY_YOLO, _synthetic_set
from helpers import write_cfg

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "L1_alexeyab_yolo_loss")
SETS = ("v4tiny", "v7tiny", "ciou_iou_thresh", "mse_extras", "giou", "diou_focal", "defaults")


def _golden_truth(batch):
    rows = [[] for _ in range(batch)]
    with open(os.path.join(GOLDEN, "truth.txt")) as f:
        for line in f:
            b, *values = line.split()
            rows[int(b)].append([float(v) for v in values])
    truth = np.zeros((batch, 90, 5), np.float32)
    for b, r in enumerate(rows):
        truth[b, :len(r)] = r
    return truth


@pytest.mark.parametrize("name", SETS)
def test_deltas_match_alexeyabs(name):
    """Every [yolo] layer's delta (and AlexeyAB's reported cost) for the same input and truth,
    to 1e-4."""
    folder = os.path.join(GOLDEN, name)
    net = Network(os.path.join(folder, f"{name}.cfg"), quiet=True, darknet="alexeyab")
    truth = _golden_truth(2)
    heads = [k for k, layer in enumerate(net.layers) if layer.type_name == "yolo"]
    assert heads == [2, 6]
    for k in heads:
        layer = net.layers[k]
        x = np.fromfile(os.path.join(folder, f"L{k:02d}_input.bin"), np.float32)
        layer.forward(net.ops, net.ops.asarray(x.reshape((2,) + layer.in_shape)), True)
        cost, delta = layer.alexeyab_loss(net.ops, truth, 32, 32)
        expected = np.fromfile(os.path.join(folder, f"L{k:02d}_delta.bin"), np.float32)
        expected = expected.reshape(delta.shape)
        assert np.count_nonzero(expected) > 0
        np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-4)
        with open(os.path.join(folder, f"L{k:02d}_cost.txt")) as f:
            assert cost == pytest.approx(float(f.read()), rel=1e-5)


def test_pjreddies_loss_differs_from_alexeyabs_defaults():
    """The reason for two losses: on the same cfg with AlexeyAB's defaults, pjreddie's YOLOv3
    delta is not AlexeyAB's (iou_normalizer=0.75 on the boxes at least)."""
    folder = os.path.join(GOLDEN, "defaults")
    cfg = os.path.join(folder, "defaults.cfg")
    pj = Network(cfg, quiet=True)
    assert pj.darknet == "pjreddie" and pj.layers[2].loss_kind == "pjreddie"
    layer = pj.layers[2]
    x = np.fromfile(os.path.join(folder, "L02_input.bin"), np.float32).reshape((2,) + layer.in_shape)
    layer.forward(pj.ops, pj.ops.asarray(x), True)
    _, delta = layer.loss(pj.ops, _golden_truth(2), 32, 32)
    expected = np.fromfile(os.path.join(folder, "L02_delta.bin"), np.float32).reshape(delta.shape)
    assert np.abs(pj.ops.to_host(delta) - expected).max() > 0.05


def _numeric(f, values, k, h=1e-6):
    up, down = list(values), list(values)
    up[k] += h
    down[k] -= h
    return (f(up) - f(down)) / (2 * h)


@pytest.mark.parametrize("kind", ["iou", "giou"])
@pytest.mark.parametrize("pred", [(0.52, 0.47, 0.3, 0.2), (0.45, 0.55, 0.25, 0.35),
                                  (0.5, 0.5, 0.5, 0.6)])
def test_iou_loss_derivatives_against_finite_differences(kind, pred):
    """dx_box_iou for iou and giou on overlapping boxes is the gradient of IoU / GIoU w.r.t. the
    box centre, and twice it w.r.t. width and height (AlexeyAB: 'we do not divide by 2');
    float64 central differences of box_iou_kind, a separate function of the C."""
    truth = box_c.Box(0.5, 0.5, 0.28, 0.3)
    f = lambda v: box_c.box_iou_kind(box_c.Box(*v), truth, kind)
    dx, dy, dw, dh = box_c.dx_box_iou(box_c.Box(*pred), truth, kind)
    assert dx == pytest.approx(_numeric(f, pred, 0), abs=1e-6)
    assert dy == pytest.approx(_numeric(f, pred, 1), abs=1e-6)
    assert dw == pytest.approx(2 * _numeric(f, pred, 2), abs=1e-6)
    assert dh == pytest.approx(2 * _numeric(f, pred, 3), abs=1e-6)


def test_diou_derivative_inside_the_truth():
    """DIoU's delta where the prediction lies inside the truth (the enclosing box is the
    truth's): the gradient of IoU - d/c (the paper's penalty, not box_diou's (d/c)^0.6 that
    iou_thresh_kind=diou compares) for x, y, twice IoU's for w, h. Elsewhere it is no
    gradient: the C subtracts the enclosing box's term where the derivative of -d/c adds it;
    the golden sets check that part."""
    truth = box_c.Box(0.5, 0.5, 0.28, 0.3)
    pred = (0.53, 0.46, 0.1, 0.12)

    def penalised(v):
        p = box_c.Box(*v)
        cw, ch = box_c._enclosing(p, truth)
        return box_c.boxes_iou(p, truth) - ((p.x - truth.x) ** 2 + (p.y - truth.y) ** 2) / (cw * cw + ch * ch)
    iou = lambda v: box_c.boxes_iou(box_c.Box(*v), truth)
    dx, dy, dw, dh = box_c.dx_box_iou(box_c.Box(*pred), truth, "diou")
    assert dx == pytest.approx(_numeric(penalised, pred, 0), abs=1e-6)
    assert dy == pytest.approx(_numeric(penalised, pred, 1), abs=1e-6)
    assert dw == pytest.approx(2 * _numeric(iou, pred, 2), abs=1e-6)
    assert dh == pytest.approx(2 * _numeric(iou, pred, 3), abs=1e-6)


def test_mse_delta_is_the_gradient_of_the_weighted_losses():
    """iou_loss=mse, one truth, no ignore: the box deltas of the assigned anchor are
    -d/dz of iou_normalizer * (2 - w*h) * (BCE on x, y through the logistic, half squared error
    on w, h), and objectness/classes -d/dz of BCE (obj_normalizer 1); float64 differences."""
    cfg = os.path.join(GOLDEN, "giou", "giou.cfg")
    net = Network(cfg, quiet=True, darknet="alexeyab")
    layer = net.layers[2]
    layer.iou_loss = "mse"
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (1,) + layer.in_shape)
    truth = np.zeros((1, 90, 5), np.float32)
    truth[0, 0] = (0.4, 0.6, 0.3, 0.35, 1)
    layer.forward(net.ops, net.ops.asarray(z.astype(np.float32)), True)
    _, delta = layer.alexeyab_loss(net.ops, truth, 32, 32)
    e = layer.entries
    a, = np.nonzero(np.abs(delta[0].reshape(len(layer.mask), e, 4, 4)[:, 0]).sum(axis=(1, 2)))
    a = int(a[0])
    j, i = int(0.6 * 4), int(0.4 * 4)
    t = [float(v) for v in truth[0, 0]]  # float64 from here: the differences need it
    anchor = layer.anchors[layer.mask[a]]
    target = [t[0] * 4 - i, t[1] * 4 - j, math.log(t[2] * 32 / anchor[0]), math.log(t[3] * 32 / anchor[1])]
    scale = layer.iou_normalizer * (2 - t[2] * t[3])
    sig = lambda v: 1 / (1 + math.exp(-v))
    bce = lambda y, v: -(y * math.log(sig(v)) + (1 - y) * math.log(1 - sig(v)))
    losses = [lambda v, k=k: scale * bce(target[k], v) for k in (0, 1)] + \
             [lambda v, k=k: scale * 0.5 * (target[k] - v) ** 2 for k in (2, 3)] + \
             [lambda v: bce(1.0, v)] + [lambda v, c=c: bce(float(c == 1), v) for c in range(3)]
    for entry, loss in enumerate(losses):
        v = float(z[0, a * e + entry, j, i])
        grad = (loss(v + 1e-6) - loss(v - 1e-6)) / 2e-6
        assert delta[0, a * e + entry, j, i] == pytest.approx(-grad, abs=1e-5), entry


def test_which_loss_a_cfg_trains_with():
    """pjreddie's cfgs keep pjreddie's loss; AlexeyAB's (a key only its fork reads) get AlexeyAB's."""
    assert Network(os.path.join(CFG, "yolov3-tiny.cfg"), quiet=True).layers[-1].loss_kind == "pjreddie"
    assert Network(os.path.join(GOLDEN, "v4tiny", "v4tiny.cfg"), quiet=True).layers[-1].loss_kind \
        == "alexeyab"


def test_unknown_iou_loss_names_its_line(tmp_path):
    from engine.errors import ConfigError
    text = open(os.path.join(GOLDEN, "giou", "giou.cfg")).read().replace("iou_loss=giou",
                                                                         "iou_loss=fancy")
    (tmp_path / "bad.cfg").write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.cfg:\d+: \[yolo\] iou_loss=fancy"):
        Network(str(tmp_path / "bad.cfg"), quiet=True)


V4_HEAD = "scale_x_y=1.05\niou_loss=ciou\niou_normalizer=0.07\ncls_normalizer=1.0\nignore_thresh=.7\n" \
          "iou_thresh=0.213\nnms_kind=greedynms\n"


def test_yolov4_tiny_style_detector_loss_falls(tmp_path):
    """`train` on a two-head cfg with yolov4-tiny's head keys (AlexeyAB's loss, ciou): the
    reported loss falls over 30 iterations on 8 synthetic images."""
    body = TINY_YOLO.replace("num=4\n", "num=4\n" + V4_HEAD)
    cfg = write_cfg(tmp_path / "v4tiny-style.cfg",
                    dict(batch=8, subdivisions=1, width=32, height=32, channels=3,
                         learning_rate=0.01, momentum=0.9, decay=0.0005, max_batches=30), body)
    net = Network(cfg, quiet=True)
    assert all(layer.loss_kind == "alexeyab" for layer in net.cost_layers)
    data = DataConfig(_synthetic_set(tmp_path))
    dataset = data.detection_dataset("train", net.input_shape, net.cost_layer.max_boxes)
    stream = io.StringIO()
    train(net, dataset, str(tmp_path / "backup"), stream=stream)
    losses = [float(line.split(": ")[1].split(",")[0]) for line in stream.getvalue().splitlines()
              if line[:1].isdigit()]
    assert len(losses) == 30
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_multiscale_rebuild_keeps_alexeyabs_loss():
    """random=1 rebuilds the layers at a new size: they stay AlexeyAB's (loss and BN rule)."""
    from engine.multiscale import resize_network

    net = Network(os.path.join(GOLDEN, "v4tiny", "v4tiny.cfg"), quiet=True)
    resize_network(net, 64, 64)
    assert net.layers[-1].in_shape[1:] == (16, 16)
    assert all(layer.loss_kind == "alexeyab" for layer in net.cost_layers)
    assert net.layers[-1].bn_epsilons == net.bn_epsilons


@pytest.mark.parametrize("key", ["equidistant_point=100", "badlabels_rejection_percentage=5",
                                 "num_sigmas_reject_badlabels=3", "adversarial_lr=0.05"])
def test_net_keys_that_change_alexeyabs_loss_refuse_training(tmp_path, key):
    """[net] keys that change AlexeyAB's [yolo] loss (not implemented) refuse training, naming
    their line."""
    from engine.errors import ConfigError

    body = TINY_YOLO.replace("num=4\n", "num=4\n" + V4_HEAD)
    cfg = write_cfg(tmp_path / "n.cfg", dict(batch=8, subdivisions=1, width=32, height=32,
                                             channels=3, max_batches=1), body)
    cfg_text = open(cfg).read().replace("[net]\n", f"[net]\n{key}\n", 1)
    open(cfg, "w").write(cfg_text)
    net = Network(cfg, quiet=True)
    data = DataConfig(_synthetic_set(tmp_path))
    dataset = data.detection_dataset("train", net.input_shape, net.cost_layer.max_boxes)
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"n\.cfg:\d+: \[net\] {name}="):
        train(net, dataset, str(tmp_path / "backup"), stream=io.StringIO())
