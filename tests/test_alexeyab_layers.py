"""AlexeyAB's layers on the numpy backend: forward passes against plain numpy written from its
C (sam_layer.c, scale_channels_layer.c, shortcut_multilayer_cpu, forward_local_avgpool_layer,
reorg_layer.c, representation_layer.c, gaussian_yolo_layer.c), backward passes against float64
central finite differences, and the keys that are refused at their line."""

import numpy as np
import pytest

from engine.backends.numpy_backend import NumpyBackend
from engine.errors import ConfigError
from engine.network import Network

from helpers import as_float64, build_layer, write_cfg
from test_layers_gradients import check_gradients


def _x(shape, seed=5):
    return np.random.default_rng(seed).standard_normal(shape)


def logistic(v):
    return 1 / (1 + np.exp(-v))


# ---- sam and scale_channels -----------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["linear", "logistic"])
def test_sam_forward_and_gradients(tmp_path, activation):
    layer = build_layer(tmp_path, f"[sam]\nfrom=-2\nactivation={activation}", (3, 4, 5),
                        layer_shapes=[(3, 4, 5), (3, 4, 5)])
    a, b = _x((2, 3, 4, 5), 1), _x((2, 3, 4, 5), 2)
    y = layer.forward(NumpyBackend(), [a, b], False)
    want = a * b if activation == "linear" else logistic(a * b)
    np.testing.assert_allclose(y, want, rtol=1e-12)
    check_gradients(layer, [a, b])


@pytest.mark.parametrize("scale_wh", [0, 1])
def test_scale_channels_forward_and_gradients(tmp_path, scale_wh):
    scale_shape = (1, 4, 5) if scale_wh else (3, 1, 1)
    layer = build_layer(tmp_path, f"[scale_channels]\nfrom=-2\nscale_wh={scale_wh}", scale_shape,
                        layer_shapes=[(3, 4, 5), scale_shape])
    assert layer.out_shape == (3, 4, 5)
    scale, source = _x((2,) + scale_shape, 1), _x((2, 3, 4, 5), 2)
    y = layer.forward(NumpyBackend(), [scale, source], False)
    want = np.zeros_like(source)
    for b in range(2):  # forward_scale_channels_layer, index by index
        for k in range(3):
            for j in range(4):
                for i in range(5):
                    s = scale[b, 0, j, i] if scale_wh else scale[b, k, 0, 0]
                    want[b, k, j, i] = s * source[b, k, j, i]
    np.testing.assert_allclose(y, want, rtol=1e-12)
    check_gradients(layer, [scale, source])


def test_scale_channels_refuses_a_mismatched_input(tmp_path):
    with pytest.raises(ConfigError, match=r"\[scale_channels\] needs a 3 x 1 x 1 input"):
        build_layer(tmp_path, "[scale_channels]\nfrom=-2", (4, 1, 1),
                    layer_shapes=[(3, 4, 5), (4, 1, 1)])


# ---- AlexeyAB's shortcut --------------------------------------------------------------------------
def shortcut_reference(xs, weights, normalization):
    """shortcut_multilayer_cpu written with loops over inputs and channels (float64)."""
    out = np.zeros_like(xs[0])
    channels = xs[0].shape[1]
    n = len(xs)
    for k in range(channels):
        if weights is None:
            w = [1.0] * n
        else:
            raw = [weights[i, k if weights.shape[1] > 1 else 0] for i in range(n)]
            if normalization == "relu":
                total = 1e-4 + sum(max(v, 0) for v in raw)
                w = [max(v, 0) / total for v in raw]
            elif normalization == "softmax":
                top = max(raw)
                total = 1e-4 + sum(np.exp(v - top) for v in raw)
                w = [np.exp(v - top) / total for v in raw]
            else:
                w = raw
        for i, x in enumerate(xs):
            if k < x.shape[1]:
                out[:, k] += w[i] * x[:, k]
    return out


