"""The output activation of the anchor-based detection layers ([yolo], [region],
[Gaussian_yolo]), composed once from the backend's general operations on strided views."""

from ..backends.views import window


def anchor_activate(ops, x, anchors, logistic_ranges, softmax_range=None, affines=()):
    """x (B, anchors*E, H, W) holds, per anchor, E entries (x, y, w, h, objectness, classes...)
    each an H x W plane. Returns a new array: the logistic 1/(1+exp(-v)) on entries
    [start, stop) for each (start, stop) in `logistic_ranges`, a softmax over entries
    [start, stop) of `softmax_range` at each (anchor, position), every other entry unchanged;
    then v*scale + shift on entries [start, stop) for each (start, stop, scale, shift) in
    `affines` (AlexeyAB's scale_x_y). One copy, then one pass per range."""
    b, channels, h, w = (int(n) for n in x.shape)
    shape = (b, anchors, channels // anchors, h * w)

    def entries(start, stop):
        return window(shape, None, None, (start, stop - start, 1))

    y = ops.copy(x)
    for start, stop in logistic_ranges:
        ops.activate_(y, "logistic", entries(start, stop))
    if softmax_range is not None:
        ops.softmax_(y, entries(*softmax_range), axis=2)
    for start, stop, scale, shift in affines:
        part = entries(start, stop)
        ops.strided_copy_(y, part, y, part, scale=scale, shift=shift)
    return y
