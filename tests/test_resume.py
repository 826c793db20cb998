"""Resuming and fine-tuning as a user does it: `engine train CFG --weights FILE` from a backup, from
the shipped weights, from a `partial` file, and after the training process was killed with
SIGKILL. The expected iteration and learning rate come from Darknet's rules written out here
(a resumed run goes on at the saved iteration + 1; poly: rate = lr * (1 - batch/max)^power)."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine import cli
from engine.network import Network

from conftest import ROOT, gpu_available
from test_cli import tiny  # noqa: F401  (the fixture: 200 MNIST images, a .data file, a cfg)

LINE = re.compile(r"^(\d+), [\d.]+: [\d.]+, [\d.]+ avg, ([\d.]+) rate")


def _iterations(text):
    """(iteration, learning rate) of each Darknet progress line in `text`."""
    return [(int(m.group(1)), float(m.group(2))) for m in map(LINE.match, text.splitlines()) if m]


def poly_rate(batch_num, learning_rate=0.1, max_batches=3, power=2):
    """cfg/mnist.cfg's schedule (the tiny cfg keeps it, with its own max_batches)."""
    return learning_rate * max(1 - batch_num / max_batches, 0) ** power


def _train(capsys, *argv):
    code = cli.main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return _iterations(out), err


@pytest.fixture
def six(tiny, tmp_path):
    """The tiny MNIST cfg with max_batches=6."""
    cfg = tmp_path / "six.cfg"
    with open(tiny["cfg"]) as handle:
        cfg.write_text(handle.read().replace("max_batches=3", "max_batches=6"))
    return str(cfg)


def test_resume_from_a_backup_goes_on_at_the_next_iteration(tiny, six, tmp_path, capsys):
    backup = tmp_path / "b"
    lines, _ = _train(capsys, six, "--data", tiny["data"], "--cpu", "--backup", backup,
                      "--backup-every", 2)
    assert [k for k, _ in lines] == [1, 2, 3, 4, 5, 6]
    # A backup of iteration 4 (what a run killed at iteration 5 leaves).
    net = Network(six, quiet=True)
    net.load_weights(str(backup / "six_final.weights"))
    net.seen = 4 * 16
    net.save_weights(str(tmp_path / "at4.backup"))
    resumed, _ = _train(capsys, six, "--data", tiny["data"], "--cpu", "--backup", tmp_path / "r",
                        "--weights", tmp_path / "at4.backup")
    assert [k for k, _ in resumed] == [5, 6]
    assert [rate for _, rate in resumed] == pytest.approx([rate for k, rate in lines if k > 4])
    assert [rate for _, rate in resumed] == pytest.approx([poly_rate(k, max_batches=6)
                                                           for k in (5, 6)], abs=1e-6)
    trained = Network(six, quiet=True)
    trained.load_weights(str(tmp_path / "r" / "six_final.weights"))
    assert trained.seen == 6 * 16


