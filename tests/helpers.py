"""Small helpers the CPU tests share: build one layer from a cfg snippet, tiny cfg files."""

from types import SimpleNamespace

import numpy as np

from engine.backends.numpy_backend import PJREDDIE_BN_EPSILONS, NumpyBackend
from engine.config import read_cfg
from engine.layers import LAYER_TYPES
from engine.memory import ParameterBudget


def write_cfg(path, net_options, body):
    """Write a cfg: [net] with `net_options` (dict) then the raw text `body`."""
    lines = ["[net]"] + [f"{k}={v}" for k, v in net_options.items()]
    path.write_text("\n".join(lines) + "\n\n" + body.strip() + "\n")
    return str(path)


def build_layer(tmp_path, section_text, in_shape, layer_shapes=(), seed=1, darknet="pjreddie"):
    """Build the single layer described by `section_text` for an input of shape (C, H, W).

    `layer_shapes` are the output shapes of earlier layers (for [route]); the layer gets the
    index len(layer_shapes). `darknet`: whose cfg it is ([yolo] picks its loss by it)."""
    c, h, w = in_shape
    path = write_cfg(tmp_path / f"layer{np.random.randint(1 << 30)}.cfg",
                     {"batch": 1, "height": h, "width": w, "channels": c}, section_text)
    section = read_cfg(path)[1]
    net = SimpleNamespace(rng=np.random.default_rng(seed), layer_shapes=list(layer_shapes),
                          darknet=darknet,
                          options=SimpleNamespace(width=w, height=h),
                          reserve_parameters=ParameterBudget().reserve,
                          bn_epsilons=PJREDDIE_BN_EPSILONS)
    return LAYER_TYPES[section.name](section, len(layer_shapes), [tuple(in_shape)], net)


def as_float64(layer, rng=None):
    """Make every parameter and update buffer float64; randomise biases and scales if rng given."""
    layer.params = {k: np.array(v, dtype=np.float64) for k, v in layer.params.items()}
    layer.updates = {k: np.zeros(v.shape, dtype=np.float64) for k, v in layer.updates.items()}
    if rng is not None:
        if "biases" in layer.params:
            layer.params["biases"] = rng.uniform(-0.5, 0.5, layer.params["biases"].shape)
        if "scales" in layer.params:
            layer.params["scales"] = rng.uniform(0.5, 1.5, layer.params["scales"].shape)
    return layer


def cpu():
    return NumpyBackend(seed=0)


def reference_iou(a, b):
    """Intersection over union of two (x, y, w, h) centre boxes, in plain Python as Darknet's
    box_iou computes it: the tests' reference for the engine's vectorised version."""
    def overlap(c1, s1, c2, s2):
        return min(c1 + s1 / 2, c2 + s2 / 2) - max(c1 - s1 / 2, c2 - s2 / 2)
    ow, oh = overlap(a[0], a[2], b[0], b[2]), overlap(a[1], a[3], b[1], b[3])
    inter = 0 if ow < 0 or oh < 0 else ow * oh
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def transcribed_strided_at(i, counts, walk):
    """kernels/strided.cuh's strided_at, for an element index i or a numpy array of them."""
    offset, steps = walk[0], walk[1:]
    at = offset
    for c, s in zip(counts[::-1], steps[:0:-1]):
        at += (i % c) * s
        i = i // c
    return at + i * steps[0]
