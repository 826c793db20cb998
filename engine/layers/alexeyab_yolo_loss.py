"""AlexeyAB's [yolo] training loss (its src/yolo_layer.c: forward_yolo_layer / process_batch,
delta_yolo_box, delta_yolo_class, averages_yolo_deltas, and dx_box_iou in src/box.c).

Its per-prediction part runs on the backend (YoloLayer._yolo_loss: truth_overlap with the class
gate, objectness_delta_), and so does its per-truth part (apply_truth_events_) from a plan the
host makes from the truth alone. What is here: the loss's numbers (a TruthLoss), its truth
loop's events in Darknet's order (truth_events), and its cost. The events' rules themselves
(AlexeyabTruthDeltas: delta_yolo_box, delta_yolo_class, averages_yolo_deltas) live with
apply_truth_events_ in engine/backends/yolo_truths.py, which the numpy backend and the host path
(truth_thresh < 1) run, and in kernels/yolo_truths.cu; box.c's functions in engine/boxes.py.

It differs from pjreddie's YOLOv3 loss (engine.layers.yolo) even with every key at its default:
box deltas are scaled by iou_normalizer (0.75) and *accumulate* when two truths land on one
cell and anchor; a prediction escapes the no-object push only when some class score is above
0.25 besides overlapping a truth by more than ignore_thresh; the class shortcut checks the
truth's own class entry (pjreddie's checks class 0). So cfgs from AlexeyAB's fork train with
this loss and pjreddie's cfgs keep pjreddie's (YoloLayer.loss_kind).

Keys: iou_loss (mse, iou, giou, diou, ciou), iou_normalizer, obj_normalizer, cls_normalizer,
iou_thresh with iou_thresh_kind (extra anchors per truth, their box deltas then averaged over the
classes marked), scale_x_y (in the forward), new_coords, max_delta (clips IoU-loss deltas and
counters_per_class's multipliers), counters_per_class, label_smooth_eps, objectness_smooth,
truth_thresh, focal_loss, delta_normalizer (applied by YoloLayer.cost, as AlexeyAB's GPU backward does).
As in AlexeyAB's code, cls_normalizer acts only together with counters_per_class.

Which deltas are gradients: with iou_loss=mse the x, y, objectness and class deltas are the
negative gradient of binary cross-entropy w.r.t. the logistic's input and w, h that of half the
squared error (times the scale), as in pjreddie's loss. The IoU-loss deltas are not the gradient
of any loss w.r.t. the layer input: dx_box_iou differentiates (G/D/C)IoU w.r.t. the box in
image units, doubles the w and h terms ("we do not divide by 2"), multiplies w, h by exp(w)
but not by the anchor, and x, y get no 1/grid factor; they are re-derived here from the C and
checked against AlexeyAB's own deltas (tests/golden/L*).
"""

import numpy as np

from ..backends.yolo_truths import FLT_MAX, IOU_LOSSES, AlexeyabTruthDeltas, TruthLoss
from ..boxes import Box, box_iou_kind, listed_truths
from .yolo_cells import mask_slots, truth_events

__all__ = ["FLT_MAX", "IOU_LOSSES", "IOU_KINDS", "AlexeyabYoloLoss", "classes_multipliers",
           "sum_of_squares"]
IOU_KINDS = ("iou", "giou", "diou", "ciou")
CLASS_MATCH_THRESH = 0.25  # compare_yolo_class: a class score above it lets ignore_thresh act


