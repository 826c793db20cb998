"""[yolo]: YOLOv3's output layer. Its input holds, for each of the `mask` anchors, the entries
x, y, w, h, objectness and `classes` class scores, each an H x W plane; the output is the same
with the logistic applied to x, y, objectness and the classes (w and h stay raw), as Darknet's
forward_yolo_layer does. Boxes are decoded from it in engine.detection.

`anchors` lists `num` (width, height) pairs in network-input pixels; `mask` picks the ones this
layer predicts (default: all).

AlexeyAB's keys (its src/yolo_layer.c): `scale_x_y=s` maps x and y to s*x - (s-1)/2 after the
logistic (YOLOv4's grid-sensitivity fix), and `new_coords=1` (YOLOv7, scaled-YOLOv4) applies no
logistic here at all (the convolution before already used it) and decodes sizes as
(2*w)^2 * anchor instead of exp(w) * anchor. `nms_kind` and `beta_nms` choose the suppression
`engine detect` uses.

Which loss trains the layer follows the Darknet the cfg comes from (Network.darknet: a cfg with
a section, activation or key only AlexeyAB's fork reads is AlexeyAB's, `--darknet` overrides):
AlexeyAB's cfgs train with AlexeyAB's loss and all its training keys
(engine.layers.alexeyab_yolo_loss); pjreddie's (yolov3*.cfg) with pjreddie's YOLOv3 loss below,
which has none of those keys, so a cfg run as pjreddie's that sets one to a value other than
AlexeyAB's default is refused for training, naming its line. The two losses differ even with
AlexeyAB's defaults (iou_normalizer=0.75, the class-score condition on ignore_thresh...).

Training (pjreddie's): `loss` computes Darknet's YOLOv3 delta (forward_yolo_layer with net.train) for given
truth boxes, and `backward` hands that delta to the previous layer unchanged, as Darknet does.
`cost` is the loss-layer interface the network's train_step calls on every [yolo] head. Both
losses split as `_yolo_loss` says: the part over every prediction runs on the backend
(truth_overlap, objectness_delta_); so does the part over the truths (apply_truth_events_),
from a plan of the cells the truths' events touch that the host makes from the truth alone
(TruthPlan). Only with truth_thresh < 1, where predictions past it add events, does the truth
part run on the host (on the few cells events touch: gather_cells, scatter_cells_).

The delta is the exact negative gradient (w.r.t. this layer's *input*) of a per-entry loss:
binary cross-entropy on the logistic entries (x, y scaled by 2 - truth area, objectness,
classes) and half the squared error on the raw w, h (also scaled) - with the choice of
which entries get a target (ignore_thresh, best anchor) held fixed, and except for Darknet's
shortcut when two truths share a cell and anchor (PjreddieYoloLoss.apply). The reported cost is
Darknet's sum of squared deltas, which is not that loss.
"""

import numpy as np

from ..backends.views import whole, window
from ..backends.yolo_truths import PjreddieTruthDeltas, TruthLoss, pack_plan, plan_capacity
from ..boxes import box_iou, listed_truths
from .alexeyab_yolo_loss import (FLT_MAX, IOU_KINDS, IOU_LOSSES, AlexeyabYoloLoss,
                                 classes_multipliers)
from .anchor_activation import anchor_activate
from .base import Layer
from .yolo_cells import CellRounds, Events, mask_slots, past_truth_thresh, truth_events, truth_rows

YOLO_NMS_KINDS = ("default", "greedynms", "diounms")
# AlexeyAB's training-only [yolo] keys and their defaults (parse_yolo): AlexeyAB's loss reads
# them; training with pjreddie's loss refuses another value.
TRAINING_DEFAULTS = {"max_delta": None, "counters_per_class": None, "label_smooth_eps": 0.0,
                     "objectness_smooth": 0.0, "iou_normalizer": 0.75, "obj_normalizer": 1.0,
                     "cls_normalizer": 1.0, "delta_normalizer": 1.0, "iou_loss": "mse",
                     "iou_thresh_kind": "iou", "focal_loss": 0.0, "iou_thresh": 1.0,
                     "scale_x_y": 1.0, "new_coords": 0.0}
