"""The MNIST detection set (engine/mnist_detection.py, `engine mnist-detection`): Darknet's
layout, labels that are exactly the pasted digits' boxes, the overlap limit, training scenes from
MNIST's training digits and validation scenes from its test digits, one seed one set."""

import gzip
import itertools
import os
import struct

import numpy as np
import pytest
from PIL import Image

from engine import cli
from engine.data import DataConfig
from engine.detection_data import label_path, read_boxes

SIZE = 64


def _boxes(label_file):
    """Label rows -> (class, (left, top, right, bottom)) in pixels of a SIZE scene."""
    rows = read_boxes(label_file, 10)
    result = []
    for x, y, w, h, cls in rows:
        box = tuple(int(round(v * SIZE)) for v in (x - w / 2, y - h / 2, x + w / 2, y + h / 2))
        result.append((int(cls), box))
    return result


def _iou(a, b):
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "set"
    assert cli.main(["mnist-detection", str(out), "--train", "40", "--valid", "10", "--size",
                     str(SIZE), "--seed", "3", "--max-overlap", "0.15"]) == 0
    return out


def test_layout_and_data_file(generated):
    data = DataConfig(str(generated / "mnist-detect.data"))
    assert data.classes == 10 and data.labels == [str(k) for k in range(10)]
    assert data.backup == "backup/"
    for split, count in (("train", 40), ("valid", 10)):
        paths = (generated / f"{split}.txt").read_text().split()
        assert len(paths) == count
        for path in paths:
            assert os.path.isabs(path) and f"/images/{split}/" in path
            with Image.open(path) as image:
                assert image.size == (SIZE, SIZE)
            assert os.path.exists(label_path(path))
            # the same label beside the image, where AlexeyAB's fork reads it
            beside = os.path.splitext(path)[0] + ".txt"
            assert open(beside).read() == open(label_path(path)).read() != ""
    dataset = data.detection_dataset("valid", (3, SIZE, SIZE), 90)
    assert len(dataset) == 10 and (dataset.truth[:, 0] > 0).all()  # every scene holds a digit


def test_labels_are_the_pasted_digits_boxes(generated):
    """All ink lies inside the labelled boxes, and each box is tight: every one of its four
    edges has ink on it (a box one pixel too large would have a blank edge). Boxes overlap by
    an IoU of at most the limit."""
    counts = []
    for path in (generated / "train.txt").read_text().split():
        with Image.open(path) as image:
            scene = np.asarray(image)
        boxes = _boxes(label_path(path))
        counts.append(len(boxes))
        covered = np.zeros_like(scene, bool)
        for _, (left, top, right, bottom) in boxes:
            assert 0 <= left < right <= SIZE and 0 <= top < bottom <= SIZE
            covered[top:bottom, left:right] = True
            inside = scene[top:bottom, left:right]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not scene[~covered].any()
        for (_, a), (_, b) in itertools.combinations(boxes, 2):
            assert _iou(a, b) <= 0.15 + 1e-9
    assert min(counts) >= 1 and max(counts) > 1


def test_without_overlap_each_box_holds_one_digit_exactly(tmp_path):
    """--max-overlap 0: a box's pixels are that digit's alone, so its ink box is the label box."""
    from engine.mnist_detection import ink_box

    cli.main(["mnist-detection", str(tmp_path), "--train", "10", "--valid", "1", "--size",
              str(SIZE), "--max-overlap", "0"])
    for path in (tmp_path / "train.txt").read_text().split():
        scene = np.asarray(Image.open(path))
        for _, (left, top, right, bottom) in _boxes(label_path(path)):
            only = np.zeros_like(scene)
            only[top:bottom, left:right] = scene[top:bottom, left:right]
            assert ink_box(only) == (left, top, right, bottom)


def test_same_seed_same_bytes(generated, tmp_path):
    cli.main(["mnist-detection", str(tmp_path / "again"), "--train", "40", "--valid", "10",
              "--size", str(SIZE), "--seed", "3", "--max-overlap", "0.15"])
    cli.main(["mnist-detection", str(tmp_path / "other"), "--train", "40", "--valid", "10",
              "--size", str(SIZE), "--seed", "4", "--max-overlap", "0.15"])
    for name in ("images/train/000007.png", "labels/train/000007.txt", "images/valid/000003.png"):
        assert (generated / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (generated / "labels/train/000007.txt").read_bytes() != \
        (tmp_path / "other" / "labels/train/000007.txt").read_bytes()


def _write_idx(path, array):
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_training_scenes_use_training_digits(tmp_path):
    """With a fake MNIST whose training digits are all 3s and test digits all 8s, training
    scenes hold only class 3 and validation scenes only class 8."""
    from engine.mnist_detection import generate

    digits = np.zeros((5, 28, 28), np.uint8)
    digits[:, 6:20, 9:17] = 200
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    _write_idx(mnist / "train-images.idx3-ubyte.gz", digits)
    _write_idx(mnist / "train-labels.idx1-ubyte.gz", np.full(5, 3))
    _write_idx(mnist / "t10k-images.idx3-ubyte.gz", digits)
    _write_idx(mnist / "t10k-labels.idx1-ubyte.gz", np.full(5, 8))
    generate(tmp_path / "out", train=6, valid=6, size=SIZE, mnist_folder=str(mnist))
    for split, cls in (("train", 3), ("valid", 8)):
        classes = {c for path in (tmp_path / "out" / f"{split}.txt").read_text().split()
                   for c, _ in _boxes(label_path(path))}
        assert classes == {cls}


def test_bad_sizes_are_one_line_errors(tmp_path, capsys):
    code = cli.main(["mnist-detection", str(tmp_path), "--size", "32", "--max-digit", "40"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "digit sizes" in err
