"""`engine calc_anchors` (engine/anchors.py): Darknet's k-means with the 1 - IoU distance,
checked against a plain-Python version of do_kmeans, on clusters it must find, and its output."""

import numpy as np

from engine import cli
from engine.anchors import anchors_line, kmeans_iou


def _iou(a, b):
    inter = min(a[0], b[0]) * min(a[1], b[1])
    return inter / (a[0] * a[1] + b[0] * b[1] - inter)


def reference_kmeans(sizes, centres):
    """src/matrix.c's do_kmeans in plain Python, from given initial centres."""
    centres = [list(c) for c in centres]
    assignments = [0] * len(sizes)
    for _ in range(1000):
        closest = []
        for box in sizes:
            best, best_dist = 0, 1 - _iou(box, centres[0])
            for j, centre in enumerate(centres):
                if 1 - _iou(box, centre) < best_dist:
                    best, best_dist = j, 1 - _iou(box, centre)
            closest.append(best)
        converged = closest == assignments
        assignments = closest
        if converged:
            break
        old = [c[:] for c in centres]
        centres = [[0.0, 0.0] for _ in centres]
        counts = [0] * len(centres)
        for box, j in zip(sizes, assignments):
            counts[j] += 1
            centres[j][0] += box[0]
            centres[j][1] += box[1]
        for j in range(len(centres)):
            for d in range(2):
                if counts[j]:
                    centres[j][d] /= counts[j]
                if centres[j][d] == 0:
                    centres[j][d] = old[j][d]
    return np.array(centres)


def test_kmeans_equals_plain_darknet_kmeans():
    rng = np.random.default_rng(5)
    sizes = rng.uniform(5, 200, (300, 2))
    centres, rounds = kmeans_iou(sizes, 6, np.random.default_rng(1))
    initial = sizes[np.random.default_rng(1).permutation(300)[:6]]
    assert rounds > 1
    np.testing.assert_allclose(centres, reference_kmeans(sizes.tolist(), initial), rtol=1e-12)


def _labelled_set(folder, shapes, per_shape=40, seed=0):
    """Images (never read) with label files whose boxes are `shapes` (relative w, h) +- 2%."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    paths = []
    for n in range(per_shape):
        lines = []
        for k, (w, h) in enumerate(shapes):
            jitter = rng.uniform(0.98, 1.02, 2)
            lines.append(f"{k % 2} 0.5 0.5 {w * jitter[0]:.6f} {h * jitter[1]:.6f}")
        (folder / "labels" / f"{n}.txt").write_text("\n".join(lines) + "\n")
        paths.append(str(folder / "images" / f"{n}.png"))
    (folder / "train.txt").write_text("\n".join(paths) + "\n")
    (folder / "set.data").write_text(f"classes=2\ntrain={folder}/train.txt\n")
    return str(folder / "set.data")


def test_calc_anchors_finds_the_clusters(tmp_path, capsys, monkeypatch):
    """Three box shapes: three anchors at those shapes (times the network size), sorted by area;
    average IoU near 1; Darknet's lines and anchors.txt."""
    monkeypatch.chdir(tmp_path)
    data = _labelled_set(tmp_path, [(0.5, 0.25), (0.1, 0.2), (0.3, 0.6)])
    assert cli.main(["calc_anchors", data, "--num", "3", "--width", "320", "--height", "160"]) == 0
    out = capsys.readouterr().out
    assert "counters_per_class = 80, 40" in out
    avg = float(out.split("avg IoU = ")[1].split(" %")[0])
    assert avg > 97
    line = out.strip().splitlines()[-1]
    assert line.startswith("anchors = ")
    anchors = np.array([float(v) for v in line[len("anchors = "):].split(",")]).reshape(-1, 2)
    np.testing.assert_allclose(anchors, [[32, 32], [160, 40], [96, 96]], atol=1)
    assert (tmp_path / "anchors.txt").read_text() == line[len("anchors = "):]


def test_small_networks_print_fractions():
    assert anchors_line(np.array([[1.5, 2.25], [3, 4]]), 13) == "1.5000,2.2500, 3.0000,4.0000"
    assert anchors_line(np.array([[10.4, 13.6]]), 416) == " 10, 14"


def test_too_few_boxes_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _labelled_set(tmp_path, [(0.5, 0.25)], per_shape=2)
    assert cli.main(["calc_anchors", data, "--num", "9"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "9 clusters" in err
