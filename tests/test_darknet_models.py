"""Darknet's own models: golden outputs written by real Darknet (every layer, to 1e-4), the shapes,
layer tables and parameter counts Darknet reports for its cfgs, and .weights round trips of the
full-size architectures with the byte counts Darknet's published files have.

References: tests/golden/*/layers/*.bin (Darknet's per-layer outputs), tests/data/darknet-shapes/
(what Darknet printed and reported while parsing its cfgs), and the sizes of the .weights files
pjreddie.com publishes.
"""

import glob
import os

import numpy as np
import pytest

import engine
from engine.backends.numpy_backend import NumpyBackend
from engine.models import layer_table, parameter_count
from engine.network import Network

from conftest import CFG, GOLDEN, ROOT

SHAPES = os.path.join(ROOT, "tests", "data", "darknet-shapes")
TOLERANCE = 1e-4

# Every Darknet cfg the engine supports (copies of pjreddie/darknet cfg/ in cfg/).
SUPPORTED = ["alexnet", "cifar", "darknet19", "darknet53", "densenet201", "extraction", "go",
             "resnet18", "resnet50", "tiny", "vgg-16", "yolov2-tiny", "yolov2", "yolov3-spp",
             "yolov3-tiny", "yolov3"]
WITH_DARKNET_SHAPES = ["cifar", "darknet53", "extraction", "resnet18", "tiny", "yolov3-tiny", "yolov3"]


class ZeroInit:
    """Stands in for the network's weight-initialisation generator: zeros of the right shapes.
    Drawing ~60M normal numbers for a full-size cfg takes seconds, and shape, table and
    round-trip tests do not need them."""

    def standard_normal(self, shape):
        return np.zeros(shape, dtype=np.float32)

    def uniform(self, low, high, shape):
        return np.zeros(shape, dtype=np.float32)

    def integers(self, high):
        return 0


def load(name):
    """Build cfg/<name>.cfg on the CPU backend without random weight initialisation."""
    backend = NumpyBackend()
    original = np.random.default_rng
    np.random.default_rng = lambda seed=None: ZeroInit()
    try:
        return Network(os.path.join(CFG, name + ".cfg"), backend=backend, quiet=True)
    finally:
        np.random.default_rng = original


# ---- golden outputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("folder", ["G2a_core", "G2c_tiny_yolov3_div8"])
def test_every_layer_matches_darknet(folder, backend):
    """Each layer's output, computed from Darknet's weights and inputs, equals the output
    Darknet dumped for it (relative to the layer's largest magnitude)."""
    root = os.path.join(GOLDEN, folder)
    net = engine.load(glob.glob(os.path.join(root, "*.cfg"))[0], os.path.join(root, "weights"),
                      backend=backend, quiet=True)
    batch = 2
    inputs = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
    net.forward(net.ops.asarray(inputs.reshape((batch,) + net.input_shape)))
    dumps = sorted(glob.glob(os.path.join(root, "layers", "L*.bin")))
    assert len(dumps) == len(net.layers)
    for path in dumps:
        index = int(os.path.basename(path)[1:3])
        expected = np.fromfile(path, dtype="<f4").reshape(batch, -1)
        got = net.ops.to_host(net.outputs[index]).reshape(batch, -1)
        error = np.abs(got - expected).max() / max(1.0, np.abs(expected).max())
        assert error <= TOLERANCE, f"{os.path.basename(path)}: relative error {error:.2e}"
    expected = np.fromfile(os.path.join(root, "outputs.bin"), dtype="<f4").reshape(batch, -1)
    np.testing.assert_allclose(net.predict(inputs, batch_size=batch), expected, atol=TOLERANCE)


# ---- shapes, tables, parameter counts ------------------------------------------------------------
def read_darknet_shapes(name):
    rows, total = [], None
    with open(os.path.join(SHAPES, name + ".shapes")) as handle:
        for line in handle:
            if line.startswith("# total_weights"):
                total = int(line.split()[-1])
            elif not line.startswith("#"):
                index, kind, w, h, c, outputs, weights, bn = line.split()
                rows.append((kind, int(w), int(h), int(c), int(outputs), int(weights), int(bn)))
    return rows, total


@pytest.mark.parametrize("name", WITH_DARKNET_SHAPES)
def test_shapes_and_weight_counts_equal_darknets(name):
    """Every layer's output size and number of weights equal what Darknet reported."""
    net = load(name)
    rows, total = read_darknet_shapes(name)
    assert len(rows) == len(net.layers)
    for layer, (kind, w, h, c, outputs, weights, bn) in zip(net.layers, rows):
        where = f"{name} layer {layer.index} ({kind})"
        assert layer.outputs == outputs, where
        if kind != "softmax":  # Darknet leaves a softmax layer's w, h, c unset (0)
            assert layer.out_shape == (c, h, w), where
        assert (layer.params["weights"].size if "weights" in layer.params else 0) == weights, where
        assert int(getattr(layer, "batch_normalize", 0)) == bn, where
    assert sum(layer.params["weights"].size for layer in net.layers if "weights" in layer.params) == total


