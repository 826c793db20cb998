"""Detection metrics (engine/evaluation.py) against pycocotools on the same detections, Darknet's
AP rules on hand-worked cases, and `engine map` end to end on a generated MNIST detection set."""

import contextlib
import io
import os
import re

import numpy as np
import pytest

from engine import cli
from engine.evaluation import ImageResult, average_precision, coco_map, darknet_map

from conftest import CFG, ROOT
from helpers import reference_iou, write_cfg

PIXELS = 640.0  # pycocotools works in pixels; IoU does not depend on the scale


def pycocotools_figures(images, classes):
    """(AP@0.50:0.95, AP@0.50) from pycocotools' COCOeval on the same truths and detections."""
    coco = pytest.importorskip("pycocotools.coco")  # the test extra; only these tests need it
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    dataset = {"images": [], "annotations": [], "categories": [{"id": k + 1} for k in range(classes)]}
    results = []
    for n, image in enumerate(images, start=1):
        dataset["images"].append({"id": n, "width": PIXELS, "height": PIXELS})
        for box, cls in zip(image.truth_boxes, image.truth_classes):
            x, y, w, h = box * PIXELS
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": n,
                                           "category_id": int(cls) + 1, "iscrowd": 0,
                                           "bbox": [x - w / 2, y - h / 2, w, h], "area": w * h})
        for box, score, cls in zip(image.boxes, image.scores, image.classes):
            x, y, w, h = box * PIXELS
            results.append({"image_id": n, "category_id": int(cls) + 1, "score": float(score),
                            "bbox": [x - w / 2, y - h / 2, w, h]})
    with contextlib.redirect_stdout(io.StringIO()):
        truth = coco.COCO()
        truth.dataset = dataset
        truth.createIndex()
        evaluator = cocoeval.COCOeval(truth, truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[0], evaluator.stats[1]


def _jitter(rng, box, amount):
    x, y, w, h = box
    return np.array([x + rng.normal(0, amount) * w, y + rng.normal(0, amount) * h,
                     w * np.exp(rng.normal(0, amount)), h * np.exp(rng.normal(0, amount))])


def synthetic(seed, images=30, classes=3, truths=(1, 6), spread=1.0, miss=0.15, duplicates=0.0,
              false_positives=1.0, confusion=0.05, jitter=0.12):
    """Random scenes: truths anywhere (or, with spread < 1, crowded in a corner), detections that
    jitter the truths (some missed, some duplicated, some of the wrong class) plus boxes of no
    truth, with random scores."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(images):
        count = int(rng.integers(truths[0], truths[1] + 1))
        sizes = rng.uniform(0.05, 0.3, (count, 2)) * spread
        centres = rng.uniform(0.2, 0.8, (count, 2)) * spread
        truth_boxes = np.column_stack([centres, sizes])
        truth_classes = rng.integers(0, classes, count)
        boxes, scores, labels = [], [], []
        for box, cls in zip(truth_boxes, truth_classes):
            if rng.random() < miss:
                continue
            for _ in range(1 + int(rng.random() < duplicates) * int(rng.integers(1, 3))):
                boxes.append(_jitter(rng, box, jitter))
                scores.append(rng.uniform(0.05, 1))
                labels.append(int(rng.integers(classes)) if rng.random() < confusion else int(cls))
        for _ in range(rng.poisson(false_positives)):
            boxes.append(np.concatenate([rng.uniform(0.1, 0.9, 2), rng.uniform(0.05, 0.3, 2)]))
            scores.append(rng.uniform(0.005, 0.7))
            labels.append(int(rng.integers(classes)))
        result.append(ImageResult.make(truth_boxes, truth_classes, boxes, scores, labels))
    return result


CASES = {
    "several classes": dict(),
    "many misses": dict(miss=0.5, false_positives=3),
    "duplicates": dict(duplicates=0.5),
    "crowded": dict(truths=(8, 15), spread=0.5, jitter=0.08),
    "ten classes": dict(classes=10, images=60, confusion=0.2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_coco_and_darknet_101_point_map_equal_pycocotools(case):
    """COCO's mAP@0.50:0.95 and Darknet's mAP@0.50 with 101 recall points equal pycocotools'
    AP and AP50 to 1e-3 (every class has truths). COCO's figure is the same computation and
    agrees to rounding; Darknet's matching rule parts from COCO's in crowded scenes (see
    test_darknet_does_not_fall_back_to_a_second_truth), 1e-4 in the crowded case here."""
    classes = CASES[case].get("classes", 3)
    for seed in range(3):
        images = synthetic(seed, **CASES[case])
        expected_coco, expected_50 = pycocotools_figures(images, classes)
        report = darknet_map(images, classes, iou_thresh=0.5, points=101)
        assert abs(report.coco_map - expected_coco) < 1e-3, (case, seed)
        assert abs(report.mean_ap - expected_50) < 1e-3, (case, seed)
        assert 0.05 < expected_coco < expected_50 < 1


def test_at_most_100_detections_per_image_and_class_count_for_coco():
    """COCO keeps the 100 best detections per image and class: 150 false positives that score
    above the true one push it out."""
    rng = np.random.default_rng(0)
    truth = np.array([[0.5, 0.5, 0.2, 0.2]])
    boxes = np.vstack([truth, np.column_stack([rng.uniform(0.05, 0.15, (150, 2)),
                                               np.full((150, 2), 0.05)])])
    scores = np.concatenate([[0.5], rng.uniform(0.6, 0.9, 150)])
    images = [ImageResult.make(truth, [0], boxes, scores, np.zeros(151))]
    expected_coco, _ = pycocotools_figures(images, 1)
    assert coco_map(images, 1) == pytest.approx(expected_coco, abs=1e-6) == 0


def test_darknet_does_not_fall_back_to_a_second_truth():
    """Two truths side by side; the best detection sits on truth A, the second overlaps A best
    but B too (IoU > 0.5). Darknet counts the second a false positive (its best truth is taken);
    COCO gives it B. One class: Darknet's AP50 is 0.5 with 101 points, COCO's 1."""
    a, b = [0.40, 0.5, 0.2, 0.4], [0.46, 0.5, 0.2, 0.4]
    second = [0.43, 0.5, 0.2, 0.4]
    assert reference_iou(second, a) > 0.5 and reference_iou(second, b) > 0.5
    assert reference_iou(second, a) >= reference_iou(second, b)
    images = [ImageResult.make([a, b], [0, 0], [a, second], [0.9, 0.8], [0, 0])]
    report = darknet_map(images, 1, points=101)
    assert report.mean_ap == pytest.approx(51 / 101)  # precision 1 up to recall 0.5
    assert pycocotools_figures(images, 1)[1] == pytest.approx(1.0)


def test_average_precision_rules_by_hand():
    """Ranked TP, FP, TP, FP with 3 truths: precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3.
    Area under the envelope: 1/3 * 1 + 1/3 * 2/3 = 5/9; 11 points: recall 0..0.3 at 1, 0.4..0.6
    at 2/3, above nothing: (4 + 3 * 2/3) / 11."""
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2])
    recall = np.array([1, 1, 2, 2]) / 3
    assert average_precision(precision, recall, 0) == pytest.approx(5 / 9)
    assert average_precision(precision, recall, 11) == pytest.approx(6 / 11)
    assert average_precision(np.array([]), np.array([]), 0) == 0


def test_threshold_figures_by_hand():
    """At thresh 0.25: a TP (IoU 0.6), its duplicate (FP), a wrong-class box (FP), a box below the
    threshold (not counted), one truth missed. TP 1, FP 2, FN 1: precision 1/3, recall 1/2,
    average IoU 0.6 / 3. A class with no truth makes Darknet's mean smaller (AP 0)."""
    truth = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]
    hit = [0.3, 0.3, 0.2, 0.2 * 0.6]  # IoU 0.6
    images = [ImageResult.make(truth, [0, 0], [hit, hit, truth[1], truth[1]],
                               [0.9, 0.5, 0.8, 0.2], [0, 0, 1, 0])]
    report = darknet_map(images, 2, thresh=0.25)
    assert (report.tp, report.fp, report.fn) == (1, 2, 1)
    assert [(c.tp, c.fp, c.truths) for c in report.per_class] == [(1, 1, 2), (0, 1, 0)]
    assert report.precision == pytest.approx(1 / 3) and report.recall == pytest.approx(1 / 2)
    assert report.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert report.average_iou == pytest.approx(0.6 / 3)
    # Class 0 ranked: 0.9 TP, 0.5 FP, 0.2 TP -> AP = 1/2 * 1 + 1/2 * 2/3; class 1: 0.
    assert report.per_class[0].ap == pytest.approx(0.5 + 1 / 3)
    assert report.mean_ap == pytest.approx((0.5 + 1 / 3) / 2)


