"""Training images augmented as AlexeyAB's Darknet does: detectors below, classifiers at the end.

Detector training images are augmented as AlexeyAB's Darknet does (load_data_detection in
src/data.c, its path without OpenCV, and distort_image in src/image.c), with the boxes
transformed exactly with the image. Only training is augmented; inference never is.

Keys (Darknet's defaults): [net] `flip` (1), `hue` (0), `saturation` (1), `exposure` (1),
`letter_box` (0), `mixup` (0); the last [yolo] layer's `jitter` (0.2). Per image:

- jitter: the image (ow x oh) is cropped by pleft, pright, ptop, pbot pixels, each drawn
  uniformly in [-jitter*ow, jitter*ow] (heights alike) and truncated to an integer; a negative
  amount widens the crop, whose outside repeats the border pixels (Darknet's crop_image
  clamps); the crop is then resized to the network input with Darknet's resize_image (read
  straight from the image: resize_bilinear's window). With letter_box the crop is widened (or
  heightened) to keep the image's aspect ratio in the network's.
- flip: mirrored left-right half of the time.
- hue, saturation, exposure: in Darknet's HSV, hue shifted by U(-hue, hue) (wrapping), S and V
  scaled by rand_scale (U(1, s), inverted half of the time), RGB clamped to [0, 1].
- boxes: edges mapped by the same crop and scale, mirrored with the image, clamped to [0, 1];
  boxes then narrower or lower than one network pixel are dropped (fill_truth_detection).
- mixup=1: half of the batches are blended 0.5/0.5 with a second, independently augmented batch
  of random images; the second batch's boxes follow the first's (blend_truth).

Refused when training (an error naming the line): `mosaic`, `blur` and `cutmix` (Darknet does
them only in its OpenCV path, not implemented here; Darknet refuses cutmix for detectors too).
Random draws come from numpy generators seeded by (seed, batch, image), so a seed gives the same
images whichever worker process augments them.
"""

from dataclasses import dataclass

import numpy as np

from .images import read_rgb, resize_bilinear
from .shared_batches import worker_array


@dataclass(frozen=True)
class DetectionAugmentation:
    jitter: float = 0.0
    flip: bool = False
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0
    letter_box: bool = False
    mixup: bool = False

    @property
    def changes_images(self):
        return bool(self.jitter or self.flip or self.hue or self.saturation != 1
                    or self.exposure != 1 or self.letter_box or self.mixup)

    @staticmethod
    def from_network(net):
        """The augmentation a detector cfg asks for (Darknet's defaults for absent keys)."""
        s = net.options.section
        for key in ("mosaic", "blur", "cutmix"):
            if s.int(key, 0):
                raise s.error(f"{key}={s.str(key)}: not implemented (Darknet does it only in its "
                              f"OpenCV build); set {key}=0", key)
        heads = [layer for layer in net.layers if layer.type_name in ("yolo", "region")]
        jitter = heads[-1].section.float("jitter", 0.2) if heads else 0.0
        if not 0 <= jitter < 0.5:
            raise heads[-1].section.error(f"jitter={jitter}: expected 0 <= jitter < 0.5", "jitter")
        return DetectionAugmentation(
            jitter=jitter, flip=s.bool("flip", True), hue=s.float("hue", 0.0),
            saturation=s.float("saturation", 1.0) or 1.0, exposure=s.float("exposure", 1.0) or 1.0,
            letter_box=s.bool("letter_box", False), mixup=s.int("mixup", 0) == 1)


@dataclass(frozen=True)
class ImageDraw:
    """One image's random choices (Darknet's r1..r4, flip, dhue, dsat, dexp)."""

    crop: tuple  # r1..r4 in [0, 1)
    flip: bool
    hue: float
    saturation: float
    exposure: float


def rand_scale(rng, s):
    """Darknet's rand_scale: U(1, s), or its inverse half of the time."""
    scale = rng.uniform(min(1, s), max(1, s))
    return scale if rng.integers(2) else 1 / scale


def draw(augmentation, rng):
    a = augmentation
    return ImageDraw(crop=tuple(rng.random(4)), flip=bool(a.flip and rng.integers(2)),
                     hue=rng.uniform(-a.hue, a.hue) if a.hue else 0.0,
                     saturation=rand_scale(rng, a.saturation), exposure=rand_scale(rng, a.exposure))


