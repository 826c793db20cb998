"""[region]: YOLOv2's output layer. Per anchor (`num` of them) the input holds x, y, w, h,
objectness and `classes` class scores, each an H x W plane. As Darknet's forward_region_layer
does, the output applies the logistic to x, y and objectness, and to the classes either a softmax
over the classes (`softmax=1`) or the logistic; w and h stay raw. `anchors` are (w, h) pairs in
grid cells. Boxes are decoded in engine.detection.

Not supported (refused with an error naming the line): YOLO9000's `tree` (hierarchical softmax),
`background=1`, and `coords` other than 4. Training through its loss is not implemented.
"""

from .base import Layer
from .yolo import MAX_ANCHORS, check_outputs_fit, parse_anchors

COORDS = 4


class RegionLayer(Layer):
    type_name = "region"

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
        # Training options Darknet reads; accepted so its cfgs load without warnings.
        for key in ("log", "sqrt", "max", "jitter", "rescore", "thresh", "classfix", "absolute",
                    "random", "coord_scale", "object_scale", "noobject_scale", "class_scale",
                    "bias_match", "mask", "map"):
            section.str(key)

    def describe(self):
        return "detection"

    def forward(self, ops, x, train):
        classes = (COORDS + 1, self.entries)
        if self.softmax:
            return ops.anchor_activate(x, self.num, ((0, 2), (COORDS, COORDS + 1)), classes)
        return ops.anchor_activate(x, self.num, ((0, 2), (COORDS, self.entries)))
