"""Object detection with [yolo] and [region] networks, as Darknet's `detector test` does it:
letterbox the image into the network input, decode every detection layer's boxes back to image
coordinates, keep those above a confidence threshold, suppress overlaps per class (do_nms_sort),
and draw the result on a copy of the image.

Boxes are (x, y, w, h): centre and size relative to the image (0..1), Darknet's `relative=1`.
"""

from dataclasses import dataclass

import numpy as np

from .boxes import box_diou, box_iou, grid_boxes  # noqa: F401 (also this module's API)
from .config import read_text_lines
from .errors import ConfigError, DataError
from .images import read_rgb, resize_bilinear  # noqa: F401 (also this module's API)

LETTERBOX_FILL = 0.5  # the grey Darknet puts around a letterboxed image


# ---- input ---------------------------------------------------------------------------------------
def letterbox_geometry(image_w, image_h, net_w, net_h):
    """The size the image is scaled to inside the network input, keeping its aspect ratio
    (integer arithmetic as in Darknet's letterbox_image and correct_yolo_boxes)."""
    if net_w / image_w < net_h / image_h:
        return net_w, (image_h * net_w) // image_w
    return (image_w * net_h) // image_h, net_h


def letterbox(image, net_w, net_h):
    """Darknet's letterbox_image: scale (3, H, W) to fit (net_h, net_w), centred on grey."""
    _, h, w = image.shape
    new_w, new_h = letterbox_geometry(w, h, net_w, net_h)
    boxed = np.full((image.shape[0], net_h, net_w), LETTERBOX_FILL, dtype=np.float32)
    dx, dy = (net_w - new_w) // 2, (net_h - new_h) // 2
    boxed[:, dy:dy + new_h, dx:dx + new_w] = resize_bilinear(image, new_w, new_h)
    return boxed


# ---- decoding ------------------------------------------------------------------------------------
@dataclass
class Detections:
    """N detections: boxes (N, 4) relative (x, y, w, h), objectness (N,), probs (N, classes)
    where probs = objectness * class score, zero when not above the threshold."""

    boxes: np.ndarray
    objectness: np.ndarray
    probs: np.ndarray

    def __len__(self):
        return len(self.boxes)

    def select(self, keep):
        return Detections(self.boxes[keep], self.objectness[keep], self.probs[keep])

    @staticmethod
    def concatenate(parts, classes):
        if not parts:
            return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                              np.zeros((0, classes), np.float32))
        return Detections(*(np.concatenate(arrays) for arrays in
                            zip(*((p.boxes, p.objectness, p.probs) for p in parts))))


