"""benchmarks/augment_seeds.py, the several-seed MNIST benchmark of cfg/mnist-augment.cfg, run
on the CPU with tiny settings: a small IDX set, two seeds at once, two iterations each."""

import gzip
import os
import re
import struct
import sys

import numpy as np
import pytest

from conftest import CFG, ROOT
from engine.data import read_idx

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import augment_seeds  # noqa: E402


def write_idx(path, array):
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.fixture
def small_mnist(tmp_path):
    """64 training and 40 test digits of the shipped MNIST, as a .data file."""
    mnist = os.path.join(ROOT, "data", "mnist")
    for name, source, count in (("train", "train", 64), ("valid", "t10k", 40)):
        write_idx(tmp_path / f"{name}-images.idx3.gz",
                  read_idx(os.path.join(mnist, f"{source}-images.idx3-ubyte.gz"))[:count])
        write_idx(tmp_path / f"{name}-labels.idx1.gz",
                  read_idx(os.path.join(mnist, f"{source}-labels.idx1-ubyte.gz"))[:count])
    data = tmp_path / "small.data"
    data.write_text("classes=10\n" + "".join(
        f"{name}={tmp_path}/{name}-images.idx3.gz\n{name}_labels={tmp_path}/{name}-labels.idx1.gz\n"
        for name in ("train", "valid")))
    return str(data)


def test_two_seeds_in_parallel_table_and_summary(small_mnist, tmp_path, capsys):
    keep = tmp_path / "weights"
    code = augment_seeds.main(["--cfg", os.path.join(CFG, "mnist-augment.cfg"), "--data",
                               small_mnist, "--cpu", "--seeds", "2", "--first", "3", "--parallel",
                               "2", "--max-batches", "2", "--keep", str(keep)])
    out = capsys.readouterr().out
    assert code == 0, out
    table = re.findall(r"^\s*([0-9]+)\s+([0-9.]+)%\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    rows = table[-2:]  # the final table, in seed order (after the lines as seeds finish)
    assert [int(seed) for seed, *_ in rows] == [3, 4]
    top1 = [float(value) for _, value, *_ in rows]
    for value in top1:  # 40 test images: each top-1 is a multiple of 2.5%
        assert 0 <= value <= 100 and abs(value / 2.5 - round(value / 2.5)) < 1e-6
    mean = re.search(r"mean ([0-9.]+)%  sd ([0-9.]+)  min ([0-9.]+)%  max ([0-9.]+)%", out)
    assert float(mean.group(1)) == pytest.approx(np.mean(top1), abs=1e-3)
    assert float(mean.group(2)) == pytest.approx(np.std(top1, ddof=1), abs=1e-3)
    assert (float(mean.group(3)), float(mean.group(4))) == (min(top1), max(top1))
    assert "mean >= 99.5%: NO" in out  # two iterations cannot reach it
    for seed in (3, 4):  # each seed trained by its own engine train, which saved its weights
        assert os.path.getsize(keep / f"seed-{seed}" / "mnist-augment_final.weights") > 0


def test_a_failing_seed_is_reported_with_its_error(small_mnist, tmp_path, capsys):
    cfg = tmp_path / "broken.cfg"
    cfg.write_text(open(os.path.join(CFG, "mnist-augment.cfg")).read()
                   .replace("min_crop=25", "min_crop=40"))  # above max_crop: refused
    code = augment_seeds.main(["--cfg", str(cfg), "--data", small_mnist, "--cpu", "--seeds", "1",
                               "--max-batches", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^\s*0  failed: train: .*broken.cfg:[0-9]+: \[net\] min_crop=40", out, re.M)
    assert "no seed finished" in out
