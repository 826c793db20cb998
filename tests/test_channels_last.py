"""Activations stored channels last (NHWC) on the GPU (engine/backends/cuda/backend.py's
docstring). Without a GPU: the strides of a view of an NHWC array against numpy's, and the walk
the strided kernels take over them (emulated here element by element) against numpy's copy. On
the GPU: each operation on NHWC arrays against the same backend's NCHW result, and whole
networks with and without channels last."""

import os

import numpy as np
import pytest

from engine import Network
from engine.backends import views
from engine.backends.cuda import backend as cuda_backend
from engine.backends.cuda.backend import CudaBackend, _joint_walk
from engine.layers.anchor_activation import anchor_activate
from engine.layers.channels import channel_range, channel_slice, concat_channels
from engine.layers.upsample import upsample
from engine.precision import REDUCED
from helpers import transcribed_strided_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nhwc_buffer(logical):
    """The flat NHWC storage of an NCHW numpy array."""
    return np.ascontiguousarray(logical.transpose(0, 2, 3, 1)).reshape(-1)


def viewed(logical, view):
    """numpy's meaning of a View of an array of NCHW values (views.py's docstring)."""
    seen = logical.reshape(view.shape)
    if view.axes is not None:
        seen = seen.transpose(view.axes)
    index = tuple(np.arange(start, start + count * step, step) if step else np.full(count, start)
                  for start, count, step in view.window)
    return seen[np.ix_(*index)] if index else seen


# Views the layers make: a [route]'s channel range, an [upsample]'s repeated source, the YOLO
# activation's entries, an image's planes, a [reorg]-like permutation.
SHAPE = (2, 12, 4, 6)
VIEWS = [
    views.whole(SHAPE),
    channel_range(SHAPE, 4, 5),
    views.window((2, 3, 4, 24), None, None, (0, 2, 1)),
    views.window((2, 3, 4, 24), None, (1, 2, 1), (4, 0, 1)),
    views.whole((2, 12, 4, 1, 6, 1)),
    views.whole((2, 12, 2, 2, 6), axes=(0, 2, 1, 3, 4)),
    views.window(SHAPE, None, (11, 6, -2), (3, 2, -1), (0, 3, 2)),
]


@pytest.mark.parametrize("view", VIEWS)
def test_view_strides_over_nhwc_storage_are_numpys(view):
    logical = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    offset, counts, steps = views.strides(view, SHAPE)
    buffer = nhwc_buffer(logical)
    n = int(np.prod(counts))
    if n == 0:
        return
    index = np.indices(counts).reshape(len(counts), -1)
    at = offset + sum(k * s for k, s in zip(index, steps))
    np.testing.assert_array_equal(buffer[at], viewed(logical, view).reshape(-1))


def test_a_view_merging_channels_with_positions_is_refused():
    with pytest.raises(ValueError, match="channels last"):
        views.strides(views.whole((2, 12 * 4 * 6)), SHAPE)


# (source shape, its view, destination shape, its view): the copies the layers make.
COPIES = [
    (SHAPE, views.whole(SHAPE), SHAPE, views.whole(SHAPE)),
    ((2, 5, 4, 6), views.whole((2, 5, 24)), SHAPE, channel_range(SHAPE, 4, 5)),  # [route]
    (SHAPE, channel_range(SHAPE, 3, 6), (2, 6, 4, 6), views.whole((2, 6, 24))),  # a slice
    ((2, 12, 2, 3), views.window((2, 12, 2, 1, 3, 1), None, None, None, (0, 2, 0), None,
                                 (0, 2, 0)), SHAPE, views.whole((2, 12, 2, 2, 3, 2))),  # upsample
    (SHAPE, VIEWS[2], SHAPE, VIEWS[2]),  # scale_x_y on the YOLO entries, in place
    (SHAPE, VIEWS[6], (2, 6, 2, 3), views.whole((2, 6, 2, 3))),  # reversed, strided
    (SHAPE, VIEWS[5], (2, 2, 12, 2, 6), views.whole((2, 2, 12, 2, 6))),  # permuted axes
]


