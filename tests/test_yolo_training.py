"""Detector training: a tiny two-head YOLO network learning boxes on synthetic images, the
deltas of several [yolo] heads summing through the shared layers, label files (Darknet's
labels/*.txt) and their errors, and `engine train` on yolov3-tiny.cfg end to end."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from engine import cli
from engine.data import DataConfig
from engine.detection import box_iou, network_detections
from engine.detection_data import DetectionDataset, clamp_boxes, label_path, read_boxes
from engine.errors import ConfigError, DataError
from engine.network import Network
from engine.train import EagerSteps, PlannedCapturedSteps, iteration_runner, train

from conftest import CFG
from helpers import as_float64, write_cfg

CLASSES = 2
# Two heads: 8x8 cells (anchors 2, 3) and, through an upsample and a route, 16x16 (anchors 0, 1).
TINY_YOLO = f"""
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
filters={2 * (5 + CLASSES)}
size=1
activation=linear

[yolo]
mask=2,3
anchors=5,5, 8,8, 12,12, 18,18
classes={CLASSES}
num=4

[route]
layers=-3

[upsample]
stride=2

[route]
layers=-1,2

[convolutional]
filters={2 * (5 + CLASSES)}
size=1
activation=linear

[yolo]
mask=0,1
anchors=5,5, 8,8, 12,12, 18,18
classes={CLASSES}
num=4
"""
HEADS = (6, 11)


def _tiny_cfg(folder, batch=8, max_batches=30, learning_rate=0.01):
    return write_cfg(folder / "tiny-yolo.cfg",
                     dict(batch=batch, subdivisions=1, width=32, height=32, channels=3,
                          learning_rate=learning_rate, momentum=0.9, decay=0.0005,
                          max_batches=max_batches), TINY_YOLO)


def _synthetic_set(folder, count=8, size=32, seed=0):
    """`count` images with one or two filled rectangles (class 0 red, class 1 blue) on grey, in
    folder/images, their boxes in folder/labels, and a .data file naming them."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    names = []
    for n in range(count):
        pixels = np.full((size, size, 3), 128, np.uint8)
        lines = []
        for _ in range(rng.integers(1, 3)):
            cls = int(rng.integers(0, CLASSES))
            w, h = (int(v) for v in rng.integers(6, 16, 2))
            left, top = (int(v) for v in rng.integers(0, size - np.array([w, h])))
            pixels[top:top + h, left:left + w] = (220, 30, 30) if cls == 0 else (30, 30, 220)
            lines.append(f"{cls} {(left + w / 2) / size} {(top + h / 2) / size} {w / size} {h / size}")
        Image.fromarray(pixels).save(folder / "images" / f"{n}.png")
        (folder / "labels" / f"{n}.txt").write_text("\n".join(lines) + "\n")
        names.append(f"images/{n}.png")
    (folder / "train.txt").write_text("\n".join(names) + "\n")
    (folder / "shapes.names").write_text("red\nblue\n")
    data = folder / "shapes.data"
    data.write_text(f"classes={CLASSES}\ntrain={folder}/train.txt\nnames={folder}/shapes.names\n"
                    f"backup={folder}/backup\n")
    return str(data)


# ---- training ------------------------------------------------------------------------------------
def test_tiny_detector_loss_falls(tmp_path):
    """30 iterations on 8 images: the loss falls well below its start, and the boxes have been
    learnt: most training boxes are found (IoU > 0.5, right class) by Darknet's decoding. The
    check runs the forward pass with batch statistics: 30 updates leave BN's rolling ones far
    from converged."""
    data = DataConfig(_synthetic_set(tmp_path))
    net = Network(_tiny_cfg(tmp_path), quiet=True)
    dataset = data.detection_dataset("train", net.input_shape, net.cost_layer.max_boxes)
    assert len(dataset) == 8 and dataset.truth.shape == (8, 90 * 5)
    stream = io.StringIO()
    final = train(net, dataset, str(tmp_path / "backup"), stream=stream)
    assert os.path.exists(final)
    losses = [float(line.split(": ")[1].split(",")[0]) for line in stream.getvalue().splitlines()
              if line[:1].isdigit()]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:3]), losses
    images, truth = dataset.training_batch(np.arange(len(dataset)))
    net.forward(images, train=True)
    found = total = 0
    for b, rows in enumerate(truth.reshape(len(truth), -1, 5)):
        detections = network_detections(net, 32, 32, 0.25, image_index=b)
        for box in rows[rows[:, 0] > 0]:
            total += 1
            found += any(box_iou(d, box[:4]) > 0.5 and p[int(box[4])] > 0.25
                         for d, p in zip(detections.boxes, detections.probs))
    assert found >= 0.7 * total, (found, total)


