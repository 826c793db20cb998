"""GPU throughput of cfg/mnist.cfg and cfg/cifar.cfg: this engine against the same networks in
PyTorch (a benchmark-only peer, imported only here), with the data already on the GPU.

For each network: training images/s (batch 128: forward, backward, SGD update), inference
images/s (batch 128), latency at batch 1, and peak GPU memory, with the ratio engine/PyTorch
(for latency, PyTorch/engine, so > 1 means the engine is faster everywhere).

The engine runs eagerly (each operation issued from Python, as `engine train` does, reading the
loss every step) and as a captured CUDA graph replayed per step. Convolutions may use TF32 in
the engine here (allow_tf32=True), as PyTorch's cuDNN convolutions do by default; the eager
exact-float32 row shows the default.

    python benchmarks/gpu_benchmark.py [--seconds 2]
"""

import argparse
import gc
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine import Network  # noqa: E402
from engine.backends.cuda import CudaBackend  # noqa: E402
from torch_peers import torch_model  # noqa: E402  (benchmarks/, beside this script)

BATCH = 128


def rate(step, sync, seconds, warmup=3):
    """Steps per second of step(), timed for about `seconds` after a warm-up."""
    for _ in range(warmup):
        step()
    sync()
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            step()
        count += 10
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


# ---- the engine ------------------------------------------------------------------------------------
def engine_figures(cfg, ops, seconds, graphs=True):
    gc.collect()
    ops.device.pool.free_held()  # so managed_bytes below counts this run's memory only
    net = Network(cfg, backend=ops, seed=0, quiet=True)
    rng = np.random.default_rng(0)
    shape = net.input_shape
    x = ops.asarray(rng.random((BATCH,) + shape, dtype=np.float32))
    truth = ops.asarray(np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)])
    x1 = ops.asarray(rng.random((1,) + shape, dtype=np.float32))
    lr = 0.001
    figures = {}

    def train_step():
        net.train_step(x, truth)  # reads the loss back, like a real training loop
        net.update(lr)

    figures["train"] = BATCH * rate(train_step, ops.synchronize, seconds)
    figures["infer"] = BATCH * rate(lambda: net.forward(x, train=False), ops.synchronize, seconds)
    figures["latency_ms"] = 1e3 / rate(lambda: ops.to_host(net.forward(x1, train=False)),
                                       ops.synchronize, seconds)
    if graphs:
        step = ops.capture(lambda: (net.train_step(x, truth), net.update(lr)))
        figures["train_graph"] = BATCH * rate(lambda: step.replay(lr), ops.synchronize, seconds)
        net.forward(x, train=False)
        infer = ops.capture(lambda: net.forward(x, train=False))
        figures["infer_graph"] = BATCH * rate(infer.replay, ops.synchronize, seconds)
        net.forward(x1, train=False)
        single = ops.capture(lambda: net.forward(x1, train=False))
        output = single.result

        def one():
            single.replay()
            ops.to_host(output)
        figures["latency_graph_ms"] = 1e3 / rate(one, ops.synchronize, seconds)
    ops.synchronize()
    figures["memory_mb"] = ops.device.pool.managed_bytes / 2**20 \
        if hasattr(ops.device.pool, "managed_bytes") else float("nan")
    return figures


# ---- PyTorch ---------------------------------------------------------------------------------------
def torch_figures(name, shape, seconds):
    import torch
    from torch import nn

    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    model = torch_model(name, nn).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0005)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x = torch.rand((BATCH,) + shape, device=device)
    labels = torch.randint(0, 10, (BATCH,), device=device)
    x1 = torch.rand((1,) + shape, device=device)
    sync = torch.cuda.synchronize
    torch.cuda.reset_peak_memory_stats()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        optimizer.step()
        loss.item()  # the loss comes back every step, as in the engine's eager loop

    figures = {"train": BATCH * rate(train_step, sync, seconds)}
    model.eval()
    with torch.no_grad():
        figures["infer"] = BATCH * rate(lambda: torch.softmax(model(x), 1), sync, seconds)
        figures["latency_ms"] = 1e3 / rate(lambda: torch.softmax(model(x1), 1).cpu(), sync,
                                           seconds)
    figures["memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


# ---- report ----------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per figure")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    exact = CudaBackend(0, allow_tf32=False)
    tf32 = CudaBackend(0, allow_tf32=True)
    print(f"GPU: {exact.device.name}; batch {BATCH}; data on the GPU\n")
    header = (f"{'network':<8} {'engine mode':<22} {'train img/s':>12} {'infer img/s':>12} "
              f"{'batch-1 ms':>11} {'memory MB':>10}")
    rows = []
    for name in ("mnist", "cifar"):
        cfg = os.path.join(ROOT, "cfg", f"{name}.cfg")
        shape = Network(cfg, quiet=True).input_shape
        fp32 = engine_figures(cfg, exact, args.seconds, graphs=False)
        fast = engine_figures(cfg, tf32, args.seconds)
        peer = None if args.no_torch else torch_figures(name, shape, args.seconds)
        rows.append((name, fp32, fast, peer))
        print(header)
        print(f"{name:<8} {'eager, fp32 exact':<22} {fp32['train']:12.0f} {fp32['infer']:12.0f} "
              f"{fp32['latency_ms']:11.3f} {fp32['memory_mb']:10.0f}")
        print(f"{name:<8} {'eager, tf32 conv':<22} {fast['train']:12.0f} {fast['infer']:12.0f} "
              f"{fast['latency_ms']:11.3f} {fast['memory_mb']:10.0f}")
        print(f"{name:<8} {'CUDA graph, tf32 conv':<22} {fast['train_graph']:12.0f} "
              f"{fast['infer_graph']:12.0f} {fast['latency_graph_ms']:11.3f}")
        if peer:
            print(f"{name:<8} {'PyTorch eager':<22} {peer['train']:12.0f} {peer['infer']:12.0f} "
                  f"{peer['latency_ms']:11.3f} {peer['memory_mb']:10.0f}")
            best_train = max(fast["train_graph"], fast["train"])
            best_infer = max(fast["infer_graph"], fast["infer"])
            best_latency = min(fast["latency_graph_ms"], fast["latency_ms"])
            print(f"{name:<8} {'ratio engine/PyTorch':<22} "
                  f"{fast['train'] / peer['train']:5.2f} eager {best_train / peer['train']:5.2f} best"
                  f"  {best_infer / peer['infer']:5.2f} best"
                  f"  latency x{peer['latency_ms'] / best_latency:.2f} faster (best)")
        print()


if __name__ == "__main__":
    main()
