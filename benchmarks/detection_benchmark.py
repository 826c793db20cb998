"""GPU speed of detection networks at 416x416: the engine in each precision against PyTorch
(eager TF32, AMP fp16 channels_last, CUDA graph TF32) and AlexeyAB's Darknet (CUDNN, CUDNN_HALF),
in one run, as one table (issue 13's peers table).

    python benchmarks/detection_benchmark.py [--networks yolov3-tiny yolov4-tiny yolov3 yolov4]
        [--precisions fp32 tf32 fp16 bf16] [--peers torch-eager torch-amp torch-graph darknet
        darknet-half] [--batches 16 64] [--train-batch 64] [--seconds 1] [--quick]
        [--darknet-src DIR --darknet-build DIR] [--alexeyab-cfg-dir DIR] [--json PATH]

Measures, per network (random weights written once, calibrated so that fp16 holds them:
benchmarks/calibrated_weights.py; read by every peer):
- latency at batch 1 as a user calls it: a host numpy image in, host outputs out (engine:
  `Network.predict` with BN folded; PyTorch: torch.from_numpy -> .cuda() -> model -> .cpu() of
  the [yolo] outputs; CUDA graph: copy into the captured input, replay, .cpu(); Darknet: its
  `detector test` "Predicted in X milli-seconds", which times network_predict: copy in, forward,
  copy of the [yolo] outputs back), the median over the timed calls;
- images/s at each --batches size, called the same way (host in, host out);
- training images/s at --train-batch (one pass: subdivisions=1) on a synthetic batch held in
  page-locked host memory, as each peer's loader gives it (random images, 1..8 random truth boxes
  each): engine: its detector iteration (engine.train's iteration_runner: host batch copied in,
  forward, the [yolo] loss, backward, SGD update, loss read back; the batch in ops.host_empty's
  memory, where engine train assembles batches; the loss scaling engine train uses: dynamic in
  fp16, loss_scaling.scaler_for); PyTorch: a pin_memory() batch copied with
  non_blocking=True (DataLoader(pin_memory=True)), BN in training mode, SGD with momentum and
  decay, a stand-in loss (squared error of every [yolo] output against a fixed random target: elementwise
  work of the same order as the YOLO loss, no box matching), input copied in and loss read back
  every step, eager TF32 and AMP fp16 (GradScaler, channels_last); Darknet: `detector train` on
  --darknet-images random jpgs with label files, its own "N seconds" per iteration (the time of
  train_network; waiting for the loader thread is reported apart, as "Loaded:");
- GPU memory (MiB, total - free on the device, so the process's context is included) after the
  largest inference batch and after training; Darknet: the peak of nvidia-smi's total - free
  while its process runs, minus the reading before it started;
- the [yolo] outputs of every engine precision and PyTorch peer for one shared batch-1 image
  against the engine's fp32 ones (largest difference over the output's largest value).

Peers: `darknet` uses the cfg as written (AlexeyAB trains in fp32/TF32 unless the cfg sets
loss_scale, and then only after 3 * burn_in iterations; its inference uses fp16 with
CUDNN_HALF); `darknet-half` trains with loss_scale=128 and burn_in=0, so tensor cores run in
fp16 from the first iteration (training row only).

Every engine precision and every peer runs in its own process with a timeout (--timeout); a
peer that fails or times out gets "failed: <reason>" in its cells (the full reason is listed
under the table and kept in the JSON) and the others still run. An engine precision that the
backend refuses is "unsupported: <reason>".

Ratios, > 1 meaning the engine is ahead (issue 13's Targets): throughput: engine best /
PyTorch best; batch-1 latency: PyTorch CUDA graph / engine best; training: engine best /
PyTorch AMP, and engine best / Darknet best; memory: peer lowest / engine lowest.

Darknet: --darknet-src (AlexeyAB/darknet sources) is copied to --darknet-build and built there
with `make GPU=1 CUDNN=1 CUDNN_HALF=1 OPENMP=1 AVX=1 ARCH=...` (cuDNN's headers and library from
the nvidia.cudnn wheel, when installed), unless --darknet-build already holds a `darknet`
binary. --darknet-bin uses a given binary instead.

PyTorch and Darknet are benchmark-only peers, never engine dependencies.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCHMARKS)

from cpu_detection_benchmark import (inference_cfg, rewrite_cfg,  # noqa: E402
                                     write_random_weights)

SIZE = 416
NETWORKS = {"yolov3-tiny": "cfg/yolov3-tiny.cfg", "yolov4-tiny": "cfg/yolov4-tiny.cfg",
            "yolov3": "cfg/yolov3.cfg", "yolov4": "alexeyab:yolov4.cfg"}
ALEXEYAB_CFG_DIRS = (os.path.join(ROOT, "shared", "darknet-cfg", "alexeyab"),
                     os.path.join(os.path.dirname(ROOT), "shared", "darknet-cfg", "alexeyab"))
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
TORCH_PEERS = {"torch-eager": "PyTorch eager tf32", "torch-amp": "PyTorch AMP fp16 NHWC",
               "torch-graph": "PyTorch CUDA graph tf32"}
DARKNET_PEERS = {"darknet": "AlexeyAB Darknet", "darknet-half": "AlexeyAB Darknet fp16 train"}
DARKNET_ARCH = "-gencode arch=compute_90,code=[sm_90,compute_90]"
TRAIN_LEARNING_RATE = 1e-4  # small enough that random networks stay finite for a few steps
MAX_TRUTH_PER_IMAGE = 8


# ---- what is measured, and how the table reads -------------------------------------------------
def measures(batches, train_batch):
    """(key, row label, lower is better) of every figure, in table order."""
    rows = [("b1_ms", "latency b1, ms", True)]
    rows += [(f"b{b}_ips", f"inference b{b}, img/s", False) for b in batches]
    rows += [("train_ips", f"training b{train_batch}, img/s", False),
             ("infer_mib", f"GPU memory inference b{max(batches, default=1)}, MiB", True),
             ("train_mib", "GPU memory training, MiB", True),
             ("diff_fp32", "b1 outputs: max rel. diff vs engine fp32", True)]
    return rows


def engine_peer(precision):
    return f"engine-{precision}"


def peer_label(peer):
    if peer.startswith("engine-"):
        return f"engine {peer[len('engine-'):]}"
    return {**TORCH_PEERS, **DARKNET_PEERS}.get(peer, peer)


def value_of(cell):
    """The number in a result cell, or None (failed, unsupported, not measured)."""
    return cell if isinstance(cell, (int, float)) and not isinstance(cell, bool) else None


def best(cells, lower):
    values = [v for v in map(value_of, cells) if v is not None and v > 0]
    if not values:
        return None
    return min(values) if lower else max(values)


def advantage(engine_value, peer_value, lower):
    """How far the engine is ahead (> 1) or behind (< 1) of a peer on one figure."""
    if engine_value is None or peer_value is None:
        return None
    return peer_value / engine_value if lower else engine_value / peer_value


def ratios(figures, key, lower, peers):
    """The ratio columns of one row: (engine best vs PyTorch, engine best vs Darknet), as the
    Targets define them (see the module docstring)."""
    if key == "diff_fp32":
        return None, None
    engines = [figures.get(p, {}).get(key) for p in peers if p.startswith("engine-")]
    mine = best(engines, lower)
    torch_cells = [figures.get(p, {}).get(key) for p in peers if p in TORCH_PEERS]
    if key == "b1_ms" and "torch-graph" in peers:
        torch_cells = [figures.get("torch-graph", {}).get(key)]
    elif key == "train_ips" and "torch-amp" in peers:
        torch_cells = [figures.get("torch-amp", {}).get(key)]
    darknet_cells = [figures.get(p, {}).get(key) for p in peers if p in DARKNET_PEERS]
    return (advantage(mine, best(torch_cells, lower), lower),
            advantage(mine, best(darknet_cells, lower), lower))


TARGETS = {"b1_ms": "PyTorch ≥ 1", "train_ips": "Darknet ≥ 5, PyTorch ≥ 1",
           "diff_fp32": "engine fp16 ≤ 1e-2"}


def format_cell(cell, key):
    if cell is None:
        return "-"
    if isinstance(cell, dict):
        kind = "unsupported" if "unsupported" in cell else "failed"
        reason = cell.get(kind, "")
        return f"{kind}: {reason[:40]}{'…' if len(reason) > 40 else ''}"
    if key == "b1_ms":
        return f"{cell:.2f}"
    if key == "diff_fp32":
        return f"{cell:.1e}"
    return f"{cell:.0f}"


def format_table(results, peers, rows):
    """results: {network: {peer: {key: number | {"failed": why} | {"unsupported": why}}}} ->
    the markdown table, then the full text of every failure."""
    header = ["network", "measure"] + [peer_label(p) for p in peers]
    header += ["engine / PyTorch", "engine / Darknet", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failures = []
    for network, figures in results.items():
        for key, label, lower in rows:
            cells = [figures.get(p, {}).get(key) for p in peers]
            if all(c is None for c in cells):
                continue
            for peer, cell in zip(peers, cells):
                if isinstance(cell, dict):
                    kind = "unsupported" if "unsupported" in cell else "failed"
                    entry = f"{network} / {peer_label(peer)}: {kind}: {cell.get(kind, '')}"
                    if entry not in failures:
                        failures.append(entry)
            versus = ratios(figures, key, lower, peers)
            target = TARGETS.get(key, "PyTorch ≥ 1" if key.endswith("_ips") else "")
            lines.append("| " + " | ".join(
                [network, label] + [format_cell(c, key) for c in cells]
                + [f"{r:.2f}" if r is not None else "-" for r in versus] + [target]) + " |")
    if failures:
        lines += ["", "Failures:"] + [f"- {entry}" for entry in failures]
    return "\n".join(lines)


def failure(error):
    """One line for an exception: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# ---- cfg copies and synthetic data (the parent process) ----------------------------------------
