"""The [yolo] losses' truth part as one backend operation (Operations.apply_truth_events_): the
loss's numbers it takes (TruthLoss), the plan it reads (pack_plan / unpack_plan), its
statistics, and the numpy backend's implementation.

The caller (engine.layers.yolo) decides on the host, from the truth alone, which cells the
truths' events touch (engine.layers.yolo_cells) and packs that into an int32 *plan* of fixed
capacity, so that a recorded iteration keeps one backend copy of it and refreshes it before each
replay. Plan layout, capacity = images * truth rows * mask anchors (an event is a truth in one of
its cell's anchors, so no more than that), 3 * capacity + 3 values:
  [0] the number of cells touched U, [1] the number of events N;
  [2, 2 + capacity): the cells' flat indexes in the output's (B, A, H, W) cells, ascending;
  [2 + capacity, 3 + 2 * capacity): each cell's first event (U + 1 values, the last one N);
  [3 + 2 * capacity, 3 + 3 * capacity): the events' truth rows, cell by cell, each cell's events
  in Darknet's order (events on one cell interact; events on different cells do not).
An event's anchor is its cell's (a, the mask's slot).

The numpy implementation applies the events round by round on the gathered cells (CellRounds:
a round has no two events on one cell), vectorised over the mini-batch: PjreddieTruthDeltas and
AlexeyabTruthDeltas hold the two losses' event rules (the layers' host path, for truth_thresh < 1,
uses them too); the CUDA one (kernels/yolo_truths.cu) applies each cell's events one after the
other, a thread per cell.
"""

import numpy as np

from ..boxes import Box, box_iou_kind, dx_box_iou, iou_or_zero, prediction_boxes

IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")  # AlexeyAB's iou_loss values, the kernel's order
FOCAL_ALPHA = 0.5  # delta_yolo_class's focal loss
FLT_MAX = float(np.finfo(np.float32).max)
# The statistics apply_truth_events_ returns, in this order (float64): the sum of the squares of
# the whole delta after the events, that of the touched cells' box entries, the sums over the
# events of 1 - IoU and 1 - GIoU of prediction and truth (AlexeyAB's loss; 0 for pjreddie's),
# and the number of events.
STATISTICS = ("squares", "box_squares", "iou_losses", "giou_losses", "events")


class TruthLoss:
    """The numbers a [yolo] loss's truth part computes with: `kind` ('pjreddie' or 'alexeyab'),
    `anchors` ((A, 2) float32: the sizes of the mask's anchors in input pixels), `classes`,
    `net_w`, `net_h`, `new_coords`, and AlexeyAB's keys (their defaults for pjreddie's loss,
    which reads none): iou_loss, iou_normalizer, obj_normalizer, cls_normalizer, max_delta,
    label_smooth_eps, focal_loss, objectness_smooth, iou_thresh (< 1: averages_yolo_deltas) and
    class_multipliers (None, or float64 (classes,): counters_per_class's)."""

    KEYS = {"iou_loss": "mse", "iou_normalizer": 0.75, "obj_normalizer": 1.0,
            "cls_normalizer": 1.0, "max_delta": FLT_MAX,
            "label_smooth_eps": 0.0, "focal_loss": 0, "objectness_smooth": 0, "iou_thresh": 1.0,
            "class_multipliers": None}

    def __init__(self, kind, anchors, classes, net_w, net_h, new_coords, **keys):
        self.kind, self.classes, self.new_coords = kind, int(classes), bool(new_coords)
        self.anchors = np.asarray(anchors, dtype=np.float32).reshape(-1, 2)
        self.net_w, self.net_h = net_w, net_h
        for key, default in self.KEYS.items():
            setattr(self, key, keys.get(key, default))

    @property
    def entries(self):
        return 5 + self.classes


