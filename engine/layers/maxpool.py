"""[maxpool]: Darknet's max pooling. Windows start at -padding//2 and cells outside the input
never win, so size=2 stride=1 keeps the input size (padding defaults to size-1); a window with
no cell inside the input gives -FLT_MAX, as Darknet's forward_maxpool_layer does.

Darknet's rule (the first window's offset padding//2 and the output size) is computed here, once;
the backends' pooling takes it as explicit geometry (size, stride, pad, output size)."""

from .antialiasing import Blur
from .base import Layer, input_shape_error, window_limit


class MaxpoolLayer(Layer):
    type_name = "maxpool"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.stride = section.positive_int("stride", 1)
        refuse_unequal_strides(section, self.stride)
        # A window may be larger than the input (SPP's 13x13 on a small map): the cells outside
        # cost nothing (the backends visit only the cells inside the input).
        self.size = section.positive_int("size", self.stride)
        self.padding = section.int("padding", self.size - 1, low=0)
        # AlexeyAB's variants the engine lacks: refused at their line rather than ignored.
        if section.int("maxpool_zero_nonmax", 0):
            raise section.error(f"maxpool_zero_nonmax={section.int('maxpool_zero_nonmax')} is not "
                                "supported", "maxpool_zero_nonmax")
        # AlexeyAB's maxpool_depth: a maximum across channels instead (size, stride unused)
        self.depth = section.bool("maxpool_depth", False)
        # More output channels than input ones would hold only AlexeyAB's -FLT_MAX: refused.
        out_channels = section.positive_int("out_channels", 1, high=c)
        self.antialiasing = section.int("antialiasing", 0)
        if self.depth:
            if self.antialiasing:
                raise section.error("antialiasing with maxpool_depth is not supported",
                                    "antialiasing")
            self.out_shape = (out_channels, h, w)
            self.blur = None
            return
        self.blur_stride = self.stride
        if self.antialiasing:
            self.stride = 1  # AlexeyAB: pooling at stride 1, then the blur strides
        self.pad = self.padding // 2  # Darknet's: the first window starts at -padding//2
        out_h = (h + self.padding - self.size) // self.stride + 1
        out_w = (w + self.padding - self.size) // self.stride + 1
        if self.size > h + self.padding or self.size > w + self.padding or out_h < 1 or out_w < 1:
            raise input_shape_error(section, self.in_shape, f"maxpool size={self.size}")
        self.out_shape = (c, out_h, out_w)
        self.pooled_hw = (out_h, out_w)
        self.blur = None
        if self.antialiasing:
            self.blur = Blur(section, self.antialiasing, c, self.blur_stride, out_h, out_w)
            self.out_shape = (c,) + self.blur.out_hw

    def describe(self):
        if self.depth:  # AlexeyAB's row
            (c, h, w), (oc, oh, ow) = self.in_shape, self.out_shape
            return "max-depth         %2dx%2d/%2d   %4d x%4d x%4d -> %4d x%4d x%4d %5.3f BF" % (
                self.size, self.size, self.stride, w, h, c, ow, oh, oc, 0.0)
        return "max          %d x %d / %d  %s" % (self.size, self.size, self.blur_stride, self.maps())

    def place(self, ops):
        super().place(ops)
        if self.blur is not None:
            self.blur.place(ops)

    def flops(self):
        """AlexeyAB's l.bflops (its total counts pooling): size^2 * C * the stride-1 or
        strided output's cells."""
        c, h, w = self.in_shape
        if self.depth:
            return self.size * self.size * c * h * w
        out_h, out_w = self.pooled_hw
        return self.size * self.size * c * out_h * out_w

    def forward(self, ops, x, train):
        if self.depth:
            self.batch_in_shape = x.shape
            y, self.argmax = ops.channel_max(x, self.out_shape[0])
            return y
        y, self.argmax = ops.maxpool_forward(x, self.size, self.stride, self.pad,
                                             *self.pooled_hw, train=train)
        self.batch_in_shape = x.shape
        return self.blur.forward(ops, y) if self.blur is not None else y

    def pools_after_a_convolution(self):
        """Whether the convolution before may compute this layer's output at inference
        (ConvolutionalLayer.forward_pooled): a plain spatial maxpool."""
        return not self.depth and self.blur is None

    def forward_given(self, batch, pooled):
        """Inference forward whose maxima the convolution before computed (forward_pooled)."""
        self.argmax = None
        self.batch_in_shape = (batch,) + tuple(self.in_shape)
        return pooled

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        if self.depth:
            return ops.channel_max_backward(delta, self.argmax, self.batch_in_shape)
        if self.blur is not None:
            delta = self.blur.backward(ops, delta)
        return ops.maxpool_backward(delta, self.argmax, self.batch_in_shape, self.size,
                                    self.stride, self.pad)


class LocalAvgpoolLayer(Layer):
    """[local_avgpool]: AlexeyAB's windowed average pooling, with [maxpool]'s geometry (windows
    start at -padding//2, padding defaults to size-1); a window's mean counts only the cells
    inside the input (forward_local_avgpool_layer)."""

    type_name = "local_avgpool"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.stride = section.positive_int("stride", 1)
        refuse_unequal_strides(section, self.stride)
        # A window wider than twice the input sees all of it from every position; larger ones
        # only add cells of padding (and time: the pooling loops over the window's cells).
        self.size = section.positive_int("size", self.stride, high=window_limit(h, w))
        self.padding = section.int("padding", self.size - 1, low=0)
        self.pad = self.padding // 2  # maxpool's rule
        out_h = (h + self.padding - self.size) // self.stride + 1
        out_w = (w + self.padding - self.size) // self.stride + 1
        if out_h < 1 or out_w < 1:
            raise input_shape_error(section, self.in_shape, f"local_avgpool size={self.size}")
        self.out_shape = (c, out_h, out_w)

    def describe(self):  # AlexeyAB's row
        (c, h, w), (oc, oh, ow) = self.in_shape, self.out_shape
        return "avg               %2dx%2d/%2d   %4d x%4d x%4d -> %4d x%4d x%4d %5.3f BF" % (
            self.size, self.size, self.stride, w, h, c, ow, oh, oc, self.flops() / 1e9)

    def flops(self):
        c, oh, ow = self.out_shape
        return self.size * self.size * c * oh * ow

    def forward(self, ops, x, train):
        self.batch_in_shape = x.shape
        return ops.local_avgpool(x, self.size, self.stride, self.pad, *self.out_shape[1:])

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        return ops.local_avgpool_backward(delta, self.batch_in_shape, self.size, self.stride,
                                          self.pad)


def refuse_unequal_strides(section, stride):
    """AlexeyAB's stride_x/stride_y: accepted when they equal `stride`, refused otherwise."""
    for key in ("stride_x", "stride_y"):
        if section.has(key) and section.int(key) != stride:
            raise section.error(f"{key}={section.int(key)}: different horizontal and vertical "
                                "strides are not supported", key)