def test_fine_tune_the_shipped_weights(tiny, capsys, tmp_path):
    shipped = os.path.join(ROOT, "weights", "mnist.weights")
    code = cli.main(["train", tiny["cfg"], "--data", tiny["data"], "--cpu", "--weights", shipped,
                     "--backup", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 1 and "nothing to train" in err and "--clear" in err
    lines, _ = _train(capsys, tiny["cfg"], "--data", tiny["data"], "--cpu", "--weights", shipped,
                      "--clear", "--backup", tmp_path)
    assert [k for k, _ in lines] == [1, 2, 3]
    assert np.isfinite([rate for _, rate in lines]).all()


def test_train_from_a_partial_file(tiny, capsys, tmp_path):
    shipped = os.path.join(ROOT, "weights", "mnist.weights")
    partial = tmp_path / "mnist.conv.3"
    assert cli.main(["partial", tiny["cfg"], shipped, str(partial), "3"]) == 0
    capsys.readouterr()
    lines, err = _train(capsys, tiny["cfg"], "--data", tiny["data"], "--cpu", "--weights", partial,
                        "--backup", tmp_path)
    assert "loaded the layers before layer 3" in err
    assert [k for k, _ in lines] == [1, 2, 3]


def test_max_batches_sets_the_schedule_and_says_so(tiny, capsys, tmp_path):
    lines, _ = _train(capsys, tiny["cfg"], "--data", tiny["data"], "--cpu", "--max-batches", 2,
                      "--backup", tmp_path)
    assert [k for k, _ in lines] == [1, 2]
    assert [r for _, r in lines] == pytest.approx([poly_rate(1, max_batches=2), 0.0], abs=1e-6)
    code = cli.main(["train", tiny["cfg"], "--data", tiny["data"], "--cpu", "--max-batches", "2",
                     "--backup", str(tmp_path / "x")])
    out, _ = capsys.readouterr()
    assert code == 0 and "max_batches=2 for this run (the cfg says 3)" in out


KILLED_CFG = """[net]
batch=8
subdivisions=1
height=28
width=28
channels=1
learning_rate=0.1
momentum=0.9
decay=0.0005
policy=poly
power=2
max_batches=100000

[convolutional]
filters=4
size=3
stride=2
pad=1
activation=leaky

[connected]
output=10
activation=linear

[softmax]
"""


def test_sigkill_then_resume(tiny, tmp_path):
    """Kill `engine train` with SIGKILL while it runs; resuming from its backup goes on at the
    backup's iteration + 1 with the rate the uninterrupted schedule gives there."""
    cfg = tmp_path / "killed.cfg"
    cfg.write_text(KILLED_CFG)
    backup = tmp_path / "backup"
    command = [sys.executable, "-m", "engine.cli", "train", str(cfg), "--data", tiny["data"],
               "--cpu", "--backup", str(backup), "--backup-every", "3"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.time() + 120
        while time.time() < deadline and len(_iterations(log.read_text())) < 8:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = Network(str(cfg), quiet=True)
    saved.load_weights(str(backup / "killed.backup"))  # whole, never half-written
    iteration = saved.seen // 8
    assert iteration >= 3 and iteration % 3 == 0
    resumed = subprocess.Popen(command + ["--weights", str(backup / "killed.backup")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path)
    first = resumed.stdout.readline()
    resumed.kill()
    resumed.communicate()
    (k, rate), = _iterations(first)
    assert k == iteration + 1
    assert rate == pytest.approx(poly_rate(k, max_batches=100000), abs=1e-6)
    # The next save removes a temporary file that a killed save left behind.
    stale = backup / ".tmp-999999999-x.weights"
    stale.write_bytes(b"half")
    saved.save_weights(str(backup / "again.weights"))
    assert not stale.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a GPU")
def test_resume_and_fine_tune_on_the_gpu(tiny, six, tmp_path, capsys):
    """The GPU path of the same workflow: train, resume from the backup, fine-tune the shipped
    weights, train from a partial file."""
    lines, _ = _train(capsys, six, "--data", tiny["data"], "--gpu", 0, "--backup", tmp_path / "g",
                      "--backup-every", 2)
    net = Network(six, quiet=True)
    net.load_weights(str(tmp_path / "g" / "six_final.weights"))
    net.seen = 4 * 16
    net.save_weights(str(tmp_path / "at4.backup"))
    resumed, _ = _train(capsys, six, "--data", tiny["data"], "--gpu", 0, "--weights",
                        tmp_path / "at4.backup", "--backup", tmp_path / "r")
    assert [k for k, _ in resumed] == [5, 6]
    shipped = os.path.join(ROOT, "weights", "mnist.weights")
    tuned, _ = _train(capsys, tiny["cfg"], "--data", tiny["data"], "--gpu", 0, "--weights", shipped,
                      "--clear", "--backup", tmp_path / "t")
    assert [k for k, _ in tuned] == [1, 2, 3]
    partial = tmp_path / "p.conv"
    assert cli.main(["partial", tiny["cfg"], shipped, str(partial), "2"]) == 0
    capsys.readouterr()
    fresh, _ = _train(capsys, tiny["cfg"], "--data", tiny["data"], "--gpu", 0, "--weights", partial,
                      "--backup", tmp_path / "p")
    assert [k for k, _ in fresh] == [1, 2, 3]
