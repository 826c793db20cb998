"""The host side of the [yolo] losses (engine.layers.yolo, engine.layers.alexeyab_yolo_loss):
the mini-batch's truth rows and the *events* Darknet's loops apply to single cells (Events and
CellRounds live with apply_truth_events_, in engine.backends.yolo_truths, whose numpy version
applies them round by round; the layers' host path does too, for truth_thresh < 1).

An event is a truth learnt by one anchor of its cell (its best anchor, or one iou_thresh adds),
or a prediction past truth_thresh learning its best truth. Darknet applies an image's events
one after the other, and events on one cell and anchor interact (box deltas accumulate or
overwrite, the class delta reads what an earlier truth wrote). So each event gets its cell's
occurrence number (its *round*): no two events of a round share a cell, and applying rounds
0, 1, 2... each with numpy at once gives the sequential result. Rounds are few (1 to 3).
"""

import numpy as np

from ..backends.yolo_truths import CellRounds, Events, truth_events

__all__ = ["CellRounds", "Events", "truth_events", "truth_rows", "mask_slots",
           "past_truth_thresh"]


def truth_rows(ops, truths, max_boxes):
    """The truth as a host float32 array (B, T, 5) of rows (x, y, w, h, class), T <= max_boxes
    (Darknet's `max`: later rows are not read). `truths`: an array (B, rows*5) on the backend
    or the host (Darknet's net.truth), or one row list per image (zeros pad the shorter)."""
    if isinstance(truths, (list, tuple)):
        images = [np.asarray(rows, dtype=np.float32).reshape(-1, 5)[:max_boxes] for rows in truths]
        padded = np.zeros((len(images), max((len(rows) for rows in images), default=0), 5),
                          np.float32)
        for b, rows in enumerate(images):
            padded[b, :len(rows)] = rows
        return padded
    host = ops.to_host(truths)
    return np.ascontiguousarray(host.reshape(len(host), -1, 5)[:, :max_boxes])


def mask_slots(mask, total):
    """For each of the `total` anchors its first place in `mask`, -1 where the mask lacks it."""
    slots = np.full(total, -1, np.int64)
    for place, anchor in reversed(list(enumerate(mask))):
        slots[anchor] = place
    return slots


def past_truth_thresh(ops, best, index, truth_thresh, mask):
    """The events of the predictions whose best IoU (truth_overlap's best, without the class
    gate) is > truth_thresh, each learning its best truth (index): the branch no shipped cfg
    takes (truth_thresh = 1), so only then are best and index downloaded."""
    b, a, j, i = np.nonzero(ops.to_host(best) > truth_thresh)
    rows = ops.to_host(index)[b, a, j, i].astype(np.int64)
    return Events(image=b, row=rows, anchor=np.asarray(mask, np.int64)[a], slot=a, j=j, i=i,
                  past=np.ones(len(b), bool))