def crop_amounts(augmentation, choice, ow, oh, net_w, net_h):
    """(pleft, pright, ptop, pbot) in pixels, as load_data_detection computes them."""
    dw, dh = int(ow * augmentation.jitter), int(oh * augmentation.jitter)
    r1, r2, r3, r4 = choice.crop
    # rand_precalc_random(-d, d, r) = r * 2d - d, stored in an int (truncated toward zero).
    pleft, pright = int(r1 * 2 * dw - dw), int(r2 * 2 * dw - dw)
    ptop, pbot = int(r3 * 2 * dh - dh), int(r4 * 2 * dh - dh)
    if augmentation.letter_box:
        image_ratio, net_ratio = ow / oh, net_w / net_h
        if image_ratio / net_ratio > 1:
            delta = (ow / net_ratio - oh) / 2
            ptop, pbot = int(ptop - delta), int(pbot - delta)
        else:
            delta = (oh * net_ratio - ow) / 2
            pleft, pright = int(pleft - delta), int(pright - delta)
    return pleft, pright, ptop, pbot


def distort(image, hue, saturation, exposure):
    """Darknet's distort_image (3 channels: HSV; 1 channel: exposure only), clamped to [0, 1]:
    rgb_to_hsv, hue shifted by `hue` (wrapping), S scaled by `saturation`, V by `exposure`,
    hsv_to_rgb, in float32 (hue, saturation and exposure are Python floats). Done in blocks of
    pixels that stay in cache, through scratch arrays (_distort_block)."""
    if image.shape[0] < 3:
        return np.clip(image * exposure, 0, 1).astype(np.float32)
    _, h, w = image.shape
    rgb = np.ascontiguousarray(image, dtype=np.float32).reshape(3, -1)
    out = np.empty_like(rgb)
    pixels = rgb.shape[1]
    floats, masks = np.empty((10, min(DISTORT_BLOCK, pixels)), np.float32), \
        np.empty((8, min(DISTORT_BLOCK, pixels)), bool)
    for start in range(0, pixels, DISTORT_BLOCK):
        part = slice(start, start + DISTORT_BLOCK)
        _distort_block(rgb[:, part], out[:, part], hue, saturation, exposure, floats, masks)
    return out.reshape(3, h, w)


# Pixels per block of distort: 64K (its scratch 3 MB) measured fastest on 2 EPYC cores at 416x416
# and 640x480; smaller blocks pay numpy's per-call cost more often than they gain in cache.
DISTORT_BLOCK = 1 << 16
TWO, SIX = np.float32(2), np.float32(6)


