"""AlexeyAB's [yolo] options: scale_x_y and new_coords (forward and box decoding), nms_kind with
beta_nms (greedynms, diounms), [net] letter_box for detection, and the training-only keys that
are kept but refuse training.

References: plain-Python re-implementations of AlexeyAB's forward_yolo_layer, get_yolo_box and
diounms_sort/box_diou (its src/yolo_layer.c and src/box.c), written from the C here.
"""

import math

import numpy as np
import pytest

from engine import detection
from engine.backends.numpy_backend import NumpyBackend
from engine.errors import ConfigError
from engine.network import Network

from helpers import build_layer, reference_iou, write_cfg


def logistic(v):
    return 1.0 / (1.0 + np.exp(-v))


YOLO = "[yolo]\nmask=0,1\nanchors=10,14,23,27,37,58\nclasses=2\nnum=3\n"


@pytest.mark.parametrize("extra", ["scale_x_y=1.05", "scale_x_y=2.0\nnew_coords=1", "new_coords=1"])
def test_yolo_forward_matches_alexeyab(tmp_path, extra):
    """forward_yolo_layer: logistic on x, y, objectness, classes unless new_coords; then
    x, y -> x*s - 0.5*(s-1)."""
    layer = build_layer(tmp_path, YOLO + extra, (14, 3, 4))
    x = np.random.default_rng(1).standard_normal((2, 14, 3, 4)).astype(np.float32) * 2
    y = layer.forward(NumpyBackend(), x, False)
    scale = layer.scale_x_y
    for a in range(2):
        for e in range(7):
            c = a * 7 + e
            want = x[:, c].astype(np.float64)
            if not layer.new_coords and e not in (2, 3):
                want = logistic(want)
            if e < 2:
                want = want * scale - 0.5 * (scale - 1)
            np.testing.assert_allclose(y[:, c], want, rtol=1e-6, atol=1e-6, err_msg=f"entry {e}")


def get_yolo_box(x, anchors_wh, i, j, lw, lh, net_w, net_h, new_coords):
    """AlexeyAB's get_yolo_box for one prediction (x = its 4 box entries)."""
    if new_coords:
        return [(i + x[0]) / lw, (j + x[1]) / lh, x[2] * x[2] * 4 * anchors_wh[0] / net_w,
                x[3] * x[3] * 4 * anchors_wh[1] / net_h]
    return [(i + x[0]) / lw, (j + x[1]) / lh, math.exp(x[2]) * anchors_wh[0] / net_w,
            math.exp(x[3]) * anchors_wh[1] / net_h]


@pytest.mark.parametrize("new_coords", [0, 1])
@pytest.mark.parametrize("letterboxed", [True, False])
def test_yolo_decoding_matches_get_yolo_box(tmp_path, new_coords, letterboxed):
    layer = build_layer(tmp_path, YOLO + f"new_coords={new_coords}\nscale_x_y=1.1", (14, 3, 4))
    rng = np.random.default_rng(2)
    output = layer.forward(NumpyBackend(), rng.standard_normal((1, 14, 3, 4)).astype(np.float32), False)[0]
    if new_coords:  # the conv before used the logistic: keep entries in (0, 1)
        output = logistic(output).astype(np.float32)
    net_w, net_h, image_w, image_h = 4 * 32, 3 * 32, 200, 100
    found = detection.yolo_detections(layer, output, net_w, net_h, image_w, image_h, 0.3,
                                      letterboxed)
    expected = []
    for a, anchor in enumerate(layer.mask_anchors):
        for j in range(3):
            for i in range(4):
                entries = output[a * 7:(a + 1) * 7, j, i].astype(np.float64)
                if entries[4] <= 0.3:
                    continue
                box = get_yolo_box(entries, anchor, i, j, 4, 3, net_w, net_h, new_coords)
                if letterboxed:
                    new_w, new_h = detection.letterbox_geometry(image_w, image_h, net_w, net_h)
                    box = [(box[0] - (net_w - new_w) / 2 / net_w) / (new_w / net_w),
                           (box[1] - (net_h - new_h) / 2 / net_h) / (new_h / net_h),
                           box[2] * net_w / new_w, box[3] * net_h / new_h]
                expected.append(box)
    assert len(found) == len(expected) > 0
    np.testing.assert_allclose(found.boxes, np.array(expected), rtol=1e-5, atol=1e-6)


def box_diou_reference(a, b, beta):
    """AlexeyAB's box_diou (beta 0.6) / box_diounms, in plain Python."""
    top = min(a[1] - a[3] / 2, b[1] - b[3] / 2)
    bot = max(a[1] + a[3] / 2, b[1] + b[3] / 2)
    left = min(a[0] - a[2] / 2, b[0] - b[2] / 2)
    right = max(a[0] + a[2] / 2, b[0] + b[2] / 2)
    c = (right - left) ** 2 + (bot - top) ** 2
    iou = reference_iou(a, b)
    if c == 0:
        return iou
    d = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    return iou - (d / c) ** beta


