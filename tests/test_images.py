"""engine/images.py's read_rgb: the float32 values Darknet's load_image_color gives (byte / 255,
channels first) for the modes images come in, against PIL and numpy written out plainly."""

import numpy as np
import pytest
from PIL import Image

from engine.images import read_rgb


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_read_rgb_is_bytes_over_255_channels_first(tmp_path, mode):
    pixels = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    path = str(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    Image.fromarray(pixels).convert(mode).save(path)
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"), np.float32) / np.float32(255)
    image = read_rgb(path)
    assert image.dtype == np.float32 and image.shape == (3, 9, 13) and image.flags.c_contiguous
    np.testing.assert_array_equal(image.view(np.uint32),
                                  expected.transpose(2, 0, 1).copy().view(np.uint32))