def training_cfg(src, dst, batch, size, max_batches, half=False):
    """[net] with one pass of `batch` images (subdivisions=1), size x size and max_batches;
    [yolo] random=0 and [net] mosaic=0, so that every iteration runs at size x size and a
    Darknet built without OpenCV can load the data (mosaic needs OpenCV). `half`: AlexeyAB's
    fp16 training switched on from the first iteration (loss_scale != 1, burn_in=0)."""
    net = {"batch": batch, "subdivisions": 1, "width": size, "height": size,
           "max_batches": max_batches, "mosaic": 0}
    if half:
        net.update(loss_scale=128, burn_in=0)
    rewrite_cfg(src, dst, {"net": net, "yolo": {"random": 0}, "gaussian_yolo": {"random": 0}})


def detector_classes(cfg):
    """classes= of the cfg's last [yolo] section (80 for the COCO cfgs)."""
    classes, in_yolo = None, False
    with open(cfg) as handle:
        for line in handle:
            stripped = line.split("#", 1)[0].strip()
            if stripped.startswith("["):
                in_yolo = stripped.lower() in ("[yolo]", "[gaussian_yolo]", "[region]")
            elif in_yolo and stripped.split("=", 1)[0].strip() == "classes":
                classes = int(stripped.split("=", 1)[1])
    if classes is None:
        raise ValueError(f"{cfg}: no [yolo] section with classes=")
    return classes


