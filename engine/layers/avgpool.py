"""[avgpool]: Darknet's global average pooling, C x H x W -> C x 1 x 1."""

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
        self.batch_in_shape = x.shape
        return ops.avgpool_forward(x)

    def backward(self, ops, delta, need_dx):
        return ops.avgpool_backward(delta, self.batch_in_shape) if need_dx else None
