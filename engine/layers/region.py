"""[region]: YOLOv2's output layer. Per anchor (`num` of them) the input holds x, y, w, h,
objectness and `classes` class scores, each an H x W plane. As Darknet's forward_region_layer
does, the output applies the logistic to x, y and objectness, and to the classes either a softmax
over the classes (`softmax=1`) or the logistic; w and h stay raw. `anchors` are (w, h) pairs in
grid cells. Boxes are decoded in engine.detection.

Not supported (refused with an error naming the line): YOLO9000's `tree` (hierarchical softmax),
`background=1`, and `coords` other than 4; `map=FILE` (a class map) when training.

Training: pjreddie's YOLOv2 loss (forward_region_layer with net.train, src/region_layer.c), on
the host like the [yolo] loss, for every [region] cfg (they are pjreddie's; AlexeyAB's fork has
an older variant whose x, y and objectness deltas carry the logistic's derivative). Per image:
every prediction's objectness goes toward 0 (noobject_scale) unless it overlaps a truth by more
than `thresh`; while fewer than 12800 images have been seen, every box is pulled toward its
anchor at the cell centre (scale .01); each truth (the first 30) is learnt by the anchor of best
shape in its cell (`bias_match=1`: the anchors' shapes, else the predicted boxes' shapes):
box delta coord_scale * (2 - w*h) * (target - output), objectness object_scale * (1 - output)
(`rescore=1`: toward the IoU of the predicted box instead), classes class_scale * (one-hot -
output); with the logistic on the classes (softmax=0), a second truth in a cell and anchor only
sets its own class (Darknet's shortcut). The cost is the sum of squared deltas. `seen` is the
images trained before this iteration plus this mini-batch (Darknet counts by mini-batch: with
subdivisions > 1 the 12800 boundary can fall a few mini-batches apart).
"""

import math

import numpy as np

from ..boxes import box_iou
from .alexeyab_yolo_loss import sum_of_squares
from .anchor_activation import anchor_activate
from .base import Layer
from .yolo import MAX_ANCHORS, check_outputs_fit, parse_anchors

COORDS = 4
TRUTH_BOXES = 30  # pjreddie's region loss reads 30 truth rows per image, whatever `max` says
PRIOR_IMAGES = 12800  # below this many images seen, boxes are pulled toward their anchors
PRIOR_SCALE = 0.01


