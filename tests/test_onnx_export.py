"""ONNX export (engine/onnx_export.py) checked by ONNX Runtime on the CPU: every cfg in cfg/, the
golden sets from real Darknet, one small network per layer feature and activation; dynamic and
fixed batch, float16, box decoding and NonMaxSuppression against `engine detect`, the command
line and its one-line errors."""

import glob
import os
import sys

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx_helpers
from conftest import CFG, GOLDEN
from helpers import write_cfg
from onnx_helpers import (
    CI_SIZES,
    engine_outputs,
    images_for,
    random_network,
    relative_difference,
    resized_cfg,
    run_model,
    session,
)

from engine import activations, cli, detection, onnx_export
from engine.errors import ExportError
from engine.onnx_export import build_model, export_onnx

TOLERANCE = 1e-4       # exported outputs against the engine's, relative to the output's scale
FP16_TOLERANCE = 1e-2  # the float16 model against the engine
G2C = os.path.join(GOLDEN, "G2c_tiny_yolov3_div8")
G2C_CFG, G2C_WEIGHTS = os.path.join(G2C, "g2c_tiny_yolov3_div8.cfg"), os.path.join(G2C, "weights")


def checked_model(net, **options):
    """Export `net`; the model must pass onnx.checker with full shape inference."""
    model = build_model(net, **options)
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_matches_engine(net, model, batch, tolerance=TOLERANCE, seed=0):
    images = images_for(net, batch, seed)
    difference = relative_difference(run_model(model, images), engine_outputs(net, images))
    assert difference <= tolerance, f"relative difference {difference:.2e}"
    return difference


# ---- every cfg in cfg/ ---------------------------------------------------------------------------
CFG_NAMES = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(CFG, "*.cfg")))


@pytest.mark.parametrize("name", CFG_NAMES)
def test_cfg_exports_and_matches_the_engine(tmp_path, name):
    """Every cfg in cfg/, random weights and BN statistics; the large ones at a smaller input
    and with fewer filters (a cfg added later: 64x64, filters / 4). The full sizes:
    test_full_size_cfgs and tests/onnx_table.py."""
    size, divisor = CI_SIZES.get(name, (64, 4))
    net = random_network(resized_cfg(os.path.join(CFG, name + ".cfg"), tmp_path, size, divisor))
    assert_matches_engine(net, checked_model(net, batch="dynamic"), batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov3", "densenet201"])
def test_full_size_cfgs(tmp_path, request, name):
    """yolov3 takes about a minute on 2 cores: only with `pytest -m slow`."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size network: run with pytest -m slow")
    net = random_network(resized_cfg(os.path.join(CFG, name + ".cfg"), tmp_path))
    assert_matches_engine(net, checked_model(net), batch=1)


# ---- the golden sets: Darknet's own weights, inputs and outputs ----------------------------------
@pytest.mark.parametrize("folder", ["G1_mnist_trained", "G2a_core", "G2c_tiny_yolov3_div8",
                                    "G2d_activations"])
def test_golden_sets(folder):
    """The exported model on Darknet's inputs gives the engine's outputs, and Darknet's own."""
    import engine

    root = os.path.join(GOLDEN, folder)
    net = engine.load(glob.glob(os.path.join(root, "*.cfg"))[0], os.path.join(root, "weights"),
                      quiet=True)
    batch = 64 if folder.startswith("G1") else 2
    images = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
    images = images.reshape((batch,) + net.input_shape)
    got = run_model(checked_model(net, batch="dynamic"), images)
    assert relative_difference(got, engine_outputs(net, images)) <= TOLERANCE
    darknet = np.fromfile(os.path.join(root, "outputs.bin"), dtype="<f4").reshape(batch, -1)
    final = got["output"] if "output" in got else got[max(got, key=lambda k: int(k.split("_")[1]))]
    np.testing.assert_allclose(final.reshape(batch, -1), darknet, atol=TOLERANCE)


ALEXEYAB_SETS = ["A1_yolov4_tiny", "A2_yolov4_small", "A3_yolov7_tiny", "A4_efficientnet_b0",
                 "A5_sam", "A6_alexeyab_layers", "A7_dilation_share", "A8_antialiasing",
                 "A9_yolov7", "A10_gaussian_yolov3", "A11_yolov4_csp", "A12_yolov1_detection"]


def read_alexeyab_set(folder):
    """(network with AlexeyAB's weights, its inputs, {layer index: AlexeyAB's output})."""
    import engine

    root = os.path.join(GOLDEN, folder)
    with open(os.path.join(root, "layers.txt")) as handle:
        header = dict(item.split("=") for item in handle.readline().split()[2:])
    batch = int(header["batch_at_dump"])
    net = engine.load(glob.glob(os.path.join(root, "*.cfg"))[0], os.path.join(root, "weights"),
                      quiet=True)
    images = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
    dumps = {int(os.path.basename(p)[1:4]): np.fromfile(p, dtype="<f4").reshape(batch, -1)
             for p in glob.glob(os.path.join(root, "layers", "L*.bin"))}
    return net, images.reshape((batch,) + net.input_shape), dumps


@pytest.mark.parametrize("folder", ALEXEYAB_SETS)
def test_alexeyab_golden_sets(folder):
    """AlexeyAB's golden sets (its weights, inputs and per-layer outputs, AlexeyAB's BN rule):
    every exported output equals the engine's and what AlexeyAB's Darknet computed for that
    layer (relative to the larger of 1 and the layer's magnitude, as tests/
    test_alexeyab_golden.py)."""
    net, images, dumps = read_alexeyab_set(folder)
    got = run_model(checked_model(net, batch="dynamic"), images)
    assert relative_difference(got, engine_outputs(net, images)) <= TOLERANCE
    for name, values in got.items():
        index = net.output_layer.index if name == "output" else int(name.rsplit("_", 1)[1])
        expected = dumps[index]
        error = np.abs(values.reshape(len(images), -1) - expected).max()
        assert error / max(1.0, np.abs(expected).max()) <= TOLERANCE, (name, error)


def test_batch_norm_follows_the_networks_darknet(tmp_path):
    """The same cfg and parameters under pjreddie's rule (sqrt(var) + 1e-6) and AlexeyAB's
    (sqrt(var + 1e-5)): with small variances the two differ by percents, and each export
    matches the engine under its own rule (the layer's own folding)."""
    from engine.backends.numpy_backend import NumpyBackend
    from engine.network import Network

    path = write_cfg(tmp_path / "bn.cfg", {"batch": 1, "height": 6, "width": 6, "channels": 3},
                     "[convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nbatch_normalize=1\n"
                     "activation=leaky\n\n[batchnorm]\n\n[connected]\noutput=5\n"
                     "batch_normalize=1\nactivation=linear")
    results = {}
    for darknet in ("pjreddie", "alexeyab"):
        net = Network(path, backend=NumpyBackend(), seed=2, quiet=True, darknet=darknet)
        rng = np.random.default_rng(0)
        for layer in net.layers:
            if "rolling_variance" in layer.params:
                shape = layer.params["rolling_variance"].shape
                layer.params["rolling_variance"] = rng.uniform(1e-5, 1e-4, shape).astype(np.float32)
                layer.params["rolling_mean"] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
        model = checked_model(net, batch=2)
        assert_matches_engine(net, model, batch=2)
        results[darknet] = run_model(model, images_for(net, 2))["output"]
    first, second = results["pjreddie"], results["alexeyab"]
    assert np.abs(first - second).max() > 1e-2 * np.abs(first).max()


ALEXEYAB_CFG_NAMES = sorted(os.path.basename(p) for p in
                            glob.glob(os.path.join(onnx_helpers.ALEXEYAB_FOLDER, "*.cfg")))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALEXEYAB_CFG_NAMES)
