"""The Darknet .weights format: read into a network's layers, write from them.

Little-endian. Header: int32 major, minor, revision; then `seen` as uint64 when
major*10+minor >= 2 (and neither is >= 1000), else int32. Then each layer's parameters in cfg
order, in the layer's `weight_order` (conv: biases, [scales, mean, variance], weights; connected:
biases, weights, [scales, mean, variance]; batchnorm: scales, mean, variance). When major or
minor is above 1000, connected weights are stored transposed.

Unlike Darknet we check sizes: a file may stop at a layer boundary (Darknet's `partial` makes
such files, and they fill the first layers of a larger network), but one that ends inside a layer
or has bytes left over is an error. Writes are atomic: a crash never leaves a half-written file
under the final name.
"""

import math
import os
import struct
import tempfile

import numpy as np

from .config import check_regular_file
from .errors import NumericalError, WeightsError

VERSION = (0, 2, 0)  # what Darknet writes
HEADER_LIMIT = 100000  # larger major/minor/revision values mean the file is not a weights file
SEEN_LIMIT = 1 << 48  # images; a larger `seen` is a damaged header, not a training history
TEMPORARY_PREFIX = ".tmp-"


def _layer_name(layer):
    return f"layer {layer.index} [{layer.type_name}] ({layer.where()})"


def read_header(data, path):
    """(version, seen, transposed, header bytes) from the first 20 bytes of a weights file."""
    if len(data) < 16:
        raise WeightsError(f"{path}: {len(data)} bytes is too short for a .weights header")
    major, minor, revision = struct.unpack_from("<3i", data, 0)
    if not all(0 <= v < HEADER_LIMIT for v in (major, minor, revision)):
        raise WeightsError(f"{path}: unknown header (version {major}.{minor}.{revision}); "
                           "is this a Darknet .weights file?")
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        if len(data) < 20:
            raise WeightsError(f"{path}: {len(data)} bytes is too short for a version "
                               f"{major}.{minor} .weights header (20 bytes)")
        (seen,) = struct.unpack_from("<Q", data, 12)
        offset = 20
    else:
        (seen,) = struct.unpack_from("<i", data, 12)
        offset = 16
    if not 0 <= seen <= SEEN_LIMIT:
        raise WeightsError(f"{path}: the header says {seen} images were seen in training, which "
                           "no training run reaches; the header is damaged")
    transposed = major > 1000 or minor > 1000
    return (major, minor, revision), seen, transposed, offset


def _open_regular(path):
    """An open binary handle and the size of `path`, which must be a regular file: a FIFO or a
    device (/dev/zero) would hang or never end."""
    try:
        check_regular_file(path, ".weights", WeightsError)
        handle = open(path, "rb")
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, expected a .weights file") from None
    except OSError as error:
        raise WeightsError(f"{path}: cannot read weights file ({error.strerror})") from None
    return handle, os.fstat(handle.fileno()).st_size


def _layout(net):
    """[(layer, name, shape, count)] in file order, and the float counts at which a file may end
    (after each layer with parameters: `partial` files stop there)."""
    entries, boundaries, total = [], [0], 0
    for layer in net.layers:
        for name in layer.weight_order:
            shape = layer.params[name].shape
            count = math.prod(shape)
            entries.append((layer, name, shape, count))
            total += count
        if layer.weight_order:
            boundaries.append(total)
    return entries, boundaries


