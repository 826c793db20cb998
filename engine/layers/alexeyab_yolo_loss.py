"""AlexeyAB's [yolo] training loss (its src/yolo_layer.c: forward_yolo_layer / process_batch,
delta_yolo_box, delta_yolo_class, averages_yolo_deltas, and dx_box_iou in src/box.c).

Its per-prediction part runs on the backend (YoloLayer._yolo_loss: truth_overlap with the class
gate, objectness_delta_); what is here is the per-truth part, on the host, vectorised over the
mini-batch's events (engine.layers.yolo_cells): the cells truths land in, gathered from the
backend, their deltas computed with numpy round by round, scattered back; and the cost.

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

from ..backends.yolo_truths import IOU_LOSSES
from ..boxes import iou_or_zero, listed_truths, prediction_boxes
from .yolo_cells import mask_slots, truth_events

IOU_KINDS = ("iou", "giou", "diou", "ciou")
CLASS_MATCH_THRESH = 0.25  # compare_yolo_class: a class score above it lets ignore_thresh act
FOCAL_ALPHA = 0.5  # delta_yolo_class's focal loss
FLT_MAX = float(np.finfo(np.float32).max)


class Box:
    """Boxes (centre x, y and size w, h) as float64 numbers or arrays that broadcast: the
    functions below compute on all of them at once, as box.c does on one."""
    __slots__ = ("x", "y", "w", "h")

    def __init__(self, x, y, w, h):
        self.x, self.y, self.w, self.h = (np.asarray(v, dtype=np.float64) for v in (x, y, w, h))


def box_iou(a, b):
    return iou_or_zero(a.x, a.y, a.w, a.h, b.x, b.y, b.w, b.h)


def _overlap(x1, w1, x2, w2):
    return np.minimum(x1 + w1 / 2, x2 + w2 / 2) - np.maximum(x1 - w1 / 2, x2 - w2 / 2)


def _enclosing(a, b):
    top = np.minimum(a.y - a.h / 2, b.y - b.h / 2)
    bottom = np.maximum(a.y + a.h / 2, b.y + b.h / 2)
    left = np.minimum(a.x - a.w / 2, b.x - b.w / 2)
    right = np.maximum(a.x + a.w / 2, b.x + b.w / 2)
    return right - left, bottom - top


def iou_intersection(a, b):
    w, h = _overlap(a.x, a.w, b.x, b.w), _overlap(a.y, a.h, b.y, b.h)
    return np.where((w < 0) | (h < 0), 0.0, w * h)


def box_iou_kind(a, b, kind):
    """box_iou / box_giou / box_diou / box_ciou of AlexeyAB's box.c."""
    iou = box_iou(a, b)
    if kind == "iou":
        return iou
    cw, ch = _enclosing(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "giou":
            c = cw * ch
            inter_union = a.w * a.h + b.w * b.h - iou_intersection(a, b)
            return np.where(c == 0, iou, iou - (c - inter_union) / c)
        c = cw * cw + ch * ch
        d = (a.x - b.x) ** 2 + (a.y - b.y) ** 2
        if kind == "diou":
            return np.where(c == 0, iou, iou - (d / c) ** 0.6)
        ar = 4 / np.pi ** 2 * (np.arctan(b.w / b.h) - np.arctan(a.w / a.h)) ** 2
        alpha = ar / (1 - iou + ar + 0.000001)
        return np.where(c == 0, iou, iou - (d / c + alpha * ar))


def dx_box_iou(pred, truth, kind):
    """AlexeyAB's dx_box_iou: (dx, dy, dw, dh) for iou_loss `kind` (iou, giou, diou, ciou)."""
    pt = np.minimum(pred.y - pred.h / 2, pred.y + pred.h / 2)
    pb = np.maximum(pred.y - pred.h / 2, pred.y + pred.h / 2)
    pl = np.minimum(pred.x - pred.w / 2, pred.x + pred.w / 2)
    pr = np.maximum(pred.x - pred.w / 2, pred.x + pred.w / 2)
    tt, tb = truth.y - truth.h / 2, truth.y + truth.h / 2
    tl, tr = truth.x - truth.w / 2, truth.x + truth.w / 2
    X = (pb - pt) * (pr - pl)
    Xhat = (tb - tt) * (tr - tl)
    Ih = np.minimum(pb, tb) - np.maximum(pt, tt)
    Iw = np.minimum(pr, tr) - np.maximum(pl, tl)
    I = Iw * Ih  # not clamped at 0, as in the C
    U = X + Xhat - I
    S = (pred.x - truth.x) ** 2 + (pred.y - truth.y) ** 2
    gCw = np.maximum(pr, tr) - np.minimum(pl, tl)
    gCh = np.maximum(pb, tb) - np.minimum(pt, tt)
    gC = gCw * gCh
    dX = {"t": -(pr - pl), "b": pr - pl, "l": -(pb - pt), "r": pb - pt}
    dI = {"t": np.where(pt > tt, -Iw, 0.0), "b": np.where(pb < tb, Iw, 0.0),
          "l": np.where(pl > tl, -Ih, 0.0), "r": np.where(pr < tr, Ih, 0.0)}
    dU = {k: dX[k] - dI[k] for k in dX}
    dC = {"t": np.where(pt < tt, -gCw, 0.0), "b": np.where(pb > tb, gCw, 0.0),
          "l": np.where(pl < tl, -gCh, 0.0), "r": np.where(pr > tr, gCh, 0.0)}
    with np.errstate(divide="ignore", invalid="ignore"):
        p = {k: np.where(U > 0, ((U * dI[k]) - (I * dU[k])) / (U * U), 0.0) for k in dX}
        # (pred top < bottom and left < right always hold for w, h >= 0, so no corner swap)
        if kind == "giou":
            g = {k: np.where(gC != 0, ((gC * dU[k]) - (U * dC[k])) / (gC * gC), np.nan) for k in dX}
            apart = (Iw <= 0) | (Ih <= 0)
            p = {k: np.where(apart, g[k], np.where(gC > 0, p[k] + g[k], p[k])) for k in dX}
        Cw, Ch = _enclosing(pred, truth)
        C = Cw * Cw + Ch * Ch
        dCw_dx = np.where(pr > tr, 1.0, 0.0) - np.where(pl < tl, 1.0, 0.0)
        dCw_dw = np.where(pr > tr, 0.5, 0.0) - np.where(pl < tl, -0.5, 0.0)
        dCh_dy = np.where(pb > tb, 1.0, 0.0) - np.where(pt < tt, 1.0, 0.0)
        dCh_dh = np.where(pb > tb, 0.5, 0.0) - np.where(pt < tt, -0.5, 0.0)
        dx, dy = p["l"] + p["r"], p["t"] + p["b"]
        dw, dh = p["r"] - p["l"], p["b"] - p["t"]
        if kind not in ("diou", "ciou"):
            return dx, dy, dw, dh
        alpha_dw = alpha_dh = 0.0
        if kind == "ciou":
            atan_diff = np.arctan(truth.w / truth.h) - np.arctan(pred.w / pred.h)
            ar_loss = 4 / np.pi ** 2 * atan_diff * atan_diff
            alpha = np.where(U != 0, ar_loss / (1 - I / U + ar_loss + 0.000001), np.nan)
            alpha_dw = alpha * 8 / np.pi ** 2 * atan_diff * pred.h
            alpha_dh = alpha * -8 / np.pi ** 2 * atan_diff * pred.w
        spread, CC = C != 0, C * C
        ddx = np.where(spread, (2 * (truth.x - pred.x) * C - (2 * Cw * dCw_dx) * S) / CC, np.nan)
        ddy = np.where(spread, (2 * (truth.y - pred.y) * C - (2 * Ch * dCh_dy) * S) / CC, np.nan)
        ddw = np.where(spread, (2 * Cw * dCw_dw) * S / CC + alpha_dw, np.nan)
        ddh = np.where(spread, (2 * Ch * dCh_dh) * S / CC + alpha_dh, np.nan)
        apart = (Iw <= 0) | (Ih <= 0)
        return tuple(np.where(apart, dd, np.where(C > 0, d + dd, d))
                     for d, dd in ((dx, ddx), (dy, ddy), (dw, ddw), (dh, ddh)))


class AlexeyabYoloLoss:
    """AlexeyAB's loss for one [yolo] layer and mini-batch, as the parts YoloLayer._yolo_loss
    runs: what the dense part needs (classes checked, the class gate, obj_normalizer,
    objectness_smooth), `truth_events` (the truth loop's events in Darknet's order), `start` and
    `apply` (the events' deltas, round by round, on the gathered cells), `finish`
    (averages_yolo_deltas) and `cost`."""

    class_gate = CLASS_MATCH_THRESH

    def __init__(self, layer, net_w, net_h):
        self.layer, self.net_w, self.net_h = layer, net_w, net_h
        self.classes = layer.classes
        self.obj_normalizer = layer.obj_normalizer
        self.smooth = bool(layer.objectness_smooth)

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
        best = box_iou(shapes, shifted).argmax(axis=1)  # the first largest (0 if none overlaps)
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

    def start(self, events, cell, rows, out):
        """What each event needs, computed for all at once from the gathered output (`out`,
        row cell[e] for event e): its truth and class, the class multiplier, its box delta
        (which depends on the output only) and the statistics of the cost."""
        L = self.layer
        self.events = events
        truth = rows[events.image, events.row].astype(np.float64)
        self.cls = truth[:, 4].astype(np.int64)
        self.mult = np.ones(len(truth)) if L.class_multipliers is None \
            else L.class_multipliers[self.cls]
        box = out[cell, :4]
        self.box_delta, iou, giou = self.box_deltas(box, truth, events,
                                                    L.iou_normalizer * self.mult)
        counted = ~events.past
        self.count = int(counted.sum())
        # running float64 sums over the truth events, in Darknet's order (as the scalar code)
        self.iou_loss = float(np.cumsum(1 - iou[counted])[-1]) if self.count else 0.0
        self.giou_loss = float(np.cumsum(1 - giou[counted])[-1]) if self.count else 0.0
        if self.smooth and events.past.any():
            # truth_thresh's objectness_smooth targets use the best IoU: in float64, as the numpy
            # backend's truth_overlap computes it (the GPU's is float32)
            lh, lw = self.grid
            sizes = L.mask_anchors.astype(np.float64)[events.slot]
            pred = prediction_boxes(box, events.i, events.j, lw, lh, sizes[:, 0], sizes[:, 1],
                                    self.net_w, self.net_h, L.new_coords)
            self.best = iou_or_zero(*pred, *(truth[:, k] for k in range(4)))

    def box_deltas(self, box, truth, events, normalizer):
        """delta_yolo_box of every event, what it adds to its cell's box delta (float64, (n, 4)),
        and the IoU and GIoU of prediction and truth. The prediction's size is float32 here,
        as get_yolo_box computes it with a float anchor."""
        L = self.layer
        lh, lw = self.grid
        sizes = L.anchors[events.anchor]
        x = box.astype(np.float64)
        if L.new_coords:
            pw = (x[:, 2] * x[:, 2] * 4).astype(np.float32) * sizes[:, 0] / np.float32(self.net_w)
            ph = (x[:, 3] * x[:, 3] * 4).astype(np.float32) * sizes[:, 1] / np.float32(self.net_h)
        else:
            with np.errstate(over="ignore"):
                pw = np.exp(x[:, 2]).astype(np.float32) * sizes[:, 0] / np.float32(self.net_w)
                ph = np.exp(x[:, 3]).astype(np.float32) * sizes[:, 1] / np.float32(self.net_h)
        pred = Box((events.i + x[:, 0]) / lw, (events.j + x[:, 1]) / lh, pw, ph)
        target = Box(*(truth[:, k] for k in range(4)))
        iou, giou = box_iou(pred, target), box_iou_kind(pred, target, "giou")
        pred.w = np.where(pred.w == 0, 1.0, pred.w)
        pred.h = np.where(pred.h == 0, 1.0, pred.h)
        scale = 2 - target.w * target.h
        aw, ah = (sizes[:, k].astype(np.float64) for k in range(2))
        if L.iou_loss == "mse":
            if L.new_coords:
                tw = np.sqrt(target.w * self.net_w / (4 * aw))
                th = np.sqrt(target.h * self.net_h / (4 * ah))
            else:
                tw, th = np.log(target.w * self.net_w / aw), np.log(target.h * self.net_h / ah)
            wanted = np.column_stack([target.x * lw - events.i, target.y * lh - events.j, tw, th])
            return scale[:, None] * (wanted - x) * normalizer[:, None], iou, giou
        d = np.column_stack(dx_box_iou(pred, target, L.iou_loss))
        if not L.new_coords:
            with np.errstate(over="ignore", invalid="ignore"):
                d[:, 2:] *= np.exp(x[:, 2:])
        with np.errstate(over="ignore", invalid="ignore"):
            d = d * normalizer[:, None]
        d[~np.isfinite(d)] = 0
        if L.max_delta != FLT_MAX:
            d = np.clip(d, -L.max_delta, L.max_delta)
        return d, iou, giou

    def apply(self, which, at, out, dlt):
        """One round: events `which` (indexes into the events), on the gathered rows `at` (no
        two alike) of output `out` and delta `dlt`."""
        L = self.layer
        dlt[at, :4] = dlt[at, :4] + self.box_delta[which]  # delta_yolo_box accumulates
        past = self.events.past[which]
        truths, cells = which[~past], at[~past]
        obj = L.obj_normalizer * self.mult[truths] * (1 - out[cells, 4].astype(np.float64))
        if self.smooth:
            obj, cells_written = obj[dlt[cells, 4] == 0], cells[dlt[cells, 4] == 0]
        else:
            cells_written = cells
        dlt[cells_written, 4] = obj
        self.class_delta(out, dlt, cells, self.cls[truths])
        if not past.any():
            return
        # the truth_thresh branch of the per-prediction loop
        bests, cells = which[past], at[past]
        cls = self.cls[bests]
        if self.smooth:
            squared = self.best[bests] * self.best[bests]
            dlt[cells, 4] = L.obj_normalizer * (squared - out[cells, 4].astype(np.float64))
        else:
            dlt[cells, 4] = L.obj_normalizer * (1 - out[cells, 4].astype(np.float64))
        self.class_delta(out, dlt, cells, cls)
        if self.smooth:
            scores = out[cells, 5 + cls].astype(np.float64)
            dlt[cells, 5 + cls] = self.mult[bests] * (squared - scores)

    def smoothed(self, target):
        eps = self.layer.label_smooth_eps
        return target * (1 - eps) + 0.5 * eps if eps else target

    def class_delta(self, out, dlt, cells, cls):
        """delta_yolo_class on gathered rows `cells` (no two alike), class `cls` each."""
        L = self.layer
        mult = L.class_multipliers
        o, d = out[cells, 5:].astype(np.float64), dlt[cells, 5:]
        k = np.arange(len(cells))
        # a class delta already set (an earlier truth on the cell): only the truth's class entry
        marked = d[k, cls] != 0
        if marked.any():
            m, c = k[marked], cls[marked]
            value = self.smoothed(1.0) - o[m, c]
            d[m, c] = np.where(np.isfinite(value), value, d[m, c])
            if mult is not None:
                d[m, c] = d[m, c] * mult[c]
        f, c = k[~marked], cls[~marked]
        onehot = np.zeros((len(f), L.classes))
        onehot[np.arange(len(f)), c] = 1.0
        if L.focal_loss:
            pt = o[f, c] + 0.000000000000001
            with np.errstate(divide="ignore", invalid="ignore"):
                grad = -(1 - pt) * (2 * pt * np.log(pt) + pt - 1)
            d[f] = (onehot - o[f]) * FOCAL_ALPHA * grad[:, None]
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                value = self.smoothed(onehot) - o[f]
            d[f] = np.where(np.isfinite(value), value, d[f])
            if mult is not None:
                d[f, c] = d[f, c] * (mult[c] * L.cls_normalizer)
        dlt[cells, 5:] = d

    def finish(self, dlt):
        """averages_yolo_deltas (iou_thresh < 1): a cell's box delta over the number of classes
        marked in it, where its objectness delta is not 0 (cells outside `dlt` have no box
        delta)."""
        if self.layer.iou_thresh < 1:
            marked = (dlt[:, 5:] > 0).sum(axis=1)
            average = (dlt[:, 4] != 0) & (marked > 0)
            dlt[average, :4] = dlt[average, :4] / marked[average, None]

    def cost(self, total, dlt):
        """AlexeyAB's reported cost (show_details=1, its default), from `total`, the sum of the
        squared deltas: that sum for iou_loss=mse; else iou_normalizer * the mean (1 - GIoU) for
        giou, (1 - IoU) otherwise, plus obj_normalizer * the squared non-box deltas (the box
        deltas are all in `dlt`)."""
        L = self.layer
        if L.iou_loss == "mse":
            return total
        boxes = float(np.square(dlt[:, :4], dtype=np.float64).sum())
        loss = self.giou_loss if L.iou_loss == "giou" else self.iou_loss
        return L.iou_normalizer * loss / max(self.count, 1) + L.obj_normalizer * (total - boxes)

    def cost_of(self, statistics):
        """`cost` from apply_truth_events_'s statistics (engine/backends/yolo_truths.py)."""
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