def random_boxes(rng, count):
    """count rows (x, y, w, h) of boxes inside the image."""
    w, h = rng.uniform(0.05, 0.5, count), rng.uniform(0.05, 0.5, count)
    return np.stack([rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2), w, h], 1)


def synthetic_truth(rng, images, classes, max_boxes):
    """Darknet truth rows (images, max_boxes * 5): 1..8 random boxes (x, y, w, h, class) each."""
    truth = np.zeros((images, max_boxes * 5), dtype=np.float32)
    for i in range(images):
        count = int(rng.integers(1, min(MAX_TRUTH_PER_IMAGE, max_boxes) + 1))
        rows = np.concatenate([random_boxes(rng, count), rng.integers(0, classes, (count, 1))], 1)
        truth[i, :rows.size] = rows.reshape(-1)
    return truth


def write_darknet_dataset(folder, count, size, classes, seed=0):
    """count random size x size jpgs with label files beside them (AlexeyAB's x.jpg -> x.txt),
    the train list, a names file and the .data file; returns the .data path."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(images, f"{i:04d}.jpg")
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        boxes = random_boxes(rng, int(rng.integers(1, MAX_TRUTH_PER_IMAGE + 1)))
        with open(os.path.splitext(path)[0] + ".txt", "w") as handle:
            handle.writelines(f"{rng.integers(classes)} " + " ".join(f"{v:.6f}" for v in box)
                              + "\n" for box in boxes)
        paths.append(path)
    train_list = os.path.join(folder, "train.txt")
    with open(train_list, "w") as handle:
        handle.write("\n".join(paths) + "\n")
    names = os.path.join(folder, "names.txt")
    with open(names, "w") as handle:
        handle.write("".join(f"class{c}\n" for c in range(classes)))
    backup = os.path.join(folder, "backup")
    os.makedirs(backup, exist_ok=True)
    data = os.path.join(folder, "train.data")
    with open(data, "w") as handle:
        handle.write(f"classes={classes}\ntrain={train_list}\nvalid={train_list}\n"
                     f"names={names}\nbackup={backup}\n")
    return data


# ---- Darknet: build, run, parse ------------------------------------------------------------------
PREDICTED = re.compile(r"Predicted in ([0-9.]+) milli-seconds")
ITERATION = re.compile(r"^\s*(\d+): \S+, \S+ avg loss, \S+ rate, ([0-9.]+) seconds, (\d+) images",
                       re.MULTILINE)
LOADED = re.compile(r"Loaded: ([0-9.]+) seconds")


def parse_predicted_ms(text, warmup):
    """Median of detector test's "Predicted in X milli-seconds" after the first `warmup`."""
    times = [float(v) for v in PREDICTED.findall(text)]
    if len(times) <= warmup:
        raise ValueError(f"darknet printed {len(times)} 'Predicted in' lines, expected more than "
                         f"{warmup}")
    return statistics.median(times[warmup:])


def parse_train_iterations(text, warmup):
    """detector train's per-iteration lines after the first `warmup`: (median seconds of
    train_network, median seconds waiting for the loader, images per iteration)."""
    rows = [(int(i), float(s), int(n)) for i, s, n in ITERATION.findall(text)]
    loaded = [float(v) for v in LOADED.findall(text)]
    if len(rows) <= warmup:
        raise ValueError(f"darknet printed {len(rows)} iteration lines, expected more than "
                         f"{warmup}")
    per_iteration = rows[1][2] - rows[0][2] if len(rows) > 1 else rows[0][2]
    return (statistics.median(s for _, s, _ in rows[warmup:]),
            statistics.median(loaded[warmup:]) if len(loaded) > warmup else None, per_iteration)


def cudnn_wheel_dirs():
    """(include, lib) of the nvidia.cudnn wheel, or None when it is not installed."""
    try:
        import nvidia.cudnn
    except ImportError:
        return None
    base = next(iter(nvidia.cudnn.__path__))
    return os.path.join(base, "include"), os.path.join(base, "lib")


