"""Export a Network to ONNX, built with the `onnx` package (`pip install -e '.[onnx]'`).

The exported graph computes what the engine computes at inference, with Darknet's semantics
(maxpool padded with -inf from -padding//2, [reorg]'s element order, [shortcut] of different
shapes, BN folded with the network's inference rule), AlexeyAB's layers and keys included. One
small function per layer type in EXPORTERS (with the cfg keys it honours, EXPORTED_KEYS) and
one per activation in ACTIVATIONS: a
new layer type, key or activation is added there, and `DECODERS` holds the box decoding of each
detection-head type. Anything without an exporter is refused with an ExportError naming it.

Outputs: by default every detection head's output ([yolo], [region], AlexeyAB's
[Gaussian_yolo], YOLOv1's [detection]) as the layer produces it, e.g. (N, anchors * entries, H, W)
with the logistic (and softmax, scale_x_y) already applied, named `<type>_<layer index>`;
a network without heads has one output `output`, (N, outputs), as Network.predict returns.
`decode=True` adds Darknet's box decoding: `boxes` (N, B, 4) centre x, y, width, height in
network-input pixels, `objectness` (N, B) and `scores` (N, B, classes) = objectness x class
score. `nms=IOU` then appends the suppression engine detect uses (Darknet's do_nms_sort with
`thresh`: ONNX NonMaxSuppression per class; AlexeyAB's DIoU kinds greedynms/diounms as a Loop),
giving `selected` (K, 3) int64 rows (image, class, box), `detection_boxes` (K, 4) and
`detection_scores` (K,). Letterboxing an image into the input, and mapping boxes back to it,
stay outside the model.

Batch norm is folded by the layers' own folding (LinearUnit.folded_parameters), so with the
engine's inference rule for the network's Darknet (pjreddie's or AlexeyAB's).
"""

import numpy as np

from . import activations as engine_activations
from . import detection
from .batchnorm_rule import inference_affine
from .constants import (GELU_CUBIC, GELU_LINEAR, LEAKY_SLOPE, LHTAN_SLOPE, PLSE_OUTER_SLOPE,
                        PLSE_SLOPE, RAMP_SLOPE, RELIE_SLOPE)
from .errors import ExportError
from .layers import convolutional as conv_module
from .network import GENERIC_LAYER_KEYS
from .layers import yolo as yolo_module

MIN_OPSET = 13  # Softmax over one axis, ReduceSum/Pad/Resize taking their sizes as inputs
HEAD_TYPES = ("yolo", "region", "gaussian_yolo", "detection")

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


# AlexeyAB's keys of every layer (engine.network.read_generic_keys): they change training or
# weights loading only (the others than these two are refused by the engine unless default)
EVERY_LAYER_KEYS = frozenset(("stopbackward", "onlyforward") + tuple(GENERIC_LAYER_KEYS))


def check_keys(layer):
    section = layer.section
    if section is None:
        return
    for key, value in section.used_options():
        if key not in EXPORTED_KEYS[layer.type_name] | EVERY_LAYER_KEYS:
            raise ExportError(f"{section.where(key)} {key}={value}: the ONNX export does "
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

    def __init__(self, onnx, ops, float_type, opset=17):
        self.onnx, self.ops, self.opset = onnx, ops, opset
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

    def reduce(self, op_type, x, axes, keepdims=1):
        """ReduceSum takes its axes as an input from opset 13, the other reductions from 18."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.ints(axes, "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def batch_shape(self, x, shape):
        """(batch of x,) + shape as an int64 tensor, for Expand and ConstantOfShape."""
        batch = self.slice(self.op("Shape", [x]), 0, 0, 1)
        return self.op("Concat", [batch, self.ints(list(shape))], axis=0)

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
    return g.op("LeakyRelu", [x], alpha=LEAKY_SLOPE)


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
    return g.op("LeakyRelu", [x], alpha=RELIE_SLOPE)


@_register(ACTIVATIONS, "ramp")
def _ramp(g, x):
    return g.op("Add", [g.op("Relu", [x]), g.affine(x, RAMP_SLOPE, 0)])


def _less(g, x, value):
    return g.op("Less", [x, g.scalar(value)])


def _greater(g, x, value):
    return g.op("Greater", [x, g.scalar(value)])


@_register(ACTIVATIONS, "plse")
def _plse(g, x):
    outer = PLSE_OUTER_SLOPE  # .01(x + 4) below -4, .01(x - 4) + 1 above 4
    low, high = g.affine(x, outer, 4 * outer), g.affine(x, outer, 1 - 4 * outer)
    middle = g.affine(x, PLSE_SLOPE, 0.5)
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
    above = g.op("Add", [g.affine(g.op("Sub", [x, g.scalar(1)]), LHTAN_SLOPE, 0), g.scalar(1)])
    inner = g.op("Where", [_greater(g, x, 1), above, x])
    return g.op("Where", [_less(g, x, 0), g.affine(x, LHTAN_SLOPE, 0), inner])


# AlexeyAB's activations
def _softplus(g, x):
    """AlexeyAB's softplus_activate with MISH_THRESHOLD: x above it, exp(x) below -it."""
    t = engine_activations.MISH_THRESHOLD
    inner = g.op("Where", [_less(g, x, -t), g.op("Exp", [x]), g.op("Softplus", [x])])
    return g.op("Where", [_greater(g, x, t), x, inner])


@_register(ACTIVATIONS, "mish")
def _mish(g, x):
    return g.op("Mul", [x, g.op("Tanh", [_softplus(g, x)])])


@_register(ACTIVATIONS, "swish")
def _swish(g, x):
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


@_register(ACTIVATIONS, "hard_mish")
def _hard_mish(g, x):
    square = g.op("Add", [g.op("Mul", [g.op("Mul", [x, x]), g.scalar(0.5)]), x])
    inner = g.op("Where", [_greater(g, x, -2), square, g.scalar(0)])
    return g.op("Where", [_greater(g, x, 0), x, inner])


@_register(ACTIVATIONS, "relu6")
def _relu6(g, x):
    return g.op("Clip", [x, g.scalar(0), g.scalar(6)])


@_register(ACTIVATIONS, "gelu")
def _gelu(g, x):
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [g.affine(x, GELU_LINEAR, 0), g.affine(cube, GELU_CUBIC, 0)])
    return g.op("Mul", [g.affine(x, 0.5, 0), g.affine(g.op("Tanh", [inner]), 1, 1)])