@pytest.mark.parametrize("text,channels", [
    ("from=-2,-3", (4, 4, 4)),
    ("from=-2\nweights_type=per_feature\nweights_normalization=relu", (4, 4)),
    ("from=-2,-3\nweights_type=per_channel\nweights_normalization=softmax", (4, 6, 3)),
    ("from=-2,-3\nweights_type=per_channel", (4, 3, 6)),
    ("from=-2\nweights_type=per_layer\nweights_normalization=avg_relu\nactivation=mish", (4, 2)),
])
def test_weighted_shortcut_forward_and_gradients(tmp_path, text, channels):
    """Several `from` layers and weights_type: w_0*prev + sum w_i*from_i (narrower sources add to
    the first channels, wider ones give only their first channels), then the activation."""
    previous, *sources = channels
    shapes = [(c, 3, 4) for c in reversed(sources)] + [(previous, 3, 4)]
    layer = build_layer(tmp_path, "[shortcut]\n" + text, (previous, 3, 4), layer_shapes=shapes)
    layer = as_float64(layer)
    rng = np.random.default_rng(3)
    if "weights" in layer.params:
        layer.params["weights"] = rng.uniform(0.2, 1.5, layer.params["weights"].shape)
    xs = [_x((2, previous, 3, 4), 1)] + [_x((2, c, 3, 4), 2 + i)
                                         for i, c in enumerate(sources)]
    y = layer.forward(NumpyBackend(), xs, False)
    normalization = layer.normalization and ("relu" if layer.normalization == "normalize_channels"
                                             else "softmax")
    want = shortcut_reference(xs, layer.params.get("weights"), normalization)
    if layer.activation == "mish":
        want = want * np.tanh(np.log1p(np.exp(want)))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    check_gradients(layer, xs, params=("weights",) if "weights" in layer.params else ())


def test_shortcut_weights_are_in_the_weights_file(tmp_path):
    """(inputs) or (inputs x channels) floats after the layers before, as save_shortcut_weights."""
    body = ("[convolutional]\nfilters=4\nsize=1\nactivation=linear\n\n"
            "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n\n"
            "[shortcut]\nfrom=-2\nweights_type=per_channel\nweights_normalization=relu\n\n"
            "[shortcut]\nfrom=-3,-2\nweights_type=per_feature\nweights_normalization=softmax\n")
    path = write_cfg(tmp_path / "s.cfg", {"batch": 1, "width": 4, "height": 4, "channels": 3}, body)
    net = Network(path, quiet=True)
    assert net.layers[2].params["weights"].shape == (2, 4)
    assert net.layers[3].params["weights"].shape == (3, 1)
    from engine.models import parameter_count
    assert parameter_count(net) == (4 + 12) + (4 + 16) + 8 + 3


def test_multilayer_shortcut_needs_equal_sizes(tmp_path):
    with pytest.raises(ConfigError, match=r"\[shortcut\] cannot add layer 0"):
        build_layer(tmp_path, "[shortcut]\nfrom=-2,-1\nweights_type=per_feature\n"
                    "weights_normalization=relu", (4, 3, 4), layer_shapes=[(4, 6, 8), (4, 3, 4)])


