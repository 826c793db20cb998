"""The life cycle every layer shares: build (shapes, parameters), forward, backward, update.

A layer's shapes are fixed when it is built from its cfg section, and checked there, so a bad cfg
fails before any computation with an error that names the section's line. Layers do their
arithmetic only through the backend `ops` they are handed, so one layer class serves the CPU and
the GPU. Arrays are NCHW; a layer's output shape excludes the batch: (channels, height, width).
"""

import math

import numpy as np

from .. import activations
from ..batchnorm_rule import inference_affine

# Parameters the optimizer changes; everything else in `params` (rolling statistics) is state.
TRAINABLE = ("biases", "scales", "weights")


class Layer:
    type_name = None
    # Multi-input layers (route, shortcut...) get lists of inputs and return lists of deltas.
    multi_input = False
    stopbackward = False  # AlexeyAB's: no backward pass through this layer and those before
    outputs_boxes = False  # its output decodes into boxes (a detector's head)
    box_truth = False      # its loss trains on box truth rows, not class labels
    onlyforward = False   # AlexeyAB's: no backward pass through this layer

    def __init__(self, section, index, in_shapes, net):
        self.section = section
        self.index = index
        self.in_shape = tuple(in_shapes[0]) if in_shapes else None
        self.input_indices = [index - 1]
        self.out_shape = self.in_shape
        self.activation = "linear"
        self.params = {}      # name -> array, in the backend's memory once the net is placed
        # name -> this iteration's accumulated negative gradient (Darknet's *_updates), for the
        # TRAINABLE params; backward adds to them, update() consumes them (zeroes them)
        self.updates = {}
        # name -> the optimiser's state (SGD's velocity), made at the first update()
        self.velocities = {}
        self.weight_order = ()  # names of params in .weights file order
        # inference BN's (epsilon under the square root, epsilon added to it): the rule of the
        # Darknet the cfg comes from, which the network decides (Network.bn_epsilons)
        self.bn_epsilons = net.bn_epsilons

    # ---- description --------------------------------------------------------------------------
    @property
    def outputs(self):
        return math.prod(self.out_shape)  # Python ints: an absurd cfg cannot wrap around

    def where(self):
        return self.section.where() if self.section is not None else f"layer {self.index}"

    def error(self, message, key=None):
        return self.section.error(message, key)

    def maps(self):
        """Input -> output sizes as Darknet's layer table prints them (w x h x c)."""
        (c, h, w), (oc, oh, ow) = self.in_shape, self.out_shape
        return "%4d x%4d x%4d   ->  %4d x%4d x%4d" % (w, h, c, ow, oh, oc)

    def describe(self):
        """This layer's row of the table Darknet prints while loading a cfg."""
        return f"{self.type_name:<14s} {self.maps()}"

    def flops(self):
        return 0

    # ---- parameters ---------------------------------------------------------------------------
    def add_param(self, name, host_array):
        self.params[name] = np.ascontiguousarray(host_array, dtype=np.float32)
        if name in TRAINABLE:
            self.updates[name] = np.zeros_like(self.params[name])

    def place(self, ops):
        """Move parameters, their gradients and any optimiser state into the backend's memory."""
        self.params = {k: ops.asarray(ops.to_host(v)) for k, v in self.params.items()}
        self.updates = {k: ops.asarray(ops.to_host(v)) for k, v in self.updates.items()}
        self.velocities = {k: ops.asarray(ops.to_host(v)) for k, v in self.velocities.items()}

    # ---- computation -------------------------------------------------------------------------
    # Each layer defines forward(ops, x, train) -> y and backward(ops, delta, need_dx) -> dx
    # (lists of inputs and deltas when multi_input). backward accumulates parameter updates and
    # returns the delta for the input, or None when need_dx is False.

    def update(self, ops, learning_rate, momentum, decay, batch, loss_scale=None):
        """Darknet's per-layer SGD step with momentum, from the accumulated gradients (which
        it zeroes); weight decay applies to `weights` only. `loss_scale`: the backend's loss-
        scale state when the gradients are scaled (engine/loss_scaling.py), else None."""
        for name, gradient in self.updates.items():
            velocity = self.velocities.get(name)
            if velocity is None:
                velocity = self.velocities[name] = ops.zeros(gradient.shape)
            ops.sgd_update(self.params[name], gradient, velocity, learning_rate, momentum,
                           decay if name == "weights" else 0.0, batch, loss_scale=loss_scale)


def fusable(activation, train, normalized=False):
    """Whether the activation can run inside a fused elementwise pass (bias or BN + act): not
    the channel-wise ones; while training, not those whose gradient needs the input, unless the
    pass is training batch norm (`normalized`), whose backward recomputes that input from its
    own (ops.batchnorm_forward_train's activation)."""
    if activation in activations.CHANNEL_NAMES:
        return False
    return not train or normalized or activation not in activations.INPUT_GRADIENT


def needs_input(activation):
    return activation in activations.INPUT_GRADIENT or activation in activations.CHANNEL_NAMES


