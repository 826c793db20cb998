"""Box geometry shared by the detection layers' losses, the numpy backend's [yolo] operations
and detection post-processing: decoding a grid cell's raw entries into a box, overlap measures,
and Darknet's truth lists. Boxes are (x, y, w, h): centre and size, in whatever unit the caller
uses (relative to the image, or grid cells).

This sits below engine.layers, engine.backends and engine.detection, so a layer or a backend can
decode and compare boxes without importing the application-level detection module.
"""

import numpy as np


def grid_boxes(raw, col, row, w, h, anchor_w, anchor_h, new_coords=False):
    """Boxes from a detection layer's entries x, y, w, h (`raw[..., 0:4]`, x and y already
    through the logistic) in grid cell (col, row) of a w x h grid: centre (col + x)/w,
    (row + y)/h, size exp(w)*anchor_w, exp(h)*anchor_h (anchors relative to the input); with
    AlexeyAB's new_coords, size (2w)^2*anchor_w, (2h)^2*anchor_h (get_yolo_box)."""
    if new_coords:
        size_w, size_h = raw[..., 2] * raw[..., 2] * 4, raw[..., 3] * raw[..., 3] * 4
    else:
        size_w, size_h = np.exp(raw[..., 2]), np.exp(raw[..., 3])
    return np.stack([(col + raw[..., 0]) / w, (row + raw[..., 1]) / h,
                     size_w * anchor_w, size_h * anchor_h], axis=-1)


def prediction_boxes(raw, col, row, grid_w, grid_h, anchor_w, anchor_h, net_w, net_h,
                     new_coords=False):
    """(px, py, pw, ph) in float64 of [yolo] predictions relative to the network input, from
    their entries x, y, w, h (`raw[..., 0:4]`) in cell (col, row) and their anchor's size in
    input pixels, as the [yolo] losses decode them: (col + x)/grid_w, (row + y)/grid_h,
    exp(w)*anchor_w/net_w or, with new_coords, w*w*4*anchor_w/net_w (get_yolo_box)."""
    x, y, w, h = (raw[..., k].astype(np.float64) for k in range(4))
    if new_coords:
        pw, ph = w * w * 4 * anchor_w / net_w, h * h * 4 * anchor_h / net_h
    else:
        with np.errstate(over="ignore"):
            pw, ph = np.exp(w) * anchor_w / net_w, np.exp(h) * anchor_h / net_h
    return (col + x) / grid_w, (row + y) / grid_h, pw, ph


def iou_or_zero(px, py, pw, ph, tx, ty, tw, th):
    """Darknet's box_iou of boxes (px, py, pw, ph) and (tx, ty, tw, th) (numbers or arrays that
    broadcast), guarded as AlexeyAB's box.c guards it: 0 where the intersection or the union
    is 0."""
    return edges_iou_or_zero(box_edges(px, py, pw, ph), box_edges(tx, ty, tw, th))


def box_edges(x, y, w, h):
    """(left, right, top, bottom, area) of boxes: what iou_or_zero computes from each box, for
    a caller that compares the same boxes with many others."""
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2, w * h


def edges_iou_or_zero(a, b):
    """iou_or_zero of boxes given by box_edges."""
    ow = np.minimum(a[1], b[1]) - np.maximum(a[0], b[0])
    oh = np.minimum(a[3], b[3]) - np.maximum(a[2], b[2])
    inter = np.where((ow < 0) | (oh < 0), 0.0, ow * oh)
    union = a[4] + b[4] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((inter == 0) | (union == 0), 0.0, inter / np.where(union == 0, 1, union))


def listed_truths(rows, classes=None):
    """Which of the truth rows (..., T, 5) of (x, y, w, h, class) Darknet reads: those before
    the first with x == 0 (its end of the list); with `classes` (AlexeyAB's loss) also only
    those whose int(class) lies in [0, classes) (a row outside does not end the list)."""
    listed = np.cumprod(rows[..., 0] != 0, axis=-1).astype(bool)
    if classes is not None:
        with np.errstate(invalid="ignore"):
            cls = np.trunc(rows[..., 4])
        listed &= (cls >= 0) & (cls < classes)
    return listed


