"""The training loop: learning-rate policies, batches and subdivisions, backups and progress.

One iteration is one update: `batch` images split into `subdivisions` mini-batches whose
gradients accumulate before the layers' update. `seen` counts images, and the batch number used
by the learning-rate policy is seen / batch, as in Darknet (so the first update already counts as
batch 1). Weights are saved as `<backup>/<cfg-name>.backup` every `backup_every` iterations and
on Ctrl-C, and as `<backup>/<cfg-name>_final.weights` at the end.
"""

import math
import os
import sys
import time

import numpy as np

from . import loss_scaling
from .data import HostBatches
from .distributed import SingleProcess
from .errors import BackendError, ConfigError, DataError, NumericalError, TrainingError

SINGLE_PROCESS = SingleProcess()


def learning_rate(options, batch_num, rng=None):
    """Darknet's get_current_rate (src/network.c) for the given batch number."""
    o = options
    if batch_num < o.burn_in:
        return o.learning_rate * (batch_num / o.burn_in) ** o.power
    if o.policy == "constant":
        return o.learning_rate
    if o.policy == "step":
        return o.learning_rate * o.scale ** (batch_num // o.step)
    if o.policy == "steps":
        rate = o.learning_rate
        for step, scale in zip(o.steps, o.scales):
            if step > batch_num:
                return rate
            rate *= scale
        return rate
    if o.policy == "exp":
        return o.learning_rate * o.gamma ** batch_num
    if o.policy == "poly":
        return o.learning_rate * max(1 - batch_num / o.max_batches, 0.0) ** o.power
    if o.policy in ("sig", "sigmoid"):
        exponent = o.gamma * (batch_num - o.step)
        return 0.0 if exponent > 700 else o.learning_rate / (1 + math.exp(exponent))  # no overflow
    if o.policy == "random":
        rng = rng or np.random.default_rng()
        return o.learning_rate * rng.random() ** o.power
    if o.policy == "sgdr":  # AlexeyAB: cosine from learning_rate to learning_rate_min per cycle
        start, cycle = 0, o.sgdr_cycle
        while start + cycle < batch_num:
            start += cycle
            cycle *= o.sgdr_mult
        return o.learning_rate_min + 0.5 * (o.learning_rate - o.learning_rate_min) * (
            1 + math.cos((batch_num - start) * 3.14159265 / cycle))
    raise ValueError(f"unknown policy {o.policy}")


def current_batch(net):
    return net.seen // net.options.batch_size


class BatchSampler:
    """Shuffled passes over a dataset, `batch` indexes at a time, reproducible from a seed."""

    def __init__(self, size, batch, rng):
        self.size, self.batch, self.rng = size, batch, rng
        self.order, self.position = rng.permutation(size), 0

    def next(self):
        if self.size < self.batch:
            # Fewer images than one batch: fill it from successive shuffles, so that every update
            # still sees `batch` images and the iteration count (seen / batch) stays right.
            return np.concatenate([self.rng.permutation(self.size)
                                   for _ in range(-(-self.batch // self.size))])[:self.batch]
        if self.position + self.batch > self.size:
            self.order, self.position = self.rng.permutation(self.size), 0
        indexes = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        return indexes


def train_iteration(net, images, truth, rate, group=SINGLE_PROCESS, run_shard=None):
    """One update with learning rate `rate` on a full batch (numpy images and truth: one-hot
    rows, or a detector's box rows).
    Returns the loss per image.

    With several ranks each takes its shard of the batch. `run_shard(images, truth, rate)` runs
    this rank's part of the iteration and returns its summed loss: by default eagerly
    (run_eagerly); CapturedSteps replays a recording of it instead. The bookkeeping around it
    (sharding, `seen`, the loss over the ranks, the loss scaler's read of its state) is the
    same either way.
    """
    shard = group.shard(len(images))
    if run_shard is None:
        def run_shard(images, truth, rate):
            return run_eagerly(net, images, truth, rate, group)
    scaler = net.loss_scaler  # loss scaling: its state lives and moves on on the backend
    if scaler is None:
        loss = run_shard(images[shard], truth[shard], rate)
    else:
        scaler.start(net.ops)
        # an overflow is expected there and handled (the step skipped): no numpy warnings
        with np.errstate(over="ignore", invalid="ignore"):
            loss = run_shard(images[shard], truth[shard], rate)
    net.seen += len(truth)  # a skipped step still counts as an iteration
    if scaler is not None:  # the state's read starts; earlier ones are taken as they arrive
        scaler.finish_iteration(net.ops, current_batch(net))
    return group.allreduce_sum(loss) / len(truth)


def run_eagerly(net, images, truth, rate, group):
    """This rank's share of an iteration, operation by operation: `subdivisions` passes (numpy
    arrays in, copied to the backend one mini-batch at a time)."""
    ops = net.ops
    mini_batch = max(len(images) // net.options.subdivisions, 1)
    passes = ((ops.asarray(images[start:start + mini_batch]),
               ops.asarray(truth[start:start + mini_batch]))
              for start in range(0, len(images), mini_batch))
    return accumulate_and_update(net, passes, rate, group)


def accumulate_and_update(net, passes, rate, group):
    """What an iteration computes on the backend, and what a recorded iteration replays: a
    forward/backward per (images, truth) pass, whose gradients accumulate, the gradients summed
    over the ranks, and the update. Returns the summed loss of this rank's passes."""
    total = 0.0
    for x, t in passes:
        total += net.train_step(x, t)
    group.allreduce_updates(net)
    net.update(rate)
    return total


class EagerSteps:
    """Every iteration issued operation by operation: works on every backend."""

    def __init__(self, net, group):
        self.net, self.group = net, group

    def __call__(self, images, truth, rate):
        return train_iteration(self.net, images, truth, rate, self.group)


class CapturedSteps(EagerSteps):
    """On a backend that can record a whole iteration and replay it (the CUDA backend's graphs),
    iterations after the first replay one recording: one launch instead of hundreds, which is
    what bounds small networks and small per-GPU batches. A recording reads fixed buffers, so
    each iteration's images are copied into the same device arrays, and the learning rate and
    dropout seed come from device memory. Used when the batch is one pass (subdivisions=1)."""

    def __init__(self, net, group):
        super().__init__(net, group)
        self.recording = None
        self.eager_iterations = 1  # the first makes the plans and buffers a recording needs

    def _record(self, images, truth):
        net, group, ops = self.net, self.group, self.net.ops
        self.images, self.truth = ops.asarray(images), ops.asarray(truth)
        # the recorded update reads each replay's rate from the device
        passes = [(self.images, self.truth)]
        try:
            self.recording = ops.capture(lambda: accumulate_and_update(net, passes, 0.0, group))
        except BackendError as error:
            self._without_recordings(error)

    def _without_recordings(self, error):
        print(f"Training without CUDA graphs ({error})", file=sys.stderr)
        self.eager_iterations = math.inf

    def __call__(self, images, truth, rate):
        if self.eager_iterations > 0:
            self.eager_iterations -= 1
            return super().__call__(images, truth, rate)
        return train_iteration(self.net, images, truth, rate, self.group, self._replay)

    def _replay(self, images, truth, rate):
        """This rank's share of the iteration, replayed (recorded on first use)."""
        ops = self.net.ops
        if self.recording is None:
            self._record(images, truth)
            if self.recording is None:
                return run_eagerly(self.net, images, truth, rate, self.group)
        else:
            ops.set_(self.images, images, early=True)  # overlaps the last backward
            ops.set_(self.truth, truth)
        self.recording.replay(rate)
        return self.recording.last_cost()


class SplitCapturedSteps(CapturedSteps):
    """Recorded iterations for losses with a part on the host ([yolo] heads with truth_thresh <
    1: predictions past it add events, handled in numpy, engine/layers/yolo.py), where a batch
    is one pass: two recordings, the forward with each loss's backend part (device_cost), and
    the backward with the update; between their replays each loss's host part (finish_cost)
    runs eagerly, a few kernels and small copies, its share that needs the truth alone
    (plan_cost) while the forward's replay runs.
    What the recordings save is the host's cost per operation: cuDNN's legacy calls take about
    180 µs each on an H200's host, 62 of them per yolov4-tiny step."""

    def __init__(self, net, group):
        super().__init__(net, group)
        self.forward = self.backward = None

    def _forward_part(self):
        self.net.forward(self.images, train=True)
        self.states = [layer.device_cost(self.net.ops, self.truth)
                       for layer in self.net.cost_layers]

    def _backward_part(self):
        self.net.backward(self.seeds)
        self.group.allreduce_updates(self.net)
        self.net.update(0.0)  # the recorded update reads each replay's rate from the device

    def _replay(self, images, truth, rate):
        net, ops = self.net, self.net.ops
        if self.forward is None:
            self.images, self.truth = ops.asarray(images), ops.asarray(truth)
            try:
                self.forward = ops.capture(self._forward_part)
            except BackendError as error:
                self._without_recordings(error)
                return run_eagerly(net, images, truth, rate, self.group)
        else:
            ops.set_(self.images, images, early=True)  # overlaps the last backward
            ops.set_(self.truth, truth)
        self.forward.replay(rate)
        # the host's share that needs the truth alone, while the device runs the forward
        plans = [layer.plan_cost(ops, truth, state)
                 for layer, state in zip(net.cost_layers, self.states)]
        costs, self.seeds = [], {}
        for layer, state, plan in zip(net.cost_layers, self.states, plans):
            cost, self.seeds[layer.index] = layer.finish_cost(ops, truth, state, plan)
            costs.append(cost)
        cost = costs[0] if len(costs) == 1 else sum(costs) / len(costs)  # as Network.train_step
        if self.backward is None:
            try:
                self.backward = ops.capture(self._backward_part)
            except BackendError as error:  # this iteration's backward and update, eagerly
                self._without_recordings(error)
                net.backward(self.seeds)
                self.group.allreduce_updates(net)
                net.update(rate)
                return cost
        self.backward.replay(rate)
        return cost


class PlannedCapturedSteps(CapturedSteps):
    """Recorded iterations of a detector whose every [yolo] head applies its truths on the
    backend (YoloLayer.truth_on_device), where a batch is one pass: one recording per iteration,
    as CapturedSteps. Before each replay each head's plan (which cells its truths' events touch:
    YoloLayer.truth_plan) is made on the host from the host truth, while the images cross the
    bus, and copied into the recording's fixed buffer with the images and the truth. The cost
    comes from each head's statistics (truth_cost), read as soon as the replay has computed them
    (ops.host_reader): the replay's backward and update still run while the next batch is
    fetched and starts crossing the bus."""

    def _record(self, images, truth, plans):
        ops = self.net.ops
        self.images, self.truth = ops.asarray(images), ops.asarray(truth)
        self.plans = [ops.int_array(plan.packed) for plan in plans]
        try:
            self.recording = ops.capture(self._step)
        except BackendError as error:
            self._without_recordings(error)

    def _step(self):
        """The recorded iteration; `states` and `statistics` (readers of the heads' statistics)
        are the recording's (each replay refreshes them; the numpy stand-in in the tests reruns
        this instead)."""
        net, ops = self.net, self.net.ops
        net.forward(self.images, train=True)
        seeds, self.states, self.statistics = {}, [], []
        for layer, plan in zip(net.cost_layers, self.plans):
            state = layer.device_cost(ops, self.truth)
            statistics, seeds[layer.index] = layer.device_truth_cost(ops, state, plan)
            self.states.append(state)
            self.statistics.append(ops.host_reader(statistics))
        net.backward(seeds)
        self.group.allreduce_updates(net)
        net.update(0.0)  # the recorded update reads each replay's rate from the device

    def _replay(self, images, truth, rate):
        net, ops = self.net, self.net.ops
        if self.recording is None:
            plans = [layer.truth_plan(ops, truth, len(images)) for layer in net.cost_layers]
            self._record(images, truth, plans)
            if self.recording is None:
                return run_eagerly(net, images, truth, rate, self.group)
        else:
            ops.set_(self.images, images, early=True)  # overlaps the last backward and the plans
            plans = [layer.truth_plan(ops, truth, len(images)) for layer in net.cost_layers]
            ops.set_(self.truth, truth)
        for buffer, plan in zip(self.plans, plans):
            ops.set_(buffer, plan.packed)
        self.recording.replay(rate)
        costs = [layer.truth_cost(state, statistics.values())
                 for layer, state, statistics in zip(net.cost_layers, self.states,
                                                     self.statistics)]
        return costs[0] if len(costs) == 1 else sum(costs) / len(costs)  # as Network.train_step


def iteration_runner(net, group):
    """Where the backend can record iterations and a batch is one pass: CapturedSteps when
    every loss runs on the device, PlannedCapturedSteps when every loss is a [yolo] head whose
    truth part runs on the backend from a plan made on the host (truth_on_device),
    SplitCapturedSteps when a loss has a host part it can split off (device_cost /
    finish_cost: [yolo] heads with truth_thresh < 1); else EagerSteps."""
    if net.ops.can_record and net.options.subdivisions == 1:
        losses = net.cost_layers
        if not any(getattr(layer, "host_cost", False) for layer in losses):
            return CapturedSteps(net, group)
        if all(getattr(layer, "truth_on_device", False) for layer in losses):
            return PlannedCapturedSteps(net, group)
        if all(hasattr(layer, "device_cost") for layer in losses):
            return SplitCapturedSteps(net, group)
    return EagerSteps(net, group)


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def progress_bar(done, total, elapsed, width=20):
    fraction = done / total if total else 1.0
    filled = int(round(width * fraction))
    eta = elapsed / done * (total - done) if done else 0.0
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% ETA {format_duration(eta)}"


def next_learning_rate(net, rng=None):
    """The rate of the coming update: Darknet counts the batch being trained (seen already
    includes it when the update runs)."""
    return learning_rate(net.options, current_batch(net) + 1, rng)


def scaling_note(scaler):
    """The iteration line's note on loss scaling: the latest scale the host knows of (on a GPU
    an iteration or two behind the device's)."""
    return "" if scaler is None else f", loss scale {scaler.scale:g}"


def skip_line(skip):
    """A skipped step's own line, printed once the host knows of it (engine/loss_scaling.py)."""
    return (f"iteration {skip.iteration}: gradients overflowed, step skipped "
            f"({skip.skipped_steps} so far); loss scale now {skip.scale:g}")


def report_skips(scaler, stream, in_place):
    """A line for each skipped step the host has learned of since the last call (to `stream`,
    None on the ranks that do not print); on a terminal below the line rewritten in place."""
    for skip in scaler.take_skips() if scaler is not None else ():
        if stream is not None:
            print(f"\n{skip_line(skip)}" if in_place else skip_line(skip), file=stream,
                  flush=True)


class Checkpoints:
    """Training's saves. Weights that are no longer finite are never written, so a run that
    diverges leaves its last good backup in place, and the error says which file that is."""

    def __init__(self, net, enabled):
        self.net, self.enabled = net, enabled  # only rank 0 writes
        self.last = None  # (iteration, path) of this run's last good save

    def save(self, path):
        if not self.enabled:
            return
        try:
            self.net.save_weights(path)
        except NumericalError:
            raise self.diverged("the weights became NaN or infinite") from None
        self.last = (current_batch(self.net), path)

    def diverged(self, what, iteration=None):
        """The divergence error of `iteration` (by default the latest)."""
        kept = (f"the last good weights are {self.last[1]} (iteration {self.last[0]})"
                if self.last else "no weights were saved in this run")
        # fp16 holds nothing above 65504 (engine/precision.py); bf16 has float32's range.
        fp16 = " or --precision bf16" if self.net.ops.precision == "fp16" else ""
        iteration = current_batch(self.net) if iteration is None else iteration
        return TrainingError(f"{what} at iteration {iteration}; {kept}; try a "
                             f"lower learning_rate or a longer burn_in{fp16}")


def check_loss_scale(scaler, checkpoints, group, iteration=None):
    """The divergence error once dynamic scaling is known to have fallen below its floor. With
    several ranks only once every rank knows it (reads MAX_LAG iterations old are taken on
    every rank), so that they stop at the same iteration; `iteration` None: at the end, when
    every read is taken."""
    floor = scaler.exhausted_at if scaler is not None else None
    if floor is None or (group.size > 1 and iteration is not None
                         and floor.iteration > iteration - loss_scaling.MAX_LAG):
        return
    raise checkpoints.diverged(f"the gradients overflowed at every loss scale down to "
                               f"{floor.last_scale:g} ({floor.skipped_steps} steps skipped)",
                               floor.iteration)


def train(net, dataset, backup_dir, max_batches=None, seed=0, backup_every=100, stream=None,
          group=SINGLE_PROCESS, after_iteration=None, loss_scale=None):
    """Train `net` on `dataset` until max_batches; returns the path of the final weights.
    With a process group of several ranks, only rank 0 prints and writes weights.
    On a terminal the iteration line is rewritten in place; otherwise one line per iteration.
    `after_iteration(iteration, loss, average_loss, last)`, if given, runs on rank 0 after each
    iteration (engine train's --map and chart.png); what it returns, if anything, is printed.
    `loss_scale`: 'dynamic', 'none', a positive number (static) or a loss_scaling.LossScaler;
    None: the cfg's [net] loss_scale if set, else dynamic in fp16 (engine/loss_scaling.py)."""
    stream = stream if stream is not None else sys.stdout  # looked up now, so redirection works
    if getattr(net, "folded", False):
        raise TrainingError(f"{net.cfg_path}: this network's batch norms were folded for inference "
                            "(fold_batchnorm); build it again to train it")
    o = net.options
    leader = group.rank == 0
    if max_batches is not None and max_batches != o.max_batches:
        # The run's end is the schedule's end too (poly falls to 0 there), as if the cfg said so.
        if leader and o.max_batches:
            print(f"max_batches={max_batches} for this run (the cfg says {o.max_batches}), in "
                  "the learning-rate schedule too", file=stream, flush=True)
        o.max_batches = max_batches
    max_batches = o.max_batches
    if max_batches <= 0:
        raise ConfigError(f"{net.cfg_path}: max_batches must be positive (set it in [net] or "
                          "pass --max-batches)")
    for key, value in o.untrainable.items():
        raise o.section.error(f"{key}={value}: training with this AlexeyAB option is not "
                              "implemented", key)
    for layer in net.layers:  # options whose training the engine lacks: one line, before any work
        if hasattr(layer, "check_trainable"):
            layer.check_trainable()
    if current_batch(net) >= max_batches:
        raise TrainingError(f"{net.cfg_path}: nothing to train: the weights have been trained "
                            f"for {current_batch(net)} iterations and max_batches is {max_batches}; "
                            "raise --max-batches to go on, or pass --clear to start the schedule "
                            "over (fine-tuning)")
    dataset.check_network(net)
    scaler = loss_scaling.scaler_for(net, loss_scale)
    base = os.path.splitext(os.path.basename(net.cfg_path))[0]
    backup_path = os.path.join(backup_dir, f"{base}.backup")
    final_path = os.path.join(backup_dir, f"{base}_final.weights")
    # Every rank draws the same batches (and random-policy rates); dropout differs per rank.
    if len(dataset) == 0:
        raise DataError(f"{dataset.name}: no images to train on")
    rng = np.random.default_rng(seed)
    policy_rng = np.random.default_rng([seed, 1])
    net.ops.seed(seed + 1000003 * group.rank)
    sampler = BatchSampler(len(dataset), o.batch_size, rng)
    net.check_memory(o.mini_batch, train=True)
    run_iteration = iteration_runner(net, group)
    checkpoints = Checkpoints(net, enabled=leader)
    average_loss = None
    start_batch, started = current_batch(net), time.time()
    # A dataset that can prepare batches ahead (in worker processes) hands them over in order,
    # a detection set in arrays the backend copies in fastest.
    if hasattr(dataset, "host_batches"):
        dataset.host_batches = HostBatches(net.ops.host_empty)
    prepared = dataset.batches(sampler) if hasattr(dataset, "batches") else None
    multiscale = getattr(dataset, "multiscale", None)  # random=1: batches come in several sizes
    if multiscale:
        from .multiscale import resize_network

        initial_size = o.width, o.height
        multiscale.start(start_batch, max_batches)
    in_place = leader and hasattr(stream, "isatty") and stream.isatty()
    if leader and scaler is not None:
        print(f"Loss scaling: {scaler.describe()}", file=stream, flush=True)
    net.loss_scaler = scaler
    try:
        while current_batch(net) < max_batches:
            tick = time.time()
            images, truth = next(prepared) if prepared else dataset.training_batch(sampler.next())
            if multiscale and images.shape[2:] != (o.height, o.width):
                resize_network(net, images.shape[3], images.shape[2])
                run_iteration = iteration_runner(net, group)  # recordings hold the old shapes
            rate = next_learning_rate(net, policy_rng)
            loss = run_iteration(images, truth, rate)
            if not math.isfinite(loss):
                raise checkpoints.diverged(f"the loss became {loss}")
            batch_num = current_batch(net)
            average_loss = loss if average_loss is None else 0.9 * average_loss + 0.1 * loss
            if leader:
                bar = progress_bar(batch_num - start_batch, max_batches - start_batch,
                                   time.time() - started)
                line = (f"{batch_num}, {net.seen / len(dataset):.3f}: {loss:f}, {average_loss:f} avg, "
                        f"{rate:f} rate, {time.time() - tick:f} seconds, {net.seen} images"
                        f"{scaling_note(scaler)}  {bar}")
                print(f"\r{line}\x1b[K" if in_place else line, end="" if in_place else "\n",
                      file=stream, flush=True)
            report_skips(scaler, stream if leader else None, in_place)
            check_loss_scale(scaler, checkpoints, group, batch_num)
            if backup_every and batch_num % backup_every == 0:
                checkpoints.save(backup_path)
            report = after_iteration(batch_num, loss, average_loss, batch_num >= max_batches) \
                if after_iteration and leader else None
            if report:
                print(f"\n{report}" if in_place else report, file=stream, flush=True)
    except KeyboardInterrupt:
        checkpoints.save(backup_path)
        if leader:
            print(f"\nInterrupted at iteration {current_batch(net)}: weights saved to {backup_path}",
                  file=stream, flush=True)
        raise
    finally:
        net.loss_scaler = None  # the network's own backward and update again
        if prepared:
            prepared.close()  # stops the worker processes
    if scaler is not None:  # every read of the loss scale's state taken: the counts exact
        scaler.settle()
        report_skips(scaler, stream if leader else None, in_place)
        check_loss_scale(scaler, checkpoints, group)
    if multiscale:
        resize_network(net, *initial_size)
    group.check_replicas(net)
    checkpoints.save(final_path)
    if leader:
        print(f"{chr(10) if in_place else ''}Saved {final_path}", file=stream, flush=True)
    return final_path


def evaluate(net, dataset, top=2, batch_size=500):
    """(top-1 accuracy, top-k accuracy) of `net` on `dataset`."""
    top = max(1, min(top, dataset.classes))
    hits1 = hitsk = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset.batch(slice(start, start + batch_size))
        probabilities = net.predict(images, batch_size=batch_size)
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
        hits1 += int((ranked[:, 0] == labels).sum())
        hitsk += int((ranked == labels[:, None]).any(axis=1).sum())
    return hits1 / len(dataset), hitsk / len(dataset)
