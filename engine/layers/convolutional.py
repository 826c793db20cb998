"""[convolutional]: conv -> (batch norm, SPATIAL) -> bias -> activation, as Darknet/YOLO do.

With batch_normalize=1 there is no bias before BN: `biases` are BN's beta and `scales` its gamma.
In training the batch statistics normalise (cuDNN's rule) and the rolling statistics move 1%
toward them; at inference the rolling statistics normalise (Darknet's rule). The backward pass
only accumulates gradients into the update buffers; `update` (in Layer) applies them.
"""

import numpy as np

from .. import activations
from .antialiasing import Blur
from .base import LinearUnit, fusable, input_shape_error, window_limit


# AlexeyAB's [convolutional] keys that change the computation and are not implemented, with
# their defaults (parse_convolutional): refused at their line when set.
UNSUPPORTED_KEYS = {"xnor": 0, "binary": 0,
                    "sway": 0, "rotate": 0, "stretch": 0, "stretch_sway": 0, "cbn": 0,
                    "assisted_excitation": 0, "coordconv": 0, "deform": 0, "flipped": 0,
                    "dot": 0, "grad_centr": 0, "reverse": 0}
# Read and without effect on what is computed (logging, CUDA streams, the xnor output option).
NEUTRAL_KEYS = ("bin_output", "stream", "wait_stream", "angle")


def refuse_alexeyab_conv_keys(section):
    for key, default in UNSUPPORTED_KEYS.items():
        if not section.has(key):
            continue
        value = section.str(key)
        try:
            same = default is not None and float(value) == default
        except ValueError:
            same = False
        if not same:
            raise section.error(f"{key}={value} is not supported", key)
    for key in NEUTRAL_KEYS:
        section.str(key)