def load(net, path):
    """Fill `net`'s layers from `path`. Returns the number of layers the file covered.

    The file's size is checked against the network before anything is read, every value must be
    finite, and the arrays are the network's own (writable) copies."""
    entries, boundaries = _layout(net)
    handle, size = _open_regular(path)
    with handle:
        try:
            _, seen, transposed, offset = read_header(handle.read(20), path)
        except OSError as error:
            raise WeightsError(f"{path}: cannot read weights file ({error.strerror})") from None
        floats, remainder = divmod(size - offset, 4)
        if remainder or floats not in boundaries:
            raise WeightsError(_mismatch(net, path, size - offset, boundaries, entries))
        handle.seek(offset)
        arrays, loaded, done = [], 0, 0
        for layer, name, shape, count in entries:
            if done == floats:
                break  # a partial file: it covers only the layers before this one
            try:
                values = np.fromfile(handle, dtype="<f4", count=count)
            except (OSError, ValueError) as error:
                raise WeightsError(f"{path}: cannot read weights file ({error})") from None
            if values.size != count:
                raise WeightsError(f"{path}: the file changed while it was read")
            if not np.isfinite(values).all():
                bad = int(np.count_nonzero(~np.isfinite(values)))
                raise WeightsError(f"{path}: {_layer_name(layer)} '{name}' holds {bad} NaN or "
                                   "infinite values; the weights are damaged (was training "
                                   "diverging when they were saved?)")
            done += count
            if name == "weights" and transposed and layer.type_name == "connected":
                values = values.reshape(shape[::-1]).T
            arrays.append((layer, name, values.reshape(shape).astype(np.float32, order="C")))
            loaded = layer.index + 1
    for layer, name, values in arrays:
        layer.params[name] = net.ops.asarray(values)
    net.seen = seen
    return loaded


def _mismatch(net, path, payload_bytes, boundaries, entries):
    """The message for a file whose size fits neither the whole network nor a prefix of it."""
    floats = payload_bytes / 4
    needed = boundaries[-1]
    if payload_bytes % 4 == 0 and floats < needed:
        # Where it stops: inside a layer, so it is cut short or for another network.
        done = 0
        for layer, name, _, count in entries:
            if done + count > floats:
                return (f"{path}: holds {int(floats)} weights after its header, which ends inside "
                        f"{_layer_name(layer)} ('{name}'); {net.cfg_path} needs {needed} (or a "
                        "count that ends at a layer, for a partial file): the file is cut short "
                        "or was written for another network")
            done += count
    if payload_bytes % 4:
        return (f"{path}: {payload_bytes} bytes after the header are not whole float32 values; "
                "is this a Darknet .weights file?")
    return (f"{path}: holds {int(floats)} weights after its header, {payload_bytes - 4 * needed} "
            f"bytes more than the {needed} that {net.cfg_path} needs: the file was written for "
            "another (larger) network")


def save(net, path, cutoff=None):
    """Write `net` (its first `cutoff` layers, if given) as Darknet 0.2.0 weights, atomically."""
    parts = [struct.pack("<3iQ", *VERSION, min(max(int(net.seen), 0), SEEN_LIMIT))]
    for layer in net.layers[:cutoff]:
        for name in layer.weight_order:
            values = net.ops.to_host(layer.params[name])
            if not np.isfinite(values).all():  # such a file could not be loaded again
                raise NumericalError(f"{path}: not written: {_layer_name(layer)} '{name}' "
                                     "holds NaN or infinite values")
            parts.append(values.astype("<f4").tobytes())
    write_atomically(path, b"".join(parts))


def write_atomically(path, payload):
    """Write `payload` to a temporary file beside `path`, then rename it: a crash never leaves a
    half-written file under the final name. The temporary name holds our process id, so a later
    save removes those that a killed process left behind. The file gets the usual permissions
    (0666 less the umask), not the temporary file's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(folder)
        handle, temporary = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-",
                                             suffix=".weights", dir=folder)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fchmod(stream.fileno(), 0o666 & ~_umask())
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError):  # a full disk, a read-only or missing folder: one line
            raise WeightsError(f"{path}: cannot write weights file "
                               f"({error.strerror or error})") from None
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(folder):
    """Delete temporary files of earlier saves whose process no longer runs (killed mid-write)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(TEMPORARY_PREFIX) and name.endswith(".weights")):
            continue
        pid = name[len(TEMPORARY_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue  # another process is writing it now
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _process_alive(pid):
    if pid == os.getpid():
        return False  # our own earlier write was interrupted; it is not in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
