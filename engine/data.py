"""Training and test data: MNIST's gzipped IDX files and Darknet's image-list classification
format, both turned into float32 NCHW images in [0, 1] with integer labels.

A .data file (Darknet's) names the sets: `train` and `valid` are either IDX image files (with
`train_labels`/`valid_labels` beside them, our extension for MNIST) or text files listing image
paths, whose label is the first label string (from `labels`) found in the path, as Darknet does.
For detectors the image list's boxes come from label files (engine.detection_data); image files
and list files are read by engine.images, which both modules share.
"""

import gzip
import math
import os
import struct
import zlib

import numpy as np

from . import memory
from .config import check_regular_file, read_data_file, read_text_lines, resolve_path
from .errors import ConfigError, DataError
from .images import load_image, read_image_list  # noqa: F401 (also this module's API)

MAX_CLASSES = 1 << 20
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---- IDX (MNIST) ----------------------------------------------------------------------------------
def read_idx(path, dims_expected=None):
    """Read an IDX file (gzipped or not) into a numpy array of its declared shape. The header is
    checked (and the size it promises against the memory available) before the data is read;
    `dims_expected` is the number of dimensions the caller needs (3 for images, 1 for labels)."""
    try:
        check_regular_file(path, "IDX", DataError)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            header = handle.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in IDX_TYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            dims = header[3]
            if dims_expected is not None and dims != dims_expected:
                what = "images: count, rows, columns" if dims_expected == 3 else "labels: count"
                raise DataError(f"{path}: IDX file of {dims} dimensions; expected {dims_expected} "
                                f"({what})")
            shape_bytes = handle.read(4 * dims)
            if len(shape_bytes) < 4 * dims:
                raise DataError(f"{path}: IDX header cut short ({dims} dimensions announced)")
            shape = struct.unpack(f">{dims}I", shape_bytes)
            dtype = np.dtype(IDX_TYPES[header[2]])
            expected = math.prod(shape) * dtype.itemsize
            if expected > memory.host_available():
                raise DataError(f"{path}: IDX header promises {memory.format_bytes(expected)} of "
                                "data, more than the memory available")
            data = handle.read(expected)
            extra = handle.read(1)
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None
    except (OSError, EOFError, zlib.error) as error:  # gzip's damaged streams are among these
        raise DataError(f"{path}: cannot read IDX file ({error})") from None
    if len(data) != expected or extra:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data, file has "
                        f"{len(data) if not extra else 'more'}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class HostBatches:
    """The arrays a data loader assembles training batches in, made by a backend's host_empty
    (page-locked on a GPU, so that a batch is copied in about 10x faster), `depth` per shape and
    used in turn. The training loop finishes an iteration before it asks for the next batch, so
    with depth 2 an array is refilled only after the work that read it has ended. The arrays of
    the last `sizes` shapes are kept (multi-scale training changes size every few batches)."""

    def __init__(self, allocate, depth=2, sizes=2):
        self.allocate, self.depth, self.sizes = allocate, depth, sizes
        self.rings = {}  # shape -> its arrays, the next to hand out first

    def __call__(self, shape):
        shape = tuple(int(s) for s in shape)
        if shape not in self.rings:
            if len(self.rings) >= self.sizes:
                self.rings.pop(next(iter(self.rings)))  # the oldest size
            self.rings[shape] = []
        ring = self.rings[shape]
        if len(ring) < self.depth:
            ring.append(self.allocate(shape))
        else:
            ring.append(ring.pop(0))
        return ring[-1]


