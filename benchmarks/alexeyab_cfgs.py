"""Loads every cfg of AlexeyAB's Darknet (../shared/darknet-cfg/alexeyab/, or --folder) and
prints the README's table: loads or refused (the one-line reason), parameter count, the .weights
size the cfg implies, unused fields, and which golden set or check covers it.

    python benchmarks/alexeyab_cfgs.py [--folder DIR] [--markdown]
"""

import argparse
import contextlib
import glob
import io
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
    "yolov4-tiny.cfg": "golden A1_yolov4_tiny",
    "yolov4.cfg": "golden A2_yolov4_small",
    "yolov7-tiny.cfg": "golden A3_yolov7_tiny",
    "efficientnet_b0.cfg": "golden A4_efficientnet_b0",
    "yolov4-sam-mish-csp-reorg-bfm.cfg": "golden A5_sam",
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
        stream = io.StringIO()
        with contextlib.redirect_stderr(stream):
            from engine.config import read_cfg, warn_unused
            for section in read_cfg(path):
                pass
        unused = _unused(net)
        rows.append((name, "loads", "", parameter_count(net), weights_file_bytes(net), unused))
    return rows


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
        print("| cfg | status | parameters | .weights bytes | covered by |")
        print("|---|---|---|---|---|")
        for name, status, reason, params, size, unused in rows:
            what = "loads" if status == "loads" else f"refused: {reason.split(': ', 1)[-1]}"
            cover = COVERAGE.get(name, "loads, shapes" if status == "loads" else "refusal line")
            if name in PUBLISHED_SIZES:
                cover += f"; size = published {PUBLISHED_SIZES[name]}"
            print(f"| {name} | {what} | {params if params is not None else '-'} | "
                  f"{size if size is not None else '-'} | {cover} |")
    else:
        for name, status, reason, params, size, unused in rows:
            print(f"{name:45s} {status:8s} {params or '':>10} {size or '':>10} {reason} "
                  f"{'UNUSED: ' + unused if unused else ''}")
    print(f"{loads} of {len(rows)} cfgs load", file=sys.stderr)


if __name__ == "__main__":
    main()
