"""The CPU backend: every operation the layers use, on float32 numpy arrays in NCHW layout.

This module is also the reference the CUDA backend is tested against, so it favours plain,
vectorised numpy: convolution is im2col (a copy per kernel offset, never per pixel) followed by
a BLAS matrix product over the whole batch, a few output rows at a time. At inference, 3x3
stride-1 convolutions take Winograd's algorithm instead (winograd.py; within 1.4e-5 of the direct
sum relative to the layer's largest output), the fastest path numpy's BLAS offers for them.

Layout: arrays are (B, C, H, W) to the layers, but convolution and the ops after it store them
batch-innermost in memory, as a (C, H, W, B) array seen through transpose(3, 0, 1, 2). That is
the layout the im2col product writes and reads (columns are (C*k*k, H*W*B)), so no transpose copy
is needed between them; numpy's elementwise ops keep it (order='K'); and every spatial window
view (im2col's shifts, pooling's 2x2 cells) has the whole batch as its contiguous inner loop.
At inference (train=False) convolutions store their outputs channels innermost instead, as an
(H, W, B, C) array seen through transpose(2, 3, 0, 1): the order Winograd's output tiles come
in and its input transform (and channels-innermost im2col, (positions, k*k*C) @ (k*k*C, F))
read, so that a network of them makes no transposing copy (_conv_channels_last); pooling, bias,
activation, routes and upsampling keep the layout they are given (empty/copy follow `like`).
Elementwise work runs over blocks of channels (_channel_blocks), or of rows where channels are
innermost, so that an op's several passes and temporaries stay in the CPU cache.

Sign convention (Darknet's): a "delta" is the negative gradient of the loss. Backward operations
*accumulate* parameter gradients into the `*_updates` arrays they are given (Darknet's beta=1),
and only `sgd_update` changes parameters.
"""

import contextlib
import functools
import itertools
import os
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import activations, memory
from ..batchnorm_rule import inference_affine
from ..boxes import (box_edges, edges_iou_or_zero, image_chunks, listed_truths, padded_truths,
                     prediction_boxes)
from ..constants import BN_MOMENTUM, BN_TRAINING_EPSILON, CROSS_ENTROPY_FLOOR, PJREDDIE_BN_EPSILONS
from ..errors import BackendError
from . import views, winograd
from .operations import Operations, OutputsNow, ReadyRead

FLOAT32_MAX = np.finfo(np.float32).max  # Darknet's FLT_MAX: maxpool's value outside the input


# The backend's own threads (default 1): with ENGINE_CPU_THREADS=N, convolutions and the bias and
# activation pass run their blocks on N threads, each calling BLAS, which should then be
# single-threaded (OPENBLAS_NUM_THREADS=1): OpenBLAS's own threads spin while they wait and lose
# badly on a loaded machine (README, "CPU inference speed").
THREADS_VARIABLE = "ENGINE_CPU_THREADS"
# The interpreter's switch interval (sys.setswitchinterval, seconds) while the backend's threads
# share an operation (_fork_join), where it is longer (Python's default: 5 ms): a thread waiting
# for the GIL then asks for it after this long instead of 5 ms. Between numpy calls each thread
# takes the GIL for a few microseconds; fewer of those waits end in a sleep and a late wake-up
# (two threads, one layer: 13 -> 3 context switches for 32 -> 32 channels at 104x104, 2.47 ->
# 2.33 ms for 64 -> 64; networks 1-3% faster; README, "Tenth round"). Restored after.
SWITCH_INTERVAL = 2e-4

COLUMN_BLOCK_ELEMENTS = 1 << 18  # im2col columns per block of output rows (1 MiB of float32)
MIN_BLOCK_COLUMNS = 512  # output positions per block at least (small maps: one or two blocks)
PARALLEL_ELEMENTS = 1 << 20  # a memory pass over fewer elements stays on one thread (_run)
POOL_PARALLEL_ELEMENTS = 1 << 21  # the same for inference maxpool (input elements)
BLOCK_ELEMENTS = 1 << 17  # elements per channel block of the elementwise ops (512 KiB of float32)
# activations f with max(f(a), f(b)) == f(max(a, b)) bit for bit (non-decreasing, computed
# elementwise): a maxpool may be taken before them
MONOTONE_ACTIVATIONS = ("linear", "leaky", "relu")


@functools.lru_cache(maxsize=4096)
def _window_slices(view):
    """(numpy slices of a View's window, whether a step of 0 repeats an index); a repeated
    index is sliced once, to be broadcast."""
    slices, repeats = [], False
    for start, count, step in view.window:
        if step == 0:
            slices.append(slice(start, start + 1))
            repeats = True
        else:
            stop = start + (count - 1) * step + (1 if step > 0 else -1)
            slices.append(slice(start, stop if stop >= 0 else None, step))
    return tuple(slices), repeats


def _activation_(name):
    """An in-place elementwise activation as a function of a block, or None for linear."""
    if name == "linear":
        return None
    return lambda block: activations.activate_(block, name)


def _activation_into(name):
    """out = act(x) as a function of (x, out), storing and activating in one pass; None for
    linear (a plain copy)."""
    if name == "linear":
        return None
    return lambda x, out: activations.activate_into(x, out, name)


