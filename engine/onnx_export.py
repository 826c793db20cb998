"""Export a Network to ONNX, built with the `onnx` package (`pip install -e '.[onnx]'`).

The exported graph computes what the engine computes at inference, with Darknet's semantics
(maxpool padded with -inf from -padding//2, [reorg]'s element order, [shortcut] of different
shapes, BN folded with Darknet's inference rule). One small function per layer type in
EXPORTERS (with the cfg keys it honours, EXPORTED_KEYS) and one per activation in ACTIVATIONS: a
new layer type, key or activation is added there, and `DECODERS` holds the box decoding of each
detection-head type. Anything without an exporter is refused with an ExportError naming it.

Outputs: by default every [yolo]/[region] head's output as the layer produces it, (N, anchors *
entries, H, W) with the logistic (and softmax) already applied, named `<type>_<layer index>`;
a network without heads has one output `output`, (N, outputs), as Network.predict returns.
`decode=True` adds Darknet's box decoding: `boxes` (N, B, 4) centre x, y, width, height in
network-input pixels, `objectness` (N, B) and `scores` (N, B, classes) = objectness x class
score. `nms=IOU` then appends ONNX NonMaxSuppression per class (Darknet's do_nms_sort with
`thresh`), giving `selected` (K, 3) int64 rows (image, class, box), `detection_boxes` (K, 4)
and `detection_scores` (K,). Letterboxing an image into the input, and mapping boxes back to
it, stay outside the model.
"""

import numpy as np

from . import activations as engine_activations
from .backends.numpy_backend import BN_INFERENCE_EPSILON
from .errors import ExportError

MIN_OPSET = 13  # Softmax over one axis, ReduceSum/Pad/Resize taking their sizes as inputs
HEAD_TYPES = ("yolo", "region")

EXPORTERS = {}    # layer type_name -> function(graph, layer, inputs) -> output name
EXPORTED_KEYS = {}  # layer type_name -> the cfg keys its exporter honours
ACTIVATIONS = {}  # activation name -> function(graph, x) -> output name
# head type_name -> function(graph, layer, x, net_w, net_h) -> (boxes, objectness, scores)
DECODERS = {}


def _register(table, *names):
    def decorate(function):
        for name in names:
            table[name] = function
        return function
    return decorate


def layer_exporter(*type_names, keys=()):
    """Register an exporter for these layer types, with the cfg keys it honours (including
    those that change nothing at inference). A key the layer reads but its exporter does not
    list, e.g. one added to the layer later, stops the export with an error naming its line
    instead of exporting something else than the engine computes."""
    for name in type_names:
        EXPORTED_KEYS[name] = frozenset(keys)
    return _register(EXPORTERS, *type_names)


def check_keys(layer):
    section = layer.section
    if section is None:
        return
    for key, option in section.options.items():
        if option.used and key not in EXPORTED_KEYS[layer.type_name]:
            raise ExportError(f"{section.where(key)} {key}={option.value}: the ONNX export does "
                              f"not implement this key of [{layer.type_name}] layers")


