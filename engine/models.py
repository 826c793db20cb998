"""Whole-model tools, Darknet's commands of the same names: `info` (the layer table Darknet's
loader prints, with shapes and BFLOPs), `partial` (save the first N layers' weights, as the
pretrained backbones such as darknet53.conv.74 are made) and `fuse` (fold each batch norm into
its convolution or connected layer, for inference); and `export_onnx` (engine/onnx_export.py).
"""

import numpy as np

from .network import Network
from .onnx_export import export_onnx  # noqa: F401 (part of this module's API)
from .weights import write_atomically

TABLE_HEADER = "layer     filters    size              input                output"


# ---- info ----------------------------------------------------------------------------------------
def layer_table(net):
    """Darknet's layer table for `net`, one line per layer, then the total BFLOPs."""
    lines = [TABLE_HEADER]
    lines += ["%5d %s" % (layer.index, layer.describe()) for layer in net.layers]
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


def fused_cfg_text(net):
    """The cfg text of `net` with `batch_normalize` removed from every fusable layer."""
    with open(net.cfg_path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines(keepends=True)
    dropped = {layer.section.line_of("batch_normalize") for layer in net.layers if _fusable(layer)}
    return "".join(line for number, line in enumerate(lines, start=1) if number not in dropped)


def fuse(net, cfg_out, weights_out):
    """Write `cfg_out` and `weights_out`: `net` with each convolutional/connected batch norm
    folded into the layer's weights and biases. Returns the fused Network (on net's backend).
    Standalone [batchnorm] layers stay as they are."""
    write_atomically(cfg_out, fused_cfg_text(net).encode("utf-8"))
    fused = Network(cfg_out, backend=net.ops, quiet=True, darknet=net.darknet)
    for layer, target in zip(net.layers, fused.layers):
        if _fusable(layer):
            weights, biases = layer.folded_parameters(net.ops)
            target.params["weights"] = net.ops.asarray(weights)
            target.params["biases"] = net.ops.asarray(biases)
        else:
            for name in layer.weight_order:
                target.params[name] = net.ops.copy(layer.params[name])
    fused.seen = net.seen
    fused.save_weights(weights_out)
    return fused
