"""How much memory a network needs and how much the machine can give, compared before anything
large is allocated, so a cfg that cannot fit fails with the estimate and what to change instead
of swapping, being killed, or failing deep inside numpy or the GPU allocator.

The estimate is deliberately simple: float32 parameters with their gradient buffers (and, for
training, the optimiser's velocities), and for a batch every layer's output (the network keeps
them all: routes and the backward pass read them) times a factor for what the layers keep
beside it (deltas, batch-norm caches, temporaries). `ENGINE_MEMORY_LIMIT` (bytes, or with a
K/M/G suffix) caps what the engine lets itself use, for shared machines and for the tests.
"""

import math
import os
import resource

from .errors import ConfigError

LIMIT_VARIABLE = "ENGINE_MEMORY_LIMIT"
FLOAT_BYTES = 4
# Bytes per parameter while a layer is built: its float64 random draw, the float32 value and the
# float32 update buffer.
BUILD_BYTES_PER_PARAMETER = 8 + 2 * FLOAT_BYTES
PARAMETER_BYTES = 2 * FLOAT_BYTES  # value and update buffer, once built
# Per output value of a layer: the output itself and the scratch the backend uses beside it
# (inference), or with the delta and batch-norm caches (training).
ACTIVATION_FACTOR = {False: 2, True: 4}
WORKSPACE_BYTES = 1 << 28  # im2col blocks on the CPU, convolution workspaces on the GPU


def parse_size(text):
    """'2G', '512M', '1000000' -> bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ConfigError(f"{LIMIT_VARIABLE}={text}: expected a size such as 4G or 512M") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{LIMIT_VARIABLE}={text}: expected a positive size")
    return int(value)


def host_available():
    """Bytes the host can still give this process: MemAvailable, the address-space limit and
    ENGINE_MEMORY_LIMIT, whichever is smallest."""
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            limits.append(1 << 62)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(max(soft - _address_space_used(), 0))
    return limited(min(limits))


def _address_space_used():
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def limited(available):
    """`available` (a backend's figure) capped by ENGINE_MEMORY_LIMIT."""
    configured = os.environ.get(LIMIT_VARIABLE)
    return min(available, parse_size(configured)) if configured else available


def format_bytes(count):
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class ParameterBudget:
    """Checks each layer's parameters against the host's memory before the layer draws them."""

    def __init__(self):
        self.available = host_available()
        self.reserved = 0

    def reserve(self, layer, count):
        need = count * BUILD_BYTES_PER_PARAMETER
        if self.reserved + need > self.available:
            raise ConfigError(
                f"{layer.where()} has {count} parameters ({format_bytes(count * FLOAT_BYTES)}); "
                f"with the layers before it the network needs about "
                f"{format_bytes(self.reserved + need)} to build, more than the "
                f"{format_bytes(self.available)} available: lower filters, size or output")
        self.reserved += count * PARAMETER_BYTES


def check_network(net, batch, train, available, device):
    """Refuse (ConfigError) a forward (and backward, when `train`) of `batch` images that would
    need more than `available` bytes on `device`; the message gives the estimate, the layer with
    the largest output and what to change."""
    parameters = sum(value.size for layer in net.layers for value in layer.params.values())
    parameter_bytes = parameters * PARAMETER_BYTES
    if train:  # the optimiser's velocities, one per trained value (made at the first update)
        parameter_bytes += FLOAT_BYTES * sum(value.size for layer in net.layers
                                             for value in layer.updates.values())
    per_image = [math.prod(net.input_shape) * FLOAT_BYTES]
    per_image += [layer.outputs * FLOAT_BYTES for layer in net.layers]
    activation_bytes = batch * sum(per_image) * ACTIVATION_FACTOR[train]
    total = parameter_bytes + activation_bytes + WORKSPACE_BYTES
    if total <= available:
        return total
    largest = max(net.layers, key=lambda layer: layer.outputs)
    if activation_bytes >= parameter_bytes:
        advice = ("raise subdivisions in [net] (smaller mini-batches)" if train and batch > 1
                  else "lower batch" if batch > 1 else "lower width and height in [net]")
        advice += ", or lower width/height or the filters of the largest layers"
    else:
        advice = "lower filters, size or output of the largest layers"
    raise ConfigError(
        f"{net.cfg_path}: {'training' if train else 'running'} a batch of {batch} needs about "
        f"{format_bytes(total)} ({format_bytes(parameter_bytes)} parameters, "
        f"{format_bytes(activation_bytes)} activations; the largest output is layer "
        f"{largest.index} [{largest.type_name}] ({largest.where()}), "
        f"{format_bytes(largest.outputs * FLOAT_BYTES)} per image), more than the "
        f"{format_bytes(available)} available on the {device}: {advice}")
