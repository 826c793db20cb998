"""benchmarks/detection_benchmark.py without a GPU: its parsers of Darknet's output (lines as a
CPU build of AlexeyAB's Darknet printed them), the table and its ratios on canned figures, the
cfg copies and synthetic data it writes (read back by the engine), and a whole run of the
engine's code path on the CPU (--backend cpu) with a stand-in darknet binary, one part of which
hangs: its cells must say so while the others are filled."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import detection_benchmark as bench  # noqa: E402

from engine.config import read_cfg  # noqa: E402
from engine.detection_data import DetectionDataset  # noqa: E402
from engine.network import Network  # noqa: E402

# AlexeyAB's Darknet (CPU build), `detector test` with two images on stdin, and `detector train`.
TEST_OUTPUT = """\
Enter Image Path:  Detection layer: 16 - type = 28 
 Detection layer: 23 - type = 28 
/tmp/s1/data/images/0000.jpg: Predicted in 37.438000 milli-seconds.
Enter Image Path:  Detection layer: 16 - type = 28 
 Detection layer: 23 - type = 28 
/tmp/s1/data/images/0000.jpg: Predicted in 43.138000 milli-seconds.
Enter Image Path:  Detection layer: 16 - type = 28 
/tmp/s1/data/images/0000.jpg: Predicted in 48.993000 milli-seconds.
Enter Image Path:  Detection layer: 16 - type = 28 
/tmp/s1/data/images/0000.jpg: Predicted in 40.759000 milli-seconds.
Enter Image Path: """
TRAIN_OUTPUT = """\
 Detection layer: 23 - type = 28 
