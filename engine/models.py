"""Whole-model tools, Darknet's commands of the same names: `info` (the layer table Darknet's
loader prints, with shapes and BFLOPs), `partial` (save the first N layers' weights, as the
pretrained backbones such as darknet53.conv.74 are made) and `fuse` (fold each batch norm into
its convolution or connected layer, for inference).
"""

import numpy as np

from .backends.numpy_backend import BN_INFERENCE_EPSILON
from .network import Network
from .weights import write_atomically

TABLE_HEADER = "layer     filters    size              input                output"


# ---- info ----------------------------------------------------------------------------------------
def _whc(shape):
    c, h, w = shape
    return w, h, c


def _maps(layer):
    return "%4d x%4d x%4d   ->  %4d x%4d x%4d" % (_whc(layer.in_shape) + _whc(layer.out_shape))


def table_row(layer):
    """The line Darknet prints for `layer` while parsing the cfg (pjreddie's make_*_layer)."""
    kind = layer.type_name
    if kind == "convolutional":
        return "conv  %5d %2d x%2d /%2d  %s  %5.3f BFLOPs" % (
            layer.filters, layer.size, layer.size, layer.stride, _maps(layer), layer.flops() / 1e9)
    if kind == "maxpool":
        return "max          %d x %d / %d  %s" % (layer.size, layer.size, layer.stride, _maps(layer))
    if kind == "avgpool":
        return "avg                     %4d x%4d x%4d   ->  %4d" % (_whc(layer.in_shape) +
                                                                    (layer.in_shape[0],))
    if kind == "softmax":
        return "softmax                                        %4d" % layer.outputs
    if kind == "dropout":
        return "dropout       p = %.2f               %4d  ->  %4d" % (
            layer.probability, layer.outputs, layer.outputs)
    if kind == "connected":
        return "connected                            %4d  ->  %4d" % (
            int(np.prod(layer.in_shape)), layer.outputs)
    if kind == "route":
        return "route " + "".join(" %d" % j for j in layer.input_indices)
    if kind == "upsample":
        name = "downsample" if layer.reverse else "upsample"
        return "%-19s%2dx  %s" % (name, layer.stride, _maps(layer))
    if kind == "cost":
        return "cost                                           %4d" % layer.outputs
    if kind == "batchnorm":
        return "Batch Normalization Layer: %d x %d x %d image" % _whc(layer.in_shape)
    return layer.describe()  # shortcut ("res"), yolo, region ("detection"), reorg: Darknet's own


def layer_table(net):
    """Darknet's layer table for `net`, one line per layer, then the total BFLOPs."""
    lines = [TABLE_HEADER]
    lines += ["%5d %s" % (layer.index, table_row(layer)) for layer in net.layers]
    total = sum(layer.flops() for layer in net.layers) / 1e9
    lines.append(f"Total BFLOPs {total:.3f}")
    return "\n".join(lines)


def parameter_count(net):
    """Number of float32 values the network's .weights file holds (after the header)."""
    return sum(int(np.prod(layer.params[name].shape)) for layer in net.layers
               for name in layer.weight_order)


def weights_file_bytes(net):
    """Size of the .weights file we (and Darknet) write for `net`: the 0.2 header (3 int32 and
    a uint64 `seen`) and 4 bytes per parameter."""
    return 20 + 4 * parameter_count(net)


# ---- partial -------------------------------------------------------------------------------------
def partial(net, out_path, count):
    """Darknet's `partial`: write the weights of layers 0..count-1 (as 0.2.0, seen = 0)."""
    net.seen = 0
    net.save_weights(out_path, cutoff=count)


# ---- fuse ----------------------------------------------------------------------------------------
def _fusable(layer):
    return layer.type_name in ("convolutional", "connected") and layer.batch_normalize


def folded_parameters(layer, ops):
    """(weights, biases) with the layer's inference batch norm folded in:
    factor = scales / (sqrt(rolling_variance) + 1e-6) (Darknet's inference rule),
    W' = W * factor per output, b' = biases - rolling_mean * factor."""
    p = {name: ops.to_host(value).astype(np.float64) for name, value in layer.params.items()}
    factor = p["scales"] / (np.sqrt(p["rolling_variance"]) + BN_INFERENCE_EPSILON)
    weights = p["weights"] * factor.reshape((-1,) + (1,) * (p["weights"].ndim - 1))
    biases = p["biases"] - p["rolling_mean"] * factor
    return weights.astype(np.float32), biases.astype(np.float32)


def fused_cfg_text(net):
    """The cfg text of `net` with `batch_normalize` removed from every fusable layer."""
    with open(net.cfg_path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines(keepends=True)
    dropped = {layer.section.options["batch_normalize"].line
               for layer in net.layers if _fusable(layer)}
    return "".join(line for number, line in enumerate(lines, start=1) if number not in dropped)


def fuse(net, cfg_out, weights_out):
    """Write `cfg_out` and `weights_out`: `net` with each convolutional/connected batch norm
    folded into the layer's weights and biases. Returns the fused Network (on net's backend).
    Standalone [batchnorm] layers stay as they are."""
    write_atomically(cfg_out, fused_cfg_text(net).encode("utf-8"))
    fused = Network(cfg_out, backend=net.ops, quiet=True)
    for layer, target in zip(net.layers, fused.layers):
        if _fusable(layer):
            weights, biases = folded_parameters(layer, net.ops)
            target.params["weights"] = net.ops.asarray(weights)
            target.params["biases"] = net.ops.asarray(biases)
        else:
            for name in layer.weight_order:
                target.params[name] = net.ops.copy(layer.params[name])
    fused.seen = net.seen
    fused.save_weights(weights_out)
    return fused
