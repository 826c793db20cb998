"""engine/cli.py end to end on tiny data: train / test / predict, and bad input giving exit
code 1 with one line on stderr (never a traceback)."""

import gzip
import os
import re
import struct

import numpy as np
import pytest
from PIL import Image

import engine as engine_pkg
import engine.train
from engine import cli, data as data_io

from conftest import CFG, GOLDEN, ROOT, gpu_available

MNIST = os.path.join(ROOT, "data", "mnist")


def _write_idx(path, array):
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """200 MNIST training images, 100 test images, a .data file, and cfg/mnist.cfg with batch 16."""
    folder = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 200), ("t10k", 100)):
        images = data_io.read_idx(os.path.join(MNIST, f"{split}-images.idx3-ubyte.gz"))[:count]
        labels = data_io.read_idx(os.path.join(MNIST, f"{split}-labels.idx1-ubyte.gz"))[:count]
        _write_idx(folder / f"{split}-images.idx3.gz", images)
        _write_idx(folder / f"{split}-labels.idx1.gz", labels)
    data = folder / "tiny.data"
    data.write_text(f"classes=10\ntrain={folder}/train-images.idx3.gz\n"
                    f"train_labels={folder}/train-labels.idx1.gz\n"
                    f"valid={folder}/t10k-images.idx3.gz\nvalid_labels={folder}/t10k-labels.idx1.gz\n"
                    f"labels={os.path.join(CFG, 'mnist.labels')}\nbackup={folder}/backup\ntop=2\n")
    with open(os.path.join(CFG, "mnist.cfg")) as handle:
        text = handle.read()
    assert "batch=128" in text and "max_batches=2000" in text
    cfg = folder / "tinymnist.cfg"
    cfg.write_text(text.replace("batch=128", "batch=16").replace("max_batches=2000", "max_batches=3"))
    digit = data_io.read_idx(os.path.join(MNIST, "t10k-images.idx3-ubyte.gz"))[0]
    Image.fromarray(digit).save(folder / "digit7.png")
    return {"dir": folder, "data": str(data), "cfg": str(cfg), "png": str(folder / "digit7.png")}


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *words):
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Train the tiny cfg for 3 iterations (module-wide, reused by the test/predict tests)."""
    backup = tmp_path_factory.mktemp("backup")
    code = cli.main(["train", tiny["cfg"], "--data", tiny["data"], "--cpu", "--backup", str(backup),
                     "--backup-every", "2"])
    assert code == 0
    return backup


def test_train_writes_backup_and_final_weights(tiny, trained):
    """<backup>/<cfg-name>.backup (every --backup-every iterations) and <cfg-name>_final.weights;
    the final file holds seen = 3 iterations x batch 16."""
    assert sorted(os.listdir(trained)) == ["tinymnist.backup", "tinymnist_final.weights"]
    net = engine_pkg.load(tiny["cfg"], str(trained / "tinymnist_final.weights"), quiet=True)
    assert net.seen == 48


def test_train_prints_darknet_iteration_lines(tiny, tmp_path, capsys):
    code, out, err = _run(capsys, "train", tiny["cfg"], "--data", tiny["data"], "--cpu", "--backup",
                          tmp_path, "--max-batches", "2", "--seed", "3")
    assert code == 0, err
    lines = [l for l in out.splitlines() if re.match(r"^\d+, ", l)]
    assert len(lines) == 2
    # iteration, epochs: loss, avg loss, rate, seconds, images, progress bar with ETA
    assert re.match(r"^1, [\d.]+: [\d.]+, [\d.]+ avg, [\d.]+ rate, [\d.]+ seconds, 16 images .*ETA",
                    lines[0]), lines[0]
    assert (tmp_path / "tinymnist_final.weights").exists()


def test_test_prints_the_summary_line(tiny, trained, capsys):
    code, out, err = _run(capsys, "test", tiny["cfg"], trained / "tinymnist_final.weights", "--data",
                          tiny["data"], "--cpu")
    assert code == 0, err
    assert re.match(r"^top-1 \d+\.\d\d%  top-2 \d+\.\d\d%  \(100 images\)$", out.strip().splitlines()[-1])


def test_test_with_darknet_trained_weights(tiny, capsys):
    """Real Darknet's MNIST weights (golden G1) classify the first 100 test images well."""
    g1 = os.path.join(GOLDEN, "G1_mnist_trained")
    code, out, err = _run(capsys, "test", os.path.join(g1, "mnist.cfg"), os.path.join(g1, "weights"),
                          "--data", tiny["data"], "--cpu")
    assert code == 0, err
    top1, top2 = map(float, re.search(r"top-1 ([\d.]+)%  top-2 ([\d.]+)%", out).groups())
    assert top1 >= 90 and top2 >= top1


