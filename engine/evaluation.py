"""Detection metrics on given detections and truths, independent of any network: what AlexeyAB's
`darknet detector map` reports (validate_detector_map in src/detector.c), and COCO's
mAP@0.50:0.95 as pycocotools computes it.

Boxes are (x, y, w, h) relative to the image. Per image: truths `(boxes (T, 4), classes (T,))`
and detections `(boxes (D, 4), scores (D,), classes (D,))`, one row per (box, class) whose
probability is above 0 (a box with several classes gives several rows, as Darknet counts them).

Darknet's mAP@IoU (`darknet_map`): every detection, over all images, is matched to the truth of
its class with the highest IoU above `iou_thresh`; ranked by score, a detection is a true
positive if that truth was not already taken by a higher-ranked one, else a false positive
(it does not fall back to another truth). Per class AP is the area under the interpolated
precision-recall curve (`points=0`, VOC 2010+), or the mean interpolated precision at 11 (VOC
2007) or 101 recall points; the mean is over every class, a class without truths counting 0.
At the confidence threshold `thresh` it also reports TP, FP, precision, recall, F1 and the
average IoU (the matched truths' IoU summed over TP + FP).

One difference from Darknet, on purpose: at `thresh` Darknet counts a detection as a false
positive when any earlier detection of the same image in the network's output order, even one
below the threshold, matched the same truth; here a truth is taken at most once among the
detections above the threshold, in order of score.

COCO's mAP@0.50:0.95 (`coco_map`): for each IoU threshold 0.50, 0.55, ..., 0.95 and each
class, at most the 100 best detections per image, each matched in order of score to the
unmatched truth with the highest IoU >= the threshold; AP is the mean precision at the 101
recall points 0, 0.01, ..., 1 of the precision envelope; the mean is over classes that have
truths and over thresholds (pycocotools' COCOeval, area range "all", maxDets 100).
"""

from dataclasses import dataclass, field

import numpy as np

from .boxes import box_iou

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETECTIONS = 100


@dataclass
class ImageResult:
    """One image's truths and detections (numpy arrays; see the module's docstring)."""

    truth_boxes: np.ndarray
    truth_classes: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @staticmethod
    def make(truth_boxes, truth_classes, boxes, scores, classes):
        return ImageResult(np.asarray(truth_boxes, np.float64).reshape(-1, 4),
                           np.asarray(truth_classes, np.int64).reshape(-1),
                           np.asarray(boxes, np.float64).reshape(-1, 4),
                           np.asarray(scores, np.float64).reshape(-1),
                           np.asarray(classes, np.int64).reshape(-1))


@dataclass
class ClassResult:
    ap: float
    truths: int
    tp: int  # at the confidence threshold
    fp: int


@dataclass
class MapReport:
    """What `darknet detector map` prints, plus COCO's mAP@0.50:0.95."""

    per_class: list = field(default_factory=list)
    mean_ap: float = 0.0
    tp: int = 0
    fp: int = 0
    truths: int = 0
    average_iou: float = 0.0
    coco_map: float = 0.0
    images: int = 0
    detections: int = 0

    @property
    def fn(self):
        return self.truths - self.tp

    @property
    def precision(self):
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self):
        return self.tp / self.truths if self.truths else 0.0

    @property
    def f1(self):
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _pairwise_iou(boxes, truths):
    """(D, T) IoU of detections against truths."""
    if not len(boxes) or not len(truths):
        return np.zeros((len(boxes), len(truths)))
    return box_iou(boxes[:, None, :], truths[None, :, :])


def _darknet_matches(image, iou_thresh):
    """For each detection, the index of the same-class truth of highest IoU above iou_thresh
    (-1 if none) and that IoU."""
    ious = _pairwise_iou(image.boxes, image.truth_boxes)
    ious = np.where(image.classes[:, None] == image.truth_classes[None, :], ious, -1.0)
    ious = np.where(ious > iou_thresh, ious, -1.0)
    best = ious.argmax(axis=1) if ious.shape[1] else np.zeros(len(ious), np.int64)
    best_iou = ious[np.arange(len(ious)), best] if ious.shape[1] else np.full(len(ious), -1.0)
    return np.where(best_iou > 0, best, -1), np.maximum(best_iou, 0)


def average_precision(precision, recall, points):
    """AP of one class from precision/recall after each ranked detection (Darknet's rules)."""
    if not len(precision):
        return 0.0
    if points == 0:
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.diff(np.concatenate([[0.0], recall]))
        return float((steps * envelope).sum())
    total = 0.0
    for point in range(points):
        reached = recall >= point / (points - 1)
        total += precision[reached].max() if reached.any() else 0.0
    return total / points


