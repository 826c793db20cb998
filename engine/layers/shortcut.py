"""[shortcut]: a residual connection, y = act(alpha*prev + beta*from) (alpha, beta default 1).

`from` is an absolute layer index or a negative one relative to this layer. The output has the
previous layer's shape. Like Darknet, the maps may differ: the overlapping channels are added,
and the larger map is subsampled by the integer ratio of the sizes (shortcut_cpu); positions
outside the overlap keep the previous layer's value. Darknet asserts when the width and height
ratios disagree; we refuse that case with an error naming the cfg line.
"""

from .. import activations
from .base import Layer, activate, activation_backward


class ShortcutLayer(Layer):
    type_name = "shortcut"
    multi_input = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        if not section.has("from"):
            raise section.error("needs from=... (the layer to add)")
        ref = section.int("from")
        source = index + ref if ref < 0 else ref
        if not 0 <= source < index:
            raise section.error(f"from={ref} refers to layer {source}, but only layers "
                                f"0..{index - 1} come before this one", "from")
        self.source = source
        self.input_indices = [index - 1, source]
        self.from_shape = net.layer_shapes[source]
        self.alpha = section.float("alpha", 1.0)
        self.beta = section.float("beta", 1.0)
        self.activation = activations.check_name(section.str("activation", "linear"),
                                                 section.where("activation"))
        (c2, h2, w2), (c1, h1, w1) = self.in_shape, self.from_shape
        # shortcut_cpu's asserts: one integer scale for both axes, or the sampling is undefined.
        if w1 // w2 != h1 // h2 or w2 // w1 != h2 // h1:
            raise section.error(f"cannot add layer {source} ({w1}x{h1}x{c1}) to layer {index - 1} "
                                f"({w2}x{h2}x{c2}): widths and heights must scale alike", "from")
        self.out_shape = self.in_shape

    def describe(self):
        c1, h1, w1 = self.from_shape
        c, h, w = self.out_shape
        return (f"res  {self.source:3d}                {w1:4d} x{h1:4d} x{c1:4d}   ->  "
                f"{w:4d} x{h:4d} x{c:4d}")

    def forward(self, ops, xs, train):
        previous, source = xs
        y = ops.shortcut_forward(previous, source, self.alpha, self.beta)
        self.output = activate(ops, y, self.activation, train, self)
        return self.output

    def backward(self, ops, delta, need_dx):
        delta = activation_backward(ops, self, ops.copy(delta), self.activation)
        return list(ops.shortcut_backward(delta, self.from_shape, self.alpha, self.beta))