class RegionLayer(Layer):
    type_name = "region"
    has_cost = True
    host_cost = True  # the loss runs in numpy, so a recorded CUDA graph cannot replay it
    outputs_boxes = box_truth = True
    max_boxes = TRUTH_BOXES

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.classes = section.positive_int("classes", 20)
        self.num = section.positive_int("num", 1, high=MAX_ANCHORS)
        coords = section.int("coords", COORDS)
        if coords != COORDS:
            raise section.error(f"coords={coords}: only coords=4 is supported", "coords")
        if section.str("tree"):
            raise section.error("tree=... (YOLO9000's hierarchical softmax) is not supported", "tree")
        if section.int("background", 0):
            raise section.error("background=1 is not supported", "background")
        self.softmax = section.bool("softmax", False)
        self.anchors = parse_anchors(section, self.num, 0.5)
        self.entries = COORDS + 1 + self.classes
        check_outputs_fit(section, self.in_shape, self.num, self.entries)
        # the network whose `seen` decides the anchor prior (a multi-scale rebuild hands a builder)
        self.net = getattr(net, "network", net)
        self.thresh = section.float("thresh", 0.5)
        self.rescore = section.bool("rescore", False)
        self.bias_match = section.bool("bias_match", False)
        self.coord_scale = section.float("coord_scale", 1.0)
        self.object_scale = section.float("object_scale", 1.0)
        self.noobject_scale = section.float("noobject_scale", 1.0)
        self.class_scale = section.float("class_scale", 1.0)
        self.class_map = section.str("map")
        # Read by Darknet and without effect on its region loss or inference (jitter and random
        # act through the augmentation and multi-scale training).
        for key in ("log", "sqrt", "max", "jitter", "classfix", "absolute", "random", "mask",
                    "mask_scale"):
            section.str(key)

    def describe(self):
        return "detection"

    def forward(self, ops, x, train):
        classes = (COORDS + 1, self.entries)
        if self.softmax:
            self.output = anchor_activate(ops, x, self.num, ((0, 2), (COORDS, COORDS + 1)), classes)
        else:
            self.output = anchor_activate(ops, x, self.num, ((0, 2), (COORDS, self.entries)))
        return self.output

    def check_trainable(self):
        if self.class_map:
            raise self.section.error("map=...: training with a class map file is not implemented",
                                     "map")

    def backward(self, ops, delta, need_dx):
        return delta if need_dx else None

    def cost(self, ops, truth):
        """(cost, delta) for the mini-batch's truth rows (batch, max_boxes * 5), as YoloLayer."""
        self.check_trainable()
        truth = ops.to_host(truth).reshape(len(truth), -1, 5)
        seen = getattr(self.net, "seen", 0) + len(truth)
        cost, delta = self.loss(ops.to_host(self.output), truth, seen)
        return cost, ops.asarray(delta)

    def loss(self, output, truths, seen):
        """pjreddie's region loss on an output (batch, num*entries, H, W) on the host:
        (sum of squared deltas, delta)."""
        output = np.asarray(output, dtype=np.float32)
        delta = np.zeros_like(output)
        shape = (self.num, self.entries) + output.shape[2:]
        for b, truth in enumerate(truths):
            rows = np.asarray(truth, np.float32).reshape(-1, 5)[:TRUTH_BOXES]
            empty = np.flatnonzero(rows[:, 0] == 0)
            rows = rows[:empty[0]] if len(empty) else rows
            self._image_delta(output[b].reshape(shape), delta[b].reshape(shape), rows, seen)
        return sum_of_squares(delta), delta

    def _pred_box(self, out, n, i, j, w, h):
        """get_region_box: (x, y, w, h) relative to the image."""
        x, y, bw, bh = (float(v) for v in out[n, :4, j, i])
        return np.array([(i + x) / w, (j + y) / h, math.exp(bw) * self.anchors[n, 0] / w,
                         math.exp(bh) * self.anchors[n, 1] / h])

    def _image_delta(self, out, dlt, truth, seen):
        n_anchors, _, h, w = out.shape
        anchors = self.anchors.astype(np.float64)
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        with np.errstate(over="ignore"):
            pred = np.stack([(cols + out[:, 0]) / w, (rows + out[:, 1]) / h,
                             np.exp(out[:, 2].astype(np.float64)) * anchors[:, 0, None, None] / w,
                             np.exp(out[:, 3].astype(np.float64)) * anchors[:, 1, None, None] / h],
                            axis=-1)
        dlt[:, 4] = self.noobject_scale * (0 - out[:, 4])
        if len(truth):
            best_iou = np.maximum(box_iou(pred[..., None, :], truth[:, :4]).max(axis=-1), 0)
            dlt[:, 4][best_iou > self.thresh] = 0
        if seen < PRIOR_IMAGES:
            # toward the anchor at the cell centre: targets 0.5, 0.5, log(1), log(1)
            target = np.array([0.5, 0.5, 0.0, 0.0], np.float32)[None, :, None, None]
            dlt[:, :4] = PRIOR_SCALE * (target - out[:, :4])
        for t in truth:
            tx, ty, tw, th = (float(v) for v in t[:4])
            i, j = min(int(tx * w), w - 1), min(int(ty * h), h - 1)
            best_n, best = 0, 0.0
            for n in range(n_anchors):
                shape = anchors[n] / (w, h) if self.bias_match else \
                    self._pred_box(out, n, i, j, w, h)[2:]
                iou = float(box_iou(np.array([0, 0, *shape]), np.array([0, 0, tw, th])))
                if iou > best:
                    best, best_n = iou, n
            n = best_n
            target = np.array([tx * w - i, ty * h - j, math.log(tw * w / anchors[n, 0]),
                               math.log(th * h / anchors[n, 1])])
            dlt[n, :4, j, i] = self.coord_scale * (2 - tw * th) * (target - out[n, :4, j, i])
            iou = float(box_iou(self._pred_box(out, n, i, j, w, h), np.array([tx, ty, tw, th])))
            obj = float(out[n, 4, j, i])
            dlt[n, 4, j, i] = self.object_scale * ((iou if self.rescore else 1.0) - obj)
            cls = int(t[4])
            classes, deltas = out[n, 5:, j, i], dlt[n, 5:, j, i]
            if deltas[0] and not self.softmax:
                deltas[cls] = self.class_scale * (1 - classes[cls])
                continue
            onehot = np.zeros(self.classes, np.float32)
            onehot[cls] = 1
            deltas[:] = self.class_scale * (onehot - classes)