def test_yolo_training_records_with_the_truths_plans(tmp_path):
    """The [yolo] loss needs a plan made on the host from the truth, so a backend that can
    record gets PlannedCapturedSteps (one recording, the plans set before each replay), not
    CapturedSteps; a numpy backend, EagerSteps."""
    net = Network(_tiny_cfg(tmp_path), quiet=True)
    assert type(iteration_runner(net, None)) is EagerSteps
    net.ops.can_record = True  # a backend that could record
    assert type(iteration_runner(net, None)) is PlannedCapturedSteps


def test_heads_deltas_sum_through_the_shared_layers(tmp_path):
    """Backward is linear in the seeded deltas: the parameter updates of one step with both
    [yolo] heads equal the sum of those from each head alone; the shared first layer gets
    something from each, a head's own convolution only from its head. train_step seeds both
    heads and reports their mean cost, as Darknet's calc_network_cost does."""
    data = DataConfig(_synthetic_set(tmp_path, count=4))
    net = Network(_tiny_cfg(tmp_path, batch=4), quiet=True)
    dataset = data.detection_dataset("train", net.input_shape, net.cost_layer.max_boxes)
    images, truth = dataset.training_batch(np.arange(4))
    assert [layer.index for layer in net.cost_layers] == list(HEADS)

    def updates():
        result = {(layer.index, name): u.copy() for layer in net.layers
                  for name, u in layer.updates.items()}
        for layer in net.layers:
            for u in layer.updates.values():
                u[...] = 0
        return result

    net.forward(images, train=True)
    costs, deltas = zip(*(net.layers[i].cost(net.ops, truth) for i in HEADS))
    alone = []
    for i, delta in zip(HEADS, deltas):
        net.backward({i: delta.copy()})
        alone.append(updates())
    net.backward({i: delta.copy() for i, delta in zip(HEADS, deltas)})
    both = updates()
    for key in both:
        np.testing.assert_allclose(both[key], alone[0][key] + alone[1][key], rtol=1e-4,
                                   atol=1e-5 * np.abs(both[key]).max(), err_msg=str(key))
    assert np.abs(alone[0][0, "weights"]).max() > 0 and np.abs(alone[1][0, "weights"]).max() > 0
    assert not alone[0][10, "weights"].any() and not alone[1][5, "weights"].any()
    # The same through train_step (which repeats the forward pass).
    cost = net.train_step(images, truth)
    assert cost == pytest.approx(sum(costs) / 2, rel=1e-5)
    for key, value in updates().items():
        np.testing.assert_allclose(value, both[key], rtol=1e-4, atol=1e-5 * np.abs(value).max())


def _surrogate_loss(net, seeds, outputs0, scales):
    """The loss whose negative gradient the seeded [yolo] deltas are, with the entries that get
    a target fixed to those the deltas at the reference point had: for the logistic entries
    s * binary cross-entropy(logistic(z), t), for the raw w, h entries s/2 * (t - z)^2, where
    z is the head's input, s = 2 - truth area for the box entries (else 1), and each target t
    is recovered from the reference delta d = s * (t - output)."""
    total = 0.0
    for i, delta in seeds.items():
        layer = net.layers[i]
        shape = (len(delta), len(layer.mask), layer.entries) + delta.shape[2:]
        z = net.outputs[layer.input_indices[0]].reshape(shape)
        d, o = delta.reshape(shape).astype(np.float64), outputs0[i].reshape(shape)
        s = np.ones(shape)
        s[:, :, :4] = scales[:, None, None, None, None]
        t = o + d / s
        raw = np.zeros(layer.entries, bool)
        raw[2:4] = True
        p = 1 / (1 + np.exp(-z))
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
        per_entry = np.where(raw[None, None, :, None, None], (t - z) ** 2 / 2, bce)
        total += float((s * per_entry)[d != 0].sum())
    return total


