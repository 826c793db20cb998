"""[avgpool]: Darknet's global average pooling, C x H x W -> C x 1 x 1: a sum over each channel's
positions times 1/(H*W), and back, each position receiving 1/(H*W) of its channel's delta."""

from ..backends.views import whole, window
from .base import Layer


class AvgpoolLayer(Layer):
    type_name = "avgpool"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.out_shape = (self.in_shape[0], 1, 1)

    def describe(self):
        c, h, w = self.in_shape
        return "avg                     %4d x%4d x%4d   ->  %4d" % (w, h, c, c)


    def forward(self, ops, x, train):
        b, c, h, w = (int(n) for n in x.shape)
        self.batch_in_shape = (b, c, h, w)
        planes = ops.reshape(x, (b, c, h * w))
        return ops.reshape(ops.sum_to(planes, (b, c, 1), 1.0 / (h * w)), (b, c, 1, 1))

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        b, c, h, w = self.batch_in_shape
        dx = ops.empty(self.batch_in_shape, like=delta)
        spread = window((b, c, 1), None, None, (0, h * w, 0))  # each channel's delta, repeated
        return ops.strided_copy_(dx, whole((b, c, h * w)), delta, spread, scale=1.0 / (h * w))