@pytest.mark.parametrize("name", WITH_DARKNET_SHAPES)
def test_layer_table_equals_darknets(name):
    """`engine info` prints Darknet's table line for line (then a total we add)."""
    with open(os.path.join(SHAPES, name + ".darknet-table.txt")) as handle:
        expected = handle.read().splitlines()
    lines = layer_table(load(name)).splitlines()
    assert lines[:-1] == expected
    assert lines[-1].startswith("Total BFLOPs")


# The sizes of the .weights files pjreddie.com publishes for these cfgs: header (20 bytes for
# version 0.2, 16 for 0.1 whose `seen` is 32-bit) + 4 bytes per parameter.
PUBLISHED_WEIGHTS_BYTES = {
    "yolov3": (248007048, 20),
    "yolov3-tiny": (35434956, 20),
    "yolov3-spp": (252209544, 20),
    "yolov2": (203934260, 16),
    "yolov2-tiny": (44948600, 20),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_WEIGHTS_BYTES))
def test_parameter_count_fits_published_weights(name):
    size, header = PUBLISHED_WEIGHTS_BYTES[name]
    assert header + 4 * parameter_count(load(name)) == size


def test_darknet53_conv74_size():
    """darknet53.conv.74 (Darknet's `partial` of darknet53.weights at 74) is 162482580 bytes."""
    net = load("darknet53")
    count = sum(layer.params[n].size for layer in net.layers[:74] for n in layer.weight_order)
    assert 20 + 4 * count == 162482580


# Final output shapes Darknet reports for the cfgs without a shapes file (their [net] sizes).
FINAL_SHAPES = {
    "alexnet": (1000, 1, 1), "darknet19": (1000, 1, 1), "densenet201": (1000, 1, 1),
    "resnet50": (1000, 1, 1), "yolov2-tiny": (425, 13, 13), "yolov2": (425, 19, 19),
    "yolov3-spp": (255, 76, 76), "go": (362, 1, 1),  # go.cfg: 19x19 board + pass, [reorg] extra=1
    "vgg-16": (1000, 1, 1),
}


@pytest.mark.parametrize("name", sorted(FINAL_SHAPES))
def test_other_supported_cfgs_build(name):
    net = load(name)
    assert net.layer_shapes[-1] == FINAL_SHAPES[name]


def test_every_supported_darknet_cfg_is_checked():
    """Each supported Darknet cfg (all in cfg/) is compared with Darknet's shapes or with its
    final shape."""
    names = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(CFG, "*.cfg"))}
    assert set(SUPPORTED) <= names
    assert set(SUPPORTED) == set(WITH_DARKNET_SHAPES) | set(FINAL_SHAPES)


def test_yolo_heads_of_yolov3_spp():
    net = load("yolov3-spp")
    heads = [layer.out_shape for layer in net.layers if layer.type_name == "yolo"]
    assert heads == [(255, 19, 19), (255, 38, 38), (255, 76, 76)]
    spp = [layer for layer in net.layers if layer.type_name == "maxpool" and layer.stride == 1]
    assert [layer.size for layer in spp] == [5, 9, 13]
    assert all(layer.out_shape == (512, 19, 19) for layer in spp)


def test_vgg16_starts_with_a_centre_crop():
    net = load("vgg-16")
    assert net.layers[0].type_name == "crop" and net.layer_shapes[0] == (3, 224, 224)
    assert parameter_count(net) == 138357544  # VGG-16's well-known parameter count


# ---- weights round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["yolov3", "yolov2", "densenet201"])
def test_random_weights_round_trip(tmp_path, name):
    """Random values in every parameter, written and read back, come back bit for bit; the file
    has exactly the size the cfg implies."""
    net = load(name)
    rng = np.random.default_rng(3)
    saved = {}
    for layer in net.layers:
        for key in layer.weight_order:
            values = rng.random(layer.params[key].shape, dtype=np.float32) - np.float32(0.5)
            layer.params[key] = net.ops.asarray(values)
            saved[layer.index, key] = values
    path = tmp_path / f"{name}.weights"
    net.seen = 12345
    net.save_weights(str(path))
    assert path.stat().st_size == 20 + 4 * parameter_count(net)
    for layer in net.layers:
        for key in layer.weight_order:
            layer.params[key] = net.ops.zeros(layer.params[key].shape)
    net.seen = 0
    assert net.load_weights(str(path)) == max(l.index for l in net.layers if l.weight_order) + 1
    assert net.seen == 12345
    for (index, key), values in saved.items():
        np.testing.assert_array_equal(net.ops.to_host(net.layers[index].params[key]), values)
