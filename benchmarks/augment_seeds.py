"""MNIST top-1 of a classifier cfg's whole recipe over several seeds, each seed trained and tested
by the engine's own commands in its own process: `engine train CFG --seed S` then `engine test`.

Made for cfg/mnist-augment.cfg (classifier augmentation), whose bar is a mean top-1 of at least
99.5% over 8 seeds. With --parallel K, K seeds train at once as separate processes (sharing the
one GPU, or the CPU's cores); each process augments its batches in its own worker processes, so
on a GPU machine K is bounded by the CPU cores (about 4 workers per seed) more than by the GPU.

    python benchmarks/augment_seeds.py [--cfg cfg/mnist-augment.cfg] [--data D] [--seeds 8]
        [--first 0] [--cpu | --gpu N] [--parallel K] [--max-batches N] [--bar 99.5] [--keep DIR]

It prints a line per seed as it finishes, then the table in seed order (top-1, training seconds,
seconds in all), the mean, sd, min and max, and whether the mean reaches the bar. The exit status
is 1 when a seed's training or test failed (its last error line is printed), else 0.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))"
TOP1 = re.compile(r"top-1 ([0-9.]+)%")
TRAINED = re.compile(r"Trained [0-9]+ images.* in ([0-9.]+) s")


class SeedRun:
    def __init__(self, seed):
        self.seed, self.top1, self.train_s, self.total_s, self.error = seed, None, None, None, None


def engine(args, env):
    """One engine command in a fresh interpreter (this checkout's engine package)."""
    return subprocess.run([sys.executable, "-c", ENGINE, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def last_error(result):
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def run_seed(seed, options, folder, env):
    """Train and test one seed; its weights go to folder/seed-S/."""
    run = SeedRun(seed)
    backup = os.path.join(folder, f"seed-{seed}")
    device = ["--cpu"] if options.cpu else ["--gpu", str(options.gpu)]
    data = ["--data", options.data] if options.data else []
    limit = ["--max-batches", str(options.max_batches)] if options.max_batches else []
    started = time.time()
    trained = engine(["train", options.cfg, *data, *device, "--seed", str(seed), "--backup", backup,
                      *limit], env)
    if trained.returncode != 0:
        run.error = f"train: {last_error(trained)}"
        return run
    found = TRAINED.search(trained.stdout)
    run.train_s = float(found.group(1)) if found else None
    weights = os.path.join(backup, os.path.splitext(os.path.basename(options.cfg))[0]
                           + "_final.weights")
    tested = engine(["test", options.cfg, weights, *data, *device], env)
    run.total_s = time.time() - started
    found = TOP1.search(tested.stdout)
    if tested.returncode != 0 or not found:
        run.error = f"test: {last_error(tested)}"
        return run
    run.top1 = float(found.group(1))
    return run


def row(run):
    if run.error:
        return f"{run.seed:4d}  failed: {run.error}"
    train_s = f"{run.train_s:8.1f}" if run.train_s is not None else f"{'?':>8}"
    return f"{run.seed:4d}  {run.top1:6.2f}%  {train_s}  {run.total_s:8.1f}"


def summary(runs, bar):
    values = [run.top1 for run in runs if run.error is None]
    if not values:
        return ["no seed finished"]
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return [f"mean {mean:.3f}%  sd {spread:.3f}  min {min(values):.2f}%  max {max(values):.2f}%  "
            f"({len(values)} seeds)",
            f"mean >= {bar}%: {'yes' if mean >= bar else 'NO'}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default=os.path.join(ROOT, "cfg", "mnist-augment.cfg"),
                        help="the classifier cfg (default cfg/mnist-augment.cfg)")
    parser.add_argument("--data", help="the .data file (default: the one beside the cfg)")
    parser.add_argument("--seeds", type=int, default=8, help="how many seeds (default 8)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="train on the CPU")
    where.add_argument("--gpu", type=int, default=0, metavar="N", help="train on GPU N (default 0)")
    parser.add_argument("--parallel", type=int, default=1, metavar="K",
                        help="seeds trained at once, each its own process (default 1)")
    parser.add_argument("--max-batches", type=int,
                        help="a shorter run than the cfg's (a smoke test)")
    parser.add_argument("--bar", type=float, default=99.5, help="the mean top-1 to reach (99.5)")
    parser.add_argument("--keep", metavar="DIR", help="keep each seed's weights in DIR/seed-S/")
    options = parser.parse_args(argv)
    if options.seeds < 1 or options.parallel < 1:
        parser.error("--seeds and --parallel must be at least 1")
    options.cfg = os.path.abspath(options.cfg)
    options.data = os.path.abspath(options.data) if options.data else None

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    # Several BLAS-using processes on a few cores: OpenBLAS's own threads would spin against
    # each other (the engine's CPU backend has its own threads for that, ENGINE_CPU_THREADS).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")

    seeds = range(options.first, options.first + options.seeds)
    where_name = "CPU" if options.cpu else f"GPU {options.gpu}"
    schedule = f", --max-batches {options.max_batches}" if options.max_batches else ""
    print(f"{os.path.relpath(options.cfg, ROOT)}: {options.seeds} seeds on the {where_name}, "
          f"{options.parallel} at a time{schedule}", flush=True)
    started = time.time()
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as scratch:
        folder = options.keep or scratch

        def one(seed):
            run = run_seed(seed, options, folder, env)
            with lock:
                print(f"  done: {row(run)}", flush=True)
            return run

        with ThreadPoolExecutor(options.parallel) as pool:
            runs = list(pool.map(one, seeds))
    print(f"\n{'seed':>4}  {'top-1':>7}  {'train s':>8}  {'total s':>8}")
    for run in runs:
        print(row(run))
    print()
    for line in summary(runs, options.bar):
        print(line)
    print(f"wall time {time.time() - started:.1f} s")
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