def import_onnx():
    """The onnx package, or a one-line error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install -e '.[onnx]' "
                          "(or pip install 'onnx>=1.15')") from None
    return onnx


# ---- the graph being built -----------------------------------------------------------------------
class Graph:
    """Nodes and constants of the model being built; float tensors in `float_type`."""

    def __init__(self, onnx, ops, float_type):
        self.onnx, self.ops = onnx, ops
        self.helper = onnx.helper
        self.float_type = np.dtype(float_type)
        self.nodes, self.initializers = [], []
        self.count = 0
        self.prefix = ""  # the layer being exported, so a viewer (Netron) shows where nodes belong

    def fresh(self, hint):
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, values, hint="const", dtype=None):
        """A constant tensor; floats become the model's float type unless `dtype` is given."""
        values = np.asarray(values)
        if dtype is None:
            dtype = self.float_type if values.dtype.kind == "f" else np.int64
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(values.astype(dtype)), name))
        return name

    def ints(self, values, hint="shape"):
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, op_type, inputs, hint=None, outputs=1, **attributes):
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), names, name=names[0],
                                                **attributes))
        return names[0] if outputs == 1 else names

    def scalar(self, value):
        return self.const(np.float64(value), "scalar")

    def affine(self, x, scale, shift):
        """x * scale + shift, leaving out the trivial parts."""
        if scale != 1:
            x = self.op("Mul", [x, self.scalar(scale)])
        if shift != 0:
            x = self.op("Add", [x, self.scalar(shift)])
        return x

    def reshape(self, x, shape):
        """Reshape with the batch axis kept (0: copied from the input), so any batch works."""
        return self.op("Reshape", [x, self.ints([0] + list(shape))])

    def slice(self, x, axis, start, stop, step=1):
        return self.op("Slice", [x, self.ints([start]), self.ints([stop]), self.ints([axis]),
                                 self.ints([step])])

    def where(self, mask, when_true, when_false):
        return self.op("Where", [self.const(np.asarray(mask, dtype=bool), "mask", bool),
                                 when_true, when_false])

    def activation(self, x, name, layer):
        function = ACTIVATIONS.get(name)
        if function is None:
            raise ExportError(f"{layer.where()} activation '{name}' cannot be exported to ONNX "
                              "(no exporter for it)")
        return function(self, x)


def host(graph, value):
    return np.asarray(graph.ops.to_host(value), dtype=np.float32)


# ---- activations (engine/activations.py) ---------------------------------------------------------
@_register(ACTIVATIONS, "linear")
def _linear(g, x):
    return x


@_register(ACTIVATIONS, "leaky")
def _leaky(g, x):
    return g.op("LeakyRelu", [x], alpha=0.1)


@_register(ACTIVATIONS, "relu")
def _relu(g, x):
    return g.op("Relu", [x])


@_register(ACTIVATIONS, "logistic")
def _logistic(g, x):
    return g.op("Sigmoid", [x])


@_register(ACTIVATIONS, "loggy")
def _loggy(g, x):
    return g.affine(g.op("Sigmoid", [x]), 2, -1)


@_register(ACTIVATIONS, "tanh")
def _tanh(g, x):
    return g.op("Tanh", [x])


@_register(ACTIVATIONS, "elu")
def _elu(g, x):
    return g.op("Elu", [x], alpha=1.0)


@_register(ACTIVATIONS, "selu")
def _selu(g, x):
    return g.op("Selu", [x], alpha=engine_activations.SELU_ALPHA,
                gamma=engine_activations.SELU_LAMBDA)


@_register(ACTIVATIONS, "relie")
def _relie(g, x):
    return g.op("LeakyRelu", [x], alpha=0.01)


@_register(ACTIVATIONS, "ramp")
def _ramp(g, x):
    return g.op("Add", [g.op("Relu", [x]), g.affine(x, 0.1, 0)])


def _less(g, x, value):
    return g.op("Less", [x, g.scalar(value)])


def _greater(g, x, value):
    return g.op("Greater", [x, g.scalar(value)])


@_register(ACTIVATIONS, "plse")
def _plse(g, x):
    low, high, middle = g.affine(x, 0.01, 0.04), g.affine(x, 0.01, 0.96), g.affine(x, 0.125, 0.5)
    inner = g.op("Where", [_greater(g, x, 4), high, middle])
    return g.op("Where", [_less(g, x, -4), low, inner])


@_register(ACTIVATIONS, "stair")
def _stair(g, x):
    step = g.op("Floor", [x])
    half = g.op("Floor", [g.op("Div", [x, g.scalar(2)])])
    odd = g.op("Not", [g.op("Equal", [g.op("Mod", [step, g.scalar(2)], fmod=1), g.scalar(0)])])
    return g.op("Where", [odd, g.op("Add", [g.op("Sub", [x, step]), half]), half])


@_register(ACTIVATIONS, "hardtan")
def _hardtan(g, x):
    return g.op("Clip", [x, g.scalar(-1), g.scalar(1)])


@_register(ACTIVATIONS, "lhtan")
def _lhtan(g, x):
    above = g.op("Add", [g.affine(g.op("Sub", [x, g.scalar(1)]), 0.001, 0), g.scalar(1)])
    inner = g.op("Where", [_greater(g, x, 1), above, x])
    return g.op("Where", [_less(g, x, 0), g.affine(x, 0.001, 0), inner])


