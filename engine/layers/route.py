"""[route]: concatenates the outputs of earlier layers along channels, in the order listed.

`layers` are absolute indexes or negative ones relative to this layer. AlexeyAB's `groups` and
`group_id` take one channel group of each input. Darknet builds a 0-size output when the
inputs' heights or widths differ; we refuse that with an error naming the cfg line.
"""

from .base import Layer
from .channels import add_channel_slice_, channel_slice, concat_channels, copy_channels_


class RouteLayer(Layer):
    type_name = "route"
    multi_input = True

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        refs = section.int_list("layers")
        if not refs:
            raise section.error("needs layers=... (one or more layer indexes)", "layers")
        self.input_indices = []
        for ref in refs:
            j = index + ref if ref < 0 else ref
            if not 0 <= j < index:
                raise section.error(f"layers={ref} refers to layer {j}, but only layers 0..{index - 1} "
                                    "come before this one", "layers")
            self.input_indices.append(j)
        self.groups = section.require_positive("groups", section.int("groups", 1))
        self.group_id = section.int("group_id", 0)
        if not 0 <= self.group_id < self.groups:
            raise section.error(f"group_id={self.group_id}: expected 0..{self.groups - 1}", "group_id")
        shapes = [net.layer_shapes[j] for j in self.input_indices]
        for j, (c, h, w) in zip(self.input_indices, shapes):
            if (h, w) != shapes[0][1:]:
                c0, h0, w0 = shapes[0]
                raise section.error(f"cannot concatenate layer {j} ({w}x{h}x{c}) with layer "
                                    f"{self.input_indices[0]} ({w0}x{h0}x{c0}): heights and widths "
                                    "must match", "layers")
            if c % self.groups:
                raise section.error(f"groups={self.groups} does not divide the {c} channels of "
                                    f"layer {j}", "groups")
        self.in_shapes = shapes
        self.in_shape = shapes[0]
        self.out_shape = (sum(c // self.groups for c, _, _ in shapes),) + tuple(shapes[0][1:])

    def describe(self):
        return "route " + "".join(" %d" % j for j in self.input_indices)


    def _slice(self, c):
        part = c // self.groups
        return self.group_id * part, (self.group_id + 1) * part

    def forward(self, ops, xs, train):
        if len(xs) == 1 and self.groups == 1:
            return xs[0]
        if len(xs) == 1 and not train:  # one group of one input: layers only read it
            return ops.channels_to_read(xs[0], *self._slice(int(xs[0].shape[1])))
        return concat_channels(ops, [(x,) + self._slice(int(x.shape[1])) for x in xs])

    def concatenates(self):
        """Whether the output is the inputs' whole channels one after the other (a buffer
        earlier layers may write their parts into: forward_placed)."""
        return self.groups == 1 and len(self.input_indices) > 1

    def channel_offsets(self):
        """Where each input's channels start in the output (concatenates())."""
        offsets, at = [], 0
        for c, _, _ in self.in_shapes:
            offsets.append(at)
            at += c
        return offsets

    def forward_placed(self, ops, xs, out, placed):
        """Inference forward into `out`, whose parts listed in `placed` (input positions) the
        layers before have already written (Network's inference plan): copies the rest."""
        for i, (x, at) in enumerate(zip(xs, self.channel_offsets())):
            if i not in placed:
                copy_channels_(ops, out, at, x)
        return out

    def backward(self, ops, delta, need_dx):
        deltas, start = [], 0
        for c, h, w in self.in_shapes:
            part = c // self.groups
            d = channel_slice(ops, delta, start, start + part)
            start += part
            if self.groups > 1:
                full = ops.zeros((delta.shape[0], c, h, w), like=delta)
                add_channel_slice_(ops, full, self._slice(c)[0], d)
                d = full
            deltas.append(d)
        return deltas
