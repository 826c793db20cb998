"""Data-parallel scaling of training: images/s with 1, 2, 4... ranks (one GPU each, or CPU
ranks with --cpu) on synthetic data, and efficiency = rate_N / (N * rate_1).

    python benchmarks/scaling_benchmark.py --cfg cfg/cifar.cfg --ranks 1,2 [--cpu] [--iterations 30]

The driver starts `mpiexec -n N` of itself for each N; each run prints one line that the
driver collects into a table. Two tables: strong scaling (the cfg's batch split over the ranks,
what `engine train` does) and weak scaling (each rank keeps the cfg's batch, so the global batch
grows with N), with the time the gradient all-reduce takes per iteration.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(args):
    import engine
    from engine import distributed
    from engine.train import iteration_runner

    group = distributed.process_group()
    backend = "cpu" if args.cpu else "gpu"
    net = engine.load(args.cfg, backend=backend, device=group.rank, quiet=True)
    group.adopt(net)
    if args.weak:  # every rank keeps the cfg's batch: the global batch is N times larger
        net.options.batch_size *= group.size
    rng = np.random.default_rng(0)
    batch = net.options.batch_size
    classes = net.output_layer.outputs
    images = rng.random((batch,) + net.input_shape, dtype=np.float32)
    truth = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)]
    step = iteration_runner(net, group)  # what engine train uses: CUDA graphs where it can
    for _ in range(args.warmup):
        step(images, truth, 0.001)
    net.ops.synchronize()
    group.allreduce_sum(0)  # start timing together
    started = time.perf_counter()
    for _ in range(args.iterations):
        step(images, truth, 0.001)
    net.ops.synchronize()
    elapsed = group.comm.allreduce(time.perf_counter() - started, op=group.mpi.MAX) \
        if group.size > 1 else time.perf_counter() - started
    allreduce_ms = 0.0
    if group.size > 1:  # the all-reduce alone, for the record
        net.ops.synchronize()
        started = time.perf_counter()
        for _ in range(args.iterations):
            group.allreduce_updates(net)
        net.ops.synchronize()
        allreduce_ms = 1000 * (time.perf_counter() - started) / args.iterations
    if group.rank == 0:
        print(f"RESULT ranks={group.size} images_per_s={args.iterations * batch / elapsed:.1f} "
              f"allreduce_ms={allreduce_ms:.3f}", flush=True)


def measure(args, n, weak):
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--cfg", args.cfg,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    command += (["--cpu"] if args.cpu else []) + (["--weak"] if weak else [])
    if n > 1:
        command = [mpiexec, "-n", str(n)] + command
    result = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        print(f"{n} ranks failed:\n{result.stderr[-2000:]}")
        return None
    fields = dict(item.split("=") for item in line.split()[1:])
    return float(fields["images_per_s"]), float(fields["allreduce_ms"])


def driver(args):
    device = "CPU ranks" if args.cpu else "GPUs"
    for weak, title in ((False, "strong scaling: the cfg's batch split over the ranks"),
                        (True, "weak scaling: each rank trains the cfg's batch")):
        results = {n: measure(args, n, weak) for n in args.ranks}
        print(f"{args.cfg}: training images/s by number of {device}, {title}")
        print(f"{'ranks':>6s} {'images/s':>10s} {'efficiency':>11s} {'all-reduce ms':>14s}")
        for n, result in results.items():
            if result is None:
                continue
            rate, allreduce_ms = result
            efficiency = rate / (n * results[1][0]) if results.get(1) else float("nan")
            print(f"{n:6d} {rate:10.0f} {efficiency:11.2f} {allreduce_ms:14.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default=os.path.join(ROOT, "cfg", "cifar.cfg"))
    parser.add_argument("--ranks", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
