"""Shared memory through which data-loading workers hand batches to the trainer.

A worker process writes the images it decodes and augments straight into a shared-memory block
that holds its batch; only the small parts (boxes) come back through the pipe, and the trainer
copies the block into its page-locked batch. Pickled through the pipe, a batch of 64 float32
images at 416x416 (126 MB) took 75 ms to pickle in the workers and 85 ms to unpickle in the
trainer (250-310 ms of the trainer's CPU time in all on the 2-core machine, against 12-15 ms
for the copy from shared memory): the trainer alone capped the loader whatever its workers.

The trainer keeps one block per batch in flight (BatchBlocks), reused batch after batch, and
unlinks them all when its loader stops (normal end, error, Ctrl-C); if the trainer is killed,
multiprocessing's resource tracker, a process of its own, unlinks them. Workers attach to a
block by name (worker_array) and keep the few latest attached.
"""

import os
from collections import OrderedDict
from multiprocessing import shared_memory

import numpy as np

SHM_FOLDER = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs)


def shm_room():
    """Bytes free for shared memory, or None where the system does not show it (no /dev/shm)."""
    try:
        stats = os.statvfs(SHM_FOLDER)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


class BatchBlocks:
    """`count` shared-memory blocks, one per batch in flight, each reused for later batches and
    replaced by a larger one when a batch needs more (multi-scale sizes, mixup's doubled
    batches). take() gives None when /dev/shm lacks the room (Docker gives a container 64 MB
    unless run with --shm-size), since a worker writing past a full tmpfs would die of SIGBUS,
    or when the system refuses a block: that batch then crosses through the pipe as before."""

    def __init__(self, count):
        self.idle = [None] * count  # blocks not holding a batch (None: none made for that slot)
        self.live = []  # every block made and not yet unlinked

    def take(self, nbytes):
        block = self.idle.pop()
        if block is not None and block.size >= nbytes:
            return block
        if block is not None:
            self._unlink(block)
        # Blocks are filled lazily (tmpfs counts a page when it is first written), so the room
        # must cover the live blocks' sizes as well as this one.
        room = shm_room()
        if room is not None and room < nbytes + sum(b.size for b in self.live):
            self.idle.append(None)
            return None
        try:
            block = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        except OSError:  # no /dev/shm, too many open files...: the pipe will do
            self.idle.append(None)
            return None
        self.live.append(block)
        return block

    def give_back(self, block):
        """The block (or None) that take() gave, once its batch has been copied out."""
        self.idle.append(block)

    def names(self):
        return [block.name for block in self.live]

    def close(self):
        for block in list(self.live):
            self._unlink(block)
        self.idle = [None] * len(self.idle)

    def _unlink(self, block):
        self.live.remove(block)
        try:
            block.unlink()
        except FileNotFoundError:  # already gone (the resource tracker, or another path)
            pass
        try:
            block.close()
        except BufferError:  # an array onto it still lives (an exception's traceback): the
            pass             # mapping goes with the last reference instead


def trainer_array(block, shape):
    """The first prod(shape) float32 values of a block taken from BatchBlocks, as an array
    (a view: copy it before the block is given back)."""
    return np.ndarray(shape, np.float32, buffer=block.buf)


_attached = OrderedDict()  # in a worker: name -> SharedMemory, the latest attached last
ATTACHED_KEPT = 4  # more than the blocks in flight (2), so that a worker maps each once


def worker_array(name, first, shape):
    """In a worker process: an array of `shape` (count, ...) onto the block `name`, at item
    `first` of the float32 batch of such items that the block holds, to write into."""
    block = _attached.pop(name, None)
    if block is None:
        block = shared_memory.SharedMemory(name=name)
    _attached[name] = block
    while len(_attached) > ATTACHED_KEPT:
        _, old = _attached.popitem(last=False)
        try:
            old.close()
        except BufferError:
            pass
    item_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4
    return np.ndarray(shape, np.float32, buffer=block.buf, offset=first * item_bytes)