# ---- layers (engine/layers/) ---------------------------------------------------------------------
def linear_parameters(g, layer):
    """(weights, biases) with an inference batch norm folded in (Darknet's rule)."""
    if layer.batch_normalize:
        return layer.folded_parameters(g.ops)
    return host(g, layer.params["weights"]), host(g, layer.params["biases"])


@layer_exporter("convolutional", keys=("filters", "size", "stride", "pad", "padding", "groups",
                                      "batch_normalize", "activation"))
def _convolutional(g, layer, x):
    weights, biases = linear_parameters(g, layer)
    p = layer.padding
    y = g.op("Conv", [x, g.const(weights, "weights"), g.const(biases, "biases")],
             kernel_shape=[layer.size] * 2, strides=[layer.stride] * 2, pads=[p] * 4,
             group=layer.groups)
    return g.activation(y, layer.activation, layer)


@layer_exporter("connected", keys=("output", "batch_normalize", "activation"))
def _connected(g, layer, x):
    weights, biases = linear_parameters(g, layer)
    flat = g.op("Flatten", [x], axis=1)
    y = g.op("Gemm", [flat, g.const(weights, "weights"), g.const(biases, "biases")], transB=1)
    return g.reshape(g.activation(y, layer.activation, layer), layer.out_shape)


@layer_exporter("maxpool", keys=("size", "stride", "padding"))
def _maxpool(g, layer, x):
    """Windows start at -padding//2; cells outside the input are -inf. MaxPool's own padding
    ignores padded cells, which is the same, but runtimes require it to be under the window
    size: a larger explicit padding goes through Pad with -inf instead."""
    _, h, w = layer.in_shape
    _, out_h, out_w = layer.out_shape
    top, size, stride = layer.padding // 2, layer.size, layer.stride
    bottom = max((out_h - 1) * stride + size, top + h) - top - h
    right = max((out_w - 1) * stride + size, top + w) - top - w
    pads = [top, top, bottom, right]
    if max(pads) < size:
        return g.op("MaxPool", [x], kernel_shape=[size] * 2, strides=[stride] * 2, pads=pads)
    # Only here can a window hold no input cell: Darknet gives it -FLT_MAX, so pad with that.
    padded = g.op("Pad", [x, g.ints([0, 0, top, top, 0, 0, bottom, right]),
                          g.scalar(-np.finfo(np.float32).max)], mode="constant")
    return g.op("MaxPool", [padded], kernel_shape=[size] * 2, strides=[stride] * 2)


@layer_exporter("avgpool", keys=())
def _avgpool(g, layer, x):
    return g.op("GlobalAveragePool", [x])


@layer_exporter("dropout", "cost", keys=("probability", "type", "scale"))  # training only
def _identity(g, layer, x):
    return x  # dropout is the identity at inference; a cost layer's output is its input


@layer_exporter("softmax", keys=("groups", "temperature"))
def _softmax(g, layer, x):
    z = g.reshape(x, [layer.groups, -1])
    if layer.temperature != 1:
        z = g.op("Div", [z, g.scalar(layer.temperature)])
    return g.reshape(g.op("Softmax", [z], axis=2), layer.out_shape)


@layer_exporter("batchnorm", keys=("per_activation",))
def _batchnorm(g, layer, x):
    """Darknet's inference rule as one affine map per statistic (per channel, or per element
    with per_activation=1)."""
    p = {name: host(g, value).astype(np.float64) for name, value in layer.params.items()}
    factor = p["scales"] / (np.sqrt(p["rolling_variance"]) + BN_INFERENCE_EPSILON)
    shift = p["biases"] - p["rolling_mean"] * factor
    shape = (1,) + tuple(layer.in_shape) if layer.per_activation else (1, -1, 1, 1)
    y = g.op("Mul", [x, g.const(factor.astype(np.float32).reshape(shape), "bn_factor")])
    return g.op("Add", [y, g.const(shift.astype(np.float32).reshape(shape), "bn_shift")])


@layer_exporter("activation", keys=("activation",))
def _activation(g, layer, x):
    return g.activation(x, layer.activation, layer)


