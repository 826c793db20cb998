"""Loss scaling for training in reduced precision: PyTorch's GradScaler and AlexeyAB's [net]
loss_scale, over the backend's loss-scale operations (engine/backends/operations.py).

The loss layers' deltas are multiplied by S before the backward pass (the costs are computed
before: the printed loss does not change), so that small gradients survive fp16's range; the
update divides the accumulated gradients by S. Every gradient is checked for NaN and infinity
into one flag where the arrays live; where it is set the update is skipped (parameters and
velocities unchanged). The host reads the flag after the iteration (or a recorded iteration's
replay) and sets the next iteration's S: nothing inside an iteration waits for the host.

- dynamic (the default in fp16): S starts at 2**16, halves after every overflowing step and
  doubles after `growth_interval` steps in a row without one (PyTorch's defaults); below
  MIN_SCALE the run stops with the divergence error (engine.train).
- static: S fixed (`--loss-scale N`, or the cfg's `[net] loss_scale=N` as in AlexeyAB's
  Darknet); an overflowing step is skipped all the same.
"""

import math

import numpy as np

from .errors import ConfigError

INITIAL_SCALE = 2.0 ** 16   # torch.amp.GradScaler's init_scale
GROWTH_INTERVAL = 2000      # its growth_interval: steps without overflow before S doubles
MIN_SCALE = 2.0 ** -24      # fp16's smallest value: a smaller S flushes deltas below 1 to 0
SETTINGS = ("dynamic", "none")


def parse_setting(text, where="--loss-scale"):
    """'dynamic', 'none' or a positive number (a static scale) from text; else a ConfigError
    naming `where`."""
    text = str(text).strip().lower()
    if text in SETTINGS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where} {text}: expected dynamic, none or a positive number")
    return value


class LossScaler:
    """The scale of the coming iteration and its device state; train.train_iteration calls
    start_iteration before and finish_iteration after each iteration."""

    def __init__(self, scale=INITIAL_SCALE, dynamic=True, growth_interval=GROWTH_INTERVAL,
                 min_scale=MIN_SCALE):
        self.scale, self.dynamic = float(scale), dynamic
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.state = None           # the backend's (S, overflow) array, made on first use
        self.good_steps = 0         # steps without overflow since S last changed
        self.skipped = False        # whether the latest iteration's update was skipped
        self.skipped_steps = 0      # in this run
        self.used_scale = None      # S of the latest iteration

    def describe(self):
        return f"dynamic, from {self.scale:g}" if self.dynamic else f"static, {self.scale:g}"

    @property
    def exhausted(self):
        """True once dynamic scaling has fallen below min_scale: every step overflows."""
        return self.scale < self.min_scale

    def start_iteration(self, ops):
        """Writes (S, 0) into the state the iteration's operations read (a fixed array, so a
        recording made with it reads each iteration's values)."""
        values = np.array([self.scale, 0.0], dtype=np.float32)
        if self.state is None:
            self.state = ops.asarray(values)
        else:
            ops.set_(self.state, values)

    def finish_iteration(self, ops):
        """Reads the overflow flag (after the iteration's work) and sets the next S."""
        self.used_scale = self.scale
        self.skipped = bool(ops.to_host(self.state)[1])
        if self.skipped:
            self.skipped_steps += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale /= 2
        elif self.dynamic:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0
        return self.skipped


def scaler_for(net, setting=None):
    """The LossScaler a training run of `net` uses (None: no scaling). `setting`: 'dynamic',
    'none', a positive number (static), a LossScaler, or None for the default: the cfg's
    [net] loss_scale when it sets one other than 1 (AlexeyAB's default: off), else dynamic in
    fp16 and none otherwise (fp32, tf32 and bf16, whose range is float32's)."""
    if isinstance(setting, LossScaler):
        return setting
    if setting is None:
        configured = net.options.loss_scale
        if configured != 1:
            check_alexeyab_loss_scale(net)
            return LossScaler(configured, dynamic=False)
        setting = "dynamic" if net.ops.precision == "fp16" else "none"
    setting = parse_setting(setting, "loss_scale") if isinstance(setting, str) else setting
    if setting == "none":
        return None
    if setting == "dynamic":
        return LossScaler()
    value = float(setting)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"loss_scale {setting}: expected dynamic, none or a positive number")
    return LossScaler(value, dynamic=False)


# The loss layers whose delta AlexeyAB's Darknet multiplies by [net] loss_scale (backward_yolo_
# layer_gpu, backward_softmax_layer_gpu); its update divides every gradient by it.
ALEXEYAB_SCALED_LOSSES = ("yolo", "softmax")


def check_alexeyab_loss_scale(net):
    """[net] loss_scale=K trains as AlexeyAB's Darknet only where it scales every loss's delta:
    with a [cost] or [region] loss its update would divide their unscaled gradients by K (a
    learning rate K times smaller), which the engine does not reproduce: refused, naming the
    line (--loss-scale K scales every loss)."""
    for layer in net.cost_layers:
        if layer.type_name not in ALEXEYAB_SCALED_LOSSES:
            raise net.options.section.error(
                f"loss_scale={net.options.loss_scale:g}: AlexeyAB's Darknet does not scale the "
                f"delta of a [{layer.type_name}] loss (layer {layer.index}) but divides its "
                f"gradients by loss_scale; that is not implemented (--loss-scale "
                f"{net.options.loss_scale:g} scales every loss)", "loss_scale")
