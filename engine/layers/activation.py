"""[activation]: applies one of Darknet's activations on its own (default linear)."""

from .. import activations
from .base import Layer, activate, activation_backward


class ActivationLayer(Layer):
    type_name = "activation"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.activation = activations.check_name(section.str("activation", "linear"),
                                                 section.where("activation"))

    def describe(self):
        return f"{self.activation:<10s}               {self.outputs:6d}  ->  {self.outputs:6d}"

    def forward(self, ops, x, train):
        self.output = activate(ops, ops.copy(x), self.activation, train, self)
        return self.output

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        return activation_backward(ops, self, delta, self.activation)  # its own (Network)
