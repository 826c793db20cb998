"""The [yolo] losses' operations (engine/backends/operations.py: truth_overlap, objectness_delta_,
gather_cells, scatter_cells_, sum_of_squares) on every backend, against plain Python loops
written from their declarations. Under the `gpu` marker the CUDA backend runs them too; its
truth_overlap computes in float32, so indexes are compared where the best truth wins by a
margin, and best to 1e-5."""

import math

import numpy as np
import pytest

TOLERANCE = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(77)


def darknet_iou(a, b):
    """AlexeyAB's box_iou in Python floats: 0 where the intersection or the union is 0."""
    def overlap(c1, s1, c2, s2):
        return min(c1 + s1 / 2, c2 + s2 / 2) - max(c1 - s1 / 2, c2 - s2 / 2)
    w, h = overlap(a[0], a[2], b[0], b[2]), overlap(a[1], a[3], b[1], b[3])
    inter = 0.0 if w < 0 or h < 0 else w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return 0.0 if inter == 0 or union == 0 else inter / union


def overlap_reference(output, truths, anchors, entries, net_w, net_h, new_coords, classes,
                      class_gate):
    """truth_overlap as declared, one prediction and one truth at a time: (best, index, the
    margin by which the best truth wins)."""
    batch, channels, height, width = output.shape
    count = channels // entries
    rows = truths.reshape(batch, -1, 5)
    best = np.zeros((batch, count, height, width))
    index = np.full(best.shape, -1)
    margin = np.full(best.shape, np.inf)
    for b, a, j, i in np.ndindex(best.shape):
        x, y, w, h = (float(output[b, a * entries + k, j, i]) for k in range(4))
        aw, ah = (float(v) for v in anchors[a])
        if new_coords:
            pw, ph = w * w * 4 * aw / net_w, h * h * 4 * ah / net_h
        else:
            pw, ph = math.exp(w) * aw / net_w, math.exp(h) * ah / net_h
        box = ((i + x) / width, (j + y) / height, pw, ph)
        ious = []
        for t, row in enumerate(rows[b]):
            if row[0] == 0:
                break
            if classes is not None and not 0 <= int(row[4]) < classes:
                continue
            ious.append((darknet_iou(box, [float(v) for v in row[:4]]), t))
        if not ious:
            continue
        top = max(iou for iou, _ in ious)
        index[b, a, j, i] = next(t for iou, t in ious if iou == top)
        others = [iou for iou, t in ious if t != index[b, a, j, i]]
        margin[b, a, j, i] = top - max(others, default=-np.inf)
        scores = output[b, a * entries + 5:(a + 1) * entries, j, i]
        best[b, a, j, i] = top if class_gate is None or (scores > class_gate).any() else 0.0
    return best, index, margin


def yolo_output(rng, batch, count, classes, height, width, new_coords):
    """A [yolo] output: x, y, objectness, classes in (0, 1), w and h raw (new_coords: (0, 1))."""
    entries = 5 + classes
    out = rng.normal(0, 0.7, (batch, count, entries, height, width))
    logistic = [0, 1, 4] + list(range(5, entries)) + ([2, 3] if new_coords else [])
    out[:, :, logistic] = 1 / (1 + np.exp(-out[:, :, logistic]))
    out[0, 0, 5:, 1, 1] = 0.1  # every class score below 0.25: AlexeyAB's gate shuts it
    return out.reshape(batch, count * entries, height, width).astype(np.float32)


