"""benchmarks/yolo_loss_benchmark.py on the CPU, small: a row per [yolo] head, its host part
within the whole call, and the loss the flag asks for."""

import io
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import yolo_loss_benchmark as bench  # noqa: E402


@pytest.mark.parametrize("darknet", ["pjreddie", "alexeyab"])
def test_a_row_per_head(darknet):
    stream = io.StringIO()
    rows = bench.run(["yolov3-tiny"], "cpu", None, 2, 64, 2, darknet=darknet, stream=stream)
    assert [(name, grid) for name, grid, _ in rows] == [("yolov3-tiny", "2x2"),
                                                          ("yolov3-tiny", "4x4")]
    for _, _, times in rows:
        assert 0 < times["host"] <= times["cost"] and times["truth_overlap"] > 0
    assert stream.getvalue().count(f"({darknet}'s loss)") == 2