class ConvolutionalLayer(LinearUnit):
    type_name = "convolutional"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.filters = section.positive_int("filters", 1)
        # A kernel wider than twice the input sees all of it from every position: larger ones
        # only multiply padding (and the time im2col takes).
        self.size = section.positive_int("size", 1, high=window_limit(h, w))
        self.stride = section.positive_int("stride", 1)
        pad = section.int("pad", 0)
        self.padding = self.size // 2 if pad else section.int("padding", 0, low=0)
        self.groups = section.positive_int("groups", 1)
        refuse_alexeyab_conv_keys(section)
        # AlexeyAB's stride_x / stride_y (each defaults to `stride`)
        self.stride_y = section.positive_int("stride_y", self.stride)
        self.stride_x = section.positive_int("stride_x", self.stride)
        # AlexeyAB's dilation (1 for 1x1 filters): the filter's taps `dilation` apart, with the
        # padding multiplied by it, as its cuDNN and im2col calls do.
        # The dilated filter spans (size-1)*dilation+1 cells: held to the same limit as a size.
        self.dilation = section.positive_int(
            "dilation", 1, high=max((window_limit(h, w) - 1) // max(self.size - 1, 1), 1))
        if self.size == 1:
            self.dilation = 1
        self.antialiasing = section.int("antialiasing", 0)
        self.blur_stride = self.stride
        if self.antialiasing:
            if self.stride_x != self.stride_y:
                raise section.error("antialiasing with different stride_x and stride_y is not "
                                    "supported", "antialiasing")
            self.blur_stride = self.stride_x
            self.stride = self.stride_x = self.stride_y = 1  # the blur strides instead
        self.batch_normalize = section.bool("batch_normalize", False)
        self.activation = activations.check_name(section.str("activation", "logistic"),
                                                 section.where("activation"))
        if c % self.groups or self.filters % self.groups:
            raise section.error(f"groups={self.groups} must divide both the {c} input channels "
                                f"and filters={self.filters}", "groups")
        out_h = (h + 2 * self.padding - self.size) // self.stride_y + 1
        out_w = (w + 2 * self.padding - self.size) // self.stride_x + 1
        # what the backends take: one stride, or (vertical, horizontal)
        self.conv_stride = self.stride_y if self.stride_x == self.stride_y else \
            (self.stride_y, self.stride_x)
        if self.dilation > 1 and 2 * self.padding != self.size - 1:
            # AlexeyAB sizes the output as if undilated; that matches the dilated convolution
            # only when the padding is (size-1)/2
            raise section.error(f"dilation={self.dilation} needs pad=1 (padding (size-1)/2) with "
                                f"an odd size; got size={self.size} padding={self.padding}",
                                "dilation")
        if out_h < 1 or out_w < 1:
            raise input_shape_error(section, self.in_shape,
                                    f"size={self.size} with padding={self.padding}")
        self.out_shape = (self.filters, out_h, out_w)
        self.blur = None
        if self.antialiasing:
            self.blur = Blur(section, self.antialiasing, self.filters, self.blur_stride, out_h, out_w)
            self.out_shape = (self.filters,) + self.blur.out_hw

        fan_in = c // self.groups * self.size * self.size
        weight_shape = (self.filters, c // self.groups, self.size, self.size)
        net.reserve_parameters(self, self.filters * (fan_in + 4))
        # Both forks scale by sqrt(2 / fan_in); pjreddie's draws from a normal distribution,
        # AlexeyAB's from uniform(-1, 1), whose deviation is sqrt(3) times smaller. With batch
        # norm after the convolution that ratio is a 3x step in the effective learning rate.
        draws = net.rng.uniform(-1, 1, weight_shape) if net.darknet == "alexeyab" else \
            net.rng.standard_normal(weight_shape)
        self.add_output_params(self.filters, np.sqrt(2.0 / fan_in) * draws, bn_after_weights=False)
        self.share_owner = None
        if section.has("share_index"):
            self._share(section, index, net)

    def _share(self, section, index, net):
        """AlexeyAB's share_index: this layer uses (and trains) the parameters of an earlier
        [convolutional] of the same shape; they are in the .weights file once, with it."""
        ref = section.int("share_index")
        owner = ref if ref >= 0 else index + ref
        if not 0 <= owner < index:
            raise section.error(f"share_index={ref} refers to layer {owner}, but only layers "
                                f"0..{index - 1} come before this one", "share_index")
        other = net.layers[owner] if hasattr(net, "layers") and owner < len(net.layers) else None
        if not isinstance(other, ConvolutionalLayer) or \
                other.params["weights"].shape != self.params["weights"].shape or \
                other.batch_normalize != self.batch_normalize:
            raise section.error(f"share_index={ref}: layer {owner} is not a [convolutional] with "
                                "the same filters, size, input channels and batch_normalize",
                                "share_index")
        self.share_owner = owner
        self.weight_order = ()

    def share_parameters(self, owner):
        """Point at the owner's parameter and update dicts (after both are placed)."""
        self.params, self.updates = owner.params, owner.updates
        self.batch_normalize = owner.batch_normalize
        self.weight_order = ()

    def fold_batchnorm(self, ops):
        if self.share_owner is None:
            return super().fold_batchnorm(ops)
        # the owner (earlier) has folded the shared parameters already
        self.share_parameters(self._owner)

    def update(self, ops, learning_rate, momentum, decay, batch, loss_scale=None):
        if self.share_owner is None:  # a sharing layer's gradients are the owner's to apply
            super().update(ops, learning_rate, momentum, decay, batch, loss_scale)

    def describe(self):
        dilation = f"({self.dilation})" if self.dilation > 1 else ""
        stride = "%2d" % self.stride_x if self.stride_x == self.stride_y else \
            "%2dx%2d" % (self.stride_x, self.stride_y)  # AlexeyAB's order: x, then y
        return "conv  %5d %2d x%2d /%s%s  %s  %5.3f BFLOPs" % (
            self.filters, self.size, self.size, stride, dilation, self.maps(),
            self.flops() / 1e9)


    def flops(self):
        c = self.in_shape[0]
        oc, oh, ow = self.out_shape
        if self.blur is not None:  # AlexeyAB counts the stride-1 convolution
            oh = (self.in_shape[1] + 2 * self.padding - self.size) + 1
            ow = (self.in_shape[2] + 2 * self.padding - self.size) + 1
        return 2.0 * oc * self.size * self.size * c / self.groups * oh * ow

    def place(self, ops):
        super().place(ops)
        if self.blur is not None:
            self.blur.place(ops)

    def forward(self, ops, x, train):
        self.input = x
        p = self.params
        if not train and not self.batch_normalize and fusable(self.activation, train):
            # inference with the bias (BN folded): bias and activation inside the convolution
            y = self.output = ops.conv_bias_forward(
                x, p["weights"], p["biases"], self.activation, self.conv_stride,
                self.padding * self.dilation, self.groups, dilation=self.dilation)
        else:
            y = ops.conv_forward(x, p["weights"], self.conv_stride, self.padding * self.dilation,
                                 self.groups, train=train, dilation=self.dilation)
            y = self.normalize_activate(ops, y, train)
        return self.blur.forward(ops, y) if self.blur is not None else y

    def writes_into(self):
        """Whether forward_into applies: an inference convolution that ends in its bias and
        activation (BN folded, no blur after it)."""
        return (not self.batch_normalize and fusable(self.activation, False)
                and self.blur is None)

    def forward_into(self, ops, x, out, start):
        """Inference forward (writes_into) whose output also lands in out's channels [start,
        start + F): the [route] that concatenates it then copies nothing for it."""
        self.input = x
        p = self.params
        y = self.output = ops.conv_bias_forward_into_(
            out, start, x, p["weights"], p["biases"], self.activation, self.conv_stride,
            self.padding * self.dilation, self.groups, dilation=self.dilation)
        return y

    def forward_pooled(self, ops, x, pool, out=None, start=0, keep=False):
        """Inference forward (writes_into) of a convolution that computes the output of the
        [maxpool] `pool` (MaxpoolLayer.pools_after_a_convolution), which reads only it or only
        a [route] concatenating it at `start` (out: the pool's output, None to make it):
        returns (the pool's output, its own output if `keep` (other layers read it), else
        None)."""
        self.input = x
        p = self.params
        pooled, self.output = ops.conv_bias_maxpool_forward(
            x, p["weights"], p["biases"], self.activation, self.conv_stride,
            self.padding * self.dilation, self.groups, pool.size, pool.stride, pool.pad,
            pool.pooled_hw, out, start, keep, dilation=self.dilation)
        return pooled, self.output

    def pooled_stage(self, pool):
        """This convolution and the [maxpool] `pool` that alone reads it as one stage of
        ops.conv_bias_maxpool_chain (forward_pooled's arguments): a predict-only chain, which
        keeps neither layer's output."""
        p = self.params
        return (p["weights"], p["biases"], self.activation, self.conv_stride,
                self.padding * self.dilation, self.groups, pool.size, pool.stride, pool.pad,
                pool.pooled_hw, self.dilation)

    def backward(self, ops, delta, need_dx):
        if self.blur is not None:
            delta = self.blur.backward(ops, delta)
        delta = self.normalize_activate_backward(ops, delta)
        return ops.conv_backward(self.input, self.params["weights"], delta, self.conv_stride,
                                 self.padding * self.dilation, self.groups,
                                 self.updates["weights"], need_dx, dilation=self.dilation)
