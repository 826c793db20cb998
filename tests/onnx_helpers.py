"""What the ONNX export tests and tests/onnx_table.py share: a cfg at another input size, random
weights with random BN statistics, an ONNX Runtime session, and the engine's outputs under the
names the exported model gives them."""

import os
import re

import numpy as np

from engine.backends.numpy_backend import NumpyBackend
from engine.network import Network
from engine.onnx_export import HEAD_TYPES

# Every cfg in cfg/ at a size that keeps the CI quick: (input width = height, filters divisor).
# Convolutions that feed a [yolo]/[region] head keep their filters; the full-size networks are
# checked by a slow test and by tests/onnx_table.py.
CI_SIZES = {"mnist": (None, 1), "cifar": (None, 1), "go": (None, 4), "tiny": (64, 1),
            "alexnet": (99, 4), "darknet19": (64, 4), "darknet53": (64, 4),
            "densenet201": (64, 2), "extraction": (64, 4), "resnet18": (64, 4),
            "resnet50": (64, 4), "vgg-16": (64, 4), "yolov2-tiny": (64, 4), "yolov2": (64, 4),
            "yolov3-spp": (64, 4), "yolov3-tiny": (64, 2), "yolov3": (64, 4)}


def resized_cfg(cfg_path, folder, size=None, divisor=1, batch=1):
    """A copy of the cfg with [net] batch=`batch`; with `size`, width = height = size ([crop]
    windows scaled alike, so VGG-16's crop still fits); with `divisor`, every convolution's
    filters and groups (and every [connected] output but the last) divided by it, except those
    right before a [yolo], [Gaussian_yolo] or [region] layer. Returns its path."""
    with open(cfg_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    headers = [n for n, line in enumerate(lines) if line.strip().startswith("[")]
    last_connected = max([n for n in headers if lines[n].strip().startswith("[conn")], default=-1)
    sections, original = 0, None
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            sections += 1
            section = stripped
            following = [lines[n].strip().lower() for n in headers if n > number][:1]
            feeds_head = following in (["[yolo]"], ["[region]"], ["[gaussian_yolo]"])
            last = number == last_connected
        key = stripped.split("=", 1)[0].strip() if "=" in stripped else None
        value = stripped.split("=", 1)[1].split("#")[0].strip() if key else None
        if sections == 1 and key in ("batch", "subdivisions"):
            lines[number] = f"{key}={batch if key == 'batch' else 1}"
        elif sections == 1 and key in ("width", "height") and size:
            original = int(value)
            lines[number] = f"{key}={size}"
        elif key in ("crop_width", "crop_height") and size:
            lines[number] = f"{key}={int(value) * size // original}"
        elif key == "filters" and section.startswith("[conv") and not feeds_head:
            lines[number] = f"filters={max(int(value) // divisor, 1)}"
        elif key == "groups" and section.startswith("[conv") and divisor > 1 and not feeds_head:
            # depthwise (groups = filters) stays depthwise; others shrink with the filters
            groups = int(value)
            lines[number] = f"groups={max(groups // divisor, 1)}"
        elif key == "output" and section.startswith("[conn") and not last:
            lines[number] = f"output={max(int(value) // divisor, 1)}"
    name = re.sub(r"\.cfg$", "", os.path.basename(cfg_path))
    path = os.path.join(str(folder), f"{name}-{size or 'full'}-{divisor}.cfg")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def randomize(net, seed=0, images=2):
    """Random biases, BN scales and [shortcut] weights, and rolling statistics taken from the
    network's own pre-BN outputs on random images: the mean partly (a random 0..50% of it), the variance as the
    mean square about that, times 1..2. BN folding is tested while each layer's output keeps a
    trained network's scale, so a deep network's softmax does not saturate into an exact
    one-hot vector (which would match anything), and no channel whose values barely vary is
    amplified into float32 rounding noise. Weights keep the network's random initialisation."""
    rng = np.random.default_rng(seed)
    ops = net.ops
    for layer in net.layers:
        if layer.type_name == "shortcut" and "weights" in layer.params:  # AlexeyAB's weights
            weights = rng.uniform(-1, 1.5, layer.params["weights"].shape).astype(np.float32)
            layer.params["weights"] = ops.asarray(weights)
        for name, (low, high) in (("biases", (-0.5, 0.5)), ("scales", (0.5, 1.5))):
            if name in layer.params:
                values = rng.uniform(low, high, layer.params[name].shape).astype(np.float32)
                layer.params[name] = ops.asarray(values)
    images, outputs = ops.asarray(images_for(net, images, seed)), []
    for layer in net.layers:
        inputs = [images if j < 0 else outputs[j] for j in layer.input_indices]
        x = inputs if layer.multi_input else inputs[0]
        normalized = _pre_bn_output(ops, layer, x)
        if normalized is not None:
            values = ops.to_host(normalized).astype(np.float64)
            axes = 0 if getattr(layer, "per_activation", False) else (0, 2, 3)
            shape = layer.params["rolling_mean"].shape
            mean = values.mean(axis=axes).reshape(shape) * rng.uniform(0, 0.5, shape)
            spread = ((values - mean.reshape((1,) + values.shape[1:] if axes == 0
                                             else (1, -1, 1, 1))) ** 2).mean(axis=axes)
            var = (spread.reshape(shape) + 1e-6) * rng.uniform(1.0, 2.0, shape)
            layer.params["rolling_mean"] = ops.asarray(mean.astype(np.float32))
            layer.params["rolling_variance"] = ops.asarray(var.astype(np.float32))
        outputs.append(layer.forward(ops, x, False))
    return net


def _pre_bn_output(ops, layer, x):
    """What the layer's inference batch norm normalises, or None if it has none."""
    if layer.type_name == "batchnorm":
        return x
    if not getattr(layer, "batch_normalize", False):
        return None
    if layer.type_name == "convolutional":
        return ops.conv_forward(x, layer.params["weights"], layer.conv_stride,
                                layer.padding * layer.dilation, layer.groups, train=False,
                                dilation=layer.dilation)
    return ops.connected_forward(x, layer.params["weights"])


def random_network(cfg_path, seed=0, images=2):
    """`images`: how many random images the BN statistics come from (more for deep networks
    whose last maps are a few cells, where two images' variance can be near zero)."""
    return randomize(Network(cfg_path, backend=NumpyBackend(), seed=seed, quiet=True), seed,
                     images)


def session(model):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3  # no warnings about the Identity nodes that name outputs
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def engine_outputs(net, images):
    """The engine's inference outputs under the exported model's output names: each
    detection head's output, or `output` = Network.predict for other networks."""
    heads = [layer for layer in net.layers if layer.type_name in HEAD_TYPES]
    if not heads:
        return {"output": net.predict(images, batch_size=len(images))}
    net.forward(net.ops.asarray(images), train=False)
    return {f"{layer.type_name}_{layer.index}": net.ops.to_host(net.outputs[layer.index])
            for layer in heads}


def run_model(model, images):
    runner = session(model)
    names = [output.name for output in runner.get_outputs()]
    return dict(zip(names, runner.run(None, {"input": images})))


def relative_difference(got, expected):
    """The largest difference over every output, relative to that output's largest magnitude."""
    assert sorted(got) == sorted(expected)
    return max(float(np.abs(got[k].astype(np.float64) - expected[k]).max()
                     / max(np.abs(expected[k]).max(), 1e-12)) for k in expected)


def images_for(net, batch, seed=0):
    return np.random.default_rng(seed).random((batch,) + net.input_shape, dtype=np.float32)


# AlexeyAB's cfg folder: every cfg the engine loads is exported at this size, filters / 8, its
# BN statistics from 8 images (at 64 pixels the deepest maps of the P6/P7 models are 1x1 and
# the random networks become chaotic: 1e-7 of input noise moves their outputs by more than 1e-4).
ALEXEYAB_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "darknet-cfg", "alexeyab")
SURVEY_SIZE, SURVEY_DIVISOR, SURVEY_IMAGES = 128, 8, 8


def survey_network(cfg_path, folder):
    """The random network tests/onnx_table.py and the survey test export for an AlexeyAB cfg
    (raises the engine's ConfigError for the cfgs it refuses)."""
    return random_network(resized_cfg(cfg_path, folder, SURVEY_SIZE, SURVEY_DIVISOR),
                          images=SURVEY_IMAGES)