def overlap_case(rng, new_coords):
    """Output (3 images, 2 anchors, 3 classes, 4x5 cells), truths and anchors: image 0 with
    truths on predictions, a duplicate (a tie: the first wins), rows of classes outside [0, 3)
    and a row after the x == 0 row; image 1 with none; image 2 with random boxes."""
    batch, count, classes, height, width = 3, 2, 3, 4, 5
    net_w, net_h = 80, 64
    anchors = np.array([[12, 10], [30, 26]], np.float32)
    output = yolo_output(rng, batch, count, classes, height, width, new_coords)
    grid = output.reshape(batch, count, 5 + classes, height, width)
    truths = np.zeros((batch, 7, 5), np.float32)

    def on_prediction(b, a, j, i, stretch):
        x, y, w, h = (float(v) for v in grid[b, a, :4, j, i])
        sw, sh = (w * w * 4, h * h * 4) if new_coords else (math.exp(w), math.exp(h))
        return [(i + x) / width, (j + y) / height, sw * anchors[a, 0] / net_w * stretch,
                sh * anchors[a, 1] / net_h * stretch, 1]

    first = on_prediction(0, 1, 2, 3, 1.1)
    truths[0, :6] = [first, [0.3, 0.4, 0.2, 0.3, 3], on_prediction(0, 0, 1, 1, 0.9), first,
                     [0.6, 0.5, 0.5, 0.4, -1], [0.7, 0.2, 0.3, 0.3, 2]]
    truths[0, 4, 0] = 0  # ends the list: the row after it is not read
    truths[0, 5] = [0.2, 0.2, 0.9, 0.9, 0]
    truths[2, :4] = np.column_stack([rng.uniform(0.1, 0.9, (4, 2)), rng.uniform(0.1, 0.5, (4, 2)),
                                     rng.integers(0, classes, (4, 1))])
    return output, truths.reshape(batch, -1), anchors, 5 + classes, net_w, net_h


@pytest.mark.parametrize("new_coords", [False, True])
@pytest.mark.parametrize("classes, class_gate", [(None, None), (3, 0.25), (3, None)])
def test_truth_overlap(ops, rng, new_coords, classes, class_gate):
    output, truths, anchors, entries, net_w, net_h = overlap_case(rng, new_coords)
    best, index = ops.truth_overlap(ops.asarray(output), ops.asarray(truths), anchors, entries,
                                    net_w, net_h, new_coords, classes, class_gate)
    expected, expected_index, margin = overlap_reference(
        output, truths, anchors, entries, net_w, net_h, new_coords, classes, class_gate)
    best, index = np.asarray(ops.to_host(best), np.float64), np.asarray(ops.to_host(index))
    assert best.shape == index.shape == expected.shape
    np.testing.assert_allclose(best, expected, rtol=TOLERANCE, atol=1e-7)
    clear = margin > 1e-4
    np.testing.assert_array_equal(index[clear], expected_index[clear])
    # image 0: predictions past 0.5, and its row 3 (row 0 again) never wins: the first on ties
    assert (expected[0] > 0.5).any() and (expected_index[0] == 0).any()
    assert not (expected_index[0] == 3).any() and not (index[0] == 3).any()
    if classes is not None:  # rows of classes 3 and -1 skipped, and the list goes on after them
        assert not (expected_index[0] == 1).any() and (expected_index[0] == 2).any()
    assert (index[1] == -1).all() and (best[1] == 0).all()  # an image without truths
    if class_gate is not None:
        assert expected[0, 0, 1, 1] == 0 and index[0, 0, 1, 1] >= 0  # gated: best 0, index kept


@pytest.mark.parametrize("smooth", [False, True])
def test_objectness_delta(ops, rng, smooth):
    entries, count = 7, 3
    output = rng.uniform(0, 1, (2, count * entries, 3, 4)).astype(np.float32)
    delta = rng.normal(0, 1, output.shape).astype(np.float32)
    best = rng.uniform(0, 1, (2, count, 3, 4)).astype(np.float32)
    changed = ops.to_host(ops.objectness_delta_(ops.asarray(delta.copy()), ops.asarray(output),
                                                ops.asarray(best), entries, 0.5, 0.6, smooth))
    expected = delta.astype(np.float64)
    for b, a, j, i in np.ndindex(best.shape):
        o = float(output[b, a * entries + 4, j, i])
        d = 0.5 * (0 - o)
        if best[b, a, j, i] > 0.6:
            d = max(d, 0.5 * (float(best[b, a, j, i]) - o)) if smooth else 0.0
        expected[b, a * entries + 4, j, i] = d
    np.testing.assert_allclose(changed, expected, rtol=TOLERANCE, atol=1e-7)


