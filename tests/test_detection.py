"""engine/detection.py and `engine detect`: Darknet's resize and letterbox, box decoding with the
letterbox undone, per-class NMS, and the command end to end on Darknet's G2c network (YOLOv3-tiny
with filters/8), checked against a decoding written here from Darknet's formulas.
"""

import os
import re

import numpy as np
import pytest
from PIL import Image

from engine import cli, detection
from engine.backends.numpy_backend import NumpyBackend
from engine.errors import ConfigError, DataError
from engine.network import Network

from conftest import CFG, GOLDEN
from helpers import reference_iou

G2C = os.path.join(GOLDEN, "G2c_tiny_yolov3_div8")
G2C_CFG = os.path.join(G2C, "g2c_tiny_yolov3_div8.cfg")
G2C_WEIGHTS = os.path.join(G2C, "weights")
NAMES = os.path.join(CFG, "coco.names")


def logistic(v):
    return 1 / (1 + np.exp(-v))


# ---- resize and letterbox ------------------------------------------------------------------------
def resize_reference(image, w, h):
    """Darknet's resize_image, pixel by pixel (float32 like Darknet's arithmetic)."""
    c, ih, iw = image.shape
    part = np.zeros((c, ih, w), np.float32)
    w_scale = np.float32(iw - 1) / np.float32(w - 1)
    for k in range(c):
        for r in range(ih):
            for col in range(w):
                if col == w - 1 or iw == 1:
                    part[k, r, col] = image[k, r, iw - 1]
                else:
                    sx = np.float32(col) * w_scale
                    ix = int(sx)
                    dx = sx - np.float32(ix)
                    part[k, r, col] = (1 - dx) * image[k, r, ix] + dx * image[k, r, ix + 1]
    out = np.zeros((c, h, w), np.float32)
    h_scale = np.float32(ih - 1) / np.float32(h - 1)
    for k in range(c):
        for r in range(h):
            sy = np.float32(r) * h_scale
            iy = int(sy)
            dy = sy - np.float32(iy)
            out[k, r] = (1 - dy) * part[k, iy]
            if r == h - 1 or ih == 1:
                continue
            out[k, r] += dy * part[k, iy + 1]
    return out


@pytest.mark.parametrize("size_in, size_out", [((7, 5), (4, 9)), ((6, 6), (6, 6)), ((9, 4), (3, 3))])
def test_resize_is_darknets(size_in, size_out):
    image = np.random.default_rng(0).random((3,) + size_in[::-1], dtype=np.float32)
    np.testing.assert_allclose(detection.resize_bilinear(image, *size_out),
                               resize_reference(image, *size_out), atol=1e-6)


def test_letterbox_centres_the_scaled_image_on_grey():
    image = np.random.default_rng(1).random((3, 100, 200), dtype=np.float32)
    boxed = detection.letterbox(image, 96, 96)
    assert boxed.shape == (3, 96, 96)
    np.testing.assert_array_equal(boxed[:, :24], 0.5)
    np.testing.assert_array_equal(boxed[:, 72:], 0.5)
    np.testing.assert_allclose(boxed[:, 24:72], resize_reference(image, 96, 48), atol=1e-6)


def test_correct_boxes_undo_the_letterbox():
    """A 200x100 image sits in rows 24..71 of a 96x96 input: a box spanning exactly those rows
    spans the whole image; a box at the input's centre is at the image's centre."""
    boxes = np.array([[0.5, 0.5, 0.25, 0.5], [0.25, 24 / 96, 0.1, 0.1]], np.float32)
    corrected = detection.correct_boxes(boxes, 200, 100, 96, 96)
    np.testing.assert_allclose(corrected[0], [0.5, 0.5, 0.25, 1.0], rtol=1e-6)
    np.testing.assert_allclose(corrected[1], [0.25, 0.0, 0.1, 0.2], atol=1e-6)


