"""[cost]: Darknet's sum-of-squares cost on its input (type=sse, the default).

cost = sum((truth - x)^2); delta = truth - x (Darknet's l2 rule: the negative gradient of half
the reported cost). The layer's output is its input.
"""

from .base import Layer


class CostLayer(Layer):
    type_name = "cost"
    has_cost = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.cost_type = section.str("type", "sse")
        if self.cost_type != "sse":
            raise section.error(f"type={self.cost_type}: only type=sse is supported", "type")
        self.scale = section.float("scale", 1.0)

    def describe(self):
        return "cost                                           %4d" % self.outputs


    def forward(self, ops, x, train):
        self.output = x
        return x

    def cost(self, ops, truth):
        cost, delta = ops.sse(self.output, truth)
        return cost, ops.scale_(delta, self.scale) if self.scale != 1 else delta

    def backward(self, ops, delta, need_dx):
        return delta if need_dx else None