def test_predict_prints_classes(tiny, capsys):
    g1 = os.path.join(GOLDEN, "G1_mnist_trained")
    code, out, err = _run(capsys, "predict", os.path.join(g1, "mnist.cfg"), os.path.join(g1, "weights"),
                          tiny["png"], "--data", tiny["data"], "--cpu", "--top", "3")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"{tiny['png']}:"
    rows = [re.match(r"^\s+([\d.]+)%\s+(\S+)$", l) for l in lines[1:]]
    assert len(rows) == 3 and all(rows)
    assert rows[0].group(2) == "7" and float(rows[0].group(1)) > 50  # MNIST test image 0 is a 7
    assert float(rows[0].group(1)) >= float(rows[1].group(1)) >= float(rows[2].group(1))


def test_ctrl_c_saves_weights(tiny, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt during training saves <backup>/<cfg>.backup and exits (code 130)."""
    original, calls = engine.train.train_iteration, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.train, "train_iteration", interrupted)
    code, out, err = _run(capsys, "train", tiny["cfg"], "--data", tiny["data"], "--cpu", "--backup",
                          tmp_path, "--max-batches", "10", "--backup-every", "0")
    assert code == 130
    assert "Traceback" not in err
    backup = tmp_path / "tinymnist.backup"
    assert backup.exists() and not (tmp_path / "tinymnist_final.weights").exists()
    assert "Interrupted" in out and str(backup) in out
    assert engine_pkg.load(tiny["cfg"], str(backup), quiet=True).seen == 32  # 2 finished iterations


# ---- bad input: one line, exit code 1 --------------------------------------------------------------
def test_missing_cfg(tiny, capsys):
    code, _, err = _run(capsys, "test", "nope/none.cfg", "x.weights", "--data", tiny["data"], "--cpu")
    _one_line_error(code, err, "engine test: error:", "none.cfg", "not found")


def test_missing_cfg_without_data_names_the_cfg(capsys):
    # The .data file would be looked for beside the cfg; the cfg is what is missing.
    for command in (["train"], ["test", "x.weights"]):
        code, _, err = _run(capsys, command[0], "nope/none.cfg", *command[1:], "--cpu")
        _one_line_error(code, err, f"engine {command[0]}: error:", "none.cfg: cfg file not found")


def test_host_out_of_memory_is_one_line(tiny, monkeypatch, capsys):
    import engine.cli

    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(engine.cli, "build", exhausted)
    code, _, err = _run(capsys, "test", tiny["cfg"], "x.weights", "--data", tiny["data"], "--cpu")
    _one_line_error(code, err, "engine test: error: ", "out of host memory", "raise subdivisions")


def test_cfg_wrong_type_value(tiny, tmp_path, capsys):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(open(tiny["cfg"]).read().replace("filters=32", "filters=thirty-two"))
    code, _, err = _run(capsys, "train", cfg, "--data", tiny["data"], "--cpu", "--backup", tmp_path)
    line = _one_line_error(code, err, f"{cfg}:", "filters=thirty-two", "expected an integer")
    lineno = open(cfg).read().splitlines().index("filters=thirty-two") + 1
    assert f"{cfg}:{lineno}:" in line


def test_cfg_unknown_section(tiny, tmp_path, capsys):
    cfg = tmp_path / "sec.cfg"
    cfg.write_text(open(tiny["cfg"]).read() + "\n[lstmx]\noutput=3\n")
    code, _, err = _run(capsys, "test", cfg, "x.weights", "--data", tiny["data"], "--cpu")
    _one_line_error(code, err, "[lstmx]", "unknown section")


def test_missing_weights(tiny, tmp_path, capsys):
    code, _, err = _run(capsys, "test", tiny["cfg"], tmp_path / "none.weights", "--data", tiny["data"],
                        "--cpu")
    _one_line_error(code, err, "none.weights", "not found")


def test_truncated_weights(tiny, trained, tmp_path, capsys):
    cut = tmp_path / "cut.weights"
    cut.write_bytes((trained / "tinymnist_final.weights").read_bytes()[:1000])
    code, _, err = _run(capsys, "test", tiny["cfg"], cut, "--data", tiny["data"], "--cpu")
    _one_line_error(code, err, "cut.weights", "ends inside layer")


def test_bad_data_file(tiny, tmp_path, capsys):
    data = tmp_path / "bad.data"
    data.write_text(f"classes=10\ntrain={tmp_path}/missing.idx3.gz\ntrain_labels=x\n"
                    f"labels={os.path.join(CFG, 'mnist.labels')}\n")
    code, _, err = _run(capsys, "train", tiny["cfg"], "--data", data, "--cpu", "--backup", tmp_path)
    _one_line_error(code, err, "bad.data", "missing.idx3.gz", "not found")
    code, _, err = _run(capsys, "test", tiny["cfg"], "x.weights", "--data", tmp_path / "none.data",
                        "--cpu")
    _one_line_error(code, err, "none.data", "not found")


def test_undecodable_image(tiny, trained, tmp_path, capsys):
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = _run(capsys, "predict", tiny["cfg"], trained / "tinymnist_final.weights", image,
                        "--data", tiny["data"], "--cpu")
    _one_line_error(code, err, "broken.png", "cannot decode image")


def test_maxpool_larger_than_input(tiny, tmp_path, capsys):
    cfg = tmp_path / "pool.cfg"
    cfg.write_text("[net]\nbatch=2\nheight=4\nwidth=4\nchannels=1\n[maxpool]\nsize=9\nstride=1\n"
                   "padding=0\n[softmax]\n")
    code, _, err = _run(capsys, "test", cfg, "x.weights", "--data", tiny["data"], "--cpu")
    _one_line_error(code, err, f"{cfg}:6:", "does not fit")


@pytest.mark.skipif(gpu_available(), reason="this machine has a usable GPU")
def test_gpu_without_gpu_is_a_clear_error(tiny, capsys):
    code, _, err = _run(capsys, "test", tiny["cfg"], "x.weights", "--data", tiny["data"], "--gpu", "0")
    _one_line_error(code, err, "engine test: error:")


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_train_and_test_on_an_image_list(tiny, tmp_path, capsys):
    """Darknet's image-list format end to end: PNGs whose label word is in the path."""
    images = data_io.read_idx(os.path.join(MNIST, "t10k-images.idx3-ubyte.gz"))[:32]
    labels = data_io.read_idx(os.path.join(MNIST, "t10k-labels.idx1-ubyte.gz"))[:32]
    (tmp_path / "png").mkdir()
    names = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        names.append(f"png/{i:03d}_{WORDS[label]}.png")
        Image.fromarray(pixels).save(tmp_path / names[-1])
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "words.txt").write_text("\n".join(WORDS) + "\n")
    data = tmp_path / "list.data"
    data.write_text(f"classes=10\ntrain={tmp_path}/list.txt\nvalid={tmp_path}/list.txt\n"
                    f"labels={tmp_path}/words.txt\nbackup={tmp_path}/backup\ntop=2\n")
    code, out, err = _run(capsys, "train", tiny["cfg"], "--data", data, "--cpu", "--max-batches", "2")
    assert code == 0, err
    final = tmp_path / "backup" / "tinymnist_final.weights"
    assert final.exists()
    code, out, err = _run(capsys, "test", tiny["cfg"], final, "--data", data, "--cpu")
    assert code == 0, err
    assert re.search(r"top-1 [\d.]+%  top-2 [\d.]+%  \(32 images\)$", out.strip())
    code, out, err = _run(capsys, "predict", tiny["cfg"], final, tmp_path / names[0], "--data", data,
                          "--cpu", "--top", "2")
    assert code == 0, err
    assert all(re.match(r"^\s+[\d.]+%\s+(" + "|".join(WORDS) + ")$", l) for l in out.splitlines()[1:])


def test_unwritable_backup_folder(tiny, tmp_path, capsys):
    """A backup folder that cannot be created is one line, not a traceback."""
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "train", tiny["cfg"], "--data", tiny["data"], "--cpu", "--backup",
                        tmp_path / "file" / "sub", "--max-batches", "1")
    _one_line_error(code, err, "cannot write weights file")
