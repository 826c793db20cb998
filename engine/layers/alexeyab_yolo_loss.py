"""AlexeyAB's [yolo] training loss (its src/yolo_layer.c: forward_yolo_layer / process_batch,
delta_yolo_box, delta_yolo_class, and dx_box_iou in src/box.c), on the host in numpy.

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

import math

import numpy as np

from ..boxes import image_chunks, padded_truths

IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")
IOU_KINDS = ("iou", "giou", "diou", "ciou")
CLASS_MATCH_THRESH = 0.25  # compare_yolo_class: a class score above it lets ignore_thresh act
FOCAL_ALPHA = 0.5  # delta_yolo_class's focal loss
FLT_MAX = float(np.finfo(np.float32).max)


class Box:
    __slots__ = ("x", "y", "w", "h")

    def __init__(self, x, y, w, h):
        self.x, self.y, self.w, self.h = float(x), float(y), float(w), float(h)


def _overlap(x1, w1, x2, w2):
    return min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2)


def box_iou(a, b):
    w, h = _overlap(a.x, a.w, b.x, b.w), _overlap(a.y, a.h, b.y, b.h)
    inter = 0.0 if w < 0 or h < 0 else w * h
    union = a.w * a.h + b.w * b.h - inter
    return 0.0 if inter == 0 or union == 0 else inter / union


def _enclosing(a, b):
    top, bot = min(a.y - a.h / 2, b.y - b.h / 2), max(a.y + a.h / 2, b.y + b.h / 2)
    left, right = min(a.x - a.w / 2, b.x - b.w / 2), max(a.x + a.w / 2, b.x + b.w / 2)
    return right - left, bot - top


def box_iou_kind(a, b, kind):
    """box_iou / box_giou / box_diou / box_ciou of AlexeyAB's box.c."""
    iou = box_iou(a, b)
    cw, ch = _enclosing(a, b)
    if kind == "iou":
        return iou
    if kind == "giou":
        c = cw * ch
        if c == 0:
            return iou
        inter_union = a.w * a.h + b.w * b.h - iou_intersection(a, b)
        return iou - (c - inter_union) / c
    c = cw * cw + ch * ch
    if c == 0:
        return iou
    d = (a.x - b.x) ** 2 + (a.y - b.y) ** 2
    if kind == "diou":
        return iou - (d / c) ** 0.6
    ar = 4 / math.pi ** 2 * (math.atan(b.w / b.h) - math.atan(a.w / a.h)) ** 2
    alpha = ar / (1 - iou + ar + 0.000001)
    return iou - (d / c + alpha * ar)


def iou_intersection(a, b):
    w, h = _overlap(a.x, a.w, b.x, b.w), _overlap(a.y, a.h, b.y, b.h)
    return 0.0 if w < 0 or h < 0 else w * h


