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
Like Darknet's GPU path, the loss runs on the host: it loops over truth boxes, and the output is
small (on the GPU that is one output download and one delta upload per head and mini-batch).
`cost` is the loss-layer interface the network's train_step calls on every [yolo] head.

The delta is the exact negative gradient (w.r.t. this layer's *input*) of a per-entry loss:
binary cross-entropy on the logistic entries (x, y scaled by 2 - truth area, objectness,
classes) and half the squared error on the raw w, h (also scaled) - with the choice of
which entries get a target (ignore_thresh, best anchor) held fixed, and except for Darknet's
shortcut when two truths share a cell and anchor (_class_delta). The reported cost is
Darknet's sum of squared deltas, which is not that loss.
"""

import numpy as np

from ..boxes import box_iou, grid_boxes, image_chunks, padded_truths
from .alexeyab_yolo_loss import (FLT_MAX, IOU_KINDS, IOU_LOSSES, AlexeyabYoloLoss,
                                 classes_multipliers, sum_of_squares)
from .anchor_activation import anchor_activate
from .base import Layer

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
    host_cost = True  # the loss runs in numpy, so a recorded CUDA graph cannot replay it
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
        self.check_trainable()
        truth = ops.to_host(truth).reshape(len(truth), -1, 5)
        if self.loss_kind == "alexeyab":
            cost, delta = self.alexeyab_loss(ops.to_host(self.output), truth, self.net_w,
                                             self.net_h)
            # AlexeyAB's GPU backward scales the delta by delta_normalizer (its CPU one does not)
            if self.delta_normalizer != 1:
                delta *= np.float32(self.delta_normalizer)
            return cost, ops.asarray(delta)
        return self.loss(ops, truth, self.net_w, self.net_h)

    def alexeyab_loss(self, output, truths, net_w, net_h):
        """AlexeyAB's loss on an output (batch, anchors*entries, H, W) on the host, for truths
        as in `loss`: (AlexeyAB's cost, delta on the host)."""
        output = np.asarray(output, dtype=np.float32)
        n, e = len(self.mask), self.entries
        delta = np.zeros_like(output)
        loss = AlexeyabYoloLoss(self)
        stats = {"count": 0, "iou_loss": 0.0, "giou_loss": 0.0}
        shape = (len(output), n, e) + output.shape[2:]
        loss.batch_delta(output.reshape(shape), delta.reshape(shape),
                         [_valid_truths(truth, self.max_boxes) for truth in truths], net_w,
                         net_h, stats)
        return loss.cost(delta, stats), delta

    def loss(self, ops, truths, net_w, net_h):
        """Darknet's YOLOv3 loss on the last forward's output. `truths[b]` holds image b's boxes
        as rows (x, y, w, h, class), relative to the network input; like Darknet, a row with
        x == 0 ends the list. Returns (cost = sum of squared deltas, delta on the backend)."""
        output = ops.to_host(self.output)
        delta = np.zeros_like(output)
        shape = (len(output), len(self.mask), self.entries) + output.shape[2:]
        out, dlt = output.reshape(shape), delta.reshape(shape)
        truths = [_valid_truths(truth, self.max_boxes) for truth in truths]
        # Images are independent: the per-prediction part for many at once, then each image's
        # truths (within an image, Darknet's order).
        dlt[:, :, 4] = -out[:, :, 4]
        for images in image_chunks([len(truth) for truth in truths], out[0, :, 0].size):
            self._predictions_delta(out, dlt, images, truths, net_w, net_h)
        anchor_shapes = np.column_stack([np.zeros((self.total, 2), np.float32),
                                         self.anchors / np.float32([net_w, net_h])])
        for b, truth in enumerate(truths):
            self._truths_delta(out[b], dlt[b], truth, anchor_shapes, net_w, net_h)
        return sum_of_squares(delta), ops.asarray(delta)

    def _predictions_delta(self, out, dlt, images, truths, net_w, net_h):
        """Every prediction of `images` (each with truths): objectness pushed to 0 (already in
        dlt), unless it overlaps a truth by > ignore_thresh; > truth_thresh learns that truth."""
        _, _, _, h, w = out.shape
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        anchors = self.mask_anchors[:, :, None, None] / np.float32([net_w, net_h])[:, None, None]
        pred = grid_boxes(np.moveaxis(out[images, :, :4], 2, -1), cols, rows, w, h,
                          anchors[:, 0], anchors[:, 1])  # (images, anchors, h, w, 4)
        boxes, valid = padded_truths([truths[b][:, :4] for b in images], np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            ious = np.where(valid, box_iou(pred[..., None, :], boxes), -np.inf)
        best_iou, best_t = ious.max(axis=-1), ious.argmax(axis=-1)
        objectness = dlt[images, :, 4]
        objectness[best_iou > self.ignore_thresh] = 0
        dlt[images, :, 4] = objectness
        for k, a, j, i in zip(*np.nonzero(best_iou > self.truth_thresh)):
            b = images[k]
            t = truths[b][best_t[k, a, j, i]]
            dlt[b, a, 4, j, i] = 1 - out[b, a, 4, j, i]
            self._class_delta(out[b, a, 5:, j, i], dlt[b, a, 5:, j, i], int(t[4]))
            self._box_delta(out[b, a, :4, j, i], dlt[b, a, :4, j, i], t, self.mask[a], i, j, w,
                            h, net_w, net_h)

    def _truths_delta(self, out, dlt, truth, anchor_shapes, net_w, net_h):
        """Every truth of one image (anchors, entries, H, W): the cell holding its centre, in
        the anchor of best shape (if this layer predicts that anchor), learns the box,
        objectness 1 and the class."""
        _, _, h, w = out.shape
        for t in truth:
            i, j = min(int(t[0] * w), w - 1), min(int(t[1] * h), h - 1)
            shape_iou = box_iou(np.array([0, 0, t[2], t[3]], np.float32), anchor_shapes)
            best_n = int(shape_iou.argmax())
            if best_n not in self.mask:
                continue
            a = self.mask.index(best_n)
            self._box_delta(out[a, :4, j, i], dlt[a, :4, j, i], t, best_n, i, j, w, h, net_w, net_h)
            dlt[a, 4, j, i] = 1 - out[a, 4, j, i]
            self._class_delta(out[a, 5:, j, i], dlt[a, 5:, j, i], int(t[4]))

    def _box_delta(self, out, dlt, truth, anchor, i, j, w, h, net_w, net_h):
        """delta_yolo_box: x, y toward the centre's offset in its cell, w, h toward the log of the
        size over the anchor, all scaled by 2 - truth area (small boxes weigh more)."""
        x, y, tw, th = (float(v) for v in truth[:4])
        target = np.array([x * w - i, y * h - j, np.log(tw * net_w / self.anchors[anchor][0]),
                           np.log(th * net_h / self.anchors[anchor][1])])
        dlt[:] = (2 - tw * th) * (target - out)

    @staticmethod
    def _class_delta(out, dlt, cls):
        """delta_yolo_class: one-hot target; if this anchor already has a class delta (a second
        truth in the same cell), only the new class's entry is set, as Darknet does."""
        if dlt[0]:
            dlt[cls] = 1 - out[cls]
            return
        dlt[:] = -out  # the one-hot target minus out
        dlt[cls] = 1 - out[cls]


def _valid_truths(truth, max_boxes):
    """Darknet's truth list: at most `max_boxes` rows, ending at the first with x == 0."""
    truth = np.asarray(truth, dtype=np.float32).reshape(-1, 5)[:max_boxes]
    empty = np.flatnonzero(truth[:, 0] == 0)
    return truth[:empty[0]] if len(empty) else truth
