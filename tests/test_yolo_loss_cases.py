"""The two [yolo] losses (pjreddie's and AlexeyAB's, YoloLayer.cost) on crafted mini-batches,
against the deltas and costs that the scalar per-truth code they replaced gave for the same
outputs and truths (tests/data/yolo_loss_cases.npz).

Each case is a cfg's [yolo] keys; its batch holds what makes the vectorised truth part hard:
several truths on one cell and anchor (up to three, so three rounds), truths whose best anchor
is another layer's, iou_thresh's extra anchors, predictions decoded close to a truth (past
ignore_thresh and truth_thresh, and with every class score below AlexeyAB's 0.25 gate), an image
without truths, rows after the x == 0 row, more rows than `max`, and (AlexeyAB's loss) rows
whose class lies outside [0, classes).

The file was written by `python tests/test_yolo_loss_cases.py --write` at commit 465dceb (the
scalar code's last); `make_case` builds the inputs from a seed, and the file keeps them too. The
deltas must be equal to the bit; the cost of an IoU loss is summed differently now (1e-7).
"""

import os
import sys

import numpy as np
import pytest

from engine.backends.numpy_backend import NumpyBackend

sys.path.insert(0, os.path.dirname(__file__))
from helpers import build_layer  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "yolo_loss_cases.npz")
NET_W, NET_H = 96, 80
GRID_H, GRID_W = 5, 6
BATCH, ROWS = 4, 10  # truth rows per image given; the cases' max=8 reads 8 of them
CLASSES = 3
ANCHORS = "10,14, 16,16, 24,30, 40,36, 60,50, 90,75"

# name: (whose loss, the [yolo] keys besides anchors, classes, num)
CASES = {
    "pjreddie": ("pjreddie", "mask=0,1,2\nignore_thresh=.5\ntruth_thresh=1"),
    "pjreddie_truth_thresh": ("pjreddie", "mask=1,2,3\nignore_thresh=.4\ntruth_thresh=.6"),
    "alexeyab_defaults": ("alexeyab", "mask=0,1,2\nignore_thresh=.5"),
    "ciou_iou_thresh": ("alexeyab", "mask=1,2,3\niou_loss=ciou\niou_normalizer=0.07\n"
                        "ignore_thresh=.7\niou_thresh=0.213\nmax_delta=5"),
    "new_coords_smooth": ("alexeyab", "mask=0,1,2\nnew_coords=1\nobjectness_smooth=1\n"
                          "iou_thresh=0.2\niou_normalizer=0.05\ncls_normalizer=0.5\n"
                          "iou_loss=ciou\nmax_delta=2\nignore_thresh=.5"),
    "mse_extras": ("alexeyab", "mask=0,1,2\niou_loss=mse\ncounters_per_class=100,20,5\n"
                   "max_delta=3\ncls_normalizer=2\nlabel_smooth_eps=0.1\niou_thresh=0.3\n"
                   "iou_thresh_kind=giou\nignore_thresh=.3\ntruth_thresh=.6\n"
                   "objectness_smooth=1\nobj_normalizer=0.5"),
    "giou_truth_thresh": ("alexeyab", "mask=2,3,4\niou_loss=giou\niou_normalizer=0.5\n"
                          "ignore_thresh=.5\ntruth_thresh=.7"),
    "diou_focal": ("alexeyab", "mask=0,1,2\niou_loss=diou\niou_thresh=0.3\n"
                   "iou_thresh_kind=ciou\nfocal_loss=1"),
    "iou_diou_kind": ("alexeyab", "mask=0,1,2\niou_loss=iou\niou_thresh=0.25\n"
                      "iou_thresh_kind=diou\ndelta_normalizer=2\nobj_normalizer=2"),
    "new_coords_mse": ("alexeyab", "mask=1,2,3\nnew_coords=1\niou_loss=mse\n"
                       "counters_per_class=10,30,60\ntruth_thresh=.55\nignore_thresh=.45"),
    "ciou_smooth_truth_thresh": ("alexeyab", "mask=0,1,2\niou_loss=ciou\nobjectness_smooth=1\n"
                                 "truth_thresh=.5\nignore_thresh=.3\nlabel_smooth_eps=0.05"),
}