class AlexeyabYoloLoss:
    """AlexeyAB's loss for one [yolo] layer and mini-batch, as the parts YoloLayer._yolo_loss
    runs: what the dense part needs (classes checked, the class gate, obj_normalizer,
    objectness_smooth), `truth_events` (the truth loop's events in Darknet's order), the events'
    deltas (`numbers` for apply_truth_events_; `deltas` for the host path) and `cost_of`."""

    class_gate = CLASS_MATCH_THRESH

    def __init__(self, layer, net_w, net_h):
        self.layer, self.net_w, self.net_h = layer, net_w, net_h
        self.classes = layer.classes
        self.obj_normalizer = layer.obj_normalizer
        self.smooth = bool(layer.objectness_smooth)
        keys = {key: getattr(layer, key) for key in TruthLoss.KEYS}
        self.numbers = TruthLoss("alexeyab", layer.mask_anchors, layer.classes, net_w, net_h,
                                 layer.new_coords, **keys)

    def deltas(self):
        """The events' deltas on the host (AlexeyabTruthDeltas), on truth_events' grid."""
        return AlexeyabTruthDeltas(self.numbers, self.grid)

    def truth_events(self, rows, grid):
        """Every usable truth (listed, class in range) in the cell of its centre, in the anchor
        of best shape and (iou_thresh < 1) each other anchor whose iou_thresh_kind overlap in
        shape is > iou_thresh, where this layer predicts it; truth by truth, best anchor first."""
        L = self.layer
        self.grid = lh, lw = grid
        image, row = np.nonzero(listed_truths(rows, L.classes))
        truth = rows[image, row].astype(np.float64)
        i = np.minimum((truth[:, 0] * lw).astype(np.int64), lw - 1)
        j = np.minimum((truth[:, 1] * lh).astype(np.int64), lh - 1)
        anchors = L.anchors.astype(np.float64)
        shapes = Box(0, 0, anchors[:, 0] / self.net_w, anchors[:, 1] / self.net_h)
        shifted = Box(0, 0, truth[:, 2, None], truth[:, 3, None])
        best = box_iou_kind(shapes, shifted, "iou").argmax(axis=1)  # the first largest (0 if none)
        slots = mask_slots(L.mask, L.total)
        chosen = np.zeros((len(truth), L.total), bool)
        chosen[np.arange(len(truth)), best] = True
        if L.iou_thresh < 1:
            chosen |= box_iou_kind(shapes, shifted, L.iou_thresh_kind) > L.iou_thresh
        chosen &= slots >= 0
        k, anchor = np.nonzero(chosen)
        order = np.lexsort((anchor, anchor != best[k], k))
        k, anchor = k[order], anchor[order]
        return truth_events(image[k], row[k], anchor, slots[anchor], j[k], i[k])

    def cost_of(self, statistics):
        """AlexeyAB's reported cost (show_details=1, its default) from the statistics of the
        events' deltas (engine/backends/yolo_truths.py: STATISTICS): the sum of the squared
        deltas for iou_loss=mse; else iou_normalizer * the mean (1 - GIoU) for giou, (1 - IoU)
        otherwise, plus obj_normalizer * the squared deltas other than the touched cells' box
        deltas."""
        squares, boxes, iou_losses, giou_losses, count = (float(v) for v in statistics)
        L = self.layer
        if L.iou_loss == "mse":
            return squares
        loss = giou_losses if L.iou_loss == "giou" else iou_losses
        return L.iou_normalizer * loss / max(count, 1) + L.obj_normalizer * (squares - boxes)


def classes_multipliers(section, classes, max_delta):
    """get_classes_multipliers: counters_per_class=n0,n1,... -> max(n) / n_c, capped at
    max_delta; None without the key."""
    counters = section.int_list("counters_per_class")
    if counters is None:
        return None
    if len(counters) != classes:
        raise section.error(f"counters_per_class lists {len(counters)} values; classes={classes}",
                            "counters_per_class")
    counters = [max(c, 1) for c in counters]
    top = float(max(counters))
    return np.array([min(top / c, max_delta) for c in counters], dtype=np.float64)


def sum_of_squares(values):
    """The sum of squares of a float32 array as one BLAS dot product: it sums in blocks (closer
    to the exact sum than Darknet's running float sum) and makes no float64 copy."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return float(np.dot(flat, flat))