def _distort_block(rgb, out, hue_shift, saturation, exposure, floats, masks):
    """distort on (3, n) pixels into out, with the float32 results, bit for bit, of Darknet's
    formulas written with np.where (tests/test_augmentation.py keeps that version). Masked
    choices (np.where, where=) cost 10-50x a plain pass on random masks, so every choice here is
    a sum of products with 0/1 masks, which is exact: one term is the chosen value, the others
    are +0 (or -0, and a zero hue's sign changes nothing below: f = h - floor(h) is +0 either
    way)."""
    n = rgb.shape[1]
    high, delta, safe, hue, sat, tmp, f, one_minus_f, x, value = floats[:, :n]
    positive, red, green, blue, mask, e0, e1, e2 = masks[:, :n]
    r, g, b = rgb
    # rgb_to_hsv
    np.maximum(r, g, out=high)
    np.maximum(high, b, out=high)
    np.minimum(r, g, out=delta)
    np.minimum(delta, b, out=delta)
    np.subtract(high, delta, out=delta)
    np.greater(delta, 0, out=positive)
    np.logical_not(positive, out=mask)
    np.multiply(delta, positive, out=safe)
    np.add(safe, mask, out=safe)                       # where(delta > 0, delta, 1)
    np.equal(r, high, out=red)
    np.equal(g, high, out=green)
    np.logical_or(red, green, out=blue)
    np.logical_not(blue, out=blue)                     # b highest, r and g not
    np.greater(green, red, out=green)                  # g highest, r not
    np.subtract(g, b, out=hue)                         # r highest: (g - b) / delta
    np.multiply(hue, red, out=hue)
    np.subtract(b, r, out=tmp)                         # g: 2 + (b - r) / delta
    np.multiply(tmp, green, out=tmp)
    np.add(hue, tmp, out=hue)
    np.subtract(r, g, out=tmp)                         # b: 4 + (r - g) / delta
    np.multiply(tmp, blue, out=tmp)
    np.add(hue, tmp, out=hue)
    np.divide(hue, safe, out=hue)
    np.multiply(blue, TWO, out=tmp)
    np.add(tmp, green, out=tmp)
    np.multiply(tmp, TWO, out=tmp)
    np.add(hue, tmp, out=hue)
    np.less(hue, 0, out=mask)
    np.multiply(mask, SIX, out=tmp)
    np.add(hue, tmp, out=hue)
    np.divide(hue, 6, out=hue)
    np.greater(high, 0, out=mask)                      # s = delta / v where v > 0, else 0
    np.multiply(high, mask, out=tmp)
    np.logical_not(mask, out=red)
    np.add(tmp, red, out=tmp)
    np.divide(delta, tmp, out=sat)
    np.multiply(sat, mask, out=sat)
    np.logical_and(mask, positive, out=mask)           # hue 0 where v or delta is 0
    np.multiply(hue, mask, out=hue)
    # the distortion: S and V scaled, hue shifted and wrapped into [0, 1]
    np.multiply(sat, saturation, out=sat)
    np.multiply(high, exposure, out=value)
    np.add(hue, hue_shift, out=hue)
    np.greater(hue, 1, out=mask)
    np.subtract(hue, mask, out=hue)
    np.less(hue, 0, out=mask)
    np.add(hue, mask, out=hue)
    # hsv_to_rgb: in sector floor(6h) each channel is v, p = v(1 - s), q = v(1 - sf) or
    # t = v(1 - s(1 - f)): all v(1 - s x) with x = 0, 1, f or 1 - f, exactly (s * 1 = s,
    # 1 - s * 0 = 1); s = 0 gives v in every sector, as Darknet's grey case does.
    np.multiply(hue, 6, out=hue)
    sector = np.floor(hue, out=tmp)
    np.subtract(hue, sector, out=f)
    np.subtract(1, f, out=one_minus_f)
    e3, e4, e5 = red, green, blue
    for k, equal in enumerate((e0, e1, e2, e3, e4)):
        np.equal(sector, k, out=equal)
    np.logical_or(e0, e1, out=e5)
    for equal in (e2, e3, e4):
        np.logical_or(e5, equal, out=e5)
    np.logical_not(e5, out=e5)                         # sector 5: any other (6 when h = 1)
    # (sectors where x = f, where x = 1 - f, where x = 1) for R, G and B
    for channel, (with_f, with_one_minus_f, ones) in enumerate(
            ((e1, e4, (e2, e3)), (e3, e0, (e4, e5)), (e5, e2, (e0, e1)))):
        np.multiply(f, with_f, out=x)
        np.multiply(one_minus_f, with_one_minus_f, out=tmp)
        np.add(x, tmp, out=x)
        np.logical_or(*ones, out=mask)
        np.add(x, mask, out=x)
        np.multiply(sat, x, out=x)
        np.subtract(1, x, out=x)
        np.multiply(value, x, out=out[channel])
    np.clip(out, 0, 1, out=out)


def transform_boxes(boxes, dx, dy, sx, sy, flip, net_w, net_h):
    """correct_boxes then fill_truth_detection's filter: rows (x, y, w, h, class) relative to
    the source image -> relative to the augmented image; boxes under one network pixel wide or
    high, and rows Darknet treats as no box (x = y = 0, or wholly outside the image), dropped."""
    x, y, w, h, cls = (boxes[:, k].astype(np.float64) for k in range(5))
    outside = ((x == 0) & (y == 0)) | (x + w / 2 < 0) | (y + h / 2 < 0) | (x - w / 2 > 1) | \
        (y - h / 2 > 1)
    left, right = (x - w / 2) * sx - dx, (x + w / 2) * sx - dx
    top, bottom = (y - h / 2) * sy - dy, (y + h / 2) * sy - dy
    if flip:
        left, right = 1 - right, 1 - left
    left, right, top, bottom = (np.clip(v, 0, 1) for v in (left, right, top, bottom))
    fitted = np.stack([(left + right) / 2, (top + bottom) / 2, right - left, bottom - top, cls], 1)
    keep = ~outside & (fitted[:, 2] >= 1 / net_w) & (fitted[:, 3] >= 1 / net_h)
    return fitted[keep].astype(np.float32)