def build_darknet(src, build, arch=DARKNET_ARCH, jobs=None, gpu=True, timeout=900):
    """The darknet binary built from a copy of `src` in `build` (reused when already built)."""
    tree = os.path.join(build, "darknet")
    binary = os.path.join(tree, "darknet")
    if os.path.exists(binary):
        return binary
    if not src or not os.path.isdir(src):
        raise FileNotFoundError(f"no darknet binary in {tree} and no --darknet-src to build one")
    if not os.path.isdir(tree):
        shutil.copytree(src, tree, ignore=shutil.ignore_patterns(".git", "obj", "*.o"))
    env = darknet_env()
    toolkit = cuda_toolkit()
    if gpu and toolkit and not shutil.which("nvcc", path=env.get("PATH")):
        prepend(env, "PATH", os.path.join(toolkit, "bin"))
    flags = ["GPU=1", "CUDNN=1", "CUDNN_HALF=1", "OPENMP=1", "AVX=1", f"ARCH={arch}"] if gpu \
        else ["GPU=0", "CUDNN=0", "CUDNN_HALF=0", "OPENMP=0", "AVX=0"]
    dirs = cudnn_wheel_dirs() if gpu else None
    if dirs:
        include, lib = dirs
        # the wheel ships libcudnn.so.9 only; the linker's -lcudnn needs libcudnn.so
        links = os.path.join(build, "cudnn-link")
        os.makedirs(links, exist_ok=True)
        versioned = sorted(glob.glob(os.path.join(lib, "libcudnn.so.*")))
        if versioned and not os.path.exists(os.path.join(links, "libcudnn.so")):
            os.symlink(versioned[0], os.path.join(links, "libcudnn.so"))
        prepend(env, "CPATH", include)
        prepend(env, "LIBRARY_PATH", links, lib)
    jobs = jobs or os.cpu_count() or 2
    log = os.path.join(build, "build.log")
    with open(log, "w") as handle:
        done = subprocess.run(["make", f"-j{jobs}"] + flags, cwd=tree, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if done.returncode != 0 or not os.path.exists(binary):
        with open(log) as handle:
            last = [line.strip() for line in handle if line.strip()][-1:]
        raise RuntimeError(f"darknet build failed (exit {done.returncode}; {log}): "
                           f"{last[0] if last else ''}")
    return binary


def cuda_toolkit():
    """The CUDA toolkit's folder (CUDA_HOME, else /usr/local/cuda), or None."""
    for folder in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if folder and os.path.isdir(folder):
            return folder
    return None


def prepend(env, key, *folders):
    folders = [f for f in folders if f and os.path.isdir(f)]
    if folders:
        env[key] = ":".join(folders + ([env[key]] if env.get(key) else []))


def darknet_env():
    """The environment darknet runs in: cuDNN from the wheel, the toolkit's libraries."""
    env, dirs, toolkit = dict(os.environ), cudnn_wheel_dirs(), cuda_toolkit()
    prepend(env, "LD_LIBRARY_PATH", dirs[1] if dirs else None,
            os.path.join(toolkit, "lib64") if toolkit else None)
    return env


class MemoryPeak:
    """Polls nvidia-smi (total - free on one GPU) in a thread while a peer runs: the peak above
    the reading taken before it started, in MiB (None without nvidia-smi)."""

    def __init__(self, device, interval=0.2):
        self.device, self.interval = device, interval
        self.baseline = self.read()
        self.peak = self.baseline
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def read(self):
        try:
            out = subprocess.run(["nvidia-smi", "-i", str(self.device),
                                  "--query-gpu=memory.total,memory.free",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout
            total, free = (float(v) for v in out.strip().split(","))
            return total - free
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _poll(self):
        while not self.stopped.wait(self.interval):
            used = self.read()
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __enter__(self):
        if self.baseline is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()

    @property
    def mib(self):
        return None if self.baseline is None else self.peak - self.baseline


def run_logged(command, log, timeout, cwd, stdin_text=None, env=None):
    """Run a command (its own process group) writing stdout+stderr to `log`; returns (exit code
    or None on timeout, the log's text)."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   stdin=subprocess.PIPE if stdin_text is not None else
                                   subprocess.DEVNULL, text=True)
        try:
            if stdin_text is not None:
                process.stdin.write(stdin_text)
                process.stdin.close()
            code = process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    with open(log, errors="replace") as handle:
        return code, handle.read()


ERROR_LINE = re.compile(r"error|failed|out of memory|Traceback|Killed", re.IGNORECASE)


def last_line(text):
    """The line that says why a process failed: the last Python exception line after a
    traceback, else the first line that mentions an error, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
        if errors:
            return errors[-1][:300]
    errors = [line for line in lines if ERROR_LINE.search(line)
              and not line.startswith("Darknet error location")]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]


def darknet_figures(peer, setup, args, binary):
    """Darknet's cells for one network: batch-1 latency (peer 'darknet') and training
    images/s, each from its own darknet process."""
    figures, folder, env = {}, setup["folder"], darknet_env()
    timeout = args.darknet_timeout or args.timeout
    if peer == "darknet":
        runs = args.runs + args.warmup
        with MemoryPeak(args.device) as memory:
            code, text = run_logged(
                [binary, "detector", "test", setup["darknet_data"], setup["infer_cfg"],
                 setup["weights"], "-dont_show", "-thresh", "1.01", "-i", str(args.device)],
                os.path.join(folder, "darknet-test.log"), timeout, folder,
                stdin_text=(setup["jpg"] + "\n") * runs, env=env)
        try:
            figures["b1_ms"] = parse_predicted_ms(text, args.warmup)
            figures["b1_mib"] = memory.mib  # batch 1: kept out of the table's b64 memory row
        except ValueError as error:
            why = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}"
            figures["b1_ms"] = {"failed": f"{why}: {last_line(text) or error}"}
    cfg = setup["darknet_half_cfg" if peer == "darknet-half" else "darknet_train_cfg"]
    with MemoryPeak(args.device) as memory:
        code, text = run_logged([binary, "detector", "train", setup["darknet_data"], cfg,
                                 "-dont_show", "-i", str(args.device)],
                                os.path.join(folder, f"{peer}-train.log"), timeout, folder,
                                env=env)
    try:
        seconds, loaded, images = parse_train_iterations(text, args.train_warmup)
        figures["train_ips"] = images / seconds
        figures["train_loaded_s"] = loaded
        figures["train_mib"] = memory.mib
    except ValueError as error:
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}"
        figures["train_ips"] = {"failed": f"{why}: {last_line(text) or error}"}
    return figures


# ---- timing (inside a peer's process) ------------------------------------------------------------
def per_second(step, sync, seconds, warmup, minimum=3):
    """Calls of step() per second over about `seconds` (at least `minimum` calls) after
    `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    count, start = 0, time.perf_counter()
    while count < minimum or time.perf_counter() - start < seconds:
        step()
        count += 1
    sync()
    return count / (time.perf_counter() - start)


def median_ms(step, seconds, warmup, minimum=5):
    """Median milliseconds of step() (synchronous: it returns host outputs) over about
    `seconds`, at least `minimum` calls, after `warmup`."""
    for _ in range(warmup):
        step()
    times, start = [], time.perf_counter()
    while len(times) < minimum or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


class Results:
    """A peer's figures, written to its JSON file after each one so that a timeout or a crash
    keeps what was measured before it."""

    def __init__(self, path):
        self.path, self.figures = path, {}

    def __setitem__(self, key, value):
        self.figures[key] = value
        with open(self.path + ".tmp", "w") as handle:
            json.dump(self.figures, handle)
        os.replace(self.path + ".tmp", self.path)

    def measure(self, key, compute):
        try:
            self[key] = compute()
        except Exception as error:  # one figure failing must not lose the others
            self[key] = {"failed": failure(error)}


def save_outputs(results, compute):
    """The [yolo] outputs for the shared batch-1 input, beside the figures (PEER.json.npz), for
    the parent to compare with the engine's fp32 ones; a failure here costs only that row."""
    try:
        np.savez(results.path + ".npz", *[np.asarray(a, dtype=np.float32) for a in compute()])
    except Exception as error:  # the figures matter more than the comparison
        results["diff_fp32"] = {"failed": failure(error)}