def diounms_reference(boxes, probs, thresh, kind, beta):
    probs = [list(p) for p in probs]
    for k in range(len(probs[0])):
        order = sorted(range(len(boxes)), key=lambda i: -probs[i][k])
        for position, i in enumerate(order):
            if probs[i][k] == 0:
                continue
            for j in order[position + 1:]:
                if kind == "greedynms":
                    overlap = box_diou_reference(boxes[i], boxes[j], 0.6)
                else:
                    overlap = box_diou_reference(boxes[i], boxes[j], beta)
                if overlap > thresh:
                    probs[j][k] = 0
    return np.array(probs)


@pytest.mark.parametrize("kind,beta", [("greedynms", 0.6), ("diounms", 0.6), ("diounms", 0.3)])
def test_diou_nms_matches_diounms_sort(kind, beta):
    rng = np.random.default_rng(5)
    n = 40
    centres = rng.uniform(0.3, 0.7, (n, 2))
    sizes = rng.uniform(0.05, 0.3, (n, 2))
    boxes = np.hstack([centres, sizes]).astype(np.float32)
    probs = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    probs[probs < 0.4] = 0
    found = detection.Detections(boxes, np.ones(n, np.float32), probs)
    got = detection.nms_sort(found, 0.45, kind, beta)
    want = diounms_reference(boxes.astype(np.float64).tolist(), probs, 0.45, kind, beta)
    np.testing.assert_array_equal(got.probs > 0, want > 0)
    # and DIoU differs from IoU here, so the choice matters
    assert not np.array_equal(got.probs > 0, detection.nms_sort(found, 0.45).probs > 0)


def detector_cfg(tmp_path, net_extra="", yolo_extra=""):
    body = ("[convolutional]\nfilters=14\nsize=1\nstride=32\nactivation=linear\n\n" + YOLO +
            yolo_extra)
    options = {"batch": 1, "width": 64, "height": 64, "channels": 3}
    if net_extra:
        options.update(dict(item.split("=") for item in net_extra.split()))
    return write_cfg(tmp_path / "det.cfg", options, body)


def test_letter_box_key_chooses_the_preprocessing(tmp_path):
    """[net] letter_box=0 stretches the image to the input (AlexeyAB's resize_image), 1
    letterboxes; without it an AlexeyAB cfg (keys only its fork reads) stretches, as its
    `detector test` does, and a pjreddie one letterboxes. The last layer's nms_kind/beta_nms are
    the ones detection uses."""
    for value, expected in (("", False), ("letter_box=1", True), ("letter_box=0", False)):
        net = Network(detector_cfg(tmp_path, value, "nms_kind=diounms\nbeta_nms=0.5"), quiet=True)
        assert detection.uses_letterbox(net) is expected
        assert detection.uses_letterbox(net, False) is False
        assert detection.uses_letterbox(net, True) is True
        assert detection.nms_choice(net) == ("diounms", 0.5)
    assert detection.uses_letterbox(Network(detector_cfg(tmp_path), quiet=True)) is True


def test_detect_without_letterbox_feeds_the_resized_image(tmp_path):
    from PIL import Image

    net = Network(detector_cfg(tmp_path, "letter_box=0"), quiet=True)
    pixels = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    seen = []
    original = net.forward
    net.forward = lambda x, train=False: (seen.append(np.array(x)), original(x, train))[1]
    detection.detect(net, str(tmp_path / "x.png"), 0.99)
    image = detection.read_rgb(str(tmp_path / "x.png"))
    np.testing.assert_allclose(seen[0][0], detection.resize_bilinear(image, 64, 64))


def test_unknown_nms_kind_names_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"det\.cfg:\d+: \[yolo\] nms_kind=fancy"):
        Network(detector_cfg(tmp_path, yolo_extra="nms_kind=fancy"), quiet=True)


@pytest.mark.parametrize("extra,key", [("iou_loss=ciou", "iou_loss"), ("iou_normalizer=0.07", "iou_normalizer"),
                                       ("scale_x_y=1.05", "scale_x_y"), ("new_coords=1", "new_coords"),
                                       ("label_smooth_eps=0.1", "label_smooth_eps")])
def test_training_keys_load_but_refuse_training(tmp_path, capsys, extra, key):
    """Training-only keys are read (no 'Unused field'), inference works, and training refuses a
    non-default value with one line naming it; AlexeyAB's defaults are accepted."""
    net = Network(detector_cfg(tmp_path, yolo_extra=extra))
    assert "Unused field" not in capsys.readouterr().err
    net.forward(net.ops.asarray(np.zeros((1, 3, 64, 64), np.float32)))
    with pytest.raises(ConfigError, match=rf"det\.cfg:\d+: \[yolo\] {key}="):
        net.layers[-1].check_trainable()
    defaults = "iou_loss=mse\niou_normalizer=0.75\nscale_x_y=1.0\nnew_coords=0"
    Network(detector_cfg(tmp_path, yolo_extra=defaults), quiet=True).layers[-1].check_trainable()