def augment(image, boxes, augmentation, choice, net_w, net_h):
    """One image (C, oh, ow) in [0, 1] and its label rows -> (C, net_h, net_w) and its rows."""
    _, oh, ow = image.shape
    pleft, pright, ptop, pbot = crop_amounts(augmentation, choice, ow, oh, net_w, net_h)
    swidth, sheight = ow - pleft - pright, oh - ptop - pbot
    sx, sy = swidth / ow, sheight / oh
    sized = resize_bilinear(image, net_w, net_h, window=(pleft, ptop, swidth, sheight))
    if choice.flip:
        sized = sized[:, :, ::-1]
    if choice.hue or choice.saturation != 1 or choice.exposure != 1:
        sized = distort(sized, choice.hue, choice.saturation, choice.exposure)
    dx, dy = pleft / ow / sx, ptop / oh / sy
    return np.ascontiguousarray(sized), transform_boxes(boxes, dx, dy, 1 / sx, 1 / sy,
                                                        choice.flip, net_w, net_h)


def load_augmented(job):
    """(path, boxes, augmentation, seed tuple, net_w, net_h) -> (image, rows)."""
    path, boxes, augmentation, seed, net_w, net_h = job
    rng = np.random.default_rng(seed)
    return augment(read_rgb(path), boxes, augmentation, draw(augmentation, rng), net_w, net_h)


def load_augmented_part(part):
    """Worker entry point: (block name or None, first, jobs) -> each job's load_augmented
    (image, rows), in order. With a block (engine.shared_batches) each image is written into
    it, as image first, first + 1, ... of the batch, and its shape comes back in its place."""
    name, first, jobs = part
    results = []
    for i, job in enumerate(jobs):
        image, rows = load_augmented(job)
        if name is not None:
            worker_array(name, first + i, (1,) + image.shape)[0] = image
            image = image.shape
        results.append((image, rows))
    return results


def placed_pieces(items, pieces, name):
    """in_pieces(items, pieces) as (name, index of the piece's first item, piece): where each
    worker's part of a batch goes in the batch's shared-memory block `name`."""
    parts, first = [], 0
    for piece in in_pieces(items, pieces):
        parts.append((name, first, piece))
        first += len(piece)
    return parts


def truth_rows(per_image, max_boxes):
    """Darknet's net.truth: each image's rows (x, y, w, h, class), zero-padded to max_boxes."""
    truth = np.zeros((len(per_image), max_boxes * 5), np.float32)
    for i, rows in enumerate(per_image):
        rows = rows[:max_boxes]
        truth[i, :rows.size] = rows.reshape(-1)
    return truth


# ---- classifiers -----------------------------------------------------------------------------
CLASSIFIER_KEYS = ("angle", "aspect", "min_crop", "max_crop", "flip", "hue", "saturation",
                   "exposure")


