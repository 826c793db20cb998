"""[connected]: a fully connected layer, y = act(BN(W x) or W x + b), output C x 1 x 1.

Its batch norm is the convolutional layer's SPATIAL mode on a C x 1 x 1 output, which is the same
as PER_ACTIVATION there: one statistic per output over the batch.
"""

import math

import numpy as np

from .. import activations
from .base import LinearUnit


class ConnectedLayer(LinearUnit):
    type_name = "connected"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        inputs = math.prod(self.in_shape)
        self.n_outputs = section.positive_int("output", 1)
        self.batch_normalize = section.bool("batch_normalize", False)
        self.activation = activations.check_name(section.str("activation", "logistic"),
                                                 section.where("activation"))
        self.out_shape = (self.n_outputs, 1, 1)
        net.reserve_parameters(self, self.n_outputs * (inputs + 4))
        scale = np.sqrt(2.0 / inputs)
        # Darknet stores a connected layer's BN parameters after its weights.
        self.add_output_params(self.n_outputs, scale * net.rng.uniform(-1, 1, (self.n_outputs, inputs)),
                               bn_after_weights=True)

    def describe(self):
        return "connected                            %4d  ->  %4d" % (
            math.prod(self.in_shape), self.outputs)


    def flops(self):
        return 2.0 * math.prod(self.in_shape) * self.n_outputs

    def forward(self, ops, x, train):
        self.input = x
        return self.normalize_activate(ops, ops.connected_forward(x, self.params["weights"]), train)

    def backward(self, ops, delta, need_dx):
        delta = self.normalize_activate_backward(ops, delta)
        return ops.connected_backward(self.input, self.params["weights"], delta,
                                      self.updates["weights"], need_dx)