def make_layer(tmp_path, name):
    darknet, keys = CASES[name]
    text = f"[yolo]\n{keys}\nanchors={ANCHORS}\nclasses={CLASSES}\nnum=6\nmax=8\n"
    layer = build_layer(tmp_path, text, (3 * (5 + CLASSES), GRID_H, GRID_W), darknet=darknet)
    layer.net_w, layer.net_h = NET_W, NET_H
    return layer


def _logistic(z):
    return 1 / (1 + np.exp(-z))


def make_case(layer, seed):
    """(output (BATCH, anchors*entries, H, W), truth (BATCH, ROWS*5)) for `layer`: a random
    output, then truths placed on it as the module docstring lists."""
    rng = np.random.default_rng(seed)
    n, e = len(layer.mask), layer.entries
    out = rng.normal(0, 1.2, (BATCH, n, e, GRID_H, GRID_W))
    out[:, :, [0, 1, 4]] = _logistic(out[:, :, [0, 1, 4]])
    out[:, :, 5:] = _logistic(out[:, :, 5:] - 0.5)
    if layer.new_coords:
        out[:, :, 2:4] = _logistic(out[:, :, 2:4])
    anchors = layer.anchors.astype(np.float64)
    truth = np.zeros((BATCH, ROWS, 5))

    def raw_size(size, anchor, net):
        if layer.new_coords:
            return np.sqrt(size * net / (4 * anchor))
        return np.log(size * net / anchor)

    def matched(b, a, j, i, noise, cls, low_classes=False):
        """A truth in cell (j, i) sized like mask anchor a, and the prediction there decoded
        close to it (noise: how far)."""
        aw, ah = anchors[layer.mask[a]]
        tw = aw / NET_W * rng.uniform(0.9, 1.1)
        th = ah / NET_H * rng.uniform(0.9, 1.1)
        tx, ty = (i + rng.uniform(0.2, 0.8)) / GRID_W, (j + rng.uniform(0.2, 0.8)) / GRID_H
        out[b, a, 0, j, i] = np.clip(tx * GRID_W - i + rng.normal(0, noise), 0.01, 0.99)
        out[b, a, 1, j, i] = np.clip(ty * GRID_H - j + rng.normal(0, noise), 0.01, 0.99)
        out[b, a, 2, j, i] = raw_size(tw, aw, NET_W) + rng.normal(0, noise)
        out[b, a, 3, j, i] = raw_size(th, ah, NET_H) + rng.normal(0, noise)
        if low_classes:
            out[b, a, 5:, j, i] = rng.uniform(0.05, 0.2, CLASSES)
        return [tx, ty, tw, th, cls]

    def random_box(cls):
        w, h = rng.uniform(0.05, 0.9, 2)
        return [rng.uniform(0.02, 0.98), rng.uniform(0.02, 0.98), w, h, cls]

    # image 0: three truths on one cell and anchor, a fourth on another, one whose best anchor
    # is outside the mask, then the x == 0 row and a row after it (not read)
    first = matched(0, 1, 2, 3, 0.02, 0)
    second = list(first)
    second[0] += 0.01 / GRID_W
    second[2] *= 1.02
    second[4] = 2
    third = list(first)
    third[1] -= 0.01 / GRID_H
    third[4] = 1
    rows0 = [first, second, matched(0, 0, 4, 1, 0.05, 1), third,
             [0.71, 0.44, 0.95, 0.9, 2], random_box(0), [0, 0, 0, 0, 0], random_box(1)]
    truth[0, :len(rows0)] = rows0
    # image 1: close predictions (past the thresholds, one with every class score below 0.25),
    # a looser one, random boxes, and (AlexeyAB only) classes outside [0, classes)
    rows1 = [matched(1, 2, 0, 0, 0.01, 2), matched(1, 0, 1, 5, 0.01, 1, low_classes=True),
             matched(1, 1, 3, 2, 0.15, 0), random_box(1), random_box(2)]
    if layer.loss_kind == "alexeyab":
        rows1[3:3] = [random_box(CLASSES), random_box(-1)]
    truth[1, :len(rows1)] = rows1
    # image 2: no truths (its first row is the end), a row after
    truth[2, 1] = random_box(0)
    # image 3: ten truths, two more than max=8, one duplicated cell among them
    rows3 = [matched(3, a, j, i, 0.1, int(rng.integers(0, CLASSES)))
             for a, j, i in ((0, 0, 1), (1, 2, 2), (2, 4, 5), (0, 3, 0))]
    rows3 += [random_box(int(rng.integers(0, CLASSES))) for _ in range(5)]
    rows3.insert(2, list(rows3[1][:4]) + [(rows3[1][4] + 1) % CLASSES])
    truth[3] = rows3[:ROWS]
    output = out.reshape(BATCH, n * e, GRID_H, GRID_W).astype(np.float32)
    return output, truth.reshape(BATCH, ROWS * 5).astype(np.float32)


