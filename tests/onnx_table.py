"""Print the README's tables of exported cfgs: every cfg in cfg/ at its full size (random weights
and BN statistics, as the tests make them) and the golden sets (Darknet's weights and inputs),
exported with engine.models.export_onnx and run by ONNX Runtime on the CPU; the largest
difference from the engine's outputs, relative to each output's largest magnitude, in float32
and float16. With --alexeyab, instead: AlexeyAB's golden sets (tests/golden/A*) and every cfg of
AlexeyAB's folder (../shared/darknet-cfg/alexeyab) the engine loads, at 128x128 with filters / 8
(tests/onnx_helpers.survey_network), and the cfgs the engine refuses with its reason.

    python tests/onnx_table.py [--cfgs yolov3 mnist ...] [--no-fp16] [--alexeyab]

A few minutes on 2 cores (yolov3, yolov3-spp and vgg-16 take most of it; --alexeyab about two).
"""

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from onnx_helpers import (
    ALEXEYAB_FOLDER,
    engine_outputs,
    images_for,
    random_network,
    relative_difference,
    resized_cfg,
    run_model,
    survey_network,
)

import engine
from engine.errors import ConfigError
from engine.onnx_export import HEAD_TYPES, build_model

ROOT = os.path.dirname(HERE)


def check(net, images):
    """(fp32 difference, fp16 difference or None, model MB, seconds to export)."""
    started = time.time()
    model = build_model(net, batch="dynamic")
    seconds = time.time() - started
    import onnx

    onnx.checker.check_model(model)
    expected = engine_outputs(net, images)
    fp32 = relative_difference(run_model(model, images), expected)
    fp16 = None
    if ARGS.fp16:
        half = build_model(net, batch="dynamic", fp16=True)
        fp16 = relative_difference(run_model(half, images.astype(np.float16)), expected)
    return fp32, fp16, model.ByteSize() / 1e6, seconds


def row(name, source, net, images):
    fp32, fp16, megabytes, seconds = check(net, images)
    c, h, w = net.input_shape
    heads = [layer for layer in net.layers if layer.type_name in HEAD_TYPES]
    outputs = ", ".join(f"{layer.type_name}_{layer.index}" for layer in heads) or "output"
    half = f"{fp16:.1e}" if fp16 is not None else "-"
    print(f"| {name} | {source} | {w}x{h}x{c} | {outputs} | {fp32:.1e} | {half} | "
          f"{megabytes:.1f} | {seconds:.1f} |", flush=True)
    return fp32


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfgs", nargs="*", help="names in cfg/ (default: all)")
    parser.add_argument("--no-fp16", dest="fp16", action="store_false")
    parser.add_argument("--alexeyab", action="store_true",
                        help="AlexeyAB's golden sets and cfg folder instead")
    ARGS = parser.parse_args()
    if ARGS.alexeyab:
        return alexeyab_tables()
    names = ARGS.cfgs or sorted(os.path.basename(p)[:-4]
                                for p in glob.glob(os.path.join(ROOT, "cfg", "*.cfg")))
    print("| cfg | weights | input | outputs | max difference fp32 | fp16 | MB | export s |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            net = random_network(resized_cfg(os.path.join(ROOT, "cfg", name + ".cfg"), folder))
            worst = max(worst, row(name + ".cfg", "random", net, images_for(net, 1)))
    if not ARGS.cfgs:
        for root in sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "G*"))):
            net = engine.load(glob.glob(os.path.join(root, "*.cfg"))[0],
                              os.path.join(root, "weights"), quiet=True)
            batch = 64 if os.path.basename(root).startswith("G1") else 2
            images = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
            worst = max(worst, row(os.path.basename(root), "golden (Darknet's)", net,
                                   images.reshape((batch,) + net.input_shape)))
    print(f"\nlargest difference: {worst:.1e}")


def golden_batch(root):
    with open(os.path.join(root, "layers.txt")) as handle:
        header = dict(item.split("=") for item in handle.readline().split()[2:])
    return int(header["batch_at_dump"])


def alexeyab_tables():
    print("| cfg | weights | input | outputs | max difference fp32 | fp16 | MB | export s |")
    print("|---|---|---|---|---|---|---|---|")
    worst, refused = 0.0, []
    for root in sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "A*")),
                       key=lambda p: int(os.path.basename(p)[1:].split("_")[0])):
        net = engine.load(glob.glob(os.path.join(root, "*.cfg"))[0],
                          os.path.join(root, "weights"), quiet=True)
        images = np.fromfile(os.path.join(root, "inputs.bin"), dtype="<f4")
        images = images.reshape((golden_batch(root),) + net.input_shape)
        worst = max(worst, row(os.path.basename(root), "golden (AlexeyAB's)", net, images))
    with tempfile.TemporaryDirectory() as folder:
        for path in sorted(glob.glob(os.path.join(ALEXEYAB_FOLDER, "*.cfg")), key=str.lower):
            name = os.path.basename(path)
            try:
                net = survey_network(path, folder)
            except ConfigError as error:
                refused.append((name, str(error).split(": ", 1)[1]))
                continue
            worst = max(worst, row(name, "random, filters / 8", net, images_for(net, 1)))
    print(f"\nlargest difference: {worst:.1e}\n")
    print("| refused by the engine | why |")
    print("|---|---|")
    for name, reason in refused:
        print(f"| {name} | {reason} |")


if __name__ == "__main__":
    main()