# ---- engine map end to end ----------------------------------------------------------------------
TINY_DETECTOR = """
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=45
size=1
activation=linear

[yolo]
mask=0,1,2
anchors=6,6, 10,10, 14,14
classes=10
num=3
"""


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mapset")
    cli.main(["mnist-detection", str(folder / "set"), "--train", "16", "--valid", "6", "--size",
              "32", "--min-digit", "8", "--max-digit", "16", "--max-digits", "3"])
    cfg = write_cfg(folder / "tiny-detect.cfg", dict(batch=8, subdivisions=1, width=32, height=32,
                                                     channels=3, learning_rate=0.01,
                                                     max_batches=3), TINY_DETECTOR)
    data = str(folder / "set" / "mnist-detect.data")
    assert cli.main(["train", cfg, "--data", data, "--cpu", "--backup", str(folder / "backup")]) == 0
    return {"cfg": cfg, "data": data, "weights": str(folder / "backup" / "tiny-detect_final.weights")}


def test_engine_map_end_to_end(small_set, capsys):
    """Darknet's report, then the summary line; its figures are the evaluation of the same
    network's detections (the collection of detections is checked by hand here: every valid
    image appears, with its label file's truths)."""
    from engine import evaluation, validation
    from engine.data import DataConfig
    from engine.network import Network

    capsys.readouterr()
    code = cli.main(["map", small_set["cfg"], small_set["weights"], "--data", small_set["data"],
                     "--cpu", "--points", "101"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len([line for line in lines if line.startswith("class_id = ")]) == 10
    assert "used 101 Recall-points" in out and "F1-score" in out and "average IoU" in out
    match = re.fullmatch(r"mAP@0\.50 = (\d\.\d{4})  mAP@0\.50:0\.95 = (\d\.\d{4})  \(6 images\)",
                         lines[-1])
    assert match, lines[-1]
    net = Network(small_set["cfg"], quiet=True)
    net.load_weights(small_set["weights"])
    net.fold_batchnorm()
    data = DataConfig(small_set["data"])
    results = validation.detector_results(net, data.values["valid"], 10)
    assert len(results) == 6
    truth_rows = sum(len(open(p.strip().replace("images", "labels", 1)[:-4] + ".txt").readlines())
                     for p in open(data.values["valid"]))
    assert sum(len(r.truth_classes) for r in results) == truth_rows
    assert all(len(r.scores) and r.scores.min() > 0.005 for r in results)
    report = evaluation.darknet_map(results, 10, points=101)
    assert float(match.group(1)) == pytest.approx(report.mean_ap, abs=6e-5)
    assert float(match.group(2)) == pytest.approx(report.coco_map, abs=6e-5)


def test_map_refuses_outputs_that_are_not_finite(small_set):
    """Damaged weights (a NaN bias before a head): detector_results names the layer instead of
    scoring NaN boxes."""
    from engine import validation
    from engine.data import DataConfig
    from engine.errors import NumericalError
    from engine.network import Network

    net = Network(small_set["cfg"], quiet=True)
    net.load_weights(small_set["weights"])
    before = net.layers[net.detection_layers[0].index - 1]
    before.params["biases"][...] = np.nan
    data = DataConfig(small_set["data"])
    with pytest.raises(NumericalError, match=f"layer {before.index} "):
        validation.detector_results(net, data.values["valid"], 10)


def test_engine_test_on_a_detector_points_to_map(small_set, capsys):
    code = cli.main(["test", small_set["cfg"], small_set["weights"], "--data", small_set["data"],
                     "--cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "engine map" in err and len(err.strip().splitlines()) == 1


def test_map_on_a_classifier_is_one_line(capsys):
    code = cli.main(["map", os.path.join(CFG, "mnist.cfg"), os.path.join(ROOT, "weights",
                                                                        "mnist.weights"), "--cpu"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no [yolo]" in err


def test_letter_box_map_sees_what_engine_detect_sees(tmp_path):
    """With [net] letter_box=1 a wide image is letterboxed as `engine detect` does it, and its
    boxes come back in the image's coordinates: the same detections as detection.detect."""
    from PIL import Image

    from engine import detection, validation
    from engine.network import Network

    cfg = write_cfg(tmp_path / "lb.cfg", dict(batch=1, width=32, height=32, channels=3,
                                              letter_box=1), TINY_DETECTOR)
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "wide.png"
    Image.fromarray(rng.integers(0, 255, (20, 50, 3), dtype=np.uint8)).save(path)
    (tmp_path / "list.txt").write_text(f"{path}\n")
    net = Network(cfg, quiet=True, seed=3)
    (result,) = validation.detector_results(net, str(tmp_path / "list.txt"), 10)
    _, found, _ = detection.detect(net, str(path), thresh=0.005, nms=0.45)
    rows, classes = np.nonzero(found.probs > 0)
    assert len(result.scores) == len(rows) > 0
    np.testing.assert_allclose(result.boxes, found.boxes[rows], rtol=1e-6)
    np.testing.assert_allclose(result.scores, found.probs[rows, classes], rtol=1e-6)
    assert len(result.truth_classes) == 0  # no label file: an image without objects


@pytest.mark.gpu
def test_engine_map_on_the_gpu_equals_the_cpu(small_set, capsys):
    """The same weights measured on GPU 0 and on the CPU give the same figures."""
    lines = {}
    for backend in (["--cpu"], ["--gpu", "0"]):
        capsys.readouterr()
        assert cli.main(["map", small_set["cfg"], small_set["weights"], "--data", small_set["data"],
                         "--points", "101"] + backend) == 0
        lines[backend[0]] = capsys.readouterr().out.strip().splitlines()[-1]
    cpu = [float(v) for v in re.findall(r"= (\d\.\d{4})", lines["--cpu"])]
    gpu = [float(v) for v in re.findall(r"= (\d\.\d{4})", lines["--gpu"])]
    np.testing.assert_allclose(gpu, cpu, atol=2e-4)