@pytest.mark.parametrize("src_nhwc, dst_nhwc", [(True, True), (True, False), (False, True)])
def test_strided_copy_walks_over_nhwc_arrays_copy_as_numpy(src_nhwc, dst_nhwc):
    """Each copy above, walked as the kernel walks it, gives numpy's copy; and an NHWC
    destination's channels are the walk's fastest-moving axis."""
    rng = np.random.default_rng(0)
    walked_copies = 0
    for src_shape, src_view, dst_shape, dst_view in COPIES:
        src_nhwc_here = src_nhwc and len(src_shape) == 4
        dst_nhwc_here = dst_nhwc and len(dst_shape) == 4
        src = rng.standard_normal(src_shape)
        dst = rng.standard_normal(dst_shape)
        expected = dst.copy()
        positions = viewed(np.arange(dst.size).reshape(dst_shape), dst_view).reshape(-1)
        expected.reshape(-1)[positions] = viewed(src, src_view).reshape(-1)
        n, counts, (src_walk, dst_walk) = _joint_walk((
            (src_view, src.size, src_shape if src_nhwc_here else None),
            (dst_view, dst.size, dst_shape if dst_nhwc_here else None)))
        src_buffer = nhwc_buffer(src) if src_nhwc_here else src.reshape(-1)
        dst_buffer = nhwc_buffer(dst) if dst_nhwc_here else dst.reshape(-1).copy()
        elements = np.arange(n)
        dst_buffer[transcribed_strided_at(elements, counts, dst_walk)] = \
            src_buffer[transcribed_strided_at(elements, counts, src_walk)]
        if dst_nhwc_here:
            b, c, h, w = dst_shape
            got = dst_buffer.reshape(b, h, w, c).transpose(0, 3, 1, 2)
        else:
            got = dst_buffer.reshape(dst_shape)
        np.testing.assert_array_equal(got, expected, err_msg=f"{src_view} -> {dst_view}")
        if dst_nhwc_here:  # the walk's innermost axis (c0 when it is the only one) steps by 1
            inner = [step for count, step in zip(counts, dst_walk[2:]) if count != 1]
            assert (inner or [dst_walk[1]])[-1] == 1, "the destination's channels come fastest"
        walked_copies += 1
    assert walked_copies == len(COPIES)


def test_every_other_operation_is_given_nchw_arrays():
    """The operations that follow NHWC arrays, and those of no activations, are the backend's
    own; every other operation is wrapped (_given_nchw)."""
    operations = {name for name in dir(CudaBackend)
                  if not name.startswith("_") and callable(getattr(CudaBackend, name))}
    aware, plain = cuda_backend.CHANNELS_LAST_AWARE, cuda_backend.NO_ACTIVATIONS
    assert aware <= operations and plain <= operations and not aware & plain
    assert cuda_backend.NCHW_ONLY == operations - aware - plain
    for name in cuda_backend.NCHW_ONLY:
        assert hasattr(getattr(CudaBackend, name), "__wrapped__"), name
    assert {"connected_forward", "bias_backward", "scatter_cells_"} <= cuda_backend.NCHW_ONLY


# ---- on the GPU ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=REDUCED)
def pair(request):
    """(NHWC backend, NCHW backend) of one reduced precision."""
    return (CudaBackend(0, precision=request.param),
            CudaBackend(0, precision=request.param, channels_last=False))


def same(last, first, a, b, what, tolerance=0.0):
    """a (from the NHWC backend) and b (from the NCHW one) hold the same values."""
    got, want = last.to_host(a), first.to_host(b)
    assert got.shape == want.shape, what
    error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12) if want.size else 0
    assert error <= tolerance, f"{what} in {last.precision}: {error:.3g}"