# truth_overlap compares every prediction with every truth for as many images at once as fit about
# CHUNK_VALUES IoU values: small enough for the CPU's caches (64K: 8x faster per value than 8M on
# a 2-core VM), large enough to spare per-image calls.
CHUNK_VALUES = 1 << 16


def image_chunks(counts, cells):
    """The indexes of the images with truths (counts[b] of them), in runs whose IoU arrays
    (images, `cells` predictions, most truths) hold about CHUNK_VALUES values."""
    images = [b for b, count in enumerate(counts) if count]
    most = max((counts[b] for b in images), default=0)
    step = max(1, int(CHUNK_VALUES // max(cells * most, 1)))
    return [images[start:start + step] for start in range(0, len(images), step)]


def padded_truths(boxes, dtype):
    """Per-image (n_i, 4) truth boxes as one (images, 1, 1, 1, most, 4) array of `dtype`,
    broadcasting against (images, anchors, H, W) predictions; the padding is zeros (a box of
    size 0, which iou_or_zero gives 0 with any prediction)."""
    most = max(len(rows) for rows in boxes)
    padded = np.zeros((len(boxes), 1, 1, 1, most, 4), dtype)
    for k, rows in enumerate(boxes):
        padded[k, 0, 0, 0, :len(rows)] = rows
    return padded


def box_iou(a, b):
    """IoU of (x, y, w, h) boxes a and b, broadcasting over leading axes (Darknet's box_iou)."""
    def overlap(centre_a, size_a, centre_b, size_b):
        return (np.minimum(centre_a + size_a / 2, centre_b + size_b / 2)
                - np.maximum(centre_a - size_a / 2, centre_b - size_b / 2))

    width = overlap(a[..., 0], a[..., 2], b[..., 0], b[..., 2])
    height = overlap(a[..., 1], a[..., 3], b[..., 1], b[..., 3])
    intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
    return intersection / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - intersection)


def box_diou(a, b, beta):
    """AlexeyAB's box_diou / box_diounms: IoU minus (d/c)^beta, d the squared distance of the
    centres and c the squared diagonal of the smallest box enclosing both (IoU where c = 0)."""
    left = np.minimum(a[..., 0] - a[..., 2] / 2, b[..., 0] - b[..., 2] / 2)
    right = np.maximum(a[..., 0] + a[..., 2] / 2, b[..., 0] + b[..., 2] / 2)
    top = np.minimum(a[..., 1] - a[..., 3] / 2, b[..., 1] - b[..., 3] / 2)
    bottom = np.maximum(a[..., 1] + a[..., 3] / 2, b[..., 1] + b[..., 3] / 2)
    c = (right - left) ** 2 + (bottom - top) ** 2
    d = (a[..., 0] - b[..., 0]) ** 2 + (a[..., 1] - b[..., 1]) ** 2
    iou = box_iou(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        penalty = np.where(c > 0, np.power(np.where(c > 0, d / c, 0), beta), 0)
    return iou - penalty


# ---- AlexeyAB's box.c on boxes in float64 (its [yolo] loss: engine.layers.alexeyab_yolo_loss,
# engine.backends.yolo_truths) -----------------------------------------------------------------
class Box:
    """Boxes (centre x, y and size w, h) as float64 numbers or arrays that broadcast: the
    functions below compute on all of them at once, as box.c does on one."""
    __slots__ = ("x", "y", "w", "h")

    def __init__(self, x, y, w, h):
        self.x, self.y, self.w, self.h = (np.asarray(v, dtype=np.float64) for v in (x, y, w, h))


def boxes_iou(a, b):
    """iou_or_zero of Boxes a and b."""
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
    iou = boxes_iou(a, b)
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
