"""[shortcut]: a residual connection, y = act(alpha*prev + beta*from) (alpha, beta default 1).

`from` is an absolute layer index or a negative one relative to this layer. The output has the
previous layer's shape. Like Darknet, the maps may differ: the overlapping channels are added,
and the larger map is subsampled by the integer ratio of the sizes (shortcut_cpu); positions
outside the overlap keep the previous layer's value. Darknet asserts when the width and height
ratios disagree; we refuse that case with an error naming the cfg line.

AlexeyAB's form (shortcut_multilayer_cpu), used when `from` lists several layers or
`weights_type` is per_feature or per_channel: y = act(w_0*prev + sum_i w_i*from_i), where a
source with fewer channels adds to the first ones only and every map must have the previous
layer's width and height. The weights (one per input, or one per input and channel, in the
.weights file after the layers before) start at 1; weights_normalization=relu uses
relu(w_i) / (1e-4 + sum_j relu(w_j)) and softmax exp(w_i - max) / (1e-4 + sum_j exp(w_j - max))
across the inputs (per channel), which are the normalize_channels activations. AlexeyAB ignores
alpha and beta there; so do we.
"""

import numpy as np

from .. import activations
from ..backends.views import window
from .base import Layer, activate, activation_backward
from .channels import add_channel_slice_, channel_slice, concat_channels

WEIGHTS_TYPES = ("none", "per_feature", "per_layer", "per_channel")  # per_layer = per_feature
NORMALIZATIONS = {"none": None, "relu": "normalize_channels", "avg_relu": "normalize_channels",
                  "softmax": "normalize_channels_softmax_maxval"}


