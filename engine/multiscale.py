"""Multi-scale detector training, AlexeyAB's `random=1` (train_detector in src/detector.c): every
10 iterations the network is resized to a new input size, and the training images are made at
that size.

The size: with coef = 1.4 (or the value of `random` when it is not 1), a factor r drawn by
rand_scale(coef) (U(1, coef), inverted half of the time), and `resize_step` (default 32),
size = (round(r * init / step) + 1) * step for width and height alike (Darknet's formula,
with its + 1); a factor below 1 that would still enlarge the network keeps the cfg's size; the
first iteration of a run and the last 100 of training use the largest size,
(round(coef * init / step) + 1) * step; never below one step. Darknet also changes the batch
with `dynamic_minibatch`; that is refused. The factors come from a generator seeded by (seed,
block of 10 iterations), so a seed gives one sequence of sizes.

A network is resized by building its layers again from the same cfg sections at the new size
and handing them the existing parameters and update buffers (the same arrays: momentum carries
on). A network whose parameters depend on the input size (a [connected] layer) cannot be.
"""

import numpy as np

from .errors import ConfigError

RESIZE_EVERY = 10


class MultiScale:
    def __init__(self, width, height, coef, step, seed):
        self.width, self.height, self.coef, self.step, self.seed = width, height, coef, step, seed
        self.first, self.max_batches = 0, 0

    @staticmethod
    def from_network(net, seed):
        """The schedule the cfg asks for (its last layer's `random`), or None."""
        last = net.layers[-1]
        if last.type_name not in ("yolo", "region") or not last.section.float("random", 0):
            return None
        s = net.options.section
        if s.int("dynamic_minibatch", 0):
            raise s.error("dynamic_minibatch=1 is not implemented", "dynamic_minibatch")
        coef = last.section.float("random", 0)
        step = s.float("resize_step", 32)
        if step <= 0:
            raise s.error(f"resize_step={step}: expected a positive value", "resize_step")
        return MultiScale(net.options.width, net.options.height, 1.4 if coef == 1 else coef, step,
                          seed)

    def start(self, first_iteration, max_batches):
        """Training runs from `first_iteration` (batches already done) to max_batches."""
        self.first, self.max_batches = first_iteration, max_batches

    def _scaled(self, factor, size):
        return int((np.round(factor * size / self.step) + 1) * self.step)

    def size(self, count):
        """(width, height) of the run's `count`-th batch (0 = the first of this run)."""
        block = count // RESIZE_EVERY
        rng = np.random.default_rng([self.seed, 7, block])
        factor = rng.uniform(min(1, self.coef), max(1, self.coef))
        factor = factor if rng.integers(2) else 1 / factor
        w, h = self._scaled(factor, self.width), self._scaled(factor, self.height)
        if factor < 1 and (w > self.width or h > self.height):
            w, h = self.width, self.height
        iteration = self.first + block * RESIZE_EVERY  # where Darknet decides, every 10
        if block == 0 or iteration > self.max_batches - 100:
            w, h = self._scaled(self.coef, self.width), self._scaled(self.coef, self.height)
        return max(w, int(self.step)), max(h, int(self.step))


def resize_network(net, width, height):
    """Rebuild `net`'s layers for a width x height input, keeping their parameters."""
    from .layers import LAYER_TYPES

    if (width, height) == (net.options.width, net.options.height):
        return net
    options = net.options
    old_size = options.width, options.height
    options.width, options.height = width, height
    scratch = _Builder(net)  # fresh layers draw throwaway initial weights, not net.rng
    layers, shapes = [], []
    try:
        for index, old in enumerate(net.layers):
            scratch.layer_shapes = shapes
            previous = shapes[-1] if shapes else options.input_shape
            layer = LAYER_TYPES[old.section.name](old.section, index, [previous], scratch)
            for name, value in old.params.items():
                if layer.params.get(name) is None or layer.params[name].shape != tuple(value.shape):
                    raise ConfigError(f"{old.where()} its parameters depend on the input size, so "
                                      "the network cannot be resized (random=1)")
            for attribute, value in vars(old).items():
                if attribute in ("params", "updates", "velocities", "rng", "batch_normalize",
                                 "weight_order"):
                    setattr(layer, attribute, value)
            layers.append(layer)
            shapes.append(tuple(int(v) for v in layer.out_shape))
    except Exception:
        options.width, options.height = old_size
        raise
    net.layers, net.layer_shapes = layers, shapes
    if getattr(net, "_inference", None) is not None:
        net._inference = type(net._inference)(net)  # recordings hold the old shapes
    return net


class _Builder:
    """What a layer's constructor reads from its network, for a rebuild."""

    def __init__(self, net):
        self.options = net.options
        self.network = net  # the network being resized (a [region] layer reads its `seen`)
        self.darknet = net.darknet  # whose conventions: the [yolo] loss and inference BN follow it
        self.bn_epsilons = net.bn_epsilons
        self.rng = np.random.default_rng(0)
        self.layer_shapes = []
        self.cfg_path = net.cfg_path

    def reserve_parameters(self, layer, count):
        """Nothing to check: a rebuilt layer's initial values are dropped for the network's own
        parameters, which were checked when it was built."""
