"""[upsample]: nearest-neighbour upsampling by `stride`, times `scale`. A negative stride is
Darknet's reverse mode: sum-pooling by |stride| (times scale), the adjoint of upsampling."""

from ..backends.views import whole, window
from .base import Layer, input_shape_error


class UpsampleLayer(Layer):
    type_name = "upsample"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        stride = section.int("stride", 2)
        if stride == 0:
            raise section.error("stride=0: expected a non-zero integer", "stride")
        self.scale = section.float("scale", 1.0)
        self.reverse = stride < 0
        self.stride = abs(stride)
        if self.reverse:
            if h % self.stride or w % self.stride:
                raise input_shape_error(section, self.in_shape, f"downsampling by {self.stride}")
            self.out_shape = (c, h // self.stride, w // self.stride)
        else:
            self.out_shape = (c, h * self.stride, w * self.stride)

    def describe(self):
        name = "downsample" if self.reverse else "upsample"
        return "%-19s%2dx  %s" % (name, self.stride, self.maps())


    def forward(self, ops, x, train):
        if self.reverse:
            return downsample_sum(ops, x, self.stride, self.scale)
        return upsample(ops, x, self.stride, self.scale)

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        if self.reverse:
            return upsample(ops, delta, self.stride, self.scale)
        return downsample_sum(ops, delta, self.stride, self.scale)


def upsample(ops, x, stride, scale):
    """y[:, :, i, j] = scale * x[:, :, i // stride, j // stride]: one strided copy whose source
    repeats each cell stride x stride times (steps of 0)."""
    b, c, h, w = (int(n) for n in x.shape)
    y = ops.empty((b, c, h * stride, w * stride), like=x)
    source = window((b, c, h, 1, w, 1), None, None, None, (0, stride, 0), None, (0, stride, 0))
    return ops.strided_copy_(y, whole((b, c, h, stride, w, stride)), x, source, scale=scale)


def downsample_sum(ops, x, stride, scale):
    """The adjoint of upsample: scale times the sum of each stride x stride block."""
    b, c, h, w = (int(n) for n in x.shape)
    h, w = h // stride, w // stride
    blocks = ops.reshape(x, (b, c, h, stride, w, stride))
    return ops.reshape(ops.sum_to(blocks, (b, c, h, 1, w, 1), scale), (b, c, h, w))
