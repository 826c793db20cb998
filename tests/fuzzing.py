"""A fuzzer for everything the engine reads: mutated cfgs, weights files, IDX and list files and
images. Every case must either work or fail with the engine's own error (EngineError); anything
else is a crash, a case over its time limit is a hang, and running out of memory (MemoryError
under an address-space limit) is a blow-up.

The suite runs a few hundred cases (tests/test_fuzz.py); the long run is this script:

    python tests/fuzzing.py --cfgs 10000 --weights 3000 --data 1000 --workers 2

Cases are reproducible from (kind, number). Each worker process runs under an address-space
limit and ENGINE_MEMORY_LIMIT, and each case under a time limit.
"""

import argparse
import collections
import gzip
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ENGINE_LIMIT = "1G"                 # what the engine lets itself use in a case
ADDRESS_SPACE_LIMIT = 8 << 30       # beyond it numpy raises MemoryError: a blow-up
CASE_SECONDS = 20

# ---- seeds ----------------------------------------------------------------------------------------
CLASSIFIER = """[net]
batch=2
subdivisions=1
height=12
width=12
channels=1
learning_rate=0.1
momentum=0.9
decay=0.0005
policy=poly
power=2
max_batches=10

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=6
size=3
stride=1
pad=1
activation=relu

[avgpool]

[connected]
output=8
batch_normalize=1
activation=leaky

[dropout]
probability=.5

[connected]
output=3
activation=linear

[softmax]
groups=1
"""

DETECTOR = """[net]
batch=2
subdivisions=1
width=32
height=32
channels=3
learning_rate=0.001
momentum=0.9
decay=0.0005
burn_in=2
max_batches=10
policy=steps
steps=4,8
scales=.1,.1

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=1

[convolutional]
filters=8
size=1
stride=1
pad=1
activation=leaky

[shortcut]
from=-3
activation=linear

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask = 3,4,5
anchors = 3,4, 5,6, 8,9, 10,12, 14,16, 20,20
classes=2
num=6
jitter=.3
ignore_thresh = .7
truth_thresh = 1
random=0
max=10

[route]
layers = -4

[convolutional]
batch_normalize=1
filters=4
size=1
stride=1
pad=1
activation=leaky

[upsample]
stride=2

[route]
layers = -1, 2

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask = 0,1,2
anchors = 3,4, 5,6, 8,9, 10,12, 14,16, 20,20
classes=2
num=6
max=10
"""

REGION = """[net]
batch=1
subdivisions=1
width=16
height=16
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[reorg]
stride=2

[route]
layers=-1

[batchnorm]

[activation]
activation=tanh

[convolutional]
size=1
stride=1
pad=1
filters=35
activation=linear

[region]
anchors = 1.08,1.19,  3.42,4.41,  6.63,11.38,  9.42,5.11,  16.62,10.52
bias_match=1
classes=2
coords=4
num=5
softmax=1
"""

CROP = """[net]
batch=2
height=14
width=14
channels=3

[crop]
crop_height=10
crop_width=10
flip=1

[convolutional]
filters=4
size=3
stride=2
pad=1
groups=1
activation=logistic

[upsample]
stride=-1

[connected]
output=2
activation=linear

[cost]
type=sse
"""

SEEDS = {"classifier": CLASSIFIER, "detector": DETECTOR, "region": REGION, "crop": CROP}

EXTREME_VALUES = [
    "0", "-1", "-28", "1", "2", "3", "7", "64", "1e400", "-1e400", "inf", "-inf", "nan", "2.5",
    "1" * 400, str(2 ** 62), str(2 ** 31), str(10 ** 9), str(10 ** 30), "1e308", "", "abc",
    "40#32", "3,", ",", "1,2,3", "0x10", "-0", "1e-45", "1e5", "100000", "65536", "3000", "999",
    "leaky", "mish", "é", "\x00", "1,,2", "-3,-5", "0,0,0,0",
]
SECTIONS = ["net", "convolutional", "conv", "connected", "maxpool", "avgpool", "dropout",
            "softmax", "cost", "batchnorm", "activation", "route", "upsample", "shortcut", "yolo",
            "region", "reorg", "crop", "unknown", "rnn", "local", "", "net]"]
KEYS = ["filters", "size", "stride", "pad", "padding", "groups", "batch_normalize", "activation",
        "output", "probability", "layers", "from", "mask", "anchors", "classes", "num", "max",
        "height", "width", "channels", "batch", "subdivisions", "inputs", "temperature", "alpha",
        "beta", "scale", "extra", "reverse", "crop_height", "crop_width", "group_id", "coords",
        "steps", "scales", "policy", "max_batches", "burn_in", "power", "step", "gamma", "tree",
        "xnor", "per_activation", "type", "softmax", "flatten", "noadjust", "ignore_thresh"]


