"""Image files and Darknet's image lists, as every data path reads them: decoding to float32
(C, H, W) in [0, 1], Darknet's bilinear resize, and list files of image paths. Classification
data (engine.data), detection data (engine.detection_data, engine.augmentation) and detection
itself (engine.detection) build on this module; it imports none of them.
"""

import numpy as np

from .config import check_regular_file, read_text_lines
from .errors import DataError


def read_rgb(path):
    """Decode an image file to float32 (3, H, W) RGB in [0, 1] (Darknet's load_image_color)."""
    from PIL import Image, UnidentifiedImageError

    try:
        check_regular_file(path, "image", DataError)
        with Image.open(path) as image:  # decoded here, so decoding errors are caught
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an image file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from None
    # float32(byte) / 255 in one pass that also puts the channels first
    pixels = np.empty((3,) + rgb.shape[:2], np.float32)
    return np.divide(rgb.transpose(2, 0, 1), np.float32(255), out=pixels)


def resize_bilinear(image, width, height, window=None):
    """Darknet's resize_image: bilinear with the corners of both grids aligned
    (scale (in-1)/(out-1), float32), horizontal pass first, then vertical. Like Darknet, the
    last column copies the last input column, and the last row keeps only its upper term.
    With `window` (left, top, w, h): that window of the image, as Darknet's crop_image cuts it
    (outside the image, the border pixels repeat), resized without making the crop: the same
    values, read straight from the image."""

    def sample(size_in, size_out):
        scale = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else 0
        position = np.arange(size_out, dtype=np.float32) * np.float32(scale)
        low = np.minimum(position.astype(np.int64), size_in - 1)
        frac = (position - low).astype(np.float32)
        return low, np.minimum(low + 1, size_in - 1), frac

    _, h, w = image.shape
    x0, y0, window_w, window_h = window if window is not None else (0, 0, w, h)
    left, right, fx = sample(window_w, width)
    left[-1], fx[-1] = window_w - 1, 0
    top, bottom, fy = sample(window_h, height)
    upper, lower = (1 - fy)[:, None], fy[:, None]
    lower[-1] = 0
    left, right = np.clip(left + x0, 0, w - 1), np.clip(right + x0, 0, w - 1)
    top, bottom = np.clip(top + y0, 0, h - 1), np.clip(bottom + y0, 0, h - 1)
    # The horizontal pass on the rows the vertical pass reads only (np.take: 2x faster than
    # fancy indexing here).
    first, last = min(top.min(), bottom.min()), max(top.max(), bottom.max())
    rows = image[:, first:last + 1]
    part = np.take(rows, left, axis=2) * (1 - fx) + np.take(rows, right, axis=2) * fx
    return (np.take(part, top - first, axis=1) * upper
            + np.take(part, bottom - first, axis=1) * lower).astype(np.float32, copy=False)


def load_image(path, shape):
    """Decode an image file to float32 (C, H, W) in [0, 1], resized to the network's input."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        check_regular_file(path, "image", DataError)
        with Image.open(path) as image:
            image = image.convert("L" if c == 1 else "RGB")
            if image.size != (w, h):
                image = image.resize((w, h), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from None
    if c == 1:
        return pixels[None]
    if c != 3:
        raise DataError(f"{path}: the network expects {c} channels; images give 1 or 3")
    return pixels.transpose(2, 0, 1).copy()


def read_image_list(list_path):
    """The image paths a Darknet list file names, one a line, as written (unresolved)."""
    paths = [line.strip() for line in read_text_lines(list_path, "image list", DataError)
             if line.strip()]
    if not paths:
        raise DataError(f"{list_path}: the image list is empty")
    return paths