# ---- NMS -----------------------------------------------------------------------------------------
def test_nms_sort_suppresses_per_class_and_drops_zero_objectness():
    boxes = np.array([[0.5, 0.5, 0.2, 0.2],    # A
                      [0.52, 0.5, 0.2, 0.2],   # B: IoU with A ~0.82
                      [0.1, 0.1, 0.1, 0.1],    # C: apart
                      [0.5, 0.5, 0.2, 0.2]],   # D: objectness 0, dropped first
                     np.float32)
    probs = np.array([[0.8, 0.0], [0.9, 0.6], [0.7, 0.0], [0.0, 0.0]], np.float32)
    dets = detection.Detections(boxes, np.array([0.9, 0.9, 0.7, 0.0], np.float32), probs)
    kept = detection.nms_sort(dets, 0.45)
    assert len(kept) == 3
    # class 0: B (0.9) beats A (0.8); C stays. Class 1: B alone.
    np.testing.assert_allclose(kept.probs, [[0.0, 0.0], [0.9, 0.6], [0.7, 0.0]])
    assert detection.box_iou(boxes[0], boxes[1:2])[0] == pytest.approx(0.18 * 0.2 / (0.08 - 0.036))


# ---- decoding and `engine detect` end to end -----------------------------------------------------
def reference_detections(net, image_w, image_h, thresh):
    """get_yolo_detections + correct_yolo_boxes, one box at a time (relative coordinates)."""
    net_w, net_h = net.options.width, net.options.height
    if net_w / image_w < net_h / image_h:
        new_w, new_h = net_w, image_h * net_w // image_w
    else:
        new_w, new_h = image_w * net_h // image_h, net_h
    found = []
    for layer in net.layers:
        if layer.type_name != "yolo":
            continue
        out = net.outputs[layer.index][0]
        entries = 5 + layer.classes
        _, h, w = out.shape
        for n, m in enumerate(layer.mask):
            for row in range(h):
                for col in range(w):
                    v = out[n * entries:(n + 1) * entries, row, col]
                    if v[4] <= thresh:
                        continue
                    x = (col + v[0]) / w
                    y = (row + v[1]) / h
                    bw = np.exp(v[2]) * layer.anchors[m][0] / net_w
                    bh = np.exp(v[3]) * layer.anchors[m][1] / net_h
                    x = (x - (net_w - new_w) / 2 / net_w) / (new_w / net_w)
                    y = (y - (net_h - new_h) / 2 / net_h) / (new_h / net_h)
                    probs = v[4] * v[5:]
                    found.append(([x, y, bw * net_w / new_w, bh * net_h / new_h],
                                  np.where(probs > thresh, probs, 0)))
    return found


def reference_nms(found, nms):
    probs = [p.copy() for _, p in found]
    for k in range(len(probs[0]) if probs else 0):
        order = sorted(range(len(found)), key=lambda i: -probs[i][k])
        for a, i in enumerate(order):
            if probs[i][k] == 0:
                continue
            for j in order[a + 1:]:
                if reference_iou(found[i][0], found[j][0]) > nms:
                    probs[j][k] = 0
    return [(box, p) for (box, _), p in zip(found, probs)]