def relative_difference(outputs, reference):
    """Largest |difference| over each [yolo] output's largest |value|, the largest over them."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} [yolo] outputs against {len(reference)}")
    return max(float(np.abs(a.reshape(b.shape) - b).max() / max(np.abs(b).max(), 1e-12))
               for a, b in zip(outputs, reference))


def load_outputs(result):
    if not os.path.exists(result + ".npz"):
        return None
    with np.load(result + ".npz") as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


# ---- the engine (a peer process) -----------------------------------------------------------------
class Unsupported(Exception):
    pass


def engine_backend(precision, device, backend="gpu", nchw=False, unfused=False):
    """The CUDA backend in `precision`: precision= where the backend takes it, else fp32 and
    tf32 through allow_tf32; Unsupported for a precision it cannot run. nchw: activations
    stored NCHW in every precision (channels_last=False). unfused: no convolution fused with
    its bias and activation by cuDNN's graph API (fused=False)."""
    if backend == "cpu":
        if precision != "fp32":
            raise Unsupported(f"the CPU backend computes in fp32 only, not {precision}")
        from engine.backends.numpy_backend import NumpyBackend
        return NumpyBackend(seed=0)
    from engine.backends.cuda import CudaBackend
    try:
        return CudaBackend(device, 0, precision=precision,
                           **({"channels_last": False} if nchw else {}),
                           **({"fused": False} if unfused else {}))
    except TypeError as error:
        if "precision" not in str(error):
            raise
    except Exception as error:
        # a refusal of this precision (not a missing GPU or library, which fails every one)
        if isinstance(error, (ValueError, NotImplementedError)) or precision in str(error):
            raise Unsupported(failure(error)) from None
        raise
    if precision not in ("fp32", "tf32"):
        raise Unsupported(f"this engine's CudaBackend takes no precision= (for {precision})")
    return CudaBackend(device, 0, allow_tf32=precision == "tf32")


def engine_memory_mib(ops):
    device = getattr(ops, "device", None)
    return device.memory_used() / 2**20 if hasattr(device, "memory_used") else None


def print_fusion_summary(ops):
    """Into the peer's log: which convolutions ran fused with their bias and activation
    (cudnn_graph.py), and why the others did not, where the backend fuses."""
    if getattr(ops, "fused", False) and getattr(ops, "channels_last", False):
        from engine.backends.cuda import cudnn_graph
        print(cudnn_graph.fusions(ops.dnn).summary(), flush=True)


def run_engine(precision, setup, args, results):
    import gc

    from engine import Network, loss_scaling
    from engine.train import SINGLE_PROCESS, iteration_runner
    try:
        ops = engine_backend(precision, args.device, args.backend, args.nchw, args.unfused)
    except Unsupported as error:
        for key, _, _ in measures(args.batches, args.train_batch):
            results[key] = {"unsupported": str(error)}
        return
    sync = ops.synchronize
    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)

    def inference():
        net = Network(setup["infer_cfg"], backend=ops, seed=0, quiet=True)
        net.load_weights(setup["weights"])
        return net.fold_batchnorm()
    try:
        net = inference()
    except Exception as error:
        net, why = None, {"failed": failure(error)}
    if net is None:
        for key in ["b1_ms"] + [f"b{b}_ips" for b in args.batches] + ["infer_mib"]:
            results[key] = why
    else:
        one = np.load(setup["input"])
        # every [yolo] head's output on the host, as the PyTorch peers deliver theirs
        heads = [layer.index for layer in net.layers if layer.type_name == "yolo"]
        results.measure("b1_ms", lambda: median_ms(lambda: net.predict(one, layers=heads),
                                                   args.seconds, args.warmup))
        save_outputs(results, lambda: net.predict(one, layers=heads))

        def throughput(images):
            return len(images) * per_second(
                lambda: net.predict(images, batch_size=len(images), layers=heads), sync,
                args.seconds, args.warmup)
        for batch in args.batches:
            images = rng.random((batch,) + shape, dtype=np.float32)
            results.measure(f"b{batch}_ips", lambda images=images: throughput(images))
        results.measure("infer_mib", lambda: engine_memory_mib(ops))
        print_fusion_summary(ops)
        net = None  # inference's memory back before training
        gc.collect()
    pool = getattr(getattr(ops, "device", None), "pool", None)
    if pool is not None:
        pool.free_held()  # the training figure counts training's memory only

    def training():
        net = Network(setup["train_cfg"], backend=ops, seed=0, quiet=True)
        net.load_weights(setup["weights"])
        net.check_memory(args.train_batch, train=True)  # the engine's own refusal, if any
        # in the arrays engine train's loader assembles batches in (page-locked on the GPU)
        images = ops.host_empty((args.train_batch,) + shape)
        images[...] = rng.random(images.shape, dtype=np.float32)
        truth = synthetic_truth(rng, args.train_batch, net.detected_classes, net.truth_boxes)
        net.loss_scaler = loss_scaling.scaler_for(net)  # as engine train sets it (fp16: dynamic)
        runner = iteration_runner(net, SINGLE_PROCESS)
        try:
            rate = args.train_batch * per_second(
                lambda: runner(images, truth, TRAIN_LEARNING_RATE), sync, args.seconds,
                args.train_warmup, minimum=2)
        finally:
            net.loss_scaler = None
        results["train_mib"] = engine_memory_mib(ops)
        return rate
    results.measure("train_ips", training)
    if "train_mib" not in results.figures:  # training failed: so did its memory figure
        results["train_mib"] = results.figures["train_ips"]


