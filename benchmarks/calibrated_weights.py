"""Random weights whose activations stay at a trained network's scale, for speed benchmarks.

A network drawn at random keeps its activations at unit scale only on average: through YOLOv3's
23 residual sums they grow by orders of magnitude and overflow fp16 (65504), which a trained
network's do not. Here each convolution's weights are scaled, in order, so that its output over
one random image has standard deviation 1 (LSUV-style), with BN statistics drawn as
cpu_detection_benchmark.write_random_weights draws them; saved as a Darknet .weights file.

    python benchmarks/calibrated_weights.py CFG OUT.weights [--gpu]
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_calibrated_weights(cfg, path, seed=1, backend="cpu"):
    import engine

    net = engine.load(cfg, backend=backend, seed=seed, quiet=True)
    rng = np.random.default_rng(seed)
    ops = net.ops
    for layer in net.layers:
        p = layer.params
        if "rolling_mean" in p:
            n = p["biases"].shape
            host = {name: ops.to_host(p[name]) for name in p}
            host["scales"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
            host["biases"] = rng.uniform(-0.1, 0.1, n).astype(np.float32)
            host["rolling_mean"] = rng.uniform(-0.1, 0.1, n).astype(np.float32)
            host["rolling_variance"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
            layer.params.update({name: ops.asarray(value) for name, value in host.items()})
    image = rng.random((1,) + tuple(net.input_shape)).astype(np.float32)
    for layer in net.layers:
        if layer.type_name != "convolutional":
            continue
        net.forward(ops.asarray(image), train=False)
        spread = float(np.std(ops.to_host(net.outputs[layer.index])))
        if spread > 0 and np.isfinite(spread):
            weights = ops.to_host(layer.params["weights"]) / np.float32(spread)
            layer.params["weights"] = ops.asarray(weights)
    net.save_weights(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cfg")
    parser.add_argument("out")
    parser.add_argument("--gpu", action="store_true", help="calibrate on GPU 0 (faster)")
    args = parser.parse_args()
    write_calibrated_weights(args.cfg, args.out, backend="gpu" if args.gpu else "cpu")


if __name__ == "__main__":
    main()
