"""[softmax]: softmax over `groups` contiguous blocks of each image's outputs, with temperature.

With training labels it is the cross-entropy loss layer: cost = -sum(truth * log p) and the
delta handed back is truth - p, the negative gradient of that loss with respect to the softmax
*input*; so backward passes the delta through unchanged, as Darknet does.
"""

from .base import Layer


class SoftmaxLayer(Layer):
    type_name = "softmax"
    has_cost = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        if section.has("tree"):
            raise section.error("tree=...: hierarchical softmax (YOLO9000) is not supported", "tree")
        self.groups = section.require_positive("groups", section.int("groups", 1))
        self.temperature = section.float("temperature", 1.0)
        if self.outputs % self.groups:
            raise section.error(f"groups={self.groups} must divide the {self.outputs} inputs", "groups")
        if self.temperature <= 0:
            raise section.error(f"temperature={self.temperature}: expected a positive value",
                                "temperature")

    def describe(self):
        return "softmax                                        %4d" % self.outputs


    def forward(self, ops, x, train):
        self.output = ops.softmax(x, self.groups, self.temperature)
        return self.output

    def cost(self, ops, truth):
        """(summed cost, delta) for the given labels (batch x outputs, on the backend)."""
        return ops.softmax_cross_entropy(self.output, truth)

    def backward(self, ops, delta, need_dx):
        return delta if need_dx else None
