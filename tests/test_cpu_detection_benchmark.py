"""benchmarks/cpu_detection_benchmark.py's per-layer comparison (--layers): the engine's
per-layer times in predict (its inference plans: a chain timed as one call on its first layer),
OpenCV's layer names mapped to Darknet's indexes, and the table; OpenCV's own per-layer times
where it is installed."""

import os
import sys

import numpy as np
import pytest
from conftest import CFG

from engine.backends import numpy_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cpu_detection_benchmark as bench  # noqa: E402

import engine  # noqa: E402

SIZE = 64  # yolov3-tiny's plans (the chain of layers 0-7, the pooled convolution 10) at 64x64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpu_detection_benchmark")
    cfg, weights = str(folder / "yolov3-tiny.cfg"), str(folder / "yolov3-tiny.weights")
    bench.inference_cfg(os.path.join(CFG, "yolov3-tiny.cfg"), cfg, size=SIZE)
    bench.write_random_weights(cfg, weights)
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    return cfg, weights, x


@pytest.mark.parametrize("threads", ["1", "2"])
def test_engine_layer_times_follow_predicts_plans(monkeypatch, tiny, threads):
    monkeypatch.setenv(numpy_backend.THREADS_VARIABLE, threads)
    cfg, weights, x = tiny
    times, notes = bench.engine_layer_times(cfg, weights, x, runs=3, warmup=1)
    net = engine.load(cfg, weights, quiet=True).fold_batchnorm()
    assert sorted(times) == [layer.index for layer in net.layers]
    # the chain is one call, on its first layer; the layers it covers are never called
    assert notes[0] == "chain of layers 0-7"
    assert times[0] > 0
    assert all(times[i] == 0.0 for i in range(1, 7))
    assert notes[10] == "pools for layer 11"
    # every other layer is timed by its own call
    assert all(times[i] > 0 for i in (8, 10, 12, 13, 14, 15, 16, 18, 19, 21, 22, 23))
    # the timers leave the values alone
    wrapped = engine.load(cfg, weights, quiet=True).fold_batchnorm()
    expected = net.predict(x)
    bench.engine_layer_times(cfg, weights, x, runs=1, warmup=0)
    np.testing.assert_array_equal(wrapped.predict(x), expected)


def test_opencv_layer_names_map_to_darknet_indexes():
    assert bench.opencv_layer_index("conv_12") == 12
    assert bench.opencv_layer_index("permute_16") == 16
    assert bench.opencv_layer_index("yolo_23") == 23
    assert bench.opencv_layer_index("data") is None


def test_layer_table_rows_and_sum():
    rows = bench.layer_table(["conv 3x3", "maxpool", "yolo"], {0: 2.5, 1: 0.0, 2: 0.25},
                             {0: 2.0, 1: 0.5}, {0: "pools for layer 1"})
    assert rows[2] == "| 0 | conv 3x3 | 2.50 | 2.00 | +0.50 | pools for layer 1 |"
    assert rows[3] == "| 1 | maxpool | 0.00 | 0.50 | -0.50 |  |"
    assert rows[4] == "| 2 | yolo | 0.25 | 0.00 | +0.25 |  |"
    assert rows[-1] == "| sum | | 2.75 | 2.50 | +0.25 | |"


def test_layer_types_name_the_convolutions(tiny):
    kinds = bench.layer_types(tiny[0])
    assert kinds[0] == "conv 3x3 3->16 at 64"
    assert kinds[1] == "maxpool"
    assert kinds[13] == "conv 1x1 1024->256 at 2"


def test_opencv_layer_times(tiny):
    pytest.importorskip("cv2")
    cfg, weights, x = tiny
    times = bench.opencv_layer_times(cfg, weights, x, runs=2, threads=1, warmup=1)
    assert set(times) <= set(range(24))
    assert times[12] > 0 and times[16] > 0  # conv_12; permute_16 + yolo_16