class ShortcutLayer(Layer):
    type_name = "shortcut"
    multi_input = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        if not section.has("from"):
            raise section.error("needs from=... (the layer to add)")
        self.sources = []
        for ref in section.int_list("from"):
            source = index + ref if ref < 0 else ref
            if not 0 <= source < index:
                raise section.error(f"from={ref} refers to layer {source}, but only layers "
                                    f"0..{index - 1} come before this one", "from")
            self.sources.append(source)
        if not self.sources:
            raise section.error("needs from=... (the layer to add)", "from")
        self.source = self.sources[0]
        self.input_indices = [index - 1] + self.sources
        self.from_shapes = [net.layer_shapes[j] for j in self.sources]
        self.from_shape = self.from_shapes[0]
        self.activation = activations.check_name(section.str("activation", "linear"),
                                                 section.where("activation"))
        self.weights_type = section.str("weights_type", "none")
        if self.weights_type not in WEIGHTS_TYPES:
            raise section.error(f"weights_type={self.weights_type}: expected one of "
                                f"{', '.join(WEIGHTS_TYPES)}", "weights_type")
        normalization = section.str("weights_normalization", "none")
        if normalization not in NORMALIZATIONS:
            raise section.error(f"weights_normalization={normalization}: expected one of "
                                f"{', '.join(NORMALIZATIONS)}", "weights_normalization")
        self.normalization = NORMALIZATIONS[normalization] if self.weights_type != "none" else None
        self.out_shape = self.in_shape
        self.multilayer = len(self.sources) > 1 or self.weights_type != "none"
        if self.multilayer:
            self._build_multilayer(section, index)
        else:
            self.alpha = section.float("alpha", 1.0)
            self.beta = section.float("beta", 1.0)
            (c2, h2, w2), (c1, h1, w1) = self.in_shape, self.from_shape
            # shortcut_cpu's asserts: one integer scale for both axes, or the sampling is undefined.
            if w1 // w2 != h1 // h2 or w2 // w1 != h2 // h1:
                raise section.error(f"cannot add layer {self.source} ({w1}x{h1}x{c1}) to layer "
                                    f"{index - 1} ({w2}x{h2}x{c2}): widths and heights must "
                                    "scale alike", "from")

    def _build_multilayer(self, section, index):
        c, h, w = self.in_shape
        for source, (c1, h1, w1) in zip(self.sources, self.from_shapes):
            if (h1, w1) != (h, w):
                raise section.error(f"cannot add layer {source} ({w1}x{h1}x{c1}) to layer "
                                    f"{index - 1} ({w}x{h}x{c}): AlexeyAB's multi-layer shortcut "
                                    "needs equal widths and heights", "from")
        inputs = len(self.sources) + 1
        if self.weights_type != "none":
            per = c if self.weights_type == "per_channel" else 1
            self.add_param("weights", np.ones((inputs, per)))
            self.weight_order = ("weights",)

    def describe(self):
        c1, h1, w1 = self.from_shape
        c, h, w = self.out_shape
        if self.multilayer:  # AlexeyAB's row (make_shortcut_layer)
            weights_type = {"none": 0, "per_feature": 1, "per_layer": 1, "per_channel": 2}[self.weights_type]
            normalization = {None: 0, "normalize_channels": 1,
                             "normalize_channels_softmax_maxval": 2}[self.normalization]
            sources = "".join(f"{j}, " for j in self.sources)
            return (f"Shortcut Layer: {sources} wt = {weights_type}, wn = {normalization}, "
                    f"outputs:{w:4d} x{h:4d} x{c:4d} {self.flops() / 1e9:5.3f} BF")
        return (f"res  {self.source:3d}                {w1:4d} x{h1:4d} x{c1:4d}   ->  "
                f"{w:4d} x{h:4d} x{c:4d}")

    def flops(self):
        c, h, w = self.out_shape  # AlexeyAB's l.bflops (its total counts shortcuts)
        return c * h * w * len(self.sources) * (2 if self.weight_order else 1)

    # ---- AlexeyAB's weighted sum ---------------------------------------------------------------
    def _input_weights(self, ops):
        """[(1, C or 1, 1, 1) weight of each input], normalized across the inputs if asked."""
        weights = self.params["weights"]
        inputs, per = weights.shape
        view = ops.reshape(weights, (1, inputs, per, 1))
        if self.normalization:
            view = ops.normalize_channels(view, self.normalization)
        return [ops.reshape(channel_slice(ops, view, i, i + 1), (1, per, 1, 1))
                for i in range(inputs)]

    @staticmethod
    def _weighted(ops, x, weight):
        """x * weight, the weight cut to x's channels when it has one per channel."""
        if weight is None:
            return x
        if weight.shape[1] not in (1, x.shape[1]):
            weight = channel_slice(ops, weight, 0, x.shape[1])
        return ops.multiply(x, weight)

    def _forward_multilayer(self, ops, xs):
        weights = self._input_weights(ops) if self.weight_order else [None] * len(xs)
        y = ops.copy(self._weighted(ops, xs[0], weights[0]))
        channels = self.out_shape[0]
        for x, weight in zip(xs[1:], weights[1:]):
            if x.shape[1] > channels:  # a wider source adds its first channels only
                x = channel_slice(ops, x, 0, channels)
            term = self._weighted(ops, x, weight)
            if term.shape[1] == channels:
                ops.add_(y, term)
            else:
                add_channel_slice_(ops, y, 0, term)
        self.weights_used = weights
        return y

    def _backward_multilayer(self, ops, delta):
        channels = self.out_shape[0]
        deltas, weight_grads = [], []
        for x, weight in zip(self.inputs, self.weights_used):
            c = x.shape[1]
            shared = min(c, channels)
            part = delta if shared == channels else channel_slice(ops, delta, 0, shared)
            if weight is not None:
                used = x if c == shared else channel_slice(ops, x, 0, shared)
                grad = ops.sum_to(ops.multiply(part, used), (1, shared, 1, 1))
                if weight.shape[1] == 1:
                    grad = ops.sum_to(grad, (1, 1, 1, 1))
                elif shared < channels:  # the weights of channels this source does not reach
                    grad = concat_channels(ops, [grad, ops.zeros((1, channels - shared, 1, 1))])
                weight_grads.append(grad)
            d = self._weighted(ops, part, weight)
            if c > channels:  # the source's extra channels get no delta
                rest = (x.shape[0], c - channels) + tuple(x.shape[2:])
                d = concat_channels(ops, [d, ops.zeros(rest)])
            deltas.append(d)
        if weight_grads:
            inputs, per = self.params["weights"].shape
            grads = concat_channels(ops, [ops.reshape(g, (1, 1, per, 1)) for g in weight_grads])
            if self.normalization:
                raw = ops.reshape(self.params["weights"], (1, inputs, per, 1))
                grads = ops.normalize_channels_backward_(raw, grads, self.normalization)
            ops.add_(self.updates["weights"], ops.reshape(grads, (inputs, per)))
        return deltas

    # ---- Darknet's sum (shortcut_cpu) ----------------------------------------------------------
    def _windows(self, batch):
        """The Views of the overlap in the output (the previous layer's shape) and in the added
        map: channels 0..min(C)-1; spatially, with stride = max(W_add//W, 1) and
        sample = max(W//W_add, 1), output cell (j*sample, i*sample) pairs with added cell
        (j*stride, i*stride) for j < min(H), i < min(W)."""
        (c2, h2, w2), (c1, h1, w1) = self.in_shape, self.from_shape
        stride, sample = max(w1 // w2, 1), max(w2 // w1, 1)
        c, h, w = min(c1, c2), min(h1, h2), min(w1, w2)
        out = window((batch, c2, h2, w2), None, (0, c, 1), (0, h, sample), (0, w, sample))
        add = window((batch, c1, h1, w1), None, (0, c, 1), (0, h, stride), (0, w, stride))
        return out, add

    def _forward_sum(self, ops, x, add):
        """alpha*x + beta*add on the overlap, x elsewhere: a new array."""
        if tuple(x.shape[1:]) == tuple(self.from_shape):  # the usual case (ResNet, YOLO): one pass
            return ops.add(x, add, self.alpha, self.beta)
        out, added = self._windows(int(x.shape[0]))
        y = ops.copy(x)
        if self.alpha != 1:
            ops.strided_copy_(y, out, x, out, scale=self.alpha)
        return ops.strided_copy_(y, out, add, added, scale=self.beta, accumulate=True)

    def _backward_sum(self, ops, delta):
        """[delta for the previous layer, delta for the added one] (zero outside the overlap);
        delta is the layer's own, so it becomes the first."""
        dx = delta
        if tuple(delta.shape[1:]) == tuple(self.from_shape):
            d_add = ops.copy(delta)
            if self.alpha != 1:
                ops.scale_(dx, self.alpha)
            if self.beta != 1:
                ops.scale_(d_add, self.beta)
            return [dx, d_add]
        out, added = self._windows(int(delta.shape[0]))
        if self.alpha != 1:
            ops.strided_copy_(dx, out, delta, out, scale=self.alpha)
        d_add = ops.zeros((delta.shape[0],) + tuple(self.from_shape), like=delta)
        return [dx, ops.strided_copy_(d_add, added, delta, out, scale=self.beta)]

    # ---- the layer -----------------------------------------------------------------------------
    def forward(self, ops, xs, train):
        if self.multilayer:
            self.inputs = xs
            y = self._forward_multilayer(ops, xs)
        else:
            y = self._forward_sum(ops, *xs)
        self.output = activate(ops, y, self.activation, train, self)
        return self.output

    def backward(self, ops, delta, need_dx):
        # delta is this layer's own (Network.backward): changed in place, handed on as dx
        delta = activation_backward(ops, self, delta, self.activation)
        if self.multilayer:
            return self._backward_multilayer(ops, delta)
        return self._backward_sum(ops, delta)