# ---- events and their rounds ----------------------------------------------------------------------
class Events:
    """Events as parallel arrays: `image`, `row` (the truth's row in the truth rows), `anchor`
    (its index in the layer's anchors), `slot` (that anchor's place in the mask), cell `j`, `i`,
    and `past` (True: a prediction past truth_thresh)."""

    FIELDS = ("image", "row", "anchor", "slot", "j", "i", "past")

    def __init__(self, **fields):
        for name in self.FIELDS:
            setattr(self, name, np.asarray(fields[name]))

    def __len__(self):
        return len(self.image)

    def take(self, which):
        return Events(**{name: getattr(self, name)[which] for name in self.FIELDS})

    @classmethod
    def joined(cls, first, then):
        return cls(**{name: np.concatenate([getattr(first, name), getattr(then, name)])
                      for name in cls.FIELDS})


def truth_events(image, row, anchor, slot, j, i):
    """Events of truths learnt by anchors (past False)."""
    return Events(image=image, row=row, anchor=anchor, slot=slot, j=j, i=i,
                  past=np.zeros(len(image), bool))


class CellRounds:
    """The cells (b, slot, j, i) that `events` (in Darknet's order) touch, each event's cell
    (`cell`, a row of `cells`) and its round."""

    def __init__(self, events, shape):
        keys = np.ravel_multi_index((events.image, events.slot, events.j, events.i), shape)
        unique, self.cell = np.unique(keys, return_inverse=True)
        self.cell = self.cell.reshape(-1)
        self.cells = np.column_stack(np.unravel_index(unique, shape)).astype(np.int32)
        # the round: how many earlier events share the event's cell
        order = np.argsort(self.cell, kind="stable")
        grouped = self.cell[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
        self.round = np.empty(len(keys), np.int64)
        self.round[order] = np.arange(len(keys)) - first

    @classmethod
    def of_sorted(cls, cells, cell, first):
        """The rounds of events listed cell by cell (a plan's, engine.backends.yolo_truths):
        `cells` (U, 4), each event's `cell`, each cell's `first` event."""
        rounds = cls.__new__(cls)
        rounds.cells, rounds.cell = cells, cell
        rounds.round = np.arange(len(cell)) - np.asarray(first, np.int64)[cell]
        return rounds

    def rounds(self):
        """The indexes of the events of each round, in order."""
        for r in range(int(self.round.max(initial=-1)) + 1):
            yield np.flatnonzero(self.round == r)


# ---- the plan -------------------------------------------------------------------------------------
def plan_capacity(images, rows, anchors):
    """The most events a plan can hold: one per truth row and mask anchor."""
    return images * rows * anchors


def pack_plan(rows, cells, shape, capacity):
    """The plan (layout above) of events whose truth rows are `rows` (Darknet's order), on the
    cells of `cells` (CellRounds: `cells` ascending, each event's `cell`) of an
    output of (B, A, H, W) cells `shape`: a host int32 array of 3 * capacity + 3 values."""
    plan = np.zeros(3 * capacity + 3, np.int32)
    count, events = len(cells.cells), len(rows)
    if events > capacity:
        raise ValueError(f"{events} events exceed the plan's capacity {capacity}")
    order = np.argsort(cells.cell, kind="stable")  # by cell; within a cell, Darknet's order
    plan[0], plan[1] = count, events
    if count:
        plan[2:2 + count] = np.ravel_multi_index(tuple(cells.cells.T), shape)
    plan[2 + capacity:3 + capacity + count] = np.searchsorted(cells.cell[order],
                                                              np.arange(count + 1))
    plan[3 + 2 * capacity:3 + 2 * capacity + events] = np.asarray(rows)[order]
    return plan


def unpack_plan(plan, shape):
    """(cells: (U, 4) int32 rows (b, a, j, i), first: each cell's first event (U + 1 values),
    rows: each event's truth row) of a host plan for cells of `shape` (B, A, H, W)."""
    plan = np.asarray(plan).reshape(-1).astype(np.int64)
    capacity = (len(plan) - 3) // 3
    count, events = int(plan[0]), int(plan[1])
    cells = np.column_stack(np.unravel_index(plan[2:2 + count], shape)).astype(np.int32)
    cells = cells.reshape(count, 4)
    first = plan[2 + capacity:3 + capacity + count]
    rows = plan[3 + 2 * capacity:3 + 2 * capacity + events]
    return cells, first, rows


# ---- the events' deltas, round by round (numpy) ---------------------------------------------------
class PjreddieTruthDeltas:
    """pjreddie's YOLOv3 loss (forward_yolo_layer) for the events of one layer and mini-batch,
    with `numbers` (a TruthLoss) on a (h, w) `grid`: per event (a truth in its best anchor, or a
    prediction past truth_thresh learning its best truth) the box, objectness 1 and the class,
    overwriting. `start` once, `apply` round by round on the gathered rows, `finish`."""

    def __init__(self, numbers, grid):
        self.numbers, self.grid = numbers, grid

    def start(self, events, cell, rows, out):
        self.events, self.truth = events, rows[events.image, events.row]
        self.count, self.iou_loss, self.giou_loss = len(events), 0.0, 0.0

    def apply(self, which, at, out, dlt):
        """One round: events `which` on the gathered rows `at` (no two alike)."""
        L = self.numbers
        h, w = self.grid
        events, truth = self.events.take(which), self.truth[which]
        # delta_yolo_box: x, y toward the centre's offset in its cell, w, h toward the log of
        # the size over the anchor (in float32, as the anchors are), all scaled by 2 - truth
        # area (small boxes weigh more)
        x, y, tw, th = (truth[:, k].astype(np.float64) for k in range(4))
        sizes = L.anchors[events.slot]
        target = np.column_stack([x * w - events.i, y * h - events.j,
                                  np.log((tw * L.net_w).astype(np.float32) / sizes[:, 0]),
                                  np.log((th * L.net_h).astype(np.float32) / sizes[:, 1])])
        dlt[at, :4] = (2 - tw * th)[:, None] * (target - out[at, :4])
        dlt[at, 4] = 1 - out[at, 4]
        # delta_yolo_class: a one-hot target; where the cell already has a class delta (an
        # earlier truth's: Darknet looks at class 0's entry) only the new class's entry is set
        cls = truth[:, 4].astype(np.int64)
        fresh = at[dlt[at, 5] == 0]
        dlt[fresh, 5:] = -out[fresh, 5:]
        dlt[at, 5 + cls] = 1 - out[at, 5 + cls]

    def finish(self, dlt):
        """Nothing: pjreddie's loss has no averages_yolo_deltas."""


class AlexeyabTruthDeltas:
    """AlexeyAB's loss (its src/yolo_layer.c: process_batch's truth loop, delta_yolo_box,
    delta_yolo_class, averages_yolo_deltas) for the events of one layer and mini-batch, with
    `numbers` (a TruthLoss) on a (h, w) `grid`: `start` (what each event needs, and the cost's
    sums), `apply` (round by round on the gathered rows), `finish` (averages_yolo_deltas)."""

    def __init__(self, numbers, grid):
        self.numbers, self.grid = numbers, grid
        self.smooth = bool(numbers.objectness_smooth)

    def start(self, events, cell, rows, out):
        """What each event needs, computed for all at once from the gathered output (`out`,
        row cell[e] for event e): its truth and class, the class multiplier, its box delta
        (which depends on the output only) and the statistics of the cost."""
        L = self.numbers
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
            sizes = L.anchors.astype(np.float64)[events.slot]
            pred = prediction_boxes(box, events.i, events.j, lw, lh, sizes[:, 0], sizes[:, 1],
                                    L.net_w, L.net_h, L.new_coords)
            self.best = iou_or_zero(*pred, *(truth[:, k] for k in range(4)))

    def box_deltas(self, box, truth, events, normalizer):
        """delta_yolo_box of every event, what it adds to its cell's box delta (float64, (n, 4)),
        and the IoU and GIoU of prediction and truth. The prediction's size is float32 here,
        as get_yolo_box computes it with a float anchor."""
        L = self.numbers
        lh, lw = self.grid
        sizes = L.anchors[events.slot]
        x = box.astype(np.float64)
        if L.new_coords:
            pw = (x[:, 2] * x[:, 2] * 4).astype(np.float32) * sizes[:, 0] / np.float32(L.net_w)
            ph = (x[:, 3] * x[:, 3] * 4).astype(np.float32) * sizes[:, 1] / np.float32(L.net_h)
        else:
            with np.errstate(over="ignore"):
                pw = np.exp(x[:, 2]).astype(np.float32) * sizes[:, 0] / np.float32(L.net_w)
                ph = np.exp(x[:, 3]).astype(np.float32) * sizes[:, 1] / np.float32(L.net_h)
        pred = Box((events.i + x[:, 0]) / lw, (events.j + x[:, 1]) / lh, pw, ph)
        target = Box(*(truth[:, k] for k in range(4)))
        iou, giou = box_iou_kind(pred, target, "iou"), box_iou_kind(pred, target, "giou")
        pred.w = np.where(pred.w == 0, 1.0, pred.w)
        pred.h = np.where(pred.h == 0, 1.0, pred.h)
        scale = 2 - target.w * target.h
        aw, ah = (sizes[:, k].astype(np.float64) for k in range(2))
        if L.iou_loss == "mse":
            if L.new_coords:
                tw = np.sqrt(target.w * L.net_w / (4 * aw))
                th = np.sqrt(target.h * L.net_h / (4 * ah))
            else:
                tw, th = np.log(target.w * L.net_w / aw), np.log(target.h * L.net_h / ah)
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
        L = self.numbers
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
        eps = self.numbers.label_smooth_eps
        return target * (1 - eps) + 0.5 * eps if eps else target

    def class_delta(self, out, dlt, cells, cls):
        """delta_yolo_class on gathered rows `cells` (no two alike), class `cls` each."""
        L = self.numbers
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
        if self.numbers.iou_thresh < 1:
            marked = (dlt[:, 5:] > 0).sum(axis=1)
            average = (dlt[:, 4] != 0) & (marked > 0)
            dlt[average, :4] = dlt[average, :4] / marked[average, None]


TRUTH_DELTAS = {"pjreddie": PjreddieTruthDeltas, "alexeyab": AlexeyabTruthDeltas}


def apply_truth_events(ops, delta, output, truths, plan, loss):
    """Operations.apply_truth_events_ with ops's own cell gathers, round by round: the numpy
    backend's implementation. Returns the statistics."""
    b, channels, h, w = (int(s) for s in output.shape)
    entries = loss.entries
    shape = (b, channels // entries, h, w)
    cells, first, rows = unpack_plan(plan, shape)
    cell = np.repeat(np.arange(len(cells)), np.diff(first))
    # each event's anchor is its cell's slot: loss.anchors are the mask's
    events = truth_events(cells[cell, 0], rows, cells[cell, 1], cells[cell, 1], cells[cell, 2],
                          cells[cell, 3])
    rounds = CellRounds.of_sorted(cells, cell, first)
    applier = TRUTH_DELTAS[loss.kind](loss, (h, w))
    if len(events):
        out = ops.gather_cells(output, cells, entries)
        dlt = ops.gather_cells(delta, cells, entries)
    else:
        out = dlt = np.zeros((0, entries), np.float32)
    host_truths = np.asarray(truths, dtype=np.float32).reshape(b, -1, 5)
    applier.start(events, cell, host_truths, out)
    for which in rounds.rounds():
        applier.apply(which, cell[which], out, dlt)
    applier.finish(dlt)
    if len(events):
        ops.scatter_cells_(delta, cells, dlt)
    return np.array([ops.sum_of_squares(delta), np.square(dlt[:, :4], dtype=np.float64).sum(),
                     applier.iou_loss, applier.giou_loss, applier.count], np.float64)