@pytest.mark.gpu
def test_operations_on_nhwc_arrays_match_nchw(pair):
    last, first = pair
    assert last.channels_last and not first.channels_last
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 13, 11)).astype(np.float32)
    image = rng.standard_normal((2, 3, 20, 18)).astype(np.float32)
    w = (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32)
    w_image = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w_groups = (rng.standard_normal((16, 8, 1, 1)) * 0.3).astype(np.float32)
    w_odd = (rng.standard_normal((13, 16, 1, 1)) * 0.3).astype(np.float32)
    biases = rng.standard_normal(24).astype(np.float32)
    conv = {}
    for ops in pair:
        frozen = ops.freeze_(ops.asarray(w))
        y = ops.conv_forward(ops.asarray(x), frozen, 1, 1, 1)
        conv[ops] = dict(
            y=y, biased=ops.add_bias_(ops.copy(y), ops.asarray(biases), "leaky"),
            stride2=ops.conv_forward(ops.asarray(x), ops.asarray(w), 2, 1, 1),
            image=ops.conv_forward(ops.asarray(image), ops.asarray(w_image), 1, 1, 1),
            groups=ops.conv_forward(ops.asarray(x), ops.asarray(w_groups), 1, 0, 2),
            odd=ops.add_bias_(ops.conv_forward(ops.asarray(x), ops.asarray(w_odd), 1, 0, 1),
                              ops.asarray(biases[:13]), "logistic"))
    for name in conv[last]:  # "odd": a bias over 13 channels, a value per thread (not packs)
        assert conv[last][name].channels_last, f"{name}: stored channels last"
        assert not getattr(conv[first][name], "channels_last", False)
        same(last, first, conv[last][name], conv[first][name], f"conv {name}", 1e-2)
    # From here on both backends start from the same values (the NHWC one's, copied in).
    y_host = last.to_host(conv[last]["y"])
    y = {ops: ops.conv_forward(ops.asarray(x), ops.asarray(w), 1, 1, 1) for ops in pair}
    for ops in pair:
        ops.set_(y[ops], y_host)  # written through the NCHW copy and back
    assert y[last].channels_last
    same(last, first, y[last], y[first], "set_ into an NHWC array")
    params = [rng.standard_normal(24).astype(np.float32), biases,
              rng.standard_normal(24).astype(np.float32), rng.random(24).astype(np.float32)]
    connected = (rng.standard_normal((5, 24 * 13 * 11)) * 0.01).astype(np.float32)
    results = {}
    for ops in pair:
        a = y[ops]
        r = results[ops] = {}
        r["bias"] = ops.add_bias_(ops.copy(a), ops.asarray(biases), "mish")
        r["bn"] = ops.batchnorm_forward_inference(a, *map(ops.asarray, params),
                                                  activation="leaky")
        r["pool2"] = ops.maxpool_forward(a, 2, 2, 0, 7, 6, train=False)[0]
        r["spp"] = ops.maxpool_forward(a, 5, 1, 2, 13, 11, train=False)[0]
        r["up"] = upsample(ops, a, 2, 1.0)
        r["route"] = concat_channels(ops, [a, (r["bias"], 8, 20), r["bn"]])
        r["slice"] = channel_slice(ops, a, 12, 24)
        r["read"] = ops.channels_to_read(a, 3, 9)
        r["yolo"] = anchor_activate(ops, a, 3, [(0, 2), (4, 8)], affines=[(0, 2, 1.1, -0.05)])
        r["region"] = anchor_activate(ops, a, 3, [(0, 2)], softmax_range=(5, 8))
        r["scaled"] = ops.scale_(ops.copy(a), 0.5)
        r["sum"] = ops.add_(ops.copy(a), r["bias"])
        r["reshape"] = ops.reshape(a, (2, 24 * 13 * 11))
        # operations given NCHW copies: reads, and one writing its argument in place
        r["connected"] = ops.connected_forward(a, ops.asarray(connected))
        r["avgpool"] = ops.sum_to(ops.reshape(a, (2, 24, 143)), (2, 24, 1), 1 / 143)
        r["channel_max"] = ops.channel_max(a, 4)[0]
        r["gradient"] = ops.activation_backward_(a, ops.copy(r["bias"]), "leaky")
        r["pair"] = ops.add(a, r["bias"], 1.0, -2.0)  # a [shortcut]
        r["product"] = ops.multiply(r["bias"], a)
        r["broadcast"] = ops.add(a, ops.sum_to(a, (2, 24, 1, 1)), 1.0, -1.0)
    for name in results[last]:
        expected_nhwc = name in ("bias", "bn", "pool2", "spp", "up", "route", "slice", "read",
                                 "yolo", "region", "scaled", "sum", "gradient", "pair",
                                 "product")
        assert getattr(results[last][name], "channels_last", False) == expected_nhwc, name
        same(last, first, results[last][name], results[first][name], name,
             1e-5 if name == "connected" else 0.0)
    finite = [ops.output_reader([results[ops]["route"], results[ops]["yolo"]]) for ops in pair]
    for got, want in zip(*(reader.values()[0] for reader in finite)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_training_operations_on_nhwc_arrays_match_nchw(pair):
    """A convolution trained through batch norm with a fused activation, then max pooling and
    a dropout: forward, backward and the parameters' updates alike in both layouts (the NHWC
    backend's arrays staying NHWC); batch norm over channels that are not whole packs goes
    NCHW."""
    last, first = pair
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 16, 26, 20)).astype(np.float32)
    w = (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32)
    delta = rng.standard_normal((4, 24, 13, 10)).astype(np.float32)
    params = [rng.uniform(0.5, 1.5, 24), rng.standard_normal(24), np.zeros(24), np.ones(24)]
    got = {}
    for ops in pair:
        bn = [ops.asarray(p.astype(np.float32)) for p in params]
        updates = [ops.zeros((24, 16, 3, 3)), ops.zeros((24,)), ops.zeros((24,))]
        z = ops.conv_forward(ops.asarray(x), ops.asarray(w), 1, 1, 1, train=True)
        y, cache = ops.batchnorm_forward_train(z, *bn, activation="mish")
        pooled, winner = ops.maxpool_forward(y, 2, 2, 0, 13, 10)
        d = ops._activation(ops.asarray(delta))
        d = ops._relayout(d, ops.channels_last)  # as the next layer's backward gives it
        d = ops.maxpool_backward(d, winner, y.shape, 2, 2, 0)
        spp, spp_winner = ops.maxpool_forward(y, 5, 1, 2, 26, 20)  # overlapping windows
        d = ops.add(d, ops.maxpool_backward(spp, spp_winner, y.shape, 5, 1, 2), 1.0, 0.01)
        d = ops.batchnorm_backward(d, cache, bn[0], updates[1], updates[2])
        dx = ops.conv_backward(ops.asarray(x), ops.asarray(w), d, 1, 1, 1, updates[0], True)
        got[ops] = dict(z=z, y=y, pooled=pooled, dx=dx, weights=updates[0], scales=updates[1],
                        biases=updates[2], mean=bn[2], variance=bn[3])
        odd = ops.conv_forward(ops.asarray(x), ops.asarray(w[:12]), 1, 1, 1, train=True)
        odd_y, _ = ops.batchnorm_forward_train(odd, *[ops.asarray(p[:12].astype(np.float32))
                                                      for p in params], activation="leaky")
        got[ops]["odd"] = odd_y
    for name in ("z", "y", "pooled", "dx"):
        assert got[last][name].channels_last, name
    assert not getattr(got[first]["dx"], "channels_last", False)
    assert not getattr(got[last]["odd"], "channels_last", False)  # 12 halves: not whole packs
    for name in got[last]:
        same(last, first, got[last][name], got[first][name], name,
             {"fp16": 2e-2, "bf16": 8e-2}[last.precision])


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ["cfg/yolov4-tiny.cfg", "cfg/yolov3-tiny.cfg",
                                 "cfg/mnist-detect.cfg"])