def dx_box_iou(pred, truth, kind):
    """AlexeyAB's dx_box_iou: (dx, dy, dw, dh) for iou_loss `kind` (iou, giou, diou, ciou)."""
    pt, pb = sorted((pred.y - pred.h / 2, pred.y + pred.h / 2))
    pl, pr = sorted((pred.x - pred.w / 2, pred.x + pred.w / 2))
    tt, tb = truth.y - truth.h / 2, truth.y + truth.h / 2
    tl, tr = truth.x - truth.w / 2, truth.x + truth.w / 2
    X = (pb - pt) * (pr - pl)
    Xhat = (tb - tt) * (tr - tl)
    Ih = min(pb, tb) - max(pt, tt)
    Iw = min(pr, tr) - max(pl, tl)
    I = Iw * Ih  # not clamped at 0, as in the C
    U = X + Xhat - I
    S = (pred.x - truth.x) ** 2 + (pred.y - truth.y) ** 2
    gCw = max(pr, tr) - min(pl, tl)
    gCh = max(pb, tb) - min(pt, tt)
    gC = gCw * gCh
    dX = {"t": -(pr - pl), "b": pr - pl, "l": -(pb - pt), "r": pb - pt}
    dI = {"t": -Iw if pt > tt else 0.0, "b": Iw if pb < tb else 0.0,
          "l": -Ih if pl > tl else 0.0, "r": Ih if pr < tr else 0.0}
    dU = {k: dX[k] - dI[k] for k in dX}
    dC = {"t": -gCw if pt < tt else 0.0, "b": gCw if pb > tb else 0.0,
          "l": -gCh if pl < tl else 0.0, "r": gCh if pr > tr else 0.0}
    p = {k: ((U * dI[k]) - (I * dU[k])) / (U * U) if U > 0 else 0.0 for k in dX}
    # (pred top < bottom and left < right always hold for w, h >= 0, so no corner swap)
    if kind == "giou":
        g = {k: ((gC * dU[k]) - (U * dC[k])) / (gC * gC) if gC != 0 else math.nan for k in dX}
        if gC > 0:
            p = {k: p[k] + g[k] for k in dX}
        if Iw <= 0 or Ih <= 0:
            p = g
    Cw, Ch = _enclosing(pred, truth)
    C = Cw * Cw + Ch * Ch
    dCw_dx = (1.0 if pr > tr else 0.0) - (1.0 if pl < tl else 0.0)
    dCw_dw = (0.5 if pr > tr else 0.0) - (-0.5 if pl < tl else 0.0)
    dCh_dy = (1.0 if pb > tb else 0.0) - (1.0 if pt < tt else 0.0)
    dCh_dh = (0.5 if pb > tb else 0.0) - (-0.5 if pt < tt else 0.0)
    dx, dy = p["l"] + p["r"], p["t"] + p["b"]
    dw, dh = p["r"] - p["l"], p["b"] - p["t"]
    if kind in ("diou", "ciou"):
        alpha_dw = alpha_dh = 0.0
        if kind == "ciou":
            atan_diff = math.atan(truth.w / truth.h) - math.atan(pred.w / pred.h)
            ar_loss = 4 / math.pi ** 2 * atan_diff * atan_diff
            alpha = ar_loss / (1 - I / U + ar_loss + 0.000001) if U != 0 else math.nan
            alpha_dw = alpha * 8 / math.pi ** 2 * atan_diff * pred.h
            alpha_dh = alpha * -8 / math.pi ** 2 * atan_diff * pred.w
        if C != 0:
            ddx = (2 * (truth.x - pred.x) * C - (2 * Cw * dCw_dx) * S) / (C * C)
            ddy = (2 * (truth.y - pred.y) * C - (2 * Ch * dCh_dy) * S) / (C * C)
            ddw = (2 * Cw * dCw_dw) * S / (C * C) + alpha_dw
            ddh = (2 * Ch * dCh_dh) * S / (C * C) + alpha_dh
        else:
            ddx = ddy = ddw = ddh = math.nan
        if C > 0:
            dx, dy, dw, dh = dx + ddx, dy + ddy, dw + ddw, dh + ddh
        if Iw <= 0 or Ih <= 0:
            dx, dy, dw, dh = ddx, ddy, ddw, ddh
    return dx, dy, dw, dh


def _finite_or_zero(value):
    return value if math.isfinite(value) else 0.0


