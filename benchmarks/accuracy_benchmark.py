"""MNIST test accuracy of cfg/mnist.cfg's whole recipe (2000 iterations) over several seeds: this
engine, and the same network and recipe in PyTorch (a benchmark-only peer) in the same run.

One seed's top-1 says little: with this recipe the seeds spread over about +-0.1 point, so the
table gives every seed, then the mean, the spread and how many seeds reach a bar (99.3% here).
The PyTorch peer follows the cfg exactly: Darknet's initial values, SGD with momentum 0.9 and
decay 0.0005 on weights only, poly learning rate (power 2) from 0.1, BN momentum 0.01, dropout
0.5, the same shuffled passes over the training set for a seed, exact float32 (no TF32).

    python benchmarks/accuracy_benchmark.py [--seeds 8] [--first 0] [--cpu | --gpu N] [--no-torch]

On the CPU one engine seed takes minutes; on a GPU seconds.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine import Network  # noqa: E402
from engine.backends import get_backend  # noqa: E402
from engine.data import DataConfig  # noqa: E402
from engine.train import BatchSampler, evaluate, learning_rate, train  # noqa: E402
from torch_peers import darknet_init, darknet_sgd, torch_model  # noqa: E402  (beside this script)

CFG = os.path.join(ROOT, "cfg", "mnist.cfg")
BAR = 99.3


def engine_top1(backend_name, device, seed, train_set, test_set, max_batches):
    net = Network(CFG, backend=get_backend(backend_name, device=device, seed=seed), seed=seed,
                  quiet=True)
    with tempfile.TemporaryDirectory() as backup, open(os.devnull, "w") as quiet:
        train(net, train_set, backup, max_batches=max_batches, seed=seed, backup_every=0,
              stream=quiet)
    return 100 * evaluate(net.fold_batchnorm(), test_set)[0]


def torch_top1(torch, nn, device, seed, train_set, test_set, options):
    """cfg/mnist.cfg's recipe in PyTorch; batches from the engine's sampler for this seed."""
    torch.manual_seed(seed)  # dropout masks
    model = darknet_init(torch_model("mnist", nn), torch, nn, np.random.default_rng(seed)).to(device)
    optimizer = darknet_sgd(model, torch, options.learning_rate, options.momentum, options.decay)
    images = torch.as_tensor(train_set.images, device=device)
    labels = torch.as_tensor(train_set.labels, device=device)
    sampler = BatchSampler(len(train_set), options.batch_size, np.random.default_rng(seed))
    model.train()
    for batch_num in range(1, options.max_batches + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(options, batch_num)
        indexes = torch.as_tensor(sampler.next(), device=device)
        loss = nn.functional.cross_entropy(model(images[indexes]), labels[indexes])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, len(test_set), 1000):
            x = torch.as_tensor(test_set.images[start:start + 1000], device=device)
            predicted = model(x).argmax(1).cpu().numpy()
            hits += int((predicted == test_set.labels[start:start + 1000]).sum())
    return 100 * hits / len(test_set)


def summary(name, values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    reached = sum(value >= BAR for value in values)
    return (f"{name:<28} mean {statistics.mean(values):6.2f}%  sd {spread:4.2f}  "
            f"min {min(values):6.2f}  max {max(values):6.2f}  >= {BAR}%: {reached}/{len(values)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="how many seeds (default 8)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="the engine on the CPU")
    where.add_argument("--gpu", type=int, default=0, metavar="N", help="the engine on GPU N")
    parser.add_argument("--no-torch", action="store_true", help="leave the PyTorch peer out")
    parser.add_argument("--max-batches", type=int, help="a shorter run than the cfg's (a smoke test)")
    args = parser.parse_args()

    backend_name = "cpu" if args.cpu else "gpu"
    data = DataConfig(os.path.join(ROOT, "cfg", "mnist.data"))
    reference = Network(CFG, quiet=True)
    train_set = data.dataset("train", reference.input_shape)
    test_set = data.dataset("valid", reference.input_shape)
    options = reference.options
    options.max_batches = args.max_batches or options.max_batches

    torch = nn = None
    if not args.no_torch:
        try:
            import torch
            from torch import nn
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        except ImportError:
            print("PyTorch is not installed: the engine alone\n")
    torch_device = ("cuda" if torch.cuda.is_available() and not args.cpu else "cpu") if torch else None

    engine_name = f"engine ({'CPU' if args.cpu else f'GPU {args.gpu}'})"
    peer_name = f"PyTorch {torch.__version__} ({torch_device})" if torch else None
    print(f"cfg/mnist.cfg, {options.max_batches} iterations of batch {options.batch_size}; "
          f"top-1 on the {len(test_set)} test images\n")
    print(f"{'seed':>4}  {'engine':>8} {'s':>6}" + (f"  {'PyTorch':>8} {'s':>6}" if torch else ""))
    ours, theirs = [], []
    for seed in range(args.first, args.first + args.seeds):
        started = time.time()
        ours.append(engine_top1(backend_name, args.gpu, seed, train_set, test_set,
                                options.max_batches))
        line = f"{seed:4d}  {ours[-1]:7.2f}% {time.time() - started:6.1f}"
        if torch:
            started = time.time()
            theirs.append(torch_top1(torch, nn, torch_device, seed, train_set, test_set, options))
            line += f"  {theirs[-1]:7.2f}% {time.time() - started:6.1f}"
        print(line, flush=True)
    print()
    print(summary(engine_name, ours))
    if theirs:
        print(summary(peer_name, theirs))
        print(f"{'mean difference engine - PyTorch':<28} "
              f"{statistics.mean(ours) - statistics.mean(theirs):+.3f} points")


if __name__ == "__main__":
    main()