@dataclass(frozen=True)
class ClassifierAugmentation:
    """Darknet's classifier augmentation (load_image_augment_paths, random_augment_image,
    rotate_crop_image, random_distort_image), with its defaults for absent keys: angle 0,
    aspect 1, min_crop = width, max_crop = 2 * width, flip 1, hue 0, saturation 1, exposure 1.

    Per image: the aspect drawn by rand_scale, a short side r drawn in [min_crop, max_crop],
    an angle in [-angle, angle] degrees; the image scaled so its short side is r, rotated about
    its centre and cut to a size x size square (size = the larger of width and height) at a
    random offset within the scaled image, bilinear with zeros outside; mirrored half of the
    time with flip; recoloured (distort_image); resized to the network input."""

    width: int
    height: int
    angle: float = 0.0
    aspect: float = 1.0
    min_crop: int = 0
    max_crop: int = 0
    flip: bool = True
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0

    @staticmethod
    def from_network(net):
        """The cfg's augmentation, or None when its [net] names none of the keys: then images
        train as they are (our rule, so that cfg/mnist.cfg's recipe keeps plain images; Darknet
        would flip and zoom by default)."""
        s = net.options.section
        if not any(s.has(key) for key in CLASSIFIER_KEYS):
            return None
        o = net.options
        augmentation = ClassifierAugmentation(
            o.width, o.height, angle=s.float("angle", 0.0), aspect=s.float("aspect", 1.0) or 1.0,
            min_crop=s.int("min_crop", o.width), max_crop=s.int("max_crop", 2 * o.width),
            flip=s.bool("flip", True), hue=s.float("hue", 0.0),
            saturation=s.float("saturation", 1.0) or 1.0, exposure=s.float("exposure", 1.0) or 1.0)
        if not 0 < augmentation.min_crop <= augmentation.max_crop:
            raise s.error(f"min_crop={augmentation.min_crop}, max_crop={augmentation.max_crop}: "
                          "expected 0 < min_crop <= max_crop", "min_crop" if s.has("min_crop")
                          else "max_crop")
        for key in ("mixup", "blur", "cutmix", "mosaic"):
            if s.int(key, 0):
                raise s.error(f"{key}={s.str(key)}: not implemented for classifiers; set {key}=0",
                              key)
        return augmentation


def rotate_crop(image, radians, scale, size, dx, dy, aspect):
    """Darknet's rotate_crop_image to a size x size output: each output pixel samples the
    image (bilinear, zero outside) at its rotated, scaled and shifted position."""
    draw = ClassifierDraw(aspect, scale, np.cos(radians), np.sin(radians), dx, dy)
    return rotate_crop_batch(image[None], [draw], size)[0]


@dataclass(frozen=True)
class ClassifierDraw:
    """One image's random choices for random_augment_image and random_distort_image."""

    aspect: float
    scale: float
    cos: float  # of the angle: taken per image, so a batch rotates exactly as single images do
    sin: float
    dx: float
    dy: float
    flip: bool = False
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0


def classifier_draw(a, rng, h, w):
    """Darknet's draws for one h x w image, in its order: the aspect (rand_scale), the short
    side r in [min_crop, max_crop], the angle, the offsets, flip, then hue, saturation, exposure."""
    size = max(a.width, a.height)
    aspect = rand_scale(rng, a.aspect)
    short = int(rng.integers(a.min_crop, a.max_crop + 1))
    scale = short / int(min(h, w * aspect))  # Darknet stores the short side in an int
    radians = rng.uniform(-a.angle, a.angle) * 2 * np.pi / 360
    dx = max((w * scale / aspect - size) / 2, 0)
    dy = max((h * scale - size) / 2, 0)
    dx, dy = rng.uniform(-dx, dx), rng.uniform(-dy, dy)
    flip = bool(a.flip and rng.integers(2))
    hue = rng.uniform(-a.hue, a.hue) if a.hue else 0.0
    return ClassifierDraw(aspect, scale, np.cos(radians), np.sin(radians), dx, dy, flip, hue,
                          rand_scale(rng, a.saturation), rand_scale(rng, a.exposure))