def test_gather_and_scatter_cells(ops, rng):
    entries = 6
    x = rng.normal(0, 1, (3, 2 * entries, 4, 5)).astype(np.float32)
    cells = np.array([[0, 1, 3, 4], [2, 0, 0, 0], [1, 1, 2, 1], [2, 1, 3, 0]])
    gathered = ops.gather_cells(ops.asarray(x), cells, entries)
    expected = np.array([[x[b, a * entries + e, j, i] for e in range(entries)]
                         for b, a, j, i in cells])
    assert isinstance(gathered, np.ndarray) and gathered.dtype == np.float32
    np.testing.assert_array_equal(gathered, expected)
    values = rng.normal(0, 1, (len(cells), entries)).astype(np.float32)
    target = ops.asarray(x.copy())
    assert ops.scatter_cells_(target, cells, values) is target
    scattered = x.copy()
    for (b, a, j, i), row in zip(cells, values):
        for e in range(entries):
            scattered[b, a * entries + e, j, i] = row[e]
    np.testing.assert_array_equal(ops.to_host(target), scattered)
    empty = ops.gather_cells(ops.asarray(x), np.zeros((0, 4), np.int64), entries)
    assert empty.shape == (0, entries)
    ops.scatter_cells_(target, np.zeros((0, 4), np.int64), np.zeros((0, entries), np.float32))
    np.testing.assert_array_equal(ops.to_host(target), scattered)


def test_sum_of_squares(ops, rng):
    x = rng.normal(0, 3, (4, 9, 13, 11)).astype(np.float32)
    total = ops.sum_of_squares(ops.asarray(x))
    assert isinstance(total, float)
    assert total == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=TOLERANCE)


# ---- apply_truth_events_, int_array, float64_values ---------------------------------------------
def giou_reference(a, b):
    """AlexeyAB's box_giou in Python floats."""
    def span(c1, s1, c2, s2):
        return max(c1 + s1 / 2, c2 + s2 / 2) - min(c1 - s1 / 2, c2 - s2 / 2)
    ow = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    oh = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = 0.0 if ow < 0 or oh < 0 else ow * oh
    c = span(a[0], a[2], b[0], b[2]) * span(a[1], a[3], b[1], b[3])
    iou = darknet_iou(a, b)
    return iou if c == 0 else iou - (c - (a[2] * a[3] + b[2] * b[3] - inter)) / c