class Dataset:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int, and how to batch them."""

    def __init__(self, images, labels, classes, name):
        self.images = images
        self.labels = labels
        self.classes = classes
        self.name = name
        self.augmentation, self.seed, self.batch_number = None, 0, 0

    def augment(self, augmentation, seed):
        """Augment training batches (engine.augmentation.ClassifierAugmentation; None: off),
        each image from its own generator seeded by (seed, batch, image)."""
        self.augmentation, self.seed, self.batch_number = augmentation, seed, 0

    def __len__(self):
        return len(self.labels)

    def batch(self, indexes):
        return self.images[indexes], self.labels[indexes]

    def one_hot(self, labels):
        truth = np.zeros((len(labels), self.classes), dtype=np.float32)
        truth[np.arange(len(labels)), labels] = 1
        return truth

    def training_batch(self, indexes):
        """(images, truth) as the loss layer takes them: one-hot rows."""
        if self.augmentation is None:
            images, labels = self.batch(indexes)
            return images, self.one_hot(labels)
        from .augmentation import augment_classifier_batch

        job, labels = self._augmentation_job(indexes)
        return augment_classifier_batch(job), self.one_hot(labels)

    def _augmentation_job(self, indexes):
        images, labels = self.batch(indexes)
        batch, self.batch_number = self.batch_number, self.batch_number + 1
        return (images, self.augmentation, self.seed, batch), labels

    def batches(self, sampler, workers=None):
        """Training batches for sampler's indexes; augmented ones are made ahead by worker
        processes (engine.augmentation.prefetched)."""
        if self.augmentation is None:
            while True:
                yield self.training_batch(sampler.next())
        from .augmentation import augment_classifier_batch, prefetched

        yield from prefetched(lambda: self._augmentation_job(sampler.next()),
                              augment_classifier_batch,
                              lambda images, labels: (images, self.one_hot(labels)), workers)

    def check_network(self, net):
        if self.classes != net.output_layer.outputs:
            raise ConfigError(f"{self.name}: {self.classes} classes, but {net.cfg_path} "
                              f"outputs {net.output_layer.outputs} values per image")
        for layer in net.cost_layers:  # the truth rows are compared with each loss's input
            if layer.outputs != self.classes:
                raise ConfigError(f"{layer.where()} the loss takes {layer.outputs} values per "
                                  f"image, but the data has {self.classes} classes")


def load_idx_dataset(images_path, labels_path, classes, shape):
    images = read_idx(images_path, dims_expected=3)
    labels = read_idx(labels_path, dims_expected=1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    c, h, w = shape
    if c != 1 or images.shape[1:] != (h, w):
        raise DataError(f"{images_path}: images are {images.shape[2]}x{images.shape[1]}x1, the "
                        f"network expects {w}x{h}x{c}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{labels_path}: labels must lie in 0..{classes - 1}")
    # float32(u8)/255, exactly the value Darknet's loader produces.
    pixels = images.reshape(len(images), 1, h, w).astype(np.float32) / np.float32(255)
    return Dataset(pixels, labels, classes, images_path)


# ---- images and Darknet image lists ---------------------------------------------------------------
def load_image_list(list_path, labels, shape):
    paths = read_image_list(list_path)
    label_of = []
    for number, path in enumerate(paths, start=1):
        # Darknet's rule: the first label (in the labels file's order) that occurs in the path.
        found = next((i for i, label in enumerate(labels) if label in path), None)
        if found is None:
            raise DataError(f"{list_path}:{number}: no label from the labels file occurs in '{path}'")
        label_of.append(found)
    images = np.stack([load_image(resolve_path(p, list_path), shape) for p in paths])
    return Dataset(images, np.array(label_of, dtype=np.int64), len(labels), list_path)


# ---- .data files ---------------------------------------------------------------------------------
class DataConfig:
    """A parsed .data file, with paths resolved and checked."""

    def __init__(self, path):
        self.path = path
        values = read_data_file(path)
        try:
            self.classes = int(values.get("classes", "0"))
            self.top = int(values.get("top", "1"))
        except ValueError:
            raise ConfigError(f"{path}: classes and top must be integers") from None
        if not 0 < self.classes <= MAX_CLASSES:
            raise ConfigError(f"{path}: needs classes=N with 0 < N <= {MAX_CLASSES}")
        if self.top < 1:
            raise ConfigError(f"{path}: top={self.top}: expected a value >= 1")
        self.values = values
        labels_file = values.get("labels") or values.get("names")
        if labels_file:
            labels_path = self._file(labels_file, "labels")
            self.labels = [line.strip() for line in
                           read_text_lines(labels_path, "labels", ConfigError) if line.strip()]
            if len(self.labels) != self.classes:
                raise ConfigError(f"{path}: classes={self.classes} but {labels_path} lists "
                                  f"{len(self.labels)} labels")
        else:
            self.labels = [str(i) for i in range(self.classes)]
        self.backup = values.get("backup", "backup/")

    def _file(self, value, key):
        resolved = resolve_path(value, self.path)
        if not os.path.exists(resolved):
            raise ConfigError(f"{self.path}: {key}={value}: file not found")
        return resolved

    def dataset(self, which, shape):
        """Load the `train` or `valid` set for a network whose input is `shape` (C, H, W)."""
        if which not in self.values:
            raise ConfigError(f"{self.path}: no {which}=... entry")
        source = self._file(self.values[which], which)
        if ".idx" in os.path.basename(source):
            labels_key = f"{which}_labels"
            if labels_key not in self.values:
                raise ConfigError(f"{self.path}: {which} is an IDX file, so {labels_key}=... is needed")
            return load_idx_dataset(source, self._file(self.values[labels_key], labels_key),
                                    self.classes, shape)
        return load_image_list(source, self.labels, shape)

    def detection_dataset(self, which, shape, max_boxes):
        """The `train` or `valid` image list as a detector's set: boxes from the labels/*.txt
        file beside each image (Darknet's `detector train` format)."""
        from .detection_data import DetectionDataset

        if which not in self.values:
            raise ConfigError(f"{self.path}: no {which}=... entry")
        source = self._file(self.values[which], which)
        return DetectionDataset(source, self.classes, shape, max_boxes)


def default_data_path(cfg_path):
    """The .data file beside the cfg: cfg/mnist.cfg -> cfg/mnist.data."""
    return os.path.splitext(cfg_path)[0] + ".data"
