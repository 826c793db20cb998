"""Batches through shared memory (engine/shared_batches.py, engine.augmentation.prefetched's
block_bytes): the blocks are reused and grown as batches need, workers write where the trainer
reads, pool batches equal the trainer's own, and no block outlives the loader, whether it ends
normally, on an error, on Ctrl-C or when a worker dies; without room in /dev/shm the batches
cross through the pipe as before."""

import os

import numpy as np
import pytest

from engine import shared_batches
from engine.augmentation import DetectionAugmentation, prefetched
from engine.data import DataConfig
from engine.errors import DataError
from engine.network import Network
from engine.shared_batches import BatchBlocks, trainer_array, worker_array
from engine.train import BatchSampler

from test_augmentation import _cfg, first_batches


def exists(name):
    return os.path.exists(os.path.join(shared_batches.SHM_FOLDER, name.lstrip("/")))


@pytest.fixture
def made_blocks(monkeypatch):
    """The names of every block prefetched makes, in order."""
    names = []

    class Recording(BatchBlocks):
        def take(self, nbytes):
            block = super().take(nbytes)
            if block is not None and block.name not in names:
                names.append(block.name)
            return block

    monkeypatch.setattr(shared_batches, "BatchBlocks", Recording)
    return names


def test_blocks_reused_grown_and_unlinked():
    blocks = BatchBlocks(2)
    a, b = blocks.take(1000), blocks.take(1000)
    assert a.name != b.name and a.size >= 1000 and set(blocks.names()) == {a.name, b.name}
    blocks.give_back(a)
    assert blocks.take(600) is a  # big enough: the same block again
    blocks.give_back(a)
    c = blocks.take(5000)  # too small: replaced by a larger one, the old one unlinked
    assert c.size >= 5000 and not exists(a.name) and exists(c.name)
    blocks.give_back(b)
    blocks.give_back(c)
    blocks.close()
    assert not any(exists(block.name) for block in (a, b, c)) and blocks.names() == []


def test_no_block_without_room(monkeypatch):
    """The room asked covers the blocks already made (tmpfs counts their pages only once
    written); without it, take gives None and the slot stays usable."""
    monkeypatch.setattr(shared_batches, "shm_room", lambda: 2500)
    blocks = BatchBlocks(2)
    first = blocks.take(1000)
    assert first is not None and blocks.take(2000) is None
    blocks.give_back(None)
    assert blocks.take(1000) is not None
    blocks.close()
    assert not exists(first.name)


def test_no_block_when_the_system_refuses_one(monkeypatch):
    def refuse(**_):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(shared_batches.shared_memory, "SharedMemory", refuse)
    blocks = BatchBlocks(1)
    assert blocks.take(1000) is None
    blocks.give_back(None)
    assert blocks.take(1000) is None and blocks.names() == []


def test_worker_writes_where_the_trainer_reads():
    blocks = BatchBlocks(1)
    block = blocks.take(5 * 3 * 4 * 4)
    images = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    worker_array(block.name, 2, (3, 3, 4))[:] = images[2:]
    worker_array(block.name, 0, (2, 3, 4))[:] = images[:2]
    np.testing.assert_array_equal(trainer_array(block, (5, 3, 4)), images)
    shared_batches._attached.pop(block.name).close()
    blocks.close()


def _augmented(scenes_data, tmp_path, seed=3):
    net = Network(_cfg(tmp_path), quiet=True)
    dataset = DataConfig(scenes_data).detection_dataset("train", net.input_shape, 90)
    dataset.augment(DetectionAugmentation(jitter=0.2, flip=True, hue=0.1, exposure=1.5,
                                          mixup=True), seed)
    return dataset


def test_pool_batches_through_shared_memory_equal_in_process(scenes, tmp_path, made_blocks):
    """Mixup doubles some batches, so the blocks grow; every block made is gone once the
    loader is closed (as engine train closes it)."""
    dataset = _augmented(scenes, tmp_path)
    inline = first_batches(dataset, BatchSampler(len(dataset), 4, np.random.default_rng(0)), 5, 0)
    dataset = _augmented(scenes, tmp_path)
    pooled = first_batches(dataset, BatchSampler(len(dataset), 4, np.random.default_rng(0)), 5, 3)
    for (a, ta), (b, tb) in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
    assert len(made_blocks) >= 2 and not any(exists(name) for name in made_blocks)


def test_plain_batches_through_shared_memory_and_without_room(scenes, tmp_path, made_blocks,
                                                             monkeypatch):
    net = Network(_cfg(tmp_path), quiet=True)
    dataset = DataConfig(scenes).detection_dataset("train", net.input_shape, 90)

    def first(workers):
        return first_batches(dataset, BatchSampler(len(dataset), 5, np.random.default_rng(0)), 3,
                             workers)

    inline, pooled = first(0), first(2)
    assert made_blocks and not any(exists(name) for name in made_blocks)
    monkeypatch.setattr(shared_batches, "shm_room", lambda: 0)  # a full /dev/shm: the pipe
    made_blocks.clear()
    piped = first(2)
    assert not made_blocks
    for (a, ta), (b, tb), (c, tc) in zip(inline, pooled, piped):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(ta, tb)


class InterruptingSampler(BatchSampler):
    """Ctrl-C while the loader asks for its third batch's indexes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def next(self):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return super().next()


def test_blocks_unlinked_on_ctrl_c_and_on_an_error(scenes, tmp_path, made_blocks):
    dataset = _augmented(scenes, tmp_path)
    batches = dataset.batches(InterruptingSampler(len(dataset), 4, np.random.default_rng(0)),
                              workers=2)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(3):
            next(batches)
    assert made_blocks and not any(exists(name) for name in made_blocks)
    made_blocks.clear()
    dataset.paths[1] = str(tmp_path / "missing.png")  # a worker fails on this image
    batches = dataset.batches(BatchSampler(len(dataset), len(dataset), np.random.default_rng(0)),
                              workers=2)
    with pytest.raises(DataError, match="missing.png: image file not found"):
        next(batches)
    assert made_blocks and not any(exists(name) for name in made_blocks)


def die_on_the_third_job(part):
    """A worker entry point that kills its process (as the out-of-memory killer would)."""
    name, first, job = part
    if job == 2:
        os._exit(9)
    worker_array(name, first, (1, 2))[:] = job
    return job


def test_blocks_unlinked_when_a_worker_dies(made_blocks):
    jobs = iter(range(10))
    batches = prefetched(lambda: (next(jobs), None), die_on_the_third_job,
                         lambda values, plan, block: trainer_array(block, (1, 2)).copy(),
                         workers=2, split=lambda job, n, name: [(name, 0, job)], join=list,
                         block_bytes=lambda job: 8)
    # the third job is submitted once the first batch is out: the pool breaks after that one,
    # before the third batch (the second job may be lost with the third's worker)
    np.testing.assert_array_equal(next(batches), [[0, 0]])
    with pytest.raises(DataError, match="worker process stopped unexpectedly"):
        np.testing.assert_array_equal(next(batches), [[1, 1]])
        next(batches)
    assert made_blocks and not any(exists(name) for name in made_blocks)
