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

import os
import struct
import tempfile

import numpy as np

from .errors import WeightsError

VERSION = (0, 2, 0)  # what Darknet writes
HEADER_LIMIT = 100000  # larger major/minor/revision values mean the file is not a weights file


def _layer_name(layer):
    return f"layer {layer.index} [{layer.type_name}] ({layer.where()})"


def read_header(data, path):
    if len(data) < 16:
        raise WeightsError(f"{path}: {len(data)} bytes is too short for a .weights header")
    major, minor, revision = struct.unpack_from("<3i", data, 0)
    if not all(0 <= v < HEADER_LIMIT for v in (major, minor, revision)):
        raise WeightsError(f"{path}: unknown header (version {major}.{minor}.{revision}); "
                           "is this a Darknet .weights file?")
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        (seen,) = struct.unpack_from("<Q", data, 12)
        offset = 20
    else:
        (seen,) = struct.unpack_from("<i", data, 12)
        offset = 16
    transposed = major > 1000 or minor > 1000
    return (major, minor, revision), seen, transposed, offset


def load(net, path):
    """Fill `net`'s layers from `path`. Returns the number of layers the file covered."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except OSError as error:
        raise WeightsError(f"{path}: cannot read weights file ({error.strerror})") from None
    _, seen, transposed, offset = read_header(data, path)
    total = len(data)
    loaded = 0
    arrays = []
    for layer in net.layers:
        if not layer.weight_order:
            continue
        if offset == total:
            break  # a partial file: it covers only the layers before this one
        for name in layer.weight_order:
            shape = layer.params[name].shape
            count = int(np.prod(shape))
            if offset + 4 * count > total:
                raise WeightsError(
                    f"{path}: truncated inside {_layer_name(layer)}: '{name}' needs {4 * count} bytes "
                    f"at offset {offset}, but the file has {total - offset} left")
            # a copy: arrays over the file's bytes would be read-only, and training writes them
            values = np.frombuffer(data, dtype="<f4", count=count, offset=offset).copy()
            offset += 4 * count
            if name == "weights" and transposed and layer.type_name == "connected":
                values = values.reshape(shape[::-1]).T
            arrays.append((layer, name, values.reshape(shape)))
        loaded = layer.index + 1
    if offset != total:
        raise WeightsError(f"{path}: {total - offset} bytes left over after the last layer; "
                           f"the file is for a larger network than {net.cfg_path}")
    for layer, name, values in arrays:
        layer.params[name] = net.ops.asarray(values)
    net.seen = seen
    return loaded


def save(net, path, cutoff=None):
    """Write `net` (its first `cutoff` layers, if given) as Darknet 0.2.0 weights, atomically."""
    parts = [struct.pack("<3iQ", *VERSION, int(net.seen))]
    for layer in net.layers[:cutoff]:
        for name in layer.weight_order:
            parts.append(net.ops.to_host(layer.params[name]).astype("<f4").tobytes())
    write_atomically(path, b"".join(parts))


def write_atomically(path, payload):
    folder = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".weights", dir=folder)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError):  # a full disk, a read-only or missing folder: one line
            raise WeightsError(f"{path}: cannot write weights file "
                               f"({error.strerror or error})") from None
        raise
