"""Training batches per second from `engine train`'s detection loader: decoding and Darknet's
augmentation (jitter, flip, hue/saturation/exposure) in worker processes, as a detector is fed.

    python benchmarks/loader_benchmark.py [--workers 0 1 2 4 8] [--batch 64] [--size 416]
        [--images 128] [--image-size 640 480] [--batches 6] [--data PATH.data]

With no --data, --images random jpgs of --image-size with 1-8 random boxes each are written to a
temporary folder (detection_benchmark.write_darknet_dataset). The augmentation is yolov4-tiny's
cfg's (cfg/yolov4-tiny.cfg: jitter from its last [yolo], flip, hue, saturation, exposure). For each
worker count (0: in the trainer's process) it prints images per second over --batches batches,
after one batch of warm-up (the pool starting). Compare with the training throughput of
benchmarks/detection_benchmark.py: a loader slower than the GPU's step is what `engine train`
runs at.
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

from engine import Network  # noqa: E402
from engine.augmentation import DetectionAugmentation  # noqa: E402
from engine.data import DataConfig  # noqa: E402
from engine.train import BatchSampler  # noqa: E402


def write_images(folder, count, width, height, seed=0):
    """count random width x height jpgs with 1-8 random boxes each; returns the .data path."""
    from PIL import Image

    from detection_benchmark import write_darknet_dataset

    data = write_darknet_dataset(folder, count, 8, 80, seed)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "train.txt")) as handle:
        for path in handle.read().split():
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return data


def images_per_second(dataset, batch, workers, batches):
    sampler = BatchSampler(len(dataset), batch, np.random.default_rng(0))
    if workers == 0:
        made = (dataset.training_batch(sampler.next()) for _ in range(batches + 1))
    else:
        made = dataset.batches(sampler, workers=workers)
    try:
        next(made)  # warm-up: the pool starts, the first batch is made
        start = time.perf_counter()
        for _ in range(batches):
            next(made)
        return batch * batches / (time.perf_counter() - start)
    finally:
        made.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--data", help="a Darknet .data file whose train list is used instead")
    args = p.parse_args(argv)
    net = Network(os.path.join(ROOT, "cfg", "yolov4-tiny.cfg"), quiet=True)
    augmentation = DetectionAugmentation.from_network(net)
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or write_images(folder, args.images, *args.image_size)
        dataset = DataConfig(data).detection_dataset("train", (3, args.size, args.size), 90)
        dataset.augment(augmentation, 0)
        print(f"{len(dataset)} images, batches of {args.batch} at {args.size}x{args.size}, "
              f"{os.cpu_count()} cores; {augmentation}")
        print("| workers | images/s |\n|---|---|")
        for workers in args.workers:
            rate = images_per_second(dataset, args.batch, workers, args.batches)
            print(f"| {workers} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