# ---- cfg cases ------------------------------------------------------------------------------------
def mutate_cfg(text, rng):
    """1 to 3 mutations of a cfg's text: values, lines, sections, bytes."""
    lines = text.split("\n")
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["value", "value", "value", "key", "delete", "duplicate", "swap",
                           "section", "truncate", "bytes", "block"])
        i = int(rng.integers(len(lines))) if lines else 0
        if kind == "value":
            options = [k for k, line in enumerate(lines) if "=" in line]
            if options:
                k = options[int(rng.integers(len(options)))]
                key = lines[k].split("=", 1)[0]
                lines[k] = f"{key}={rng.choice(EXTREME_VALUES)}"
        elif kind == "key":
            lines.insert(i, f"{rng.choice(KEYS)}={rng.choice(EXTREME_VALUES)}")
        elif kind == "delete" and lines:
            del lines[i]
        elif kind == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif kind == "swap" and lines:
            j = int(rng.integers(len(lines)))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "section":
            headers = [k for k, line in enumerate(lines) if line.startswith("[")]
            if headers:
                lines[headers[int(rng.integers(len(headers)))]] = f"[{rng.choice(SECTIONS)}]"
        elif kind == "truncate":
            joined = "\n".join(lines)
            lines = joined[:int(rng.integers(len(joined) + 1))].split("\n")
        elif kind == "bytes":
            junk = bytes(rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8))
            lines.insert(i, junk.decode("latin-1"))
        elif kind == "block":
            other = SEEDS[rng.choice(list(SEEDS))].split("\n\n")
            lines[i:i] = other[int(rng.integers(1, len(other)))].split("\n") + [""]
    return "\n".join(lines)


def exercise_network(path, rng):
    """Build, describe, predict, one training step, save and load: what a user would do."""
    from engine import models
    from engine.network import Network

    net = Network(path, quiet=True)
    models.layer_table(net)
    c, h, w = net.input_shape
    net.predict(rng.uniform(0, 1, (1, c, h, w)))
    if any(getattr(layer, "has_cost", False) for layer in net.layers):
        net.check_memory(net.options.mini_batch, train=True)  # as engine train does
        images = rng.uniform(0, 1, (net.options.mini_batch, c, h, w)).astype(np.float32)
        truth = training_truth(net, len(images), rng)  # checked against the net as train() does
        with np.errstate(all="ignore"):
            net.train_step(net.ops.asarray(images), net.ops.asarray(truth))
            net.update(0.001)
    weights = path + ".weights"
    try:
        net.save_weights(weights)
    except Exception as error:  # a diverged step (NumericalError) is a fine outcome here
        from engine.errors import NumericalError

        if not isinstance(error, NumericalError):
            raise
        return
    Network(path, quiet=True).load_weights(weights)


def training_truth(net, batch, rng):
    """Truth rows for whichever loss the network has (one-hot rows, or detector boxes)."""
    from engine.data import Dataset
    from engine.detection_data import DetectionDataset

    layer = net.cost_layers[-1]
    if hasattr(layer, "max_boxes"):
        detection_set = DetectionDataset.__new__(DetectionDataset)
        detection_set.name, detection_set.classes = "fuzz", layer.classes
        detection_set.check_network(net)
        truth = np.zeros((batch, layer.max_boxes * 5), np.float32)
        truth[:, :5] = [0.5, 0.5, 0.2, 0.3, 0]
        return truth
    classes = net.output_layer.outputs
    Dataset(None, np.zeros(0, int), classes, "fuzz").check_network(net)
    truth = np.zeros((batch, classes), np.float32)
    truth[:, 0] = 1
    return truth


def cfg_case(number, folder):
    rng = np.random.default_rng([1, number])
    seed = list(SEEDS)[number % len(SEEDS)]
    path = os.path.join(folder, f"cfg{number}.cfg")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write(mutate_cfg(SEEDS[seed], rng))
    return lambda: exercise_network(path, rng)