def test_alexeyab_cfg_survey(tmp_path, name):
    """Every cfg of AlexeyAB's folder the engine loads, at 128x128 with filters / 8 and random
    weights, exports and matches the engine (under two minutes for the 87: `pytest -m slow`);
    the others are those the engine refuses, for the reasons tests/test_alexeyab_cfgs.py
    lists."""
    from engine.errors import ConfigError
    from test_alexeyab_cfgs import REFUSED

    try:
        net = onnx_helpers.survey_network(os.path.join(onnx_helpers.ALEXEYAB_FOLDER, name),
                                          tmp_path)
    except ConfigError:
        assert name in REFUSED
        pytest.skip("the engine refuses this cfg")
    assert name not in REFUSED
    assert_matches_engine(net, checked_model(net, batch="dynamic"), batch=1)


# ---- every layer feature -------------------------------------------------------------------------
FEATURES = {
    # shortcut of different shapes both ways (Darknet's rule), alpha, beta, activation
    "shortcut": ((3, 16, 16), """
        [convolutional]\nfilters=8\nsize=3\nstride=1\npad=1\nbatch_normalize=1\nactivation=leaky
        [convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nactivation=linear
        [shortcut]\nfrom=0\nalpha=0.5\nbeta=2\nactivation=leaky
        [upsample]\nstride=2
        [convolutional]\nfilters=6\nsize=1\nstride=1\nactivation=linear
        [shortcut]\nfrom=2\nalpha=1.5\nactivation=logistic
        [shortcut]\nfrom=4
        [shortcut]\nfrom=0\nbeta=0.5\nactivation=tanh"""),
    # upsample: reverse (sum-pooling), scale, stride 1; maxpool; route of two
    "upsample": ((3, 8, 8), """
        [convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky
        [upsample]\nstride=-2\nscale=0.5
        [upsample]\nstride=4\nscale=1.5
        [upsample]\nstride=1\nscale=4
        [maxpool]\nsize=2\nstride=2
        [route]\nlayers=-1,0"""),
    "route_groups": ((3, 8, 8), """
        [convolutional]\nfilters=8\nsize=1\nstride=1\nactivation=linear
        [convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky
        [route]\nlayers=0\ngroups=2\ngroup_id=1
        [route]\nlayers=0,1\ngroups=4\ngroup_id=2
        [route]\nlayers=-1,-2,1"""),
    # softmax over groups with temperature; the [cost] after it is left out of the graph
    "softmax": ((3, 4, 4), """
        [convolutional]\nfilters=6\nsize=1\nstride=1\nactivation=linear
        [softmax]\ngroups=4\ntemperature=0.5
        [cost]"""),
    "reorg": ((3, 8, 8), """
        [convolutional]\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky
        [reorg]\nstride=2
        [convolutional]\nfilters=16\nsize=1\nstride=1\nactivation=linear
        [reorg]\nstride=2\nreverse=1
        [route]\nlayers=-1,0"""),
    "reorg_extra": ((2, 3, 3), """
        [reorg]\nextra=3
        [connected]\noutput=5\nbatch_normalize=1\nactivation=relu
        [softmax]"""),
    "crop": ((3, 10, 12), """
        [crop]\ncrop_height=6\ncrop_width=8\nflip=1
        [convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=linear"""),
    "crop_noadjust": ((3, 9, 9), """
        [crop]\ncrop_height=4\ncrop_width=7\nnoadjust=1"""),
    "batchnorm_dropout_connected": ((3, 6, 6), """
        [convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky
        [batchnorm]
        [activation]\nactivation=tanh
        [batchnorm]\nper_activation=1
        [dropout]\nprobability=0.3
        [connected]\noutput=7\nbatch_normalize=1\nactivation=leaky
        [dropout]
        [connected]\noutput=3\nactivation=linear"""),
    # size 2 stride 1 (keeps the size), size 3 stride 2, explicit paddings, then avgpool
    "maxpool": ((3, 7, 7), """
        [convolutional]\nfilters=4\nsize=1\nstride=1\nactivation=linear
        [maxpool]\nsize=2\nstride=1
        [maxpool]\nsize=3\nstride=2
        [maxpool]\nsize=3\nstride=1\npadding=1
        [route]\nlayers=-1
        [maxpool]\nsize=2\nstride=2\npadding=0
        [avgpool]"""),
    # a padding so large that windows lie wholly outside the input: -inf there, as the engine
    "maxpool_inf": ((2, 4, 4), """
        [maxpool]\nsize=2\nstride=2\npadding=5"""),
    "grouped_conv": ((4, 8, 8), """
        [convolutional]\nfilters=8\nsize=3\nstride=1\npad=1\ngroups=2\nbatch_normalize=1\nactivation=leaky
        [convolutional]\nfilters=8\nsize=3\nstride=2\npadding=0\ngroups=4\nactivation=relu"""),
    "region_softmax": ((3, 8, 8), """
        [convolutional]\nfilters=16\nsize=3\nstride=2\npad=1\nbatch_normalize=1\nactivation=leaky
        [convolutional]\nfilters=16\nsize=1\nstride=1\nactivation=linear
        [region]\nanchors=1,2,3,1.5\nclasses=3\nnum=2\nsoftmax=1"""),
    "region_logistic": ((3, 8, 8), """
        [convolutional]\nfilters=16\nsize=1\nstride=1\nactivation=linear
        [region]\nanchors=1,2,3,1.5\nclasses=3\nnum=2"""),
    # ---- AlexeyAB's layers and keys ----
    # dilation (padding times it), stride_x != stride_y, share_index (absolute, relative, with BN)
    "conv_dilation_strides_share": ((3, 12, 12), """
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\ndilation=2\nbatch_normalize=1\nactivation=mish
        [convolutional]\nfilters=6\nsize=3\nstride=2\npad=1\ndilation=3\nactivation=swish
        [convolutional]\nfilters=6\nsize=3\nstride_x=2\nstride_y=1\npad=1\nactivation=leaky
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\nshare_index=2\nactivation=relu6
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\nbatch_normalize=1\nactivation=gelu
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\ndilation=2\nbatch_normalize=1\nshare_index=-1\nactivation=hard_mish"""),
    # the blur after conv (3x3 and 2x2 kinds) and after maxpool
    "antialiasing": ((3, 13, 13), """
        [convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nantialiasing=1\nbatch_normalize=1\nactivation=leaky
        [convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nantialiasing=2\nactivation=revleaky
        [maxpool]\nsize=2\nstride=2\nantialiasing=1"""),
    # maximum across channels g, g + groups...: 6 channels in 4 groups (uneven), then 2
    "maxpool_depth": ((3, 5, 5), """
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\nactivation=linear
        [maxpool]\nmaxpool_depth=1\nout_channels=4
        [maxpool]\nmaxpool_depth=1\nout_channels=2"""),
    "sam_scale_channels": ((3, 8, 8), """
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\nactivation=leaky
        [convolutional]\nfilters=6\nsize=1\nstride=1\nactivation=logistic
        [sam]\nfrom=0\nactivation=swish
        [avgpool]
        [convolutional]\nfilters=6\nsize=1\nstride=1\nactivation=logistic
        [scale_channels]\nfrom=2
        [convolutional]\nfilters=1\nsize=1\nstride=1\nactivation=logistic
        [scale_channels]\nfrom=5\nscale_wh=1\nactivation=leaky"""),
    # several `from`, sources with fewer and more channels, weights per channel and per input,
    # normalized by softmax, relu, or not at all
    "weighted_shortcut": ((3, 8, 8), """
        [convolutional]\nfilters=6\nsize=3\nstride=1\npad=1\nactivation=leaky
        [convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky
        [convolutional]\nfilters=8\nsize=1\nstride=1\nactivation=linear
        [shortcut]\nfrom=0,1\nweights_type=per_channel\nweights_normalization=softmax
        [shortcut]\nfrom=0\nweights_type=per_feature\nweights_normalization=relu\nactivation=mish
        [convolutional]\nfilters=4\nsize=1\nstride=1\nactivation=linear
        [shortcut]\nfrom=2,3\nactivation=normalize_channels
        [shortcut]\nfrom=0,4\nweights_type=per_channel\nweights_normalization=none"""),
    "local_avgpool_reorg3d_implicit": ((4, 8, 8), """
        [local_avgpool]\nsize=3\nstride=2
        [reorg3d]\nstride=2
        [reorg3d]\nstride=2\nreverse=1
        [empty]
        [silence]
        [local_avgpool]\nsize=3\nstride=1\npadding=4
        [implicit]\nfilters=4
        [scale_channels]\nfrom=-2
        [activation]\nactivation=normalize_channels_softmax_maxval"""),
    # [yolo] with scale_x_y, and with new_coords (no logistic, (2w)^2 sizes) and scale_x_y
    "yolo_alexeyab": ((3, 8, 8), """
        [convolutional]\nfilters=21\nsize=3\nstride=2\npad=1\nbatch_normalize=1\nactivation=leaky
        [yolo]\nmask=0,1,2\nanchors=2,3, 4,5, 6,4, 7,7, 3,8, 9,9\nclasses=2\nnum=6\nscale_x_y=1.2
        [route]\nlayers=0
        [convolutional]\nfilters=21\nsize=1\nstride=1\nactivation=logistic
        [yolo]\nmask=3,4,5\nanchors=2,3, 4,5, 6,4, 7,7, 3,8, 9,9\nclasses=2\nnum=6\nnew_coords=1\nscale_x_y=2.0"""),
    "gaussian_yolo": ((3, 8, 8), """
        [convolutional]\nfilters=33\nsize=3\nstride=2\npad=1\nactivation=linear
        [Gaussian_yolo]\nmask=0,1,2\nanchors=2,3, 4,5, 6,4\nclasses=2\nnum=3\nscale_x_y=1.1"""),
    "detection_v1": ((3, 8, 8), """
        [convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nactivation=leaky
        [connected]\noutput=52\nactivation=linear
        [detection]\nclasses=3\ncoords=4\nnum=2\nside=2\nsoftmax=1\nsqrt=1"""),
    "detection_v1_plain": ((3, 8, 8), """
        [connected]\noutput=52\nactivation=logistic
        [detection]\nclasses=3\ncoords=4\nnum=2\nside=2"""),
    # AlexeyAB's contrastive loss gives zeros at inference
    "contrastive": ((3, 4, 4), """
        [convolutional]\nfilters=4\nsize=1\nstride=1\nactivation=linear
        [contrastive]\nclasses=2"""),
}


