"""AlexeyAB's Darknet computes these: golden per-layer outputs of its cfgs (shrunk: fewer
filters, small inputs, 2 classes) written by AlexeyAB's Darknet itself (CPU build) from random
weights, matched layer by layer to 1e-4 on the CPU and (with `-m gpu`) on the GPU.
tests/golden/README.md says how they were made.
"""

import glob
import os

import numpy as np
import pytest

import engine

from conftest import GOLDEN

TOLERANCE = 1e-4
SETS = ["A1_yolov4_tiny", "A2_yolov4_small", "A3_yolov7_tiny", "A4_efficientnet_b0", "A5_sam",
        "A6_alexeyab_layers", "A7_dilation_share", "A8_antialiasing", "A9_yolov7",
        "A10_gaussian_yolov3", "A11_yolov4_csp", "A12_yolov1_detection"]


def read_set(folder):
    """(cfg path, weights path, batch, inputs, {layer index: expected output})."""
    root = os.path.join(GOLDEN, folder)
    with open(os.path.join(root, "layers.txt")) as handle:
        header = dict(item.split("=") for item in handle.readline().split()[2:])
    batch = int(header["batch_at_dump"])
    inputs = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
    dumps = {int(os.path.basename(p)[1:4]): np.fromfile(p, dtype="<f4").reshape(batch, -1)
             for p in glob.glob(os.path.join(root, "layers", "L*.bin"))}
    cfg = glob.glob(os.path.join(root, "*.cfg"))[0]
    return cfg, os.path.join(root, "weights"), batch, inputs, dumps


@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("folder", SETS)
def test_every_layer_matches_alexeyab(folder, backend):
    """Each layer's output, from AlexeyAB's weights and inputs, equals what AlexeyAB's Darknet
    dumped for it (relative to the layer's largest magnitude, at least 1)."""
    cfg, weights, batch, inputs, dumps = read_set(folder)
    net = engine.load(cfg, weights, backend=backend, quiet=True)
    assert len(dumps) == len(net.layers)
    net.forward(net.ops.asarray(inputs.reshape((batch,) + net.input_shape)))
    for index, expected in sorted(dumps.items()):
        got = net.ops.to_host(net.outputs[index]).reshape(batch, -1)
        error = np.abs(got - expected).max() / max(1.0, np.abs(expected).max())
        assert error <= TOLERANCE, (f"{folder} layer {index} [{net.layers[index].type_name}]: "
                                    f"relative error {error:.2e}")


def test_layer_table_rows_of_the_new_layers_are_alexeyabs():
    """`engine info` prints AlexeyAB's own rows for its layers (shortcut with weights, scale
    Layer for sam/scale_channels, local avgpool, reorg3d, empty, implicit): the lines its parser
    printed for golden A6, without the index column."""
    from engine.models import layer_table

    root = os.path.join(GOLDEN, "A6_alexeyab_layers")
    net = engine.load(os.path.join(root, "a6_alexeyab_layers.cfg"), quiet=True)
    rows = [line.split(None, 1)[1] for line in layer_table(net).splitlines()[1:-1]]
    with open(os.path.join(root, "alexeyab-table-rows.txt")) as handle:
        expected = [line.rstrip("\n") for line in handle]
    for line in expected:
        if line.startswith("implicit"):
            assert line.rstrip() in [row.rstrip() for row in rows], line
            continue
        index, row = line.split(None, 1)
        assert rows[int(index)].rstrip() == row.rstrip(), (index, rows[int(index)], row)


def alexeyab_detections(path):
    """The lines `darknet detector test ... -ext_output` printed: (class, percent, left, top,
    width, height) in pixels."""
    import re

    found = []
    with open(path) as handle:
        for line in handle:
            m = re.match(r"(\w): (\d+)%\s+\(left_x:\s+(-?\d+)\s+top_y:\s+(-?\d+)\s+width:\s+"
                         r"(-?\d+)\s+height:\s+(-?\d+)", line)
            found.append((m.group(1), int(m.group(2))) + tuple(float(v) for v in m.groups()[2:]))
    return found