Loaded: 0.005461 seconds
\x1b[H\x1b[J1/3: loss=61.1 hours left=-1.0\x07
 1: 61.133881, 61.133881 avg loss, 0.000000 rate, 0.495914 seconds, 2 images, -1.000000 hours left
v3 (mse loss, Normalizer: (iou: 0.75, obj: 1.00, cls: 1.00) Region 16 Avg (IOU: 0.297597), count: 2
 total_bbox = 17, rewritten_bbox = 0.000000 % 
Loaded: 0.000055 seconds

 Tensor Cores are disabled until the first 3000 iterations are reached.
\x1b[H\x1b[J2/3: loss=137.7 hours left=0.0\x07
 2: -nan, -nan avg loss, 0.000000 rate, 0.450571 seconds, 4 images, 0.000279 hours left
Loaded: 0.000096 seconds
\x1b[H\x1b[J3/3: loss=130.9 hours left=0.0\x07
 3: 130.855484, 75.000504 avg loss, 0.000000 rate, 0.431666 seconds, 6 images, 0.000277 hours left
Saving weights to /tmp/s1/data/backup/yolov3-tiny-train_final.weights
"""

TINY_CFG = """\
[net]
batch=1
subdivisions=1
width=32
height=32
channels=3
learning_rate=0.001
max_batches=10

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask=0,1,2
anchors=4,6, 8,12, 14,20
classes=2
num=3
random=1
"""


def test_parse_predicted_ms():
    assert bench.parse_predicted_ms(TEST_OUTPUT, warmup=1) == pytest.approx(43.138)
    assert bench.parse_predicted_ms(TEST_OUTPUT, warmup=0) == pytest.approx((40.759 + 43.138) / 2)
    with pytest.raises(ValueError, match="4 'Predicted in' lines"):
        bench.parse_predicted_ms(TEST_OUTPUT, warmup=4)


def test_parse_train_iterations():
    seconds, loaded, images = bench.parse_train_iterations(TRAIN_OUTPUT, warmup=1)
    assert seconds == pytest.approx((0.450571 + 0.431666) / 2)
    assert loaded == pytest.approx((0.000055 + 0.000096) / 2)
    assert images == 2  # from the running image count, 2 -> 4 -> 6
    with pytest.raises(ValueError, match="3 iteration lines"):
        bench.parse_train_iterations(TRAIN_OUTPUT, warmup=3)


def test_failure_lines():
    traceback = ("Traceback (most recent call last):\n  File 'x.py', line 1\n"
                 "engine.errors.BackendError: out of GPU memory on H200\n")
    assert bench.last_line(traceback) == "engine.errors.BackendError: out of GPU memory on H200"
    darknet = (" 128 x 128 \nmosaic=1 - compile Darknet with OpenCV: Success\n"
               "Darknet error location: ./src/data.c, line #1382\nCUDA Error: out of memory\n"
               "backtrace (7 entries)\n")
    assert bench.last_line(darknet) == "CUDA Error: out of memory"
    assert bench.last_line("a\nlast words\n") == "last words"


def canned_results():
    unsupported = {"unsupported": "bf16 convolutions need cuDNN 8.9"}
    return {"yolov4-tiny": {
        "engine-fp32": {"b1_ms": 2.0, "b16_ips": 1000.0, "train_ips": 100.0, "train_mib": 5000},
        "engine-fp16": {"b1_ms": 1.0, "b16_ips": 3000.0, "train_ips": 300.0, "train_mib": 3000},
        "engine-bf16": {"b1_ms": unsupported, "b16_ips": unsupported, "train_ips": unsupported},
        "torch-eager": {"b1_ms": 3.0, "b16_ips": 2000.0, "train_ips": 200.0, "train_mib": 4000},
        "torch-amp": {"b1_ms": 2.5, "b16_ips": 4000.0, "train_ips": 250.0, "train_mib": 2000},
        "torch-graph": {"b1_ms": 0.8, "b16_ips": {"failed": "timed out after 300 s"}},
        "darknet": {"b1_ms": 2.4, "train_ips": 40.0},
        "darknet-half": {"train_ips": 50.0}}}


def test_table_cells_and_ratios():
    peers = ["engine-fp32", "engine-fp16", "engine-bf16", "torch-eager", "torch-amp",
             "torch-graph", "darknet", "darknet-half"]
    rows = bench.measures([16], 64)
    table = bench.format_table(canned_results(), peers, rows).splitlines()
    cells = {line.split(" | ")[1]: [c.strip() for c in line.split("|")[1:-1]]
             for line in table if line.startswith("| yolov4-tiny")}
    # b1: best engine 1.0 ms; PyTorch CUDA graph 0.8 ms -> 0.80; Darknet 2.4 ms -> 2.40
    b1 = cells["latency b1, ms"]
    assert b1[2:4] == ["2.00", "1.00"] and b1[4].startswith("unsupported: bf16")
    assert b1[-3:-1] == ["0.80", "2.40"]
    # b16: engine best 3000 / PyTorch best 4000 (the failed graph run left out); no Darknet
    b16 = cells["inference b16, img/s"]
    assert b16[7].startswith("failed: timed out") and b16[-3:-1] == ["0.75", "-"]
    # training: engine best 300 / PyTorch AMP 250 (not eager's 200); / Darknet best 50
    assert cells["training b64, img/s"][-3:-1] == ["1.20", "6.00"]
    # memory: lower is better: PyTorch lowest 2000 / engine lowest 3000
    assert cells["GPU memory training, MiB"][-3] == "0.67"
    assert "GPU memory inference b16, MiB" not in cells  # nothing measured: no row
    assert "- yolov4-tiny / PyTorch CUDA graph tf32: failed: timed out after 300 s" in table
    assert "- yolov4-tiny / engine bf16: unsupported: bf16 convolutions need cuDNN 8.9" in table


def test_training_cfgs_and_synthetic_truth(tmp_path):
    src = tmp_path / "tiny.cfg"
    src.write_text(TINY_CFG)
    plain, half = tmp_path / "train.cfg", tmp_path / "half.cfg"
    bench.training_cfg(str(src), str(plain), 4, 64, 7)
    bench.training_cfg(str(src), str(half), 4, 64, 7, half=True)
    net = Network(str(plain), quiet=True)
    assert net.options.batch_size == 4 and net.options.subdivisions == 1
    assert net.input_shape == (3, 64, 64) and net.options.max_batches == 7
    sections = {s.name: s for s in read_cfg(str(half))}
    assert sections["yolo"].str("random") == "0" and sections["net"].str("mosaic") == "0"
    assert sections["net"].str("loss_scale") == "128" and sections["net"].str("burn_in") == "0"
    assert "loss_scale" not in plain.read_text()
    assert bench.detector_classes(str(src)) == 2

    truth = bench.synthetic_truth(np.random.default_rng(1), 50, 2, 10).reshape(50, 10, 5)
    present = truth[..., 2] > 0
    counts = present.sum(1)
    assert counts.min() >= 1 and counts.max() <= 8
    assert np.all(present[:, :-1] | ~present[:, 1:])  # boxes first, zero rows after
    x, y, w, h, cls = np.moveaxis(truth[present], -1, 0)
    assert np.all(x - w / 2 >= 0) and np.all(x + w / 2 <= 1) and np.all(y + h / 2 <= 1)
    assert set(np.unique(cls)) <= {0, 1}


def test_darknet_dataset_reads_back(tmp_path):
    data = bench.write_darknet_dataset(str(tmp_path), 3, 32, classes=2)
    with open(data) as handle:
        options = dict(line.split("=", 1) for line in handle.read().split())
    dataset = DetectionDataset(options["train"], 2, (3, 32, 32), max_boxes=10)
    assert len(dataset) == 3 and options["classes"] == "2"
    images, truth = dataset.training_batch([0, 1, 2])
    assert images.shape == (3, 3, 32, 32) and (truth.reshape(3, 10, 5)[:, 0, 2] > 0).all()
    with open(options["names"]) as handle:
        assert len(handle.read().split()) == 2


FAKE_DARKNET = """#!/bin/sh
# stands in for darknet: `detector test` answers each image on stdin, `detector train` hangs
if [ "$2" = "test" ]; then
    while read image; do echo "$image: Predicted in 12.5 milli-seconds."; done
else
    sleep 600
fi
"""


def test_cpu_run_with_a_hanging_peer(tmp_path):
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    darknet = tmp_path / "darknet"
    darknet.write_text(FAKE_DARKNET)
    darknet.chmod(darknet.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "detection_benchmark.py"),
         "--networks", f"tiny={cfg}", "--backend", "cpu", "--precisions", "fp32", "fp16",
         "--peers", "darknet", "--darknet-bin", str(darknet), "--size", "32", "--batches", "2",
         "--train-batch", "2", "--quick", "--seconds", "0.01", "--timeout", "60",
         "--darknet-timeout", "3",
         "--darknet-images", "2", "--scratch", str(tmp_path / "scratch"), "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    figures = json.loads(out.read_text())["results"]["tiny"]
    engine = figures["engine-fp32"]
    assert engine["b1_ms"] > 0 and engine["b2_ips"] > 0 and engine["train_ips"] > 0
    assert "unsupported" in figures["engine-fp16"]["b1_ms"]
    assert figures["darknet"]["b1_ms"] == 12.5
    assert figures["darknet"]["train_ips"]["failed"].startswith("timed out")
    assert "| tiny | latency b1, ms |" in run.stdout and "failed: timed out" in run.stdout
    assert "engine / Darknet" in run.stdout
    again = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                         "detection_benchmark.py"),
                            "--table-from", str(out)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert "| tiny | inference b2, img/s |" in again.stdout  # the batches the run used


def test_runs_are_merged_later_figures_first(tmp_path):
    """--table-from with several runs (a full run is split across GPU calls): figures per network
    and peer, the later run's replacing the earlier's, peers in the order first seen."""
    meta = {"batches": [16], "train_batch": 64}
    first = {"meta": meta, "peers": ["engine-fp32", "torch-eager"], "results": {
        "yolov3": {"engine-fp32": {"b1_ms": 5.0, "b16_ips": 400.0},
                   "torch-eager": {"b1_ms": 6.0}}}}
    second = {"meta": meta, "peers": ["engine-fp16"], "results": {
        "yolov3": {"engine-fp32": {"b1_ms": 4.0}, "engine-fp16": {"b1_ms": 3.0}},
        "yolov4": {"engine-fp16": {"b1_ms": 9.0}}}}
    paths = []
    for k, run in enumerate((first, second)):
        paths.append(str(tmp_path / f"run{k}.json"))
        with open(paths[-1], "w") as handle:
            json.dump(run, handle)
    merged = bench.merged_runs(paths)
    assert merged["peers"] == ["engine-fp32", "torch-eager", "engine-fp16"]
    assert merged["results"]["yolov3"]["engine-fp32"] == {"b1_ms": 4.0, "b16_ips": 400.0}
    assert merged["results"]["yolov3"]["torch-eager"] == {"b1_ms": 6.0}
    assert merged["results"]["yolov4"]["engine-fp16"] == {"b1_ms": 9.0}
    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                         "detection_benchmark.py"),
                            "--table-from"] + paths, capture_output=True, text=True, timeout=60)
    assert "| yolov4 | latency b1, ms |" in table.stdout, table.stderr


def test_torch_peer_runs_the_same_network(tmp_path):
    """The PyTorch peer's code path (CPU, bf16 autocast standing in for fp16) and its model:
    the same outputs as the engine on the tiny detector, BN unfolded (training's model)."""
    torch = pytest.importorskip("torch")
    from torch_peers import torch_from_network
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    weights = tmp_path / "tiny.weights"
    bench.write_random_weights(str(cfg), str(weights))
    net = Network(str(cfg), quiet=True)
    net.load_weights(str(weights))
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    expected = net.predict(x, batch_size=2).reshape(2, 21, 16, 16)
    with torch.no_grad():
        (got,) = torch_from_network(net, torch, keep_outputs=False).eval()(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)

    setup = {"infer_cfg": str(cfg), "train_cfg": str(tmp_path / "train.cfg"),
             "weights": str(weights), "input": str(tmp_path / "input.npy")}
    np.save(setup["input"], x[:1])
    bench.training_cfg(str(cfg), setup["train_cfg"], 2, 32, 3)
    args = bench.parse_args(["--backend", "cpu", "--size", "32", "--batches", "2",
                             "--train-batch", "2", "--quick", "--seconds", "0.01"])
    results = bench.Results(str(tmp_path / "torch.json"))
    bench.run_torch("torch-amp", setup, args, results)
    assert results.figures["b1_ms"] > 0 and results.figures["b2_ips"] > 0
    assert results.figures["train_ips"] > 0
    (saved,) = bench.load_outputs(results.path)  # its outputs for the engine's comparison
    assert bench.relative_difference([saved], [expected[:1]]) < 2e-2  # bf16 autocast


def test_outputs_compared_with_engine_fp32(tmp_path):
    reference = [np.array([[1.0, -4.0]]), np.array([2.0, 0.5])]
    np.savez(tmp_path / "engine-fp32.json.npz", *reference)
    np.savez(tmp_path / "engine-fp16.json.npz", np.array([[1.02, -4.0]]), np.array([2.0, 0.2]))
    np.savez(tmp_path / "torch-amp.json.npz", np.array([[1.0, -4.0]]))
    figures = {"engine-fp32": {}, "engine-fp16": {}, "torch-amp": {}, "torch-eager": {}}
    bench.compare_outputs(figures, list(figures), str(tmp_path))
    # largest difference over each output's largest magnitude: 0.02 / 4 and 0.3 / 2
    assert figures["engine-fp16"]["diff_fp32"] == pytest.approx(0.15)
    assert "1 [yolo] outputs against 2" in figures["torch-amp"]["diff_fp32"]["failed"]
    assert figures["engine-fp32"] == {} and figures["torch-eager"] == {}  # no outputs saved


@pytest.mark.parametrize("cfg", ["cfg/yolov4-tiny.cfg", "alexeyab:yolov4.cfg"])
def test_torch_peer_covers_yolov4(cfg, tmp_path):
    """The PyTorch peer on yolov4-tiny (route groups, maxpool 2/1) and yolov4 (mish, SPP's
    maxpools 5, 9, 13, scale_x_y), BN unfolded, at 32x32: the engine's [yolo] outputs."""
    torch = pytest.importorskip("torch")
    from torch_peers import torch_from_network
    try:
        src = bench.find_cfg(cfg, None)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    small = tmp_path / "net.cfg"
    bench.inference_cfg(src, str(small), 32)
    weights = tmp_path / "net.weights"
    bench.write_random_weights(str(small), str(weights))
    net = Network(str(small), quiet=True)
    net.load_weights(str(weights))
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    net.predict(x)
    expected = [net.outputs[layer.index] for layer in net.layers if layer.type_name == "yolo"]
    with torch.no_grad():
        got = torch_from_network(net, torch, keep_outputs=False).eval()(torch.from_numpy(x))
    assert bench.relative_difference([y.numpy() for y in got], expected) < 1e-5


class BackendWithoutPrecision:
    """CudaBackend's signature before `precision` (allow_tf32 only)."""

    def __init__(self, device=0, seed=0, allow_tf32=False):
        self.allow_tf32 = allow_tf32


class BackendWithPrecision:
    def __init__(self, device=0, seed=0, precision="fp32"):
        if precision == "bf16":
            raise ValueError("precision bf16 needs cuDNN 8.9 or later")
        if device == 7:
            raise EngineErrorStandIn("no NVIDIA GPU found")
        self.precision = precision


class EngineErrorStandIn(Exception):
    pass


def test_engine_precision_adapter(monkeypatch):
    import engine.backends.cuda as cuda
    monkeypatch.setattr(cuda, "CudaBackend", BackendWithoutPrecision)
    assert bench.engine_backend("tf32", 0).allow_tf32
    assert not bench.engine_backend("fp32", 0).allow_tf32
    with pytest.raises(bench.Unsupported, match="takes no precision"):
        bench.engine_backend("fp16", 0)
    monkeypatch.setattr(cuda, "CudaBackend", BackendWithPrecision)
    assert bench.engine_backend("fp16", 0).precision == "fp16"
    with pytest.raises(bench.Unsupported, match="ValueError: precision bf16 needs cuDNN"):
        bench.engine_backend("bf16", 0)
    with pytest.raises(EngineErrorStandIn):  # not about the precision: a failure, as it is
        bench.engine_backend("fp16", 7)


class BackendWithLayoutOptions:
    def __init__(self, device=0, seed=0, precision="fp32", **options):
        self.precision, self.options = precision, options


def test_layout_and_fusion_ab_flags_reach_the_backend(monkeypatch):
    """--nchw and --unfused (each child gets them: CHILD_FLAGS) make the engine's backend
    with channels_last=False and fused=False; by default neither is passed."""
    import engine.backends.cuda as cuda
    monkeypatch.setattr(cuda, "CudaBackend", BackendWithLayoutOptions)
    assert bench.engine_backend("fp16", 0).options == {}
    assert bench.engine_backend("fp16", 0, unfused=True).options == {"fused": False}
    assert bench.engine_backend("bf16", 0, nchw=True, unfused=True).options == {
        "channels_last": False, "fused": False}
    args = bench.parse_args(["--unfused", "--nchw"])
    assert args.unfused and args.nchw and set(bench.CHILD_FLAGS) == {"nchw", "unfused"}
    assert not bench.parse_args([]).unfused


def test_the_engine_peer_logs_which_convolutions_fused(monkeypatch, capsys):
    from engine.backends.cuda import cudnn_graph

    class Summary:
        def summary(self):
            return "fused convolutions: 3 of 4 shapes"

    monkeypatch.setattr(cudnn_graph, "fusions", lambda dnn: Summary())
    ops = type("Ops", (), {"fused": True, "channels_last": True, "dnn": None})()
    bench.print_fusion_summary(ops)
    assert capsys.readouterr().out == "fused convolutions: 3 of 4 shapes\n"
    for fused, channels_last in ((False, True), (True, False)):
        ops.fused, ops.channels_last = fused, channels_last
        bench.print_fusion_summary(ops)
    bench.print_fusion_summary(object())  # the CPU backend
    assert capsys.readouterr().out == ""
