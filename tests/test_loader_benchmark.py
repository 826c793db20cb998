"""benchmarks/loader_benchmark.py runs and prints its table (a small smoke run)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import loader_benchmark  # noqa: E402


def test_loader_benchmark_prints_a_rate_per_worker_count(capsys):
    loader_benchmark.main(["--workers", "0", "--batch", "2", "--images", "4", "--batches", "1",
                           "--image-size", "64", "48", "--size", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("one image in this process: ") and "decoding" in lines[1]
    del lines[1]
    assert lines[1:3] == ["| workers | images/s | trainer CPU ms per batch |", "|---|---|---|"]
    workers, rate, trainer = lines[3].strip("| ").split(" | ")
    assert workers == "0" and float(rate) > 0 and float(trainer) >= 0
