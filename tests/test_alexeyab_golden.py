"""AlexeyAB's Darknet computes these: golden per-layer outputs of its cfgs (shrunk: fewer
filters, small inputs, 2 classes) written by AlexeyAB's Darknet itself (CPU build) from random
weights, matched layer by layer to 1e-4 on the CPU and (with `-m gpu`) on the GPU.
tests/golden/README.md says how they were made.
"""

import glob
import os

import numpy as np
import pytest

import engine

from conftest import GOLDEN

TOLERANCE = 1e-4
SETS = ["A1_yolov4_tiny", "A2_yolov4_small", "A3_yolov7_tiny", "A4_efficientnet_b0", "A5_sam",
        "A6_alexeyab_layers"]


def read_set(folder):
    """(cfg path, weights path, batch, inputs, {layer index: expected output})."""
    root = os.path.join(GOLDEN, folder)
    with open(os.path.join(root, "layers.txt")) as handle:
        header = dict(item.split("=") for item in handle.readline().split()[2:])
    batch = int(header["batch_at_dump"])
    inputs = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
    dumps = {int(os.path.basename(p)[1:4]): np.fromfile(p, dtype="<f4").reshape(batch, -1)
             for p in glob.glob(os.path.join(root, "layers", "L*.bin"))}
    cfg = glob.glob(os.path.join(root, "*.cfg"))[0]
    return cfg, os.path.join(root, "weights"), batch, inputs, dumps


@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("folder", SETS)
def test_every_layer_matches_alexeyab(folder, backend):
    """Each layer's output, from AlexeyAB's weights and inputs, equals what AlexeyAB's Darknet
    dumped for it (relative to the layer's largest magnitude, at least 1)."""
    cfg, weights, batch, inputs, dumps = read_set(folder)
    net = engine.load(cfg, weights, backend=backend, quiet=True)
    assert len(dumps) == len(net.layers)
    net.forward(net.ops.asarray(inputs.reshape((batch,) + net.input_shape)))
    for index, expected in sorted(dumps.items()):
        got = net.ops.to_host(net.outputs[index]).reshape(batch, -1)
        error = np.abs(got - expected).max() / max(1.0, np.abs(expected).max())
        assert error <= TOLERANCE, (f"{folder} layer {index} [{net.layers[index].type_name}]: "
                                    f"relative error {error:.2e}")


def test_layer_table_rows_of_the_new_layers_are_alexeyabs():
    """`engine info` prints AlexeyAB's own rows for its layers (shortcut with weights, scale
    Layer for sam/scale_channels, local avgpool, reorg3d, empty, implicit): the lines its parser
    printed for golden A6, without the index column."""
    from engine.models import layer_table

    root = os.path.join(GOLDEN, "A6_alexeyab_layers")
    net = engine.load(os.path.join(root, "a6_alexeyab_layers.cfg"), quiet=True)
    rows = [line.split(None, 1)[1] for line in layer_table(net).splitlines()[1:-1]]
    with open(os.path.join(root, "alexeyab-table-rows.txt")) as handle:
        expected = [line.rstrip("\n") for line in handle]
    for line in expected:
        if line.startswith("implicit"):
            assert line.rstrip() in [row.rstrip() for row in rows], line
            continue
        index, row = line.split(None, 1)
        assert rows[int(index)].rstrip() == row.rstrip(), (index, rows[int(index)], row)
