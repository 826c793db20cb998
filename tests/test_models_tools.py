"""engine/models.py and its commands: `engine info`, `engine partial` and `engine fuse`."""

import os

import numpy as np
import pytest

from engine import cli, models
from engine.backends.numpy_backend import NumpyBackend
from engine.errors import WeightsError
from engine.network import Network

from conftest import CFG, GOLDEN

G2C = os.path.join(GOLDEN, "G2c_tiny_yolov3_div8")
G2C_CFG = os.path.join(G2C, "g2c_tiny_yolov3_div8.cfg")
G2C_WEIGHTS = os.path.join(G2C, "weights")


def g2c(cfg=G2C_CFG, weights=G2C_WEIGHTS):
    net = Network(cfg, backend=NumpyBackend(), quiet=True)
    if weights:
        net.load_weights(weights)
    return net


def g2c_inputs():
    return np.fromfile(os.path.join(G2C, "inputs.bin"), dtype="<f4").reshape(2, 3, 96, 96)


def test_engine_info_prints_darknets_table(capsys):
    assert cli.main(["info", os.path.join(CFG, "yolov3-tiny.cfg")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == models.TABLE_HEADER
    assert out[1] == ("    0 conv     16  3 x 3 / 1   416 x 416 x   3   ->   416 x 416 x  16  "
                      "0.150 BFLOPs")
    assert out[17] == "   16 yolo"
    assert out[-2] == "Total BFLOPs 5.571"  # AlexeyAB's total (convolutions and pooling)
    # yolov3-tiny.weights from pjreddie.com is 35434956 bytes.
    assert out[-1] == "8858734 parameters; a .weights file of 35434956 bytes"


def test_partial_keeps_the_first_layers(tmp_path, capsys):
    """`engine partial cfg weights out 13` writes layers 0..12; loading it into the full network
    fills exactly those layers (and the file size is what those layers hold)."""
    out = str(tmp_path / "g2c.conv.13")
    assert cli.main(["partial", G2C_CFG, G2C_WEIGHTS, out, "13"]) == 0
    assert "layers 0..12" in capsys.readouterr().out
    full = g2c()
    count = sum(full.layers[i].params[n].size for i in range(13) for n in full.layers[i].weight_order)
    assert os.path.getsize(out) == 20 + 4 * count
    fresh = g2c(weights=None)
    assert fresh.load_weights(out) == 13
    for a, b in zip(full.layers, fresh.layers):
        for name in a.weight_order:
            same = np.array_equal(a.params[name], b.params[name])
            assert same == (a.index < 13), f"layer {a.index} {name}"
    # A file that ends inside a layer (not at a boundary) is refused:
    with open(out, "rb") as handle:
        data = handle.read()
    (tmp_path / "cut").write_bytes(data[:-4])
    with pytest.raises(WeightsError, match="ends inside layer 12"):
        fresh.load_weights(str(tmp_path / "cut"))


def test_fuse_gives_the_same_outputs(tmp_path, capsys):
    """The fused cfg has no batch_normalize, the fused weights hold no BN parameters, and every
    layer's output equals the unfused network's to 1e-4 on Darknet's G2c weights."""
    cfg_out, weights_out = str(tmp_path / "fused.cfg"), str(tmp_path / "fused.weights")
    assert cli.main(["fuse", G2C_CFG, G2C_WEIGHTS, cfg_out, weights_out]) == 0
    assert "batch_normalize" not in open(cfg_out).read()
    original, fused = g2c(), g2c(cfg_out, weights_out)
    assert [l.out_shape for l in fused.layers] == [l.out_shape for l in original.layers]
    bn_layers = sum(getattr(l, "batch_normalize", False) for l in original.layers)
    assert bn_layers > 0
    filters = sum(l.filters for l in original.layers if getattr(l, "batch_normalize", False))
    assert os.path.getsize(G2C_WEIGHTS) - os.path.getsize(weights_out) == 4 * 3 * filters
    x = g2c_inputs()
    original.forward(x)
    fused.forward(x)
    for a, b in zip(original.outputs, fused.outputs):
        scale = max(1.0, float(np.abs(a).max()))
        assert np.abs(a - b).max() <= 1e-4 * scale


def test_fuse_keeps_other_lines_and_connected_layers(tmp_path):
    """A cfg with a BN connected layer and a plain conv: only BN lines go; outputs agree."""
    cfg = tmp_path / "small.cfg"
    cfg.write_text("[net]\nbatch=2\nheight=6\nwidth=6\nchannels=2\n\n"
                   "# a comment that stays\n[convolutional]\nbatch_normalize=1\nfilters=3\nsize=3\n"
                   "pad=1\nactivation=leaky\n\n[convolutional]\nfilters=2\nsize=1\nactivation=linear\n\n"
                   "[connected]\nbatch_normalize=1\noutput=4\nactivation=logistic\n")
    net = Network(str(cfg), backend=NumpyBackend(), quiet=True)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        for name in layer.weight_order:
            shape = layer.params[name].shape
            low, high = (0.5, 1.5) if name in ("scales", "rolling_variance") else (-0.5, 0.5)
            layer.params[name] = rng.uniform(low, high, shape).astype(np.float32)
    fused = models.fuse(net, str(tmp_path / "f.cfg"), str(tmp_path / "f.weights"))
    text = (tmp_path / "f.cfg").read_text()
    assert "# a comment that stays" in text and text.count("batch_normalize") == 0
    x = rng.random((2, 2, 6, 6), dtype=np.float32)
    reloaded = Network(str(tmp_path / "f.cfg"), backend=NumpyBackend(), quiet=True)
    reloaded.load_weights(str(tmp_path / "f.weights"))
    np.testing.assert_allclose(reloaded.forward(x), net.forward(x), atol=1e-5)
    np.testing.assert_allclose(fused.forward(x), net.forward(x), atol=1e-5)