def feature_net(tmp_path, name, batch=1):
    (c, h, w), body = FEATURES[name]
    text = "\n".join(line.strip() for line in body.strip().splitlines())
    path = write_cfg(tmp_path / f"{name}.cfg", {"batch": batch, "height": h, "width": w,
                                                "channels": c}, text.replace("\n[", "\n\n["))
    return random_network(path, seed=3)


@pytest.mark.parametrize("name", sorted(set(FEATURES) - {"maxpool_inf"}))
def test_layer_features(tmp_path, name):
    net = feature_net(tmp_path, name)
    assert_matches_engine(net, checked_model(net, batch="dynamic"), batch=3)


def test_maxpool_windows_outside_the_input_give_minus_flt_max(tmp_path):
    net = feature_net(tmp_path, "maxpool_inf")
    images = images_for(net, 1)
    got = run_model(checked_model(net), images)["output"]
    expected = engine_outputs(net, images)["output"]
    assert (expected == -np.finfo(np.float32).max).any()  # Darknet's -FLT_MAX, windows outside
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", activations.NAMES + activations.CHANNEL_NAMES)
def test_every_activation(tmp_path, name):
    """Each activation alone on inputs from -6 to 6 (plse's and lhtan's pieces, stair's steps;
    the normalize_channels family across the 4 channels)."""
    path = write_cfg(tmp_path / "a.cfg", {"batch": 1, "height": 9, "width": 9, "channels": 4},
                     f"[activation]\nactivation={name}")
    net = random_network(path)
    images = np.random.default_rng(1).uniform(-6, 6, (2,) + net.input_shape).astype(np.float32)
    got = run_model(checked_model(net), images[:1])
    assert relative_difference(got, engine_outputs(net, images[:1])) <= TOLERANCE
    assert set(onnx_export.ACTIVATIONS) >= set(activations.NAMES + activations.CHANNEL_NAMES)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the engine's np.where