def run_cost(layer, ops, output, truth):
    layer.output = ops.asarray(output)
    cost, delta = layer.cost(ops, ops.asarray(truth))
    return cost, ops.to_host(delta)


def write(path):
    import tempfile
    from pathlib import Path

    saved = {}
    ops = NumpyBackend()
    with tempfile.TemporaryDirectory() as folder:
        for seed, name in enumerate(CASES):
            layer = make_layer(Path(folder), name)
            output, truth = make_case(layer, seed)
            cost, delta = run_cost(layer, ops, output, truth)
            saved.update({f"{name}/output": output, f"{name}/truth": truth,
                          f"{name}/delta": delta, f"{name}/cost": np.float64(cost)})
    np.savez_compressed(path, **saved)


@pytest.fixture(scope="module")
def saved():
    with np.load(DATA) as data:
        return dict(data)


@pytest.mark.parametrize("name", CASES)
def test_case_inputs_are_the_saved_ones(tmp_path, saved, name):
    output, truth = make_case(make_layer(tmp_path, name), list(CASES).index(name))
    np.testing.assert_array_equal(output, saved[f"{name}/output"])
    np.testing.assert_array_equal(truth, saved[f"{name}/truth"])


@pytest.mark.parametrize("name", CASES)
def test_loss_equals_the_scalar_codes(tmp_path, saved, name):
    layer = make_layer(tmp_path, name)
    cost, delta = run_cost(layer, NumpyBackend(), saved[f"{name}/output"], saved[f"{name}/truth"])
    expected = saved[f"{name}/delta"]
    np.testing.assert_array_equal(delta, expected)
    # with an IoU loss the cost is now the whole sum of squares less the box deltas' (the old
    # code summed the other entries): a different rounding
    assert cost == pytest.approx(float(saved[f"{name}/cost"]), rel=1e-6)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write(DATA)


def test_rounds_order_the_events_of_a_cell():
    """An event's round is how many earlier events share its cell; each round's events touch
    distinct cells, and rounds come in order."""
    from engine.layers.yolo_cells import CellRounds, truth_events

    cell_of = [(0, 1, 2, 3), (1, 0, 0, 0), (0, 1, 2, 3), (0, 0, 2, 3), (0, 1, 2, 3), (1, 0, 0, 0)]
    image, slot, j, i = (np.array(v) for v in zip(*cell_of))
    events = truth_events(image, np.arange(6), slot, slot, j, i)
    cells = CellRounds(events, (2, 2, 4, 5))
    np.testing.assert_array_equal(cells.round, [0, 0, 1, 0, 2, 1])
    assert [tuple(cells.cells[u]) for u in cells.cell] == cell_of
    assert [list(r) for r in cells.rounds()] == [[0, 1, 3], [2, 5], [4]]


@pytest.mark.parametrize("name", CASES)
def test_cases_keep_clear_of_the_thresholds(tmp_path, saved, name):
    """No best IoU (with or without the class gate) lies within 1e-4 of ignore_thresh or
    truth_thresh, so the GPU's float32 truth_overlap takes the decisions the CPU's float64 one
    takes, and test_gpu_loss_equals_cpu can compare deltas closely."""
    layer = make_layer(tmp_path, name)
    ops = NumpyBackend()
    rows = saved[f"{name}/truth"].reshape(BATCH, ROWS, 5)[:, :layer.max_boxes]
    alexeyab = layer.loss_kind == "alexeyab"
    for gate in (0.25, None) if alexeyab else (None,):
        best, _ = ops.truth_overlap(saved[f"{name}/output"], rows.reshape(BATCH, -1),
                                    layer.mask_anchors, layer.entries, NET_W, NET_H,
                                    layer.new_coords, layer.classes if alexeyab else None, gate)
        for thresh in (layer.ignore_thresh, layer.truth_thresh):
            assert np.abs(best - thresh).min() > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_gpu_loss_equals_cpu(tmp_path, saved, name):
    """YoloLayer.cost on the CUDA backend (its dense part in float32 kernels) against the numpy
    backend's, on every case: the deltas to 1e-4 of the largest, the cost to 1e-4."""
    from engine.backends.cuda import CudaBackend

    output, truth = saved[f"{name}/output"], saved[f"{name}/truth"]
    cpu_cost, cpu_delta = run_cost(make_layer(tmp_path, name), NumpyBackend(), output, truth)
    gpu_cost, gpu_delta = run_cost(make_layer(tmp_path, name), CudaBackend(device=0, seed=0),
                                   output, truth)
    scale = np.abs(cpu_delta).max()
    assert np.abs(gpu_delta - cpu_delta).max() <= 1e-4 * scale
    assert gpu_cost == pytest.approx(cpu_cost, rel=1e-4)