def truth_events_reference(output, delta, truths, cell_events, kind, anchors, net_w, net_h,
                           average):
    """apply_truth_events_ as declared, cell by cell and event by event in Python floats (the
    delta row kept in float32), for pjreddie's loss or AlexeyAB's with its defaults (mse,
    iou_normalizer 0.75, obj_normalizer 1, no class multipliers or smoothing) and with
    averages_yolo_deltas when `average`: (delta, statistics)."""
    f32 = np.float32
    _, channels, height, width = output.shape
    entries = len(anchors) and channels // len(anchors)
    classes = entries - 5
    delta = delta.copy()
    rows = truths.reshape(len(truths), -1, 5)
    box_squares = iou_losses = giou_losses = events = 0.0
    for (b, a, j, i), event_rows in cell_events:
        o = [float(output[b, a * entries + e, j, i]) for e in range(entries)]
        d = [f32(delta[b, a * entries + e, j, i]) for e in range(entries)]
        aw, ah = (float(v) for v in anchors[a])
        for row in event_rows:
            tx, ty, tw, th = (float(v) for v in rows[b, row, :4])
            cls = int(rows[b, row, 4])
            scale = 2 - tw * th
            events += 1
            if kind == "pjreddie":
                target = [tx * width - i, ty * height - j,
                          float(np.log(f32(tw * net_w) / f32(aw))),
                          float(np.log(f32(th * net_h) / f32(ah)))]
                d[:4] = [f32(scale * (target[k] - o[k])) for k in range(4)]
                d[4] = f32(f32(1) - f32(o[4]))
                if d[5] == 0:
                    d[5:] = [f32(-v) for v in o[5:]]
                d[5 + cls] = f32(f32(1) - f32(o[5 + cls]))
                continue
            pw = float(f32(f32(math.exp(o[2])) * f32(aw)) / f32(net_w))
            ph = float(f32(f32(math.exp(o[3])) * f32(ah)) / f32(net_h))
            pred = ((i + o[0]) / width, (j + o[1]) / height, pw, ph)
            iou_losses += 1 - darknet_iou(pred, (tx, ty, tw, th))
            giou_losses += 1 - giou_reference(pred, (tx, ty, tw, th))
            wanted = [tx * width - i, ty * height - j, math.log(tw * net_w / aw),
                      math.log(th * net_h / ah)]
            d[:4] = [f32(d[k] + scale * (wanted[k] - o[k]) * 0.75) for k in range(4)]
            d[4] = f32(1.0 * (1 - o[4]))
            if d[5 + cls] != 0:
                d[5 + cls] = f32(1 - o[5 + cls])
            else:
                d[5:] = [f32((k == cls) - o[5 + k]) for k in range(classes)]
        if kind != "pjreddie" and average:
            marked = sum(v > 0 for v in d[5:])
            if d[4] != 0 and marked:
                d[:4] = [f32(v / marked) for v in d[:4]]
        box_squares += sum(float(v) ** 2 for v in d[:4])
        for e in range(entries):
            delta[b, a * entries + e, j, i] = d[e]
    squares = float((delta.astype(np.float64) ** 2).sum())
    return delta, [squares, box_squares, iou_losses, giou_losses, events]


def packed_plan(cell_events, shape, capacity):
    """The plan of engine/backends/yolo_truths.py's layout, written out from its description:
    cells ascending, each with its events' truth rows."""
    plan = np.zeros(3 * capacity + 3, np.int64)
    cell_events = sorted(cell_events, key=lambda item: np.ravel_multi_index(item[0], shape))
    rows = [row for _, event_rows in cell_events for row in event_rows]
    plan[0], plan[1] = len(cell_events), len(rows)
    first = 0
    for u, (cell, event_rows) in enumerate(cell_events):
        plan[2 + u] = np.ravel_multi_index(cell, shape)
        plan[2 + capacity + u] = first
        first += len(event_rows)
    plan[2 + capacity + len(cell_events)] = first
    plan[3 + 2 * capacity:3 + 2 * capacity + len(rows)] = rows
    return plan


@pytest.mark.parametrize("kind, average", [("pjreddie", False), ("alexeyab", False),
                                           ("alexeyab", True)])
