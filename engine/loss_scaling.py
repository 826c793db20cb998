"""Loss scaling for training in reduced precision: PyTorch's GradScaler and AlexeyAB's [net]
loss_scale, over the backend's loss-scale operations (engine/backends/operations.py).

The loss layers' deltas are multiplied by S before the backward pass (the costs are computed
before: the printed loss does not change), so that small gradients survive fp16's range; the
update divides the accumulated gradients by S. Every gradient is checked for NaN and infinity
into one flag where the arrays live; where it is set the update is skipped (parameters and
velocities unchanged).

As PyTorch's GradScaler, the scale moves on where the arrays live: the update's last operation
(update_loss_scale_) halves S after an overflow, doubles it after `growth_interval` good steps,
counts the skipped steps and clears the flag. The host writes the state once, before training,
and never waits for it: after each iteration it starts an asynchronous read of the state
(to_host_async) and takes the reads that have arrived, so it learns of a skipped step an
iteration or two late on a GPU (at once on the CPU), and waits only for reads two iterations
old, which bounds that lag; train() settles every read at the end.

- dynamic (the default in fp16): S starts at 2**16, halves after every overflowing step and
  doubles after `growth_interval` steps in a row without one (PyTorch's defaults); below
  MIN_SCALE the run stops with the divergence error (engine.train).
- static: S fixed (`--loss-scale N`, or the cfg's `[net] loss_scale=N` as in AlexeyAB's
  Darknet); an overflowing step is skipped all the same.
"""

import collections
import math

import numpy as np

from .errors import ConfigError

INITIAL_SCALE = 2.0 ** 16   # torch.amp.GradScaler's init_scale
GROWTH_INTERVAL = 2000      # its growth_interval: steps without overflow before S doubles
MIN_SCALE = 2.0 ** -24      # fp16's smallest value: a smaller S flushes deltas below 1 to 0
SETTINGS = ("dynamic", "none")
MAX_LAG = 2                 # iterations a read of the state may stay pending before a wait

# A skipped step, once the host knows of it: its iteration, the skipped steps so far, S after it.
Skip = collections.namedtuple("Skip", "iteration skipped_steps scale")
# Where dynamic scaling fell below its floor: the iteration, the last S it tried, skipped steps.
Exhausted = collections.namedtuple("Exhausted", "iteration last_scale skipped_steps")


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
    """A run's loss scaling: the device state the iterations' operations read and update
    (Network.backward and Network.update), and what the host knows of it so far.
    train.train_iteration calls start before and finish_iteration after each iteration;
    train.train calls settle at the end.

    The host's view lags the device's: `scale` is S after `known_iteration`, the latest
    iteration whose read has arrived (before any: the initial S), `used_scale` and `skipped` what
    that iteration used and whether its step was skipped, `skipped_steps` the count so far."""

    def __init__(self, scale=INITIAL_SCALE, dynamic=True, growth_interval=GROWTH_INTERVAL,
                 min_scale=MIN_SCALE):
        self.scale, self.dynamic = float(scale), dynamic
        self.growth_interval, self.min_scale = int(growth_interval), min_scale
        self.state = None           # the backend's (S, overflow, good, skipped), made by start
        self.state_ops = None       # the backend it lives on
        self.good_steps = 0         # steps without overflow since S last changed
        self.skipped = False        # whether known_iteration's step was skipped
        self.skipped_steps = 0      # in this run
        self.used_scale = None      # S of known_iteration
        self.known_iteration = None
        self.exhausted_at = None    # Exhausted: the first iteration after which S < min_scale
        self.pending = collections.deque()  # (iteration, HostRead) not taken yet
        self.skips = []             # Skip records not yet reported (take_skips)

    def describe(self):
        return f"dynamic, from {self.scale:g}" if self.dynamic else f"static, {self.scale:g}"

    @property
    def exhausted(self):
        """True once dynamic scaling is known to have fallen below min_scale: every step
        overflows."""
        return self.scale < self.min_scale

    def start(self, ops):
        """Makes the state on `ops` on first use (or on another backend): the host's only write
        of S, from the latest known scale."""
        if self.state is None or self.state_ops is not ops:
            self.state = ops.asarray(np.array([self.scale, 0.0, self.good_steps,
                                               self.skipped_steps], dtype=np.float32))
            self.state_ops = ops

    def finish_iteration(self, ops, iteration):
        """After iteration `iteration` has been issued: starts the read of the state it leaves,
        then takes the reads that have arrived, waiting only for those MAX_LAG or more
        iterations old."""
        self.pending.append((iteration, ops.to_host_async(self.state)))
        while self.pending:
            done, read = self.pending[0]
            if not (read.ready() or done <= iteration - MAX_LAG):
                break
            self.pending.popleft()
            self._learn(done, read.value())

    def settle(self):
        """Takes every pending read, waiting for them: the counts are then exact."""
        while self.pending:
            done, read = self.pending.popleft()
            self._learn(done, read.value())

    def take_skips(self):
        """The Skips learned since the last call, for the training loop to report once each."""
        skips, self.skips = self.skips, []
        return skips

    def _learn(self, iteration, state):
        """What the device's state after `iteration` says about that iteration."""
        scale, _, good, skipped = (float(v) for v in state[:4])
        self.used_scale = self.scale
        self.skipped = skipped > self.skipped_steps
        self.scale, self.good_steps, self.skipped_steps = scale, int(good), int(skipped)
        self.known_iteration = iteration
        if self.skipped:
            self.skips.append(Skip(iteration, self.skipped_steps, scale))
        if self.exhausted and self.exhausted_at is None:
            self.exhausted_at = Exhausted(iteration, self.used_scale, self.skipped_steps)


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