@layer_exporter("route", keys=("layers", "groups", "group_id"))
def _route(g, layer, xs):
    parts = []
    for x, (c, _, _) in zip(xs, layer.in_shapes):
        if layer.groups > 1:  # channel group `group_id` of each input
            part = c // layer.groups
            x = g.slice(x, 1, layer.group_id * part, (layer.group_id + 1) * part)
        parts.append(x)
    return parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=1)


@layer_exporter("upsample", keys=("stride", "scale"))
def _upsample(g, layer, x):
    s = layer.stride
    c, h, w = layer.in_shape
    if layer.reverse:  # Darknet's reverse mode: sum of each s x s block
        blocks = g.reshape(x, [c, h // s, s, w // s, s])
        y = g.op("ReduceSum", [blocks, g.ints([3, 5])], keepdims=0)
    else:  # nearest neighbour: output cell (j, i) reads input cell (j // s, i // s)
        scales = g.const(np.float32([1, 1, s, s]), "scales", np.float32)
        y = g.op("Resize", [x, "", scales], mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return g.affine(y, layer.scale, 0)


@layer_exporter("shortcut", keys=("from", "alpha", "beta", "activation"))
def _shortcut(g, layer, xs):
    """act(alpha*previous + beta*from) on the overlap (Darknet's shortcut_cpu): channels
    0..min(C)-1; the larger map subsampled by the integer size ratio; elsewhere the previous
    layer's value. The `from` part is cut to the overlap, spread on the output's grid with zeros
    between its cells, and padded with zeros to the output's shape."""
    previous, source = xs
    (c2, h2, w2), (c1, h1, w1) = layer.in_shape, layer.from_shape
    stride, sample = max(w1 // w2, 1), max(w2 // w1, 1)
    minc, minh, minw = min(c1, c2), min(h1, h2), min(w1, w2)
    add = source
    if (minc, minh, minw, stride) != (c1, h1, w1, 1):
        add = g.slice(add, 1, 0, minc)
        add = g.slice(add, 2, 0, minh * stride, stride)
        add = g.slice(add, 3, 0, minw * stride, stride)
    if sample > 1:
        spread = g.reshape(add, [minc, minh, 1, minw, 1])
        spread = g.op("Pad", [spread, g.ints([0] * 6 + [0, 0, 0, sample - 1, 0, sample - 1]),
                              g.scalar(0)], mode="constant")
        add = g.reshape(spread, [minc, minh * sample, minw * sample])
    covered = (minc, minh * sample, minw * sample)
    if covered != (c2, h2, w2):
        add = g.op("Pad", [add, g.ints([0, 0, 0, 0, 0, c2 - covered[0], h2 - covered[1],
                                        w2 - covered[2]]), g.scalar(0)], mode="constant")
    add = g.affine(add, layer.beta, 0)
    if layer.alpha != 1:
        if covered == (c2, h2, w2) and sample == 1:
            factor = g.scalar(layer.alpha)
        else:  # alpha on the overlap only
            grid = np.ones((1, c2, h2, w2), dtype=np.float32)
            grid[:, :minc, :minh * sample:sample, :minw * sample:sample] = layer.alpha
            factor = g.const(grid, "alpha")
        previous = g.op("Mul", [previous, factor])
    return g.activation(g.op("Add", [previous, add]), layer.activation, layer)


# the keys that matter at inference, and those only the loss or data loading read
YOLO_KEYS = ("mask", "anchors", "classes", "num", "jitter", "ignore_thresh", "truth_thresh", "max",
             "random", "map")
REGION_KEYS = ("anchors", "classes", "num", "coords", "softmax", "tree", "background", "log",
               "sqrt", "max", "jitter", "rescore", "thresh", "classfix", "absolute", "random",
               "coord_scale", "object_scale", "noobject_scale", "class_scale", "bias_match",
               "mask", "map")


def anchor_activate(g, x, anchors, entries, logistic_ranges):
    """The logistic on the given entries of every anchor, the other entries unchanged."""
    mask = np.zeros(entries, dtype=bool)
    for start, stop in logistic_ranges:
        mask[start:stop] = True
    return g.where(np.tile(mask, anchors).reshape(1, -1, 1, 1), g.op("Sigmoid", [x]), x)


@layer_exporter("yolo", keys=YOLO_KEYS)
def _yolo(g, layer, x):
    return anchor_activate(g, x, len(layer.mask), layer.entries, ((0, 2), (4, layer.entries)))


@layer_exporter("region", keys=REGION_KEYS)
def _region(g, layer, x):
    if not layer.softmax:
        return anchor_activate(g, x, layer.num, layer.entries, ((0, 2), (4, layer.entries)))
    c, h, w = layer.in_shape
    grouped = g.reshape(x, [layer.num, layer.entries, h, w])
    head = g.slice(grouped, 2, 0, 5)
    mask = np.array([True, True, False, False, True]).reshape(1, 1, 5, 1, 1)
    head = g.where(mask, g.op("Sigmoid", [head]), head)
    classes = g.op("Softmax", [g.slice(grouped, 2, 5, layer.entries)], axis=2)
    return g.reshape(g.op("Concat", [head, classes], axis=2), [c, h, w])


@layer_exporter("reorg", keys=("stride", "reverse", "extra", "flatten"))
def _reorg(g, layer, x):
    """Darknet's reorg_cpu order, as the engine's ops.reorg: the non-reverse layer reads its
    (c, h, w) input as (c/s^2, h, s, w, s) (the known quirk), the reverse layer the inverse."""
    if layer.extra:  # go.cfg's variant: flatten and append `extra` zeros
        flat = g.reshape(x, [-1, 1, 1])
        return g.op("Pad", [flat, g.ints([0, 0, 0, 0, 0, layer.extra, 0, 0]), g.scalar(0)],
                    mode="constant")
    c, h, w = layer.in_shape
    s = layer.stride
    if c % (s * s):
        raise ExportError(f"{layer.where()} reorg by {s} of {c} channels: the engine's own "
                          f"order needs channels divisible by {s * s}; cannot export")
    oc = c // (s * s)
    if layer.reverse:
        y = g.op("Transpose", [g.reshape(x, [s, s, oc, h, w])], perm=[0, 3, 4, 1, 5, 2])
    else:
        y = g.op("Transpose", [g.reshape(x, [oc, h, s, w, s])], perm=[0, 3, 5, 1, 2, 4])
    return g.reshape(y, layer.out_shape)


@layer_exporter("crop", keys=("crop_height", "crop_width", "flip", "noadjust", "angle",
                              "saturation", "exposure", "shift"))  # the last four: training only
def _crop(g, layer, x):
    """Inference: the centred window, times scale plus shift (x*2-1 unless noadjust=1)."""
    _, h, w = layer.in_shape
    top, left = (h - layer.crop_height) // 2, (w - layer.crop_width) // 2
    window = g.op("Slice", [x, g.ints([top, left]), g.ints([top + layer.crop_height,
                                                             left + layer.crop_width]),
                            g.ints([2, 3])])
    return g.affine(window, layer.scale, layer.shift)


# ---- box decoding (engine.detection) -------------------------------------------------------------
def decode_grid(g, layer, x, anchors, anchor_pixels, net_w, net_h):
    """One head's output (N, anchors*entries, H, W) -> boxes (N, B, 4) centre x, y, width,
    height in input pixels, objectness (N, B), scores (N, B, classes); boxes in Darknet's order
    (anchor, row, column)."""
    _, h, w = layer.out_shape
    entries = layer.entries
    rows = g.reshape(g.op("Transpose", [g.reshape(x, [anchors, entries, h * w])],
                          perm=[0, 1, 3, 2]), [anchors * h * w, entries])
    cell = np.arange(h * w)
    grid = np.tile(np.stack([cell % w, cell // w], axis=-1), (anchors, 1))[None]
    cell_size = np.float32([net_w / w, net_h / h]).reshape(1, 1, 2)
    centres = g.op("Mul", [g.op("Add", [g.slice(rows, 2, 0, 2), g.const(grid.astype(np.float32),
                                                                          "grid")]),
                           g.const(cell_size, "cell")])
    sizes = g.op("Mul", [g.op("Exp", [g.slice(rows, 2, 2, 4)]),
                         g.const(np.repeat(anchor_pixels, h * w, axis=0)[None], "anchors")])
    boxes = g.op("Concat", [centres, sizes], axis=2)
    objectness = g.slice(rows, 2, 4, 5)
    scores = g.op("Mul", [objectness, g.slice(rows, 2, 5, entries)])
    return boxes, g.reshape(objectness, [-1]), scores


@_register(DECODERS, "yolo")
def _decode_yolo(g, layer, x, net_w, net_h):
    # anchors in input pixels
    return decode_grid(g, layer, x, len(layer.mask), layer.mask_anchors, net_w, net_h)


@_register(DECODERS, "region")
def _decode_region(g, layer, x, net_w, net_h):
    # anchors in grid cells
    _, h, w = layer.out_shape
    pixels = layer.anchors * np.float32([net_w / w, net_h / h])
    return decode_grid(g, layer, x, layer.num, pixels, net_w, net_h)


def append_nms(g, boxes, scores, total, iou_threshold, score_threshold):
    """ONNX NonMaxSuppression per image and class: Darknet's do_nms_sort (greedy, by decreasing
    score, drop IoU > iou_threshold) over the scores above score_threshold (get_network_boxes'
    threshold; objectness x class score above it implies objectness above it)."""
    if g.float_type != np.float32:  # runtimes implement NonMaxSuppression in float32
        boxes = g.op("Cast", [boxes], to=g.onnx.TensorProto.FLOAT)
        scores = g.op("Cast", [scores], to=g.onnx.TensorProto.FLOAT)
    by_class = g.op("Transpose", [scores], perm=[0, 2, 1])
    selected = g.op("NonMaxSuppression", [
        boxes, by_class, g.ints([total], "max_boxes"),
        g.const(np.float32([iou_threshold]), "iou_threshold", np.float32),
        g.const(np.float32([score_threshold]), "score_threshold", np.float32)],
        hint="selected", center_point_box=1)
    image_box = g.op("Gather", [selected, g.ints([0, 2])], axis=1)
    image_box_class = g.op("Gather", [selected, g.ints([0, 2, 1])], axis=1)
    detection_boxes = g.op("GatherND", [boxes, image_box])
    detection_scores = g.op("GatherND", [scores, image_box_class])
    return selected, detection_boxes, detection_scores


# ---- the model -----------------------------------------------------------------------------------
def parse_batch(batch):
    """A positive batch size, or None for 'dynamic'."""
    if isinstance(batch, str):
        if batch == "dynamic":
            return None
        try:
            batch = int(batch)
        except ValueError:
            raise ExportError(f"--batch {batch}: expected a positive integer or 'dynamic'") from None
    if batch is None:
        return None
    if int(batch) != batch or batch < 1:
        raise ExportError(f"--batch {batch}: expected a positive integer or 'dynamic'")
    return int(batch)


def needed_layers(net, outputs):
    """Indexes of the layers the given output layers depend on (the rest, e.g. a [cost] after
    the output, are left out of the graph)."""
    needed, stack = set(), list(outputs)
    while stack:
        index = stack.pop()
        if index < 0 or index in needed:
            continue
        needed.add(index)
        stack.extend(net.layers[index].input_indices)
    return sorted(needed)


def build_model(net, batch=1, opset=17, fp16=False, decode=False, nms=None, thresh=0.5):
    """The ONNX ModelProto for `net` (see the module's docstring for inputs and outputs)."""
    onnx = import_onnx()
    batch = parse_batch(batch)
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"--opset {opset}: expected {MIN_OPSET}..{newest} (this onnx package's "
                          "newest)")
    if nms is not None and not 0 <= nms <= 1:
        raise ExportError(f"--nms {nms}: expected an IoU threshold between 0 and 1")
    if not 0 <= thresh < 1:
        raise ExportError(f"--thresh {thresh}: expected a threshold in 0..1")
    decode = decode or nms is not None
    heads = [layer.index for layer in net.layers if layer.type_name in HEAD_TYPES]
    if decode and not heads:
        raise ExportError(f"{net.cfg_path}: --decode/--nms need [yolo] or [region] layers; this "
                          "network has none")
    if decode and len({net.layers[i].classes for i in heads}) > 1:
        raise ExportError(f"{net.cfg_path}: the detection layers disagree on classes; cannot "
                          "decode them into one scores tensor")
    output_layers = heads or [net.output_layer.index]

    g = Graph(onnx, net.ops, np.float16 if fp16 else np.float32)
    tensors = {-1: "input"}
    for index in needed_layers(net, output_layers):
        layer = net.layers[index]
        export = EXPORTERS.get(layer.type_name)
        if export is None:
            raise ExportError(f"{layer.where()} cannot be exported to ONNX: no exporter for "
                              f"[{layer.type_name}] layers")
        check_keys(layer)
        inputs = [tensors[j] for j in layer.input_indices]
        g.prefix = f"{index}_{layer.type_name}/"
        tensors[index] = export(g, layer, inputs if layer.multi_input else inputs[0])
    g.prefix = ""

    elem = onnx.helper.np_dtype_to_tensor_dtype(g.float_type)
    n = batch if batch is not None else "batch"
    outputs = []  # (graph tensor, public name, element type, shape)
    if decode:
        g.prefix = "decode/"
        parts = [DECODERS[net.layers[i].type_name](g, net.layers[i], tensors[i],
                                                   net.options.width, net.options.height)
                 for i in heads]
        boxes, objectness, scores = (p[0] if len(parts) == 1 else g.op("Concat", list(p), axis=1)
                                     for p in zip(*parts))
        total = sum(c // net.layers[i].entries * h * w  # anchors x cells
                    for i in heads for c, h, w in [net.layers[i].out_shape])
        classes = net.layers[heads[0]].classes
        if nms is None:
            outputs += [(boxes, "boxes", elem, [n, total, 4]),
                        (objectness, "objectness", elem, [n, total]),
                        (scores, "scores", elem, [n, total, classes])]
        else:
            g.prefix = "nms/"
            # --nms 0 keeps every box above the threshold, as engine detect --nms 0 does
            selected, found_boxes, found_scores = append_nms(g, boxes, scores, total,
                                                             nms or 1.0, thresh)
            f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
            outputs += [(selected, "selected", i64, ["detections", 3]),
                        (found_boxes, "detection_boxes", f32, ["detections", 4]),
                        (found_scores, "detection_scores", f32, ["detections"])]
    elif heads:
        outputs += [(tensors[i], f"{net.layers[i].type_name}_{i}", elem,
                     [n] + list(net.layers[i].out_shape)) for i in heads]
    else:
        layer = net.layers[output_layers[0]]
        flat = g.op("Flatten", [tensors[layer.index]], axis=1)
        outputs.append((flat, "output", elem, [n, layer.outputs]))

    for tensor, name, _, _ in outputs:  # the public names, on Identity nodes
        g.nodes.append(onnx.helper.make_node("Identity", [tensor], [name], name=f"output/{name}"))
    graph = onnx.helper.make_graph(
        g.nodes, "engine:" + str(net.cfg_path),
        [onnx.helper.make_tensor_value_info("input", elem, [n] + list(net.input_shape))],
        [onnx.helper.make_tensor_value_info(name, t, shape) for _, name, t, shape in outputs],
        initializer=g.initializers)
    opset_id = onnx.helper.make_opsetid("", opset)
    model = onnx.helper.make_model(graph, opset_imports=[opset_id], producer_name="engine",
                                   doc_string=f"exported from {net.cfg_path}")
    model.ir_version = onnx.helper.find_min_ir_version_for([opset_id])
    return model


def export_onnx(net, path, batch=1, opset=17, fp16=False, decode=False, nms=None, thresh=0.5):
    """Write `net` as an ONNX model to `path`; returns the ModelProto. `batch`: a size or
    'dynamic'; `fp16`: float16 weights, input and outputs; `decode`: Darknet's boxes instead
    of raw heads; `nms`: an IoU threshold, adds NonMaxSuppression over scores above `thresh`."""
    from .weights import write_atomically

    model = build_model(net, batch, opset, fp16, decode, nms, thresh)
    write_atomically(path, model.SerializeToString(), what="ONNX file")
    return model