# ---- PyTorch (a peer process) --------------------------------------------------------------------
def run_torch(variant, setup, args, results):
    import torch
    from torch_peers import torch_from_network

    import engine
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    on_gpu = args.backend == "gpu"  # "cpu": the tests' smoke run, bf16 standing in for fp16
    device = torch.device("cuda", args.device) if on_gpu else torch.device("cpu")
    half = torch.float16 if on_gpu else torch.bfloat16
    if on_gpu:
        torch.cuda.set_device(device)
    amp = variant == "torch-amp"
    layout = torch.channels_last if amp else torch.contiguous_format
    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)

    def memory_mib():
        if not on_gpu:
            return None
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    folded = engine.load(setup["infer_cfg"], setup["weights"], quiet=True).fold_batchnorm()
    model = torch_from_network(folded, torch, keep_outputs=False).to(device, memory_format=layout)
    model.eval()

    def eager_call(host):
        with torch.inference_mode(), torch.autocast(device.type, half, enabled=amp):
            x = torch.from_numpy(host).to(device).contiguous(memory_format=layout)
            return [y.float().cpu() for y in model(x)]

    def graph_call(batch):
        """Copy into the captured input, replay, outputs to the host."""
        static = torch.zeros((batch,) + shape, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            outputs = model(static)

        def call(host):
            static.copy_(torch.from_numpy(host))
            graph.replay()
            return [y.cpu() for y in outputs]
        return call

    def caller(batch):
        return graph_call(batch) if variant == "torch-graph" else eager_call

    def latency(images):
        call = caller(len(images))
        figure = median_ms(lambda: call(images), args.seconds, args.warmup)
        save_outputs(results, lambda: [y.numpy() for y in call(images)])
        return figure

    def throughput(images):
        call = caller(len(images))
        return len(images) * per_second(lambda: call(images), sync, args.seconds, args.warmup)

    results.measure("b1_ms", lambda: latency(np.load(setup["input"])))
    for batch in args.batches:
        images = rng.random((batch,) + shape, dtype=np.float32)
        results.measure(f"b{batch}_ips", lambda images=images: throughput(images))
    results.measure("infer_mib", memory_mib)
    model = None  # inference's memory back before training
    if on_gpu:
        torch.cuda.empty_cache()
    if variant == "torch-graph":
        return  # training is measured eagerly (torch-eager, torch-amp)

    def training():
        from torch_peers import darknet_sgd
        net = engine.load(setup["train_cfg"], setup["weights"], quiet=True)
        model = torch_from_network(net, torch, keep_outputs=False).to(device,
                                                                       memory_format=layout)
        model.train()
        optimizer = darknet_sgd(model, torch, TRAIN_LEARNING_RATE)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and on_gpu)
        images = rng.random((args.train_batch,) + shape, dtype=np.float32)
        # page-locked, as DataLoader(pin_memory=True) gives it, copied without blocking
        host = torch.from_numpy(images).pin_memory() if on_gpu else torch.from_numpy(images)
        with torch.no_grad():
            sample = model(host.to(device).contiguous(memory_format=layout))
        targets = [torch.rand_like(y) for y in sample]
        del sample

        def step():
            x = host.to(device, non_blocking=True).contiguous(memory_format=layout)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, half, enabled=amp):
                outputs = model(x)
            loss = sum(((y.float() - t) ** 2).sum() for y, t in zip(outputs, targets))
            scaler.scale(loss / len(images)).backward()
            scaler.step(optimizer)
            scaler.update()
            return loss.item()  # read back every step, as the engine's loop does
        rate = args.train_batch * per_second(step, sync, args.seconds, args.train_warmup,
                                             minimum=2)
        results["train_mib"] = memory_mib()
        return rate
    results.measure("train_ips", training)
    if "train_mib" not in results.figures:
        results["train_mib"] = results.figures["train_ips"]


def child_main(args):
    with open(args.setup) as handle:
        setup = json.load(handle)
    results = Results(args.result)
    if args.child.startswith("engine-"):
        run_engine(args.child[len("engine-"):], setup, args, results)
    else:
        run_torch(args.child, setup, args, results)