ALEXEYAB_ONLY_KEYS = tuple(TRAINING_DEFAULTS) + ("nms_kind", "beta_nms", "uc_normalizer")
# Read and without effect here: logging, tracking and augmentation options.
IGNORED_KEYS = ("jitter", "random", "map", "resize", "show_details", "track_history_size",
                "sim_thresh", "dets_for_track", "dets_for_show", "track_ciou_norm",
                "embedding_layer")


def training_keys(section, defaults):
    """{key: value} of the training-only keys this section sets to a non-default value."""
    found = {}
    for key, default in defaults.items():
        if not section.has(key):
            continue
        raw = section.str(key)
        if default is None or isinstance(default, str):
            different = default is None or raw != default
        else:
            try:
                different = float(raw) != default
            except ValueError:
                different = True
        if different:
            found[key] = raw
    return found


def parse_nms(section, kinds):
    kind = section.str("nms_kind", "default")
    if kind not in kinds:
        # AlexeyAB falls back to the default silently; we refuse a name it does not know here.
        raise section.error(f"nms_kind={kind}: expected one of {', '.join(kinds)}", "nms_kind")
    return kind, section.float("beta_nms", 0.6)


MAX_ANCHORS = 1 << 16  # no network has more; a larger `num` is a typo, not a model
MAX_TRUTH_BOXES = 1 << 16  # `max`: the truth rows per image the loss reads


def parse_anchors(section, count, default):
    """The `anchors` list as `count` (w, h) pairs, or Darknet's default value for every entry;
    each pair is checked to be present so a short list fails at its cfg line."""
    values = section.float_list("anchors")
    if values is None:
        return np.full((count, 2), default, dtype=np.float32)
    if len(values) % 2:
        raise section.error(f"anchors lists {len(values)} numbers; expected (width, height) pairs",
                            "anchors")
    if len(values) // 2 < count:
        raise section.error(f"anchors gives {len(values) // 2} (width, height) pairs, but num={count}",
                            "anchors")
    return np.array(values[:2 * count], dtype=np.float32).reshape(count, 2)


def check_outputs_fit(section, in_shape, anchors, entries):
    """Darknet asserts that the input has exactly anchors*entries channels; we say which key
    disagrees."""
    c, h, w = in_shape
    if c != anchors * entries:
        raise section.error(f"the input ({w}x{h}x{c}) must have {anchors} anchors x {entries} "
                            f"entries = {anchors * entries} channels; set filters={anchors * entries} "
                            "in the convolution before this layer")


