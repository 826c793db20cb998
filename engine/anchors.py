"""Anchor sizes for a detector's training set, as AlexeyAB's `darknet detector calc_anchors`
(calc_anchors in src/detector.c, do_kmeans in src/matrix.c) finds them: every label box's size
scaled to the network input (w * width, h * height), clustered by k-means whose distance is
1 - IoU of two boxes sharing a corner, the centres being plain means of their boxes' sizes.

As Darknet: the initial centres are k distinct boxes drawn at random (a seed here, time(0)
there), every box starts in cluster 0, expectation and maximisation alternate until no box
changes cluster (at most 1000 rounds), a centre coordinate that comes out 0 (an empty cluster)
keeps its old value, and the anchors are sorted by area. The report is Darknet's: the average
IoU of each box with its closest anchor, the boxes per class, and the `anchors = ...` line
(whole pixels when width > 32), also written to anchors.txt in the current folder.
"""

import sys

import numpy as np

from .config import resolve_path
from .detection_data import label_path, read_boxes
from .errors import DataError
from .images import read_image_list

MAX_ROUNDS = 1000


def shape_iou(boxes, centres):
    """(N, K) IoU of (w, h) sizes aligned at a corner (Darknet's dist is 1 - this)."""
    inter = (np.minimum(boxes[:, None, 0], centres[None, :, 0])
             * np.minimum(boxes[:, None, 1], centres[None, :, 1]))
    union = (boxes[:, 0] * boxes[:, 1])[:, None] + (centres[:, 0] * centres[:, 1])[None, :] - inter
    return inter / union


def kmeans_iou(sizes, k, rng):
    """Darknet's do_kmeans on (N, 2) sizes -> (k, 2) centres (unsorted), rounds run."""
    centres = sizes[rng.permutation(len(sizes))[:k]].astype(np.float64)
    assignments = np.zeros(len(sizes), np.int64)

    def maximise(centres):
        sums = np.zeros_like(centres)
        np.add.at(sums, assignments, sizes)
        counts = np.bincount(assignments, minlength=k)[:, None]
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        return np.where(means == 0, centres, means)

    if k == 1:
        centres = maximise(centres)
    for rounds in range(MAX_ROUNDS):
        closest = np.argmax(shape_iou(sizes, centres), axis=1)  # the first of equals, as Darknet
        converged = np.array_equal(closest, assignments)
        assignments = closest
        if converged:
            return centres, rounds
        centres = maximise(centres)
    return centres, MAX_ROUNDS


def label_sizes(data_config):
    """(sizes (N, 2) relative w, h of every box of the train list, per-class counts)."""
    if "train" not in data_config.values:
        raise DataError(f"{data_config.path}: no train=... entry (the images whose boxes to "
                        "cluster)")
    list_path = data_config._file(data_config.values["train"], "train")
    rows = []
    for path in read_image_list(list_path):
        boxes = read_boxes(label_path(resolve_path(path, list_path)), data_config.classes)
        if boxes is None:
            continue
        for x, y, w, h, _ in boxes:
            if not (0 < x <= 1 and 0 < y <= 1 and 0 < w <= 1 and 0 < h <= 1):
                print(f"Wrong label: {label_path(path)} - x = {x:f}, y = {y:f}, width = {w:f}, "
                      f"height = {h:f}", file=sys.stderr)
        rows.append(boxes)
    if not rows or not sum(len(r) for r in rows):
        raise DataError(f"{list_path}: no label boxes to cluster")
    boxes = np.concatenate(rows)
    counts = np.bincount(boxes[:, 4].astype(int), minlength=data_config.classes)
    return boxes[:, 2:4].astype(np.float64), counts


def calc_anchors(data_config, num, width, height, seed=0):
    """(anchors (num, 2) in network pixels sorted by area, average IoU, per-class counts)."""
    relative, counts = label_sizes(data_config)
    if num > len(relative):
        raise DataError(f"{data_config.path}: {len(relative)} boxes cannot make {num} clusters")
    sizes = relative * np.float64([width, height])
    centres, _ = kmeans_iou(sizes, num, np.random.default_rng(seed))
    centres = centres[np.argsort(centres[:, 0] * centres[:, 1], kind="stable")]
    average_iou = float(shape_iou(sizes, centres).max(axis=1).mean())
    return centres, average_iou, counts


def anchors_line(anchors, width):
    """Darknet's format: `%3.0f,%3.0f` pairs when width > 32, else `%2.4f,%2.4f`."""
    pattern = "{:3.0f},{:3.0f}" if width > 32 else "{:2.4f},{:2.4f}"
    return ", ".join(pattern.format(w, h) for w, h in anchors)
