"""Loads every cfg of AlexeyAB's Darknet (../shared/darknet-cfg/alexeyab/, or --folder) and
prints the README's table: loads or refused (the one-line reason), parameter count, the .weights
size the cfg implies, unused fields, and which golden set or check covers it.

    python benchmarks/alexeyab_cfgs.py [--folder DIR] [--markdown]
"""

import argparse
import glob
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.backends.numpy_backend import NumpyBackend  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.models import parameter_count, weights_file_bytes  # noqa: E402
from engine.network import Network  # noqa: E402

FOLDER = os.path.join(os.path.dirname(ROOT), "shared", "darknet-cfg", "alexeyab")

# cfg -> the golden set (tests/golden) or test that checks it beyond loading
COVERAGE = {
    "yolov4-tiny.cfg": "golden A1 (every layer; detector test)",
    "yolov4.cfg": "golden A2 (every layer)",
    "yolov7-tiny.cfg": "golden A3 (every layer; detector test)",
    "efficientnet_b0.cfg": "golden A4 (every layer)",
    "yolov4-sam-mish-csp-reorg-bfm.cfg": "golden A5 (every layer)",
    "yolov7.cfg": "golden A9 (every layer)",
    "Gaussian_yolov3_BDD.cfg": "golden A10 (every layer)",
    "yolov4-csp.cfg": "golden A11 (every layer)",
    "t1.test.cfg": "golden A12 (every layer)",
}
# AlexeyAB feature -> the golden set that checks it layer by layer against AlexeyAB's Darknet
FEATURE_GOLDEN = {"mish": "A2", "swish": "A4", "scale_channels": "A4", "sam": "A5",
                  "reorg3d": "A5", "scale_x_y": "A1", "new_coords": "A3", "route groups": "A1",
                  "gaussian_yolo": "A6", "weighted shortcut": "A6", "local_avgpool": "A6",
                  "hard_mish": "A6", "gelu": "A6", "revleaky": "A6", "implicit": "A6",
                  "empty": "A6", "normalize_channels": "A6", "depthwise conv": "A4",
                  "dilation": "A7", "share_index": "A7"}
# Refusals caused by mistakes in the cfg itself (AlexeyAB reads past its arrays there).
CFG_MISTAKES = {
    "cspx-p7-mish.cfg": "the cfg lists 20 anchors with num=16 and masks 16..19",
    "cspx-p7-mish_hp.cfg": "a missing comma ('61,45    61,45') merges two anchors into 4561",
}
PUBLISHED_SIZES = {"yolov4.cfg": 257717640, "yolov4-tiny.cfg": 24251276}


class ZeroInit:
    """Stands in for the weight-initialisation generator: shapes are all that matter here."""

    def standard_normal(self, shape):
        return np.zeros(shape, dtype=np.float32)

    def uniform(self, low, high, shape):
        return np.zeros(shape, dtype=np.float32)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.zeros(size, dtype=np.float32)

    def integers(self, high):
        return 0


def load_without_weights(path):
    original = np.random.default_rng
    np.random.default_rng = lambda seed=None: ZeroInit()
    try:
        return Network(path, backend=NumpyBackend(), quiet=True)
    finally:
        np.random.default_rng = original


def survey(folder=FOLDER):
    """One row per cfg: (name, status, reason, parameters, weights bytes, unused fields)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.cfg"))):
        name = os.path.basename(path)
        try:
            net = load_without_weights(path)
        except EngineError as error:
            reason = str(error).replace(path, name)
            rows.append((name, "refused", reason, None, None, ""))
            continue
        unused = _unused(net)
        rows.append((name, "loads", ", ".join(features(net)), parameter_count(net),
                     weights_file_bytes(net), unused))
    return rows


def features(net):
    """The AlexeyAB-only features a loaded network uses."""
    found = set()
    for layer in net.layers:
        kind = layer.type_name
        if kind in ("scale_channels", "sam", "reorg3d", "gaussian_yolo", "local_avgpool",
                    "implicit", "empty"):
            found.add(kind)
        activation = getattr(layer, "activation", "linear")
        if activation in ("mish", "swish", "hard_mish", "gelu", "revleaky", "relu6"):
            found.add(activation)
        if activation.startswith("normalize_channels"):
            found.add("normalize_channels")
        if kind == "yolo" and layer.scale_x_y != 1:
            found.add("scale_x_y")
        if kind == "yolo" and layer.new_coords:
            found.add("new_coords")
        if kind == "route" and layer.groups > 1:
            found.add("route groups")
        if kind == "shortcut" and layer.multilayer:
            found.add("weighted shortcut")
        if kind == "convolutional" and layer.groups > 1 and layer.groups == layer.filters:
            found.add("depthwise conv")
        if kind == "convolutional" and layer.dilation > 1:
            found.add("dilation")
        if kind == "convolutional" and layer.share_owner is not None:
            found.add("share_index")
    return sorted(found)


def _unused(net):
    keys = []
    sections = [net.options.section] + [layer.section for layer in net.layers]
    for section in sections:
        keys += [f"[{section.name}] {k}" for k in section.unused()]
    return ", ".join(sorted(set(keys)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=FOLDER)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = survey(args.folder)
    loads = sum(row[1] == "loads" for row in rows)
    if args.markdown:
        print("| cfg | status | AlexeyAB features used | parameters | .weights bytes | checked by |")
        print("|---|---|---|---|---|---|")
        for name, status, reason, params, size, unused in rows:
            if status == "loads":
                what, used = "loads", reason
                goldens = sorted({FEATURE_GOLDEN[f] for f in reason.split(", ") if f in FEATURE_GOLDEN})
                cover = COVERAGE.get(name, "survey" + (f"; its features: golden {', '.join(goldens)}"
                                                        if goldens else ""))
            else:
                line = reason.split(":")[1] if reason.count(":") >= 2 else "?"
                what, used = f"refused (line {line}): {reason.split('] ', 1)[-1]}", "-"
                if name in CFG_MISTAKES:
                    what += f" ({CFG_MISTAKES[name]})"
                cover = "refusal line (survey)"
            if name in PUBLISHED_SIZES:
                cover += f"; size = published file ({PUBLISHED_SIZES[name]})"
            print(f"| {name} | {what} | {used or '-'} | {params if params is not None else '-'} | "
                  f"{size if size is not None else '-'} | {cover} |")
    else:
        for name, status, reason, params, size, unused in rows:
            print(f"{name:45s} {status:8s} {params or '':>10} {size or '':>10} {reason} "
                  f"{'UNUSED: ' + unused if unused else ''}")
    print(f"{loads} of {len(rows)} cfgs load", file=sys.stderr)


if __name__ == "__main__":
    main()
