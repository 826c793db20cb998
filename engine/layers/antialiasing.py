"""AlexeyAB's `antialiasing` for [convolutional] and [maxpool] (make_convolutional_layer,
make_maxpool_layer): the layer itself runs with stride 1, then a fixed blur, a depthwise
convolution with the layer's stride, gives the output. antialiasing=1 blurs with the 3x3 filter
[1 2 1; 2 4 2; 1 2 1]/16 (padding 1), antialiasing=2 with the 2x2 mean (no padding). The blur's
weights are constants: not in the .weights file, not trained; deltas pass back through it."""

import numpy as np


class Blur:
    def __init__(self, section, kind, channels, stride, height, width):
        if kind not in (1, 2):
            raise section.error(f"antialiasing={kind}: expected 0, 1 or 2", "antialiasing")
        self.size, self.padding = (3, 1) if kind == 1 else (2, 0)
        self.channels, self.stride = channels, stride
        taps = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16 if kind == 1 else np.full((2, 2), 0.25)
        self.host_weights = np.broadcast_to(taps, (channels, 1) + taps.shape).astype(np.float32)
        self.weights = self.host_weights
        out_h = (height + 2 * self.padding - self.size) // stride + 1
        out_w = (width + 2 * self.padding - self.size) // stride + 1
        if out_h < 1 or out_w < 1:
            raise section.error(f"antialiasing={kind} does not fit the {width}x{height} map",
                                "antialiasing")
        self.out_hw = (out_h, out_w)

    def place(self, ops):
        self.weights = ops.asarray(np.ascontiguousarray(self.host_weights))

    def forward(self, ops, x):
        self.input = x
        return ops.conv_forward(x, self.weights, self.stride, self.padding, self.channels)

    def backward(self, ops, delta):
        scratch = ops.zeros(self.weights.shape)  # the constant blur takes no update
        return ops.conv_backward(self.input, self.weights, delta, self.stride, self.padding,
                                 self.channels, scratch, True)
