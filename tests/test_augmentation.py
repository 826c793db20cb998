"""Detector augmentation (engine/augmentation.py) as Darknet's load_data_detection: a rectangle
drawn in an image stays enclosed by its transformed box after every transform; colours against a
colorsys reference; worker processes give the same batches as the trainer's own process; the cfg
keys and their refusals; `engine train` with augmentation end to end."""

import colorsys
import os

import numpy as np
import pytest

from engine import cli
from engine.augmentation import (DetectionAugmentation, ImageDraw, augment, crop_amounts,
                                 distort, draw, in_pieces, load_augmented, transform_boxes)
from engine.data import DataConfig
from engine.errors import ConfigError
from engine.images import resize_bilinear
from engine.network import Network
from engine.train import BatchSampler

from helpers import write_cfg

NET = 64


def _rectangle_image(ow, oh, box):
    """A grey image with a white rectangle at pixel edges (left, top, right, bottom); its label
    row relative to the image."""
    image = np.full((3, oh, ow), 0.0, np.float32)
    left, top, right, bottom = box
    image[:, top:bottom, left:right] = 1.0
    row = np.array([[(left + right) / 2 / ow, (top + bottom) / 2 / oh, (right - left) / ow,
                     (bottom - top) / oh, 1]], np.float32)
    return image, row


def _ink_extent(image):
    """Continuous (left, top, right, bottom) of the pixels above half, in network units."""
    mask = image[0] > 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return cols[0] / NET, rows[0] / NET, (cols[-1] + 1) / NET, (rows[-1] + 1) / NET


def _box_edges(row):
    x, y, w, h = row[:4]
    return x - w / 2, y - h / 2, x + w / 2, y + h / 2


CHOICES = [
    ImageDraw((0.5, 0.5, 0.5, 0.5), False, 0, 1, 1),         # no crop
    ImageDraw((0.9, 0.1, 0.8, 0.3), False, 0, 1, 1),         # crop in on the left and top
    ImageDraw((0.1, 0.9, 0.2, 0.7), True, 0, 1, 1),          # widen, mirrored
    ImageDraw((0.0, 1.0, 1.0, 0.0), True, 0, 1, 1),          # extremes
]


@pytest.mark.parametrize("letter_box", [False, True])
@pytest.mark.parametrize("choice", range(len(CHOICES)))
def test_box_encloses_the_rectangle_after_the_transform(choice, letter_box):
    """Jitter 0.3, flip and letter_box on a 120x80 image: the transformed box and the white
    pixels' extent agree within the resampling's one network pixel (a wrong offset, scale or
    mirror moves them by several)."""
    augmentation = DetectionAugmentation(jitter=0.3, flip=True, letter_box=letter_box)
    image, row = _rectangle_image(120, 80, (50, 20, 90, 60))
    out, rows = augment(image, row, augmentation, CHOICES[choice], NET, NET)
    assert out.shape == (3, NET, NET) and len(rows) == 1 and rows[0, 4] == 1
    np.testing.assert_allclose(_box_edges(rows[0]), _ink_extent(out), atol=1.01 / NET)


def test_boxes_pushed_out_by_the_crop_are_clipped_or_dropped():
    """A crop that cuts the left 40%: a box across the cut is clipped at the new border, a box
    wholly in the cut part vanishes (zero width after clamping), a box inside only moves."""
    augmentation = DetectionAugmentation(jitter=0.4)
    choice = ImageDraw((1.0, 0.5, 0.5, 0.5), False, 0, 1, 1)
    assert crop_amounts(augmentation, choice, 100, 100, NET, NET) == (40, 0, 0, 0)
    sx = 0.6
    rows = np.array([[0.45, 0.5, 0.2, 0.2, 0],    # 0.35..0.55: across the cut
                     [0.2, 0.5, 0.2, 0.2, 1],     # 0.10..0.30: cut away
                     [0.8, 0.3, 0.2, 0.2, 2]], np.float32)  # 0.70..0.90: inside
    out = transform_boxes(rows, 0.4 / sx, 0, 1 / sx, 1, False, NET, NET)
    assert list(out[:, 4]) == [0, 2]
    np.testing.assert_allclose(_box_edges(out[0]), [0, 0.4, 0.15 / sx, 0.6], atol=1e-6)
    np.testing.assert_allclose(_box_edges(out[1]), [0.3 / sx, 0.2, 0.5 / sx, 0.4], atol=1e-6)


