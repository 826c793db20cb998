"""[reorg]: YOLOv2's passthrough, Darknet's reorg with `stride` (default 1): C x H x W becomes
C*s^2 x H/s x W/s, or with `reverse=1` C/s^2 x H*s x W*s.

The values are permuted exactly as Darknet's reorg_cpu does, including its well-known quirk:
the forward (non-reverse) layer reads its input as if it were C/s^2 x H*s x W*s, so it is not
the textbook space-to-depth; pretrained YOLOv2 weights expect this order. The backward pass is
the inverse permutation. The old `extra=N` variant (go.cfg) flattens the input and appends N
zeros. `flatten` is refused.
"""

from ..backends.views import whole
from .base import Layer, input_shape_error
from .channels import channel_slice, concat_channels


def reorg(ops, x, stride, forward, dims, out_shape):
    """Darknet's reorg_cpu(x, w, h, c, batch, stride, forward, out) on dims (c, h, w): x and the
    result hold the same B*c*h*w values in another order, and the result has shape
    (B,) + out_shape. With oc = c/stride^2, (k, j, i) ranging over (c, h, w) and
    (k', j', i') = (k % oc, j*stride + (k//oc) // stride, i*stride + (k//oc) % stride) over
    (oc, h*stride, w*stride):
    forward=False: result(c,h,w)[k,j,i] = x viewed as (oc,h*s,w*s)[k',j',i'] (the non-reverse
    layer's forward, and the reverse layer's backward);
    forward=True: result viewed as (oc,h*s,w*s)[k',j',i'] = x(c,h,w)[k,j,i] (the inverse).
    One strided copy: a permutation of x's axes split as below."""
    c, h, w = dims
    b, s = int(x.shape[0]), stride
    oc = c // (s * s)
    if forward:  # x as (B, dy, dx, oc, j, i) -> (B, oc, j, dy, i, dx)
        source = whole((b, s, s, oc, h, w), axes=(0, 3, 4, 1, 5, 2))
    else:  # x as (B, oc, j, dy, i, dx) -> (B, dy, dx, oc, j, i)
        source = whole((b, oc, h, s, w, s), axes=(0, 3, 5, 1, 2, 4))
    y = ops.empty((b,) + tuple(out_shape), like=x)
    return ops.strided_copy_(y, whole(source.counts), x, source)


class ReorgLayer(Layer):
    type_name = "reorg"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.stride = section.require_positive("stride", section.int("stride", 1))
        self.reverse = section.bool("reverse", False)
        self.extra = section.int("extra", 0)
        if section.int("flatten", 0):
            raise section.error("flatten=1 is not supported", "flatten")
        if self.extra < 0:
            raise section.error(f"extra={self.extra}: expected a value >= 0", "extra")
        s = self.stride
        if self.extra:
            self.out_shape = (c * h * w + self.extra, 1, 1)
        elif self.reverse:
            if c % (s * s):
                raise input_shape_error(section, self.in_shape, f"reverse reorg by {s}")
            self.out_shape = (c // (s * s), h * s, w * s)
        else:
            # Darknet's reorg_cpu reads the input as (c/s^2, h*s, w*s) (see the module
            # docstring), so the channels must divide by s^2 as well.
            if h % s or w % s or c % (s * s):
                raise input_shape_error(section, self.in_shape, f"reorg by {s}")
            self.out_shape = (c * s * s, h // s, w // s)

    def describe(self):
        c, h, w = self.in_shape
        if self.extra:
            return f"reorg              {c * h * w:4d}   ->  {self.outputs:4d}"
        oc, oh, ow = self.out_shape
        return (f"reorg              /{self.stride:2d}  {w:4d} x{h:4d} x{c:4d}   ->  "
                f"{ow:4d} x{oh:4d} x{oc:4d}")

    def forward(self, ops, x, train):
        if self.extra:
            flat = ops.reshape(x, (x.shape[0], -1, 1, 1))
            return concat_channels(ops, [flat, ops.zeros((x.shape[0], self.extra, 1, 1))])
        return reorg(ops, x, self.stride, self.reverse, self.in_shape, self.out_shape)

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        if self.extra:
            inputs = self.outputs - self.extra
            return ops.reshape(channel_slice(ops, delta, 0, inputs),
                               (delta.shape[0],) + self.in_shape)
        return reorg(ops, delta, self.stride, not self.reverse, self.in_shape, self.in_shape)


class Reorg3dLayer(Layer):
    """[reorg3d]: AlexeyAB's reorg layer (reorg_layer.c), the space-to-depth its [reorg] (the
    old one, above) is not: reorg_cpu run on the *output's* dimensions, so C x H x W becomes
    C*s^2 x H/s x W/s in textbook order (or, with reverse=1, C/s^2 x H*s x W*s)."""

    type_name = "reorg3d"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.stride = s = section.require_positive("stride", section.int("stride", 1))
        self.reverse = section.bool("reverse", False)
        if self.reverse:
            if c % (s * s * s * s):  # reorg_cpu splits the output's channels by s^2 again
                raise input_shape_error(section, self.in_shape, f"reverse reorg3d by {s}")
            self.out_shape = (c // (s * s), h * s, w * s)
        else:
            if h % s or w % s:
                raise input_shape_error(section, self.in_shape, f"reorg3d by {s}")
            self.out_shape = (c * s * s, h // s, w // s)

    def describe(self):
        c, h, w = self.in_shape
        oc, oh, ow = self.out_shape
        return "reorg                    /%2d %4d x%4d x%4d -> %4d x%4d x%4d" % (
            self.stride, w, h, c, ow, oh, oc)  # AlexeyAB's row

    def forward(self, ops, x, train):
        return reorg(ops, x, self.stride, self.reverse, self.out_shape, self.out_shape)

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        return reorg(ops, delta, self.stride, not self.reverse, self.out_shape, self.in_shape)
