"""engine/layers/{shortcut,yolo,region,reorg}.py: forward against element-by-element references
written from Darknet's index formulas (src/blas.c shortcut_cpu and reorg_cpu, forward_yolo_layer,
forward_region_layer), backward against finite differences, and the errors a bad cfg gets.
"""

import re

import numpy as np
import pytest

from engine.backends.numpy_backend import NumpyBackend
from engine.errors import ConfigError
from engine.network import Network

from helpers import build_layer, reference_iou, write_cfg
from test_layers_gradients import check_gradients


def _x(shape, seed=5):
    return np.random.default_rng(seed).standard_normal(shape)


def logistic(v):
    return 1 / (1 + np.exp(-v))


# ---- shortcut ------------------------------------------------------------------------------------
def shortcut_reference(previous, source, alpha, beta):
    """Darknet's shortcut_cpu, one element at a time."""
    out = previous.copy()
    b, c2, h2, w2 = previous.shape
    _, c1, h1, w1 = source.shape
    stride, sample = max(w1 // w2, 1), max(w2 // w1, 1)
    for n in range(b):
        for k in range(min(c1, c2)):
            for j in range(min(h1, h2)):
                for i in range(min(w1, w2)):
                    o = (n, k, j * sample, i * sample)
                    out[o] = alpha * out[o] + beta * source[n, k, j * stride, i * stride]
    return out


SHORTCUT_CASES = {
    # from shape, previous shape, options
    "same shape, linear": ((4, 6, 6), (4, 6, 6), "activation=linear"),
    "same shape, leaky, alpha/beta": ((4, 6, 6), (4, 6, 6), "activation=leaky\nalpha=0.5\nbeta=2"),
    "larger source map, fewer channels": ((3, 8, 8), (5, 4, 4), "activation=linear"),
    "smaller source map, more channels": ((6, 3, 3), (4, 6, 6), "activation=logistic"),
}


@pytest.mark.parametrize("case", sorted(SHORTCUT_CASES))
def test_shortcut_forward_and_gradients(tmp_path, case):
    source_shape, previous_shape, options = SHORTCUT_CASES[case]
    layer = build_layer(tmp_path, f"[shortcut]\nfrom=0\n{options}", previous_shape,
                        layer_shapes=[source_shape, previous_shape])
    previous, source = _x((2,) + previous_shape), _x((2,) + source_shape, seed=6)
    y = layer.forward(NumpyBackend(), [previous, source], False)
    reference = shortcut_reference(previous, source, layer.alpha, layer.beta)
    from engine import activations

    np.testing.assert_allclose(y, activations.activate(reference, layer.activation), rtol=1e-12)
    check_gradients(layer, [previous, source])


def test_shortcut_sums_the_named_layer(tmp_path):
    """from=-3 at layer 5 adds layer 2's output (G2a_core's L5), and the table says `res 2`."""
    shapes = [(2, 4, 4)] * 5
    layer = build_layer(tmp_path, "[shortcut]\nfrom=-3\nactivation=linear", (2, 4, 4), shapes)
    assert layer.input_indices == [4, 2]
    assert layer.describe().startswith("res    2")


# ---- reorg ---------------------------------------------------------------------------------------
def reorg_reference(x, stride, forward):
    """Darknet's reorg_cpu on the layer input's dims (c, h, w), one element at a time."""
    b, c, h, w = x.shape
    oc = c // (stride * stride)
    flat_in, flat_out = x.reshape(-1), np.empty(x.size)
    for n in range(b):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * n))
                    offset = k // oc
                    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (k % oc + oc * n))
                    if forward:
                        flat_out[out_index] = flat_in[in_index]
                    else:
                        flat_out[in_index] = flat_in[out_index]
    return flat_out


