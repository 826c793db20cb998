"""Bad input through the command line, as a user meets it: every case ends with exit code 0, or
1 with one line on stderr that names the file (and line, layer or key), or argparse's usage
error (exit 2); never a traceback, a hang or an unbounded allocation. Cases are the product of
each command with the kinds of damaged files it reads (cfgs, weights, .data, label and list
files, IDX, images) and bad arguments; `test_cli_corpus_size` keeps the corpus at 150 or more.

Also here: cfg numbers checked where they are read (each error names its line), the memory
estimate, and non-finite values (weights, outputs) that must never print as results."""

import gzip
import os
import signal
import struct

import numpy as np
import pytest
from PIL import Image

from engine import cli
from engine import data as data_io
from engine.errors import ConfigError, NumericalError, WeightsError
from engine.network import Network

from conftest import CFG, GOLDEN, ROOT
from helpers import write_cfg

MNIST = os.path.join(ROOT, "data", "mnist")
TINY_YOLO = os.path.join(GOLDEN, "G2c_tiny_yolov3_div8")


def _idx(array, type_code=8):
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Good files to start from and damaged ones of every kind, in one folder."""
    d = tmp_path_factory.mktemp("zoo")
    files = {}

    def put(name, data):
        path = d / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        files[name] = str(path)
        return str(path)

    images = data_io.read_idx(os.path.join(MNIST, "t10k-images.idx3-ubyte.gz"))[:32]
    labels = data_io.read_idx(os.path.join(MNIST, "t10k-labels.idx1-ubyte.gz"))[:32]
    put("images.idx", _idx(images))
    put("labels.idx", _idx(labels))
    with open(os.path.join(CFG, "mnist.cfg")) as handle:
        mnist = handle.read().replace("batch=128", "batch=8").replace("max_batches=2000",
                                                                       "max_batches=2")
    cfg = put("good.cfg", mnist)
    labels_file = os.path.join(CFG, "mnist.labels")
    good_data = f"classes=10\ntrain={d}/images.idx\ntrain_labels={d}/labels.idx\n" \
                f"valid={d}/images.idx\nvalid_labels={d}/labels.idx\nlabels={labels_file}\n" \
                f"backup={d}/backup\n"
    put("good.data", good_data)
    net = Network(cfg, quiet=True)
    net.save_weights(str(d / "good.weights"))
    files["good.weights"] = str(d / "good.weights")
    weights = (d / "good.weights").read_bytes()
    Image.fromarray(images[0]).save(d / "digit.png")
    files["digit.png"] = str(d / "digit.png")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(d / "scene.png")
    files["scene.png"] = str(d / "scene.png")
    files["yolo.cfg"] = os.path.join(TINY_YOLO, "g2c_tiny_yolov3_div8.cfg")
    files["yolo.weights"] = os.path.join(TINY_YOLO, "weights")

    # ---- damaged cfgs
    bad_cfgs = {
        "empty.cfg": "",
        "binary.cfg": b"\x00\x01\x02\xff\xfe",
        "latin1.cfg": "[net]\nbatch=1\nheight=28\nwidth=28\nchannels=1\n[connected]\noutput=10\n"
                      "activation=\xe9\n".encode("latin-1"),
        "nonet.cfg": "[convolutional]\nfilters=2\n",
        "unknown.cfg": mnist + "\n[frobnicate]\n",
        "size_inf.cfg": mnist.replace("size=3", "size=inf", 1),
        "size_1e400.cfg": mnist.replace("size=3", "size=1e400", 1),
        "size_400digits.cfg": mnist.replace("size=3", "size=" + "9" * 400, 1),
        "filters_huge.cfg": mnist.replace("filters=32", "filters=1000000000", 1),
        "filters_1e30.cfg": mnist.replace("filters=32", "filters=" + "1" + "0" * 30, 1),
        "height_2e62.cfg": mnist.replace("height=28", f"height={2 ** 62}"),
        "height_negative.cfg": mnist.replace("height=28", "height=-28"),
        "width_huge.cfg": mnist.replace("width=28", "width=2000000000"),
        "maxpool_2000.cfg": mnist.replace("size=2\nstride=2", "size=2000\nstride=1", 1),
        "dropout_1.cfg": mnist.replace("probability=.5", "probability=1"),
        "long_line.cfg": mnist.replace("activation=linear", "activation=" + "x" * 1_000_000),
        "batch_zero.cfg": mnist.replace("batch=8", "batch=0"),
        "subdiv_bad.cfg": mnist.replace("subdivisions=1", "subdivisions=3"),
        "lr_nan.cfg": mnist.replace("learning_rate=0.1", "learning_rate=nan"),
        "policy_bad.cfg": mnist.replace("policy=poly", "policy=sgdr"),
        "no_layers.cfg": "[net]\nbatch=1\nheight=28\nwidth=28\nchannels=1\n",
        "yolo_num_huge.cfg": "[net]\nbatch=1\nheight=8\nwidth=8\nchannels=3\n[convolutional]\n"
                             "filters=21\nsize=1\nactivation=linear\n[yolo]\nmask=0,1,2\nnum=1e308\n"
                             "classes=2\n",
        "yolo_max_negative.cfg": "[net]\nbatch=1\nheight=8\nwidth=8\nchannels=3\n[convolutional]\n"
                                 "filters=21\nsize=1\nactivation=linear\n[yolo]\nmask=0,1,2\n"
                                 "num=3\nclasses=2\nmax=-1\n",
        "route_forward.cfg": mnist.replace("[dropout]", "[route]\nlayers=9\n\n[dropout]"),
    }
    for name, text in bad_cfgs.items():
        put(name, text)
    os.mkdir(d / "folder.cfg")
    files["folder.cfg"] = str(d / "folder.cfg")
    files["missing.cfg"] = str(d / "missing.cfg")
    os.mkfifo(d / "fifo.cfg")
    files["fifo.cfg"] = str(d / "fifo.cfg")

    # ---- damaged weights
    nan_weights = bytearray(weights)
    struct.pack_into("<f", nan_weights, 40, float("nan"))
    inf_weights = bytearray(weights)
    struct.pack_into("<f", inf_weights, len(weights) - 4, float("inf"))
    huge_seen = bytearray(weights)
    struct.pack_into("<Q", huge_seen, 12, 2 ** 64 - 1)
    old_negative_seen = struct.pack("<3ii", 0, 1, 0, -5) + weights[20:]
    bad_weights = {
        "empty.weights": b"",
        "cut18.weights": weights[:18],
        "header_only.weights": weights[:20],
        "cut_inside.weights": weights[:20 + 4 * 100],
        "cut_end.weights": weights[:-4],
        "too_long.weights": weights + b"\0" * 40,
        "odd_bytes.weights": weights + b"\0",
        "garbage.weights": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        "nan.weights": bytes(nan_weights),
        "inf.weights": bytes(inf_weights),
        "huge_seen.weights": bytes(huge_seen),
        "negative_seen.weights": old_negative_seen,
        "other_network.weights": open(files["yolo.weights"], "rb").read(),
    }
    for name, data in bad_weights.items():
        put(name, data)
    os.mkdir(d / "folder.weights")
    files["folder.weights"] = str(d / "folder.weights")
    os.mkfifo(d / "fifo.weights")
    files["fifo.weights"] = str(d / "fifo.weights")
    files["devzero.weights"] = "/dev/zero"
    files["missing.weights"] = str(d / "missing.weights")

    # ---- damaged data: .data files, labels, IDX, lists
    def data_file(name, text):
        return put(name, text)

    put("latin1_labels.txt", "z\xe9ro\n".encode("latin-1") + b"one\n" * 9)
    put("short_labels.txt", "a\nb\n")
    os.mkdir(d / "labels_folder")
    put("cut_header.idx", _idx(images)[:6])
    dims255 = bytearray(_idx(images))
    dims255[3] = 255
    put("dims255.idx", bytes(dims255))
    dims0 = bytearray(_idx(images))
    dims0[3] = 0
    put("dims0.idx", bytes(dims0[:4]))
    put("two_d.idx", _idx(images[0]))
    put("short_data.idx", _idx(images)[:-10])
    put("corrupt.idx.gz", gzip.compress(_idx(images))[:40] + b"\xff" * 40 + b"\0" * 8)
    put("bad_magic.idx", b"\x01\x02\x03\x04" + b"\0" * 64)
    put("big_claim.idx", bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 10000, 10000))
    put("wrong_labels.idx", _idx(np.full(32, 77)))
    put("latin1.list", "caf\xe9.png\n".encode("latin-1"))
    put("missing_image.list", f"{d}/nothing/zero_7.png\n")
    png_header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + \
        struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0) + b"\0" * 4
    put("bomb_zero.png", png_header + b"\0" * 64)
    put("truncated_one.png", (d / "digit.png").read_bytes()[:60])
    put("bomb.list", f"{d}/bomb_zero.png\n")
    put("truncated.list", f"{d}/truncated_one.png\n")
    data_variants = {
        "latin1.data": good_data.encode("utf-8") + b"\n# \xff\n",
        "classes_abc.data": good_data.replace("classes=10", "classes=abc"),
        "classes_zero.data": good_data.replace("classes=10", "classes=0"),
        "classes_huge.data": good_data.replace("classes=10", "classes=" + "1" + "0" * 30),
        "labels_folder.data": good_data.replace(labels_file, f"{d}/labels_folder"),
        "labels_latin1.data": good_data.replace(labels_file, f"{d}/latin1_labels.txt"),
        "labels_short.data": good_data.replace(labels_file, f"{d}/short_labels.txt"),
        "no_train.data": "classes=10\n",
        "train_missing.data": good_data.replace(f"train={d}/images.idx", "train=/nonexistent.idx"),
        "list_latin1.data": f"classes=10\nlabels={labels_file}\ntrain={d}/latin1.list\n"
                            f"valid={d}/latin1.list\n",
        "list_missing_image.data": f"classes=10\nlabels={labels_file}\n"
                                   f"train={d}/missing_image.list\nvalid={d}/missing_image.list\n",
        "list_bomb.data": f"classes=10\nlabels={labels_file}\ntrain={d}/bomb.list\n"
                          f"valid={d}/bomb.list\n",
        "list_truncated.data": f"classes=10\nlabels={labels_file}\ntrain={d}/truncated.list\n"
                               f"valid={d}/truncated.list\n",
    }
    for idx_name in ("cut_header.idx", "dims255.idx", "dims0.idx", "two_d.idx", "short_data.idx",
                     "corrupt.idx.gz", "bad_magic.idx", "big_claim.idx"):
        data_variants[f"idx_{idx_name}.data"] = good_data.replace(f"{d}/images.idx", f"{d}/{idx_name}")
    data_variants["idx_wrong_labels.data"] = good_data.replace(f"{d}/labels.idx",
                                                               f"{d}/wrong_labels.idx")
    for name, text in data_variants.items():
        data_file(name, text)
    files["missing.data"] = str(d / "missing.data")
    files["dir"] = str(d)
    return files


# ---- the corpus -------------------------------------------------------------------------------------
CFG_CASES = ["empty.cfg", "binary.cfg", "latin1.cfg", "nonet.cfg", "unknown.cfg", "size_inf.cfg",
             "size_1e400.cfg", "size_400digits.cfg", "filters_huge.cfg", "filters_1e30.cfg",
             "height_2e62.cfg", "height_negative.cfg", "width_huge.cfg", "maxpool_2000.cfg",
             "dropout_1.cfg", "long_line.cfg", "batch_zero.cfg", "subdiv_bad.cfg", "lr_nan.cfg",
             "policy_bad.cfg", "no_layers.cfg", "route_forward.cfg", "folder.cfg", "missing.cfg",
             "fifo.cfg"]
WEIGHTS_CASES = ["empty.weights", "cut18.weights", "header_only.weights", "cut_inside.weights",
                 "cut_end.weights", "too_long.weights", "odd_bytes.weights", "garbage.weights",
                 "nan.weights", "inf.weights", "huge_seen.weights", "negative_seen.weights",
                 "other_network.weights", "folder.weights", "fifo.weights", "devzero.weights",
                 "missing.weights"]
DATA_CASES = ["latin1.data", "classes_abc.data", "classes_zero.data", "classes_huge.data",
              "labels_folder.data", "labels_latin1.data", "labels_short.data", "no_train.data",
              "train_missing.data", "list_latin1.data", "list_missing_image.data",
              "list_bomb.data", "list_truncated.data", "idx_cut_header.idx.data",
              "idx_dims255.idx.data", "idx_dims0.idx.data", "idx_two_d.idx.data",
              "idx_short_data.idx.data", "idx_corrupt.idx.gz.data", "idx_bad_magic.idx.data",
              "idx_big_claim.idx.data", "idx_wrong_labels.data", "missing.data"]
IMAGE_CASES = ["bomb_zero.png", "truncated_one.png", "latin1.list", "dir", "missing.png"]


def _cases():
    cases = []
    for name in CFG_CASES:
        cases += [(f"info {name}", ["info", name]),
                  (f"train {name}", ["train", name, "--data", "good.data", "--cpu", "--backup", "B"]),
                  (f"test {name}", ["test", name, "good.weights", "--data", "good.data", "--cpu"]),
                  (f"predict {name}", ["predict", name, "good.weights", "digit.png", "--cpu"]),
                  (f"detect {name}", ["detect", name, "good.weights", "scene.png", "--cpu", "--out",
                                      "OUT.png"])]
    for name in WEIGHTS_CASES:
        cases += [(f"test {name}", ["test", "good.cfg", name, "--data", "good.data", "--cpu"]),
                  (f"predict {name}", ["predict", "good.cfg", name, "digit.png", "--cpu"]),
                  (f"train --weights {name}", ["train", "good.cfg", "--weights", name, "--data",
                                               "good.data", "--cpu", "--backup", "B"]),
                  (f"partial {name}", ["partial", "good.cfg", name, "OUT.weights", "2"]),
                  (f"fuse {name}", ["fuse", "good.cfg", name, "OUT.cfg", "OUT.weights"])]
    for name in DATA_CASES:
        cases += [(f"train --data {name}", ["train", "good.cfg", "--data", name, "--cpu", "--backup",
                                            "B"]),
                  (f"test --data {name}", ["test", "good.cfg", "good.weights", "--data", name,
                                           "--cpu"])]
    for name in IMAGE_CASES:
        cases += [(f"predict {name}", ["predict", "good.cfg", "good.weights", name, "--cpu"]),
                  (f"detect {name}", ["detect", "yolo.cfg", "yolo.weights", name, "--cpu", "--out",
                                      "OUT.png"])]
    cases += [
        ("detect into a missing folder", ["detect", "yolo.cfg", "yolo.weights", "scene.png", "--cpu",
                                          "--out", "/nonexistent/folder/x.png"]),
        ("detect with an unknown extension", ["detect", "yolo.cfg", "yolo.weights", "scene.png",
                                              "--cpu", "--out", "OUT.xyz"]),
        ("detect with a classifier", ["detect", "good.cfg", "good.weights", "scene.png", "--cpu",
                                      "--out", "OUT.png"]),
        ("test a detector", ["test", "yolo.cfg", "yolo.weights", "--data", "good.data", "--cpu"]),
        ("detect --thresh 2", ["detect", "yolo.cfg", "yolo.weights", "scene.png", "--thresh", "2"]),
        ("detect --nms -1", ["detect", "yolo.cfg", "yolo.weights", "scene.png", "--nms", "-1"]),
        ("partial -3", ["partial", "good.cfg", "good.weights", "OUT.weights", "-3"]),
        ("train --max-batches 0", ["train", "good.cfg", "--max-batches", "0", "--cpu"]),
        ("train --seed -1", ["train", "good.cfg", "--seed", "-1", "--cpu"]),
        ("train --gpus a,b", ["train", "good.cfg", "--gpus", "a,b"]),
        ("predict --top 0", ["predict", "good.cfg", "good.weights", "digit.png", "--top", "0"]),
        ("train without a .data beside", ["train", "yolo.cfg", "--cpu"]),
        ("train already trained", ["train", "good.cfg", "--weights", "trained.weights", "--data",
                                   "good.data", "--cpu", "--backup", "B"]),
        ("detect good", ["detect", "yolo.cfg", "yolo.weights", "scene.png", "--cpu", "--out",
                         "OUT.png"]),
        ("predict good", ["predict", "good.cfg", "good.weights", "digit.png", "--cpu"]),
    ]
    return cases


CASES = _cases()


def test_cli_corpus_size():
    assert len(CASES) >= 150


@pytest.mark.parametrize("argv", [argv for _, argv in CASES], ids=[name for name, _ in CASES])
def test_cli_case_ends_cleanly(zoo, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGINE_MEMORY_LIMIT", "2G")
    trained = Network(zoo["good.cfg"], quiet=True)
    trained.seen = 100 * 8
    trained.save_weights(str(tmp_path / "trained.weights"))
    files = dict(zoo, **{"trained.weights": str(tmp_path / "trained.weights"),
                         "B": str(tmp_path / "backup")})

    def resolve(word):
        if word.startswith("OUT"):
            return str(tmp_path / ("out" + word[3:]))
        return files.get(word, word)

    args = [resolve(word) for word in argv]

    def hang(signum, frame):
        raise TimeoutError("the command hung")

    signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        code = cli.main(args)
    except SystemExit as usage:  # argparse: a usage line and an error line, exit 2
        code = usage.code
    finally:
        signal.alarm(0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code in (0, 1, 2), err
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"engine {argv[0]}: error: "), lines[0]
        assert len(lines[0]) < 600, lines[0]  # a value is cut, never echoed whole
        assert "nan" not in out.lower()
    if code == 2:
        assert "error:" in err
    if code == 0:
        assert "nan" not in out.lower() and "inf%" not in out.lower()


# ---- what the errors say ----------------------------------------------------------------------------
SMALL = {"batch": 1, "height": 28, "width": 28, "channels": 1}


@pytest.mark.parametrize("body, line, key, words", [
    ("[convolutional]\nfilters=2\nsize=inf\n", 9, "size", "expected an integer"),
    ("[convolutional]\nfilters=2\nsize=1e400\n", 9, "size", "expected an integer"),
    ("[convolutional]\nfilters=2\nsize=" + "7" * 400 + "\n", 9, "size", "expected an integer"),
    ("[convolutional]\nfilters=" + "1" + "0" * 30 + "\n", 8, "filters", "expected an integer"),
    ("[convolutional]\nfilters=2\nsize=100\n", 9, "size", "expected a value <= 57"),
    ("[maxpool]\nsize=2000\n", 8, "size", "expected a value <= 57"),
    ("[convolutional]\nfilters=2\npadding=-1\n", 9, "padding", "expected a value >= 0"),
    ("[dropout]\nprobability=inf\n", 8, "probability", "expected a finite number"),
    ("[convolutional]\nfilters=21\nsize=1\n[yolo]\nmask=0,1,2\nnum=1e308\nclasses=2\n", 12, "num",
     "expected an integer"),
    ("[convolutional]\nfilters=21\nsize=1\n[yolo]\nmask=0,1,2\nnum=100000000\nclasses=2\n", 12,
     "num", "expected a value <= 65536"),
    ("[convolutional]\nfilters=21\nsize=1\n[yolo]\nmask=0,1,2\nnum=3\nclasses=2\nmax=-1\n", 14,
     "max", "expected a positive value"),
])
def test_cfg_numbers_are_checked_where_read(tmp_path, body, line, key, words):
    options = dict(SMALL, channels=3) if "yolo" in body else SMALL
    path = write_cfg(tmp_path / "n.cfg", options, body)
    with pytest.raises(ConfigError) as info:
        Network(path, quiet=True)
    message = str(info.value)
    assert f"{path}:{line}:" in message and f"{key}=" in message and words in message, message
    assert len(message) < 300


@pytest.mark.parametrize("key, value", [("height", "-28"), ("height", str(2 ** 62)),
                                        ("width", "inf"), ("channels", "-1")])
def test_net_sizes_are_checked(tmp_path, key, value):
    options = dict(SMALL, **{key: value})
    path = write_cfg(tmp_path / "s.cfg", options, "[connected]\noutput=2\n")
    with pytest.raises(ConfigError, match=rf"s\.cfg:\d+: \[net\] {key}="):
        Network(path, quiet=True)


def test_parameters_beyond_memory_are_refused_before_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_MEMORY_LIMIT", "1G")
    path = write_cfg(tmp_path / "big.cfg", SMALL, "[convolutional]\nfilters=1000000000\nsize=3\n")
    with pytest.raises(ConfigError) as info:
        Network(path, quiet=True)
    message = str(info.value)
    assert "big.cfg:7: [convolutional]" in message and "13000000000 parameters" in message
    assert "lower filters" in message


def test_activations_beyond_memory_name_the_largest_layer_and_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_MEMORY_LIMIT", "600M")
    path = write_cfg(tmp_path / "wide.cfg", dict(SMALL, batch=64, height=512, width=512),
                     "[convolutional]\nfilters=64\nsize=3\npad=1\n\n[maxpool]\nsize=2\nstride=2\n")
    net = Network(path, quiet=True)  # one image fits
    with pytest.raises(ConfigError) as info:
        net.check_memory(64, train=True)
    message = str(info.value)
    assert "training a batch of 64 needs about" in message
    assert "largest output is layer 0 [convolutional] (" in message and "wide.cfg:7" in message
    assert "raise subdivisions" in message


def test_non_finite_weights_are_refused_naming_layer_and_parameter(zoo):
    net = Network(zoo["good.cfg"], quiet=True)
    with pytest.raises(WeightsError, match=r"nan\.weights: layer 0 \[convolutional\] .* 'biases' "
                                           r"holds 1 NaN or infinite values"):
        net.load_weights(zoo["nan.weights"])


def test_overflowing_outputs_are_an_error_not_a_result(zoo, tmp_path):
    net = Network(zoo["good.cfg"], quiet=True)
    net.load_weights(zoo["good.weights"])
    net.layers[-2].params["weights"][...] = 3e38  # finite, but the product overflows
    with np.errstate(all="ignore"), pytest.raises(NumericalError, match=r"layer \d+ \["):
        net.predict(np.ones((1, 1, 28, 28), np.float32))


def test_a_wrong_network_is_named_as_such(zoo):
    net = Network(zoo["good.cfg"], quiet=True)
    with pytest.raises(WeightsError, match="written for another network"):
        net.load_weights(zoo["other_network.weights"])


def test_saved_weights_get_the_usual_permissions(zoo, tmp_path):
    previous = os.umask(0o022)
    try:
        path = tmp_path / "perm.weights"
        Network(zoo["good.cfg"], quiet=True).save_weights(str(path))
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_a_box_that_overflowed_to_infinity_is_clamped_to_the_image():
    from engine.detection import Detections, label_detections

    boxes = np.array([[0.5, 0.5, np.inf, np.inf], [0.5, 0.5, 0.25, 0.25]], np.float32)
    detections = Detections(boxes, np.ones(2, np.float32), np.full((2, 1), 0.9, np.float32))
    labelled = label_detections(detections, 640, 480, 0.5)
    assert [item.pixels for item in labelled] == [(0, 0, 639, 479), (240, 180, 400, 300)]
