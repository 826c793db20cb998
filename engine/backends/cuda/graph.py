"""CUDA graph capture of a whole step (forward, backward, update) through cuda-bindings.

At MNIST sizes each cuDNN call costs tens of microseconds of host time, more than the GPU work;
a captured graph replays the step's ~50 launches with one. A captured step reuses the same
buffers every replay, so everything allocated while capturing is kept alive with the graph, and
the values that change per step (learning rate, dropout seed) are read by the kernels from device
memory that each replay refreshes.
"""

import numpy as np

from ...errors import BackendError
from .libraries import cuda_driver

RING = 1024  # pinned slots for per-step values; the stream is drained once per wrap


def _check(driver, result, call):
    error = result[0] if isinstance(result, tuple) else result
    if error != driver.CUresult.CUDA_SUCCESS:
        raise BackendError(f"CUDA driver call {call} failed: {error}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


class CapturedStep:
    def __init__(self, backend, step):
        self.backend = backend
        self.driver = driver = cuda_driver()
        device, cuda = backend.device, backend.cuda
        self.stream = driver.CUstream(device.stream.handle)
        # [learning rate (float32), dropout seed (uint32)] on the device, and pinned host slots.
        self.step_values = device.empty((2,), np.uint32)
        self.host_values = cuda.pagelocked_empty((RING, 2), np.uint32)
        self.replays = 0
        backend.synchronize()
        device.keep_alive = self.keep_alive = []
        backend.step_learning_rate = self.step_values.ptr
        backend.step_seed = self.step_values.ptr + 4
        backend.capturing = True
        try:
            _check(driver, driver.cuStreamBeginCapture(
                self.stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED),
                "cuStreamBeginCapture")
            try:
                self.result = step()
            finally:
                graph = _check(driver, driver.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        finally:
            backend.capturing = False
            backend.step_learning_rate = backend.step_seed = None
            device.keep_alive = None
        self.graph = graph
        self.executable = _check(driver, driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self, learning_rate=0.0):
        """Launch the graph once more (asynchronously) with this step's learning rate."""
        slot = self.replays % RING
        if slot == 0 and self.replays:
            self.backend.synchronize()  # every slot's copy has run before slots are reused
        self.replays += 1
        values = self.host_values[slot]
        values[0] = np.float32(learning_rate).view(np.uint32)
        values[1] = (self.backend._seed * 0x9E3779B1 + self.replays) & 0xFFFFFFFF
        self.backend.cuda.memcpy_htod_async(self.step_values.ptr, values, self.backend.stream)
        _check(self.driver, self.driver.cuGraphLaunch(self.executable, self.stream),
               "cuGraphLaunch")

    def last_cost(self):
        """The cost of the latest replay (synchronises)."""
        return self.backend.last_cost()