class YoloLayer(Layer):
    type_name = "yolo"
    box_entries = 4  # x, y, w, h before objectness and the classes
    nms_kinds = YOLO_NMS_KINDS
    training_defaults = TRAINING_DEFAULTS
    has_cost = True
    # the truth part needs a plan made on the host (or runs there: truth_thresh < 1), so a
    # recording is replayed with plans set (engine.train.PlannedCapturedSteps) or split
    host_cost = True
    outputs_boxes = box_truth = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.classes = section.positive_int("classes", 20)
        self.total = section.positive_int("num", 1, high=MAX_ANCHORS)
        self.mask = section.int_list("mask", list(range(self.total)))
        for m in self.mask:
            if not 0 <= m < self.total:
                raise section.error(f"mask index {m} lies outside the {self.total} anchors "
                                    f"(num={self.total}; valid indexes 0..{self.total - 1})", "mask")
        self.anchors = parse_anchors(section, self.total, 0.5)
        self.entries = self.box_entries + 1 + self.classes
        check_outputs_fit(section, self.in_shape, len(self.mask), self.entries)
        self.ignore_thresh = section.float("ignore_thresh", 0.5)
        self.truth_thresh = section.float("truth_thresh", 1.0)
        self.max_boxes = section.positive_int("max", 90, high=MAX_TRUTH_BOXES)
        # The loss measures boxes against the network input (Darknet's net.w, net.h).
        self.net_w, self.net_h = net.options.width, net.options.height
        self.scale_x_y = section.float("scale_x_y", 1.0)
        self.new_coords = section.bool("new_coords", False) if self.box_entries == 4 else False
        self.nms_kind, self.beta_nms = parse_nms(section, self.nms_kinds)
        self.untrainable = training_keys(section, self.training_defaults)
        self.loss_kind = getattr(net, "darknet", "pjreddie")
        if self.loss_kind == "alexeyab" and self.box_entries == 4:
            self.read_alexeyab_loss_keys(section)
        # a head with keys only AlexeyAB's fork reads comes from that fork (detection follows
        # its conventions, see engine.detection.uses_letterbox)
        self.alexeyab = any(section.has(key) for key in ALEXEYAB_ONLY_KEYS)
        # Data-augmentation options Darknet reads; accepted so its cfgs load without warnings.
        for key in IGNORED_KEYS:
            section.str(key)

    @property
    def mask_anchors(self):
        """(len(mask), 2) anchor sizes in network-input pixels, in this layer's anchor order."""
        return self.anchors[self.mask]

    def describe(self):
        return "yolo"

    def forward(self, ops, x, train):
        logistic = () if self.new_coords else ((0, 2), (4, self.entries))
        affines = ()
        if self.scale_x_y != 1:
            affines = ((0, 2, self.scale_x_y, -0.5 * (self.scale_x_y - 1)),)
        self.output = anchor_activate(ops, x, len(self.mask), logistic, affines=affines)
        return self.output

    def read_alexeyab_loss_keys(self, section):
        """The keys of AlexeyAB's loss (parse_yolo's defaults); names it does not know refused
        (AlexeyAB falls back to iou silently)."""
        self.iou_loss = section.str("iou_loss", "mse")
        if self.iou_loss not in IOU_LOSSES:
            raise section.error(f"iou_loss={self.iou_loss}: expected one of {', '.join(IOU_LOSSES)}",
                                "iou_loss")
        self.iou_thresh_kind = section.str("iou_thresh_kind", "iou")
        if self.iou_thresh_kind not in IOU_KINDS:
            raise section.error(f"iou_thresh_kind={self.iou_thresh_kind}: expected one of "
                                f"{', '.join(IOU_KINDS)}", "iou_thresh_kind")
        self.iou_normalizer = section.float("iou_normalizer", 0.75)
        self.obj_normalizer = section.float("obj_normalizer", 1.0)
        self.cls_normalizer = section.float("cls_normalizer", 1.0)
        self.delta_normalizer = section.float("delta_normalizer", 1.0)
        self.iou_thresh = section.float("iou_thresh", 1.0)
        self.max_delta = section.float("max_delta", FLT_MAX)
        self.label_smooth_eps = section.float("label_smooth_eps", 0.0)
        self.objectness_smooth = section.int("objectness_smooth", 0)
        self.focal_loss = section.int("focal_loss", 0)
        self.class_multipliers = classes_multipliers(section, self.classes, self.max_delta)
        # map=FILE renames the truth's classes in AlexeyAB's loss: not read here
        self.untrainable = {"map": section.str("map")} if section.has("map") else {}

    def check_trainable(self):
        """Training options the chosen loss lacks: refused with their line."""
        if self.untrainable and self.loss_kind == "alexeyab":
            raise self.section.error("map=...: training with a class map file is not "
                                     "implemented", "map")
        if self.untrainable:
            key = next(iter(self.untrainable))
            raise self.section.error(f"{key}={self.untrainable[key]}: training with this AlexeyAB "
                                     "[yolo] option is not implemented (its loss is AlexeyAB's); "
                                     "inference and detection use the layer as is", key)

    def backward(self, ops, delta, need_dx):
        return delta if need_dx else None

    def cost(self, ops, truth):
        """(cost, delta) for the mini-batch's truth: (batch, max_boxes * 5) rows of
        (x, y, w, h, class) per box, zero-padded (Darknet's net.truth), on the backend or host."""
        rows = truth_rows(ops, truth, self.max_boxes)
        state = self.device_cost(ops, ops.asarray(rows.reshape(len(rows), -1)))
        return self.finish_cost(ops, rows, state)

    @property
    def truth_on_device(self):
        """Whether the truth part runs on the backend (apply_truth_events_): its events are then
        decided by the truth alone, so a plan made on the host before the forward says where
        they go. Not with truth_thresh < 1 (the predictions add events) nor for
        [Gaussian_yolo]."""
        return self.truth_thresh >= 1 and self.box_entries == 4

    def device_cost(self, ops, truth):
        """The loss's dense part on the backend, for truth rows on the backend (batch, rows * 5):
        only backend operations and no copy to the host, so a recorded iteration (engine.train)
        can hold it. Returns the state plan_cost, finish_cost and device_truth_cost take."""
        self.check_trainable()
        rows = int(truth.size) // (5 * len(truth)) if len(truth) else 0
        if rows > self.max_boxes:  # Darknet reads a layer's first `max` rows only
            truth = self._first_rows(ops, truth, rows)
        return self._dense_loss(ops, truth, self._loss(self.net_w, self.net_h))

    def plan_cost(self, ops, truth, state):
        """What of the host part needs the truth alone (on the host): the truths' events and
        the cells they touch. It reads nothing device_cost computes, so it can run while the
        backend computes the forward. Returns the plan finish_cost takes."""
        loss, output = state[0], state[1]
        return TruthPlan(self, loss, truth_rows(ops, truth, self.max_boxes), output.shape)

    def truth_plan(self, ops, truth, batch):
        """plan_cost's plan for a training forward of `batch` images, before any forward."""
        rows = truth_rows(ops, truth, self.max_boxes)
        return TruthPlan(self, self._loss(self.net_w, self.net_h), rows,
                         (batch,) + tuple(self.out_shape))

    def finish_cost(self, ops, truth, state, plan=None):
        """The loss's truth part after device_cost's `state` (and plan_cost's `plan`, made here
        if not given), for the same truth on the host: (cost, delta on the backend)."""
        plan = plan if plan is not None else self.plan_cost(ops, truth, state)
        if self.truth_on_device:
            statistics, delta = self.device_truth_cost(ops, state, ops.int_array(plan.packed))
            return self.truth_cost(state, ops.float64_values(statistics)), delta
        cost, delta = self._truth_loss(ops, plan, *state)
        self._normalize_delta(ops, delta)
        return cost, delta

    def device_truth_cost(self, ops, state, plan):
        """The truth part on the backend (truth_on_device) after device_cost's `state`, for
        `plan`, a backend copy of a TruthPlan's `packed`: only backend operations, so a
        recorded iteration holds it, with plan a fixed buffer it refreshes before each replay.
        Returns (statistics on the backend, for truth_cost; delta)."""
        loss, output, delta, _, _, truths = state
        statistics = ops.apply_truth_events_(delta, output, truths, plan, loss.numbers)
        self._normalize_delta(ops, delta)
        return statistics, delta

    def truth_cost(self, state, statistics):
        """The cost from device_truth_cost's statistics (on the host: ops.float64_values)."""
        return state[0].cost_of(statistics)

    def _normalize_delta(self, ops, delta):
        # AlexeyAB's GPU backward scales the delta by delta_normalizer (its CPU one does not)
        if self.loss_kind == "alexeyab" and self.delta_normalizer != 1:
            ops.scale_(delta, self.delta_normalizer)


    def _first_rows(self, ops, truth, rows):
        batch = len(truth)
        first = ops.empty((batch, self.max_boxes * 5))
        ops.strided_copy_(first, whole(first.shape), truth,
                          window((batch, rows * 5), None, (0, self.max_boxes * 5, 1)))
        return first

    def _loss(self, net_w, net_h):
        if self.loss_kind == "alexeyab":
            return AlexeyabYoloLoss(self, net_w, net_h)
        return PjreddieYoloLoss(self, net_w, net_h)

    def alexeyab_loss(self, ops, truths, net_w, net_h):
        """AlexeyAB's loss on the last forward's output, for truths as in `loss`: (AlexeyAB's
        cost, delta on the backend)."""
        return self._yolo_loss(ops, truths, AlexeyabYoloLoss(self, net_w, net_h))

    def loss(self, ops, truths, net_w, net_h):
        """Darknet's YOLOv3 loss on the last forward's output. `truths[b]` holds image b's boxes
        as rows (x, y, w, h, class), relative to the network input; like Darknet, a row with
        x == 0 ends the list. Returns (cost = sum of squared deltas, delta on the backend)."""
        return self._yolo_loss(ops, truths, PjreddieYoloLoss(self, net_w, net_h))

    def _yolo_loss(self, ops, truths, loss):
        """The steps both losses share. On the backend, every prediction: its best IoU with its
        image's truths, and its objectness delta (pushed to 0, unless that IoU is past
        ignore_thresh). On the host, the events (engine.layers.yolo_cells): truths, and
        predictions past truth_thresh; only the cells they touch cross the bus."""
        rows = truth_rows(ops, truths, self.max_boxes)
        state = self._dense_loss(ops, ops.asarray(rows.reshape(len(rows), -1)), loss)
        plan = TruthPlan(self, loss, rows, state[1].shape)
        if self.truth_on_device:
            statistics = ops.apply_truth_events_(state[2], state[1], state[5],
                                                 ops.int_array(plan.packed), loss.numbers)
            return loss.cost_of(ops.float64_values(statistics)), state[2]
        return self._truth_loss(ops, plan, *state)

    def _dense_loss(self, ops, truths, loss):
        """Backend operations only: (loss, output, delta, best, index, truths). The output is the one
        this forward made: a recorded iteration's replays refill it, while `self.output` may
        meanwhile be another forward's (an evaluation's)."""
        output, entries = self.output, self.entries
        delta = ops.zeros(output.shape, like=output)  # in the storage type of activations

        def overlap(class_gate):
            return ops.truth_overlap(output, truths, self.mask_anchors, entries, loss.net_w,
                                     loss.net_h, self.new_coords, loss.classes, class_gate)
        best, index = overlap(loss.class_gate)
        ops.objectness_delta_(delta, output, best, entries, loss.obj_normalizer,
                              self.ignore_thresh, loss.smooth)
        if self.truth_thresh < 1 and loss.class_gate is not None:
            best, index = overlap(None)  # truth_thresh compares the IoU without the gate
        return loss, output, delta, best, index, truths

    def _truth_loss(self, ops, plan, loss, output, delta, best, index, truths):
        """The events on the host (truth_thresh < 1), on the cells they touch, round by round
        (the numpy apply_truth_events_'s code, loss.deltas()): (cost, delta). The cost is read
        before the events' deltas are scattered (the dense part's sum of squares, less the
        touched cells', plus their new deltas'), so nothing waits for the scatter."""
        entries = self.entries
        events, cells = plan.events, plan.cells
        if self.truth_thresh < 1:
            # within a cell, Darknet's per-prediction loop comes before the image's truths
            events = Events.joined(past_truth_thresh(ops, best, index, self.truth_thresh,
                                                     self.mask), events)
            cells = CellRounds(events, tuple(best.shape))
        if len(events):
            out = ops.gather_cells(output, cells.cells, entries)
            dlt = ops.gather_cells(delta, cells.cells, entries)
        else:  # no truth lands in this head: the objectness push is all
            out = dlt = np.zeros((0, entries), np.float32)
        squares = ops.sum_of_squares(delta) - float(np.square(dlt, dtype=np.float64).sum())
        deltas = loss.deltas()
        deltas.start(events, cells.cell, plan.rows, out)
        for which in cells.rounds():
            deltas.apply(which, cells.cell[which], out, dlt)
        deltas.finish(dlt)
        if len(events):
            ops.scatter_cells_(delta, cells.cells, dlt)
        squares += float(np.square(dlt, dtype=np.float64).sum())
        boxes = float(np.square(dlt[:, :4], dtype=np.float64).sum())
        return loss.cost_of([squares, boxes, deltas.iou_loss, deltas.giou_loss,
                             deltas.count]), delta


