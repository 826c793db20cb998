"""A detector's training set in Darknet's `detector train` format: an image list, and beside each
image a label file (the image path with `images` -> `labels`, `JPEGImages` -> `labels` and the
extension -> .txt) with one line `class x_center y_center width height` per box, relative to the
image (0..1). An image without a label file trains as one without objects.

Each image is read as RGB and resized to the network input with Darknet's resize_image. A plain
resize leaves image-relative boxes as they are, so the box transform is Darknet's correct_boxes
with no crop: edges clamped to [0, 1], boxes under 0.001 wide or high dropped. With an
`augmentation` (engine.augmentation; `engine train` sets the cfg's) training images are instead
jittered, flipped and recoloured as Darknet does, in worker processes (`batches`).

Truth per image is Darknet's net.truth row: `max_boxes` boxes of (x, y, w, h, class),
zero-padded. Images are decoded per batch (a detection set rarely fits in memory); the labels
are all read up front, so a bad label file fails before training starts.
"""

import os
import sys

import numpy as np

from .config import read_text_lines, resolve_path
from .augmentation import load_augmented, load_augmented_part, placed_pieces, prefetched, truth_rows
from .errors import ConfigError, DataError
from .images import read_image_list, read_rgb, resize_bilinear
from .shared_batches import trainer_array, worker_array

MIN_BOX_SIZE = 0.001  # fill_truth_detection skips boxes narrower or lower than this


def label_path(image_path):
    """The label file for an image. pjreddie's Darknet: images/x.jpg -> labels/x.txt (first
    occurrence of each folder name, as its find_replace does). AlexeyAB's fork keeps it beside
    the image, x.jpg -> x.txt (its replace_image_to_label maps only COCO's and VOC's folder
    names): that one is read when pjreddie's does not exist, so sets made for either fork load."""
    path = image_path.replace("images", "labels", 1).replace("JPEGImages", "labels", 1)
    pjreddie = os.path.splitext(path)[0] + ".txt"
    beside = os.path.splitext(image_path)[0] + ".txt"
    return beside if not os.path.exists(pjreddie) and os.path.exists(beside) else pjreddie


def read_boxes(path, classes):
    """The label file's boxes as rows (x, y, w, h, class), or None if there is no such file."""
    try:
        lines = read_text_lines(path, "label", DataError)
    except DataError:
        if not os.path.exists(path):
            return None
        raise
    rows = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise DataError(f"{where}: expected 'class x_center y_center width height', got "
                            f"'{line.strip()}'")
        try:
            cls, box = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{where}: expected an integer class and four numbers, got "
                            f"'{line.strip()}'") from None
        if not 0 <= cls < classes:
            raise DataError(f"{where}: class {cls} lies outside 0..{classes - 1} (classes={classes})")
        if not np.all(np.isfinite(box)):
            raise DataError(f"{where}: box values must be finite numbers, got '{line.strip()}'")
        rows.append(box + [cls])
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


def clamp_boxes(boxes):
    """correct_boxes without crop or flip: edges clamped to the image; then the boxes Darknet
    skips (under MIN_BOX_SIZE) dropped. Darknet leaves a zero row where it skips one, which
    ends the truth list early; we close the gap."""
    x, y, w, h, cls = boxes.T
    left, right = np.clip(x - w / 2, 0, 1), np.clip(x + w / 2, 0, 1)
    top, bottom = np.clip(y - h / 2, 0, 1), np.clip(y + h / 2, 0, 1)
    fitted = np.stack([(left + right) / 2, (top + bottom) / 2, right - left, bottom - top, cls], 1)
    return fitted[(fitted[:, 2] >= MIN_BOX_SIZE) & (fitted[:, 3] >= MIN_BOX_SIZE)]


def load_resized_batch(job):
    """(paths, (C, H, W)) -> the images resized to the network input."""
    paths, (_, h, w) = job
    return np.stack([resize_bilinear(read_rgb(path), w, h) for path in paths])


def load_resized_part(part):
    """Worker entry point: (block name or None, first, (paths, (C, H, W))) -> the images
    resized to the network input; with a block (engine.shared_batches) they are written into
    it, as images first, first + 1, ... of the batch, and their array's shape comes back."""
    name, first, (paths, (c, h, w)) = part
    if name is None:
        return load_resized_batch((paths, (c, h, w)))
    for i, path in enumerate(paths):
        worker_array(name, first + i, (1, c, h, w))[0] = resize_bilinear(read_rgb(path), w, h)
    return (len(paths), c, h, w)