def test_mish_beyond_the_softplus_threshold(tmp_path):
    """AlexeyAB's softplus is x above 20 and exp(x) below -20: mish there, to float32."""
    path = write_cfg(tmp_path / "m.cfg", {"batch": 1, "height": 1, "width": 8, "channels": 1},
                     "[activation]\nactivation=mish")
    net = random_network(path)
    images = np.float32([-90, -30, -20.5, -19.5, 19.5, 20.5, 30, 90]).reshape(1, 1, 1, 8)
    got = run_model(checked_model(net), images)["output"]
    np.testing.assert_allclose(got, engine_outputs(net, images)["output"], rtol=1e-6, atol=1e-30)


# ---- batch, opsets, float16 ----------------------------------------------------------------------
def g2c_net():
    import engine

    return engine.load(G2C_CFG, G2C_WEIGHTS, quiet=True)


def test_dynamic_batch_runs_batch_1_and_3_through_one_model():
    net = g2c_net()
    model = checked_model(net, batch="dynamic")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert_matches_engine(net, model, batch=1)
    assert_matches_engine(net, model, batch=3, seed=1)


def test_fixed_batch_is_the_declared_shape():
    import onnxruntime

    net = g2c_net()
    model = checked_model(net, batch=2)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 96, 96]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [2, 255, 3, 3]
    assert_matches_engine(net, model, batch=2)
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        run_model(model, images_for(net, 3))


@pytest.mark.parametrize("opset, case", [(13, "upsample"), (21, "upsample"),
                                         (13, "maxpool_depth"), (18, "maxpool_depth"),
                                         (13, "local_avgpool_reorg3d_implicit")])
def test_other_opsets(tmp_path, opset, case):
    """ReduceMax takes its axes as an attribute before opset 18 and as an input from it."""
    net = feature_net(tmp_path, case)
    model = checked_model(net, opset=opset)
    assert model.opset_import[0].version == opset
    assert_matches_engine(net, model, batch=1)