# ---- weights cases --------------------------------------------------------------------------------
def mutate_weights(data, rng):
    kind = rng.choice(["truncate", "append", "header", "seen", "nan", "garbage", "empty",
                       "old-header", "flip"])
    data = bytearray(data)
    if kind == "truncate":
        data = data[:int(rng.integers(len(data)))]
    elif kind == "append":
        data += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    elif kind == "header":
        field = int(rng.integers(3))
        value = int(rng.choice([-1, 0, 1, 2, 5, 999, 1000, 1001, 99999, 100000, 2 ** 31 - 1]))
        struct.pack_into("<i", data, 4 * field, value)
    elif kind == "seen":
        seen = [2 ** 64 - 1, 2 ** 63, 2 ** 48 + 1, 0, 7]
        struct.pack_into("<Q", data, 12, seen[int(rng.integers(len(seen)))])
    elif kind == "nan":
        count = (len(data) - 20) // 4
        for _ in range(int(rng.integers(1, 4))):
            struct.pack_into("<f", data, 20 + 4 * int(rng.integers(count)),
                             float(rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38])))
    elif kind == "garbage":
        data = bytearray(rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8))
    elif kind == "empty":
        data = bytearray()
    elif kind == "old-header":
        struct.pack_into("<3i", data, 0, 0, 1, 0)  # version 0.1: 32-bit seen, 4 bytes shorter
    elif kind == "flip":
        for _ in range(int(rng.integers(1, 16))):
            position = int(rng.integers(len(data)))
            data[position] ^= 1 << int(rng.integers(8))
    return bytes(data)


def weights_case(number, folder):
    from engine.network import Network

    rng = np.random.default_rng([2, number])
    seed = list(SEEDS)[number % len(SEEDS)]
    cfg = os.path.join(folder, f"{seed}.cfg")
    valid = cfg + ".weights"
    if not os.path.exists(valid):
        with open(cfg, "w") as handle:
            handle.write(SEEDS[seed])
        Network(cfg, quiet=True, seed=3).save_weights(valid)
    with open(valid, "rb") as handle:
        data = mutate_weights(handle.read(), rng)
    path = os.path.join(folder, f"w{number}.weights")
    with open(path, "wb") as handle:
        handle.write(data)

    def run():
        net = Network(cfg, quiet=True)
        net.load_weights(path)
        c, h, w = net.input_shape
        with np.errstate(all="ignore"):
            net.predict(rng.uniform(0, 1, (1, c, h, w)))
    return run


# ---- data cases (IDX, image lists, images) -------------------------------------------------------
def idx_bytes(array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def mutate_bytes(data, rng):
    data = bytearray(data)
    kind = rng.choice(["truncate", "flip", "append", "dims", "type", "shape"])
    if kind == "truncate":
        data = data[:int(rng.integers(len(data) + 1))]
    elif kind == "flip" and data:
        for _ in range(int(rng.integers(1, 8))):
            position = int(rng.integers(len(data)))
            data[position] ^= 1 << int(rng.integers(8))
    elif kind == "append":
        data += bytes(int(rng.integers(1, 9)))
    elif kind == "dims" and len(data) > 3:
        data[3] = int(rng.choice([0, 1, 2, 4, 255]))
    elif kind == "type" and len(data) > 2:
        data[2] = int(rng.choice([0, 8, 9, 11, 12, 13, 14, 255]))
    elif kind == "shape" and len(data) >= 8:
        struct.pack_into(">I", data, 4, int(rng.choice([0, 1, 2 ** 31, 2 ** 32 - 1, 60000])))
    return bytes(data)


def write_png(path, width, height, rng):
    from PIL import Image

    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def data_case(number, folder):
    """A small classification set (IDX or an image list) with one of its files damaged, then
    loaded as `engine train`/`test` load it."""
    from engine.data import DataConfig

    rng = np.random.default_rng([3, number])
    case = os.path.join(folder, f"d{number}")
    os.makedirs(case, exist_ok=True)
    labels = ["zero", "one", "two"]
    with open(os.path.join(case, "labels.txt"), "w") as handle:
        handle.write("\n".join(labels) + "\n")
    flavour = ("idx", "gz", "list")[number % 3]
    if flavour in ("idx", "gz"):
        images = rng.integers(0, 256, (4, 12, 12), dtype=np.uint8)
        files = {"images.idx": idx_bytes(images),
                 "labels.idx": idx_bytes(rng.integers(0, 3, 4, dtype=np.uint8))}
        target = str(rng.choice(list(files)))
        files[target] = mutate_bytes(files[target], rng)
        for name, data in files.items():
            if flavour == "gz":
                data = gzip.compress(data)
                if rng.random() < 0.3:
                    data = mutate_bytes(data, rng)
                name += ".gz"
            with open(os.path.join(case, name), "wb") as handle:
                handle.write(data)
        suffix = ".gz" if flavour == "gz" else ""
        entries = (f"train=images.idx{suffix}\ntrain_labels=labels.idx{suffix}\n")
        shape = (1, 12, 12)
    else:
        paths = []
        for k in range(3):
            image = os.path.join(case, f"img_{labels[k]}.png")
            write_png(image, 8, 8, rng)
            paths.append(image)
        damaged = paths[int(rng.integers(3))]
        with open(damaged, "rb") as handle:
            data = handle.read()
        with open(damaged, "wb") as handle:
            handle.write(mutate_bytes(data, rng) if rng.random() < 0.7 else data[:30])
        listing = "\n".join(paths).encode()
        if rng.random() < 0.2:
            listing = mutate_bytes(listing, rng)
        with open(os.path.join(case, "train.list"), "wb") as handle:
            handle.write(listing)
        entries = "train=train.list\n"
        shape = (3, 8, 8)
    data_file = os.path.join(case, "set.data")
    with open(data_file, "w") as handle:
        handle.write(f"classes=3\nlabels={os.path.join(case, 'labels.txt')}\n" +
                     entries.replace("=", "=" + case + os.sep))
    return lambda: DataConfig(data_file).dataset("train", shape)


CASES = {"cfg": cfg_case, "weights": weights_case, "data": data_case}


# ---- running ----------------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised by the alarm: BaseException, so no except-Exception in the engine swallows it."""


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(kind, number, folder):
    """(status, detail): status is ok, error (EngineError), crash, hang or memory."""
    from engine.errors import EngineError

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        CASES[kind](number, folder)()
        return "ok", ""
    except EngineError as error:
        message = str(error)
        if "\n" in message:
            return "crash", f"multi-line error: {message[:300]}"
        return "error", message[:200]
    except CaseTimeout:
        return "hang", f"over {CASE_SECONDS} s"
    except MemoryError:
        return "memory", traceback.format_exc(limit=-3)[-600:]
    except Exception as error:
        return "crash", f"{type(error).__name__}: {error}"[:300] + " | " + \
            traceback.format_exc(limit=-2)[-600:]
    finally:
        signal.alarm(0)


def limit_memory():
    os.environ["ENGINE_MEMORY_LIMIT"] = ENGINE_LIMIT
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, hard))