@_register(ACTIVATIONS, "revleaky")
def _revleaky(g, x):  # leaky forward on both of AlexeyAB's paths
    return g.op("LeakyRelu", [x], alpha=LEAKY_SLOPE)


def _over_channel_sum(g, values):
    total = g.reduce("ReduceSum", values, [1])
    eps = g.scalar(engine_activations.NORMALIZE_CHANNELS_EPSILON)
    return g.op("Div", [values, g.op("Add", [eps, total])])


@_register(ACTIVATIONS, "normalize_channels")
def _normalize_channels(g, x):
    return _over_channel_sum(g, g.op("Relu", [x]))


@_register(ACTIVATIONS, "normalize_channels_softmax")
def _normalize_channels_softmax(g, x):
    return _over_channel_sum(g, g.op("Exp", [x]))


@_register(ACTIVATIONS, "normalize_channels_softmax_maxval")
def _normalize_channels_softmax_maxval(g, x):
    return _over_channel_sum(g, g.op("Exp", [g.op("Sub", [x, g.reduce("ReduceMax", x, [1])])]))


# ---- layers (engine/layers/) ---------------------------------------------------------------------
def linear_parameters(g, layer):
    """(weights, biases) with an inference batch norm folded in (Darknet's rule)."""
    if layer.batch_normalize:
        return layer.folded_parameters(g.ops)
    return host(g, layer.params["weights"]), host(g, layer.params["biases"])


CONV_KEYS = ("filters", "size", "stride", "pad", "padding", "groups", "batch_normalize",
             "activation", "stride_x", "stride_y", "dilation", "share_index", "antialiasing") + \
    tuple(conv_module.UNSUPPORTED_KEYS) + conv_module.NEUTRAL_KEYS  # refused unless default


def blur(g, layer, x):
    """AlexeyAB's antialiasing: the fixed depthwise blur after the stride-1 layer."""
    b = layer.blur
    return g.op("Conv", [x, g.const(b.host_weights, "blur")], kernel_shape=[b.size] * 2,
                strides=[b.stride] * 2, pads=[b.padding] * 4, group=b.channels)


@layer_exporter("convolutional", keys=CONV_KEYS)
def _convolutional(g, layer, x):
    """Darknet's convolution with AlexeyAB's stride_x/stride_y, dilation (padding times the
    dilation, as its im2col), share_index (the owner's parameters, which the layer holds) and
    antialiasing."""
    weights, biases = linear_parameters(g, layer)
    p = layer.padding * layer.dilation
    y = g.op("Conv", [x, g.const(weights, "weights"), g.const(biases, "biases")],
             kernel_shape=[layer.size] * 2, strides=[layer.stride_y, layer.stride_x],
             pads=[p] * 4, dilations=[layer.dilation] * 2, group=layer.groups)
    y = g.activation(y, layer.activation, layer)
    return blur(g, layer, y) if layer.blur is not None else y