# ---- the parent: set-up, one process per peer, the table -----------------------------------------
def find_cfg(spec, alexeyab_dir):
    if spec.startswith("alexeyab:"):
        name = spec.split(":", 1)[1]
        folders = [alexeyab_dir] if alexeyab_dir else ALEXEYAB_CFG_DIRS
        for folder in folders:
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise FileNotFoundError(f"{name} not found in {', '.join(folders)} "
                                "(--alexeyab-cfg-dir)")
    path = spec if os.path.isabs(spec) else os.path.join(ROOT, spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


def prepare(name, cfg, folder, args, darknet):
    """The cfg copies, the shared random weights and, for Darknet, the synthetic data set."""
    os.makedirs(folder, exist_ok=True)
    setup = {"folder": folder, "infer_cfg": os.path.join(folder, f"{name}-infer.cfg"),
             "train_cfg": os.path.join(folder, f"{name}-train.cfg"),
             "weights": os.path.join(folder, f"{name}.weights")}
    inference_cfg(cfg, setup["infer_cfg"], args.size)
    # the engine and PyTorch run a fixed number of steps; max_batches matters to Darknet only
    iterations = args.train_warmup + args.train_iterations
    training_cfg(cfg, setup["train_cfg"], args.train_batch, args.size, iterations)
    # Calibrated (benchmarks/calibrated_weights.py): plain random weights overflow fp16 in
    # YOLOv3's residual sums, which trained weights do not; a calibration in a subprocess on the
    # GPU (the CPU where there is none), so this process holds no GPU context.
    calibrate = [sys.executable, os.path.join(ROOT, "benchmarks", "calibrated_weights.py"),
                 setup["infer_cfg"], setup["weights"]]
    if subprocess.run(calibrate + (["--gpu"] if args.backend != "cpu" else []),
                      capture_output=True).returncode != 0:
        print(f"{name}: calibrating the random weights failed; plain random weights "
              "(fp16 may overflow)", file=sys.stderr)
        write_random_weights(setup["infer_cfg"], setup["weights"])
    setup["input"] = os.path.join(folder, "input-b1.npy")  # every peer's batch-1 image
    np.save(setup["input"], np.random.default_rng(0).random((1, 3, args.size, args.size),
                                                            dtype=np.float32))
    if darknet:
        setup["darknet_train_cfg"] = setup["train_cfg"]
        setup["darknet_half_cfg"] = os.path.join(folder, f"{name}-train-half.cfg")
        training_cfg(cfg, setup["darknet_half_cfg"], args.train_batch, args.size, iterations,
                     half=True)
        # one data set per class count, shared by the networks
        classes = detector_classes(cfg)
        data_folder = os.path.join(os.path.dirname(folder), f"darknet-data-{classes}")
        data = os.path.join(data_folder, "train.data")
        setup["darknet_data"] = data if os.path.exists(data) else write_darknet_dataset(
            data_folder, args.darknet_images, args.size, classes)
        with open(os.path.join(data_folder, "train.txt")) as handle:
            setup["jpg"] = handle.readline().strip()
    with open(os.path.join(folder, "setup.json"), "w") as handle:
        json.dump(setup, handle)
    return setup


CHILD_OPTIONS = ("size", "seconds", "warmup", "train_warmup", "train_batch", "device", "backend")
CHILD_FLAGS = ("nchw", "unfused")


def spawn(peer, setup, args):
    """One peer's figures from its own process, within args.timeout."""
    folder = setup["folder"]
    result = os.path.join(folder, f"{peer}.json")
    for stale in (result, result + ".npz"):
        if os.path.exists(stale):
            os.remove(stale)
    command = [sys.executable, os.path.abspath(__file__), "--child", peer,
               "--setup", os.path.join(folder, "setup.json"), "--result", result,
               "--batches"] + [str(b) for b in args.batches]
    for option in CHILD_OPTIONS:
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += [f"--{flag}" for flag in CHILD_FLAGS if getattr(args, flag)]
    code, text = run_logged(command, os.path.join(folder, f"{peer}.log"), args.timeout,
                            BENCHMARKS)
    figures = {}
    if os.path.exists(result):
        with open(result) as handle:
            figures = json.load(handle)
    if code != 0:
        why = f"timed out after {args.timeout:.0f} s" if code is None else \
            f"exit {code}: {last_line(text)}"
        for key, _, _ in measures(args.batches, args.train_batch):
            if key not in figures and key != "diff_fp32" and not (
                    peer == "torch-graph" and key.startswith("train")):
                figures[key] = {"failed": why}
    return figures


def compare_outputs(figures, peers, folder):
    """Each peer's [yolo] outputs for the batch-1 image against the engine's in fp32."""
    reference = load_outputs(os.path.join(folder, "engine-fp32.json"))
    if reference is None:
        return
    for peer in peers:
        outputs = load_outputs(os.path.join(folder, f"{peer}.json"))
        if peer == "engine-fp32" or outputs is None or "diff_fp32" in figures.get(peer, {}):
            continue
        try:
            figures[peer]["diff_fp32"] = relative_difference(outputs, reference)
        except ValueError as error:
            figures[peer]["diff_fp32"] = {"failed": failure(error)}


def gpu_description():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=list(NETWORKS),
                   help="names from " + ", ".join(NETWORKS) + ", or NAME=CFG for another cfg")
    p.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS,
                   help="engine precisions, each in its own process (none: no engine column)")
    p.add_argument("--peers", nargs="*", default=list(TORCH_PEERS) + list(DARKNET_PEERS),
                   choices=list(TORCH_PEERS) + list(DARKNET_PEERS),
                   help="peers besides the engine (default: all; none: the engine alone)")
    p.add_argument("--batches", type=int, nargs="*", default=[16, 64],
                   help="inference throughput batch sizes (latency is always batch 1)")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--seconds", type=float, default=1.0, help="timing per figure")
    p.add_argument("--warmup", type=int, default=5, help="inference calls before timing")
    p.add_argument("--runs", type=int, default=30, help="Darknet detector test images")
    p.add_argument("--train-warmup", type=int, default=2, help="training steps before timing")
    p.add_argument("--train-iterations", type=int, default=8,
                   help="Darknet training iterations timed (after --train-warmup)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per peer process")
    p.add_argument("--darknet-timeout", type=float,
                   help="seconds per darknet process (default: --timeout)")
    p.add_argument("--quick", action="store_true",
                   help="short timings: --seconds 0.3 --warmup 2 --runs 10 --train-warmup 2 "
                        "--train-iterations 3 --timeout 180")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--nchw", action="store_true",
                   help="the engine's activations stored NCHW in every precision (fp16 and bf16 "
                        "inference stores them channels last by default): the layout's A/B")
    p.add_argument("--unfused", action="store_true",
                   help="no convolution fused with its bias and activation by cuDNN's graph "
                        "API (fp16/bf16 inference, channels last, fuses them by default): the "
                        "fusion's A/B")
    p.add_argument("--alexeyab-cfg-dir")
    p.add_argument("--darknet-src", help="AlexeyAB/darknet sources to build")
    p.add_argument("--darknet-build", help="scratch folder for the build (reused when built)")
    p.add_argument("--darknet-bin", help="a built darknet binary to use instead")
    p.add_argument("--darknet-arch", default=DARKNET_ARCH)
    p.add_argument("--darknet-images", type=int, default=64,
                   help="random jpgs in Darknet's training set")
    p.add_argument("--build-only", action="store_true", help="build Darknet and stop")
    p.add_argument("--scratch", help="folder for cfgs, weights, data and logs (kept)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--table-from", nargs="+", metavar="JSON",
                   help="print the table of --json files and stop; several runs are merged, a "
                        "later file's figures replacing an earlier one's (a full run takes longer "
                        "than one GPU call allows: run networks or peers apart, then merge)")
    p.add_argument("--backend", default="gpu", choices=["gpu", "cpu"],
                   help=argparse.SUPPRESS)  # cpu: the tests' smoke run of the peers' code
    for name in ("--child", "--setup", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        # warm-ups of 2: the engine records a CUDA graph on a batch size's second call
        defaults = {"seconds": 0.3, "warmup": 2, "runs": 10, "train_warmup": 2,
                    "train_iterations": 3, "timeout": 180}
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])
                 if a.startswith("--")}
        for key, value in defaults.items():
            if key not in given:
                setattr(args, key, value)
    return args