@pytest.mark.parametrize("case", ["g2c", "shortcut", "region_softmax"])
def test_float16_is_within_1e_2(tmp_path, case):
    net = g2c_net() if case == "g2c" else feature_net(tmp_path, case)
    model = checked_model(net, fp16=True, batch="dynamic")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    images = images_for(net, 2)
    got = run_model(model, images.astype(np.float16))
    assert all(v.dtype == np.float16 for v in got.values())
    assert relative_difference(got, engine_outputs(net, images)) <= FP16_TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("folder", ["G2c_tiny_yolov3_div8", "A6_alexeyab_layers",
                                    "A7_dilation_share", "A8_antialiasing"])
def test_a_network_on_the_gpu_exports_the_same_model(folder):
    import engine

    root = os.path.join(GOLDEN, folder)
    cfg, weights = glob.glob(os.path.join(root, "*.cfg"))[0], os.path.join(root, "weights")
    on_gpu = engine.load(cfg, weights, backend="gpu", quiet=True)
    on_cpu = engine.load(cfg, weights, quiet=True)
    assert build_model(on_gpu, batch="dynamic") == build_model(on_cpu, batch="dynamic")


# ---- decoding and NonMaxSuppression --------------------------------------------------------------
@pytest.mark.parametrize("case", ["g2c", "region_softmax", "region_logistic", "yolo_alexeyab",
                                  "gaussian_yolo", "detection_v1", "detection_v1_plain",
                                  "A3_yolov7_tiny", "A10_gaussian_yolov3",
                                  "A12_yolov1_detection"])
def test_decode_is_engine_detections(tmp_path, case):
    """boxes (input pixels), objectness and scores equal engine.detection's decoding of the
    engine's outputs (image = network input, so no letterbox), box for box: scale_x_y and
    new_coords, Gaussian YOLO's uncertainties, YOLOv1's cells."""
    if case.startswith("A"):
        net = read_alexeyab_set(case)[0]
    else:
        net = g2c_net() if case == "g2c" else feature_net(tmp_path, case)
    images = images_for(net, 2)
    got = run_model(checked_model(net, decode=True, batch="dynamic"), images)
    net.forward(images, train=False)
    net_w, net_h = net.options.width, net.options.height
    for image in range(2):
        expected = detection.network_detections(net, net_w, net_h, thresh=-np.inf,
                                                image_index=image)
        # (the network's own outputs differ by float32 rounding, about 1e-6)
        np.testing.assert_allclose(got["boxes"][image] / [net_w, net_h, net_w, net_h],
                                   expected.boxes, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["objectness"][image], expected.objectness, atol=1e-5)
        np.testing.assert_allclose(got["scores"][image], expected.probs, atol=1e-5)


def onnx_detections(outputs, image_w, image_h, net_w, net_h, classes, thresh, letterboxed=True):
    """What a deployed model's user does with the NMS outputs of image 0: boxes back from input
    pixels to the image (undoing the letterbox, engine.detection.correct_boxes), one row per
    box with its selected classes' scores, labelled as engine detect labels them."""
    selected, boxes, scores = (outputs[k] for k in ("selected", "detection_boxes",
                                                    "detection_scores"))
    rows = {}
    for (image, k, box), xywh, score in zip(selected, boxes, scores):
        assert image == 0
        entry = rows.setdefault(int(box), (xywh, np.zeros(classes, np.float32)))
        entry[1][k] = score
    if not rows:
        return []
    relative = np.array([xywh for xywh, _ in rows.values()]) / [net_w, net_h, net_w, net_h]
    found = detection.Detections(
        detection.correct_boxes(relative.astype(np.float32), image_w, image_h, net_w, net_h,
                                letterboxed),
        np.ones(len(rows), np.float32), np.array([p for _, p in rows.values()]))
    return detection.label_detections(found, image_w, image_h, thresh)


