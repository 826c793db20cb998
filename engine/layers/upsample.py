"""[upsample]: nearest-neighbour upsampling by `stride`, times `scale`. A negative stride is
Darknet's reverse mode: sum-pooling by |stride| (times scale), the adjoint of upsampling."""

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
            return ops.downsample_sum(x, self.stride, self.scale)
        return ops.upsample(x, self.stride, self.scale)

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        if self.reverse:
            return ops.upsample(delta, self.stride, self.scale)
        return ops.downsample_sum(delta, self.stride, self.scale)