def networks_of(args):
    chosen = {}
    for entry in args.networks:
        name, _, path = entry.partition("=")
        if not path and name not in NETWORKS:
            raise SystemExit(f"unknown network {name}; expected one of {', '.join(NETWORKS)} "
                             "or NAME=CFG")
        chosen[name] = path or NETWORKS[name]
    return chosen


def merged_runs(paths):
    """The saved runs of `paths` as one: figures per network and peer, a later run's replacing
    an earlier one's; peers in the order first seen; the first run's batches."""
    merged = None
    for path in paths:
        with open(path) as handle:
            saved = json.load(handle)
        if merged is None:
            merged = {"meta": saved["meta"], "peers": list(saved["peers"]), "results": {}}
        merged["peers"] += [p for p in saved["peers"] if p not in merged["peers"]]
        for network, peers in saved["results"].items():
            for peer, figures in peers.items():
                merged["results"].setdefault(network, {}).setdefault(peer, {}).update(figures)
    return merged


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    rows = measures(args.batches, args.train_batch)
    if args.table_from:
        saved = merged_runs(args.table_from)
        meta = saved["meta"]
        print(format_table(saved["results"], saved["peers"],
                           measures(meta["batches"], meta["train_batch"])))
        return
    peers = [engine_peer(p) for p in args.precisions] + list(args.peers)
    darknet_peers = [p for p in peers if p in DARKNET_PEERS]
    binary, darknet_error = None, None
    if darknet_peers or args.build_only:
        try:
            binary = args.darknet_bin or build_darknet(
                args.darknet_src, args.darknet_build or os.path.join(
                    tempfile.gettempdir(), "darknet-build"), args.darknet_arch)
            print(f"darknet: {binary}", flush=True)
        except Exception as error:
            darknet_error = failure(error)
            print(f"darknet: {darknet_error}", flush=True)
        if args.build_only:
            return 0 if binary else 1
    scratch = args.scratch or tempfile.mkdtemp(prefix="detection-benchmark-")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu_description(),
            "size": args.size, "batches": args.batches, "train_batch": args.train_batch,
            "seconds": args.seconds, "scratch": scratch, "darknet": binary or darknet_error}
    meta.update({flag: True for flag in CHILD_FLAGS if getattr(args, flag)})  # an A/B's side
    print(f"{meta['date']}; GPU {meta['gpu']}; {args.size}x{args.size}; logs in {scratch}",
          flush=True)
    results = {}

    def save():
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"meta": meta, "peers": peers, "results": results}, handle, indent=1)
    for name, spec in networks_of(args).items():
        results[name] = figures = {}
        try:
            setup = prepare(name, find_cfg(spec, args.alexeyab_cfg_dir),
                            os.path.join(scratch, name), args, bool(darknet_peers))
        except Exception as error:
            for peer in peers:
                figures[peer] = {key: {"failed": f"set-up: {failure(error)}"}
                                 for key, _, _ in rows}
            print(f"{name}: set-up failed: {failure(error)}", flush=True)
            save()
            continue
        for peer in peers:
            start = time.perf_counter()
            if peer in DARKNET_PEERS:
                figures[peer] = darknet_figures(peer, setup, args, binary) if binary else {
                    key: {"failed": darknet_error} for key in ("b1_ms", "train_ips")
                    if peer == "darknet" or key == "train_ips"}
            else:
                figures[peer] = spawn(peer, setup, args)
            shown = ", ".join(f"{k} {format_cell(v, k)}" for k, v in figures[peer].items()
                              if k in {r[0] for r in rows})
            print(f"{name} {peer} ({time.perf_counter() - start:.0f} s): {shown}", flush=True)
            save()
        compare_outputs(figures, peers, setup["folder"])
        save()
    print()
    print(format_table(results, peers, rows))
    print("\n> 1 in the ratio columns: the engine is ahead (throughput: engine best / PyTorch "
          "best; b1 latency: PyTorch CUDA graph / engine best; training: engine best / PyTorch "
          "AMP and / Darknet best; memory: peer lowest / engine lowest).")
    save()


if __name__ == "__main__":
    sys.exit(main())