def darknet_map(images, classes, iou_thresh=0.5, points=0, thresh=0.25):
    """Darknet's `detector map` figures over `images` (ImageResult list) -> MapReport."""
    report = MapReport(images=len(images))
    truth_counts = np.zeros(classes, np.int64)
    scores, labels, image_of, truth_of = [], [], [], []
    tp_at = np.zeros(classes, np.int64)
    fp_at = np.zeros(classes, np.int64)
    iou_sum = 0.0
    for n, image in enumerate(images):
        truth_counts += np.bincount(image.truth_classes, minlength=classes)[:classes]
        match, match_iou = _darknet_matches(image, iou_thresh)
        scores.append(image.scores)
        labels.append(image.classes)
        image_of.append(np.full(len(image.scores), n))
        truth_of.append(match)
        taken = set()
        for d in np.argsort(-image.scores, kind="stable"):
            if image.scores[d] <= thresh:
                break
            if match[d] >= 0 and match[d] not in taken:
                taken.add(int(match[d]))
                tp_at[image.classes[d]] += 1
                iou_sum += match_iou[d]
            else:
                fp_at[image.classes[d]] += 1
    scores = np.concatenate(scores or [[]])
    labels, image_of, truth_of = (np.concatenate(part or [[]]).astype(int)
                                  for part in (labels, image_of, truth_of))
    report.detections = len(scores)
    order = np.argsort(-scores, kind="stable")
    for k in range(classes):
        ranked = order[labels[order] == k]
        taken, hits = set(), np.zeros(len(ranked), bool)
        for position, d in enumerate(ranked):
            key = (image_of[d], truth_of[d])
            if truth_of[d] >= 0 and key not in taken:
                taken.add(key)
                hits[position] = True
        tp = np.cumsum(hits)
        fp = np.cumsum(~hits)
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / truth_counts[k] if truth_counts[k] else np.zeros(len(tp))
        report.per_class.append(ClassResult(average_precision(precision, recall, points),
                                            int(truth_counts[k]), int(tp_at[k]), int(fp_at[k])))
    report.mean_ap = float(np.mean([c.ap for c in report.per_class])) if classes else 0.0
    report.tp, report.fp = int(tp_at.sum()), int(fp_at.sum())
    report.truths = int(truth_counts.sum())
    report.average_iou = iou_sum / (report.tp + report.fp) if report.tp + report.fp else 0.0
    report.coco_map = coco_map(images, classes)
    return report


def _coco_image_matches(scores, ious, threshold):
    """COCOeval.evaluateImg's greedy matching for one image, class and IoU threshold: detections
    in order of score (already sorted), each to the unmatched truth of highest IoU >= the
    threshold (a later truth wins a tie). Returns a bool per detection: matched or not."""
    matched_truth = np.zeros(ious.shape[1], bool)
    hits = np.zeros(len(scores), bool)
    for d in range(len(scores)):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for t in range(ious.shape[1]):
            if matched_truth[t] or ious[d, t] < best_iou:
                continue
            best, best_iou = t, ious[d, t]
        if best >= 0:
            matched_truth[best] = hits[d] = True
    return hits


def coco_ap(images, k, threshold, max_detections=COCO_MAX_DETECTIONS):
    """COCO's AP of class k at one IoU threshold; None when the class has no truth."""
    truths, all_scores, all_hits = 0, [], []
    for image in images:
        truth_boxes = image.truth_boxes[image.truth_classes == k]
        mine = np.flatnonzero(image.classes == k)
        mine = mine[np.argsort(-image.scores[mine], kind="mergesort")][:max_detections]
        truths += len(truth_boxes)
        ious = _pairwise_iou(image.boxes[mine], truth_boxes)
        all_scores.append(image.scores[mine])
        all_hits.append(_coco_image_matches(image.scores[mine], ious, threshold))
    if truths == 0:
        return None
    scores, hits = np.concatenate(all_scores), np.concatenate(all_hits)
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(hits[order]).astype(float)
    fp = np.cumsum(~hits[order]).astype(float)
    if not len(tp):
        return 0.0
    recall = tp / truths
    precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[::-1])[::-1]
    where = np.searchsorted(recall, COCO_RECALL_POINTS, side="left")
    return float(np.where(where < len(precision), precision[np.minimum(where, len(precision) - 1)],
                          0.0).mean())


def coco_map(images, classes, thresholds=COCO_IOU_THRESHOLDS):
    """COCO's mAP averaged over `thresholds` (default 0.50:0.95) and the classes with truths."""
    values = [ap for t in thresholds for k in range(classes)
              if (ap := coco_ap(images, k, t)) is not None]
    return float(np.mean(values)) if values else 0.0


def format_report(report, names, thresh, iou_thresh, points):
    """The lines `darknet detector map` prints, then the one-line summary."""
    lines = []
    for k, c in enumerate(report.per_class):
        name = names[k] if names and k < len(names) else str(k)
        lines.append(f"class_id = {k}, name = {name}, ap = {100 * c.ap:.2f}%   \t "
                     f"(TP = {c.tp}, FP = {c.fp}) ")
    lines.append("")
    lines.append(f" for conf_thresh = {thresh:.2f}, precision = {report.precision:.2f}, recall = "
                 f"{report.recall:.2f}, F1-score = {report.f1:.2f} ")
    lines.append(f" for conf_thresh = {thresh:.2f}, TP = {report.tp}, FP = {report.fp}, "
                 f"FN = {report.fn}, average IoU = {100 * report.average_iou:.2f} % ")
    lines.append("")
    used = f"used {points} Recall-points" if points else \
        "used Area-Under-Curve for each unique Recall"
    lines.append(f" IoU threshold = {100 * iou_thresh:.0f} %, {used} ")
    lines.append(f" mean average precision (mAP@{iou_thresh:.2f}) = {report.mean_ap:f}, or "
                 f"{100 * report.mean_ap:.2f} % ")
    lines.append(f"mAP@{iou_thresh:.2f} = {report.mean_ap:.4f}  mAP@0.50:0.95 = "
                 f"{report.coco_map:.4f}  ({report.images} images)")
    return "\n".join(lines)
