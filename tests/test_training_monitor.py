"""What engine train shows while it trains: --map (mAP every N iterations, best weights),
chart.png, and the iteration line rewritten in place on a terminal."""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from engine import cli
from engine.data import DataConfig
from engine.network import Network
from engine.train import train

from helpers import write_cfg
from test_evaluation import TINY_DETECTOR


@pytest.fixture(scope="module")
def detection_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor")
    cli.main(["mnist-detection", str(folder / "set"), "--train", "16", "--valid", "4", "--size",
              "32", "--min-digit", "8", "--max-digit", "16", "--max-digits", "3"])
    cfg = write_cfg(folder / "mon.cfg", dict(batch=8, subdivisions=1, width=32, height=32,
                                             channels=3, learning_rate=0.01, max_batches=4,
                                             flip=0), TINY_DETECTOR.replace("num=3", "num=3\njitter=0"))
    return {"cfg": cfg, "data": str(folder / "set" / "mnist-detect.data"), "folder": folder}


def test_train_with_map_measures_and_keeps_the_best(detection_set, tmp_path, capsys):
    """--map --map-every 2: mAP after iterations 2 and 4 (the last), the best weights saved; the
    figure printed is what engine map reports for those weights (BN folded there: to 1e-3)."""
    pytest.importorskip("matplotlib")
    backup = tmp_path / "backup"
    code = cli.main(["train", detection_set["cfg"], "--data", detection_set["data"], "--cpu",
                     "--backup", str(backup), "--map", "--map-every", "2"])
    out = capsys.readouterr().out
    assert code == 0
    found = re.findall(r"mAP@0\.50 = (\d\.\d{4}) at iteration (\d+)", out)
    assert [int(i) for _, i in found] == [2, 4]
    best = max(float(v) for v, _ in found)
    assert os.path.exists(backup / "mon_best.weights")
    with Image.open(backup / "chart.png") as chart:
        assert chart.size == (800, 600)
    capsys.readouterr()
    cli.main(["map", detection_set["cfg"], str(backup / "mon_best.weights"), "--data",
              detection_set["data"], "--cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last.split()[2]) == pytest.approx(best, abs=1e-3)


def test_map_needs_a_detector_and_a_valid_list(detection_set, tmp_path, capsys):
    data = tmp_path / "novalid.data"
    data.write_text(open(detection_set["data"]).read().replace("valid=", "validation="))
    code = cli.main(["train", detection_set["cfg"], "--data", str(data), "--cpu", "--backup",
                     str(tmp_path), "--map"])
    err = capsys.readouterr().err
    assert code == 1 and "valid=" in err and len(err.strip().splitlines()) == 1


def test_chart_draws_loss_and_map_points(tmp_path):
    pytest.importorskip("matplotlib")
    from engine.chart import TrainingChart

    chart = TrainingChart(str(tmp_path / "c" / "chart.png"), 100)
    for i in range(1, 51):
        chart.add_loss(i, 10 / i)
    plain = chart.save()
    loss_only = np.asarray(Image.open(plain).convert("RGB")).copy()
    chart.add_map(50, 0.42)
    with_map = np.asarray(Image.open(chart.save()).convert("RGB"))
    red = (with_map[..., 0] > 180) & (with_map[..., 1] < 100) & (with_map[..., 2] < 100)
    red_before = (loss_only[..., 0] > 180) & (loss_only[..., 1] < 100) & (loss_only[..., 2] < 100)
    assert red.sum() > red_before.sum() + 20  # the mAP point and its label are drawn in red


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_rewritten_in_place_on_a_terminal(detection_set, tmp_path):
    net = Network(detection_set["cfg"], quiet=True)
    dataset = DataConfig(detection_set["data"]).detection_dataset("train", net.input_shape, 90)
    stream = Terminal()
    train(net, dataset, str(tmp_path), max_batches=3, stream=stream)
    note, text = stream.getvalue().split("\n", 1)  # --max-batches 3 where the cfg says 4
    assert note.startswith("max_batches=3 for this run")
    body, saved = text.rsplit("\n", 2)[0], text.rsplit("\n", 2)[1]
    assert saved.startswith("Saved ")
    assert body.count("\r") == 3 and "\n" not in body and body.count("\x1b[K") == 3
    plain = io.StringIO()
    net = Network(detection_set["cfg"], quiet=True)
    train(net, dataset, str(tmp_path), max_batches=3, stream=plain)
    assert "\r" not in plain.getvalue() and len(plain.getvalue().splitlines()) == 5