@pytest.mark.parametrize("name", ["pjreddie", "alexeyab_defaults", "giou_truth_thresh"])
def test_a_batch_without_truths_gets_the_objectness_push_alone(tmp_path, saved, name):
    """No truth in the mini-batch: the delta is obj_normalizer * (0 - objectness), nothing
    else, and the cost its sum of squares (an IoU loss adds no box term: no truth counted)."""
    layer = make_layer(tmp_path, name)
    output = saved[f"{name}/output"]
    cost, delta = run_cost(layer, NumpyBackend(), output, np.zeros((BATCH, ROWS * 5), np.float32))
    normalizer = getattr(layer, "obj_normalizer", 1.0)
    expected = np.zeros(output.shape)
    expected[:, 4::layer.entries] = -normalizer * output[:, 4::layer.entries].astype(np.float64)
    np.testing.assert_allclose(delta, expected, rtol=1e-6)
    assert cost == pytest.approx(float((expected ** 2).sum()), rel=1e-5)


# ---- the truth part on the backend (apply_truth_events_) on the heads of shipped cfgs -----------
CFG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cfg")
# cfg: (whose loss, the [yolo] heads' grids at 416x416, in the cfg's order)
CFG_HEADS = {"yolov3-tiny.cfg": ("pjreddie", (13, 26)), "yolov4-tiny.cfg": ("alexeyab", (13, 26)),
             "yolov3.cfg": ("pjreddie", (13, 26, 52))}
HEAD_BATCH, HEAD_ROWS = 8, 12


def cfg_head_case(tmp_path, cfg, head, seed=5):
    """Head `head` of `cfg` (its [yolo] section as is, at 416x416), a random output, and truths:
    1 to 9 random boxes per image, and in each image the first box twice more on its cell (once
    nudged, of another class), so that cells get two and three events."""
    darknet, grids = CFG_HEADS[cfg]
    with open(os.path.join(CFG, cfg)) as handle:
        sections = [s for s in handle.read().split("\n[") if s.startswith("yolo]")]
    grid = grids[head]
    probe = build_layer(tmp_path, "[" + sections[head], (3 * 85, grid, grid), darknet=darknet)
    layer = build_layer(tmp_path, "[" + sections[head], (len(probe.mask) * probe.entries, grid,
                                                         grid), darknet=darknet)
    layer.net_w = layer.net_h = 416
    rng = np.random.default_rng(seed + 10 * head)
    out = rng.normal(0, 1.2, (HEAD_BATCH, len(layer.mask), layer.entries, grid, grid))
    out[:, :, [0, 1, 4]] = _logistic(out[:, :, [0, 1, 4]])
    out[:, :, 5:] = _logistic(out[:, :, 5:] - 1)
    truth = np.zeros((HEAD_BATCH, HEAD_ROWS, 5))
    for b in range(HEAD_BATCH):
        count = int(rng.integers(1, 10))
        wh = rng.uniform(0.02, 0.6, (count, 2))
        truth[b, :count, :2] = rng.uniform(wh / 2, 1 - wh / 2)
        truth[b, :count, 2:4] = wh
        truth[b, :count, 4] = rng.integers(0, layer.classes, count)
        first = truth[b, 0].copy()
        truth[b, count] = first + [0.1 / 416, 0, 0.01, 0, 0]
        truth[b, count, 4] = (first[4] + 1) % layer.classes
        truth[b, count + 1] = first
    output = out.reshape(HEAD_BATCH, -1, grid, grid).astype(np.float32)
    return layer, output, truth.reshape(HEAD_BATCH, -1).astype(np.float32)