def write_image(path, width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("fp16", [False, True])
def test_nms_gives_engine_detect_boxes(tmp_path, fp16):
    """Golden tiny-YOLOv3 weights on a 150x90 image, letterboxed outside the model as engine
    detect does: after NonMaxSuppression, the same boxes, classes and probabilities."""
    net = g2c_net()
    path = str(tmp_path / "scene.png")
    write_image(path, 150, 90)
    thresh, nms = 0.6, 0.45
    labelled, _, _ = detection.detect(net, path, thresh, nms)
    model = checked_model(net, nms=nms, thresh=thresh, fp16=fp16)
    boxed = detection.letterbox(detection.read_rgb(path), 96, 96)[None]
    outputs = run_model(model, boxed.astype(np.float16 if fp16 else np.float32))
    got = onnx_detections(outputs, 150, 90, 96, 96, 80, thresh)
    assert len(labelled) > 1
    # NMS did something here: more class scores were above the threshold than were kept
    raw = detection.network_detections(net, 150, 90, thresh)
    assert (raw.probs > thresh).sum() > len(outputs["selected"])
    # the same boxes with the same classes; pixel corners are truncated, so float32 rounding
    # may move one by a pixel
    key = (lambda item: (item.classes, item.pixels))
    got, labelled = sorted(got, key=key), sorted(labelled, key=key)
    assert [item.classes for item in got] == [item.classes for item in labelled]
    for mine, theirs in zip(got, labelled):
        assert np.abs(np.subtract(mine.pixels, theirs.pixels)).max() <= 1
        np.testing.assert_allclose(mine.probabilities, theirs.probabilities,
                                   atol=2e-3 if fp16 else 1e-5)


def test_nms_0_only_thresholds_as_engine_detect_does():
    net = g2c_net()
    images = images_for(net, 1)
    outputs = run_model(checked_model(net, nms=0, thresh=0.6), images)
    net.forward(images, train=False)
    raw = detection.network_detections(net, 96, 96, 0.6)
    assert len(outputs["selected"]) == (raw.probs > 0.6).sum() > 0


def test_nms_thresholds_are_strict_as_darknets():
    """Darknet keeps a class score only when above the threshold and suppresses a box only when
    its IoU is above the NMS threshold: at exactly 0.5 the score is dropped and the box kept."""
    graph = onnx_export.Graph(onnx, None, np.float32)
    selected, boxes, scores = onnx_export.append_nms(graph, "boxes", "scores", 3, 0.5, 0.5)
    for name, tensor in (("selected", selected), ("found_boxes", boxes), ("found_scores", scores)):
        graph.nodes.append(onnx.helper.make_node("Identity", [tensor], [name]))
    float_input = (lambda name, shape: onnx.helper.make_tensor_value_info(name, 1, shape))
    model = onnx.helper.make_model(onnx.helper.make_graph(
        graph.nodes, "nms", [float_input("boxes", [1, 3, 4]), float_input("scores", [1, 3, 1])],
        [onnx.helper.make_tensor_value_info("selected", onnx.TensorProto.INT64, [None, 3]),
         float_input("found_boxes", [None, 4]), float_input("found_scores", [None])],
        initializer=graph.initializers), opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    # box 1 overlaps box 0 with IoU exactly 0.5 (overlap 2, union 4); box 2 scores exactly 0.5
    boxes = np.float32([[[0, 0, 3, 1], [1, 0, 3, 1], [9, 9, 1, 1]]])
    scores = np.float32([[[0.9], [0.8], [0.5]]])
    selected, found_boxes, found_scores = session(model).run(None, {"boxes": boxes,
                                                                    "scores": scores})
    assert selected.tolist() == [[0, 0, 0], [0, 0, 1]]
    np.testing.assert_array_equal(found_boxes, boxes[0, :2])
    np.testing.assert_array_equal(found_scores, np.float32([0.9, 0.8]))
    boxes[0, 1, 0] = 0.999  # IoU just above 0.5: suppressed
    assert session(model).run(None, {"boxes": boxes, "scores": scores})[0].tolist() == [[0, 0, 0]]


def diou_nms_model(nms_thresh, score_threshold, beta, net_w, net_h, opset=17):
    """A model of append_diou_nms alone: inputs boxes (N, B, 4) in pixels, scores (N, B, K)."""
    graph = onnx_export.Graph(onnx, None, np.float32, opset)
    outputs = onnx_export.append_diou_nms(graph, "boxes", "scores", nms_thresh, score_threshold,
                                          beta, net_w, net_h)
    for name, tensor in zip(("selected", "found_boxes", "found_scores"), outputs):
        graph.nodes.append(onnx.helper.make_node("Identity", [tensor], [name]))
    float_input = (lambda name, shape: onnx.helper.make_tensor_value_info(name, 1, shape))
    model = onnx.helper.make_model(onnx.helper.make_graph(
        graph.nodes, "nms", [float_input("boxes", [None, None, 4]),
                             float_input("scores", [None, None, None])],
        [onnx.helper.make_tensor_value_info("selected", onnx.TensorProto.INT64, [None, 3]),
         float_input("found_boxes", [None, 4]), float_input("found_scores", [None])],
        initializer=graph.initializers), opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = onnx.helper.find_min_ir_version_for([model.opset_import[0]])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind, beta, opset", [("greedynms", 0.6, 17), ("diounms", 0.8, 17),
                                               ("diounms", 1.7, 13)])
def test_diou_nms_is_the_engines_nms_sort(kind, beta, opset):
    """AlexeyAB's greedynms/diounms (DIoU, which ONNX's NonMaxSuppression cannot do) as an ONNX
    Loop: on clustered random boxes, two images, 3 classes, with ties, the kept (image, class,
    box) and scores are engine.detection.nms_sort's; plain IoU would keep fewer."""
    rng = np.random.default_rng(7)
    net_w, net_h, count, classes, thresh, nms = 96, 64, 60, 3, 0.3, 0.45
    centres = rng.uniform(10, 50, (2, 5, 1, 2)) + rng.normal(0, 4, (2, 5, count // 5, 2))
    sizes = rng.uniform(8, 20, (2, 5, 1, 2)) * rng.uniform(0.8, 1.25, (2, 5, count // 5, 2))
    boxes = np.concatenate([centres, sizes], -1).reshape(2, count, 4).astype(np.float32)
    scores = rng.uniform(0, 1, (2, count, classes)).astype(np.float32)
    scores[:, 7] = scores[:, 3]  # a tie: the lower box comes first, as the stable sort
    model = diou_nms_model(nms, thresh, beta, net_w, net_h, opset)
    selected, found_boxes, found_scores = session(model).run(None, {"boxes": boxes,
                                                                    "scores": scores})
    got = {tuple(row): score for row, score in zip(selected.tolist(), found_scores)}
    expected, with_iou = {}, 0
    for image in range(2):
        relative = boxes[image] / np.float32([net_w, net_h, net_w, net_h])
        probs = np.where(scores[image] > thresh, scores[image], 0).astype(np.float32)
        found = detection.Detections(relative, np.ones(count, np.float32), probs)
        kept = detection.nms_sort(found, nms, kind, beta).probs
        for box, k in zip(*np.nonzero(kept)):
            expected[(image, int(k), int(box))] = kept[box, k]
        with_iou += np.count_nonzero(detection.nms_sort(found, nms, "default").probs)
    assert got.keys() == expected.keys()
    np.testing.assert_array_equal([got[key] for key in expected], list(expected.values()))
    np.testing.assert_array_equal(found_boxes, boxes[selected[:, 0], selected[:, 2]])
    assert with_iou < len(expected)  # DIoU suppresses less than IoU here: the kind matters


@pytest.mark.parametrize("case, thresh", [("yolo_alexeyab", 0.3), ("gaussian_yolo", 0.05),
                                          ("detection_v1_plain", 0.3), ("region_logistic", 0.3)])
def test_nms_of_every_head_type_is_engine_detections(tmp_path, case, thresh):
    """--nms on the new heads against engine.detection's decoding, threshold and nms_sort for
    the image that is the network input (Gaussian YOLO's uncertainties lower its scores, hence
    its lower threshold; YOLOv1 keeps boxes of positive confidence)."""
    net = feature_net(tmp_path, case)
    images = images_for(net, 1, seed=4)
    outputs = run_model(checked_model(net, nms=0.45, thresh=thresh), images)
    net.forward(images, train=False)
    w, h = net.options.width, net.options.height
    size = 1000  # labelled in a large image, so that distinct boxes have distinct pixels
    found = detection.network_detections(net, size, size, thresh, letterboxed=False)
    expected = detection.label_detections(detection.nms_sort(found, 0.45), size, size, thresh)
    got = onnx_detections(outputs, size, size, w, h, net.layers[-1].classes, thresh,
                          letterboxed=False)
    assert len(expected) > 1
    key = (lambda item: (item.classes, item.pixels, item.probabilities))
    got, expected = sorted(got, key=key), sorted(expected, key=key)
    assert [item.classes for item in got] == [item.classes for item in expected]
    for mine, theirs in zip(got, expected):
        assert np.abs(np.subtract(mine.pixels, theirs.pixels)).max() <= 1
        # 1e-4: the engine runs 3x3 convolutions by Winograd at inference (float32 rounding)
        np.testing.assert_allclose(mine.probabilities, theirs.probabilities, atol=1e-4)


def alexeyab_detector(tmp_path, name, size=128):
    """AlexeyAB's cfg at `size` with filters / 8, random weights and BN statistics."""
    path = os.path.join(onnx_helpers.ALEXEYAB_FOLDER, name)
    if not os.path.exists(path):
        pytest.skip(f"no {path} here")
    return random_network(resized_cfg(path, tmp_path, size, 8), seed=1, images=8)


@pytest.mark.parametrize("name, kind", [("yolov4-tiny.cfg", "greedynms"),
                                        ("yolov7-tiny.cfg", "diounms")])
def test_alexeyab_detectors_nms_gives_engine_detect_boxes(tmp_path, name, kind):
    """yolov4-tiny (scale_x_y, greedynms) and yolov7-tiny (new_coords, diounms) from AlexeyAB's
    folder at 128x128, random weights: engine detect's boxes on a 150x90 image (stretched to
    the input, as AlexeyAB's detector test and engine detect do for these cfgs) are the
    exported model's after its DIoU NMS, box for box."""
    net = alexeyab_detector(tmp_path, name)
    assert detection.nms_choice(net)[0] == kind and not detection.uses_letterbox(net)
    path = str(tmp_path / "scene.png")
    write_image(path, 150, 90)
    thresh, nms = 0.25, 0.45
    labelled, _, _ = detection.detect(net, path, thresh, nms)
    model = checked_model(net, nms=nms, thresh=thresh)
    assert "Loop" in [node.op_type for node in model.graph.node]
    stretched = detection.resize_bilinear(detection.read_rgb(path), 128, 128)[None]
    outputs = run_model(model, stretched)
    got = onnx_detections(outputs, 150, 90, 128, 128, 80, thresh, letterboxed=False)
    raw = detection.network_detections(net, 150, 90, thresh, letterboxed=False)
    assert len(labelled) > 1 and (raw.probs > thresh).sum() > len(outputs["selected"])
    key = (lambda item: (item.classes, item.pixels))
    got, labelled = sorted(got, key=key), sorted(labelled, key=key)
    assert [item.classes for item in got] == [item.classes for item in labelled]
    for mine, theirs in zip(got, labelled):
        assert np.abs(np.subtract(mine.pixels, theirs.pixels)).max() <= 1
        # 1e-4: the engine runs 3x3 convolutions by Winograd at inference (float32 rounding)
        np.testing.assert_allclose(mine.probabilities, theirs.probabilities, atol=1e-4)


def test_cornersnms_is_onnx_nonmaxsuppression_and_letterboxed_diou_is_refused(tmp_path):
    """cornersnms measures plain IoU in the engine: ONNX's NonMaxSuppression. DIoU on a
    letterboxed image depends on its aspect ratio, which the model does not know: refused,
    naming the key's line."""
    (c, h, w), body = FEATURES["gaussian_yolo"]
    text = "\n".join(line.strip() for line in body.strip().splitlines()).replace("\n[", "\n\n[")
    options = {"batch": 1, "height": h, "width": w, "channels": c}
    net = random_network(write_cfg(tmp_path / "corners.cfg", options,
                                   text + "\nnms_kind=cornersnms"))
    ops = [node.op_type for node in checked_model(net, nms=0.45).graph.node]
    assert "NonMaxSuppression" in ops and "Loop" not in ops
    options["letter_box"] = 1
    net = random_network(write_cfg(tmp_path / "boxed.cfg", options, text + "\nnms_kind=diounms"))
    with pytest.raises(ExportError, match=r"boxed.cfg:\d+: \[gaussian_yolo\] nms_kind=diounms: "
                                          r"with letterboxed detection"):
        build_model(net, nms=0.45)
    assert build_model(net, decode=True) is not None  # decoding alone is fine


def test_new_layer_types_and_activations_are_refused_with_one_line(tmp_path, monkeypatch):
    net = feature_net(tmp_path, "upsample")
    monkeypatch.delitem(onnx_export.EXPORTERS, "upsample")
    with pytest.raises(ExportError, match=r"upsample.cfg:\d+: \[upsample\] cannot be exported"):
        build_model(net)
    monkeypatch.undo()
    monkeypatch.delitem(onnx_export.ACTIVATIONS, "leaky")
    with pytest.raises(ExportError, match=r"\[convolutional\] activation 'leaky' cannot be"):
        build_model(net)


def test_a_key_the_exporter_does_not_know_is_refused_with_its_line(tmp_path, monkeypatch):
    """A key a layer reads that its exporter does not list (as when a layer gains an option
    later) stops the export rather than exporting something else than the engine computes."""
    net = feature_net(tmp_path, "shortcut")
    monkeypatch.setitem(onnx_export.EXPORTED_KEYS, "shortcut",
                        onnx_export.EXPORTED_KEYS["shortcut"] - {"alpha"})
    with pytest.raises(ExportError, match=r"shortcut.cfg:\d+: \[shortcut\] alpha=0.5: the ONNX "
                                          r"export does not implement this key of \[shortcut\]"):
        build_model(net)


# ---- the command line ----------------------------------------------------------------------------
def test_engine_export_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "tiny.onnx")
    assert cli.main(["export", G2C_CFG, G2C_WEIGHTS, out, "--batch", "dynamic"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == (f"Wrote {out} (opset 17, float32): input input [batch, 3, 96, 96]; "
                       "outputs yolo_16 [batch, 255, 3, 3], yolo_23 [batch, 255, 6, 6]")
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert_matches_engine(g2c_net(), model, batch=2)

    out = str(tmp_path / "nms.onnx")
    assert cli.main(["export", G2C_CFG, G2C_WEIGHTS, out, "--nms", "--thresh", "0.6",
                     "--fp16", "--opset", "18"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"Wrote {out} (opset 18, float16): input input [1, 3, 96, 96]; outputs selected "
        "[detections, 3], detection_boxes [detections, 4], detection_scores [detections]")


def test_engine_export_of_an_alexeyab_golden_set_and_its_darknet_option(tmp_path, capsys):
    """AlexeyAB's yolov4-tiny golden set through the command line, with its own BN rule by
    default and pjreddie's with --darknet pjreddie (each the engine's under that rule)."""
    import engine

    root = os.path.join(GOLDEN, "A1_yolov4_tiny")
    cfg, weights = os.path.join(root, "a1_yolov4_tiny.cfg"), os.path.join(root, "weights")
    outputs = {}
    for darknet in ("alexeyab", "pjreddie"):
        out = str(tmp_path / f"{darknet}.onnx")
        options = [] if darknet == "alexeyab" else ["--darknet", darknet]
        assert cli.main(["export", cfg, weights, out, "--nms", "--thresh", "0.25"] + options) == 0
        assert "outputs selected [detections, 3]" in capsys.readouterr().out
        out_raw = str(tmp_path / f"{darknet}-raw.onnx")
        assert cli.main(["export", cfg, weights, out_raw] + options) == 0
        capsys.readouterr()
        net = engine.load(cfg, weights, quiet=True, darknet=darknet)
        assert_matches_engine(net, onnx.load(out_raw), batch=1)
        outputs[darknet] = run_model(onnx.load(out_raw), images_for(net, 1))["yolo_30"]
        assert "Loop" in [node.op_type for node in onnx.load(out).graph.node]  # greedynms
    assert np.abs(outputs["alexeyab"] - outputs["pjreddie"]).max() > 1e-6


def test_export_api_writes_the_file(tmp_path):
    net = feature_net(tmp_path, "softmax")
    path = tmp_path / "softmax.onnx"
    model = export_onnx(net, str(path), batch=4)
    assert onnx.load(str(path)) == model
    assert [o.name for o in model.graph.output] == ["output"]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [4, 96]


@pytest.mark.parametrize("options, message", [
    (["--batch", "0"], "--batch 0: expected a positive integer or 'dynamic'"),
    (["--batch", "many"], "--batch many: expected a positive integer or 'dynamic'"),
    (["--opset", "9"], "--opset 9: expected 13.."),
    (["--nms", "1.5"], "--nms 1.5: expected an IoU threshold between 0 and 1"),
    (["--decode"], "--decode/--nms need [yolo], [region], [Gaussian_yolo] or [detection] layers; "
                   "this network has none"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, options, message):
    cfg = os.path.join(GOLDEN, "G2a_core", "g2a_core.cfg")
    weights = os.path.join(GOLDEN, "G2a_core", "weights")
    assert cli.main(["export", cfg, weights, str(tmp_path / "x.onnx")] + options) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("engine export: error: ")
    assert message in error
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_package_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert cli.main(["export", G2C_CFG, G2C_WEIGHTS, str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().err == ("engine export: error: ONNX export needs the onnx package: "
                                       "pip install -e '.[onnx]' (or pip install 'onnx>=1.15')\n")


def test_missing_weights_and_unwritable_output_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["export", G2C_CFG, str(tmp_path / "none.weights"),
                     str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["export", G2C_CFG, G2C_WEIGHTS, str(blocker / "x.onnx")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot write ONNX file" in error
