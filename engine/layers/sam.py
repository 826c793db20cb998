"""[sam] and [scale_channels]: AlexeyAB's attention products (sam_layer.c,
scale_channels_layer.c), y = act(input * output of layer `from`).

[sam] (spatial attention, YOLOv4's modified SAM): the two maps have the same shape and are
multiplied elementwise. [scale_channels] (squeeze-and-excitation): the input is C x 1 x 1 and
scales each channel of `from`'s C x H x W map; with scale_wh=1 the input is 1 x H x W and scales
each position of every channel. The output has `from`'s shape. Backward is the exact gradient
to both inputs.
"""

from .. import activations
from .base import Layer, activate, activation_backward


def source_layer(section, index, net, key="from"):
    """The absolute index of the layer `key` names (negative: relative), checked to exist."""
    if not section.has(key):
        raise section.error(f"needs {key}=... (a layer index)")
    ref = section.int(key)
    source = index + ref if ref < 0 else ref
    if not 0 <= source < index:
        raise section.error(f"{key}={ref} refers to layer {source}, but only layers "
                            f"0..{index - 1} come before this one", key)
    return source


class SamLayer(Layer):
    type_name = "sam"
    multi_input = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.source = source_layer(section, index, net)
        self.input_indices = [index - 1, self.source]
        self.from_shape = net.layer_shapes[self.source]
        self.activation = activations.check_name(section.str("activation", "linear"),
                                                 section.where("activation"))
        self.check_shapes(section)
        self.out_shape = self.from_shape

    def check_shapes(self, section):
        if self.in_shape != self.from_shape:
            raise section.error(f"the input {self._text(self.in_shape)} and layer {self.source}'s "
                                f"output {self._text(self.from_shape)} must have one shape", "from")

    @staticmethod
    def _text(shape):
        c, h, w = shape
        return f"{w}x{h}x{c}"

    def describe(self):
        return f"scale Layer: {self.source}"  # AlexeyAB's row for both layers

    def forward(self, ops, xs, train):
        scale, source = xs
        self.inputs = xs
        y = ops.multiply(source, scale)
        self.output = activate(ops, y, self.activation, train, self)
        return self.output

    def backward(self, ops, delta, need_dx):
        delta = activation_backward(ops, self, delta, self.activation)  # its own (Network)
        scale, source = self.inputs
        d_scale = ops.sum_to(ops.multiply(delta, source), scale.shape) if need_dx else None
        return [d_scale, ops.multiply(delta, scale)]


class ScaleChannelsLayer(SamLayer):
    type_name = "scale_channels"

    def __init__(self, section, index, in_shapes, net):
        self.scale_wh = section.bool("scale_wh", False)
        super().__init__(section, index, in_shapes, net)

    def check_shapes(self, section):
        (c, h, w), (fc, fh, fw) = self.in_shape, self.from_shape
        if self.scale_wh and (c != 1 or (h, w) != (fh, fw)):
            raise section.error(f"scale_wh=1 needs a 1 x {fh} x {fw} input (one scale per "
                                f"position of layer {self.source}); got {self._text(self.in_shape)}",
                                "scale_wh")
        if not self.scale_wh and ((h, w) != (1, 1) or c != fc):
            raise section.error(f"needs a {fc} x 1 x 1 input (one scale per channel of layer "
                                f"{self.source}); got {self._text(self.in_shape)}", "from")
