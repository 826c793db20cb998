"""One GPU: its context, the stream every operation is issued on, and pooled memory.

Everything runs on one non-default stream, so the work of a step is ordered without host
synchronisation and can be captured into a CUDA graph (the legacy default stream cannot be).
Device memory comes from PyCUDA's pool: a freed array's memory is reused by later arrays of the
same size class without a cudaMalloc; reuse is safe because all work is ordered on the stream.
"""

import atexit
import math

import numpy as np

from ...errors import BackendError
from .libraries import import_package

_DEVICES = {}  # device index -> Device; one context per process and GPU
MAX_LAYOUTS = 4096  # (shape, dtype) pairs whose array attributes Device keeps (_made_like)


def import_pycuda():
    cuda = import_package("pycuda.driver")  # a BackendError naming the package if missing
    import pycuda.gpuarray as gpuarray
    import pycuda.tools as tools
    return cuda, gpuarray, tools


class Device:
    def __init__(self, index):
        cuda, self.gpuarray, tools = import_pycuda()
        self.cuda = cuda
        try:
            cuda.init()
            count = cuda.Device.count()
        except cuda.Error as error:
            raise BackendError(f"no usable NVIDIA driver: {error}") from None
        if count == 0:
            raise BackendError("no NVIDIA GPU found")
        if not 0 <= index < count:
            raise BackendError(f"GPU {index} does not exist; this machine has {count} "
                               f"(0..{count - 1})")
        self.index = index
        self.handle = cuda.Device(index)
        self.name = self.handle.name()
        # The primary context is the one the CUDA runtime (used by cuDNN and cuBLAS) also uses.
        self.context = self.handle.retain_primary_context()
        self.context.push()
        atexit.register(self._close)
        self.stream = cuda.Stream()
        self.pool = tools.DeviceMemoryPool()
        # While a CUDA graph is being captured every allocation is kept alive with the graph.
        self.keep_alive = None
        self._layouts = {}  # (shape, dtype) -> a new array's attributes (_made_like)

    def _close(self):
        try:
            self.stream.synchronize()
            self.pool.stop_holding()
            self.context.pop()
        except Exception:  # the process is exiting; nothing useful to report
            pass

    def allocate(self, nbytes):
        try:
            return self.pool.allocate(nbytes)
        except self.cuda.MemoryError:
            self.pool.free_held()
            try:
                return self.pool.allocate(nbytes)
            except self.cuda.MemoryError:
                free, total = self.cuda.mem_get_info()
                raise BackendError(
                    f"out of GPU memory on {self.name}: {nbytes / 2**20:.1f} MiB asked, "
                    f"{free / 2**20:.0f} of {total / 2**20:.0f} MiB free; raise subdivisions in "
                    "the cfg's [net] section to use smaller mini-batches") from None

    def empty(self, shape, dtype=np.float32):
        array = self._made_like(shape, dtype)
        array.gpudata = self.allocate(array.nbytes) if array.size else None
        if self.keep_alive is not None:
            self.keep_alive.append(array)
        return array

    def view(self, array, shape):
        """`array`'s memory as a C-contiguous array of `shape` (one -1 is inferred), holding
        `array` alive: pycuda's reshape, without its cost."""
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(array.size // known if known and s == -1 else s for s in shape)
        if math.prod(shape) != array.size or min(shape, default=0) < 0:
            raise ValueError(f"cannot view {array.size} elements as {shape}")
        result = self._made_like(shape, array.dtype)
        result.gpudata, result.base = array.gpudata, array
        return result

    def _made_like(self, shape, dtype):
        """A GPUArray of shape and dtype, no memory yet. Made by copying the attributes of one
        made once per (shape, dtype) by GPUArray's constructor: the constructor costs 5 us of
        host time on an H200 (it recomputes strides and a launch grid from the driver's device
        data), the copy 1.2 us, and a small network's eager step makes dozens of arrays."""
        key = (shape, dtype)
        try:
            attributes = self._layouts[key]
        except (KeyError, TypeError):  # new, or an unhashable shape (a list)
            shape = tuple(int(s) for s in shape)
            made = self.gpuarray.GPUArray(shape, dtype, allocator=self.allocate, gpudata=0)
            attributes = dict(made.__dict__, gpudata=None)
            if len(self._layouts) >= MAX_LAYOUTS:  # shapes of many input sizes: start over
                self._layouts.clear()
            if isinstance(key[0], tuple):
                self._layouts[key] = attributes
        array = self.gpuarray.GPUArray.__new__(self.gpuarray.GPUArray)
        array.__dict__.update(attributes)
        return array

    def memory_free(self):
        """Free device memory, counting what our pool holds for reuse as free."""
        free, _ = self.cuda.mem_get_info()
        held = getattr(self.pool, "managed_bytes", 0) - getattr(self.pool, "active_bytes", 0)
        return free + max(held, 0)

    def memory_used(self):
        free, total = self.cuda.mem_get_info()
        return total - free


def get_device(index):
    if index not in _DEVICES:
        _DEVICES[index] = Device(index)
    return _DEVICES[index]
