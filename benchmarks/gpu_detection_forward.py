"""GPU forward latency of detection networks (YOLOv3 by default): the median time of one forward
pass at 416x416, for each batch size, issued eagerly from Python and replayed as a recorded CUDA
graph (what `predict` and `engine detect` do), BN folded and unfolded. Run it on two checkouts
to compare them (the numbers are only comparable on one machine):

    python benchmarks/gpu_detection_forward.py [--cfg cfg/yolov3.cfg] [--batches 1 8] [--runs 50]
        [--precisions fp32 tf32 fp16 bf16] [--folded-only]

"eager forward" times the forward pass alone on a device input; "predict" is what a user calls:
host images in, host outputs out (copies included).
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

from calibrated_weights import write_calibrated_weights  # noqa: E402
from cpu_detection_benchmark import inference_cfg  # noqa: E402
from engine import Network  # noqa: E402
from engine.backends.cuda import CudaBackend  # noqa: E402


def median_ms(step, sync, runs, warmup=5):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", default=os.path.join(ROOT, "cfg", "yolov3.cfg"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--precisions", nargs="+", default=["fp32"])
    p.add_argument("--folded-only", action="store_true")
    p.add_argument("--weights", help="a .weights file (default: calibrated random weights, "
                                     "benchmarks/calibrated_weights.py, which fp16 can hold)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, os.path.basename(args.cfg))
        inference_cfg(args.cfg, cfg, args.size)
        weights = args.weights
        if weights is None:
            weights = os.path.join(tmp, "calibrated.weights")
            write_calibrated_weights(cfg, weights, backend="gpu")
        for precision, folded in ((p, f) for p in args.precisions
                                  for f in ((True,) if args.folded_only else (True, False))):
            ops = CudaBackend(device=0, seed=0, precision=precision)
            net = Network(cfg, backend=ops, seed=0, quiet=True)
            net.load_weights(weights)
            if folded:
                net.fold_batchnorm()
            for batch in args.batches:
                rng = np.random.default_rng(0)
                images = rng.random((batch,) + net.input_shape, dtype=np.float32)
                x = ops.asarray(images)
                eager = median_ms(lambda: net.forward(x, train=False), ops.synchronize, args.runs)
                graph = median_ms(lambda: net.predict(images, batch_size=batch), ops.synchronize,
                                  args.runs)
                rows.append((precision, folded, batch, eager, graph))
    print(f"{os.path.basename(args.cfg)} at {args.size}x{args.size} on {ops.device_name}, "
          f"median of {args.runs}")
    print("| precision | BN | batch | eager forward ms | predict (recorded) ms | predict img/s |")
    print("|---|---|---|---|---|---|")
    for precision, folded, batch, eager, graph in rows:
        print(f"| {precision} | {'folded' if folded else 'unfolded'} | {batch} | {eager:.2f} | "
              f"{graph:.2f} | {1e3 * batch / graph:.0f} |")


if __name__ == "__main__":
    main()