class TruthPlan:
    """What a [yolo] loss's truth part needs from the truth alone: the rows, the truths' events
    (`loss.truth_events`) and, unless truth_thresh adds events the predictions decide, the cells
    they touch (CellRounds) for an output of `shape` (B, A*E, H, W), and those packed for
    apply_truth_events_ (`packed`, engine/backends/yolo_truths.py; its capacity fixed by the
    shapes: images * rows * mask anchors)."""

    def __init__(self, layer, loss, rows, shape):
        b, _, h, w = (int(v) for v in shape)
        self.rows = rows
        self.events = loss.truth_events(rows, (h, w))
        self.cells = self.packed = None
        if layer.truth_thresh >= 1:
            cells = (b, len(layer.mask), h, w)
            self.cells = CellRounds(self.events, cells)
            self.packed = pack_plan(self.events.row, self.cells, cells,
                                    plan_capacity(b, rows.shape[1], len(layer.mask)))


class PjreddieYoloLoss:
    """pjreddie's YOLOv3 loss (forward_yolo_layer) for one layer and mini-batch, as the parts
    YoloLayer._yolo_loss runs (see AlexeyabYoloLoss): no class check or gate, objectness
    normalizer 1, and per event (a truth in its best anchor, or a prediction past truth_thresh
    learning its best truth) the box, objectness 1 and the class, overwriting
    (PjreddieTruthDeltas)."""

    classes = class_gate = None
    obj_normalizer = 1.0
    smooth = False

    def __init__(self, layer, net_w, net_h):
        self.layer, self.net_w, self.net_h = layer, net_w, net_h
        self.numbers = TruthLoss("pjreddie", layer.mask_anchors, layer.classes, net_w, net_h,
                                 layer.new_coords)

    def deltas(self):
        """The events' deltas on the host (PjreddieTruthDeltas), on truth_events' grid."""
        return PjreddieTruthDeltas(self.numbers, self.grid)

    def truth_events(self, rows, grid):
        """Every listed truth in the cell holding its centre, in the anchor of best shape, if
        this layer predicts that anchor."""
        L = self.layer
        self.grid = h, w = grid
        image, row = np.nonzero(listed_truths(rows))
        truth = rows[image, row]
        i = np.minimum((truth[:, 0] * w).astype(np.int64), w - 1)  # in float32, as Darknet
        j = np.minimum((truth[:, 1] * h).astype(np.int64), h - 1)
        anchor_shapes = np.column_stack([np.zeros((L.total, 2), np.float32),
                                         L.anchors / np.float32([self.net_w, self.net_h])])
        shapes = np.column_stack([np.zeros((len(truth), 2), np.float32), truth[:, 2:4]])
        anchor = box_iou(shapes[:, None], anchor_shapes).argmax(axis=1)
        slot = mask_slots(L.mask, L.total)[anchor]
        kept = slot >= 0
        return truth_events(image[kept], row[kept], anchor[kept], slot[kept], j[kept], i[kept])

    def cost_of(self, statistics):
        """The cost from apply_truth_events_'s statistics: the sum of squared deltas."""
        return float(statistics[0])