def test_flip_mirrors_pixels_and_boxes_exactly():
    image, row = _rectangle_image(NET, NET, (5, 10, 25, 30))
    plain = ImageDraw((0.5,) * 4, False, 0, 1, 1)
    flipped = ImageDraw((0.5,) * 4, True, 0, 1, 1)
    augmentation = DetectionAugmentation(flip=True)
    a, rows_a = augment(image, row, augmentation, plain, NET, NET)
    b, rows_b = augment(image, row, augmentation, flipped, NET, NET)
    np.testing.assert_array_equal(b, a[:, :, ::-1])
    np.testing.assert_allclose(rows_b[0, [1, 2, 3]], rows_a[0, [1, 2, 3]])
    assert rows_b[0, 0] == pytest.approx(1 - rows_a[0, 0])


def test_hue_saturation_exposure_against_colorsys():
    """distort: hue shifted (wrapping), S and V scaled, clamped; colorsys is the reference.
    Boxes are untouched by colour."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (3, 5, 7)).astype(np.float32)
    out = distort(image, 0.3, 1.4, 0.8)
    for y in range(5):
        for x in range(7):
            h, s, v = colorsys.rgb_to_hsv(*image[:, y, x].astype(float))
            # Darknet scales S without a bound: S > 1 gives negative RGB, clamped to 0.
            expected = np.clip(colorsys.hsv_to_rgb((h + 0.3) % 1, s * 1.4, v * 0.8), 0, 1)
            np.testing.assert_allclose(out[:, y, x], expected, atol=1e-5)
    grey = np.full((3, 2, 2), 0.5, np.float32)
    np.testing.assert_allclose(distort(grey, 0.4, 2.0, 1.5), 0.75, atol=1e-6)
    augmentation = DetectionAugmentation(hue=0.5, saturation=2, exposure=2)
    img, row = _rectangle_image(NET, NET, (5, 10, 25, 30))
    _, rows = augment(img, row, augmentation, ImageDraw((0.5,) * 4, False, 0.2, 1.5, 0.7), NET, NET)
    np.testing.assert_allclose(rows, row, atol=1e-6)



# distort as it was written before it was done in blocks (Darknet's formulas with np.where,
# whole images, 15 ms at 416x416): the reference that distort must equal bit for bit.
def reference_rgb_to_hsv(image):
    r, g, b = image
    high, low = image.max(axis=0), image.min(axis=0)
    delta = high - low
    safe = np.where(delta > 0, delta, 1)
    hue = np.where(r == high, (g - b) / safe, np.where(g == high, 2 + (b - r) / safe,
                                                        4 + (r - g) / safe))
    hue = np.where(hue < 0, hue + 6, hue) / 6
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1), 0)
    hue = np.where((high > 0) & (delta > 0), hue, 0)
    return np.stack([hue, saturation, high])


def reference_hsv_to_rgb(image):
    h, s, v = image
    h = 6 * h
    index = np.floor(h)
    f = h - index
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sectors = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v)]
    rgb = [v, p, q]  # index 5 (and above)
    for sector in reversed(range(5)):
        rgb = [np.where(index == sector, sectors[sector][c], rgb[c]) for c in range(3)]
    return np.where(s == 0, v, np.stack(rgb))


def reference_distort(image, hue, saturation, exposure):
    hsv = reference_rgb_to_hsv(image.astype(np.float32))
    hsv[1] *= saturation
    hsv[2] *= exposure
    shifted = hsv[0] + hue
    hsv[0] = np.where(shifted > 1, shifted - 1, np.where(shifted < 0, shifted + 1, shifted))
    return np.clip(reference_hsv_to_rgb(hsv), 0, 1).astype(np.float32)


def _edge_pixels():
    """(3, n) pixels at the formulas' edges: every triple of the levels below (grey where all
    three are equal, black, white, ties for the highest channel, the pure colours at the six
    sector borders), and pixels one float32 step either side of each border hue."""
    levels = np.array([0, 1e-7, 0.2, 0.5, 0.5 + 2 ** -24, 0.8, 1 - 2 ** -24, 1], np.float32)
    triples = np.stack(np.meshgrid(levels, levels, levels, indexing="ij")).reshape(3, -1)
    near = []
    for high, mid, low in ((0, 1, 2), (1, 0, 2), (1, 2, 0), (2, 1, 0), (2, 0, 1), (0, 2, 1)):
        for step in (-1, 1):
            pixel = np.zeros(3, np.float32)
            pixel[high], pixel[low] = 0.9, 0.1
            pixel[mid] = np.nextafter(np.float32(0.9 if step < 0 else 0.1),
                                      np.float32(0.5), dtype=np.float32)
            near.append(pixel)
    return np.concatenate([triples, np.stack(near, 1)], 1)


def _same_bits(a, b):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    differ = a.view(np.uint32) != b.view(np.uint32)
    assert not differ.any(), f"{differ.sum()} values differ, first at {np.argwhere(differ)[0]}"


def test_distort_equals_the_np_where_formulas_at_the_edges():
    """Each hue sector and its borders, grey (s = 0) and black (v = 0) pixels, hue shifts that
    wrap past 0 and 1 (0.5 takes cyan to exactly 1, Darknet's sector 6), saturation and
    exposure that push RGB out of [0, 1]: the same float32 bits as the reference."""
    pixels = _edge_pixels()[:, :, None]
    for hue in (0.0, 0.1, -0.1, 1 / 6, -1 / 6, 0.5, -0.5, 0.99, -0.99):
        for saturation in (0.0, 1 / 3, 1.0, 1.5, 3.0):
            for exposure in (0.5, 1.0, 3.0):
                _same_bits(distort(pixels, hue, saturation, exposure),
                           reference_distort(pixels, hue, saturation, exposure))


@pytest.mark.parametrize("shape", [(3, 416, 416), (3, 480, 640), (3, 37, 53)])
def test_distort_equals_the_np_where_formulas_on_random_images(shape):
    """Random images (640x480 spans several of distort's blocks, the last one partial), with
    Darknet's draws, a mirrored view (as augment passes it) and float64 input."""
    rng = np.random.default_rng(shape[1])
    image = rng.random(shape, dtype=np.float32)
    image[:, :5] = image[0, :5]  # grey rows
    augmentation = DetectionAugmentation(hue=0.5, saturation=1.5, exposure=1.5)
    for _ in range(3):
        choice = draw(augmentation, rng)
        args = choice.hue, choice.saturation, choice.exposure
        _same_bits(distort(image, *args), reference_distort(image, *args))
    _same_bits(distort(image[:, :, ::-1], *args), reference_distort(image[:, :, ::-1], *args))
    _same_bits(distort(image.astype(np.float64), *args), reference_distort(image, *args))


# Darknet's crop_image, then resize_image as it was written before it took a window (fancy
# indexing, the horizontal pass over every row): the reference for resize_bilinear's window.
def reference_crop(image, left, top, width, height):
    _, h, w = image.shape
    rows = np.clip(np.arange(top, top + height), 0, h - 1)
    cols = np.clip(np.arange(left, left + width), 0, w - 1)
    return image[:, rows][:, :, cols]


def reference_resize(image, width, height):
    def sample(size_in, size_out):
        scale = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else 0
        position = np.arange(size_out, dtype=np.float32) * np.float32(scale)
        low = np.minimum(position.astype(np.int64), size_in - 1)
        frac = (position - low).astype(np.float32)
        return low, np.minimum(low + 1, size_in - 1), frac

    c, h, w = image.shape
    left, right, fx = sample(w, width)
    left[-1], fx[-1] = w - 1, 0
    part = image[:, :, left] * (1 - fx) + image[:, :, right] * fx
    top, bottom, fy = sample(h, height)
    upper, lower = (1 - fy)[:, None], fy[:, None]
    lower[-1] = 0
    return (part[:, top] * upper + part[:, bottom] * lower).astype(np.float32)


@pytest.mark.parametrize("size", [(416, 416), (1, 1), (2, 3), (700, 500)])
def test_resize_of_a_window_equals_crop_then_resize(size):
    """Windows inside the image, around it (the border repeated), across one corner, on its
    last pixel and of one pixel; shrinking and enlarging: the same float32 bits."""
    image = np.random.default_rng(1).random((3, 48, 64), dtype=np.float32)
    for window in ((0, 0, 64, 48), (-10, -5, 80, 60), (5, 4, 50, 40), (-3, 6, 70, 30),
                   (60, 47, 10, 5), (-5, -5, 1, 1), (63, 47, 2, 2)):
        _same_bits(resize_bilinear(image, *size, window=window),
                   reference_resize(reference_crop(image, *window), *size))
    _same_bits(resize_bilinear(image, *size), reference_resize(image, *size))

# ---- cfg keys, worker processes, engine train -----------------------------------------------
DETECTOR = """
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=45
size=1
activation=linear

[yolo]
mask=0,1,2
anchors=6,6, 10,10, 14,14
classes=10
num=3
{yolo}
"""


def _cfg(folder, net=None, yolo=""):
    options = dict(batch=4, subdivisions=1, width=32, height=32, channels=3, max_batches=2)
    options.update(net or {})
    return write_cfg(folder / "aug.cfg", options, DETECTOR.format(yolo=yolo))


def test_cfg_keys_and_darknet_defaults(tmp_path):
    net = Network(_cfg(tmp_path), quiet=True)
    assert DetectionAugmentation.from_network(net) == DetectionAugmentation(jitter=0.2, flip=True)
    net = Network(_cfg(tmp_path, dict(flip=0, hue=0.1, saturation=1.5, exposure=1.5,
                                      letter_box=1, mixup=1), "jitter=.3"), quiet=True)
    assert DetectionAugmentation.from_network(net) == DetectionAugmentation(
        jitter=0.3, flip=False, hue=0.1, saturation=1.5, exposure=1.5, letter_box=True, mixup=True)
    for key in ("mosaic", "blur", "cutmix"):
        net = Network(_cfg(tmp_path, {key: 1}), quiet=True)  # inference still builds
        with pytest.raises(ConfigError, match=f"aug.cfg:[0-9]+: \\[net\\] {key}=1"):
            DetectionAugmentation.from_network(net)


def first_batches(dataset, sampler, count, workers):
    """The first `count` training batches of `dataset` drawn by `sampler`, made in this process
    (workers 0) or by `workers` worker processes."""
    if not workers:
        return [dataset.training_batch(sampler.next()) for _ in range(count)]
    batches = dataset.batches(sampler, workers=workers)
    try:
        return [next(batches) for _ in range(count)]
    finally:
        batches.close()


def test_jobs_split_into_consecutive_parts():
    assert in_pieces(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert in_pieces(list(range(2)), 4) == [[0], [1]]
    assert in_pieces([], 4) == [[]]


def test_workers_resize_the_batches_the_trainer_would_make(scenes, tmp_path):
    """Without augmentation too, a batch split over workers is the in-process batch."""
    net = Network(_cfg(tmp_path), quiet=True)
    dataset = DataConfig(scenes).detection_dataset("train", net.input_shape, 90)

    def first(workers):
        return first_batches(dataset, BatchSampler(len(dataset), 5, np.random.default_rng(0)), 3,
                             workers)

    for (a, ta), (b, tb) in zip(first(0), first(3)):
        assert a.shape[0] == 5
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)


def test_workers_give_the_batches_the_trainer_would_make(scenes, tmp_path):
    """The same seed gives the same augmented batches in a process pool and in-process, mixup
    included (blended images hold more boxes); another seed gives other images."""
    net = Network(_cfg(tmp_path), quiet=True)
    data = DataConfig(scenes)
    augmentation = DetectionAugmentation(jitter=0.2, flip=True, exposure=1.5, mixup=True)

    def first(workers, seed):
        dataset = data.detection_dataset("train", net.input_shape, 90)
        dataset.augment(augmentation, seed)
        return first_batches(dataset, BatchSampler(len(dataset), 4, np.random.default_rng(0)), 4,
                             workers)

    # three workers: each batch's images (8 when blended) in uneven parts
    inline, pooled, other = first(0, 5), first(3, 5), first(0, 6)
    for (a, ta), (b, tb) in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
    assert not np.array_equal(inline[0][0], other[0][0])
    # Mixup: some batches are blended; such a batch is the mean of two augmented images, with
    # the second image's boxes before the first's.
    dataset = data.detection_dataset("train", net.input_shape, 90)
    dataset.augment(augmentation, 5)
    sampler = BatchSampler(len(dataset), 4, np.random.default_rng(0))
    plans = [dataset._augmentation_jobs(sampler.next()) for _ in range(4)]
    blended = [n for n, (_, blend) in enumerate(plans) if blend]
    assert blended and len(blended) < 4
    jobs = plans[blended[0]][0]
    assert len(jobs) == 8
    (first, first_rows), (second, second_rows) = load_augmented(jobs[0]), load_augmented(jobs[4])
    images, truth = inline[blended[0]]
    np.testing.assert_allclose(images[0], 0.5 * first + 0.5 * second, atol=1e-6)
    expected = np.concatenate([second_rows, first_rows]).reshape(-1)
    np.testing.assert_array_equal(truth[0, :len(expected)], expected)
    assert not truth[0, len(expected):].any()


def test_engine_train_augments_a_detector(scenes, tmp_path, capsys):
    cfg = _cfg(tmp_path, dict(hue=0.1, exposure=1.5), "jitter=.3")
    code = cli.main(["train", cfg, "--data", scenes, "--cpu", "--backup", str(tmp_path / "b")])
    assert code == 0 and os.path.exists(tmp_path / "b" / "aug_final.weights")
    cfg = _cfg(tmp_path, dict(mosaic=1))
    code = cli.main(["train", cfg, "--data", scenes, "--cpu", "--backup", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 1 and "mosaic=1" in err and len(err.strip().splitlines()) == 1


# ---- classifiers -----------------------------------------------------------------------------
from engine.augmentation import (ClassifierAugmentation, augment_classifier_image,  # noqa: E402
                                 rotate_crop)


def reference_rotate_crop(image, rad, s, size, dx, dy, aspect):
    """rotate_crop_image and bilinear_interpolate (src/image.c) in plain Python loops."""
    import math

    c, h, w = image.shape
    out = np.zeros((c, size, size))

    def get(k, x, y):
        return image[k, y, x] if 0 <= x < w and 0 <= y < h else 0.0

    for k in range(c):
        for y in range(size):
            for x in range(size):
                rx = (math.cos(rad) * ((x - size / 2) / s * aspect + dx / s * aspect)
                      - math.sin(rad) * ((y - size / 2) / s + dy / s) + w / 2)
                ry = (math.sin(rad) * ((x - size / 2) / s * aspect + dx / s * aspect)
                      + math.cos(rad) * ((y - size / 2) / s + dy / s) + h / 2)
                ix, iy = math.floor(rx), math.floor(ry)
                fx, fy = rx - ix, ry - iy
                out[k, y, x] = ((1 - fy) * (1 - fx) * get(k, ix, iy) + fy * (1 - fx) * get(k, ix, iy + 1)
                                + (1 - fy) * fx * get(k, ix + 1, iy) + fy * fx * get(k, ix + 1, iy + 1))
    return out


@pytest.mark.parametrize("params", [(0.3, 1.0, 12, 0.0, 0.0, 1.0), (-0.7, 1.6, 10, 2.5, -1.5, 1.3),
                                    (0.0, 0.8, 14, 0.0, 0.0, 0.7)])
def test_rotate_crop_equals_darknets_loops(params):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2, 9, 11)).astype(np.float32)
    rad, s, size, dx, dy, aspect = params
    np.testing.assert_allclose(rotate_crop(image, rad, s, size, dx, dy, aspect),
                               reference_rotate_crop(image, rad, s, size, dx, dy, aspect), atol=1e-5)


def test_quarter_turn_and_identity():
    """A 90 degree turn maps out[y, x] to in[x, w - y] (one column falls outside: zero); with
    min_crop = max_crop = width, no angle, aspect 1 and no flip the image is unchanged."""
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, (1, 8, 8)).astype(np.float32)
    turned = rotate_crop(image, np.pi / 2, 1.0, 8, 0, 0, 1)
    for y in range(1, 8):
        for x in range(8):
            assert turned[0, y, x] == pytest.approx(image[0, x, 8 - y], abs=1e-6)
    assert not turned[0, 0].any()
    plain = ClassifierAugmentation(8, 8, min_crop=8, max_crop=8, flip=False)
    np.testing.assert_allclose(augment_classifier_image(image, plain, np.random.default_rng(0)),
                               image, atol=1e-6)


def test_zoom_crop_and_flip_draws():
    """min_crop = max_crop = 2 * width: the image doubled and cut to width at a random offset
    (every output is a crop of the doubled image); flip mirrors about half of the draws."""
    image = np.zeros((1, 8, 8), np.float32)
    image[0, :, :4] = 1  # left half white
    zoom = ClassifierAugmentation(8, 8, min_crop=16, max_crop=16, flip=True)
    means = [augment_classifier_image(image, zoom, np.random.default_rng(n))[0, :, :2].mean()
             for n in range(40)]
    flips = sum(m < 0.5 for m in means)
    assert 8 < flips < 32
    out = augment_classifier_image(image, ClassifierAugmentation(8, 8, min_crop=16, max_crop=16,
                                                                 flip=False),
                                   np.random.default_rng(3))
    assert out.shape == (1, 8, 8) and out[0, :, 0].mean() > 0.5


def reference_classifier_image(image, a, rng):
    """load_image_augment_paths for one image, from the C: random_augment_image's draws in its
    order (rand_scale, rand_int, rand_uniform for the angle, dx, dy), the loops of
    rotate_crop_image, flip, then random_distort_image (1 channel: exposure only)."""
    import math

    def rand_scale(s):
        scale = rng.uniform(1, s)
        return scale if rng.integers(2) else 1 / scale

    _, h, w = image.shape
    size = max(a.width, a.height)
    aspect = rand_scale(a.aspect)
    r = int(rng.integers(a.min_crop, a.max_crop + 1))
    scale = r / int(h if h < w * aspect else w * aspect)
    rad = rng.uniform(-a.angle, a.angle) * 2 * math.pi / 360
    dx, dy = max((w * scale / aspect - size) / 2, 0), max((h * scale - size) / 2, 0)
    dx, dy = rng.uniform(-dx, dx), rng.uniform(-dy, dy)
    crop = reference_rotate_crop(image, rad, scale, size, dx, dy, aspect)
    if a.flip and rng.integers(2):
        crop = crop[:, :, ::-1]
    rand_scale(a.saturation)  # drawn, unused on one channel
    return np.clip(crop * rand_scale(a.exposure), 0, 1)


def test_classifier_batch_equals_darknets_per_image_loops():
    """A batch is augmented in one pass (rotate_crop_batch); each of its images equals
    Darknet's per-image computation with that image's generator (seed, batch, n)."""
    from engine.augmentation import augment_classifier_batch

    images = np.random.default_rng(5).uniform(0, 1, (5, 1, 10, 10)).astype(np.float32)
    a = ClassifierAugmentation(10, 10, angle=25, aspect=1.3, min_crop=7, max_crop=16, flip=True,
                               exposure=1.5)
    batch = augment_classifier_batch((images, a, 7, 3))
    for n, image in enumerate(images):
        expected = reference_classifier_image(image, a, np.random.default_rng([7, 3, n]))
        np.testing.assert_allclose(batch[n], expected, atol=1e-5)
    assert len({batch[n].tobytes() for n in range(5)}) == 5


def test_mnist_training_set_is_augmented_as_its_cfg_says():
    """Training from MNIST's IDX files (cfg/mnist.data): cfg/mnist-augment.cfg's batches are its
    augmentation of the sampled images (seed, batch number, image); cfg/mnist.cfg's, which names
    no augmentation key, are the images themselves."""
    from conftest import CFG
    from engine.augmentation import augment_classifier_batch

    data = DataConfig(os.path.join(CFG, "mnist.data"))
    net = Network(os.path.join(CFG, "mnist-augment.cfg"), quiet=True)
    dataset = cli.training_set(net, data, seed=11)
    assert dataset.augmentation == ClassifierAugmentation(28, 28, angle=10, aspect=1.1,
                                                          min_crop=25, max_crop=33, flip=False,
                                                          exposure=1.3)
    indexes = np.array([5, 0, 59999, 123])
    for batch in range(2):
        images, truth = dataset.training_batch(indexes)
        expected = augment_classifier_batch((dataset.images[indexes], dataset.augmentation, 11,
                                             batch))
        np.testing.assert_array_equal(images, expected)
        assert not np.allclose(images, dataset.images[indexes], atol=0.05)
        np.testing.assert_array_equal(truth.argmax(1), dataset.labels[indexes])
    plain = cli.training_set(Network(os.path.join(CFG, "mnist.cfg"), quiet=True), data)
    assert plain.augmentation is None
    np.testing.assert_array_equal(plain.training_batch(indexes)[0], plain.images[indexes])


def test_classifier_keys(tmp_path):
    body = "[convolutional]\nfilters=4\nsize=3\npad=1\nactivation=leaky\n\n[softmax]\n"
    plain = Network(write_cfg(tmp_path / "a.cfg", dict(batch=2, width=8, height=8, channels=1),
                              body), quiet=True)
    assert ClassifierAugmentation.from_network(plain) is None
    net = Network(write_cfg(tmp_path / "b.cfg", dict(batch=2, width=8, height=8, channels=1,
                                                      angle=7, exposure=1.2), body), quiet=True)
    assert ClassifierAugmentation.from_network(net) == ClassifierAugmentation(
        8, 8, angle=7, min_crop=8, max_crop=16, flip=True, exposure=1.2)
    bad = Network(write_cfg(tmp_path / "c.cfg", dict(batch=2, width=8, height=8, channels=1,
                                                      min_crop=20, max_crop=10), body), quiet=True)
    with pytest.raises(ConfigError, match="c.cfg:[0-9]+: \\[net\\] min_crop=20"):
        ClassifierAugmentation.from_network(bad)


def test_classifier_batches_from_workers_equal_in_process(tmp_path):
    from engine.data import Dataset

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (10, 1, 8, 8)).astype(np.float32)
    augmentation = ClassifierAugmentation(8, 8, angle=10, min_crop=8, max_crop=12, exposure=1.3)

    def first(workers):
        dataset = Dataset(images, np.arange(10) % 3, 3, "x")
        dataset.augment(augmentation, 4)
        return first_batches(dataset, BatchSampler(10, 4, np.random.default_rng(1)), 3, workers)

    for (a, ta), (b, tb) in zip(first(0), first(2)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
    assert not np.allclose(first(0)[0][0], images[BatchSampler(10, 4, np.random.default_rng(1)).next()])


def test_engine_train_augments_a_classifier(tmp_path, capsys):
    """cfg/mnist.cfg with angle, min_crop/max_crop and flip=0 trains through engine train."""
    import gzip
    import struct

    from conftest import CFG, ROOT
    from engine.data import read_idx

    def write_idx(path, array):
        with gzip.open(path, "wb") as handle:
            handle.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                         + array.astype(np.uint8).tobytes())

    mnist = os.path.join(ROOT, "data", "mnist")
    write_idx(tmp_path / "i.idx3.gz", read_idx(os.path.join(mnist, "train-images.idx3-ubyte.gz"))[:64])
    write_idx(tmp_path / "l.idx1.gz", read_idx(os.path.join(mnist, "train-labels.idx1-ubyte.gz"))[:64])
    data = tmp_path / "m.data"
    data.write_text(f"classes=10\ntrain={tmp_path}/i.idx3.gz\ntrain_labels={tmp_path}/l.idx1.gz\n"
                    f"backup={tmp_path}/backup\n")
    text = open(os.path.join(CFG, "mnist.cfg")).read()
    text = text.replace("batch=128", "batch=16\nangle=10\nmin_crop=28\nmax_crop=34\nflip=0")
    cfg = tmp_path / "aug-mnist.cfg"
    cfg.write_text(text.replace("max_batches=2000", "max_batches=3"))
    assert cli.main(["train", str(cfg), "--data", str(data), "--cpu"]) == 0
    assert os.path.exists(tmp_path / "backup" / "aug-mnist_final.weights")


