"""[Gaussian_yolo]: AlexeyAB's Gaussian YOLOv3 output layer (gaussian_yolo_layer.c), inference
only. Per anchor its input holds 8 box entries - x, its uncertainty, y, its uncertainty, w, its
uncertainty, h, its uncertainty - then objectness and the classes. The output applies the
logistic to everything except the raw w and h (entries 4 and 6), and scale_x_y to x and y.
Decoding (engine.detection) is get_gaussian_yolo_detections: boxes as YOLOv3's, and each class
probability is objectness * class * (1 - mean of the four uncertainties).

Its loss (Gaussian negative log-likelihood on the boxes) is not implemented: training refuses
a network with this layer, naming its line.
"""

from .anchor_activation import anchor_activate
from .yolo import TRAINING_DEFAULTS, YoloLayer

GAUSSIAN_TRAINING_DEFAULTS = dict(TRAINING_DEFAULTS, uc_normalizer=1.0)
del GAUSSIAN_TRAINING_DEFAULTS["new_coords"]


class GaussianYoloLayer(YoloLayer):
    type_name = "gaussian_yolo"
    box_entries = 8
    nms_kinds = ("default", "greedynms", "diounms", "cornersnms")
    training_defaults = GAUSSIAN_TRAINING_DEFAULTS
    host_cost = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        point = section.str("yolo_point", "center")
        if point != "center":
            raise section.error(f"yolo_point={point}: only center is supported", "yolo_point")

    alexeyab = True  # only AlexeyAB's fork has this layer

    def describe(self):
        return f"[Gaussian_yolo] scale: {self.scale_x_y:2.2f}"

    def forward(self, ops, x, train):
        anchors = len(self.mask)
        logistic = ((0, 4), (5, 6), (7, self.entries))
        affines = ()
        if self.scale_x_y != 1:
            scale, shift = self.scale_x_y, -0.5 * (self.scale_x_y - 1)
            affines = ((0, 1, scale, shift), (2, 3, scale, shift))
        self.output = anchor_activate(ops, x, anchors, logistic, affines=affines)
        return self.output

    def check_trainable(self):
        raise self.section.error("training [Gaussian_yolo] is not implemented (its Gaussian loss); "
                                 "inference and detection work")
