"""The shipped detector, as a user runs it: `weights/mnist-detect.weights` (cfg/mnist-detect.cfg
trained by the engine, README "The MNIST detection task, trained") measured by `engine map` on
fresh validation scenes, and `engine detect` on one of them."""

import os
import re

from engine import cli

from conftest import CFG, ROOT

WEIGHTS = os.path.join(ROOT, "weights", "mnist-detect.weights")


def test_shipped_detector_map_and_detect(tmp_path, capsys):
    assert cli.main(["mnist-detection", str(tmp_path / "set"), "--train", "0", "--valid", "60",
                     "--seed", "5"]) == 0
    capsys.readouterr()
    data = str(tmp_path / "set" / "mnist-detect.data")
    assert cli.main(["map", os.path.join(CFG, "mnist-detect.cfg"), WEIGHTS, "--data", data,
                     "--cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"mAP@0\.50 = (\d\.\d{4})  mAP@0\.50:0\.95 = (\d\.\d{4})  \(60 images\)",
                         last)
    assert match, last
    assert float(match.group(1)) >= 0.85 and float(match.group(2)) >= 0.5  # 0.956 / 0.663 on 1000
    scene = str(tmp_path / "set" / "images" / "valid" / "000000.png")
    assert cli.main(["detect", os.path.join(CFG, "mnist-detect.cfg"), WEIGHTS, scene, "--names",
                     os.path.join(CFG, "mnist-detect.names"), "--thresh", "0.25", "--cpu",
                     "--out", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    truth = {line.split()[0] for line in
             open(str(tmp_path / "set" / "labels" / "valid" / "000000.txt"))}
    found = {line.split(":")[0] for line in out.splitlines() if "box (left" in line}
    assert found and found <= truth, (found, truth)