def _grid_predictions(output, anchors, entries):
    """A detection layer's output for one image (anchors*entries, H, W) -> per-box rows
    (anchor, row, col order, as Darknet enumerates them) and each box's grid column and row."""
    _, h, w = output.shape
    rows = output.reshape(anchors, entries, h * w).transpose(0, 2, 1).reshape(-1, entries)
    cell = np.tile(np.arange(h * w), anchors)
    return rows, (cell % w).astype(np.float32), (cell // w).astype(np.float32), (w, h)


def correct_boxes(boxes, image_w, image_h, net_w, net_h, letterboxed=True):
    """Undo the letterbox: boxes relative to the network input -> relative to the image
    (Darknet's correct_yolo_boxes / correct_region_boxes with relative=1). An input that was
    resized without letterboxing (AlexeyAB's letter=0) needs no correction."""
    if not letterboxed:
        return boxes.copy()
    new_w, new_h = letterbox_geometry(image_w, image_h, net_w, net_h)
    boxes = boxes.copy()
    boxes[:, 0] = (boxes[:, 0] - (net_w - new_w) / 2.0 / net_w) / (new_w / net_w)
    boxes[:, 1] = (boxes[:, 1] - (net_h - new_h) / 2.0 / net_h) / (new_h / net_h)
    boxes[:, 2] *= net_w / new_w
    boxes[:, 3] *= net_h / new_h
    return boxes


def _class_probs(objectness, class_scores, thresh):
    probs = objectness[:, None] * class_scores
    return np.where(probs > thresh, probs, 0).astype(np.float32)


def yolo_detections(layer, output, net_w, net_h, image_w, image_h, thresh, letterboxed=True):
    """Darknet's get_yolo_detections: the boxes of one [yolo] output (C, H, W) whose
    objectness is above `thresh`; w and h scale the layer's anchors (in network pixels)."""
    rows, col, row, (w, h) = _grid_predictions(output, len(layer.mask), layer.entries)
    anchors = np.repeat(layer.mask_anchors, h * w, axis=0)
    keep = rows[:, 4] > thresh
    rows, col, row, anchors = rows[keep], col[keep], row[keep], anchors[keep]
    boxes = grid_boxes(rows, col, row, w, h, anchors[:, 0] / net_w, anchors[:, 1] / net_h,
                       getattr(layer, "new_coords", False))
    boxes = correct_boxes(boxes, image_w, image_h, net_w, net_h, letterboxed)
    return Detections(boxes.astype(np.float32), rows[:, 4].copy(),
                      _class_probs(rows[:, 4], rows[:, 5:], thresh))


def region_detections(layer, output, net_w, net_h, image_w, image_h, thresh, letterboxed=True):
    """Darknet's get_region_detections: every anchor of every cell (objectness set to 0 when not
    above `thresh`); w and h scale the layer's anchors (in grid cells)."""
    rows, col, row, (w, h) = _grid_predictions(output, layer.num, layer.entries)
    anchors = np.repeat(layer.anchors, h * w, axis=0)
    objectness = np.where(rows[:, 4] > thresh, rows[:, 4], 0).astype(np.float32)
    boxes = grid_boxes(rows, col, row, w, h, anchors[:, 0] / w, anchors[:, 1] / h)
    probs = np.where(objectness[:, None] > 0, _class_probs(rows[:, 4], rows[:, 5:], thresh), 0)
    boxes = correct_boxes(boxes, image_w, image_h, net_w, net_h, letterboxed)
    return Detections(boxes.astype(np.float32), objectness, probs.astype(np.float32))


def gaussian_yolo_detections(layer, output, net_w, net_h, image_w, image_h, thresh,
                             letterboxed=True):
    """AlexeyAB's get_gaussian_yolo_detections: entries x, uc, y, uc, w, uc, h, uc, objectness,
    classes; boxes as YOLOv3's from entries 0, 2, 4, 6; class probability objectness * class *
    (1 - the mean of the four uncertainties)."""
    rows, col, row, (w, h) = _grid_predictions(output, len(layer.mask), layer.entries)
    anchors = np.repeat(layer.mask_anchors, h * w, axis=0)
    keep = rows[:, 8] > thresh
    rows, col, row, anchors = rows[keep], col[keep], row[keep], anchors[keep]
    boxes = grid_boxes(rows[:, [0, 2, 4, 6]], col, row, w, h, anchors[:, 0] / net_w,
                       anchors[:, 1] / net_h)
    boxes = correct_boxes(boxes, image_w, image_h, net_w, net_h, letterboxed)
    certainty = 1 - rows[:, [1, 3, 5, 7]].mean(axis=1)
    return Detections(boxes.astype(np.float32), rows[:, 8].copy(),
                      _class_probs(rows[:, 8] * certainty, rows[:, 9:], thresh))


def detection_v1_detections(layer, output, net_w, net_h, image_w, image_h, thresh,
                            letterboxed=False):
    """get_detection_detections (YOLOv1): every box of every cell; class probability
    confidence * class score where above `thresh`. Boxes are relative to the stretched image."""
    cells, classes, num = layer.side * layer.side, layer.classes, layer.num
    flat = output.reshape(-1)
    scores = flat[:cells * classes].reshape(cells, classes)
    confidence = flat[cells * classes:cells * (classes + num)].reshape(cells, num)
    coords = flat[cells * (classes + num):].reshape(cells, num, 4).astype(np.float64)
    cell = np.arange(cells)
    col, row = (cell % layer.side)[:, None], (cell // layer.side)[:, None]
    power = 2 if layer.sqrt else 1
    boxes = np.stack([(coords[..., 0] + col) / layer.side, (coords[..., 1] + row) / layer.side,
                      coords[..., 2] ** power, coords[..., 3] ** power], axis=-1).reshape(-1, 4)
    objectness = confidence.reshape(-1).astype(np.float32)
    class_scores = np.repeat(scores, num, axis=0)
    return Detections(boxes.astype(np.float32), objectness,
                      _class_probs(objectness, class_scores, thresh))


DECODERS = {"yolo": yolo_detections, "region": region_detections,
            "detection": detection_v1_detections,
            "gaussian_yolo": gaussian_yolo_detections}


def network_detections(net, image_w, image_h, thresh, image_index=0, letterboxed=True,
                       outputs=None):
    """Darknet's get_network_boxes after a forward pass: the detections of every [yolo] and
    [region] layer of `net` for image `image_index` of the batch, in layer order. outputs: those
    layers' outputs on the host (net.predict(..., layers=net.detection_layers)'s), else they are
    read from the last forward."""
    parts, classes = [], 0
    heads = iter(outputs) if outputs is not None else None
    for layer in net.layers:
        decode = DECODERS.get(layer.type_name)
        if decode is None:
            continue
        output = (next(heads) if heads is not None
                  else net.ops.to_host(net.outputs[layer.index]))[image_index]
        classes = layer.classes
        parts.append(decode(layer, output, net.options.width, net.options.height,
                            image_w, image_h, thresh, letterboxed))
    if not parts:
        raise DataError(f"{net.cfg_path}: the network has no [yolo] or [region] layer (nor "
                        "YOLOv1's [detection]) to detect with")
    return Detections.concatenate(parts, classes)


# ---- non-maximum suppression ---------------------------------------------------------------------
# nms_kind -> the overlap measure AlexeyAB's diounms_sort compares with the threshold
# (greedynms uses box_diou, whose exponent is fixed at 0.6; cornersnms plain IoU).
NMS_OVERLAPS = {
    "default": lambda a, b, beta: box_iou(a, b),
    "cornersnms": lambda a, b, beta: box_iou(a, b),
    "greedynms": lambda a, b, beta: box_diou(a, b, 0.6),
    "diounms": lambda a, b, beta: box_diou(a, b, beta),
}


def nms_sort(detections, nms_thresh, kind="default", beta=0.6):
    """Darknet's do_nms_sort: drop detections with zero objectness; then for each class, in
    order of decreasing probability, zero that class's probability in every later box that
    overlaps a kept one with IoU > nms_thresh. Returns new Detections. AlexeyAB's diounms_sort
    (nms_kind greedynms, diounms, cornersnms; `beta` is beta_nms) is the same loop with another
    overlap measure (NMS_OVERLAPS)."""
    overlap_measure = NMS_OVERLAPS[kind]
    kept = detections.select(detections.objectness > 0)
    probs = kept.probs.copy()
    for k in range(probs.shape[1]):
        candidates = np.flatnonzero(probs[:, k] > 0)
        order = candidates[np.argsort(-probs[candidates, k], kind="stable")]
        for position, i in enumerate(order):
            if probs[i, k] == 0:
                continue
            later = order[position + 1:]
            overlapping = later[overlap_measure(kept.boxes[i], kept.boxes[later], beta) > nms_thresh]
            probs[overlapping, k] = 0
    return Detections(kept.boxes, kept.objectness, probs)


# ---- output --------------------------------------------------------------------------------------
@dataclass
class Labelled:
    """One box to report: the classes above the threshold with their probabilities, and the
    box in pixels (left, top, right, bottom), clamped to the image as draw_detections does."""

    classes: list
    probabilities: list
    pixels: tuple


def label_detections(detections, image_w, image_h, thresh):
    """The boxes that have at least one class probability above `thresh` (draw_detections)."""
    labelled = []
    for box, probs in zip(detections.boxes, detections.probs):
        classes = [int(k) for k in np.flatnonzero(probs > thresh)]
        if not classes:
            continue
        x, y, w, h = (float(v) for v in box)
        # int() truncates toward zero, like Darknet's float-to-int assignments. Darknet clamps
        # only the near sides; we clamp all four (before int(), so a box that exp() made
        # infinite stays a number) so a box outside the image stays drawable.
        left, right = (int(min(max(v * image_w, 0), image_w - 1)) for v in (x - w / 2, x + w / 2))
        top, bottom = (int(min(max(v * image_h, 0), image_h - 1)) for v in (y - h / 2, y + h / 2))
        labelled.append(Labelled(classes, [float(probs[k]) for k in classes],
                                 (left, top, right, bottom)))
    return labelled


def class_color(k, classes):
    """Darknet's get_color palette for class k, as an RGB tuple of 0..255."""
    palette = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], float)
    ratio = (k * 123457 % classes) / classes * 5
    low, high = int(np.floor(ratio)), int(np.ceil(ratio))
    frac = ratio - low
    rgb = (1 - frac) * palette[low][::-1] + frac * palette[high][::-1]
    return tuple(int(round(255 * v)) for v in rgb)