@layer_exporter("connected", keys=("output", "batch_normalize", "activation"))
def _connected(g, layer, x):
    weights, biases = linear_parameters(g, layer)
    flat = g.op("Flatten", [x], axis=1)
    y = g.op("Gemm", [flat, g.const(weights, "weights"), g.const(biases, "biases")], transB=1)
    return g.reshape(g.activation(y, layer.activation, layer), layer.out_shape)


def pool_frame(layer, out_h, out_w):
    """Darknet's pooling geometry: windows start at -padding//2; pads (top, left, bottom, right)
    reaching every window's cells."""
    _, h, w = layer.in_shape
    top, size, stride = layer.padding // 2, layer.size, layer.stride
    bottom = max((out_h - 1) * stride + size, top + h) - top - h
    right = max((out_w - 1) * stride + size, top + w) - top - w
    return [top, top, bottom, right]


@layer_exporter("maxpool", keys=("size", "stride", "padding", "stride_x", "stride_y",
                                 "maxpool_zero_nonmax", "maxpool_depth", "out_channels",
                                 "antialiasing"))
def _maxpool(g, layer, x):
    """Windows start at -padding//2; cells outside the input are -inf. MaxPool's own padding
    ignores padded cells, which is the same, but runtimes require it to be under the window
    size: a larger explicit padding goes through Pad with -inf instead. AlexeyAB's
    maxpool_depth is a maximum across channels g, g + groups...; antialiasing pools at stride 1
    and blurs with the layer's stride."""
    if layer.depth:
        c, h, w = layer.in_shape
        groups = layer.out_shape[0]
        members = -(-c // groups)
        if members * groups != c:  # the last members' slots: -inf never wins
            x = g.op("Pad", [x, g.ints([0, 0, 0, 0, 0, members * groups - c, 0, 0]),
                             g.scalar(-np.inf)], mode="constant")
        return g.reduce("ReduceMax", g.reshape(x, [members, groups, h, w]), [1], keepdims=0)
    size, stride = layer.size, layer.stride
    pads = pool_frame(layer, *layer.pooled_hw)
    if max(pads) < size:
        y = g.op("MaxPool", [x], kernel_shape=[size] * 2, strides=[stride] * 2, pads=pads)
    else:
        # Only here can a window hold no input cell: Darknet gives it -FLT_MAX, so pad with that.
        top, _, bottom, right = pads
        padded = g.op("Pad", [x, g.ints([0, 0, top, top, 0, 0, bottom, right]),
                              g.scalar(-np.finfo(np.float32).max)], mode="constant")
        y = g.op("MaxPool", [padded], kernel_shape=[size] * 2, strides=[stride] * 2)
    return blur(g, layer, y) if layer.blur is not None else y


@layer_exporter("local_avgpool", keys=("size", "stride", "padding", "stride_x", "stride_y"))
def _local_avgpool(g, layer, x):
    """The mean of the input cells inside each window: the window's sum (zero padding) times
    size^2 / the number of cells inside, a constant of the geometry (0/0 = NaN for a window
    wholly outside, as the engine)."""
    _, out_h, out_w = layer.out_shape
    top, _, bottom, right = pool_frame(layer, out_h, out_w)
    size, stride = layer.size, layer.stride
    _, h, w = layer.in_shape
    inside = np.zeros((top + h + bottom, top + w + right))
    inside[top:top + h, top:top + w] = 1
    cells = sum(inside[i:i + stride * out_h:stride, j:j + stride * out_w:stride]
                for i in range(size) for j in range(size))
    with np.errstate(divide="ignore"):
        factor = np.where(cells > 0, size * size / np.maximum(cells, 1), np.nan)
    padded = g.op("Pad", [x, g.ints([0, 0, top, top, 0, 0, bottom, right]), g.scalar(0)],
                  mode="constant")
    mean = g.op("AveragePool", [padded], kernel_shape=[size] * 2, strides=[stride] * 2)
    return g.op("Mul", [mean, g.const(factor.reshape(1, 1, out_h, out_w), "cells")])


@layer_exporter("avgpool", keys=())
def _avgpool(g, layer, x):
    return g.op("GlobalAveragePool", [x])


@layer_exporter("dropout", "cost", keys=("probability", "type", "scale"))  # training only
@layer_exporter("empty", keys=())  # AlexeyAB's [empty] and [silence]
def _identity(g, layer, x):
    return x  # dropout is the identity at inference; a cost layer's output is its input


@layer_exporter("contrastive", keys=("classes", "yolo_layer", "temperature", "cls_normalizer",
                                     "max_delta", "contrastive_neg_max"))
def _contrastive(g, layer, x):
    """AlexeyAB's contrastive loss computes nothing at inference: zeros of the input's shape."""
    return g.op("Expand", [g.scalar(0), g.op("Shape", [x])])


@layer_exporter("implicit", keys=("filters", "atoms", "mean", "std"))
def _implicit(g, layer, x):
    """The learned constant, once per image of the input's batch."""
    weights = host(g, layer.params["weights"]).reshape((1,) + tuple(layer.out_shape))
    return g.op("Expand", [g.const(weights, "implicit"), g.batch_shape(x, layer.out_shape)])


@layer_exporter("sam", keys=("from", "activation"))
@layer_exporter("scale_channels", keys=("from", "activation", "scale_wh"))
def _scale(g, layer, xs):
    """act(from's output * the input), the input broadcast over positions ([scale_channels])
    or channels (scale_wh=1)."""
    scale, source = xs
    return g.activation(g.op("Mul", [source, scale]), layer.activation, layer)


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
    # the engine's rule for this network's Darknet
    factor, shift = inference_affine(p["scales"], p["biases"], p["rolling_mean"],
                                     p["rolling_variance"], layer.bn_epsilons)
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


@layer_exporter("shortcut", keys=("from", "alpha", "beta", "activation", "weights_type",
                                  "weights_normalization"))
def _shortcut(g, layer, xs):
    if layer.multilayer:
        return _weighted_shortcut(g, layer, xs)
    return g.activation(_darknet_shortcut(g, layer, xs), layer.activation, layer)


def _weighted_shortcut(g, layer, xs):
    """AlexeyAB's act(w_0*prev + sum w_i*from_i): a source with fewer channels adds to the first
    ones, a wider one adds its first channels; the weights (normalized across the inputs as the
    engine does, by its own normalize_channels) are constants."""
    channels = layer.out_shape[0]
    weights = None
    if layer.weight_order:
        raw = host(g, layer.params["weights"])
        inputs, per = raw.shape
        view = raw.reshape(1, inputs, per, 1)
        if layer.normalization:
            view = engine_activations.normalize_channels(view, layer.normalization)
        weights = view.reshape(inputs, per)
    total = None
    for i, (x, c) in enumerate(zip(xs, [layer.in_shape[0]] + [s[0] for s in layer.from_shapes])):
        if c > channels:
            x, c = g.slice(x, 1, 0, channels), channels
        if weights is not None:
            w = weights[i] if weights.shape[1] == 1 else weights[i][:c]
            x = g.op("Mul", [x, g.const(w.reshape(1, -1, 1, 1), "weight")])
        if c < channels:
            x = g.op("Pad", [x, g.ints([0, 0, 0, 0, 0, channels - c, 0, 0]), g.scalar(0)],
                     mode="constant")
        total = x if total is None else g.op("Add", [total, x])
    return g.activation(total, layer.activation, layer)


def _darknet_shortcut(g, layer, xs):
    """alpha*previous + beta*from on the overlap (Darknet's shortcut_cpu): channels
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
    return g.op("Add", [previous, add])


# the keys that matter at inference, and those only the loss, data loading or detection read
YOLO_KEYS = ("mask", "anchors", "classes", "num", "ignore_thresh", "truth_thresh", "max",
             "scale_x_y", "new_coords", "nms_kind", "beta_nms") + \
    tuple(yolo_module.TRAINING_DEFAULTS) + yolo_module.IGNORED_KEYS
GAUSSIAN_YOLO_KEYS = YOLO_KEYS + ("uc_normalizer", "yolo_point")
REGION_KEYS = ("anchors", "classes", "num", "coords", "softmax", "tree", "background", "log",
               "sqrt", "max", "jitter", "rescore", "thresh", "classfix", "absolute", "random",
               "coord_scale", "object_scale", "noobject_scale", "class_scale", "bias_match",
               "mask", "map")


def anchor_activate(g, x, anchors, entries, logistic_ranges, affine=None):
    """The logistic on the given entries of every anchor, the other entries unchanged; then
    `affine` = (entries, scale, shift): v*scale + shift on those (AlexeyAB's scale_x_y)."""
    def mask_of(ranges):
        mask = np.zeros(entries, dtype=bool)
        for start, stop in ranges:
            mask[start:stop] = True
        return np.tile(mask, anchors).reshape(1, -1, 1, 1)

    if logistic_ranges:
        x = g.where(mask_of(logistic_ranges), g.op("Sigmoid", [x]), x)
    if affine is not None:
        ranges, scale, shift = affine
        x = g.where(mask_of(ranges), g.affine(x, scale, shift), x)
    return x


def scale_x_y(layer, ranges):
    if layer.scale_x_y == 1:
        return None
    return ranges, layer.scale_x_y, -0.5 * (layer.scale_x_y - 1)


@layer_exporter("yolo", keys=YOLO_KEYS)
def _yolo(g, layer, x):
    """Logistic on x, y, objectness and classes (none with new_coords), then scale_x_y."""
    logistic = () if layer.new_coords else ((0, 2), (4, layer.entries))
    return anchor_activate(g, x, len(layer.mask), layer.entries, logistic,
                           scale_x_y(layer, ((0, 2),)))


@layer_exporter("gaussian_yolo", keys=GAUSSIAN_YOLO_KEYS)
def _gaussian_yolo(g, layer, x):
    """Logistic on everything but the raw w, h (entries 4 and 6), scale_x_y on x and y
    (entries 0 and 2)."""
    return anchor_activate(g, x, len(layer.mask), layer.entries,
                           ((0, 4), (5, 6), (7, layer.entries)),
                           scale_x_y(layer, ((0, 1), (2, 3))))


@layer_exporter("detection", keys=("classes", "coords", "num", "side", "softmax", "sqrt", "reorg",
                                   "rescore", "max", "coord_scale", "forced", "object_scale",
                                   "noobject_scale", "class_scale", "jitter", "resize", "random"))
def _detection(g, layer, x):
    """YOLOv1: the flat input, with a softmax over each cell's classes when softmax=1."""
    total = layer.out_shape[0]
    flat = g.reshape(x, [total])
    if layer.softmax:
        cells = layer.side * layer.side
        scores = g.reshape(g.slice(flat, 1, 0, cells * layer.classes), [cells, layer.classes])
        scores = g.reshape(g.op("Softmax", [scores], axis=2), [cells * layer.classes])
        flat = g.op("Concat", [scores, g.slice(flat, 1, cells * layer.classes, total)], axis=1)
    return g.reshape(flat, [total, 1, 1])


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
    """Darknet's reorg_cpu order, as the engine's layers/reorg.py: the non-reverse layer reads its
    (c, h, w) input as (c/s^2, h, s, w, s) (the known quirk), the reverse layer the inverse."""
    if layer.extra:  # go.cfg's variant: flatten and append `extra` zeros
        flat = g.reshape(x, [-1, 1, 1])
        return g.op("Pad", [flat, g.ints([0, 0, 0, 0, 0, layer.extra, 0, 0]), g.scalar(0)],
                    mode="constant")
    c, s = layer.in_shape[0], layer.stride
    if c % (s * s):
        raise ExportError(f"{layer.where()} reorg by {s} of {c} channels: the engine's own "
                          f"order needs channels divisible by {s * s}; cannot export")
    return darknet_reorg(g, x, s, layer.reverse, layer.in_shape, layer.out_shape)


@layer_exporter("reorg3d", keys=("stride", "reverse"))
def _reorg3d(g, layer, x):
    """AlexeyAB's reorg: reorg_cpu on the output's dimensions (textbook space-to-depth)."""
    return darknet_reorg(g, x, layer.stride, layer.reverse, layer.out_shape, layer.out_shape)


def darknet_reorg(g, x, s, forward, dims, out_shape):
    """The engine's reorg(ops, x, s, forward, dims, out_shape) (reorg_cpu on dims (c, h, w))."""
    c, h, w = dims
    oc = c // (s * s)
    if forward:
        y = g.op("Transpose", [g.reshape(x, [s, s, oc, h, w])], perm=[0, 3, 4, 1, 5, 2])
    else:
        y = g.op("Transpose", [g.reshape(x, [oc, h, s, w, s])], perm=[0, 3, 5, 1, 2, 4])
    return g.reshape(y, out_shape)


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
def decode_grid(g, layer, x, anchors, anchor_pixels, net_w, net_h, new_coords=False,
                box_entries=(0, 1, 2, 3), objectness_entry=4, certainty_entries=None):
    """One head's output (N, anchors*entries, H, W) -> boxes (N, B, 4) centre x, y, width,
    height in input pixels, objectness (N, B), scores (N, B, classes); boxes in Darknet's order
    (anchor, row, column). Sizes exp(w) * anchor, or (2w)^2 * anchor with new_coords;
    `certainty_entries` (Gaussian YOLO): scores also times 1 - the mean of those entries."""
    _, h, w = layer.out_shape
    entries = layer.entries
    rows = g.reshape(g.op("Transpose", [g.reshape(x, [anchors, entries, h * w])],
                          perm=[0, 1, 3, 2]), [anchors * h * w, entries])

    def entry(index):
        return g.slice(rows, 2, index, index + 1)

    cell = np.arange(h * w)
    grid = np.tile(np.stack([cell % w, cell // w], axis=-1), (anchors, 1))[None]
    cell_size = np.float32([net_w / w, net_h / h]).reshape(1, 1, 2)
    ex, ey, ew, eh = box_entries

    def pair(first, second):
        if second == first + 1:
            return g.slice(rows, 2, first, first + 2)
        return g.op("Concat", [entry(first), entry(second)], axis=2)

    xy, wh = pair(ex, ey), pair(ew, eh)
    centres = g.op("Mul", [g.op("Add", [xy, g.const(grid.astype(np.float32), "grid")]),
                           g.const(cell_size, "cell")])
    if new_coords:  # AlexeyAB's get_yolo_box with new_coords: (2w)^2 = w * w * 4
        grow = g.op("Mul", [g.op("Mul", [wh, wh]), g.scalar(4)])
    else:
        grow = g.op("Exp", [wh])
    sizes = g.op("Mul", [grow, g.const(np.repeat(anchor_pixels, h * w, axis=0)[None], "anchors")])
    boxes = g.op("Concat", [centres, sizes], axis=2)
    objectness = entry(objectness_entry)
    weight = objectness
    if certainty_entries is not None:
        uncertainty = g.op("Concat", [entry(i) for i in certainty_entries], axis=2)
        mean = g.reduce("ReduceMean", uncertainty, [2])
        weight = g.op("Mul", [objectness, g.op("Sub", [g.scalar(1), mean])])
    scores = g.op("Mul", [weight, g.slice(rows, 2, objectness_entry + 1, entries)])
    return boxes, g.reshape(objectness, [-1]), scores


@_register(DECODERS, "yolo")
def _decode_yolo(g, layer, x, net_w, net_h):
    # anchors in input pixels
    return decode_grid(g, layer, x, len(layer.mask), layer.mask_anchors, net_w, net_h,
                       new_coords=layer.new_coords)


@_register(DECODERS, "gaussian_yolo")
def _decode_gaussian_yolo(g, layer, x, net_w, net_h):
    """get_gaussian_yolo_detections: boxes from entries 0, 2, 4, 6; objectness entry 8; class
    scores times objectness and 1 - the mean of the uncertainties 1, 3, 5, 7."""
    return decode_grid(g, layer, x, len(layer.mask), layer.mask_anchors, net_w, net_h,
                       box_entries=(0, 2, 4, 6), objectness_entry=8,
                       certainty_entries=(1, 3, 5, 7))


@_register(DECODERS, "region")
def _decode_region(g, layer, x, net_w, net_h):
    # anchors in grid cells
    _, h, w = layer.out_shape
    pixels = layer.anchors * np.float32([net_w / w, net_h / h])
    return decode_grid(g, layer, x, layer.num, pixels, net_w, net_h)


@_register(DECODERS, "detection")
def _decode_detection(g, layer, x, net_w, net_h):
    """YOLOv1's get_detection_detections: per cell, `num` boxes ((x + col)/side, (y + row)/side,
    w, h, squared with sqrt=1) in input pixels, confidence, confidence x the cell's classes."""
    side, classes, num = layer.side, layer.classes, layer.num
    cells = side * side
    scores = g.reshape(g.slice(g.reshape(x, [-1]), 1, 0, cells * classes), [cells, 1, classes])
    confidence = g.reshape(g.slice(g.reshape(x, [-1]), 1, cells * classes,
                                   cells * (classes + num)), [cells, num, 1])
    coords = g.reshape(g.slice(g.reshape(x, [-1]), 1, cells * (classes + num),
                               cells * (classes + num * 5)), [cells, num, 4])
    cell = np.arange(cells)
    grid = np.stack([cell % side, cell // side], axis=-1).reshape(1, cells, 1, 2)
    centres = g.op("Mul", [g.op("Add", [g.slice(coords, 3, 0, 2),
                                         g.const(grid.astype(np.float32), "grid")]),
                           g.const(np.float32([net_w / side, net_h / side]), "cell")])
    sizes = g.slice(coords, 3, 2, 4)
    if layer.sqrt:
        sizes = g.op("Mul", [sizes, sizes])
    sizes = g.op("Mul", [sizes, g.const(np.float32([net_w, net_h]), "input")])
    boxes = g.reshape(g.op("Concat", [centres, sizes], axis=3), [cells * num, 4])
    probs = g.reshape(g.op("Mul", [confidence, scores]), [cells * num, classes])
    return boxes, g.reshape(confidence, [-1]), probs


def head_boxes(layer):
    """How many boxes a head decodes."""
    if layer.type_name == "detection":
        return layer.side * layer.side * layer.num
    c, h, w = layer.out_shape
    return c // layer.entries * h * w


def valid_boxes(g, layer, objectness, thresh, nms):
    """Which boxes engine detect considers: objectness above the threshold (Darknet's
    get_yolo/region_detections); YOLOv1 keeps every box, but do_nms_sort then drops those of
    confidence 0 or less."""
    if layer.type_name != "detection":
        return _greater(g, objectness, thresh)
    return _greater(g, objectness, 0 if nms else -np.inf)


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


def diou(g, a, b, beta):
    """AlexeyAB's box_diou(a, b) as engine.detection.box_diou: IoU - (d/c)^beta, d the squared
    distance of the centres, c the squared diagonal of the enclosing box (IoU where c = 0);
    boxes (..., 4) centre x, y, width, height; returns (...)."""
    def part(box, index):
        return g.op("Squeeze", [g.slice(box, -1, index, index + 1), g.ints([-1], "axes")])

    ax, ay, aw, ah = (part(a, i) for i in range(4))
    bx, by, bw, bh = (part(b, i) for i in range(4))
    half = g.scalar(0.5)

    def edges(centre, size):
        offset = g.op("Mul", [size, half])
        return g.op("Sub", [centre, offset]), g.op("Add", [centre, offset])

    (al, ar), (at, ab) = edges(ax, aw), edges(ay, ah)
    (bl, br), (bt, bb) = edges(bx, bw), edges(by, bh)
    zero = g.scalar(0)
    width = g.op("Max", [g.op("Sub", [g.op("Min", [ar, br]), g.op("Max", [al, bl])]), zero])
    height = g.op("Max", [g.op("Sub", [g.op("Min", [ab, bb]), g.op("Max", [at, bt])]), zero])
    inter = g.op("Mul", [width, height])
    union = g.op("Sub", [g.op("Add", [g.op("Mul", [aw, ah]), g.op("Mul", [bw, bh])]), inter])
    iou = g.op("Div", [inter, union])

    def square(v):
        return g.op("Mul", [v, v])

    c = g.op("Add", [square(g.op("Sub", [g.op("Max", [ar, br]), g.op("Min", [al, bl])])),
                     square(g.op("Sub", [g.op("Max", [ab, bb]), g.op("Min", [at, bt])]))])
    d = g.op("Add", [square(g.op("Sub", [ax, bx])), square(g.op("Sub", [ay, by]))])
    positive = _greater(g, c, 0)
    ratio = g.op("Div", [d, g.op("Where", [positive, c, g.scalar(1)])])
    penalty = g.op("Where", [positive, g.op("Pow", [ratio, g.scalar(beta)]), zero])
    return g.op("Sub", [iou, penalty])


def append_diou_nms(g, boxes, scores, nms_thresh, score_threshold, beta, net_w, net_h):
    """AlexeyAB's diounms_sort as engine.detection.nms_sort computes it (greedynms: DIoU with
    exponent 0.6; diounms: with beta_nms), which ONNX's NonMaxSuppression (plain IoU) cannot
    express: per image and class, the scores above the threshold in decreasing order (ties:
    lower box first, as the engine's stable sort), each box still alive zeroing every later box
    whose DIoU with it is above nms_thresh. DIoU is measured on boxes relative to the input, as
    the engine's stretched detection has them. A Loop over as many ranks as the most populated
    (image, class) has candidates. Returns the same three outputs as append_nms, the rows in
    (image, class, box) order."""
    float32 = g.onnx.TensorProto.FLOAT
    if g.float_type != np.float32:
        boxes = g.op("Cast", [boxes], to=float32)
        scores = g.op("Cast", [scores], to=float32)
    f32 = (lambda v: g.const(np.float32(v), "scalar", np.float32))
    by_class = g.op("Transpose", [scores], perm=[0, 2, 1])  # (N, K, B)
    alive = g.op("Where", [g.op("Greater", [by_class, f32(score_threshold)]), by_class, f32(0)])
    count = g.op("Shape", [alive])
    total = g.slice(count, 0, 2, 3)
    _, order = g.op("TopK", [alive, total], outputs=2, axis=2, largest=1, sorted=1)
    # rank[n, k, box] = the box's position in its class's order
    # (constants are stored 1-d: Range's scalar inputs go through Squeeze)
    positions = g.op("Expand", [g.op("Range", [g.op("Squeeze", [g.ints([0], "start")]),
                                               g.op("Squeeze", [total]),
                                               g.op("Squeeze", [g.ints([1], "delta")])]), count])
    rank = g.op("ScatterElements", [g.op("Expand", [g.ints(0, "zero"), count]), order,
                                    positions], axis=2)
    candidates = g.op("Cast", [g.op("Greater", [alive, f32(0)])], to=g.onnx.TensorProto.INT64)
    trips = g.reduce("ReduceMax", g.reduce("ReduceSum", candidates, [2], keepdims=0), [0, 1],
                     keepdims=0)
    # boxes per (image, class): (N, K, B, 4)
    relative = g.op("Div", [boxes, g.const(np.float32([net_w, net_h, net_w, net_h]), "input",
                                           np.float32)])
    class_boxes = g.op("Expand", [g.op("Unsqueeze", [relative, g.ints([1], "axes")]),
                                  g.op("Concat", [count, g.ints([4])], axis=0)])

    # the loop body: iteration p suppresses with the box of rank p in each (image, class)
    outer_nodes = g.nodes
    g.nodes = []
    step, condition, state = g.fresh("p"), g.fresh("cond"), g.fresh("alive")
    index = g.op("Unsqueeze", [g.op("Unsqueeze", [step, g.ints([0], "axes")]), g.ints([0], "axes")])
    pick = g.op("Expand", [g.op("Unsqueeze", [index, g.ints([0], "axes")]),
                           g.op("Concat", [g.slice(count, 0, 0, 2), g.ints([1])], axis=0)])
    chosen = g.op("GatherElements", [order, pick], axis=2)  # (N, K, 1)
    chosen_score = g.op("GatherElements", [state, chosen], axis=2)
    chosen_box = g.op("GatherElements", [class_boxes, g.op("Expand", [
        g.op("Unsqueeze", [chosen, g.ints([3], "axes")]),
        g.op("Concat", [g.slice(count, 0, 0, 2), g.ints([1, 4])], axis=0)])], axis=2)
    overlap = diou(g, chosen_box, class_boxes, beta)  # (N, K, B)
    suppress = g.op("And", [g.op("And", [g.op("Greater", [overlap, f32(nms_thresh)]),
                                         g.op("Greater", [rank, step])]),
                            g.op("Greater", [chosen_score, f32(0)])])
    new_state = g.op("Where", [suppress, f32(0), state])
    keep_going = g.op("Identity", [condition])
    body_nodes, g.nodes = g.nodes, outer_nodes
    helper = g.helper
    body = helper.make_graph(
        body_nodes, "diou_nms_step",
        [helper.make_tensor_value_info(step, g.onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info(condition, g.onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info(state, float32, None)],
        [helper.make_tensor_value_info(keep_going, g.onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info(new_state, float32, None)])
    kept = g.op("Loop", [trips, "", alive], hint="diou_nms", body=body)
    selected = g.op("Transpose", [g.op("NonZero", [kept])], perm=[1, 0])  # rows n, k, box
    image_box = g.op("Gather", [selected, g.ints([0, 2])], axis=1)
    detection_boxes = g.op("GatherND", [boxes, image_box])
    detection_scores = g.op("GatherND", [kept, selected])
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
        raise ExportError(f"{net.cfg_path}: --decode/--nms need [yolo], [region], "
                          "[Gaussian_yolo] or [detection] layers; this network has none")
    if decode and len({net.layers[i].classes for i in heads}) > 1:
        raise ExportError(f"{net.cfg_path}: the detection layers disagree on classes; cannot "
                          "decode them into one scores tensor")
    nms_kind, beta_nms = detection.nms_choice(net)
    diou_beta = {"greedynms": 0.6, "diounms": beta_nms}.get(nms_kind)
    if nms and diou_beta is not None and detection.uses_letterbox(net):
        last = net.layers[-1]
        raise ExportError(f"{last.section.where('nms_kind')} nms_kind={nms_kind}: with "
                          "letterboxed detection its DIoU depends on the image's aspect ratio; "
                          "cannot export --nms (export --decode and run the NMS outside)")
    output_layers = heads or [net.output_layer.index]

    g = Graph(onnx, net.ops, np.float16 if fp16 else np.float32, opset)
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
        total = sum(head_boxes(net.layers[i]) for i in heads)
        classes = net.layers[heads[0]].classes
        if nms is None:
            outputs += [(boxes, "boxes", elem, [n, total, 4]),
                        (objectness, "objectness", elem, [n, total]),
                        (scores, "scores", elem, [n, total, classes])]
        else:
            g.prefix = "nms/"
            # the boxes engine detect considers (objectness above the threshold)
            masks = [valid_boxes(g, net.layers[i], part[1], thresh, nms)
                     for i, part in zip(heads, parts)]
            valid = masks[0] if len(masks) == 1 else g.op("Concat", masks, axis=1)
            scores = g.op("Where", [g.op("Unsqueeze", [valid, g.ints([2], "axes")]), scores,
                                    g.scalar(0)])
            if nms and diou_beta is not None:
                selected, found_boxes, found_scores = append_diou_nms(
                    g, boxes, scores, nms, thresh, diou_beta, net.options.width,
                    net.options.height)
            else:
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
