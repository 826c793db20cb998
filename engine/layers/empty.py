"""[empty] and [silence]: AlexeyAB's identity layers (parser.c's EMPTY): the output is the
previous layer's output and deltas pass through unchanged."""

from .base import Layer


class EmptyLayer(Layer):
    type_name = "empty"

    def describe(self):
        return "empty "

    def forward(self, ops, x, train):
        return x

    def backward(self, ops, delta, need_dx):
        return delta if need_dx else None
