"""[crop]: Darknet's crop layer (VGG-16's first layer, forward_crop_layer's CPU path).

The output is a crop_height x crop_width window of the input, rescaled to x*2-1 (x*1+0 with
`noadjust=1`). At inference the window is centred; in training its offset is random and, with
`flip=1`, it is mirrored half of the time (one draw per batch, as Darknet does). `angle`,
`saturation` and `exposure` only act in Darknet's GPU path; they are read and ignored here.
Like Darknet's (empty) backward_crop_layer, no delta flows back through it.
"""

import numpy as np

from ..backends.views import whole, window
from .base import Layer, input_shape_error


class CropLayer(Layer):
    type_name = "crop"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        c, h, w = self.in_shape
        self.crop_height = section.require_positive("crop_height", section.int("crop_height", 1))
        self.crop_width = section.require_positive("crop_width", section.int("crop_width", 1))
        if self.crop_height > h or self.crop_width > w:
            raise input_shape_error(section, self.in_shape,
                                    f"a {self.crop_width}x{self.crop_height} crop")
        self.flip = section.bool("flip", False)
        noadjust = section.bool("noadjust", False)
        self.scale, self.shift = (1.0, 0.0) if noadjust else (2.0, -1.0)
        for key in ("angle", "saturation", "exposure", "shift"):
            section.str(key)
        self.out_shape = (c, self.crop_height, self.crop_width)
        # Offsets are host integers drawn once per batch, reproducibly from the network's seed.
        self.rng = np.random.default_rng(int(net.rng.integers(1 << 31)))

    def describe(self):
        c, h, w = self.in_shape
        return f"Crop Layer: {h} x {w} -> {self.crop_height} x {self.crop_width} x {c} image"

    def forward(self, ops, x, train):
        _, h, w = self.in_shape
        if train:
            flip = bool(self.flip and self.rng.integers(2))
            top = int(self.rng.integers(h - self.crop_height + 1))
            left = int(self.rng.integers(w - self.crop_width + 1))
        else:
            flip, top, left = False, (h - self.crop_height) // 2, (w - self.crop_width) // 2
        # y[:, :, i, j] = x[:, :, top + i, col(j)] * scale + shift, col(j) = left + j, or
        # W - left - 1 - j when flipped (forward_crop_layer)
        b, c = int(x.shape[0]), int(x.shape[1])
        columns = (w - left - 1, self.crop_width, -1) if flip else (left, self.crop_width, 1)
        source = window((b, c, h, w), None, None, (top, self.crop_height, 1), columns)
        y = ops.empty((b, c, self.crop_height, self.crop_width), like=x)
        return ops.strided_copy_(y, whole(y.shape), x, source, scale=self.scale, shift=self.shift)

    def backward(self, ops, delta, need_dx):
        return None