def draw(image_path, labelled, names, classes):
    """A copy of the image with each box and its class names drawn (Pillow)."""
    from PIL import Image, ImageDraw

    with Image.open(image_path) as source:
        image = source.convert("RGB")
    canvas = ImageDraw.Draw(image)
    width = max(int(image.height * 0.006), 1)
    for item in labelled:
        color = class_color(item.classes[0], classes)
        canvas.rectangle(item.pixels, outline=color, width=width)
        text = ", ".join(class_name(names, k) for k in item.classes)
        left, top = item.pixels[:2]
        text_box = canvas.textbbox((left, top), text)
        label_top = max(top - (text_box[3] - text_box[1]) - 2, 0)
        canvas.rectangle((left, label_top, left + text_box[2] - text_box[0] + 4,
                          label_top + text_box[3] - text_box[1] + 2), fill=color)
        canvas.text((left + 2, label_top), text, fill=(0, 0, 0))
    return image


def class_name(names, k):
    return names[k] if names and k < len(names) else str(k)


def read_names(path):
    """A .names file: one class name per line."""
    return [line.strip() for line in read_text_lines(path, "names", DataError) if line.strip()]


def uses_letterbox(net, letterboxed=None):
    """Whether detection letterboxes the image: the caller's choice, else [net] letter_box
    (AlexeyAB: 1 letterboxes, 0 stretches the image to the input), else the convention of the
    Darknet the cfg comes from: AlexeyAB's `detector test` stretches, pjreddie's letterboxes.
    A cfg whose detection layers use keys only AlexeyAB reads (scale_x_y, nms_kind, iou_loss,
    [Gaussian_yolo]...) is AlexeyAB's; the others (YOLOv2, YOLOv3) are taken as pjreddie's."""
    if letterboxed is not None:
        return letterboxed
    letter_box = net.options.letter_box
    if letter_box is not None:
        return bool(letter_box)
    if any(layer.type_name == "detection" for layer in net.layers):
        return False  # YOLOv1 decodes boxes relative to the stretched image
    return not any(getattr(layer, "alexeyab", False) for layer in net.layers)