def test_networks_predict_alike_with_and_without_channels_last(cfg, tmp_path):
    """predict, eager and recorded, in fp16: the NHWC backend's outputs are the NCHW one's
    (convolution algorithms differ: within fp16's rounding), and its convolutions' outputs were
    stored NHWC."""
    outputs = []
    for channels_last in (False, True):
        net = Network(os.path.join(ROOT, cfg), seed=3, quiet=True,
                      backend=CudaBackend(0, precision="fp16", channels_last=channels_last))
        if not outputs:
            net.save_weights(str(tmp_path / "w.weights"))
        net.load_weights(str(tmp_path / "w.weights"))
        images = np.random.default_rng(0).random((2,) + tuple(net.input_shape),
                                                 dtype=np.float32)
        unfolded = net.ops.to_host(net.forward(net.ops.asarray(images), train=False))
        stored_nhwc = [getattr(o, "channels_last", False) for o in net.outputs if o is not None]
        assert any(stored_nhwc) == channels_last
        net.fold_batchnorm()
        runs = [net.predict(images, batch_size=2) for _ in range(3)]
        np.testing.assert_array_equal(runs[1], runs[2])
        scale = np.max(np.abs(runs[2]))
        assert np.max(np.abs(unfolded.reshape(runs[2].shape) - runs[2])) <= 1e-2 * scale
        outputs.append(runs[2])
    error = np.max(np.abs(outputs[1] - outputs[0])) / np.max(np.abs(outputs[0]))
    assert error <= 1e-2, f"{cfg}: {error:.3g} of the output scale"
