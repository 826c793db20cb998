"""[detection]: YOLOv1's output layer (pjreddie's and AlexeyAB's detection_layer.c), inference
only. Its input is flat: side*side cells of `classes` class scores, then side*side*num box
confidences, then side*side*num boxes of `coords`=4 (x, y, w, h). The output is the input, with
a softmax over each cell's classes when softmax=1. Boxes are decoded by engine.detection
(get_detection_detections): centre (x + col)/side, (y + row)/side, size w, h (squared with
sqrt=1), class probability confidence * class score; the image is stretched to the input, as
YOLOv1 always ran. Its loss is not implemented: it is not a cost layer, and training a network
whose output it is fails with Darknet's "needs a [softmax], [cost] or [yolo] layer".

[contrastive]: AlexeyAB's contrastive loss (softmax_layer.c) computes nothing at inference; its
output stays zero there, as its buffer does in AlexeyAB. Training it is refused at its line.
"""

import numpy as np

from .base import Layer
from .channels import channel_slice, concat_channels


class DetectionLayer(Layer):
    type_name = "detection"
    outputs_boxes = True  # inference only: no loss

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.classes = section.require_positive("classes", section.int("classes", 1))
        self.coords = section.int("coords", 1)
        self.num = section.require_positive("num", section.int("num", 1))
        self.side = section.require_positive("side", section.int("side", 7))
        self.softmax = section.bool("softmax", False)
        self.sqrt = section.bool("sqrt", False)
        if self.coords != 4:
            raise section.error(f"coords={self.coords}: only 4 (x, y, w, h) is supported", "coords")
        if section.int("reorg", 0):
            raise section.error("reorg=1 is not supported", "reorg")
        cells = self.side * self.side
        expected = cells * (self.classes + self.num * (1 + self.coords))
        if int(np.prod(self.in_shape)) != expected:
            raise section.error(f"the input has {int(np.prod(self.in_shape))} values; side={self.side}, "
                                f"classes={self.classes}, num={self.num} need {expected}")
        self.out_shape = (expected, 1, 1)
        for key in ("rescore", "max", "coord_scale", "forced", "object_scale", "noobject_scale",
                    "class_scale", "jitter", "resize", "random"):
            section.str(key)  # the loss's and augmentation's options

    def describe(self):
        return "Detection Layer"

    def forward(self, ops, x, train):
        flat = ops.reshape(x, (x.shape[0], -1, 1, 1))
        if not self.softmax:
            return ops.copy(flat)
        scores = self.side * self.side * self.classes
        probabilities = ops.softmax(channel_slice(ops, flat, 0, scores), self.side * self.side, 1.0)
        return concat_channels(ops, [probabilities, (flat, scores, int(flat.shape[1]))])

    def backward(self, ops, delta, need_dx):
        return ops.reshape(delta, (delta.shape[0],) + self.in_shape) if need_dx else None


class ContrastiveLayer(Layer):
    type_name = "contrastive"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        for key in ("classes", "yolo_layer", "temperature", "cls_normalizer", "max_delta",
                    "contrastive_neg_max"):
            section.str(key)

    def describe(self):
        return "contrastive"

    def forward(self, ops, x, train):
        return ops.zeros(x.shape)

    def backward(self, ops, delta, need_dx):
        return None

    def check_trainable(self):
        raise self.section.error("training with AlexeyAB's [contrastive] loss is not implemented; "
                                 "inference ignores the layer, as AlexeyAB's does")
