"""Channel plumbing the layers share ([route], [shortcut]'s weighted form, [reorg]'s extra,
[detection]), composed from the backend's general strided_copy_: one copy per input."""

from functools import lru_cache

from ..backends.views import whole, window


def _planes(shape):
    """An NCHW shape seen as (batch, channels, positions)."""
    b, c = int(shape[0]), int(shape[1])
    positions = 1
    for n in shape[2:]:
        positions *= int(n)
    return b, c, positions


@lru_cache(maxsize=4096)
def _channel_range(shape, start, count):
    return window(_planes(shape), None, (start, count, 1))


def channel_range(shape, start, count):
    """The View of channels [start, start + count) of an NCHW array."""
    return _channel_range(tuple(shape), start, count)


def channel_slice(ops, x, start, stop):
    """Channels [start, stop) of x, as a new array."""
    y = ops.empty((x.shape[0], stop - start) + tuple(x.shape[2:]), like=x)
    return ops.strided_copy_(y, whole(_planes(y.shape)), x,
                             channel_range(x.shape, start, stop - start))


def concat_channels(ops, parts):
    """The arrays' channels, one after the other, as a new array; a part is an array (all its
    channels) or (array, start, stop) for its channels [start, stop)."""
    parts = [(p, 0, int(p.shape[1])) if hasattr(p, "shape") else p for p in parts]
    first = parts[0][0]
    total = sum(stop - start for _, start, stop in parts)
    y = ops.empty((first.shape[0], total) + tuple(first.shape[2:]), like=first)
    at = 0
    for x, start, stop in parts:
        ops.strided_copy_(y, channel_range(y.shape, at, stop - start), x,
                          channel_range(x.shape, start, stop - start))
        at += stop - start
    return y


def copy_channels_(ops, dst, start, src):
    """dst's channels [start, start + C) = src (C channels), the copy concat_channels makes
    for one part; returns dst."""
    count = int(src.shape[1])
    return ops.strided_copy_(dst, channel_range(dst.shape, start, count), src,
                             channel_range(src.shape, 0, count))


def add_channel_slice_(ops, dst, start, src):
    """dst's channels [start, start + C) += src (C channels); returns dst."""
    count = int(src.shape[1])
    return ops.strided_copy_(dst, channel_range(dst.shape, start, count), src,
                             whole(_planes(src.shape)), accumulate=True)