def activate(ops, x, activation, train, owner):
    """act(x) for any activation, in place where elementwise; when training an activation whose
    gradient needs its input, `owner.pre_activation` keeps a copy of x."""
    if train and needs_input(activation):
        owner.pre_activation = ops.copy(x)
    if activation in activations.CHANNEL_NAMES:
        return ops.normalize_channels(x, activation)
    return ops.activate_(x, activation)


def activation_backward(ops, owner, delta, activation):
    """delta *= act'(...) in place (from the output, or the kept input where needed)."""
    if activation in activations.CHANNEL_NAMES:
        return ops.normalize_channels_backward_(owner.pre_activation, delta, activation)
    if activation in activations.INPUT_GRADIENT:
        return ops.activation_input_backward_(owner.pre_activation, delta, activation)
    return ops.activation_backward_(owner.output, delta, activation)


def window_limit(h, w):
    """The largest filter or pooling window accepted on an h x w map. Beyond twice the map a
    window sees all of it from every position and only adds padding (and time); but Darknet's
    cfgs keep their windows when run at small inputs (YOLOv4's SPP pools 13x13 on the 5x5 map of
    a 160-pixel input, EfficientNet's 5x5 depthwise filters reach 1x1 maps), so windows up to 32
    are always accepted."""
    return max(2 * max(h, w) + 1, 32)


def input_shape_error(section, shape, what):
    c, h, w = shape
    return section.error(f"{what} does not fit the {w}x{h}x{c} input")


class LinearUnit(Layer):
    """What [convolutional] and [connected] share after their linear part: batch norm (or a
    plain bias) and the activation, forward and backward, and their parameter set-up."""

    def add_output_params(self, n, weights, bn_after_weights):
        """biases, optional BN parameters, and the weights, in Darknet's file order."""
        self.add_param("biases", np.zeros(n))
        if self.batch_normalize:
            self.add_param("scales", np.ones(n))
            self.add_param("rolling_mean", np.zeros(n))
            self.add_param("rolling_variance", np.ones(n))
        self.add_param("weights", weights)
        bn = ("scales", "rolling_mean", "rolling_variance") if self.batch_normalize else ()
        self.weight_order = ("biases", "weights") + bn if bn_after_weights \
            else ("biases",) + bn + ("weights",)

    def normalize_activate(self, ops, y, train):
        p = self.params
        fused = self.activation if fusable(self.activation, train, self.batch_normalize) \
            else "linear"
        if not self.batch_normalize:
            y = ops.add_bias_(y, p["biases"], fused)  # one fused pass where it can be
        elif train:  # the op keeps what its backward needs, activation included
            y, self.bn_cache = ops.batchnorm_forward_train(
                y, p["scales"], p["biases"], p["rolling_mean"], p["rolling_variance"],
                activation=fused)
        else:
            y = ops.batchnorm_forward_inference(
                y, p["scales"], p["biases"], p["rolling_mean"], p["rolling_variance"],
                activation=fused, epsilons=self.bn_epsilons)
        if fused != self.activation:
            y = activate(ops, y, self.activation, train, self)
        self.output = y
        return y

    def folded_parameters(self, ops):
        """(weights, biases) with the inference batch norm folded in, in float64 then rounded:
        factor = scales / (sqrt(rolling_variance + e0) + e1) (Darknet's inference rule;
        (e0, e1) = (0, 1e-6) for pjreddie's, (1e-5, 0) for AlexeyAB's),
        W' = W * factor per output, b' = biases - rolling_mean * factor."""
        p = {name: ops.to_host(value).astype(np.float64) for name, value in self.params.items()}
        factor, biases = inference_affine(p["scales"], p["biases"], p["rolling_mean"],
                                          p["rolling_variance"], self.bn_epsilons)
        weights = p["weights"] * factor.reshape((-1,) + (1,) * (p["weights"].ndim - 1))
        return weights.astype(np.float32), biases.astype(np.float32)

    def fold_batchnorm(self, ops):
        """Become the equivalent layer without batch norm, for inference: conv + bias +
        activation is one pass less than conv + BN + activation."""
        if not self.batch_normalize:
            return
        weights, biases = self.folded_parameters(ops)
        self.batch_normalize = False
        self.params = {"biases": ops.asarray(biases), "weights": ops.asarray(weights)}
        self.updates = {name: ops.zeros(value.shape) for name, value in self.params.items()}
        self.velocities = {}  # new parameters: no optimiser state (and no training: engine.train)
        self.weight_order = ("biases", "weights")

    def normalize_activate_backward(self, ops, delta):
        """Delta of the output -> delta of the linear part; accumulates bias/scale updates."""
        if self.batch_normalize:
            if not fusable(self.activation, True, True):  # else batchnorm_backward's own
                delta = activation_backward(ops, self, delta, self.activation)
            return ops.batchnorm_backward(delta, self.bn_cache, self.params["scales"],
                                          self.updates["scales"], self.updates["biases"])
        delta = activation_backward(ops, self, delta, self.activation)
        ops.bias_backward(delta, self.updates["biases"])
        return delta