HEADS = [(cfg, head) for cfg, (_, grids) in CFG_HEADS.items() for head in range(len(grids))]


@pytest.mark.parametrize("cfg, head", HEADS)
def test_truth_events_on_the_backend_equal_the_host_code(tmp_path, cfg, head):
    """The numpy apply_truth_events_ (what YoloLayer.cost runs now) against the host code it
    replaced (YoloLayer._truth_loss, still the truth_thresh < 1 path): the same delta to the
    bit; the cost to 1e-6 (the whole delta's squares are now summed in float32 blocks after
    the events, not before them with the touched cells' corrected in float64)."""
    layer, output, truth = cfg_head_case(tmp_path, cfg, head)
    ops = NumpyBackend()
    layer.output = output
    state = layer.device_cost(ops, ops.asarray(truth))
    plan = layer.plan_cost(ops, truth, state)
    host_cost, host_delta = layer._truth_loss(ops, plan, *state)
    assert layer.truth_on_device and plan.cells.round.max() == 2  # three events on a cell
    cost, delta = layer.cost(ops, truth)
    np.testing.assert_array_equal(delta, host_delta)
    assert cost == pytest.approx(host_cost, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg, head", HEADS)
def test_gpu_truth_events_equal_the_numpy_ones(tmp_path, cfg, head):
    """apply_truth_events_ on the CUDA backend against the numpy one, on the same output, dense
    delta, truths and plan: the deltas to 1e-4 of the largest, the statistics to 1e-4."""
    from engine.backends.cuda import CudaBackend

    layer, output, truth = cfg_head_case(tmp_path, cfg, head)
    cpu, gpu = NumpyBackend(), CudaBackend(device=0, seed=0)
    layer.output = output
    state = layer.device_cost(cpu, cpu.asarray(truth))
    loss, _, dense, _, _, truths = state
    plan = layer.plan_cost(cpu, truth, state).packed
    numbers = loss.numbers
    gpu_delta = gpu.asarray(dense)
    gpu_statistics = gpu.float64_values(gpu.apply_truth_events_(
        gpu_delta, gpu.asarray(output), gpu.asarray(truths), gpu.int_array(plan), numbers))
    statistics = cpu.float64_values(cpu.apply_truth_events_(dense, output, truths,
                                                            cpu.int_array(plan), numbers))
    gpu_delta = gpu.to_host(gpu_delta)
    assert np.abs(gpu_delta - dense).max() <= 1e-4 * np.abs(dense).max()
    np.testing.assert_allclose(gpu_statistics, statistics, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("head", [0, 1])
def test_gpu_truth_events_in_fp16(tmp_path, head):
    """yolov4-tiny's heads with the output and delta stored in fp16 (fp16 training): the CUDA
    apply_truth_events_ against the numpy one on the same fp16 values, the deltas to 4e-3 of
    the largest (the result is rounded to fp16: within 2^-11 of it), the statistics to 2e-3."""
    from engine.backends.cuda import CudaBackend

    layer, output, truth = cfg_head_case(tmp_path, "yolov4-tiny.cfg", head)
    output = output.astype(np.float16).astype(np.float32)
    cpu, gpu = NumpyBackend(), CudaBackend(device=0, seed=0, precision="fp16")
    layer.output = output
    state = layer.device_cost(cpu, cpu.asarray(truth))
    loss, _, dense, _, _, truths = state
    dense[...] = dense.astype(np.float16)
    plan = layer.plan_cost(cpu, truth, state).packed

    def stored(values):  # an fp16 device array, as the fp16 backend's activations are
        return gpu._as_type(gpu.asarray(values), gpu.dtype)
    gpu_delta = stored(dense)
    assert gpu_delta.dtype == np.float16
    gpu_statistics = gpu.float64_values(gpu.apply_truth_events_(
        gpu_delta, stored(output), gpu.asarray(truths), gpu.int_array(plan), loss.numbers))
    statistics = cpu.float64_values(cpu.apply_truth_events_(dense, output, truths,
                                                            cpu.int_array(plan), loss.numbers))
    gpu_delta = gpu.to_host(gpu_delta)
    assert np.abs(gpu_delta - dense).max() <= 4e-3 * np.abs(dense).max()
    np.testing.assert_allclose(gpu_statistics, statistics, rtol=2e-3)
