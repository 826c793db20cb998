"""Strided views: how a layer names a part of an array for the general operations
(strided_copy_, activate_ with a view, softmax_), so that each layer computes its geometry once
and the backends only follow it.

A View sees an array's elements, in logical NCHW order, as an array of `shape` (at most
MAX_AXES axes, the same number of elements), permutes its axes by `axes` (None: as they are),
and keeps, along each axis, the `count` indexes start, start + step, start + 2*step... given by
`window` (one (start, count, step) per axis; step may be negative, or 0 to repeat one index).
In numpy terms: array.reshape(shape).transpose(axes)[window's slices] (a step of 0 broadcasts).
"""

from functools import lru_cache
from math import prod
from typing import NamedTuple, Optional, Tuple

MAX_AXES = 6
# Layers build the same few views at every forward pass: made (and checked) once each.
_remembered = lru_cache(maxsize=4096)


class View(NamedTuple):
    shape: Tuple[int, ...]
    window: Tuple[Tuple[int, int, int], ...]
    axes: Optional[Tuple[int, ...]] = None

    @property
    def counts(self):
        """The shape of the window (what the view holds)."""
        return tuple(count for _, count, _ in self.window)


@_remembered
def whole(shape, axes=None):
    """Every element of an array seen as `shape`, its axes permuted by `axes`."""
    shape = tuple(int(n) for n in shape)
    seen = shape if axes is None else tuple(shape[a] for a in axes)
    return View(shape, tuple((0, n, 1) for n in seen), None if axes is None else tuple(axes))


@_remembered
def window(shape, *ranges):
    """The array seen as `shape`, cut along each axis by `ranges`: one (start, count, step) per
    axis, or None for the whole axis."""
    shape = tuple(int(n) for n in shape)
    cut = tuple((0, n, 1) if r is None else tuple(int(v) for v in r)
                for n, r in zip(shape, ranges + (None,) * (len(shape) - len(ranges))))
    return View(shape, cut)


@_remembered
def check(view, size):
    """ValueError unless `view` is a valid view of an array of `size` elements."""
    shape, cut, axes = view
    if len(shape) > MAX_AXES or len(cut) != len(shape) or prod(shape) != size:
        raise ValueError(f"view {view} does not fit an array of {size} elements")
    seen = shape if axes is None else tuple(shape[a] for a in axes)
    for n, (start, count, step) in zip(seen, cut):
        last = start + (count - 1) * step
        if count < 0 or (count and not (0 <= start < n and 0 <= last < n)):
            raise ValueError(f"view {view} reaches outside its array")


@_remembered
def check_pair(view, size, other, other_size):
    """check() both views, and that they hold the same counts (a copy between them)."""
    check(view, size)
    check(other, other_size)
    if view.counts != other.counts:
        raise ValueError(f"views {view} and {other} hold different counts")


def channels_last_strides(shape):
    """Element strides of an NCHW `shape` (batch, channels, height, width) whose elements are
    stored channels last (NHWC), as the CUDA backend stores fp16/bf16 inference activations."""
    b, c, h, w = (int(n) for n in shape)
    return (h * w * c, 1, w * c, c)


def _reshaped_strides(dims, steps, shape):
    """Element strides of an array of `dims` with element strides `steps`, seen as `shape` (the
    same elements in the same logical order): numpy's reshape without a copy. None where no
    strides express it (an axis of `shape` that spans axes not adjacent in memory)."""
    if 0 in dims:
        return (0,) * len(shape)
    old = [(n, s) for n, s in zip(dims, steps) if n != 1]
    new = [n for n in shape if n != 1]
    found = []
    i = j = 0
    while i < len(old):
        i_end, j_end = i + 1, j + 1
        old_size, new_size = old[i][0], new[j]
        while old_size != new_size:  # the smallest groups of axes holding the same elements
            if old_size < new_size:
                old_size *= old[i_end][0]
                i_end += 1
            else:
                new_size *= new[j_end]
                j_end += 1
        if any(old[k][1] != old[k + 1][0] * old[k + 1][1] for k in range(i, i_end - 1)):
            return None  # the old group is not one run of memory
        group, step = [], old[i_end - 1][1]
        for n in reversed(new[j:j_end]):
            group.append(step)
            step *= n
        found.extend(reversed(group))
        i, j = i_end, j_end
    found = iter(found)
    return tuple(0 if n == 1 else next(found) for n in shape)


@_remembered
def strides(view, channels_last=None):
    """(offset, counts, strides) of the view over the array's elements, each of counts and
    strides padded in front to MAX_AXES entries (counts 1, strides 0): the geometry the CUDA
    kernels walk. The array's elements are contiguous NCHW, or, where `channels_last` gives its
    (batch, channels, height, width), stored NHWC: then ValueError where the view's shape merges
    axes that NHWC does not keep adjacent (channels with positions)."""
    shape, cut, axes = view
    if channels_last is None:
        element = [0] * len(shape)
        step = 1
        for axis in range(len(shape) - 1, -1, -1):
            element[axis] = step
            step *= shape[axis]
    else:
        found = _reshaped_strides(tuple(int(n) for n in channels_last),
                                  channels_last_strides(channels_last), shape)
        if found is None:
            raise ValueError(f"view {view} does not fit an array stored channels last")
        element = list(found)
    if axes is not None:
        element = [element[a] for a in axes]
    offset = sum(start * e for (start, _, _), e in zip(cut, element))
    pad = MAX_AXES - len(cut)
    counts = (1,) * pad + tuple(count for _, count, _ in cut)
    steps = (0,) * pad + tuple(s * e for (_, _, s), e in zip(cut, element))
    return offset, counts, steps
