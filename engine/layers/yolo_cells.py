"""The host side of the [yolo] losses (engine.layers.yolo, engine.layers.alexeyab_yolo_loss):
the mini-batch's truth rows, the *events* Darknet's loops apply to single cells, and the cells
they touch, gathered from the backend, changed and scattered back.

An event is a truth learnt by one anchor of its cell (its best anchor, or one iou_thresh adds),
or a prediction past truth_thresh learning its best truth. Darknet applies an image's events
one after the other, and events on one cell and anchor interact (box deltas accumulate or
overwrite, the class delta reads what an earlier truth wrote). So each event gets its cell's
occurrence number (its *round*): no two events of a round share a cell, and applying rounds
0, 1, 2... each with numpy at once gives the sequential result. Rounds are few (1 to 3).
"""

import numpy as np


def truth_rows(ops, truths, max_boxes):
    """The truth as a host float32 array (B, T, 5) of rows (x, y, w, h, class), T <= max_boxes
    (Darknet's `max`: later rows are not read). `truths`: an array (B, rows*5) on the backend
    or the host (Darknet's net.truth), or one row list per image (zeros pad the shorter)."""
    if isinstance(truths, (list, tuple)):
        images = [np.asarray(rows, dtype=np.float32).reshape(-1, 5)[:max_boxes] for rows in truths]
        padded = np.zeros((len(images), max((len(rows) for rows in images), default=0), 5),
                          np.float32)
        for b, rows in enumerate(images):
            padded[b, :len(rows)] = rows
        return padded
    host = ops.to_host(truths)
    return np.ascontiguousarray(host.reshape(len(host), -1, 5)[:, :max_boxes])


class Events:
    """Events as parallel arrays: `image`, `row` (the truth's row in the truth rows), `anchor`
    (its index in the layer's anchors), `slot` (that anchor's place in the mask), cell `j`, `i`,
    and `past` (True: a prediction past truth_thresh)."""

    FIELDS = ("image", "row", "anchor", "slot", "j", "i", "past")

    def __init__(self, **fields):
        for name in self.FIELDS:
            setattr(self, name, np.asarray(fields[name]))

    def __len__(self):
        return len(self.image)

    def take(self, which):
        return Events(**{name: getattr(self, name)[which] for name in self.FIELDS})

    @classmethod
    def joined(cls, first, then):
        return cls(**{name: np.concatenate([getattr(first, name), getattr(then, name)])
                      for name in cls.FIELDS})


def truth_events(image, row, anchor, slot, j, i):
    """Events of truths learnt by anchors (past False)."""
    return Events(image=image, row=row, anchor=anchor, slot=slot, j=j, i=i,
                  past=np.zeros(len(image), bool))


def mask_slots(mask, total):
    """For each of the `total` anchors its first place in `mask`, -1 where the mask lacks it."""
    slots = np.full(total, -1, np.int64)
    for place, anchor in reversed(list(enumerate(mask))):
        slots[anchor] = place
    return slots


def past_truth_thresh(ops, best, index, truth_thresh, mask):
    """The events of the predictions whose best IoU (truth_overlap's best, without the class
    gate) is > truth_thresh, each learning its best truth (index): the branch no shipped cfg
    takes (truth_thresh = 1), so only then are best and index downloaded."""
    b, a, j, i = np.nonzero(ops.to_host(best) > truth_thresh)
    rows = ops.to_host(index)[b, a, j, i].astype(np.int64)
    return Events(image=b, row=rows, anchor=np.asarray(mask, np.int64)[a], slot=a, j=j, i=i,
                  past=np.ones(len(b), bool))


class CellRounds:
    """The cells (b, slot, j, i) that `events` (in Darknet's order) touch, each event's cell
    (`cell`, a row of `cells`) and its round."""

    def __init__(self, events, shape):
        keys = np.ravel_multi_index((events.image, events.slot, events.j, events.i), shape)
        unique, self.cell = np.unique(keys, return_inverse=True)
        self.cell = self.cell.reshape(-1)
        self.cells = np.column_stack(np.unravel_index(unique, shape)).astype(np.int32)
        # the round: how many earlier events share the event's cell
        order = np.argsort(self.cell, kind="stable")
        grouped = self.cell[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
        self.round = np.empty(len(keys), np.int64)
        self.round[order] = np.arange(len(keys)) - first

    @classmethod
    def of_sorted(cls, cells, cell, first):
        """The rounds of events listed cell by cell (a plan's, engine.backends.yolo_truths):
        `cells` (U, 4), each event's `cell`, each cell's `first` event."""
        rounds = cls.__new__(cls)
        rounds.cells, rounds.cell = cells, cell
        rounds.round = np.arange(len(cell)) - np.asarray(first, np.int64)[cell]
        return rounds

    def rounds(self):
        """The indexes of the events of each round, in order."""
        for r in range(int(self.round.max(initial=-1)) + 1):
            yield np.flatnonzero(self.round == r)