class DetectionDataset:
    """Image paths, their truth rows (N, max_boxes * 5), and how to batch them for train()."""

    def __init__(self, list_path, classes, shape, max_boxes):
        if shape[0] != 3:
            raise ConfigError(f"{list_path}: detector training reads RGB images, but the network "
                              f"takes {shape[0]} channels")
        self.name, self.classes, self.shape = list_path, classes, shape
        self.paths = [resolve_path(p, list_path) for p in read_image_list(list_path)]
        self.truth = np.zeros((len(self.paths), max_boxes * 5), dtype=np.float32)
        self.max_boxes = max_boxes
        self.boxes = []  # each image's label rows as written, for augmentation
        self.augmentation, self.seed, self.batch_number = None, 0, 0
        self.multiscale = None  # engine.multiscale.MultiScale: random=1's sizes per batch
        # engine.data.HostBatches: where augmented batches are assembled (train() gives the
        # backend's page-locked arrays); None: new numpy arrays
        self.host_batches = None
        missing = []
        for i, path in enumerate(self.paths):
            boxes = read_boxes(label_path(path), classes)
            self.boxes.append(np.zeros((0, 5), np.float32) if boxes is None else boxes)
            if boxes is None:
                missing.append(label_path(path))
                continue
            # More than max_boxes: Darknet keeps a random max_boxes; we keep the first ones.
            boxes = clamp_boxes(boxes)[:max_boxes]
            self.truth[i, :boxes.size] = boxes.reshape(-1)
        if missing:
            print(f"Warning: {len(missing)} of {len(self.paths)} images have no label file (such "
                  f"as {missing[0]}); they train as images without objects", file=sys.stderr)

    def __len__(self):
        return len(self.paths)

    def image(self, i):
        _, h, w = self.shape
        return resize_bilinear(read_rgb(self.paths[i]), w, h)

    def training_batch(self, indexes):
        """(images (n, 3, H, W), truth (n, max_boxes * 5)) as the [yolo] layers take them."""
        if self.augmentation is None:
            job, indexes = self._plain_job(indexes)
            return load_resized_batch(job), self.truth[indexes]
        jobs, blend = self._augmentation_jobs(indexes)
        return self._assemble([load_augmented(job) for job in jobs], blend)

    def _next_batch(self):
        """(number, (C, H, W)) of the next training batch: with multi-scale its own size."""
        batch, self.batch_number = self.batch_number, self.batch_number + 1
        if self.multiscale is None:
            return batch, self.shape
        w, h = self.multiscale.size(batch)
        return batch, (self.shape[0], h, w)

    def _plain_job(self, indexes):
        _, shape = self._next_batch()
        return ([self.paths[i] for i in indexes], shape), indexes

    def augment(self, augmentation, seed):
        """Augment training batches from now on (None: plain resizing again)."""
        self.augmentation, self.seed = augmentation, seed

    def _augmentation_jobs(self, indexes):
        """The worker jobs of one batch, each with its own seed (seed, batch, image), and
        whether this batch is blended with a second one (mixup, half of the batches)."""
        batch, (_, h, w) = self._next_batch()
        rng = np.random.default_rng([self.seed, batch])
        blend = bool(self.augmentation.mixup and rng.integers(2))
        picks = list(indexes) + (list(rng.integers(len(self), size=len(indexes))) if blend else [])
        return [(self.paths[i], self.boxes[i], self.augmentation, (self.seed, batch, n), w, h)
                for n, i in enumerate(picks)], blend

    def _assemble(self, results, blend, block=None):
        """The batch (images, truth) from each image's (image, rows): with a block (engine.
        shared_batches) the images are in it, and results hold their shapes."""
        rows = [boxes for _, boxes in results]
        if block is None:
            images = [image for image, _ in results]
        else:
            images = trainer_array(block, (len(results),) + results[0][0])
        if blend:  # blend_images 0.5/0.5; blend_truth: the second image's boxes, then the first's
            n = len(results) // 2
            images = [0.5 * images[n + i] + 0.5 * images[i] for i in range(n)]
            rows = [np.concatenate([rows[n + i], rows[i]]) for i in range(n)]
        return np.stack(images, out=self._batch_array(len(images), images[0].shape)), \
            truth_rows(rows, self.max_boxes)

    def _batch_array(self, count, shape):
        shape = (count,) + tuple(shape)
        return self.host_batches(shape) if self.host_batches else np.empty(shape, np.float32)

    def _resized(self, parts, indexes, block=None):
        """The batch (images, truth) from the workers' load_resized_part values."""
        if block is None:
            return (parts[0] if len(parts) == 1 else np.concatenate(parts)), self.truth[indexes]
        images = trainer_array(block, (len(indexes),) + tuple(parts[0][1:]))
        batch = self._batch_array(len(indexes), images.shape[1:])
        np.copyto(batch, images)
        return batch, self.truth[indexes]

    def batches(self, sampler, workers=None):
        """Training batches for sampler's indexes, decoded (and augmented) ahead by worker
        processes (engine.augmentation.prefetched), which write the images into shared
        memory (engine.shared_batches)."""
        if self.augmentation is None:
            yield from prefetched(lambda: self._plain_job(sampler.next()), load_resized_part,
                                  self._resized, workers, join=list, block_bytes=self._plain_bytes,
                                  split=lambda job, n, name: [
                                      (name, first, (paths, job[1]))
                                      for name, first, paths in placed_pieces(job[0], n, name)])
        yield from prefetched(lambda: self._augmentation_jobs(sampler.next()), load_augmented_part,
                              self._assemble, workers, split=placed_pieces,
                              join=lambda parts: [result for part in parts for result in part],
                              block_bytes=self._augmented_bytes)

    @staticmethod
    def _plain_bytes(job):
        paths, shape = job
        return len(paths) * int(np.prod(shape)) * 4

    @staticmethod
    def _augmented_bytes(jobs):
        """A batch of augmented images: jobs (path, boxes, augmentation, seed, w, h)."""
        return len(jobs) * 3 * jobs[0][4] * jobs[0][5] * 4

    def check_network(self, net):
        for layer in net.cost_layers:
            if not layer.box_truth:
                raise ConfigError(f"{layer.where()} a detector trains through [yolo] or [region] "
                                  f"layers; this "
                                  f"[{layer.type_name}] loss takes class labels, not boxes")
            if layer.classes != self.classes:
                raise ConfigError(f"{layer.where()} classes={layer.classes}, but the data "
                                  f"({self.name}) has classes={self.classes}")
