"""CPU throughput of cfg/mnist.cfg: training (seconds per iteration of batch 128, images/s) and
inference (images/s), for this engine and, when PyTorch is installed, the same network in PyTorch
measured in the same run (a benchmark-only peer, never an engine dependency).

    python benchmarks/cpu_benchmark.py [--iterations 20] [--threads N]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine.train import train_iteration  # noqa: E402
from torch_peers import torch_model  # noqa: E402  (benchmarks/, beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "cfg", "mnist.cfg")


def timed(step, iterations, warmup=3):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - start) / iterations


def engine_figures(images, truth, iterations):
    net = engine.load(CFG, quiet=True)
    train_s = timed(lambda: train_iteration(net, images, truth, 0.01), iterations)
    infer_s = timed(lambda: net.predict(images, batch_size=len(images)), iterations)
    return train_s, infer_s


def torch_figures(images, truth, iterations):
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    model = torch_model("mnist", nn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0005)
    x = torch.from_numpy(images)
    y = torch.from_numpy(truth.argmax(axis=1))
    loss_fn = nn.CrossEntropyLoss()

    def train_step():
        model.train()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(x)

    return timed(train_step, iterations), timed(infer_step, iterations)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    truth = np.eye(10, dtype=np.float32)[rng.integers(0, 10, args.batch)]

    rows = [("engine (numpy)",) + engine_figures(images, truth, args.iterations)]
    peer = torch_figures(images, truth, args.iterations)
    if peer:
        import torch
        rows.append((f"PyTorch {torch.__version__} CPU",) + peer)

    print(f"cfg/mnist.cfg, batch {args.batch}, {os.cpu_count()} CPUs, {args.iterations} iterations")
    print(f"{'':24s} {'train s/iter':>12s} {'train img/s':>12s} {'infer img/s':>12s}")
    for name, train_s, infer_s in rows:
        print(f"{name:24s} {train_s:12.4f} {args.batch / train_s:12.0f} {args.batch / infer_s:12.0f}")
    if peer:
        print(f"{'ratio engine/PyTorch':24s} {'':12s} {rows[1][1] / rows[0][1]:12.2f} "
              f"{rows[1][2] / rows[0][2]:12.2f}   (speed; >1 means the engine is faster)")
    print("target: train <= 0.08 s/iter (3x real Darknet's 0.24 s on these machines)")


if __name__ == "__main__":
    main()