def test_apply_truth_events(ops, rng, kind, average):
    """Three events on one cell (a box delta accumulating or overwritten, the class rule for a
    cell that has one), two on another, one alone; a cell of an image with truths left
    untouched; the statistics; the plan refreshed in place with set_ (a recording's buffer)."""
    from engine.backends.yolo_truths import TruthLoss

    batch, count, classes, height, width = 2, 2, 3, 3, 4
    net_w, net_h = 64, 48
    anchors = np.array([[10, 14], [23, 27]], np.float32)
    output = yolo_output(rng, batch, count, classes, height, width, False)
    delta = np.zeros(output.shape, np.float32)
    delta[:, 4::5 + classes] = -output[:, 4::5 + classes]  # the objectness push
    truths = np.zeros((batch, 4, 5), np.float32)
    truths[0] = [[0.9, 0.8, 0.3, 0.5, 1], [0.92, 0.79, 0.35, 0.4, 2], [0.4, 0.4, 0.2, 0.2, 0],
                 [0.91, 0.81, 0.3, 0.5, 1]]
    truths[1, :2] = [[0.1, 0.1, 0.15, 0.2, 2], [0.6, 0.5, 0.5, 0.6, 0]]
    cell_events = [((0, 1, 2, 3), [0, 1, 3]), ((1, 0, 0, 0), [0]), ((0, 0, 1, 1), [2, 2])]
    shape, capacity = (batch, count, height, width), batch * 4 * count
    loss = TruthLoss(kind, anchors, classes, net_w, net_h, False,
                     iou_thresh=0.5 if average else 1.0)
    expected, expected_statistics = truth_events_reference(
        output, delta, truths, cell_events, kind, anchors, net_w, net_h, average)
    plan = ops.int_array(np.zeros(3 * capacity + 3, np.int32))
    ops.set_(plan, packed_plan(cell_events, shape, capacity))
    changed = ops.asarray(delta)
    statistics = ops.float64_values(ops.apply_truth_events_(
        changed, ops.asarray(output), ops.asarray(truths.reshape(batch, -1)), plan, loss))
    changed = ops.to_host(changed)
    np.testing.assert_allclose(changed, expected, rtol=TOLERANCE, atol=1e-6)
    np.testing.assert_allclose(statistics, expected_statistics, rtol=TOLERANCE, atol=1e-9)
    assert statistics.dtype == np.float64 and statistics[4] == 6
    untouched = np.ones(delta.shape, bool)
    for (b, a, j, i), _ in cell_events:
        untouched[b, a * (5 + classes):(a + 1) * (5 + classes), j, i] = False
    np.testing.assert_array_equal(changed[untouched], delta[untouched])
    # an empty plan: the delta as it was, its sum of squares
    ops.set_(plan, packed_plan([], shape, capacity))
    again = ops.asarray(delta)
    statistics = ops.float64_values(ops.apply_truth_events_(
        again, ops.asarray(output), ops.asarray(truths.reshape(batch, -1)), plan, loss))
    np.testing.assert_array_equal(ops.to_host(again), delta)
    assert list(statistics[1:]) == [0, 0, 0, 0]
    assert statistics[0] == pytest.approx(float((delta.astype(np.float64) ** 2).sum()), rel=1e-6)


def test_host_reader(ops):
    """A reader of apply_truth_events_'s statistics (an empty plan: the delta's squares alone)
    gives what float64_values gives, in float64."""
    from engine.backends.yolo_truths import TruthLoss

    statistics = ops.apply_truth_events_(
        ops.asarray(np.full((1, 6, 1, 1), 0.5, np.float32)), ops.zeros((1, 6, 1, 1)),
        ops.asarray(np.zeros((1, 5), np.float32)), ops.int_array(np.zeros(6, np.int32)),
        TruthLoss("pjreddie", [[1, 1]], 1, 8, 8, False))
    values = ops.host_reader(statistics).values()
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, ops.float64_values(statistics))
    np.testing.assert_array_equal(values, [6 * 0.25, 0, 0, 0, 0])


def test_output_reader(ops):
    """A forward's outputs read as predict reads them: float32 host copies, and whether every
    value is finite."""
    a = np.arange(24, dtype=np.float32).reshape(1, 6, 2, 2) / 7
    b = -np.arange(96, dtype=np.float32).reshape(1, 6, 4, 4)
    outputs, finite = ops.output_reader([ops.asarray(a), ops.asarray(b)]).values()
    assert finite and [y.dtype for y in outputs] == [np.float32] * 2
    np.testing.assert_array_equal(outputs[0], a)
    np.testing.assert_array_equal(outputs[1], b)
    b[0, 3, 1, 2] = np.nan
    _, finite = ops.output_reader([ops.asarray(a), ops.asarray(b)]).values()
    assert not finite