# ---- pooling, reorg3d, empty, implicit ------------------------------------------------------------
def local_avgpool_reference(x, size, stride, padding):
    b, c, h, w = x.shape
    out_h, out_w = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    y = np.zeros((b, c, out_h, out_w))
    offset = -(padding // 2)
    for i in range(out_h):
        for j in range(out_w):
            cells = [(offset + i * stride + n, offset + j * stride + m)
                     for n in range(size) for m in range(size)]
            cells = [(r, q) for r, q in cells if 0 <= r < h and 0 <= q < w]
            y[:, :, i, j] = sum(x[:, :, r, q] for r, q in cells) / len(cells)
    return y


@pytest.mark.parametrize("text,size,stride,padding", [("size=3\nstride=2", 3, 2, 2),
                                                       ("size=2\nstride=1", 2, 1, 1),
                                                       ("size=3\nstride=1\npadding=0", 3, 1, 0)])
def test_local_avgpool_forward_and_gradients(tmp_path, text, size, stride, padding):
    layer = build_layer(tmp_path, "[local_avgpool]\n" + text, (2, 5, 6))
    x = _x((2, 2, 5, 6))
    np.testing.assert_allclose(layer.forward(NumpyBackend(), x, False),
                               local_avgpool_reference(x, size, stride, padding), rtol=1e-12)
    check_gradients(layer, [x])


def reorg_cpu_reference(x, w, h, c, stride, forward):
    """AlexeyAB's reorg_cpu(x, w, h, c, batch, stride, forward, out), loop by loop."""
    batch = x.shape[0]
    flat, out = x.reshape(batch, -1), np.zeros((batch, x[0].size))
    in_c = c // (stride * stride)
    for k in range(c):
        for j in range(h):
            for i in range(w):
                in_index = i + w * (j + h * k)
                c2, offset = k % in_c, k // in_c
                w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                out_index = w2 + w * stride * (h2 + h * stride * c2)
                if forward:
                    out[:, out_index] = flat[:, in_index]
                else:
                    out[:, in_index] = flat[:, out_index]
    return out


@pytest.mark.parametrize("reverse,shape", [(0, (3, 4, 6)), (1, (32, 2, 3))])
def test_reorg3d_forward_and_gradients(tmp_path, reverse, shape):
    """[reorg3d] runs reorg_cpu on its *output's* dimensions (forward_reorg_layer); without
    reverse that is the textbook space-to-depth: channel (dy*s + dx)*C + c of the output holds
    x[c, y*s + dy, x*s + dx]."""
    layer = build_layer(tmp_path, f"[reorg3d]\nstride=2\nreverse={reverse}", shape)
    x = _x((2,) + shape)
    y = layer.forward(NumpyBackend(), x, False)
    oc, oh, ow = layer.out_shape
    np.testing.assert_array_equal(y.reshape(2, -1), reorg_cpu_reference(x, ow, oh, oc, 2, reverse))
    if not reverse:
        c = shape[0]
        for k in range(c):
            for dy in range(2):
                for dx in range(2):
                    np.testing.assert_array_equal(y[:, (dy * 2 + dx) * c + k], x[:, k, dy::2, dx::2])
    check_gradients(layer, [x])


def test_empty_and_silence_pass_through(tmp_path):
    for name in ("empty", "silence"):
        layer = build_layer(tmp_path, f"[{name}]", (3, 2, 2))
        x = _x((2, 3, 2, 2))
        np.testing.assert_array_equal(layer.forward(NumpyBackend(), x, False), x)
        check_gradients(layer, [x], params=())


def test_implicit_outputs_its_weights_and_learns_them(tmp_path):
    layer = as_float64(build_layer(tmp_path, "[implicit]\nfilters=5\natoms=2\nmean=1\nstd=0.1",
                                   (3, 4, 4)))
    assert layer.out_shape == (5, 2, 1) and layer.weight_order == ("weights",)
    weights = layer.params["weights"]
    assert np.all(np.abs(weights - 1) <= 0.1)
    y = layer.forward(NumpyBackend(), _x((3, 3, 4, 4)), False)
    np.testing.assert_array_equal(y, np.broadcast_to(weights, (3, 5, 2, 1)))
    r = _x(y.shape, 9)
    layer.updates["weights"][...] = 0
    assert layer.backward(NumpyBackend(), r, True) is None
    np.testing.assert_allclose(layer.updates["weights"], r.sum(axis=0))


# ---- Gaussian_yolo --------------------------------------------------------------------------------
def test_gaussian_yolo_forward_and_decoding(tmp_path):
    from engine import detection

    text = "[Gaussian_yolo]\nmask=0,1\nanchors=10,14,23,27,37,58\nclasses=2\nnum=3\nscale_x_y=1.2"
    layer = build_layer(tmp_path, text, (22, 3, 4))
    x = _x((1, 22, 3, 4)).astype(np.float32)
    y = layer.forward(NumpyBackend(), x, False)
    for a in range(2):
        for e in range(11):
            c = a * 11 + e
            want = x[:, c] if e in (4, 6) else logistic(x[:, c].astype(np.float64))
            if e in (0, 2):
                want = want * 1.2 - 0.1
            np.testing.assert_allclose(y[:, c], want, rtol=1e-6, atol=1e-6)
    found = detection.gaussian_yolo_detections(layer, y[0], 128, 96, 128, 96, 0.2, False)
    expected = []
    for a, (aw, ah) in enumerate(layer.mask_anchors):
        for j in range(3):
            for i in range(4):
                v = y[0, a * 11:(a + 1) * 11, j, i].astype(np.float64)
                if v[8] <= 0.2:
                    continue
                box = [(i + v[0]) / 4, (j + v[2]) / 3, np.exp(v[4]) * aw / 128, np.exp(v[6]) * ah / 96]
                uncertainty = (v[1] + v[3] + v[5] + v[7]) / 4
                probs = v[8] * v[9:] * (1 - uncertainty)
                expected.append((box, np.where(probs > 0.2, probs, 0)))
    assert len(found) == len(expected) > 0
    np.testing.assert_allclose(found.boxes, [b for b, _ in expected], rtol=1e-5)
    np.testing.assert_allclose(found.probs, [p for _, p in expected], rtol=1e-5, atol=1e-7)


# ---- keys refused at their line, stopbackward -----------------------------------------------------
@pytest.mark.parametrize("text,key", [
    ("[convolutional]\nfilters=2\nxnor=1", "xnor"),
    ("[convolutional]\nfilters=2\nsize=3\ndilation=2", "dilation"),  # without pad=1
    ("[convolutional]\nfilters=2\nsize=1\nshare_index=5", "share_index"),
    ("[convolutional]\nfilters=2\nantialiasing=3", "antialiasing"),
    ("[maxpool]\nsize=2\nstride_x=2\nstride_y=1", "stride_x"),
    ("[maxpool]\nsize=2\nmaxpool_zero_nonmax=1", "maxpool_zero_nonmax"),
    ("[convolutional]\nfilters=2\ntrain_only_bn=1", "train_only_bn"),
])
def test_alexeyab_keys_not_implemented_are_refused_at_their_line(tmp_path, text, key):
    path = write_cfg(tmp_path / "r.cfg", {"batch": 1, "width": 8, "height": 8, "channels": 3}, text)
    line = next(n for n, l in enumerate(open(path).read().splitlines(), 1) if l.startswith(key + "="))
    with pytest.raises(ConfigError, match=rf"r\.cfg:{line}: \[\w+\] {key}="):
        Network(path, quiet=True)


def test_dilation_one_and_equal_strides_are_accepted(tmp_path):
    text = "[convolutional]\nfilters=2\nsize=3\ndilation=1\nstride_x=1\nstride_y=1\n\n" \
           "[convolutional]\nfilters=2\nsize=1\ndilation=3\nstride=1"
    path = write_cfg(tmp_path / "ok.cfg", {"batch": 1, "width": 8, "height": 8, "channels": 3}, text)
    Network(path, quiet=True)


@pytest.mark.parametrize("section,reason", [("rnn", "recurrent"), ("lstm", "recurrent"),
                                            ("conv_lstm", "recurrent")])
def test_unsupported_sections_say_why(tmp_path, section, reason):
    path = write_cfg(tmp_path / "u.cfg", {"batch": 1, "width": 8, "height": 8, "channels": 3},
                     f"[{section}]\noutput=4")
    with pytest.raises(ConfigError, match=rf"u\.cfg:\d+: \[{section}\] .*{reason}"):
        Network(path, quiet=True)


def test_stopbackward_freezes_the_layers_before(tmp_path):
    body = ("[convolutional]\nfilters=2\nsize=1\nactivation=linear\n\n"
            "[convolutional]\nfilters=2\nsize=1\nactivation=linear\nstopbackward=1\n\n"
            "[convolutional]\nfilters=2\nsize=1\nactivation=linear\n")
    path = write_cfg(tmp_path / "f.cfg", {"batch": 1, "width": 2, "height": 2, "channels": 1}, body)
    net = Network(path, quiet=True)
    net.forward(net.ops.asarray(np.ones((1, 1, 2, 2), np.float32)), train=True)
    net.backward({2: np.ones((1, 2, 2, 2), np.float32)})
    assert np.abs(net.layers[2].updates["weights"]).sum() > 0
    assert not net.layers[1].updates["weights"].any() and not net.layers[0].updates["weights"].any()


def test_a_loaded_network_trains(tmp_path):
    """Weights read from a file are writable arrays: a training step after load_weights runs
    (golden A6's network: every new layer's backward in one pass)."""
    import os

    from conftest import GOLDEN

    root = os.path.join(GOLDEN, "A6_alexeyab_layers")
    net = Network(os.path.join(root, "a6_alexeyab_layers.cfg"), quiet=True)
    net.load_weights(os.path.join(root, "weights"))
    images = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    out = net.forward(net.ops.asarray(images), train=True)
    net.backward({len(net.layers) - 1: np.ones(out.shape, np.float32)})
    net.update(0.001)
    assert all(np.isfinite(layer.params[name]).all() for layer in net.layers
               for name in layer.params)


@pytest.mark.parametrize("text,shape", [
    ("filters=3\nsize=3\npad=1\ndilation=2\nactivation=linear", (2, 7, 8)),
    ("batch_normalize=1\nfilters=4\nsize=3\nstride=2\npad=1\ndilation=3\nactivation=leaky", (2, 9, 9)),
    ("filters=4\nsize=5\npad=1\ndilation=2\ngroups=2\nactivation=linear", (2, 9, 9)),
])
def test_dilated_convolution_forward_and_gradients(tmp_path, text, shape):
    """Dilated filters (AlexeyAB's dilation, padding times dilation) against a direct sum."""
    layer = as_float64(build_layer(tmp_path, "[convolutional]\n" + text, shape),
                       np.random.default_rng(2))
    x = _x((2,) + shape)
    if layer.batch_normalize:
        check_gradients(layer, [x])
        return
    y = layer.forward(NumpyBackend(), x, False)
    w, d, s, p = layer.params["weights"], layer.dilation, layer.stride, layer.padding * layer.dilation
    groups, k = layer.groups, layer.size
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    want = np.zeros(y.shape)
    per_group_in, per_group_out = shape[0] // groups, layer.filters // groups
    for f in range(layer.filters):
        g = f // per_group_out
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                window = padded[:, g * per_group_in:(g + 1) * per_group_in,
                                i * s:i * s + d * (k - 1) + 1:d, j * s:j * s + d * (k - 1) + 1:d]
                want[:, f, i, j] = (window * w[f]).sum(axis=(1, 2, 3)) + layer.params["biases"][f]
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    check_gradients(layer, [x])


def test_shared_convolution_trains_one_set_of_weights(tmp_path):
    body = ("[convolutional]\nfilters=2\nsize=3\npad=1\nactivation=linear\n\n"
            "[convolutional]\nfilters=2\nsize=3\npad=1\nactivation=linear\nshare_index=0\n")
    path = write_cfg(tmp_path / "s.cfg", {"batch": 1, "width": 4, "height": 4, "channels": 2}, body)
    net = Network(path, quiet=True)
    first, second = net.layers
    assert second.params is first.params and second.weight_order == ()
    from engine.models import parameter_count
    assert parameter_count(net) == 2 + 2 * 2 * 9
    x = _x((1, 2, 4, 4)).astype(np.float32)
    net.forward(x, train=True)
    net.backward({1: np.ones((1, 2, 4, 4), np.float32)})
    before = first.params["weights"].copy()
    net.update(0.1)
    assert not np.array_equal(first.params["weights"], before)
    np.testing.assert_array_equal(first.params["weights"], second.params["weights"])


@pytest.mark.parametrize("text,shape,out_hw", [
    ("[convolutional]\nbatch_normalize=1\nfilters=3\nsize=3\nstride=2\npad=1\nantialiasing=1\n"
     "activation=leaky", (2, 7, 7), (4, 4)),
    ("[convolutional]\nfilters=3\nsize=3\nstride=1\npad=1\nantialiasing=2\nactivation=linear",
     (2, 5, 6), (4, 5)),
    ("[maxpool]\nsize=2\nstride=2\nantialiasing=1", (2, 6, 6), (3, 3)),
])
def test_antialiasing_blurs_after_a_stride_one_pass(tmp_path, text, shape, out_hw):
    """antialiasing: the layer at stride 1, then the fixed depthwise blur at the layer's stride
    (golden A8 checks the values against AlexeyAB; here the blur and the gradients)."""
    layer = build_layer(tmp_path, text, shape)
    assert layer.out_shape[1:] == out_hw and layer.weight_order in ((), ("biases",) +
                                                                     (("scales", "rolling_mean",
                                                                       "rolling_variance")
                                                                      if "batch_normalize" in text
                                                                      else ()) + ("weights",))
    layer = as_float64(layer, np.random.default_rng(2))
    layer.blur.host_weights = layer.blur.host_weights.astype(np.float64)
    layer.blur.weights = layer.blur.host_weights
    x = _x((2,) + shape)
    if layer.type_name == "maxpool":
        x = x + np.arange(x.size).reshape(x.shape) * 1e-3  # no ties between pooled cells
    check_gradients(layer, [x])


@pytest.mark.parametrize("channels,groups", [(6, 3), (5, 2)])
def test_maxpool_depth_takes_the_maximum_across_channels(tmp_path, channels, groups):
    layer = build_layer(tmp_path, f"[maxpool]\nmaxpool_depth=1\nout_channels={groups}",
                        (channels, 3, 4))
    assert layer.out_shape == (groups, 3, 4)
    x = _x((2, channels, 3, 4))
    y = layer.forward(NumpyBackend(), x, False)
    for g in range(groups):
        np.testing.assert_array_equal(y[:, g], x[:, g::groups].max(axis=1))
    check_gradients(layer, [x], params=())


@pytest.mark.parametrize("text,shape,out_hw", [
    ("filters=3\nsize=3\nstride_x=2\nstride_y=1\npad=1\nactivation=linear", (2, 5, 7), (5, 4)),
    ("batch_normalize=1\nfilters=2\nsize=3\nstride=1\nstride_y=3\npad=1\ndilation=2\n"
     "activation=leaky", (2, 8, 6), (3, 6)),
])
def test_convolution_with_different_strides(tmp_path, text, shape, out_hw):
    """stride_x / stride_y (golden A7 checks values against AlexeyAB; here shapes, a direct
    sum and the gradients)."""
    layer = as_float64(build_layer(tmp_path, "[convolutional]\n" + text, shape),
                       np.random.default_rng(2))
    assert layer.out_shape[1:] == out_hw
    x = _x((2,) + shape)
    if not layer.batch_normalize:
        y = layer.forward(NumpyBackend(), x, False)
        p, w = layer.padding, layer.params["weights"]
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        for i in range(out_hw[0]):
            for j in range(out_hw[1]):
                window = padded[:, :, i * layer.stride_y:i * layer.stride_y + 3,
                                j * layer.stride_x:j * layer.stride_x + 3]
                want = np.einsum("bcij,fcij->bf", window, w) + layer.params["biases"]
                np.testing.assert_allclose(y[:, :, i, j], want, rtol=1e-10)
    check_gradients(layer, [x])


def test_yolov1_detection_layer_forward_and_decoding(tmp_path):
    """[detection] (YOLOv1): softmax over each cell's classes with softmax=1, identity otherwise;
    boxes as get_detection_detections decodes them."""
    from engine import detection

    side, classes, num = 2, 3, 2
    inputs = side * side * (classes + num * 5)
    for softmax in (0, 1):
        layer = build_layer(tmp_path, f"[detection]\nclasses={classes}\ncoords=4\nnum={num}\n"
                            f"side={side}\nsoftmax={softmax}\nsqrt=1", (inputs, 1, 1))
        x = np.random.default_rng(4).uniform(0.05, 0.95, (1, inputs, 1, 1)).astype(np.float32)
        y = layer.forward(NumpyBackend(), x, False)
        flat = x.reshape(-1).astype(np.float64)
        if softmax:
            for cell in range(side * side):
                block = flat[cell * classes:(cell + 1) * classes]
                flat[cell * classes:(cell + 1) * classes] = np.exp(block) / np.exp(block).sum()
        np.testing.assert_allclose(y.reshape(-1), flat, rtol=1e-6)
    found = detection.detection_v1_detections(layer, y[0], 0, 0, 0, 0, 0.1)
    assert len(found) == side * side * num
    for cell in range(side * side):
        row, col = divmod(cell, side)
        for n in range(num):
            index = cell * num + n
            scale = flat[side * side * classes + index]
            box = flat[side * side * (classes + num) + 4 * index:][:4]
            np.testing.assert_allclose(found.boxes[index], [(box[0] + col) / side,
                                                            (box[1] + row) / side,
                                                            box[2] ** 2, box[3] ** 2], rtol=1e-5)
            probs = scale * flat[cell * classes:(cell + 1) * classes]
            np.testing.assert_allclose(found.probs[index], np.where(probs > 0.1, probs, 0),
                                       rtol=1e-5)


def test_contrastive_outputs_zeros_and_refuses_training(tmp_path):
    layer = build_layer(tmp_path, "[contrastive]\nclasses=1\nyolo_layer=-2", (4, 2, 2))
    assert not layer.forward(NumpyBackend(), _x((2, 4, 2, 2)), False).any()
    with pytest.raises(ConfigError, match=r"\[contrastive\] training"):
        layer.check_trainable()