@pytest.mark.parametrize("jitter", ["0", ".2"])
def test_undecodable_image_in_a_worker_is_one_line(scenes, tmp_path, capsys, jitter):
    """An image a worker process cannot decode ends engine train with the usual one line, with
    and without augmentation."""
    folder = tmp_path / "broken"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "bad.png").write_bytes(b"not an image")
    listed = (open(DataConfig(scenes).values["train"]).read().split()[:3]
              + [str(folder / "images" / "bad.png")])
    (folder / "train.txt").write_text("\n".join(listed) + "\n")
    data = folder / "b.data"
    data.write_text(f"classes=10\ntrain={folder}/train.txt\nbackup={folder}/backup\n")
    cfg = _cfg(tmp_path, dict(flip=0), f"jitter={jitter}")
    code = cli.main(["train", cfg, "--data", str(data), "--cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "bad.png: cannot decode image" in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    """One fewer than the cores of the process's CPU affinity (not the machine's count), at
    least 1, at most MAX_WORKERS; os.cpu_count() where there is no affinity call; an MPI
    rank's share of the host's cores."""
    import engine.augmentation as augmentation

    for variable in augmentation.LOCAL_RANKS_VARIABLES:  # as if not under mpiexec
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    for cores, expected in ((1, 1), (2, 1), (16, 15), (33, 32), (128, 32)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        assert augmentation.default_workers() == expected
    assert augmentation.MAX_WORKERS == 32
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    for cores, expected in ((None, 1), (4, 3), (128, 32)):
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        assert augmentation.default_workers() == expected
    # the ranks of an MPI job on one host share its cores, unless each is bound to its own
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    for variable in augmentation.LOCAL_RANKS_VARIABLES:
        monkeypatch.setenv(variable, "8")
        assert augmentation.default_workers() == 15
        monkeypatch.delenv(variable)
    monkeypatch.setenv("MPI_LOCALNRANKS", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert augmentation.default_workers() == 15  # bound: its 16 cores are its share
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert augmentation.default_workers() == 1
    monkeypatch.delenv("MPI_LOCALNRANKS")
    # prefetched without `workers` takes default_workers' count (0 here: in this process)
    monkeypatch.setattr(augmentation, "default_workers", lambda: 0)
    jobs = iter(range(3))
    made = augmentation.prefetched(lambda: (next(jobs), None), lambda job: (job, os.getpid()),
                                   lambda work, _: work)
    assert next(made) == (0, os.getpid())


def test_workers_keep_the_memory_they_free(tmp_path):
    """keep_freed_memory (run in every worker) sets glibc's thresholds, so that an image's
    arrays reuse the last one's pages: augmenting 640x480 jpgs in a fresh process faults in
    a small part of the pages it faults in with glibc's defaults (about 3500 an image)."""
    import subprocess
    import sys

    from PIL import Image

    path = tmp_path / "x.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
    script = f"""
import resource, sys
import numpy as np
from engine.augmentation import DetectionAugmentation, keep_freed_memory, load_augmented
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
augmentation = DetectionAugmentation(jitter=0.3, flip=True, hue=0.1, exposure=1.5)
jobs = [({str(path)!r}, np.zeros((0, 5), np.float32), augmentation, (0, 0, n), 416, 416)
        for n in range(8)]
load_augmented(jobs[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for job in jobs:
    load_augmented(job)
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // len(jobs))
"""
    runs = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                                 text=True, check=True).stdout.split()
            for mode in ("kept", "default")}
    if runs["kept"][0] != "True":
        pytest.skip("not glibc: malloc's thresholds left as they are")
    assert 3 * int(runs["kept"][1]) < int(runs["default"][1]), runs
