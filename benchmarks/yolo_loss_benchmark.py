"""Time of the [yolo] losses per head (YoloLayer.cost), and of their host part, on a backend.

    python benchmarks/yolo_loss_benchmark.py [--backend cpu|gpu] [--precision fp32]
        [--networks yolov4-tiny yolov3-tiny yolov3] [--darknet pjreddie|alexeyab]
        [--batch 64] [--size 416] [--repeats 7]

For each network (cfg/<name>.cfg, trained at --batch and --size, random weights) every [yolo]
head gets a random input (normal, sd 2) through its forward and the benchmark's synthetic truth
(1-8 random boxes per image, detection_benchmark.synthetic_truth). The loss is the one the
written cfg asks for: AlexeyAB's, since training_cfg adds [net] mosaic=0, which only AlexeyAB's
fork reads; --darknet pjreddie picks pjreddie's for the yolov3 cfgs. Printed per head, the best of
--repeats calls, in ms: `cost`, the whole call, synchronised; `host`, what of it is spent outside
the backend's operations (the truth events and their plan, made on the host whatever the
backend; and with truth_thresh < 1 their deltas, computed with numpy); and the time in the
operations, by name (on a GPU an operation that copies to the host also waits there for the
kernels before it; an operation's time includes that of the operations it calls, as the numpy
apply_truth_events_ calls gather_cells).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from detection_benchmark import synthetic_truth, training_cfg  # noqa: E402

from engine import Network  # noqa: E402
from engine.backends import get_backend  # noqa: E402

OPERATIONS = ("truth_overlap", "objectness_delta_", "apply_truth_events_", "gather_cells",
              "scatter_cells_", "sum_of_squares", "int_array", "float64_values", "zeros",
              "to_host", "asarray", "scale_")


class TimedOperations:
    """Wraps a backend's loss operations (on the instance) to add up the time spent in each."""

    def __init__(self, ops):
        self.names = [name for name in OPERATIONS if hasattr(ops, name)]
        self.spent = dict.fromkeys(self.names, 0.0)
        self.outermost = 0.0  # in operations not called by another: what `host` leaves out
        self.depth = 0
        for name in self.names:
            setattr(ops, name, self._timed(name, getattr(ops, name)))

    def _timed(self, name, operation):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.depth += 1
            try:
                result = operation(*args, **kwargs)
            finally:
                self.depth -= 1
            spent = time.perf_counter() - start
            self.spent[name] += spent
            if not self.depth:
                self.outermost += spent
            return result
        return timed


def head_times(ops, layer, truth, repeats):
    """{'cost': ms, 'host': ms, operation: ms}, each the best of `repeats` calls."""
    timer = TimedOperations(ops)
    layer.cost(ops, truth)  # warm: kernels compiled, memory pooled
    best = {}
    for _ in range(repeats):
        timer.spent = dict.fromkeys(timer.names, 0.0)
        timer.outermost = 0.0
        ops.synchronize()
        start = time.perf_counter()
        layer.cost(ops, truth)
        ops.synchronize()
        total = time.perf_counter() - start
        figures = {"cost": total, "host": total - timer.outermost}
        figures.update((name, spent) for name, spent in timer.spent.items() if spent)
        for key, value in figures.items():
            best[key] = min(best.get(key, value), value)
    return {key: value * 1000 for key, value in best.items()}


def run(networks, backend, precision, batch, size, repeats, darknet=None, stream=sys.stdout):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in networks:
            cfg = os.path.join(folder, f"{name}.cfg")
            training_cfg(os.path.join(ROOT, "cfg", f"{name}.cfg"), cfg, batch, size, 1000)
            ops = get_backend(backend, seed=0, precision=precision)
            net = Network(cfg, backend=ops, seed=0, quiet=True, darknet=darknet)
            rng = np.random.default_rng(0)
            truth = synthetic_truth(rng, batch, net.detected_classes, net.truth_boxes)
            for layer in net.cost_layers:
                c, h, w = layer.in_shape
                x = rng.normal(0, 2, (batch, c, h, w)).astype(np.float32)
                layer.forward(ops, ops.asarray(x), True)
                times = head_times(ops, layer, truth, repeats)
                rows.append((name, f"{w}x{h}", times))
                parts = ", ".join(f"{key} {value:.2f}" for key, value in times.items()
                                  if key not in ("cost", "host"))
                print(f"{name} {w}x{h} ({layer.loss_kind}'s loss): cost {times['cost']:.2f} ms, "
                      f"host {times['host']:.2f} ms; operations: {parts}", file=stream)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--precision", default=None)
    parser.add_argument("--networks", nargs="+", default=["yolov4-tiny", "yolov3-tiny", "yolov3"])
    parser.add_argument("--darknet", default=None, choices=("pjreddie", "alexeyab"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    run(args.networks, args.backend, args.precision, args.batch, args.size, args.repeats,
        args.darknet)


if __name__ == "__main__":
    main()
