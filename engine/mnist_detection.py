"""A detection task that needs no download: scenes built from the shipped MNIST digits, written
in Darknet's `detector train` layout so both this engine and Darknet itself can train on them.

Each scene is a black square of `size` pixels holding a few digits, each scaled (aspect kept) so
its ink is between `min_digit` and `max_digit` pixels tall or wide, at a random place inside
the scene, its box overlapping every earlier box by an IoU of at most `max_overlap`. Digits are
drawn with a maximum (white ink on black), so a box's pixels never darken another digit's.

A digit's box is the tight box of its ink (pixels > 0) after scaling: the label is exactly the
rectangle the pasted pixels fill. Training scenes take MNIST's training digits, validation scenes
its test digits. Everything is drawn from numpy generators seeded by `seed`, so one seed gives
the same files byte for byte.

    OUT/images/train/000000.png   OUT/labels/train/000000.txt   (class x_center y_center w h)
    OUT/images/valid/000000.png   OUT/labels/valid/000000.txt
    OUT/images/train/000000.txt   (the same label beside its image: where AlexeyAB's fork looks)
    OUT/train.txt  OUT/valid.txt  (absolute image paths, as Darknet reads them from any folder)
    OUT/mnist-detect.names  OUT/mnist-detect.data  (classes, train, valid, names, backup)
"""

import os

import numpy as np

from .data import read_idx
from .errors import ConfigError, DataError

MNIST_FILES = {"train": ("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz"),
               "valid": ("t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz")}
PLACEMENT_TRIES = 50  # a digit that finds no free enough place in this many draws is left out


def default_mnist_folder():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "data", "mnist")


def ink_box(pixels):
    """(left, top, right, bottom) of the nonzero pixels, right/bottom exclusive; None if blank."""
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def pixel_iou(a, b):
    """IoU of two (left, top, right, bottom) pixel boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def scaled_digit(digit, target):
    """The digit's ink cropped and resized (bilinear, aspect kept) so its larger side is
    `target` pixels; returns the patch cropped again to its own ink (resampling can blank an
    edge row), so the patch's extent is the box."""
    from PIL import Image

    left, top, right, bottom = ink_box(digit)
    ink = digit[top:bottom, left:right]
    scale = target / max(ink.shape)
    height, width = (max(int(round(s * scale)), 1) for s in ink.shape)
    patch = np.asarray(Image.fromarray(ink).resize((width, height), Image.BILINEAR))
    left, top, right, bottom = ink_box(patch)
    return patch[top:bottom, left:right]


def make_scene(digits, labels, size, rng, count, min_digit, max_digit, max_overlap):
    """One scene: (uint8 image (size, size), list of (class, (left, top, right, bottom)))."""
    scene = np.zeros((size, size), np.uint8)
    boxes = []
    for _ in range(count):
        k = int(rng.integers(len(digits)))
        patch = scaled_digit(digits[k], int(rng.integers(min_digit, max_digit + 1)))
        h, w = patch.shape
        for _ in range(PLACEMENT_TRIES):
            left, top = int(rng.integers(size - w + 1)), int(rng.integers(size - h + 1))
            box = (left, top, left + w, top + h)
            if all(pixel_iou(box, other) <= max_overlap for _, other in boxes):
                np.maximum(scene[top:top + h, left:left + w], patch,
                           out=scene[top:top + h, left:left + w])
                boxes.append((int(labels[k]), box))
                break
    return scene, boxes


def label_lines(boxes, size):
    """Darknet's label lines: class, centre and size relative to the scene."""
    return [f"{cls} {(left + right) / 2 / size:.6f} {(top + bottom) / 2 / size:.6f} "
            f"{(right - left) / size:.6f} {(bottom - top) / size:.6f}"
            for cls, (left, top, right, bottom) in boxes]


def generate(out_dir, train=10000, valid=1000, size=96, seed=0, min_digits=1, max_digits=5,
             min_digit=None, max_digit=None, max_overlap=0.1, mnist_folder=None):
    """Write the detection set under out_dir; returns the path of its .data file."""
    min_digit = min_digit or max(size // 6, 8)
    max_digit = max_digit or size // 2
    if not 0 < min_digit <= max_digit <= size:
        raise ConfigError(f"digit sizes {min_digit}..{max_digit} must lie in 1..{size} (the scene)")
    if not 0 < min_digits <= max_digits:
        raise ConfigError(f"digits per scene {min_digits}..{max_digits}: expected 1 <= min <= max")
    if not 0 <= max_overlap < 1:
        raise ConfigError(f"max overlap {max_overlap}: expected an IoU in [0, 1)")
    from PIL import Image

    try:
        mnist_folder = mnist_folder or default_mnist_folder()
        out_dir = os.path.abspath(out_dir)
        for split, count in (("train", train), ("valid", valid)):
            images_name, labels_name = MNIST_FILES[split]
            digits = read_idx(os.path.join(mnist_folder, images_name))
            labels = read_idx(os.path.join(mnist_folder, labels_name))
            rng = np.random.default_rng([seed, 0 if split == "train" else 1])
            image_dir = os.path.join(out_dir, "images", split)
            label_dir = os.path.join(out_dir, "labels", split)
            os.makedirs(image_dir, exist_ok=True)
            os.makedirs(label_dir, exist_ok=True)
            paths = []
            for n in range(count):
                scene, boxes = make_scene(digits, labels, size, rng,
                                          int(rng.integers(min_digits, max_digits + 1)),
                                          min_digit, max_digit, max_overlap)
                path = os.path.join(image_dir, f"{n:06d}.png")
                Image.fromarray(scene).save(path)
                text = "".join(line + "\n" for line in label_lines(boxes, size))
                # pjreddie's Darknet reads labels/, AlexeyAB's the file beside the image.
                for folder in (label_dir, image_dir):
                    with open(os.path.join(folder, f"{n:06d}.txt"), "w") as handle:
                        handle.write(text)
                paths.append(path)
            with open(os.path.join(out_dir, f"{split}.txt"), "w") as handle:
                handle.write("".join(p + "\n" for p in paths))
        names = os.path.join(out_dir, "mnist-detect.names")
        with open(names, "w") as handle:
            handle.write("".join(f"{k}\n" for k in range(10)))
        data = os.path.join(out_dir, "mnist-detect.data")
        with open(data, "w") as handle:
            handle.write(f"classes=10\ntrain={out_dir}/train.txt\nvalid={out_dir}/valid.txt\n"
                         f"names={names}\nbackup=backup/\n")
        return data
    except OSError as error:  # a file where the folder should be, a full disk, no permission
        raise DataError(f"{out_dir}: cannot write the detection set "
                        f"({error.strerror or error})") from None
