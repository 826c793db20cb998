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

The numpy implementation is the losses' own vectorised code (AlexeyabYoloLoss, PjreddieYoloLoss:
round by round on the gathered cells); the CUDA one (kernels/yolo_truths.cu) applies each cell's
events one after the other, a thread per cell.
"""

import numpy as np

IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")  # AlexeyAB's iou_loss values, the kernel's order
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
            "cls_normalizer": 1.0, "max_delta": float(np.finfo(np.float32).max),
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


def plan_capacity(images, rows, anchors):
    """The most events a plan can hold: one per truth row and mask anchor."""
    return images * rows * anchors


def pack_plan(rows, cells, shape, capacity):
    """The plan (layout above) of events whose truth rows are `rows` (Darknet's order), on the
    cells of `cells` (yolo_cells.CellRounds: `cells` ascending, each event's `cell`) of an
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


def apply_truth_events(ops, delta, output, truths, plan, loss):
    """Operations.apply_truth_events_ with ops's own cell gathers, round by round (see
    engine.layers.yolo_cells): the numpy backend's implementation. Returns the statistics."""
    from ..layers.alexeyab_yolo_loss import AlexeyabYoloLoss
    from ..layers.yolo import PjreddieYoloLoss
    from ..layers.yolo_cells import CellRounds, truth_events

    b, channels, h, w = (int(s) for s in output.shape)
    entries = loss.entries
    shape = (b, channels // entries, h, w)
    cells, first, rows = unpack_plan(plan, shape)
    cell = np.repeat(np.arange(len(cells)), np.diff(first))
    # each event's anchor is its cell's slot: loss.anchors are the mask's
    events = truth_events(cells[cell, 0], rows, cells[cell, 1], cells[cell, 1], cells[cell, 2],
                          cells[cell, 3])
    rounds = CellRounds.of_sorted(cells, cell, first)
    applier = (AlexeyabYoloLoss if loss.kind == "alexeyab" else PjreddieYoloLoss)(
        loss, loss.net_w, loss.net_h)
    applier.grid = (h, w)
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
    ious = (applier.iou_loss, applier.giou_loss) if loss.kind == "alexeyab" else (0.0, 0.0)
    return np.array([ops.sum_of_squares(delta), np.square(dlt[:, :4], dtype=np.float64).sum(),
                     *ious, len(events)], np.float64)
