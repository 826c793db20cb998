"""[implicit]: AlexeyAB's learned constant (representation_layer.c, YOLOR): the output is the
layer's `filters` x `atoms` x 1 weights, the same for every image; nothing is read from the
previous layer (only its batch size). Its weights are in the .weights file (filters*atoms floats). Combining it with
a feature map is done by [shift_channels]/[control_channels], which this engine lacks."""

import numpy as np

from .base import Layer


class ImplicitLayer(Layer):
    type_name = "implicit"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.mean = mean = section.float("mean", 0.0)
        self.std = std = section.float("std", 0.2)
        filters = section.require_positive("filters", section.int("filters", 128))
        atoms = section.require_positive("atoms", section.int("atoms", 1))
        self.out_shape = (filters, atoms, 1)
        self.add_param("weights", mean + net.rng.uniform(-std, std, self.out_shape))
        self.weight_order = ("weights",)
        self._ones = {}

    def describe(self):
        c, h, _ = self.out_shape
        return f"implicit Layer: {c} x {h} \t mean={self.mean:.2f}, std={self.std:.2f} "

    def forward(self, ops, x, train):
        # one array of ones per batch size, made on first use (a recorded forward replays it)
        ones = self._ones.get(x.shape[0])
        if ones is None:
            ones = self._ones[x.shape[0]] = ops.asarray(np.ones((x.shape[0],) + self.out_shape,
                                                                np.float32))
        return ops.multiply(ones, ops.reshape(self.params["weights"], (1,) + self.out_shape))

    def backward(self, ops, delta, need_dx):
        ops.add_(self.updates["weights"], ops.reshape(ops.sum_to(delta, (1,) + self.out_shape),
                                                      self.out_shape))
        return None  # the layer reads no input