def nms_choice(net):
    """(nms_kind, beta_nms) of the network's last layer, the one AlexeyAB's test_detector reads."""
    last = net.layers[-1]
    return getattr(last, "nms_kind", "default"), getattr(last, "beta_nms", 0.6)


def detect(net, image_path, thresh=0.5, nms=0.45, letterboxed=None):
    """Run `net` on one image as Darknet's `detector test` does. Returns (labelled boxes,
    the Detections after NMS, (image width, image height))."""
    heads = [layer.index for layer in net.detection_layers]
    if not heads:
        raise ConfigError(f"{net.cfg_path}: not a detector (no [yolo] or [region] layer); "
                          "engine predict classifies images")
    if net.options.channels != 3:
        raise ConfigError(f"{net.cfg_path}: detection reads RGB images, but the network takes "
                          f"{net.options.channels} channels")
    image = read_rgb(image_path)
    _, image_h, image_w = image.shape
    letterboxed = uses_letterbox(net, letterboxed)
    if letterboxed:
        x = letterbox(image, net.options.width, net.options.height)
    else:
        x = resize_bilinear(image, net.options.width, net.options.height)
    outputs = net.predict(x[None], layers=heads)  # (their values checked finite)
    detections = network_detections(net, image_w, image_h, thresh, letterboxed=letterboxed,
                                    outputs=outputs)
    if nms:
        kind, beta = nms_choice(net)
        detections = nms_sort(detections, nms, kind, beta)
    return label_detections(detections, image_w, image_h, thresh), detections, (image_w, image_h)