def _store_pooled_rows(block, rows, out_w, b, store, pooled):
    """block: output rows [row0, row1) (an even count from an even row0) of a convolution,
    ((row1 - row0) * out_w * B, F), biases added; its 2x2/2 maxima over row pairs, then
    column pairs, stored by store(src, dst) (through the activation, which commutes with max)
    into pooled's rows [row0/2, row1/2) (pooled (H/2, W/2, B, F))."""
    fs = block.shape[1]
    pairs = block.reshape((rows[1] - rows[0]) // 2, 2, out_w // 2, 2, b * fs)
    row_max = np.maximum(pairs[:, 0], pairs[:, 1])
    maxima = np.maximum(row_max[:, :, 0], row_max[:, :, 1])
    store(maxima.reshape(maxima.shape[:2] + (b, fs)), pooled[rows[0] // 2:rows[1] // 2])


def _pair(stride):
    """(vertical, horizontal) stride from one int or AlexeyAB's (stride_y, stride_x)."""
    return (stride, stride) if isinstance(stride, (int, np.integer)) else tuple(stride)


class _Helper:
    """A helper thread of the CPU backend, handed one call at a time: start(call) releases
    its `go` lock, join() waits on its `done` lock and returns the call's error (or None). A
    daemon thread that holds no reference to the backend; stop_all (the backend's finalizer)
    ends it."""

    def __init__(self):
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.call = self.error = None
        threading.Thread(target=self._serve, name="engine-cpu-helper", daemon=True).start()

    def _serve(self):
        while True:
            self.go.acquire()
            call, self.call = self.call, None
            if call is None:
                return
            try:
                call()
            except BaseException as error:  # (handed to the joining thread, raised there)
                self.error = error
            self.done.release()

    def start(self, call):
        self.call = call
        self.go.release()

    def join(self):
        self.done.acquire()
        error, self.error = self.error, None
        return error

    @staticmethod
    def stop_all(helpers):
        for helper in helpers:
            helper.call = None
            helper.go.release()


class NumpyBackend(Operations):
    name = "cpu"
    device_name = "CPU"
    computes_into_concatenations = True

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        # (id(frozen weights), kind) -> (weakref to them, filters derived from them: Winograd's,
        # or the columns' matrix; _derived_filters)
        self._winograd_cache = {}
        value = os.environ.get(THREADS_VARIABLE, "1")
        try:
            self.threads = int(value)
        except ValueError:
            self.threads = 0
        if self.threads < 1:
            raise BackendError(f"{THREADS_VARIABLE}={value}: expected a whole number of threads "
                               "(1 or more)")
        # the calling thread works too (_run), so the pool holds the other threads - 1
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        # the same number of helpers handed work through two locks each (_fork_join), stopped
        # with the backend; the pool serves a fork-join that finds them busy
        self._helpers = [_Helper() for _ in range(self.threads - 1)]
        self._helpers_free = threading.Lock()
        weakref.finalize(self, _Helper.stop_all, self._helpers)

    def _run(self, tasks, elements=None, minimum=None):
        """Call each task (independent pieces of one operation): on the backend's threads when
        it has several, else one after the other; also one after the other for a memory pass
        over fewer `elements` than `minimum` (default PARALLEL_ELEMENTS), where handing tasks
        to threads costs more than it saves."""
        if self._pool is None or len(tasks) < 2 or (
                elements is not None and elements < (minimum or PARALLEL_ELEMENTS)):
            for task in tasks:
                task()
            return
        # The caller and the pool's threads take the tasks from one iterator (its next() is
        # atomic under the GIL) until none is left: one wake-up per helper thread and operation
        # (costly on a virtual machine: 50-100 us for an idle CPU), not one per task.
        remaining = iter(tasks)

        def work():
            for task in remaining:
                task()
        self._fork_join(work, [work] * (self.threads - 1))

    def _fork_join(self, own, helpers):
        """own() on the calling thread while each of `helpers` runs on a helper thread;
        returns when all are done (an error raised: the calling thread's, else the first
        helper's). The backend's _Helper threads take them (a lock released and acquired each:
        20 us less per hand-off than the pool's futures); a fork-join that finds them busy
        (another thread's, on the same backend, or a task's own) or more calls than helpers
        uses the pool. Meanwhile the switch interval is at most SWITCH_INTERVAL (set back after,
        by the call that changed it only)."""
        saved = sys.getswitchinterval()
        shortened = saved > SWITCH_INTERVAL
        if shortened:
            sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            if (len(helpers) > len(self._helpers)
                    or not self._helpers_free.acquire(blocking=False)):
                futures = [self._pool.submit(helper) for helper in helpers]
                try:
                    own()
                finally:
                    for future in futures:
                        future.result()
                return
            try:
                started = []
                try:
                    for helper, call in zip(self._helpers, helpers):
                        helper.start(call)
                        started.append(helper)
                    own()
                finally:
                    errors = [helper.join() for helper in started]
                for error in errors:
                    if error is not None:
                        raise error
            finally:
                self._helpers_free.release()
        finally:
            if shortened:
                sys.setswitchinterval(saved)

    def seed(self, seed):
        self.rng = np.random.default_rng(seed)

    # ---- memory -------------------------------------------------------------------------------
    def available_memory(self):
        """Bytes this backend can still allocate (checked before a network runs)."""
        return memory.host_available()

    def asarray(self, host):
        return np.ascontiguousarray(host, dtype=np.float32)

    def host_empty(self, shape):
        return np.empty(shape, np.float32)

    def to_host(self, array):
        return np.asarray(array, dtype=np.float32)

    def collectives(self, comm):
        """How this backend's arrays are summed over the ranks of the MPI communicator `comm`
        (data-parallel training): an object whose allreduce_sum_(array) sums a contiguous
        float32 array over the ranks, in place. Host arrays: MPI's own Allreduce."""
        from .collectives import MpiAllreduce

        return MpiAllreduce(comm)

    def set_(self, dst, host, early=False):
        """Copy host data into an existing array (a fixed buffer that a recording reads); there
        is nothing to overlap here, so `early` changes nothing."""
        dst[...] = np.asarray(host, dtype=dst.dtype).reshape(dst.shape)
        return dst

    def all_finite(self, array):
        return bool(np.isfinite(array).all())

    def zeros(self, shape, like=None):
        """Zeros, float32 or of like's dtype (float64 in the gradient checks)."""
        return np.zeros(shape, dtype=np.float32 if like is None else like.dtype)

    def copy(self, array):
        return array.copy(order="K")  # laid out as array is (channels innermost or not)

    def reshape(self, array, shape):
        return array.reshape(shape)

    def add_(self, dst, src):
        """dst += src (used to sum deltas that reach one layer along several paths)."""
        dst += src
        return dst

    def synchronize(self):
        pass

    def freeze_(self, array):
        """Make a parameter read-only (inference from here on): derived work may be cached."""
        array.flags.writeable = False
        return array

    # ---- layout helpers -----------------------------------------------------------------------
    @staticmethod
    def _batch_innermost(shape, dtype, zero=False):
        """A (B, C, H, W) array stored as (C, H, W, B) in memory (see the module docstring)."""
        b, c, h, w = shape
        return (np.zeros if zero else np.empty)((c, h, w, b), dtype).transpose(3, 0, 1, 2)

    @staticmethod
    def _memory_order(x):
        """x's (C, H, W, B) view: free (no copy) when x is batch-innermost."""
        return x.transpose(1, 2, 3, 0)

    @staticmethod
    def _axis_order(x):
        """x's axes from outermost in memory (largest stride) to innermost."""
        return sorted(range(x.ndim), key=lambda axis: -x.strides[axis])

    def _empty_laid_like(self, shape, like, dtype=None):
        """An uninitialised array of `shape` whose axes lie in memory in the same order as
        like's, so that elementwise ops between the two run in memory order."""
        order = self._axis_order(like)
        memory = np.empty([shape[axis] for axis in order], like.dtype if dtype is None else dtype)
        return memory.transpose(np.argsort(order))

    @staticmethod
    def _channels_innermost(x):
        """Whether x (B, C, H, W) is stored channels innermost, as inference convolutions write
        their outputs (see conv_forward)."""
        return x.ndim == 4 and x.shape[1] > 1 and x.strides[1] == x.itemsize

    @classmethod
    def _channel_blocks(cls, x):
        """Index tuples x[index] cutting x into blocks of whole channels (axis 1) of about
        BLOCK_ELEMENTS each: a multi-pass elementwise op then runs block by block in cache.
        Channels-innermost arrays are cut into blocks of rows (axis 2) instead, each holding
        every channel (the index's channel entry is then slice(None))."""
        if x.ndim < 2:
            return [Ellipsis]
        if cls._channels_innermost(x):
            rows = x.shape[2]
            step = max(1, BLOCK_ELEMENTS * rows // max(x.size, 1))
            return [(slice(None), slice(None), slice(r, r + step)) for r in range(0, rows, step)]
        channels = x.shape[1]
        step = max(1, BLOCK_ELEMENTS * channels // max(x.size, 1))
        return [(slice(None), slice(c, c + step)) for c in range(0, channels, step)]

    # ---- activation and bias ------------------------------------------------------------------
    def activate_(self, x, activation, view=None):
        """x = act(x) in place, or, given a View (views.py), only on the elements it holds;
        returns x. Elementwise activations only (not activations.CHANNEL_NAMES)."""
        if activation == "linear":
            return x
        if view is not None:
            views.check(view, x.size)
            with self._writable(x, view) as part:
                part[...] = activations.activate(part, activation)
            return x
        self._run([lambda block=block: self._activate_block_(x[block], activation)
                   for block in self._channel_blocks(x)], x.size)
        return x

    @staticmethod
    def _activate_block_(block, activation):
        activations.activate_(block, activation)

    def activation_backward_(self, y, delta, activation):
        """delta *= act'(x), computed from the output y; in place, returns delta."""
        if activation != "linear":
            for block in self._channel_blocks(delta):
                db = delta[block]  # not delta[block] *= ...: that copies the block onto itself
                db *= activations.gradient(y[block], activation)
        return delta

    def activation_input_backward_(self, x, delta, activation):
        """delta *= act'(x) from the activation's input x (activations.INPUT_GRADIENT); in place."""
        delta *= activations.gradient_from_input(x, activation)
        return delta

    def normalize_channels(self, x, activation):
        """AlexeyAB's normalize_channels(_softmax(_maxval)) across channels: a new array."""
        return activations.normalize_channels(x, activation)

    def normalize_channels_backward_(self, x, delta, activation):
        """delta := the gradient through normalize_channels at input x; returns delta."""
        delta[...] = activations.normalize_channels_backward(x, delta, activation)
        return delta

    def add_bias_(self, y, biases, activation="linear"):
        """y = act(y + biases per channel), in place; elementwise activations in the same pass
        over each block."""
        if activation in activations.CHANNEL_NAMES:
            y += biases.reshape(1, -1, 1, 1)
            return self.activate_(y, activation)
        b, b_row = biases.reshape(1, -1, 1, 1), None
        memory = y.transpose(2, 3, 0, 1)
        if self._channels_innermost(y) and memory.flags.c_contiguous:
            # rows of (W, B, C) plus the biases repeated along a row: long inner loops (a
            # (C,) vector broadcast over channels-innermost data loops over C at a time)
            y_rows = memory.reshape(y.shape[2], -1)
            b_row = np.tile(biases, y.shape[3] * y.shape[0])

        def block_(block):
            yb = y[block]
            if b_row is None:
                yb += b[:, block[1]]
            else:
                rows = y_rows[block[2]]
                rows += b_row
            if activation != "linear":
                self._activate_block_(yb, activation)
        self._run([lambda block=block: block_(block) for block in self._channel_blocks(y)],
                  y.size)
        return y

    def bias_backward(self, delta, bias_updates):
        bias_updates += delta.sum(axis=(0, 2, 3))

    def scale_(self, x, factor):
        x *= np.float32(factor)
        return x

    # ---- convolution --------------------------------------------------------------------------
    @staticmethod
    def _conv_geometry(x_shape, w_shape, stride, padding, dilation=1):
        _, _, h, w = x_shape
        size = w_shape[2]
        stride_y, stride_x = _pair(stride)
        reach = dilation * (size - 1) + 1  # the input span a dilated filter covers
        out_h = (h + 2 * padding - reach) // stride_y + 1
        out_w = (w + 2 * padding - reach) // stride_x + 1
        return size, out_h, out_w

    def _winograd_filters(self, weights, v):
        """The filters in the Winograd domain of variant v (_derived_filters)."""
        return self._derived_filters(weights, v.tile,
                                     lambda: winograd.transform_filters(weights, v))

    def _derived_filters(self, weights, kind, make):
        """make(): filters derived from `weights` (Winograd's domain, a transposed matrix).
        Frozen weights (read-only arrays owning their memory: Network.fold_batchnorm makes them
        so) are transformed once and kept while the array lives; writable ones may change in
        place (training, tests), so they are transformed on every call (a few percent of the
        convolution)."""
        if weights.flags.writeable or weights.base is not None:
            return make()
        key = (id(weights), kind)
        entry = self._winograd_cache.get(key)
        if entry is None or entry[0]() is not weights:
            entry = (weakref.ref(weights), make())
            self._winograd_cache[key] = entry
            weakref.finalize(weights, self._winograd_cache.pop, key, None)
        return entry[1]

    def _padded_input(self, x, padding):
        """x in (C, H, W, B) order (a free view when batch-innermost), zero-padded."""
        xm = self._memory_order(x)
        if padding:
            xm = np.pad(xm, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        return xm

    def _row_blocks(self, channels, size, out_h, out_w, batch, threads=1):
        """Ranges of output rows whose im2col columns hold about COLUMN_BLOCK_ELEMENTS: the
        convolution runs block by block, so its columns stay in the CPU cache; but at least
        MIN_BLOCK_COLUMNS columns, so that each block's product amortises reading the filters.
        Evened out for `threads` (winograd.row_ranges)."""
        per_row = out_w * batch
        step = max(-(-MIN_BLOCK_COLUMNS // per_row),
                   COLUMN_BLOCK_ELEMENTS // (channels * size * size * per_row))
        return winograd.row_ranges(out_h, step, threads)

    @staticmethod
    def _im2col(xm, size, stride, rows, out_w, dilation=1):
        """Columns (C*size*size, (row1-row0)*out_w*B) of output rows [row0, row1) from the padded
        (C, H, W, B) input xm, one copy per kernel offset (offsets `dilation` apart)."""
        (row0, row1), (c, b) = rows, (xm.shape[0], xm.shape[3])
        stride_y, stride_x = _pair(stride)
        if size == 1 and stride_y == stride_x == 1:
            return xm[:, row0:row1, :out_w].reshape(c, -1)
        cols = np.empty((c, size, size, row1 - row0, out_w, b), dtype=xm.dtype)
        for i in range(size):
            top = row0 * stride_y + i * dilation
            for j in range(size):
                left = j * dilation
                cols[:, i, j] = xm[:, top:top + stride_y * (row1 - row0):stride_y,
                                   left:left + stride_x * out_w:stride_x]
        return cols.reshape(c * size * size, -1)

    @staticmethod
    def _col2im_(dx, cols, size, stride, padding, rows, out_w, dilation=1):
        """Inverse of _im2col: sum each column entry into the cell of dx (C, H, W, B) it came
        from; one strided add per kernel offset, clipped to the cells inside dx (no padding)."""
        c, h, w, b = dx.shape
        (row0, row1) = rows
        cols = cols.reshape(c, size, size, row1 - row0, out_w, b)

        def inside(offset, first, last, n_in, stride):
            # outputs o in [first, last) whose cell o*stride + offset - padding lies in [0, n_in),
            # and that cell for the first of them
            first = max(first, -(-(padding - offset) // stride))
            last = min(last, (n_in - 1 + padding - offset) // stride + 1)
            return first, last, first * stride + offset - padding

        stride_y, stride_x = _pair(stride)
        for i in range(size):
            y0, y1, top = inside(i * dilation, row0, row1, h, stride_y)
            for j in range(size):
                x0, x1, left = inside(j * dilation, 0, out_w, w, stride_x)
                if y1 > y0 and x1 > x0:
                    dx[:, top:top + stride_y * (y1 - y0):stride_y,
                       left:left + stride_x * (x1 - x0):stride_x] += cols[:, i, j, y0 - row0:y1 - row0,
                                                                      x0:x1]
        return dx

    def conv_forward(self, x, weights, stride, padding, groups, train=False, dilation=1):
        """y[b, f] = sum_c weights[f, c] (*) x[b, c]; weights (F, C/groups, k, k).
        im2col + one matrix product per block of output rows; y is batch-innermost, so the
        product writes its (F, rows*out_w*B) block of y directly. At inference, 3x3 stride-1
        convolutions on enough channels take Winograd's F(4x4, 3x3) instead (winograd.py), and
        every ungrouped convolution stores y channels innermost (_conv_channels_last)."""
        if not train and groups == 1:  # (Winograd's convolutions are ungrouped too)
            return self._conv_inference(x, weights, stride, padding, groups, dilation)
        b, c = x.shape[:2]
        f = weights.shape[0]
        size, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding, dilation)
        y = self._batch_innermost((b, f, out_h, out_w), x.dtype)
        y_rows = self._memory_order(y).reshape(f, -1)  # a view; columns (row, column, image)
        xm = self._padded_input(x, padding)
        cg, fg = c // groups, f // groups
        per_row = out_w * b
        blocks = [(g, rows) for g in range(groups)
                  for rows in self._row_blocks(cg, size, out_h, out_w, b)]
        # with fewer blocks than threads (small maps), the filters are shared out as well
        parts = self.threads if len(blocks) < self.threads else 1
        step = -(-fg // parts)

        def block_(g, rows, f0):
            cols = self._im2col(xm[g * cg:(g + 1) * cg], size, stride, rows, out_w, dilation)
            f1 = min(f0 + step, fg)
            np.matmul(weights[g * fg + f0:g * fg + f1].reshape(f1 - f0, -1), cols,
                      out=y_rows[g * fg + f0:g * fg + f1, rows[0] * per_row:rows[1] * per_row])
        self._run([lambda g=g, rows=rows, f0=f0: block_(g, rows, f0)
                   for g, rows in blocks for f0 in range(0, fg, step)])
        return y

    def conv_bias_forward(self, x, weights, biases, activation, stride, padding, groups,
                          dilation=1):
        """act(conv + biases) at inference, the bias and activation applied to each block of
        the output while it is in cache (Winograd: the bias added to one transform point,
        _conv_inference); grouped convolutions take the two passes."""
        if groups == 1:
            return self._conv_inference(x, weights, stride, padding, groups, dilation, biases,
                                        activation)
        y = self.conv_forward(x, weights, stride, padding, groups, train=False, dilation=dilation)
        return self.add_bias_(y, biases, activation)

    def conv_bias_maxpool_forward(self, x, weights, biases, activation, stride, padding,
                                  groups, pool_size, pool_stride, pool_pad, pool_hw, out=None,
                                  start=0, keep=False, dilation=1):
        """The 2x2/2 maxima of an (ungrouped) convolution of an even output, taken from each
        block of its output while in cache and activated after (max and a non-decreasing
        activation commute exactly), stored channels innermost (into out's channels when out
        is so); the convolution's output is stored only where `keep`, and never read again by
        a separate pooling pass. Winograd's on maps of whole even tiles pools inside its
        output tiles (a tile's 2x2 windows are its own: two contiguous passes over the block),
        the column products over their blocks of row pairs. Any other case: the two
        operations."""
        b, _, h, w = x.shape
        f = weights.shape[0]
        _, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding, dilation)
        v = winograd.variant(h, w)
        winograd_ = winograd.fits(x.shape, weights.shape, stride, padding, groups, dilation)
        if (activation in MONOTONE_ACTIVATIONS and pool_size == pool_stride == 2
                and pool_pad == 0 and out_h % 2 == 0 and out_w % 2 == 0
                and tuple(pool_hw) == (out_h // 2, out_w // 2) and groups == 1
                and (out is None or self._channels_innermost(out))
                and (not winograd_ or winograd.pools_in_tiles(h, w, v))):
            if out is None:
                out = np.empty((out_h // 2, out_w // 2, b, f), x.dtype).transpose(2, 3, 0, 1)
            pooled = out[:, start:start + f].transpose(2, 3, 0, 1)  # (H/2, W/2, B, F), a view
            if winograd_:
                y = winograd.conv3x3(x, self._winograd_filters(weights, v), f, v, self._run,
                                     self.threads, biases, _activation_into(activation),
                                     pooled=pooled, keep=keep)
            else:  # the column products, each block of row pairs pooled
                y = self._conv_channels_last(x, weights, stride, padding, dilation, biases,
                                             activation, pooled=pooled, keep=keep)
            return out, y
        return super().conv_bias_maxpool_forward(x, weights, biases, activation, stride, padding,
                                                 groups, pool_size, pool_stride, pool_pad,
                                                 pool_hw, out, start, keep, dilation)

    def conv_bias_maxpool_chain(self, x, stages):
        """The chain on several threads handed work over once: each thread takes a band of
        rows of every stage (its share of the pooled rows), all stages one after the other,
        instead of each stage's blocks being shared out and joined (a hand-off that wakes an
        idle CPU: 60-70 us late on this virtual machine, and a join). A block on a band's
        edge reads a row or two the neighbouring thread pooled at the stage before: the first
        thread takes its blocks top down and the last one bottom up, so that those edge
        blocks come last and their rows are long done (an event per thread and stage, waited
        for only if not). Each stage pools into the zero-bordered input of the next (no padded
        copy). For chains of 3x3 stride-1 convolutions pooled 2x2/2 (_chain_blocks); any other
        chain, or one thread: one stage after the other."""
        plan = self._chain_blocks(x, stages)
        if plan is None:
            return super().conv_bias_maxpool_chain(x, stages)
        bands, out = plan
        done = [[threading.Event() for _ in stages] for _ in bands]

        def work(t):
            try:
                for stage, blocks in enumerate(bands[t]):
                    for task, neighbours in blocks:
                        for other in neighbours:
                            done[other][stage - 1].wait()
                        task()
                    done[t][stage].set()
            finally:  # (a failed thread's neighbours go on; its error is raised below)
                for event in done[t]:
                    event.set()
        self._fork_join(lambda: work(0),
                        [functools.partial(work, t) for t in range(1, len(bands))])
        return out.transpose(2, 3, 0, 1)

    def _chain_blocks(self, x, stages):
        """(bands, out) for conv_bias_maxpool_chain on the backend's threads, or None where
        the chain does not qualify: one thread; a stage other than a 3x3 stride-1 padding-1
        ungrouped convolution with a max-commuting activation, pooled 2x2/2 over an even map,
        whose Winograd tiles hold whole windows (winograd.pools_in_tiles), or (the first stage
        only) under winograd.MIN_CHANNELS input channels (the column products); a stage with
        fewer block units than threads. bands[t][stage]: thread t's blocks of that stage, in
        the order it takes them, each (task, the threads whose previous stage it reads).
        out: the last stage's pooled output, (H, W, B, F)."""
        threads = self.threads
        if self._pool is None or len(stages) < 2:
            return None
        b, c, h, w = x.shape
        geometry = []  # per stage: (variant or None, c, h, w, f)
        for i, (weights, biases, activation, stride, padding, groups, pool_size, pool_stride,
                pool_pad, pool_hw, dilation) in enumerate(stages):
            f = weights.shape[0]
            if not (tuple(weights.shape[1:]) == (c, 3, 3) and stride in (1, (1, 1))
                    and padding == 1 and groups == 1 and dilation == 1
                    and activation in MONOTONE_ACTIVATIONS and pool_size == pool_stride == 2
                    and pool_pad == 0 and h % 2 == 0 and w % 2 == 0
                    and tuple(pool_hw) == (h // 2, w // 2)):
                return None
            if winograd.fits((b, c, h, w), weights.shape, stride, padding, groups, dilation):
                v = winograd.variant(h, w)
                if not winograd.pools_in_tiles(h, w, v) or h // v.tile < threads:
                    return None
            elif i == 0 and h // 2 >= threads:
                v = None
            else:
                return None
            geometry.append((v, c, h, w, f))
            c, h, w = f, h // 2, w // 2
        # stage i reads inputs[i] (zero-bordered, (H + 2, W + 2, B, C)) and pools into
        # targets[i]: the inside of inputs[i + 1], or `out` for the last stage
        inputs = [None]
        for v, c, h, w, f in geometry[1:]:
            padded = np.empty((h + 2, w + 2, b, c), x.dtype)
            padded[0] = padded[-1] = 0
            padded[:, 0] = padded[:, -1] = 0
            inputs.append(padded)
        out = np.empty((h // 2, w // 2, b, f), x.dtype)
        targets = [padded[1:-1, 1:-1] for padded in inputs[1:]] + [out]
        bands = [[] for _ in range(threads)]
        owners = None  # the previous stage's: output row -> thread
        for i, ((v, c, h, w, f), stage) in enumerate(zip(geometry, stages)):
            weights, biases, activation = stage[:3]
            store = winograd.store_through(_activation_into(activation))
            target = targets[i]
            if v is None:  # the first stage, few channels: the column products
                columns, wt = self._column_source(x, weights, 3, 1, 1, 1, h, w)
                b_row = np.tile(biases, w * b)
                unit = 2  # rows per unit: a row pair (the pooling windows)
                per_unit = max(-(-MIN_BLOCK_COLUMNS // (2 * w * b)),
                               COLUMN_BLOCK_ELEMENTS // (c * 9 * 2 * w * b))

                def block_(r0, r1, columns=columns, wt=wt, b_row=b_row, w=w, store=store,
                           target=target):
                    block = np.matmul(columns((r0, r1)), wt)
                    block.reshape(r1 - r0, -1)[...] += b_row
                    _store_pooled_rows(block, (r0, r1), w, b, store, target)
            else:
                source = inputs[i]
                if source is None:  # a first stage of many channels: its padded copy
                    source = np.zeros((h + 2, w + 2, b, c), x.dtype)
                    source[1:-1, 1:-1] = x.transpose(2, 3, 0, 1)
                tiles = winograd.tile_view(source, v)
                filters = self._winograd_filters(weights, v)
                unit = v.tile  # rows per unit: a row of tiles
                per_unit = winograd.block_step(c, w // v.tile, b, v, filters.size)

                def block_(r0, r1, tiles=tiles, filters=filters, v=v, biases=biases,
                           store=store, target=target):
                    out_tiles = winograd.block_tiles(tiles, filters, v, biases, r0 // v.tile,
                                                     r1 // v.tile)
                    winograd.store_pooled_tiles(out_tiles, store, target, r0 // v.tile)
            units = h // unit
            stage_owners = np.empty(h, np.intp)
            for t in range(threads):
                u0, u1 = units * t // threads, units * (t + 1) // threads
                stage_owners[u0 * unit:u1 * unit] = t
                blocks = []
                for a, z in winograd.row_ranges(u1 - u0, per_unit):
                    r0, r1 = (u0 + a) * unit, (u0 + z) * unit
                    neighbours = ()
                    if owners is not None:  # the rows it reads: [r0 - 1, r1 + 1) inside
                        first, last = owners[max(r0 - 1, 0)], owners[min(r1, h - 1)]
                        neighbours = tuple(o for o in range(first, last + 1) if o != t)
                    blocks.append((functools.partial(block_, r0, r1), neighbours))
                if t == threads - 1:
                    blocks.reverse()  # bottom up: its top (edge) blocks last
                bands[t].append(blocks)
            # input row j of the next stage is pooled from this stage's rows 2j, 2j + 1
            owners = stage_owners[::2]
        return bands, out

    def conv_bias_forward_into_(self, out, start, x, weights, biases, activation, stride,
                                padding, groups, dilation=1):
        """conv_bias_forward computed straight into out's channels [start, start + F) when out
        is channels innermost (a route's concatenation: no copy afterwards); returns that
        channel slice."""
        if groups != 1 or not self._channels_innermost(out):
            return super().conv_bias_forward_into_(out, start, x, weights, biases, activation,
                                                   stride, padding, groups, dilation)
        y = out[:, start:start + weights.shape[0]]
        self._conv_inference(x, weights, stride, padding, groups, dilation, biases, activation,
                             into=y.transpose(2, 3, 0, 1))
        return y

    def _conv_inference(self, x, weights, stride, padding, groups, dilation, biases=None,
                        activation="linear", into=None):
        """An inference convolution (Winograd's where it fits, else _conv_channels_last), its
        output channels innermost; with `biases`, act(y + biases) done block by block. `into`:
        the (H, W, B, F) array (a view) to store y in, else a new one."""
        if winograd.fits(x.shape, weights.shape, stride, padding, groups, dilation):
            v = winograd.variant(*x.shape[2:])
            return winograd.conv3x3(x, self._winograd_filters(weights, v), weights.shape[0], v,
                                    self._run, self.threads, biases,
                                    _activation_into(activation), into)
        return self._conv_channels_last(x, weights, stride, padding, dilation, biases,
                                        activation, into)

    def _columns_filters(self, weights):
        """weights (F, C, k, k) as the (k*k*C, F) matrix that channels-innermost columns
        (kernel row, kernel column, channel) multiply; kept for frozen weights, as the Winograd
        filters are."""
        def make():
            f, c, k, _ = weights.shape
            return np.ascontiguousarray(weights.transpose(2, 3, 1, 0).reshape(k * k * c, f))
        return self._derived_filters(weights, "columns", make)

    def _column_source(self, x, weights, size, stride, padding, dilation, out_h, out_w):
        """(columns(rows), wt): the (positions, K) columns of output rows [row0, row1) and the
        (K, F) filters they multiply, for _conv_channels_last. A channels-innermost input is
        padded in its own layout and its columns gathered with the channels innermost (k*k
        runs of C), times _columns_filters; any other input takes im2col's columns (C*k*k,
        positions), transposed. The input's padded copy is made here, once."""
        b, c = x.shape[:2]
        f = weights.shape[0]
        stride_y, stride_x = _pair(stride)
        if self._channels_innermost(x):
            xl = x.transpose(2, 3, 0, 1)  # (H, W, B, C), a view
            if padding:
                h, w = x.shape[2:]
                padded = np.zeros((h + 2 * padding, w + 2 * padding, b, c), x.dtype)
                padded[padding:padding + h, padding:padding + w] = xl
                xl = padded
            wt = self._columns_filters(weights)
            sh, sw, sb, sc = xl.strides
            # cells[row, col, b, i, j, c]: input cell (i, j) of output (row, col)'s window, a
            # view made once; each block's columns are one copy of its rows (one numpy call,
            # not size^2: fewer GIL hand-offs between the threads)
            cells = as_strided(xl, (out_h, out_w, b, size, size, c),
                               (stride_y * sh, stride_x * sw, sb, dilation * sh, dilation * sw,
                                sc), writeable=False)

            def columns(rows):
                (row0, row1) = rows
                if size == 1 and stride_y == stride_x == 1:
                    return xl[row0:row1, :out_w].reshape(-1, c)
                return np.array(cells[row0:row1], order="C").reshape(-1, size * size * c)
        else:
            xm = self._padded_input(x, padding)
            wt = weights.reshape(f, -1).T
            sc, sh, sw, sb = xm.strides
            # cells[c, i, j, row, col, b], im2col's order (the same values as _im2col)
            cells = as_strided(xm, (c, size, size, out_h, out_w, b),
                               (sc, dilation * sh, dilation * sw, stride_y * sh, stride_x * sw,
                                sb), writeable=False)

            def columns(rows):
                block = np.array(cells[:, :, :, rows[0]:rows[1]], order="C")
                return block.reshape(c * size * size, -1).T
        return columns, wt

    def _conv_channels_last(self, x, weights, stride, padding, dilation, biases=None,
                            activation="linear", into=None, pooled=None, keep=False):
        """An inference convolution (one group) whose output is channels-innermost: (positions,
        K) @ (K, F) products (_column_source), block by block of output rows."""
        b, c = x.shape[:2]
        f = weights.shape[0]
        size, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding, dilation)
        stride_y, stride_x = _pair(stride)
        if pooled is None or keep:
            ym = np.empty((out_h, out_w, b, f), x.dtype) if into is None else into
            y_rows = winograd.reshaped_view(ym, (-1, f))  # rows (row, column, image)
        per_row = out_w * b
        columns, wt = self._column_source(x, weights, size, stride, padding, dilation, out_h,
                                          out_w)
        blocks = self._row_blocks(c, size, out_h, out_w, b, self.threads)
        if pooled is not None:  # blocks of whole row pairs (the 2x2 windows)
            ends = sorted({r1 + r1 % 2 for _, r1 in blocks})
            blocks = list(itertools.pairwise([0] + ends))
        # with fewer blocks than threads (small maps), the filters are shared out as well
        parts = self.threads if len(blocks) < self.threads else 1
        step = -(-f // parts)
        # the bias and activation on each block of whole rows while it is in cache (the
        # biases repeated along a row: long inner loops); a block of a share of the filters
        # (its rows in y are strided) in a contiguous temporary, stored through the activation
        # (the pass over y that followed the products ran on one thread: small maps' 1x1
        # layers 0-0.05 ms faster)
        fused = biases is not None and parts == 1
        shared_fused = biases is not None and parts > 1
        b_row = np.tile(biases, per_row) if fused else None
        finish = _activation_(activation)
        store = winograd.store_through(_activation_into(activation))

        def pooled_block_(rows, f0):
            # the block in a contiguous temporary with its biases, its 2x2 maxima over row
            # pairs, then column pairs, then the activation (it commutes with max), stored
            block = np.matmul(columns(rows), wt[:, f0:f0 + step])
            fs = block.shape[1]
            block_rows = block.reshape(rows[1] - rows[0], -1)
            block_rows += b_row if parts == 1 else np.tile(biases[f0:f0 + fs], per_row)
            if keep:  # (other layers read the convolution's output)
                store(block, y_rows[rows[0] * per_row:rows[1] * per_row, f0:f0 + fs])
            _store_pooled_rows(block, rows, out_w, b, store, pooled[:, :, :, f0:f0 + fs])

        def block_(rows, f0):
            if pooled is not None:
                return pooled_block_(rows, f0)
            out = y_rows[rows[0] * per_row:rows[1] * per_row, f0:f0 + step]
            if shared_fused:  # (the biases broadcast over a block's rows of `step` filters)
                block = np.matmul(columns(rows), wt[:, f0:f0 + step])
                block += biases[f0:f0 + step]
                store(block, out)
                return
            if fused and into is not None:
                # into a route's buffer (strided rows): the block finished in a contiguous
                # temporary while in cache, then stored (short strided runs are slow passes)
                block = np.matmul(columns(rows), wt[:, f0:f0 + step])
                block_rows = block.reshape(rows[1] - rows[0], -1)
                block_rows += b_row
                if finish is not None:
                    finish(block_rows)
                out[...] = block
                return
            np.matmul(columns(rows), wt[:, f0:f0 + step], out=out)
            if fused:
                out_rows = out.reshape(rows[1] - rows[0], -1)
                out_rows += b_row
                if finish is not None:
                    finish(out_rows)
        self._run([lambda rows=rows, f0=f0: block_(rows, f0)
                   for rows in blocks for f0 in range(0, f, step)])
        if pooled is not None and not keep:
            return None
        return ym.transpose(2, 3, 0, 1)  # (biases: added by the blocks)

    def conv_backward(self, x, weights, delta, stride, padding, groups, weight_updates, need_dx,
                      dilation=1):
        """weight_updates += delta (*) x; returns the delta for x (or None if not needed),
        batch-innermost. Block by block of output rows, as in conv_forward (the columns are
        rebuilt: from cache that is cheaper than keeping them all from the forward pass)."""
        b, c = x.shape[:2]
        f = weights.shape[0]
        size, out_h, out_w = self._conv_geometry(x.shape, weights.shape, stride, padding, dilation)
        cg, fg = c // groups, f // groups
        per_row = out_w * b
        delta_rows = self._memory_order(delta).reshape(f, -1)  # free if batch-innermost
        xm = self._padded_input(x, padding)
        dx = self._batch_innermost(x.shape, x.dtype, zero=True) if need_dx else None
        for g in range(groups):
            wg = weights[g * fg:(g + 1) * fg].reshape(fg, -1)
            dw = np.zeros_like(wg)
            for rows in self._row_blocks(cg, size, out_h, out_w, b):
                dg = delta_rows[g * fg:(g + 1) * fg, rows[0] * per_row:rows[1] * per_row]
                dw += dg @ self._im2col(xm[g * cg:(g + 1) * cg], size, stride, rows, out_w,
                                        dilation).T
                if need_dx:
                    self._col2im_(self._memory_order(dx)[g * cg:(g + 1) * cg], wg.T @ dg, size,
                                  stride, padding, rows, out_w, dilation)
            weight_updates[g * fg:(g + 1) * fg] += dw.reshape(fg, cg, size, size)
        return dx

    # ---- fully connected ----------------------------------------------------------------------
    def connected_forward(self, x, weights):
        """x (B, inputs, ...) flattened; weights (outputs, inputs) -> (B, outputs, 1, 1)."""
        b = x.shape[0]
        y = x.reshape(b, -1) @ weights.T
        return y.reshape(b, -1, 1, 1)

    def connected_backward(self, x, weights, delta, weight_updates, need_dx):
        """weight_updates += delta^T x; returns the delta for x, laid out like x."""
        b = x.shape[0]
        d, xf = delta.reshape(b, -1), x.reshape(b, -1)
        weight_updates += d.T @ xf
        if not need_dx:
            return None
        if xf.flags.f_contiguous and not xf.flags.c_contiguous:  # x batch-innermost (a conv's)
            return (weights.T @ d.T).T.reshape(x.shape)
        return (d @ weights).reshape(x.shape)

    # ---- batch normalisation ------------------------------------------------------------------
    @staticmethod
    def _bn_layout(shape, per_activation):
        """(batch, statistics, positions): BN's view of an NCHW array. SPATIAL keeps one
        statistic per channel over batch and positions; PER_ACTIVATION one per element."""
        b = shape[0]
        if per_activation:
            return b, int(np.prod(shape[1:])), 1
        return b, shape[1], int(np.prod(shape[2:]))

    def batchnorm_forward_train(self, x, scales, biases, rolling_mean, rolling_variance,
                                per_activation=False, activation="linear"):
        """cuDNN's training rule: biased batch variance, eps under the square root; the rolling
        statistics move by 1% toward the batch mean and the *unbiased* batch variance.
        Returns (y, cache) with y = act(scales * x_norm + biases); the cache keeps (a view of) x,
        which layers never change, the mean and 1/std, and y, or for an activation whose
        gradient needs its input (activations.INPUT_GRADIENT) that input: the values and
        arithmetic of a linear batch norm followed by the layer's own activation pass. Block by
        block, the centred block in cache: no full-size temporary."""
        b, n, positions = self._bn_layout(x.shape, per_activation)
        count = b * positions
        view = x.reshape(b, n, positions)
        y = np.empty_like(view)
        mean, variance = np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype)
        scales, biases = scales.reshape(n), biases.reshape(n)
        for block in self._channel_blocks(view):
            stats = block[1]
            mean[stats] = np.einsum("bns->n", view[block]) / count
            centered = view[block] - mean[stats, None]
            variance[stats] = np.einsum("bns,bns->n", centered, centered) / count
            gain = scales[stats] / np.sqrt(variance[stats] + x.dtype.type(BN_TRAINING_EPSILON))
            yb = y[block]
            np.multiply(centered, gain[:, None], out=yb)
            yb += biases[stats, None]
        inv_std = 1 / np.sqrt(variance + x.dtype.type(BN_TRAINING_EPSILON))
        rolling_mean *= 1 - BN_MOMENTUM
        rolling_mean += BN_MOMENTUM * mean.reshape(rolling_mean.shape)
        rolling_variance *= 1 - BN_MOMENTUM
        rolling_variance += (BN_MOMENTUM * count / max(count - 1, 1)) * \
            variance.reshape(rolling_variance.shape)
        y = y.reshape(x.shape)
        if activation in activations.INPUT_GRADIENT:
            z = y  # the activation's input, kept for its gradient
            y = self.activate_(self.copy(z), activation)
            return y, (view, mean, inv_std, per_activation, z, activation)
        y = self.activate_(y, activation)
        return y, (view, mean, inv_std, per_activation, y, activation)

    def batchnorm_forward_inference(self, x, scales, biases, rolling_mean, rolling_variance,
                                    per_activation=False, activation="linear",
                                    epsilons=PJREDDIE_BN_EPSILONS):
        """Darknet's inference rule, then the activation:
        act(scales * (x - mean) / (sqrt(var + e0) + e1) + biases) with (e0, e1) = `epsilons`
        (constants.PJREDDIE_BN_EPSILONS or ALEXEYAB_BN_EPSILONS), as one affine map per
        statistic (batchnorm_rule.inference_affine)."""
        b, n, positions = self._bn_layout(x.shape, per_activation)
        factor, shift = inference_affine(*(a.reshape(n).astype(x.dtype, copy=False) for a in
                                           (scales, biases, rolling_mean, rolling_variance)),
                                         epsilons)
        memory = x.transpose(2, 3, 0, 1) if x.ndim == 4 else x
        if not per_activation and self._channels_innermost(x) and memory.flags.c_contiguous:
            # an inference convolution's output: rows of (W, B, C) times the factors repeated
            # along a row, plus the shifts likewise (the same operations, in x's layout)
            rows = memory.reshape(memory.shape[0], -1)
            y_memory = np.empty_like(memory)
            y_rows = y_memory.reshape(rows.shape)
            repeats = rows.shape[1] // n
            factor_row, shift_row = np.tile(factor, repeats), np.tile(shift, repeats)
            step = max(1, BLOCK_ELEMENTS // rows.shape[1])
            for row in range(0, rows.shape[0], step):
                yb = y_rows[row:row + step]
                np.multiply(rows[row:row + step], factor_row, out=yb)
                yb += shift_row
            return self.activate_(y_memory.transpose(2, 3, 0, 1), activation)
        view = x.reshape(b, n, positions)
        y = np.empty_like(view)
        for block in self._channel_blocks(view):
            yb = y[block]
            np.multiply(view[block], factor[block[1], None], out=yb)
            yb += shift[block[1], None]
        return self.activate_(y.reshape(x.shape), activation)

    def batchnorm_backward(self, delta, cache, scales, scale_updates, bias_updates):
        """Accumulates the scale and bias gradients; returns the delta for the BN input:
        dx = scale*inv_std * (delta - mean(delta) - x_norm * mean(delta * x_norm)),
        with x_norm = (x - mean) * inv_std, block by block (the centred block in cache)."""
        view_x, mean, inv_std, per_activation, kept, activation = cache
        if activation in activations.INPUT_GRADIENT:  # kept: the activation's input
            delta = self.activation_input_backward_(kept, delta, activation)
        else:  # kept: the output
            delta = self.activation_backward_(kept, delta, activation)
        b, n, positions = self._bn_layout(delta.shape, per_activation)
        count = b * positions
        view = delta.reshape(b, n, positions)
        sum_delta = np.empty(n, dtype=delta.dtype)
        sum_delta_xnorm = np.empty(n, dtype=delta.dtype)
        gain = scales.reshape(n) * inv_std
        dx = np.empty_like(view_x)
        for block in self._channel_blocks(view):
            stats = block[1]
            db, centered = view[block], view_x[block] - mean[stats, None]
            sum_delta[stats] = np.einsum("bns->n", db)
            sum_delta_xnorm[stats] = np.einsum("bns,bns->n", db, centered) * inv_std[stats]
            g = gain[stats]
            # dx = g*delta - g*sum_delta/count - g*inv_std*sum_delta_xnorm/count * centered
            xb = dx[block]
            np.multiply(centered, (-g * inv_std[stats] * sum_delta_xnorm[stats] / count)[:, None],
                        out=xb)
            xb -= (g * sum_delta[stats] / count)[:, None]
            centered = np.multiply(db, g[:, None], out=centered)  # reuse the block's temporary
            xb += centered
        bias_updates += sum_delta.reshape(bias_updates.shape)
        scale_updates += sum_delta_xnorm.reshape(scale_updates.shape)
        return dx.reshape(delta.shape)

    # ---- pooling, resampling, dropout ---------------------------------------------------------
    @staticmethod
    def _pool_window(padded, i, j, stride, out_h, out_w):
        """The (B, C, out_h, out_w) view of the cells at offset (i, j) of every window."""
        return padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]

    @staticmethod
    def _pool_frame(in_shape, size, stride, pad, out_h, out_w):
        """Where the windows run: (rows, cols, frame height, frame width, top, left). The
        windows start at -pad; `rows` and `cols` are the window offsets that reach the
        input for some window (the others hold only padding, so they are skipped: a
        window far larger than its input costs no more than the input), the frame holds the
        cells those offsets read, and the input sits at (top, left) in it."""
        h, w = in_shape[2:]
        start = pad

        def reach(n, out_n):
            first = max(0, start - (out_n - 1) * stride)
            last = min(size - 1, start + n - 1)
            return range(first, last + 1), max(last - first + (out_n - 1) * stride + 1,
                                               start - first + n), start - first

        rows, frame_h, top = reach(h, out_h)
        cols, frame_w, left = reach(w, out_w)
        return rows, cols, frame_h, frame_w, top, left

    def maxpool_forward(self, x, size, stride, pad, out_h, out_w, train=True):
        """Max pooling over out_h x out_w windows of size x size cells, `stride` apart, the first
        starting at (-pad, -pad): each output is the maximum of its window's cells inside the
        input (cells outside never win), or -FLT_MAX for a window with none inside.
        Returns (y, argmax) where argmax is the window offset that won (the first on ties), both
        laid out like x; at inference (train=False) argmax is None and only maxima are taken.
        One elementwise pass per window offset (numpy's where/argmax are slow here), block by
        block over channels."""
        b, c, h, w = x.shape
        rows, cols, frame_h, frame_w, top, left = self._pool_frame(x.shape, size, stride, pad,
                                                                   out_h, out_w)
        if (top, left, frame_h, frame_w) == (0, 0, h, w):
            padded = x
        else:
            padded = self._empty_laid_like((b, c, frame_h, frame_w), x)
            padded.fill(-FLOAT32_MAX)
            padded[:, :, top:top + h, left:left + w] = x
        if not train and size == stride and padded is x and (out_h * size, out_w * size) == (h, w) \
                and self._channels_innermost(x):
            windows = self._tile_windows(x, size)
            if windows is not None:
                return self._maxpool_tiles(windows, b, c), None
        y = self._empty_laid_like((b, c, out_h, out_w), x)  # laid out as x (after a conv)
        if not train:
            tasks = [lambda frame=frame, out=out: self._maxpool_max_(
                padded[frame], len(rows), len(cols), stride, y[out])
                for frame, out in self._pool_blocks(padded, y, len(rows), stride)]
            # threads pay only on the largest maps (16x416x416: 1.35 -> 1.05 ms on two; a
            # 32x208x208 input is slower on two)
            self._run(tasks, padded.size, POOL_PARALLEL_ELEMENTS)
            return y, None
        index_type = np.int8 if size * size < 128 else np.int32
        argmax = self._empty_laid_like(y.shape, x, index_type)
        whole = len(rows) == len(cols) == size
        for block in self._channel_blocks(padded):
            if size == 2 and whole:
                self._maxpool_2x2_(padded[block], size, stride, y[block], argmax[block])
            else:
                self._maxpool_window_(padded[block], size, stride, y[block], argmax[block],
                                      rows, cols)
        return y, argmax

    @staticmethod
    def _tile_windows(x, size):
        """A channels-innermost x (B, C, H, W) seen as (window row, i, window column, j, B*C)
        for size x size windows that tile it, without a copy; None where that needs one (a
        batch of channel slices)."""
        b, c, h, w = x.shape
        try:
            return np.reshape(x.transpose(2, 3, 0, 1), (h // size, size, w // size, size, b * c),
                              copy=False)
        except ValueError:
            return None

    def _maxpool_tiles(self, windows, b, c):
        """Inference maxpool over `windows` (_tile_windows: size x size windows that tile a
        channels-innermost x, the common 2x2/2; x contiguous, or a route's channel slice): the
        maximum over i, then over the j slices of each row: long inner loops and no index
        arithmetic (0.26 against 0.44 ms on 32x208x208). The same maxima as _maxpool_max_;
        returns y (B, C, out_h, out_w), channels innermost."""
        out_h, size, out_w, _, cells = windows.shape
        ym = np.empty((out_h, out_w, cells), windows.dtype)
        row_max = np.empty((out_h, out_w, size, cells), windows.dtype) if size > 1 else None

        def rows_(row0, row1):
            if row_max is None:
                np.copyto(ym[row0:row1], windows[row0:row1, 0, :, 0])
                return
            part = row_max[row0:row1]
            np.maximum(windows[row0:row1, 0], windows[row0:row1, 1], out=part)
            for i in range(2, size):
                np.maximum(part, windows[row0:row1, i], out=part)
            out = ym[row0:row1]
            np.maximum(part[:, :, 0], part[:, :, 1], out=out)
            for j in range(2, size):
                np.maximum(out, part[:, :, j], out=out)
        parts = self.threads if windows.size >= POOL_PARALLEL_ELEMENTS else 1
        self._run([lambda rows=rows: rows_(*rows)
                   for rows in winograd.row_ranges(out_h, -(-out_h // parts), parts)])
        return ym.reshape(out_h, out_w, b, c).transpose(2, 3, 0, 1)

    def _pool_blocks(self, padded, y, height, stride):
        """(frame index, output index) pairs cutting a pooling into blocks: of channels, or of
        output rows (and the frame rows their windows of `height` rows read) where channels are
        innermost."""
        if not self._channels_innermost(y):
            return [(block, block) for block in self._channel_blocks(padded)]
        out_h = y.shape[2]
        step = max(1, BLOCK_ELEMENTS * out_h // max(padded.size, 1))
        return [((slice(None), slice(None), slice(r * stride, (min(r + step, out_h) - 1) * stride
                                                  + height)),
                 (slice(None), slice(None), slice(r, r + step))) for r in range(0, out_h, step)]

    def _maxpool_max_(self, padded, height, width, stride, y):
        """The maxima alone, separably: the maximum over each window's `height` rows (for every
        column of the frame), then over its `width` columns; height + width - 2 passes instead
        of height * width - 1. (The window's offsets that reach the input, see _pool_frame.)"""
        b, c, _, frame_w = padded.shape
        out_h, out_w = y.shape[2:]
        rows = [padded[:, :, i:i + stride * out_h:stride] for i in range(height)]
        if height == 1:
            row_max = rows[0]
        else:
            row_max = self._empty_laid_like((b, c, out_h, frame_w), padded)
            np.maximum(rows[0], rows[1], out=row_max)
            for row in rows[2:]:
                np.maximum(row_max, row, out=row_max)
        columns = [row_max[:, :, :, j:j + stride * out_w:stride] for j in range(width)]
        if width == 1:
            np.copyto(y, columns[0])
            return
        np.maximum(columns[0], columns[1], out=y)
        for column in columns[2:]:
            np.maximum(y, column, out=y)

    def _maxpool_window_(self, padded, size, stride, y, argmax, rows, cols):
        """Any window: a running maximum over the offsets that reach the input (the frame starts
        at offset (rows[0], cols[0])), the index moving on strictly greater."""
        out_h, out_w = y.shape[2:]
        index_type = argmax.dtype.type
        offsets = [(i, j) for i in rows for j in cols]
        i, j = offsets[0]
        y[...] = self._pool_window(padded, 0, 0, stride, out_h, out_w)
        argmax.fill(i * size + j)
        for i, j in offsets[1:]:
            window = self._pool_window(padded, i - rows[0], j - cols[0], stride, out_h, out_w)
            better = (window > y).view(np.int8).astype(index_type, copy=False)
            np.maximum(y, window, out=y)
            argmax += better * (index_type(i * size + j) - argmax)

    def _maxpool_2x2_(self, padded, size, stride, y, argmax):
        """The common 2x2 window as a tournament: first-max of each pair, then of the pairs."""
        out_h, out_w = y.shape[2:]
        a, b, c, d = (self._pool_window(padded, i, j, stride, out_h, out_w)
                      for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        top, bottom = np.maximum(a, b, out=y), np.maximum(c, d)
        top_index = (b > a).view(np.int8)
        np.greater(d, c, out=argmax.view(np.bool_))  # the bottom pair's winner, 0 or 1 ...
        argmax += np.int8(2)  # ... as its window offset, 2 or 3
        argmax -= top_index
        argmax *= (bottom > top).view(np.int8)
        argmax += top_index
        np.maximum(top, bottom, out=y)

    def maxpool_backward(self, delta, argmax, in_shape, size, stride, pad):
        """Each window's delta goes to the cell that won it (argmax); laid out like argmax."""
        b, c, h, w = in_shape
        out_h, out_w = delta.shape[2:]
        rows, cols, frame_h, frame_w, top, left = self._pool_frame(in_shape, size, stride, pad,
                                                                   out_h, out_w)
        # Windows that tile the frame cover each cell once: assign instead of accumulating.
        tiles = size == stride and (out_h * size, out_w * size) == (frame_h, frame_w) and \
            len(rows) == len(cols) == size
        if self._axis_order(delta) != self._axis_order(argmax):
            # e.g. from a connected layer: elementwise ops across mixed layouts are slow
            relaid = self._empty_laid_like(delta.shape, argmax, delta.dtype)
            relaid[...] = delta
            delta = relaid
        padded = self._empty_laid_like((b, c, frame_h, frame_w), argmax, delta.dtype)
        if not tiles:
            padded.fill(0)
        for block in self._channel_blocks(padded):
            db, ab, pb = delta[block], argmax[block], padded[block]
            for i in rows:
                for j in cols:
                    window = self._pool_window(pb, i - rows[0], j - cols[0], stride, out_h, out_w)
                    if tiles:
                        np.multiply(db, ab == i * size + j, out=window)
                    else:
                        window += db * (ab == i * size + j)
        if (top, left, frame_h, frame_w) == (0, 0, h, w):
            return padded
        return padded[:, :, top:top + h, left:left + w].copy(order="K")

    def dropout_forward(self, x, probability):
        """Training: zero each input with `probability`, scale survivors by 1/(1-p).
        Returns (y, mask) where mask holds the per-element factor (0 or 1/(1-p))."""
        keep = self.rng.random(x.shape, dtype=np.float32) >= probability
        mask = keep * np.float32(1.0 / (1.0 - probability))
        return x * mask, mask

    def dropout_backward(self, delta, mask):
        return delta * mask

    # ---- outputs and losses -------------------------------------------------------------------
    def softmax(self, x, groups, temperature):
        """Softmax over each of `groups` contiguous blocks of every image's outputs."""
        b = x.shape[0]
        z = x.reshape(b, groups, -1) / np.float32(temperature)
        z = np.exp(z - z.max(axis=2, keepdims=True))
        z /= z.sum(axis=2, keepdims=True)
        return z.reshape(x.shape)

    def softmax_cross_entropy(self, probabilities, truth):
        """(cost summed over the batch, delta = truth - p) for a softmax output."""
        p = probabilities.reshape(truth.shape)
        with np.errstate(divide="ignore"):
            cost = float(-(truth * np.log(np.maximum(p, np.float32(CROSS_ENTROPY_FLOOR)))).sum())
        return cost, (truth - p).reshape(probabilities.shape)

    def sse(self, output, truth):
        """Darknet's l2 cost: sum of squared errors; delta = truth - output."""
        diff = truth - output.reshape(truth.shape)
        return float((diff * diff).sum()), diff.reshape(output.shape)

    # ---- optimisation -------------------------------------------------------------------------
    def sgd_update(self, param, gradient, velocity, learning_rate, momentum, decay, batch,
                   loss_scale=None):
        """Darknet's SGD step for one tensor, in place. `gradient` holds the summed negative
        gradients of the batch and is zeroed; `velocity` is the optimiser's state:
        v = momentum*v + gradient - decay*batch*p;  p += lr/batch * v;  gradient = 0.
        (Darknet keeps v and the gradient in one buffer, u = momentum*v before the backward
        pass adds to it: the same values.) With a loss-scale state (S, overflow): the step is
        skipped where overflow is set, else it uses gradient / S."""
        if loss_scale is not None:
            if loss_scale[1] != 0:
                gradient[...] = 0
                return
            gradient /= loss_scale[0]
        velocity *= np.float32(momentum)
        velocity += gradient
        if decay:
            velocity -= np.float32(decay * batch) * param
        param += np.float32(learning_rate / batch) * velocity
        gradient[...] = 0

    # ---- broadcasting arithmetic and reductions ------------------------------------------------
    def multiply(self, a, b):
        """a * b for NCHW arrays, b broadcast over any of its axes of size 1: a new array."""
        return np.multiply(a, b)

    def add(self, a, b, alpha=1.0, beta=1.0):
        """alpha*a + beta*b for NCHW arrays, b broadcast over any of its axes of size 1 (as in
        multiply): a new array shaped like a."""
        if alpha == 1 and beta == 1:
            return np.add(a, b)
        return np.float32(alpha) * a + np.float32(beta) * b

    def sum_to(self, x, shape, scale=1.0):
        """scale times the sum of x over the axes where `shape` (as many axes as x, at most six)
        has 1 and x does not: the adjoint of broadcasting to x's shape. A new array of `shape`."""
        axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
        y = np.ascontiguousarray(x.sum(axis=axes, keepdims=True).reshape(shape))
        if scale != 1:
            y *= np.float32(scale)
        return y

    # ---- strided views (views.py) --------------------------------------------------------------
    def empty(self, shape, like=None):
        """An uninitialised array (to be written whole before it is read), float32 or of like's
        dtype; channels innermost when like is (route and upsample outputs then keep the
        layout of inference convolutions, and copy runs of channels)."""
        if like is None:
            return np.empty(shape, np.float32)
        if len(shape) == 4 and self._channels_innermost(like):
            b, c, h, w = shape
            return np.empty((h, w, b, c), like.dtype).transpose(2, 3, 0, 1)
        return np.empty(shape, like.dtype)

    @staticmethod
    def _part(seen, view, materialise=True):
        """The window of view in `seen` (the array already reshaped and permuted): a numpy view,
        read-only where a step of 0 repeats an index."""
        slices, repeats = _window_slices(view)
        part = seen[slices]
        if not repeats:
            return part
        start, count, step = view.window[-1]
        if step == 0 and count > 1 and materialise:
            # repeats along the innermost axis: materialised, faster (in the view's order: not
            # for a channels-innermost source, whose copy would then transpose twice)
            part = np.repeat(part, count, axis=-1)
        return np.broadcast_to(part, view.counts)

    @staticmethod
    def _seen(array, view):
        seen = array.reshape(view.shape)
        return seen if view.axes is None else seen.transpose(view.axes)

    @contextlib.contextmanager
    def _writable(self, array, view):
        """The window of `view` in `array`, to write in: a numpy view where reshaping is free,
        else a contiguous copy written back afterwards."""
        part, written_back = self._target(array, view)
        yield part
        if written_back is not None:
            array[...] = written_back.reshape(array.shape)

    def _target(self, array, view):
        """(window to write in, None) where reshaping array is free, else (window of a
        contiguous copy, that copy to write back)."""
        shaped = array.reshape(view.shape)
        if np.may_share_memory(shaped, array):
            copy = None
        else:
            copy = shaped = np.ascontiguousarray(array).reshape(view.shape)
        seen = shaped if view.axes is None else shaped.transpose(view.axes)
        return self._part(seen, view), copy

    def strided_copy_(self, dst, dst_view, src, src_view, scale=1.0, shift=0.0,
                      accumulate=False):
        """dst[dst_view] = scale * src[src_view] + shift, or += that when `accumulate`, in place
        (views.py: the two windows hold the same counts; src may be dst itself, with the same
        view); returns dst."""
        views.check_pair(src_view, src.size, dst_view, dst.size)
        value = self._part(self._seen(src, src_view), src_view,
                           materialise=not self._channels_innermost(src))
        f = np.float32
        part, written_back = self._target(dst, dst_view)
        if accumulate:
            if scale != 1:
                value = value * f(scale)
            part += value
        elif scale != 1:
            np.multiply(value, f(scale), out=part)
        else:
            np.copyto(part, value)
        if shift:
            part += f(shift)
        if written_back is not None:
            dst[...] = written_back.reshape(dst.shape)
        return dst

    def channels_to_read(self, x, start, stop):
        """A view (no copy: the next layer copies its input into its own layout anyway)."""
        return x[:, start:stop]

    def softmax_(self, x, view, axis):
        """Softmax along `axis` of the window of `view` in x, in place (the largest value
        subtracted before exp); the rest of x unchanged. Returns x."""
        views.check(view, x.size)
        with self._writable(x, view) as part:
            z = np.exp(part - part.max(axis=axis, keepdims=True))
            part[...] = z / z.sum(axis=axis, keepdims=True)
        return x

    def channel_max(self, x, groups):
        """AlexeyAB's maxpool_depth: output channel g is the maximum over the input channels
        g, g + groups, g + 2*groups... at each position. Returns (y, argmax channel)."""
        b, c, h, w = x.shape
        y = np.empty((b, groups, h, w), x.dtype)
        winner = np.empty((b, groups, h, w), np.int32)
        for g in range(groups):
            members = x[:, g::groups]
            index = members.argmax(axis=1)  # the first maximum, as AlexeyAB's strict >
            y[:, g] = np.take_along_axis(members, index[:, None], axis=1)[:, 0]
            winner[:, g] = g + groups * index
        return y, winner

    def channel_max_backward(self, delta, winner, in_shape):
        """Each output's delta to the input channel that won it."""
        dx = np.zeros(in_shape, delta.dtype)
        groups = delta.shape[1]
        for k in range(in_shape[1]):
            dx[:, k] = np.where(winner[:, k % groups] == k, delta[:, k % groups], 0)
        return dx

    def local_avgpool(self, x, size, stride, pad, out_h, out_w):
        """Average pooling over maxpool_forward's windows (the first starting at (-pad, -pad)):
        the mean of each window's cells inside the input (cells outside are not counted)."""
        b, c, h, w = x.shape
        top = pad
        frame_h, frame_w = (out_h - 1) * stride + size, (out_w - 1) * stride + size
        padded = np.zeros((b, c, max(frame_h, top + h), max(frame_w, top + w)), x.dtype)
        padded[:, :, top:top + h, top:top + w] = x
        count = np.zeros(padded.shape[2:], x.dtype)
        count[top:top + h, top:top + w] = 1
        total = np.zeros((b, c, out_h, out_w), x.dtype)
        cells = np.zeros((out_h, out_w), x.dtype)
        for i in range(size):
            for j in range(size):
                total += self._pool_window(padded, i, j, stride, out_h, out_w)
                cells += count[i:i + stride * out_h:stride, j:j + stride * out_w:stride]
        return total / cells

    def local_avgpool_backward(self, delta, in_shape, size, stride, pad):
        """The adjoint of local_avgpool: each window's delta / its cell count, spread back."""
        b, c, h, w = in_shape
        out_h, out_w = delta.shape[2:]
        top = pad
        frame = (max((out_h - 1) * stride + size, top + h), max((out_w - 1) * stride + size, top + w))
        count = np.zeros(frame, delta.dtype)
        count[top:top + h, top:top + w] = 1
        cells = np.zeros((out_h, out_w), delta.dtype)
        for i in range(size):
            for j in range(size):
                cells += count[i:i + stride * out_h:stride, j:j + stride * out_w:stride]
        share = delta / cells
        padded = np.zeros((b, c) + frame, delta.dtype)
        for i in range(size):
            for j in range(size):
                self._pool_window(padded, i, j, stride, out_h, out_w)[...] += share
        return np.ascontiguousarray(padded[:, :, top:top + h, top:top + w])

    # ---- the [yolo] losses: dense part and cell gathers ---------------------------------------
    def truth_overlap(self, output, truths, anchors, entries, net_w, net_h, new_coords, classes,
                      class_gate):
        """Each prediction's best IoU with its image's truths and that truth's row, as declared.
        Computed in float64 for a few images at a time (boxes.image_chunks), and `best` stays
        float64 here: this backend is the reference the others are compared with."""
        batch, channels, height, width = output.shape
        count = channels // entries
        grid = output.reshape(batch, count, entries, height, width)
        rows = np.asarray(truths, dtype=np.float32).reshape(batch, -1, 5)
        usable = listed_truths(rows, classes)
        best = np.zeros((batch, count, height, width))
        index = np.full((batch, count, height, width), -1, np.int32)
        sizes = np.asarray(anchors, dtype=np.float64).reshape(count, 2)[:, :, None, None]
        cols, rows_of_cells = np.arange(width), np.arange(height)[:, None]
        for images in image_chunks(usable.sum(axis=1), count * height * width):
            predicted = box_edges(*prediction_boxes(
                np.moveaxis(grid[images, :, :4], 2, -1), cols, rows_of_cells, width, height,
                sizes[:, 0], sizes[:, 1], net_w, net_h, new_coords))
            numbers = [np.flatnonzero(usable[b]) for b in images]
            boxes = padded_truths([rows[b, n, :4] for b, n in zip(images, numbers)], np.float64)
            top = np.full(predicted[0].shape, -1.0)
            found = np.zeros(top.shape, np.int32)
            # truth by truth, the first largest wins; the padding's boxes (zeros) meet no
            # prediction (IoU 0), and come after each image's real truths
            for t in range(boxes.shape[-2]):
                iou = edges_iou_or_zero(predicted, box_edges(*(boxes[..., t, v] for v in range(4))))
                better = iou > top
                top = np.where(better, iou, top)
                row = np.array([n[t] if t < len(n) else 0 for n in numbers], np.int32)
                found = np.where(better, row[:, None, None, None], found)
            best[images], index[images] = top, found
        if class_gate is not None:
            best[~(grid[:, :, 5:] > class_gate).any(axis=2)] = 0
        return best, index

    def objectness_delta_(self, delta, output, best, entries, normalizer, ignore_thresh, smooth):
        """The objectness entries of delta, as declared (the rest untouched)."""
        objectness = output[:, 4::entries]
        value = np.float32(normalizer) * (0 - objectness)
        matched = best > ignore_thresh
        if smooth:
            value = np.where(matched, np.maximum(value, normalizer * (best - objectness)), value)
        else:
            value[matched] = 0
        delta[:, 4::entries] = value
        return delta

    @staticmethod
    def _cell_entries(cells, entries):
        """Index arrays picking the `entries` channels of each cell (b, a, j, i): (U, entries)."""
        b, a, j, i = (np.asarray(cells, dtype=np.int64).reshape(-1, 4)[:, k, None]
                      for k in range(4))
        return b, a * entries + np.arange(entries), j, i

    def gather_cells(self, x, cells, entries):
        """The entries of each cell, a host (U, entries) float32 array."""
        return np.asarray(x[self._cell_entries(cells, entries)], dtype=np.float32)

    def scatter_cells_(self, x, cells, values):
        """Each cell's entries set from values (U, entries), in place."""
        values = np.asarray(values, dtype=np.float32)
        if values.size:
            x[self._cell_entries(cells, values.shape[-1])] = values
        return x

    def sum_of_squares(self, x):
        """The sum of x's squares as one BLAS dot product (float32, summed in blocks)."""
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        return float(np.dot(flat, flat))

    # ---- loss scaling (a state (S, overflow): operations.py) -----------------------------------
    def apply_loss_scale_(self, delta, loss_scale):
        """delta *= S, in place."""
        delta *= loss_scale[0].astype(delta.dtype)
        return delta

    def flag_non_finite_(self, loss_scale, array):
        """overflow = 1 if `array` holds a NaN or an infinity."""
        if not np.isfinite(array).all():
            loss_scale[1] = 1
        return loss_scale

    def update_loss_scale_(self, loss_scale, dynamic, growth_interval):
        """(S, overflow, good, skipped) after an update, as declared, in float32."""
        scale, overflow, good, skipped = (np.float32(v) for v in loss_scale[:4])
        if overflow != 0:
            scale, good, skipped = scale * np.float32(0.5) if dynamic else scale, 0, skipped + 1
        else:
            good += 1
            if good >= growth_interval:
                scale, good = scale * np.float32(2) if dynamic else scale, 0
        loss_scale[:4] = scale, 0, good, skipped
        return loss_scale

    def to_host_async(self, array):
        """Nothing runs behind the host here: the values at once."""
        return ReadyRead(np.array(array, dtype=np.float32))

    # ---- the [yolo] losses' truth part (engine/backends/yolo_truths.py) -------------------------
    def apply_truth_events_(self, delta, output, truths, plan, loss):
        """The losses' own code round by round on the gathered cells (yolo_truths)."""
        from .yolo_truths import apply_truth_events

        return apply_truth_events(self, delta, output, truths, plan, loss)

    def int_array(self, host):
        return np.array(host, dtype=np.int32)

    def float64_values(self, array):
        return np.array(array, dtype=np.float64)

    def host_reader(self, array):
        """The work is done when issued: the reader copies the values now."""
        return _ValuesNow(np.array(array, dtype=np.float64))

    def output_reader(self, arrays):
        """The work is done when issued: to_host's arrays and all_finite's check, now."""
        return OutputsNow([self.to_host(a) for a in arrays],
                          all(self.all_finite(a) for a in arrays))


class _ValuesNow:
    def __init__(self, values):
        self._values = values

    def values(self):
        return self._values.copy()