def rotate_crop_batch(images, draws, size):
    """rotate_crop for a batch (n, C, H, W), image i with draws[i]: the same arithmetic, one
    pass over all the images (the per-image numpy calls were most of the time)."""
    n, c, h, w = images.shape

    def column(name):
        return np.array([getattr(draw, name) for draw in draws], np.float64)[:, None, None]

    aspect, scale, cos, sin = column("aspect"), column("scale"), column("cos"), column("sin")
    y, x = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                       indexing="ij")
    u = (x - size / 2) / scale * aspect + column("dx") / scale * aspect
    v = (y - size / 2) / scale + column("dy") / scale
    rx = cos * u - sin * v + w / 2
    ry = sin * u + cos * v + h / 2
    ix, iy = np.floor(rx), np.floor(ry)
    fx, fy = (rx - ix)[:, None], (ry - iy)[:, None]
    # Zeros outside: the images get a border of one zero pixel, and every position outside
    # them is moved onto that border (x in -1..w, y in -1..h, shifted by one).
    padded = np.zeros((n, c, h + 2, w + 2), images.dtype)
    padded[:, :, 1:-1, 1:-1] = images
    flat = padded.reshape(n, c, -1)
    ix, iy = ix.astype(np.int64) + 1, iy.astype(np.int64) + 1

    def pixel(px, py):  # (n, c, size, size): image i's pixels at (px[i], py[i])
        index = (np.minimum(np.maximum(py, 0), h + 1) * (w + 2)
                 + np.minimum(np.maximum(px, 0), w + 1))
        return np.take_along_axis(flat, index.reshape(n, 1, -1), axis=2).reshape(n, c, size, size)

    value = ((1 - fy) * (1 - fx) * pixel(ix, iy) + fy * (1 - fx) * pixel(ix, iy + 1)
             + (1 - fy) * fx * pixel(ix + 1, iy) + fy * fx * pixel(ix + 1, iy + 1))
    return value.astype(np.float32)


def augment_classifier_images(images, a, draws):
    """Images (n, C, H, W) in [0, 1] -> (n, C, a.height, a.width), image i augmented with
    draws[i], as load_image_augment_paths: crop, flip, recolour, resize."""
    crops = rotate_crop_batch(images, draws, max(a.width, a.height))
    flips = np.array([draw.flip for draw in draws])
    crops[flips] = crops[flips][..., ::-1]
    if crops.shape[1] < 3:  # distort_image on 1 or 2 channels: exposure only, one pass
        exposure = np.array([draw.exposure for draw in draws], np.float32)[:, None, None, None]
        crops = np.clip(crops * exposure, 0, 1).astype(np.float32)
    else:
        crops = np.stack([distort(crop, draw.hue, draw.saturation, draw.exposure)
                          for crop, draw in zip(crops, draws)])
    if crops.shape[2:] != (a.height, a.width):
        crops = np.stack([resize_bilinear(crop, a.width, a.height) for crop in crops])
    return np.ascontiguousarray(crops)


def augment_classifier_image(image, a, rng):
    """One (C, H, W) image in [0, 1] -> (C, a.height, a.width), as load_image_augment_paths."""
    _, h, w = image.shape
    return augment_classifier_images(image[None], a, [classifier_draw(a, rng, h, w)])[0]


def augment_classifier_batch(job):
    """Worker entry point: (images (n, C, H, W), augmentation, seed, batch) -> augmented images,
    image n drawn from the generator seeded by (seed, batch, n)."""
    images, augmentation, seed, batch = job
    _, _, h, w = images.shape
    draws = [classifier_draw(augmentation, np.random.default_rng([seed, batch, n]), h, w)
             for n in range(len(images))]
    return augment_classifier_images(images, augmentation, draws)


def keep_freed_memory():
    """Have glibc's malloc keep the arrays a worker frees for its next image. By default it
    gives blocks over 128 KB (a bound it raises as they are freed, to 32 MB at most) back to
    the system, and trims the heap's free top beyond twice that, so each image's arrays are
    fresh pages, faulted in one by one on first write: half of a worker's time on 640x480
    jpgs (15 instead of 8 ms an image, 2-core machine). Blocks under 32 MB (glibc's most)
    now come from the heap, which keeps up to 128 MB free. True where that was set (glibc);
    elsewhere nothing changes."""
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols to look up, or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 128 << 20))


