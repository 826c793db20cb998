"""[dropout]: in training, zero each input with `probability` and scale the survivors by
1/(1-probability); at inference, the identity."""

from .base import Layer


class DropoutLayer(Layer):
    type_name = "dropout"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.probability = section.float("probability", 0.5)
        if not 0.0 <= self.probability < 1.0:
            raise section.error(f"probability={self.probability}: expected 0 <= p < 1", "probability")

    def describe(self):
        return "dropout       p = %.2f               %4d  ->  %4d" % (
            self.probability, self.outputs, self.outputs)


    def forward(self, ops, x, train):
        if not train or self.probability == 0:
            self.mask = None
            return x
        y, self.mask = ops.dropout_forward(x, self.probability)
        return y

    def backward(self, ops, delta, need_dx):
        if not need_dx:
            return None
        return delta if self.mask is None else ops.dropout_backward(delta, self.mask)