def run_cases(kind, numbers):
    """Run cases in this process (under the memory limits); yield (number, status, detail)."""
    limit_memory()
    with tempfile.TemporaryDirectory() as folder:
        for number in numbers:
            status, detail = run_case(kind, number, folder)
            yield number, status, detail


def worker_main(kind, start, count):
    for number, status, detail in run_cases(kind, range(start, start + count)):
        print(json.dumps({"kind": kind, "number": number, "status": status, "detail": detail}),
              flush=True)


def run_in_processes(kind, total, workers, chunk=250):
    """The long run: chunks of cases in worker processes, `workers` at a time. A worker that dies
    (a segfault, the kernel's OOM killer) counts its unfinished cases as crashes."""
    pending = [(start, min(chunk, total - start)) for start in range(0, total, chunk)]
    results, running = [], []
    while pending or running:
        while pending and len(running) < workers:
            start, count = pending.pop(0)
            command = [sys.executable, os.path.abspath(__file__), "--worker", kind, str(start),
                       str(count)]
            running.append((start, count, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                           stderr=subprocess.DEVNULL, text=True)))
        start, count, process = running.pop(0)
        output, _ = process.communicate()
        done = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        results += done
        for number in range(start + len(done), start + count):
            results.append({"kind": kind, "number": number, "status": "crash",
                            "detail": f"worker died (exit {process.returncode})"})
    return results


def summary(results):
    counts = collections.Counter(r["status"] for r in results)
    return {"tried": len(results), "ran": counts["ok"], "clean errors": counts["error"],
            "crashes": counts["crash"], "hangs": counts["hang"], "memory blow-ups": counts["memory"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfgs", type=int, default=10000)
    parser.add_argument("--weights", type=int, default=3000)
    parser.add_argument("--data", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, start, count = args.worker
        return worker_main(kind, int(start), int(count))
    started = time.time()
    print("| kind | tried | ran | clean errors | crashes | hangs | memory blow-ups |")
    print("|---|---|---|---|---|---|---|")
    failures = []
    for kind, total in (("cfg", args.cfgs), ("weights", args.weights), ("data", args.data)):
        if not total:
            continue
        results = run_in_processes(kind, total, args.workers)
        s = summary(results)
        print(f"| {kind} | " + " | ".join(str(v) for v in s.values()) + " |", flush=True)
        failures += [r for r in results if r["status"] in ("crash", "hang", "memory")]
    for r in failures[:40]:
        print(f"{r['kind']} case {r['number']}: {r['status']}: {r['detail']}")
    print(f"{time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
