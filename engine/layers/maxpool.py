"""[maxpool]: Darknet's max pooling. Windows start at -padding//2 and cells outside the input
never win, so size=2 stride=1 keeps the input size (padding defaults to size-1); a window with
no cell inside the input gives -FLT_MAX, as Darknet's forward_maxpool_layer does."""

from .base import Layer, input_shape_error


class MaxpoolLayer(Layer):
    type_name = "maxpool"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.stride = section.positive_int("stride", 1)
        # A window may be larger than the input (SPP's 13x13 on a small map): the cells outside
        # cost nothing (the backends visit only the cells inside the input).
        self.size = section.positive_int("size", self.stride)
        self.padding = section.int("padding", self.size - 1, low=0)
        out_h = (h + self.padding - self.size) // self.stride + 1
        out_w = (w + self.padding - self.size) // self.stride + 1
        if self.size > h + self.padding or self.size > w + self.padding or out_h < 1 or out_w < 1:
            raise input_shape_error(section, self.in_shape, f"maxpool size={self.size}")
        self.out_shape = (c, out_h, out_w)

    def describe(self):
        return "max          %d x %d / %d  %s" % (self.size, self.size, self.stride, self.maps())


    def forward(self, ops, x, train):
        y, self.argmax = ops.maxpool_forward(x, self.size, self.stride, self.padding,
                                             self.out_shape[1], self.out_shape[2])
        self.batch_in_shape = x.shape
        return y

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        return ops.maxpool_backward(delta, self.argmax, self.batch_in_shape, self.size,
                                    self.stride, self.padding)