def test_whole_network_gradient_is_the_summed_yolo_delta(tmp_path):
    """float64 finite differences: with one truth per image (so each box entry's scale is known)
    the updates of the shared and the head-specific convolutions are minus the gradient of the
    summed per-head loss that Darknet's delta differentiates (see engine/layers/yolo.py)."""
    net = Network(_tiny_cfg(tmp_path, batch=3), quiet=True)
    rng = np.random.default_rng(3)
    for layer in net.layers:
        as_float64(layer, rng)
    x = rng.uniform(0, 1, (3, 3, 32, 32))
    truth = np.zeros((3, 90 * 5), np.float32)
    truth[:, :5] = [[0.3, 0.6, 0.2, 0.3, 1], [0.7, 0.2, 0.5, 0.4, 0], [0.55, 0.5, 0.15, 0.1, 1]]
    scales = 2 - truth[:, 2] * truth[:, 3]
    net.forward(x, train=True)
    seeds = {i: net.layers[i].cost(net.ops, truth)[1].astype(np.float64) for i in HEADS}
    outputs0 = {i: np.array(net.outputs[i], np.float64) for i in HEADS}
    net.backward({i: d.copy() for i, d in seeds.items()})

    def loss():
        net.forward(x, train=True)
        return _surrogate_loss(net, seeds, outputs0, scales)

    eps, checked = 1e-6, 0
    for index in (0, 5, 10):  # shared, head at layer 6, head at layer 11
        p, updates = net.layers[index].params["weights"], net.layers[index].updates["weights"]
        for k in rng.choice(p.size, 6, replace=False):
            old = p.flat[k]
            p.flat[k] = old + eps
            up = loss()
            p.flat[k] = old - eps
            down = loss()
            p.flat[k] = old
            numeric = (up - down) / (2 * eps)
            assert abs(-updates.flat[k] - numeric) <= 1e-4 * max(1.0, abs(numeric)), \
                (index, k, -updates.flat[k], numeric)
            checked += 1
    assert checked == 18


def test_classes_must_match(tmp_path):
    folder = tmp_path / "set"
    data = DataConfig(_synthetic_set(folder, count=2))
    net = Network(write_cfg(tmp_path / "three.cfg", dict(batch=2, width=32, height=32, channels=3),
                            TINY_YOLO.replace("classes=2", "classes=3")
                            .replace(f"filters={2 * (5 + CLASSES)}", "filters=16")), quiet=True)
    dataset = data.detection_dataset("train", net.input_shape, 90)
    with pytest.raises(ConfigError, match=r"three.cfg:\d+: \[yolo\] classes=3, but the data"):
        train(net, dataset, str(tmp_path), stream=io.StringIO(), max_batches=1)


# ---- label files ---------------------------------------------------------------------------------
def test_label_path_follows_darknet():
    assert label_path("data/coco/images/train2014/a.jpg") == "data/coco/labels/train2014/a.txt"
    assert label_path("VOC2007/JPEGImages/000005.JPEG") == "VOC2007/labels/000005.txt"
    assert label_path("/x/images/b.png") == "/x/labels/b.txt"