def _worker_setup(trainer):
    """Workers leave Ctrl-C to the trainer, which saves its weights and stops them; and they
    end when the trainer is gone (killed), rather than wait for work forever. They keep the
    memory they free (keep_freed_memory)."""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()

    def watch():
        while os.getppid() == trainer:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def in_pieces(items, pieces):
    """items (a list) in at most `pieces` consecutive non-empty parts."""
    size = -(-len(items) // max(pieces, 1))
    return [items[i:i + size] for i in range(0, len(items), size)] if items else [items]


# The most worker processes prefetched starts by default. A batch of 64 split over 32 workers
# gives each two images (about 16 ms of work from 640x480 jpgs); more workers would each cost a
# process (35 MB, half a second to spawn) for a smaller share, while the trainer's own part of
# every batch (copying it into its page-locked array), which no worker can take, stays.
MAX_WORKERS = 32


# Environment variables in which MPI launchers give the number of ranks on this host (MPICH's
# Hydra, Open MPI): every rank of a data-parallel job runs a loader of its own.
LOCAL_RANKS_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def default_workers():
    """Worker processes for prefetched: one fewer than the cores this process may run on (its
    CPU affinity, which taskset, cgroups' cpusets and batch schedulers set; os.cpu_count()
    counts the whole machine), so that the trainer keeps a core; at least 1, at most
    MAX_WORKERS. A rank of an MPI job whose affinity spans the whole machine (not bound to
    cores by its launcher) takes its share of the cores: they divided by the ranks on the host
    (8 GPUs' ranks on 128 cores: 15 workers each)."""
    import os

    machine = os.cpu_count() or 2
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = machine
    if cores >= machine:
        ranks = next((int(os.environ[name]) for name in LOCAL_RANKS_VARIABLES
                      if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0), 1)
        cores //= ranks
    return min(MAX_WORKERS, max(1, cores - 1))


def prefetched(next_job, work, finish, workers=None, ahead=2, split=None, join=None,
               block_bytes=None):
    """Yield finish(work(job), plan) for successive (job, plan) = next_job(), with `work`
    running `ahead` jobs in advance in a pool of worker processes, so that the trainer does not
    wait on decoding and augmenting. With `split`, every worker takes a part of each job:
    split(job, workers) gives the parts, join(their work, in order) stands for work(job) (a
    batch of 64 images at 416 takes one worker about 0.5 s to augment). Results come in order, so
    they do not depend on which worker made them. A worker that dies ends training with an
    error instead of a hang.

    With `block_bytes` (and `split`), each job in the pool gets a shared-memory block of
    block_bytes(job) bytes (engine.shared_batches): the parts are split(job, workers, name),
    for the workers to write their arrays into the block `name`, and the trainer's part is
    finish(join(values), plan, block), which must copy what it keeps out of the block. In this
    process, or when /dev/shm lacks the room, name and block are None and the arrays come back
    as values."""
    import multiprocessing
    import os
    import sys
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from .errors import DataError
    from .shared_batches import BatchBlocks

    workers = workers if workers is not None else default_workers()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers == 0 or (main_file is not None and not os.path.exists(main_file)):
        # No workers asked for, or a program read from stdin, which spawned workers cannot
        # import: prepare each batch in this process when it is needed.
        while True:
            job, plan = next_job()
            if block_bytes:
                yield finish(join([work(part) for part in split(job, 1, None)]), plan, None)
            else:
                yield finish(work(job), plan)
    if split is None:
        workers = min(workers, ahead)  # whole jobs, `ahead` at a time: more would idle
    blocks = BatchBlocks(ahead) if block_bytes else None
    try:
        # spawn: the parent may hold a CUDA context, which forked children must not inherit.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_setup, initargs=(os.getpid(),)) as pool:
            pending = deque()  # ([futures of a job's parts], plan, its block)
            try:
                while True:
                    try:  # submit too raises BrokenProcessPool, once a worker has died
                        while len(pending) < ahead:
                            job, plan = next_job()
                            block = blocks.take(block_bytes(job)) if blocks else None
                            if blocks:
                                parts = split(job, workers, block.name if block else None)
                            else:
                                parts = split(job, workers) if split else [job]
                            pending.append(([pool.submit(work, part) for part in parts], plan,
                                            block))
                        results, plan, block = pending.popleft()
                        values = [result.result() for result in results]
                    except BrokenProcessPool:
                        raise DataError("a data-loading worker process stopped unexpectedly (out "
                                        "of memory, or of /dev/shm?)") from None
                    if not blocks:
                        yield finish(join(values) if split else values[0], plan)
                        continue
                    batch = finish(join(values), plan, block)
                    blocks.give_back(block)
                    yield batch
            finally:
                for results, _, _ in pending:
                    for future in results:
                        future.cancel()
    finally:
        if blocks:  # after the pool: no worker writes into a block any more
            blocks.close()