class AlexeyabYoloLoss:
    """The loss of one [yolo] layer: `batch_delta` fills a mini-batch's delta (Darknet's
    process_batch for each image); `stats` collects what AlexeyAB's cost needs across the
    mini-batch."""

    def __init__(self, layer):
        self.layer = layer

    # ---- pieces of the C, one each -----------------------------------------------------------
    def pred_box(self, out, a, anchor, i, j, lw, lh, net_w, net_h):
        """get_yolo_box."""
        L = self.layer
        x, y, w, h = (float(v) for v in out[a, :4, j, i])
        aw, ah = L.anchors[anchor]
        if L.new_coords:
            return Box((i + x) / lw, (j + y) / lh, w * w * 4 * aw / net_w, h * h * 4 * ah / net_h)
        return Box((i + x) / lw, (j + y) / lh, math.exp(w) * aw / net_w, math.exp(h) * ah / net_h)

    def box_delta(self, out, dlt, truth, anchor, a, i, j, lw, lh, net_w, net_h, scale, normalizer):
        """delta_yolo_box (always accumulating): returns the IoU of prediction and truth."""
        L = self.layer
        pred = self.pred_box(out, a, anchor, i, j, lw, lh, net_w, net_h)
        iou = box_iou(pred, truth)
        giou = box_iou_kind(pred, truth, "giou")
        if pred.w == 0:
            pred.w = 1.0
        if pred.h == 0:
            pred.h = 1.0
        x = out[a, :4, j, i].astype(np.float64)
        aw, ah = (float(v) for v in L.anchors[anchor])
        if L.iou_loss == "mse":
            tx, ty = truth.x * lw - i, truth.y * lh - j
            if L.new_coords:
                tw, th = math.sqrt(truth.w * net_w / (4 * aw)), math.sqrt(truth.h * net_h / (4 * ah))
            else:
                tw, th = math.log(truth.w * net_w / aw), math.log(truth.h * net_h / ah)
            dlt[a, :4, j, i] += scale * (np.array([tx, ty, tw, th]) - x) * normalizer
            return iou, giou
        d = list(dx_box_iou(pred, truth, L.iou_loss))
        if not L.new_coords:
            d[2] *= math.exp(x[2])
            d[3] *= math.exp(x[3])
        d = [_finite_or_zero(v * normalizer) for v in d]
        if L.max_delta != FLT_MAX:
            d = [min(max(v, -L.max_delta), L.max_delta) for v in d]
        dlt[a, :4, j, i] += np.array(d)
        return iou, giou

    def smoothed(self, target):
        eps = self.layer.label_smooth_eps
        return target * (1 - eps) + 0.5 * eps if eps else target

    def class_delta(self, out, dlt, a, i, j, cls):
        """delta_yolo_class."""
        L = self.layer
        mult = L.class_multipliers
        o, d = out[a, 5:, j, i], dlt[a, 5:, j, i]
        if d[cls]:
            value = self.smoothed(1.0) - float(o[cls])
            if math.isfinite(value):
                d[cls] = value
            if mult is not None:
                d[cls] *= mult[cls]
            return
        if L.focal_loss:
            pt = float(o[cls]) + 0.000000000000001
            grad = -(1 - pt) * (2 * pt * math.log(pt) + pt - 1)
            for n in range(L.classes):
                d[n] = ((1.0 if n == cls else 0.0) - float(o[n])) * FOCAL_ALPHA * grad
            return
        target = np.zeros(L.classes)
        target[cls] = 1.0
        with np.errstate(invalid="ignore", over="ignore"):
            value = self.smoothed(target) - o.astype(np.float64)
        finite = np.isfinite(value)
        d[finite] = value[finite]
        if mult is not None:
            d[cls] *= mult[cls] * L.cls_normalizer

    def anchor_truth_delta(self, out, dlt, t, cls, anchor, a, i, j, lw, lh, net_w, net_h, stats):
        """What the truth loop does for a truth and one of its anchors (best or iou_thresh)."""
        L = self.layer
        mult = 1.0 if L.class_multipliers is None else float(L.class_multipliers[cls])
        iou, giou = self.box_delta(out, dlt, t, anchor, a, i, j, lw, lh, net_w, net_h,
                                   2 - t.w * t.h, L.iou_normalizer * mult)
        stats["iou_loss"] += 1 - iou
        stats["giou_loss"] += 1 - giou
        stats["count"] += 1
        obj = L.obj_normalizer * mult * (1 - float(out[a, 4, j, i]))
        if not L.objectness_smooth or dlt[a, 4, j, i] == 0:
            dlt[a, 4, j, i] = obj
        self.class_delta(out, dlt, a, i, j, cls)

    # ---- a mini-batch --------------------------------------------------------------------------
    def batch_delta(self, output, delta, truths, net_w, net_h, stats):
        """process_batch for every image of output, delta (batch, anchors, entries, H, W), truths
        one row list per image: the per-prediction part (objectness, ignore_thresh) for many
        images at once, then each image's truths (images are independent, so the order is
        Darknet's within each image)."""
        L = self.layer
        batch, n_anchors, _, lh, lw = output.shape
        usable = [[(Box(*row[:4]), int(row[4])) for row in truth if 0 <= int(row[4]) < L.classes]
                  for truth in truths]
        delta[:, :, 4] = L.obj_normalizer * (0 - output[:, :, 4])
        for images in image_chunks([len(u) for u in usable], n_anchors * lh * lw):
            self._predictions_delta(output, delta, images, usable, net_w, net_h)
        for b in range(batch):
            self.truths_delta(output[b], delta[b], usable[b], net_w, net_h, stats)

    def _predictions_delta(self, output, delta, images, usable, net_w, net_h):
        """The per-prediction loop of process_batch for `images` (each with usable truths)."""
        L = self.layer
        out = output[images]  # (images, anchors, entries, H, W)
        _, _, _, lh, lw = out.shape
        rows, cols = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
        anchors = L.mask_anchors.astype(np.float64)[None]
        x, y = out[:, :, 0].astype(np.float64), out[:, :, 1].astype(np.float64)
        w, h = out[:, :, 2].astype(np.float64), out[:, :, 3].astype(np.float64)
        px, py = (cols + x) / lw, (rows + y) / lh
        if L.new_coords:
            pw = w * w * 4 * anchors[:, :, 0, None, None] / net_w
            ph = h * h * 4 * anchors[:, :, 1, None, None] / net_h
        else:
            with np.errstate(over="ignore"):
                pw = np.exp(w) * anchors[:, :, 0, None, None] / net_w
                ph = np.exp(h) * anchors[:, :, 1, None, None] / net_h
        boxes, valid = padded_truths([[(box.x, box.y, box.w, box.h) for box, _ in usable[b]]
                                      for b in images], np.float64)
        ious = _grid_iou(px[..., None], py[..., None], pw[..., None], ph[..., None],
                         *(boxes[..., v] for v in range(4)))
        ious = np.where(valid, ious, -np.inf)  # (images, anchors, H, W, truths)
        best_iou = np.maximum(ious.max(axis=-1), 0)
        best_t = ious.argmax(axis=-1)
        class_match = (out[:, :, 5:] > CLASS_MATCH_THRESH).any(axis=2)
        best_match = np.where(class_match, best_iou, 0.0)
        matched = best_match > L.ignore_thresh
        objectness = delta[images, :, 4]
        if L.objectness_smooth:
            smooth = L.obj_normalizer * (best_match - out[:, :, 4])
            objectness = np.where(matched, np.maximum(objectness, smooth), objectness)
        else:
            objectness[matched] = 0
        delta[images, :, 4] = objectness
        for k, a, j, i in zip(*np.nonzero(best_iou > L.truth_thresh)):
            b = images[k]
            self.truth_thresh_delta(output[b], delta[b], a, i, j, usable[b][best_t[k, a, j, i]],
                                    float(best_iou[k, a, j, i]), lw, lh, net_w, net_h)

    # ---- one image ---------------------------------------------------------------------------
    def truths_delta(self, out, dlt, usable, net_w, net_h, stats):
        """The per-truth loop of one image (after its per-prediction one): usable (box, class)."""
        L = self.layer
        _, _, lh, lw = out.shape
        # Every truth: its cell, in the anchor of best shape and (iou_thresh) the others close.
        for t, cls in usable:
            i, j = min(int(t.x * lw), lw - 1), min(int(t.y * lh), lh - 1)
            shifted = Box(0, 0, t.w, t.h)
            shapes = [Box(0, 0, aw / net_w, ah / net_h) for aw, ah in L.anchors.astype(np.float64)]
            best_n, best = 0, 0.0
            for n, shape in enumerate(shapes):
                iou = box_iou(shape, shifted)
                if iou > best:
                    best, best_n = iou, n
            if best_n in L.mask:
                self.anchor_truth_delta(out, dlt, t, cls, best_n, L.mask.index(best_n), i, j,
                                        lw, lh, net_w, net_h, stats)
            if L.iou_thresh < 1:
                for n, shape in enumerate(shapes):
                    if n in L.mask and n != best_n and \
                            box_iou_kind(shape, shifted, L.iou_thresh_kind) > L.iou_thresh:
                        self.anchor_truth_delta(out, dlt, t, cls, n, L.mask.index(n), i, j,
                                                lw, lh, net_w, net_h, stats)
        if L.iou_thresh < 1:
            # averages_yolo_deltas: a cell's box delta over the number of classes marked in it
            marked = (dlt[:, 5:] > 0).sum(axis=1)  # (anchors, H, W)
            average = (dlt[:, 4] != 0) & (marked > 0)
            for k in range(4):
                dlt[:, k][average] /= marked[average]

    def truth_thresh_delta(self, out, dlt, a, i, j, truth_class, best_iou, lw, lh, net_w, net_h):
        """The best_iou > truth_thresh branch of the per-prediction loop."""
        L = self.layer
        t, cls = truth_class
        if L.objectness_smooth:
            dlt[a, 4, j, i] = L.obj_normalizer * (best_iou * best_iou - float(out[a, 4, j, i]))
        else:
            dlt[a, 4, j, i] = L.obj_normalizer * (1 - float(out[a, 4, j, i]))
        self.class_delta(out, dlt, a, i, j, cls)
        mult = 1.0 if L.class_multipliers is None else float(L.class_multipliers[cls])
        if L.objectness_smooth:
            dlt[a, 5 + cls, j, i] = mult * (best_iou * best_iou - float(out[a, 5 + cls, j, i]))
        self.box_delta(out, dlt, t, L.mask[a], a, i, j, lw, lh, net_w, net_h, 2 - t.w * t.h,
                       L.iou_normalizer * mult)

    def cost(self, delta, stats):
        """AlexeyAB's reported cost (show_details=1, its default): the sum of squared deltas for
        iou_loss=mse; else iou_normalizer * the mean (1 - GIoU) for giou, (1 - IoU) otherwise,
        plus obj_normalizer * the squared non-box deltas."""
        L = self.layer
        if L.iou_loss == "mse":
            return sum_of_squares(delta)
        n, e = len(L.mask), L.entries
        classification = L.obj_normalizer * sum_of_squares(
            delta.reshape(len(delta), n, e, -1)[:, :, 4:])
        count = max(stats["count"], 1)
        key = "giou_loss" if L.iou_loss == "giou" else "iou_loss"
        return L.iou_normalizer * stats[key] / count + classification


def sum_of_squares(values):
    """The sum of squares of a float32 array as one BLAS dot product: it sums in blocks (closer
    to the exact sum than Darknet's running float sum) and makes no float64 copy."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return float(np.dot(flat, flat))


def _grid_iou(px, py, pw, ph, tx, ty, tw, th):
    """box_iou of predictions (arrays) with truths (numbers or arrays broadcast with them), as
    box_iou does."""
    ow = np.minimum(px + pw / 2, tx + tw / 2) - np.maximum(px - pw / 2, tx - tw / 2)
    oh = np.minimum(py + ph / 2, ty + th / 2) - np.maximum(py - ph / 2, ty - th / 2)
    inter = np.where((ow < 0) | (oh < 0), 0.0, ow * oh)
    union = pw * ph + tw * th - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where((inter == 0) | (union == 0), 0.0, inter / np.where(union == 0, 1, union))
    return iou


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