@pytest.mark.parametrize("folder", ["A1_yolov4_tiny", "A3_yolov7_tiny"])
@pytest.mark.parametrize("letterboxed", [False, True])
def test_detect_finds_what_alexeyabs_detector_test_finds(folder, letterboxed):
    """`darknet detector test` of AlexeyAB (thresh 0.25, NMS 0.45 with the cfg's nms_kind:
    greedynms for YOLOv4-tiny, diounms for YOLOv7-tiny; the image stretched to the input, or
    with -letter_box letterboxed) and engine.detection.detect give the same boxes, classes and
    percentages (to the pixel and percent they print)."""
    from engine import detection

    cfg, weights, *_ = read_set(folder)
    net = engine.load(cfg, weights, quiet=True)
    image = os.path.join(GOLDEN, folder, "image.png")
    # stretched: what detect does by default with an AlexeyAB cfg that has no letter_box
    _, found, (width, height) = detection.detect(net, image, 0.25, 0.45,
                                                 letterboxed=True if letterboxed else None)
    ours = []
    for box, probs in zip(found.boxes, found.probs):
        for k in np.flatnonzero(probs > 0.25):
            x, y, w, h = (float(v) for v in box)
            ours.append(("ab"[k], 100 * float(probs[k]), (x - w / 2) * width, (y - h / 2) * height,
                         w * width, h * height))
    name = "detector-test-letter_box.txt" if letterboxed else "detector-test.txt"
    theirs = alexeyab_detections(os.path.join(GOLDEN, folder, name))
    assert len(ours) == len(theirs) > 10
    for label, percent, *pixels in theirs:
        assert any(o[0] == label and abs(o[1] - percent) <= 1 and
                   all(abs(p - q) <= 1.01 for p, q in zip(o[2:], pixels)) for o in ours), \
            (label, percent, pixels)


def test_engine_detect_command_on_yolov7_tiny(tmp_path, capsys):
    from engine import cli

    cfg, weights, *_ = read_set("A3_yolov7_tiny")
    image = os.path.join(GOLDEN, "A3_yolov7_tiny", "image.png")
    code = cli.main(["detect", cfg, weights, image, "--thresh", "0.25", "--resize", "--cpu",
                     "--out", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert code in (0, None) and "detections; drawn in" in out and (tmp_path / "p.png").exists()


@pytest.mark.parametrize("folder", ["A5_sam", "A6_alexeyab_layers"])
def test_fuse_and_partial_keep_the_new_layers(tmp_path, folder):
    """fuse folds BN into the convolutions and carries shortcut/implicit weights over; the fused
    network computes what the original does. partial's file fills the first layers."""
    from engine import models
    from engine.network import Network

    cfg, weights, batch, inputs, dumps = read_set(folder)
    net = engine.load(cfg, weights, quiet=True)
    fused = models.fuse(net, str(tmp_path / "f.cfg"), str(tmp_path / "f.weights"))
    x = inputs.reshape((batch,) + net.input_shape)
    last = len(net.layers) - 1
    fused.forward(fused.ops.asarray(x))
    expected = dumps[last]
    got = fused.ops.to_host(fused.outputs[last]).reshape(batch, -1)
    assert np.abs(got - expected).max() <= TOLERANCE * max(1, np.abs(expected).max())
    reloaded = engine.load(str(tmp_path / "f.cfg"), str(tmp_path / "f.weights"), quiet=True)
    reloaded.forward(reloaded.ops.asarray(x))
    np.testing.assert_allclose(reloaded.ops.to_host(reloaded.outputs[last]).reshape(batch, -1),
                               got, rtol=1e-5, atol=1e-6)
    count = len(net.layers) // 2
    models.partial(net, str(tmp_path / "p.weights"), count)
    partial_net = Network(cfg, quiet=True)
    assert partial_net.load_weights(str(tmp_path / "p.weights")) <= count
    for layer, original in zip(partial_net.layers[:count], net.layers[:count]):
        for name in layer.weight_order:
            np.testing.assert_array_equal(layer.params[name], original.params[name])
