"""Training batches per second from `engine train`'s detection loader: decoding and Darknet's
augmentation (jitter, flip, hue/saturation/exposure) in worker processes, as a detector is fed.

    python benchmarks/loader_benchmark.py [--workers 0 1 2 4 8] [--batch 64] [--size 416]
        [--images 128] [--image-size 640 480] [--batches 6] [--data PATH.data] [--pipe]

With no --data, --images random jpgs of --image-size with 1-8 random boxes each are written to a
temporary folder (detection_benchmark.write_darknet_dataset). The augmentation is yolov4-tiny's
cfg's (cfg/yolov4-tiny.cfg: jitter from its last [yolo], flip, hue, saturation, exposure). For each
worker count (0: in the trainer's process) it prints images per second over --batches batches,
after three of warm-up (the pool starting, the shared-memory blocks first written), and the
trainer's own CPU time per batch; before the table, one image's time in this process
(decoding, and decoding with the augmentation). Compare with the training throughput of
benchmarks/detection_benchmark.py: a loader slower than the GPU's step is what `engine train`
runs at. Workers write their images into shared memory (engine.shared_batches); --pipe sends
them through the pipe instead (pickled), as a full /dev/shm would, to compare the two.
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

from engine import Network, shared_batches  # noqa: E402
from engine.augmentation import (DetectionAugmentation, default_workers,  # noqa: E402
                                 load_augmented)
from engine.data import DataConfig, HostBatches  # noqa: E402
from engine.images import read_rgb  # noqa: E402
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
    """(images per second, the trainer's CPU seconds per batch) over `batches` batches after
    the first; the trainer's time (all its threads: the pool's results are received on one) is
    what stays with it however many workers there are, so 1 / it bounds batches per second."""
    sampler = BatchSampler(len(dataset), batch, np.random.default_rng(0))
    # the trainer's arrays, reused as engine train reuses its page-locked ones
    dataset.host_batches = HostBatches(lambda shape: np.empty(shape, np.float32))
    if workers == 0:
        made = (dataset.training_batch(sampler.next()) for _ in range(batches + 3))
    else:
        made = dataset.batches(sampler, workers=workers)
    try:
        for _ in range(3):  # warm-up: the pool starts, the shared blocks are first written
            next(made)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(made)
        return (batch * batches / (time.perf_counter() - start),
                (time.process_time() - cpu) / batches)
    finally:
        made.close()


def per_image_ms(dataset, count=16):
    """Milliseconds to decode one image, and to decode and augment it (load_augmented, as a
    worker does; the best of three passes over the first `count` images, each result dropped
    at once as a worker drops it once written)."""
    sampler = BatchSampler(len(dataset), min(count, len(dataset)), np.random.default_rng(0))
    jobs, _ = dataset._augmentation_jobs(sampler.next())
    jobs = jobs[:count]

    def best(run):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for job in jobs:
                run(job)
            times.append(time.perf_counter() - start)
        return min(times) / len(jobs) * 1000

    return best(lambda job: read_rgb(job[0])), best(load_augmented)


def shm_note():
    """/dev/shm's free room, which decides whether batches can take shared memory (a batch of
    64 at 416 needs 126 MB, two batches in flight)."""
    room = shared_batches.shm_room()
    return "/dev/shm not found" if room is None else f"/dev/shm: {room / 2**30:.1f} GB free"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+",
                   help="worker counts (default 0 1 2 4 8 and engine train's default count)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--data", help="a Darknet .data file whose train list is used instead")
    p.add_argument("--pipe", action="store_true",
                   help="batches through the pipe (pickled), not shared memory")
    args = p.parse_args(argv)
    shm = shm_note()
    if args.pipe:  # no room in /dev/shm, as the trainer sees it: every batch takes the pipe
        shared_batches.shm_room = lambda: 0
    net = Network(os.path.join(ROOT, "cfg", "yolov4-tiny.cfg"), quiet=True)
    augmentation = DetectionAugmentation.from_network(net)
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or write_images(folder, args.images, *args.image_size)
        dataset = DataConfig(data).detection_dataset("train", (3, args.size, args.size), 90)
        dataset.augment(augmentation, 0)
        print(f"{len(dataset)} images, batches of {args.batch} at {args.size}x{args.size}, "
              f"{os.cpu_count()} cores, {'pipe' if args.pipe else 'shared memory'} "
              f"({shm}); {augmentation}")
        decode, augmented = per_image_ms(dataset)
        print(f"one image in this process: {augmented:.1f} ms decoded and augmented "
              f"({decode:.1f} ms of it decoding)")
        print("| workers | images/s | trainer CPU ms per batch |\n|---|---|---|")
        for workers in args.workers or sorted({0, 1, 2, 4, 8, default_workers()}):
            rate, trainer = images_per_second(dataset, args.batch, workers, args.batches)
            print(f"| {workers} | {rate:.0f} | {trainer * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