def test_a_label_beside_its_image_is_read_as_alexeyabs_fork_does(tmp_path):
    """AlexeyAB's layout (x.png with x.txt beside it, no labels/ folder) loads its boxes; where
    both exist, pjreddie's labels/ file is the one read."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    (images / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    assert label_path(str(images / "a.png")) == str(images / "a.txt")
    np.testing.assert_allclose(read_boxes(label_path(str(images / "a.png")), 2),
                               [[0.5, 0.5, 0.2, 0.2, 1]])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    assert label_path(str(images / "a.png")) == str(tmp_path / "labels" / "a.txt")


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "expected 'class x_center y_center width height', got '0 0.5 0.5 0.2'"),
    ("0 0.5 0.5 0.2 0.2 7", "expected 'class x_center y_center width height'"),
    ("red 0.5 0.5 0.2 0.2", "expected an integer class and four numbers, got 'red 0.5"),
    ("0 0.5 0,5 0.2 0.2", "expected an integer class and four numbers"),
    ("2 0.5 0.5 0.2 0.2", r"class 2 lies outside 0..1 \(classes=2\)"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 lies outside"),
    ("1 nan 0.5 0.2 0.2", "box values must be finite numbers"),
])
def test_malformed_label_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "a.txt"
    path.write_text(f"1 0.5 0.5 0.25 0.25\n\n{line}\n")
    with pytest.raises(DataError, match=f"^{path}:3: {message}") as error:
        read_boxes(str(path), CLASSES)
    assert "\n" not in str(error.value)


def test_malformed_label_through_the_cli(tmp_path, capsys):
    data = _synthetic_set(tmp_path, count=2)
    (tmp_path / "labels" / "1.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5\n")
    code = cli.main(["train", _tiny_cfg(tmp_path, batch=2), "--data", data, "--cpu",
                     "--max-batches", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"engine train: error: {tmp_path}/labels/1.txt:2: expected "
                           "'class x_center y_center width height', got '0 0.5 0.5'")


def test_truth_rows_as_darknets(tmp_path, capsys):
    """Rows (x, y, w, h, class), zero-padded to max_boxes; edges clamped to the image, boxes
    under 0.001 dropped, at most max_boxes kept; a missing label file is an image without boxes
    and a warning."""
    folder = tmp_path / "set"
    _synthetic_set(folder, count=3)
    (folder / "labels" / "0.txt").write_text(
        "1 0.5 0.25 0.5 0.25\n0 0.9 0.5 0.4 0.2\n1 0.3 0.3 0.0005 0.2\n0 0.2 0.2 0.1 0.1\n")
    os.remove(folder / "labels" / "2.txt")
    dataset = DetectionDataset(str(folder / "train.txt"), CLASSES, (3, 32, 32), max_boxes=2)
    assert "1 of 3 images have no label file" in capsys.readouterr().err
    assert dataset.truth.shape == (3, 10)
    np.testing.assert_allclose(dataset.truth[0], [0.5, 0.25, 0.5, 0.25, 1,
                                                  0.85, 0.5, 0.3, 0.2, 0], rtol=1e-6)
    assert not dataset.truth[2].any()
    images, truth = dataset.training_batch(np.array([2, 0]))
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.float32
    np.testing.assert_array_equal(truth, dataset.truth[[2, 0]])
    # The synthetic pixels: grey 128/255 around the rectangles (a plain resize at 32x32 is exact).
    assert images[0, :, 0, 0] == pytest.approx([128 / 255] * 3)
    np.testing.assert_allclose(clamp_boxes(np.array([[0.5, 0.5, 2, 2, 1]], np.float32)),
                               [[0.5, 0.5, 1, 1, 1]])


# ---- end to end ----------------------------------------------------------------------------------
def test_engine_train_on_yolov3_tiny(tmp_path, capsys):
    """`engine train cfg/yolov3-tiny.cfg --data x.data`: Darknet's cfg (at a 64x64 input to stay
    fast on the CPU) trains as a detector and writes _final.weights."""
    data = _synthetic_set(tmp_path, count=4, size=48)
    text = open(os.path.join(CFG, "yolov3-tiny.cfg")).read()
    assert "width=416" in text and "height=416" in text and "classes=80" in text
    cfg = tmp_path / "yolov3-tiny.cfg"
    cfg.write_text(text.replace("width=416", "width=64").replace("height=416", "height=64")
                   .replace("batch=1\n", "batch=2\n").replace("classes=80", f"classes={CLASSES}")
                   .replace("filters=255", f"filters={3 * (5 + CLASSES)}"))
    code = cli.main(["train", str(cfg), "--data", data, "--cpu", "--max-batches", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "backup" / "yolov3-tiny_final.weights").exists()
    lines = [line for line in out.splitlines() if line[:1].isdigit()]
    assert len(lines) == 2 and lines[-1].startswith("2, 1.000: ")


def test_engine_test_refuses_a_detector_with_one_line(tmp_path, capsys):
    """engine test is a classifier's accuracy; on a YOLO cfg it says so instead of failing."""
    import os
    import struct

    from engine import cli
    from conftest import ROOT

    data = tmp_path / "d.data"
    data.write_text("classes=80\nvalid=none.txt\nnames=" + os.path.join(ROOT, "cfg", "coco.names") + "\n")
    weights = tmp_path / "header-only.weights"  # loads as a partial file covering no layer
    weights.write_bytes(struct.pack("<3iQ", 0, 2, 0, 0))
    code = cli.main(["test", os.path.join(ROOT, "cfg", "yolov3-tiny.cfg"), str(weights), "--cpu",
                     "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("this cfg is a detector: measure it with engine map")


@pytest.mark.gpu
def test_fp16_training_alike_with_and_without_channels_last(tmp_path):
    """The tiny detector trained in fp16 on the GPU with its activations stored NHWC (the
    default: convolutions, batch norm and their backward in that layout) and NCHW: the same
    losses within fp16's rounding at the start, both falling alike."""
    from engine.backends.cuda import CudaBackend

    data = DataConfig(_synthetic_set(tmp_path / "set"))
    runs = {}
    for channels_last in (True, False):
        folder = tmp_path / str(channels_last)
        folder.mkdir()
        net = Network(_tiny_cfg(folder), quiet=True, seed=4,
                      backend=CudaBackend(0, precision="fp16", channels_last=channels_last))
        dataset = data.detection_dataset("train", net.input_shape, net.cost_layer.max_boxes)
        stream = io.StringIO()
        train(net, dataset, str(folder / "backup"), stream=stream)
        runs[channels_last] = [float(line.split(": ")[1].split(",")[0])
                               for line in stream.getvalue().splitlines() if line[:1].isdigit()]
        images, _ = dataset.training_batch(np.arange(8))
        net.forward(net.ops.asarray(images), train=True)
        assert getattr(net.outputs[2], "channels_last", False) == channels_last
    nhwc, nchw = np.array(runs[True]), np.array(runs[False])
    assert len(nhwc) == len(nchw) == 30
    assert abs(nhwc[0] - nchw[0]) <= 1e-2 * nchw[0], (nhwc[0], nchw[0])
    assert np.mean(nhwc[-5:]) < 0.25 * np.mean(nhwc[:3]), nhwc
    assert abs(np.mean(nhwc[-5:]) - np.mean(nchw[-5:])) <= 0.2 * np.mean(nchw[-5:]), (nhwc, nchw)