@pytest.mark.parametrize("reverse, shape", [(0, (8, 4, 6)), (1, (8, 2, 3)), (0, (18, 6, 3))])
def test_reorg_forward_and_gradients(tmp_path, reverse, shape):
    stride = 3 if shape[0] == 18 else 2
    layer = build_layer(tmp_path, f"[reorg]\nstride={stride}\nreverse={reverse}", shape)
    c, h, w = shape
    s2 = stride * stride
    assert layer.out_shape == ((c // s2, h * stride, w * stride) if reverse
                               else (c * s2, h // stride, w // stride))
    x = _x((2,) + shape)
    y = layer.forward(NumpyBackend(), x, False)
    # Darknet's forward calls reorg_cpu with forward=0, and forward=1 when reverse.
    np.testing.assert_array_equal(y.reshape(-1), reorg_reference(x, stride, bool(reverse)))
    check_gradients(layer, [x])


def test_reorg_extra_appends_zeros(tmp_path):
    """go.cfg's `[reorg] extra=1`: the input flattened, then `extra` zeros (Darknet's calloc)."""
    layer = build_layer(tmp_path, "[reorg]\nextra=2\nstride=1", (1, 3, 3))
    assert layer.out_shape == (11, 1, 1)
    x = _x((2, 1, 3, 3))
    y = layer.forward(NumpyBackend(), x, False)
    np.testing.assert_array_equal(y.reshape(2, -1), np.concatenate([x.reshape(2, -1),
                                                                    np.zeros((2, 2))], axis=1))
    check_gradients(layer, [x])


def test_reorg_of_yolov2_passthrough(tmp_path):
    layer = build_layer(tmp_path, "[reorg]\nstride=2", (64, 38, 38))
    assert layer.out_shape == (256, 19, 19)
    assert layer.describe() == "reorg              / 2    38 x  38 x  64   ->    19 x  19 x 256"


# ---- yolo and region -----------------------------------------------------------------------------
def test_yolo_forward_applies_logistic_as_darknet(tmp_path):
    classes, mask = 3, [1, 2]
    entries = 5 + classes
    layer = build_layer(tmp_path, f"[yolo]\nmask=1,2\nanchors=1,2,3,4,5,6\nclasses={classes}\nnum=3",
                        (len(mask) * entries, 2, 3))
    x = _x((2, len(mask) * entries, 2, 3)).astype(np.float32)
    y = layer.forward(NumpyBackend(), x, False)
    for a in range(len(mask)):
        for e in range(entries):
            channel = a * entries + e
            expected = x[:, channel] if e in (2, 3) else logistic(x[:, channel])
            np.testing.assert_allclose(y[:, channel], expected, rtol=1e-6, err_msg=f"entry {e}")
    np.testing.assert_array_equal(layer.mask_anchors, [[3, 4], [5, 6]])


@pytest.mark.parametrize("softmax", [0, 1])
def test_region_forward_as_darknet(tmp_path, softmax):
    classes, num = 4, 2
    entries = 5 + classes
    layer = build_layer(tmp_path, f"[region]\nanchors=1,1,2,2\nclasses={classes}\nnum={num}\n"
                        f"coords=4\nsoftmax={softmax}", (num * entries, 3, 3))
    x = _x((2, num * entries, 3, 3)).astype(np.float32)
    y = layer.forward(NumpyBackend(), x, False).reshape(2, num, entries, 3, 3)
    g = x.reshape(2, num, entries, 3, 3)
    np.testing.assert_allclose(y[:, :, :2], logistic(g[:, :, :2]), rtol=1e-6)
    np.testing.assert_array_equal(y[:, :, 2:4], g[:, :, 2:4])
    np.testing.assert_allclose(y[:, :, 4], logistic(g[:, :, 4]), rtol=1e-6)
    if softmax:
        e = np.exp(g[:, :, 5:] - g[:, :, 5:].max(axis=2, keepdims=True))
        expected = e / e.sum(axis=2, keepdims=True)
    else:
        expected = logistic(g[:, :, 5:])
    np.testing.assert_allclose(y[:, :, 5:], expected, rtol=1e-5)


# ---- errors that name the cfg line ---------------------------------------------------------------
BASE = """[convolutional]
filters=4
size=3
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=4
size=1
activation=leaky
"""


def build(tmp_path, extra, channels=3):
    path = write_cfg(tmp_path / "bad.cfg", {"batch": 1, "height": 8, "width": 8,
                                             "channels": channels}, BASE + "\n" + extra)
    return Network(path, backend=NumpyBackend(), quiet=True)


def line_of(tmp_path, text):
    lines = (tmp_path / "bad.cfg").read_text().splitlines()
    return [n for n, line in enumerate(lines, start=1) if line == text][-1]


@pytest.mark.parametrize("extra, key_line, message", [
    ("[route]\nlayers=7", "layers=7", r"layers=7 refers to layer 7, but only layers 0\.\.2"),
    ("[route]\nlayers=3", "layers=3", r"layers=3 refers to layer 3"),
    ("[route]\nlayers=-5", "layers=-5", r"layers=-5 refers to layer -2"),
    ("[route]\nlayers=-1,-3", "layers=-1,-3", r"cannot concatenate layer 0 \(8x8x4\) with layer 2 "
                                              r"\(4x4x4\)"),
    ("[shortcut]\nfrom=4", "from=4", r"from=4 refers to layer 4, but only layers 0\.\.2"),
    ("[convolutional]\nfilters=16\nsize=1\n\n[yolo]\nmask=0,9\nanchors=1,2,3,4\nclasses=3\nnum=2",
     "mask=0,9", r"mask index 9 lies outside the 2 anchors"),
    ("[convolutional]\nfilters=16\nsize=1\n\n[yolo]\nmask=0,1\nanchors=1,2,3,4\nclasses=3\nnum=3",
     "anchors=1,2,3,4", r"anchors gives 2 \(width, height\) pairs, but num=3"),
    ("[convolutional]\nfilters=15\nsize=1\n\n[yolo]\nmask=0,1\nanchors=1,2,3,4\nclasses=3\nnum=2",
     None, r"must have 2 anchors x 8 entries = 16 channels"),
    ("[convolutional]\nfilters=9\nsize=1\n\n[region]\nclasses=4\nnum=1\ntree=data/9k.tree",
     "tree=data/9k.tree", r"tree=\.\.\. \(YOLO9000's hierarchical softmax\) is not supported"),
    ("[reorg]\nstride=3", None, r"reorg by 3 does not fit the 4x4x4 input"),
])
def test_bad_cfg_errors_name_the_line(tmp_path, extra, key_line, message):
    with pytest.raises(ConfigError, match=message) as error:
        build(tmp_path, extra)
    where = re.match(r"(.*bad\.cfg):(\d+): \[(\w+)\]", str(error.value))
    assert where, str(error.value)
    if key_line is not None:
        assert int(where.group(2)) == line_of(tmp_path, key_line)


def test_shortcut_refuses_maps_that_scale_differently(tmp_path):
    """16x8 onto 12x4: Darknet's shortcut_cpu would fail its asserts; we name the line."""
    path = write_cfg(tmp_path / "bad.cfg", {"height": 8, "width": 16, "channels": 3},
                     "[convolutional]\nfilters=4\nsize=3\npad=1\n\n"
                     "[convolutional]\nfilters=4\nsize=5\n\n[shortcut]\nfrom=0")
    with pytest.raises(ConfigError, match=r"bad\.cfg:(\d+): \[shortcut\] cannot add layer 0 "
                       r"\(16x8x4\) to layer 1 \(12x4x4\): widths and heights must scale alike") as error:
        Network(path, backend=NumpyBackend(), quiet=True)
    assert str(error.value).split(":")[1] == str(line_of(tmp_path, "from=0"))


def test_shortcut_tolerates_mismatched_shapes_as_darknet_does(tmp_path):
    """A shortcut from an 8x8x4 map onto a 4x4x4 one builds (Darknet subsamples the larger map)."""
    net = build(tmp_path, "[shortcut]\nfrom=0")
    assert net.layers[-1].out_shape == (4, 4, 4)
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    net.forward(x)
    expected = shortcut_reference(net.outputs[2], net.outputs[0], 1.0, 1.0)
    np.testing.assert_allclose(net.outputs[3], expected, rtol=1e-6)


# ---- crop ----------------------------------------------------------------------------------------
def crop_reference(x, top, left, height, width, flip, scale, shift):
    """forward_crop_layer, one element at a time."""
    b, c, _, w = x.shape
    out = np.empty((b, c, height, width), x.dtype)
    for i in range(height):
        for j in range(width):
            col = w - left - j - 1 if flip else j + left
            out[:, :, i, j] = x[:, :, i + top, col] * scale + shift
    return out


def test_crop_centre_at_inference_random_in_training(tmp_path):
    layer = build_layer(tmp_path, "[crop]\ncrop_height=4\ncrop_width=3\nflip=1", (2, 7, 6))
    assert layer.out_shape == (2, 4, 3)
    assert layer.describe() == "Crop Layer: 7 x 6 -> 4 x 3 x 2 image"
    x = _x((2, 2, 7, 6)).astype(np.float32)
    ops = NumpyBackend()
    np.testing.assert_allclose(layer.forward(ops, x, False), crop_reference(x, 1, 1, 4, 3, False, 2, -1))
    seen = set()
    for _ in range(40):
        y = layer.forward(ops, x, True)
        matches = [(t, l, f) for t in range(4) for l in range(4) for f in (False, True)
                   if np.allclose(y, crop_reference(x, t, l, 4, 3, f, 2, -1))]
        assert matches, "a training crop is not a window of the input"
        seen.add(matches[0])
    assert len(seen) > 4 and {f for _, _, f in seen} == {False, True}
    assert layer.backward(ops, y, True) is None  # Darknet passes no delta back through [crop]


def test_crop_noadjust_keeps_values(tmp_path):
    layer = build_layer(tmp_path, "[crop]\ncrop_height=2\ncrop_width=2\nnoadjust=1", (1, 4, 4))
    x = _x((1, 1, 4, 4))
    np.testing.assert_array_equal(layer.forward(NumpyBackend(), x, False), x[:, :, 1:3, 1:3])


# ---- yolo loss -----------------------------------------------------------------------------------
def yolo_delta_reference(layer, output, truths, net_w, net_h):
    """forward_yolo_layer's training part, written from Darknet's loops over flat indexes."""
    b_count, _, h, w = output.shape
    n, classes = len(layer.mask), layer.classes
    outputs = output[0].size
    x, delta = output.reshape(-1).astype(np.float64), np.zeros(output.size)
    biases = layer.anchors.reshape(-1)

    def entry(b, location, e):
        return b * outputs + (location // (w * h)) * w * h * (4 + 1 + classes) + e * w * h + location % (w * h)

    def get_box(anchor, index, i, j):
        s = w * h
        return [(i + x[index]) / w, (j + x[index + s]) / h,
                np.exp(x[index + 2 * s]) * biases[2 * anchor] / net_w,
                np.exp(x[index + 3 * s]) * biases[2 * anchor + 1] / net_h]

    def delta_box(truth, anchor, index, i, j, scale):
        s = w * h
        target = [truth[0] * w - i, truth[1] * h - j, np.log(truth[2] * net_w / biases[2 * anchor]),
                  np.log(truth[3] * net_h / biases[2 * anchor + 1])]
        for k in range(4):
            delta[index + k * s] = scale * (target[k] - x[index + k * s])

    def delta_class(index, cls):
        s = w * h
        if delta[index]:
            delta[index + s * cls] = 1 - x[index + s * cls]
            return
        for k in range(classes):
            delta[index + s * k] = (k == cls) - x[index + s * k]

    for b in range(b_count):
        truth = [t for t in truths[b]]
        for j in range(h):
            for i in range(w):
                for a in range(n):
                    box_index = entry(b, a * w * h + j * w + i, 0)
                    pred = get_box(layer.mask[a], box_index, i, j)
                    best_iou, best_t = 0, 0
                    for t, tb in enumerate(truth):
                        v = reference_iou(pred, tb)
                        if v > best_iou:
                            best_iou, best_t = v, t
                    obj = entry(b, a * w * h + j * w + i, 4)
                    delta[obj] = 0 - x[obj]
                    if best_iou > layer.ignore_thresh:
                        delta[obj] = 0
                    if best_iou > layer.truth_thresh:
                        delta[obj] = 1 - x[obj]
                        delta_class(entry(b, a * w * h + j * w + i, 5), int(truth[best_t][4]))
                        tb = truth[best_t]
                        delta_box(tb, layer.mask[a], box_index, i, j, 2 - tb[2] * tb[3])
        for tb in truth:
            i, j = int(tb[0] * w), int(tb[1] * h)
            best_iou, best_n = 0, 0
            for a in range(layer.total):
                v = reference_iou([0, 0, biases[2 * a] / net_w, biases[2 * a + 1] / net_h], [0, 0, tb[2], tb[3]])
                if v > best_iou:
                    best_iou, best_n = v, a
            if best_n in layer.mask:
                a = layer.mask.index(best_n)
                box_index = entry(b, a * w * h + j * w + i, 0)
                delta_box(tb, best_n, box_index, i, j, 2 - tb[2] * tb[3])
                obj = entry(b, a * w * h + j * w + i, 4)
                delta[obj] = 1 - x[obj]
                delta_class(entry(b, a * w * h + j * w + i, 5), int(tb[4]))
    return delta.reshape(output.shape)


@pytest.mark.parametrize("truth_thresh", [1.0, 0.55])
def test_yolo_loss_is_darknets(tmp_path, truth_thresh):
    """Deltas for random outputs and truths: boxes matched to anchors 0..2 of this layer, one
    whose best anchor belongs to another layer, two truths in one cell, and predictions close
    enough to a truth to cross ignore_thresh (and truth_thresh when it is below 1)."""
    classes, h, w, net_w, net_h = 3, 4, 5, 80, 64
    text = (f"[yolo]\nmask=0,1,2\nanchors=8,6,16,20,40,30,70,60\nclasses={classes}\nnum=4\n"
            f"ignore_thresh=.5\ntruth_thresh={truth_thresh}")
    layer = build_layer(tmp_path, text, (3 * (5 + classes), h, w))
    rng = np.random.default_rng(7)
    raw = rng.standard_normal((2, 3 * (5 + classes), h, w)).astype(np.float32)
    ops = NumpyBackend()
    output = layer.forward(ops, raw, True)
    grid = output.reshape(2, 3, 5 + classes, h, w)
    # Truths near the decoded prediction of (image 0, anchor 1, cell (1, 2)), plus others.
    px = (2 + grid[0, 1, 0, 1, 2]) / w
    py = (1 + grid[0, 1, 1, 1, 2]) / h
    pw = np.exp(grid[0, 1, 2, 1, 2]) * 16 / net_w
    ph = np.exp(grid[0, 1, 3, 1, 2]) * 20 / net_h
    truths = [np.array([[px * 1.01, py, pw * 0.95, ph, 2],
                        [0.31, 0.62, 0.1, 0.09, 1],
                        [0.33, 0.63, 0.11, 0.1, 0],    # same cell and anchor as the previous
                        [0.8, 0.2, 0.9, 0.9, 1],       # best anchor 3: another layer's
                        [0, 0, 0, 0, 0],               # x == 0 ends the list
                        [0.5, 0.5, 0.2, 0.2, 1]], np.float32),
              np.array([[0.55, 0.45, 0.3, 0.4, 2]], np.float32)]
    cost, delta = layer.loss(ops, truths, net_w, net_h)
    valid = [truths[0][:4], truths[1]]
    expected = yolo_delta_reference(layer, output, valid, net_w, net_h)
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
    assert cost == pytest.approx(float((expected ** 2).sum()), rel=1e-5)
    assert layer.backward(ops, delta, True) is delta  # Darknet adds l.delta to net.delta as is