def write_image(path, width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_detect_api_matches_reference_decoding(tmp_path):
    """On a 150x90 image (letterboxed), the API's boxes and probabilities equal Darknet's
    formulas applied to the [yolo] outputs, after NMS."""
    net = Network(G2C_CFG, backend=NumpyBackend(), quiet=True)
    net.load_weights(G2C_WEIGHTS)
    path = str(tmp_path / "scene.png")
    write_image(path, 150, 90)
    thresh, nms = 0.6, 0.45
    labelled, dets, size = detection.detect(net, path, thresh, nms)
    assert size == (150, 90)
    expected = reference_nms(reference_detections(net, 150, 90, thresh), nms)
    assert len(expected) == len(dets) > 0
    got = sorted(zip(dets.boxes.tolist(), dets.probs.tolist()))
    for (box, probs), (ref_box, ref_probs) in zip(got, sorted((b, list(p)) for b, p in expected)):
        np.testing.assert_allclose(box, ref_box, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert len(labelled) == sum(1 for _, p in expected if (np.asarray(p) > thresh).any())


def test_engine_detect_end_to_end(tmp_path, capsys):
    """`engine detect` on an image the size of the network input (no letterbox): what it prints
    is the reference decoding of Darknet's [yolo] outputs, and it writes the annotated PNG."""
    image_path, out_path = str(tmp_path / "scene.png"), str(tmp_path / "predictions.png")
    pixels = write_image(image_path, 96, 96, seed=4)
    thresh = 0.8
    assert cli.main(["detect", G2C_CFG, G2C_WEIGHTS, image_path, "--names", NAMES,
                     "--thresh", str(thresh), "--out", out_path, "--cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()

    net = Network(G2C_CFG, backend=NumpyBackend(), quiet=True)
    net.load_weights(G2C_WEIGHTS)
    net.forward((pixels.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy())
    names = [line.strip() for line in open(NAMES) if line.strip()]
    expected = []
    for box, probs in reference_nms(reference_detections(net, 96, 96, thresh), 0.45):
        classes = [k for k in range(len(probs)) if probs[k] > thresh]
        if classes:
            x, y, w, h = box
            corners = [min(max(int(v * 96), 0), 95) for v in (x - w / 2, y - h / 2, x + w / 2, y + h / 2)]
            expected.append((sorted(names[k] for k in classes), tuple(corners)))
    got = []
    for line in printed[:-1]:
        match = re.fullmatch(r"(.*)  box \(left, top, right, bottom\) = \((\d+), (\d+), (\d+), (\d+)\)",
                             line)
        assert match, line
        classes = sorted(part.rsplit(":", 1)[0] for part in match.group(1).split(", "))
        got.append((classes, tuple(int(v) for v in match.groups()[1:])))
    assert expected and sorted(got) == sorted(expected)
    assert printed[-1] == f"{len(expected)} detections; drawn in {out_path}"
    with Image.open(out_path) as drawn:
        assert drawn.size == (96, 96)
        assert np.any(np.asarray(drawn.convert("RGB")) != pixels)  # boxes were drawn


def test_undecodable_image_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    assert cli.main(["detect", G2C_CFG, G2C_WEIGHTS, str(bad), "--cpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"engine detect: error: {bad}: cannot decode image")
    assert "\n" not in error
    with pytest.raises(DataError, match="image file not found"):
        detection.read_rgb(str(tmp_path / "missing.png"))


def test_detect_needs_a_detection_layer(tmp_path):
    net = Network(os.path.join(GOLDEN, "G2a_core", "g2a_core.cfg"), backend=NumpyBackend(),
                  quiet=True)
    path = str(tmp_path / "scene.png")
    write_image(path, 32, 32)
    with pytest.raises(ConfigError, match=r"not a detector \(no \[yolo\] or \[region\] layer\)"):
        detection.detect(net, path)


def test_region_decoding_is_darknets(tmp_path):
    """get_region_detections: every anchor of every cell, anchors in grid cells, objectness
    zeroed when not above the threshold, probabilities only where objectness survives."""
    from helpers import build_layer

    classes, num, h, w = 3, 2, 3, 4
    layer = build_layer(tmp_path, f"[region]\nanchors=1.5,2,3,1\nclasses={classes}\nnum={num}\n"
                        "softmax=1", (num * (5 + classes), h, w))
    rng = np.random.default_rng(3)
    output = rng.random((num * (5 + classes), h, w)).astype(np.float32)
    thresh, net_w, net_h, image_w, image_h = 0.4, 128, 96, 64, 64
    dets = detection.region_detections(layer, output, net_w, net_h, image_w, image_h, thresh)
    assert len(dets) == num * h * w
    new_w, new_h = 96, 96  # a square image letterboxed into 128x96
    for n in range(num):
        for row in range(h):
            for col in range(w):
                i = n * h * w + row * w + col  # Darknet's detection index
                v = output[n * (5 + classes):(n + 1) * (5 + classes), row, col]
                objectness = v[4] if v[4] > thresh else 0
                box = [(col + v[0]) / w, (row + v[1]) / h,
                       np.exp(v[2]) * layer.anchors[n][0] / w, np.exp(v[3]) * layer.anchors[n][1] / h]
                box[0] = (box[0] - (net_w - new_w) / 2 / net_w) / (new_w / net_w)
                box[1] = (box[1] - (net_h - new_h) / 2 / net_h) / (new_h / net_h)
                box[2] *= net_w / new_w
                box[3] *= net_h / new_h
                probs = v[4] * v[5:] if objectness else np.zeros(classes)
                np.testing.assert_allclose(dets.boxes[i], box, rtol=1e-5)
                assert dets.objectness[i] == pytest.approx(objectness)
                np.testing.assert_allclose(dets.probs[i], np.where(probs > thresh, probs, 0),
                                           rtol=1e-6)
