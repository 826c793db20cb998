"""CUDA graph capture of a whole step (forward, backward, update) through cuda-bindings.

At MNIST sizes each cuDNN call costs tens of microseconds of host time, more than the GPU work;
a captured graph replays the step's ~50 launches with one. A captured step reuses the same
buffers every replay, so everything allocated while capturing is kept alive with the graph, and
the values that change per step (learning rate, dropout seed) are read by the kernels from device
memory that each replay refreshes (CudaBackend.recording and set_step).
"""

import numpy as np

from ...errors import BackendError
from . import host_copies
from .libraries import cuda_driver


def _check(driver, result, call):
    error = result[0] if isinstance(result, tuple) else result
    if error != driver.CUresult.CUDA_SUCCESS:
        raise BackendError(f"CUDA driver call {call} failed: {error}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


class CapturedStep:
    """One recorded step: made by CudaBackend.capture, replayed with a new learning rate (and
    dropout seed) each time. The backend's recording() sets up what a recording needs (step
    values read from device memory, allocations kept alive); set_step refreshes those values."""

    def __init__(self, backend, step):
        self.backend = backend
        self.driver = driver = cuda_driver()
        self.stream = driver.CUstream(backend.stream.handle)
        self.replays = 0
        backend.synchronize()
        with backend.recording() as self.keep_alive:
            _check(driver, driver.cuStreamBeginCapture(
                self.stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED),
                "cuStreamBeginCapture")
            try:
                self.result = step()
            finally:
                backend._join_recorded_copies()
                graph = _check(driver, driver.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        self.graph = graph
        self.executable = _check(driver, driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self, learning_rate=0.0):
        """Launch the graph once more (asynchronously) with this step's learning rate."""
        self.replays += 1
        self.backend.set_step(learning_rate, self.replays)
        _check(self.driver, self.driver.cuGraphLaunch(self.executable, self.stream),
               "cuGraphLaunch")

    def last_cost(self):
        """The cost of the latest replay (synchronises)."""
        return self.backend.last_cost()


class _ExternalEvent:
    """An event recorded at this point of the backend's stream, or of `stream` (in a recording:
    an external event node, CU_EVENT_RECORD_EXTERNAL, that each replay records), which wait()
    waits for, not for the rest of the stream's work."""

    def __init__(self, backend, stream=None):
        self.driver = driver = cuda_driver()
        self.event = _check(driver, driver.cuEventCreate(
            int(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)), "cuEventCreate")
        stream = driver.CUstream((stream or backend.stream).handle)
        if backend._recording:  # (the external flag is valid only while capturing)
            _check(driver, driver.cuEventRecordWithFlags(
                self.event, stream, int(driver.CUevent_record_flags.CU_EVENT_RECORD_EXTERNAL)),
                "cuEventRecordWithFlags")
        else:
            _check(driver, driver.cuEventRecord(self.event, stream), "cuEventRecord")

    def wait(self):
        _check(self.driver, self.driver.cuEventSynchronize(self.event), "cuEventSynchronize")

    def __del__(self):
        event = getattr(self, "event", None)
        if event is not None:
            self.driver.cuEventDestroy(event)


class HostReader:
    """CudaBackend.host_reader: a small device array copied into page-locked host memory at this
    point of the stream (in a recording, a copy node of each replay), and an event recorded
    after the copy (in a recording, an external event node: CU_EVENT_RECORD_EXTERNAL) that
    values() waits for, not for the rest of the stream's work."""

    def __init__(self, backend, array):
        self.host = backend.cuda.pagelocked_empty(tuple(array.shape), array.dtype)
        backend.cuda.memcpy_dtoh_async(self.host, array.ptr, backend.stream)
        self.copied = _ExternalEvent(backend)

    def values(self):
        self.copied.wait()
        return np.array(self.host, dtype=np.float64)


class OutputReader:
    """CudaBackend.output_reader while recording: float32 outputs and their finiteness flag
    (an int, 0 when every value is finite) copied into page-locked host buffers on `stream` (the
    backend's copy stream, forked from its main stream at this point of each replay); values()
    waits for those copies and returns fresh arrays (the buffers are the next replay's)."""

    def __init__(self, backend, arrays, flag, stream):
        cuda = backend.cuda
        self.hosts = [cuda.pagelocked_empty(tuple(a.shape), np.float32) for a in arrays]
        for host, array in zip(self.hosts, arrays):
            if array.size:
                cuda.memcpy_dtoh_async(host, array.ptr, stream)
        self.flag = cuda.pagelocked_empty((1,), np.int32)
        cuda.memcpy_dtoh_async(self.flag, flag.ptr, stream)
        self.copied = _ExternalEvent(backend, stream)

    def values(self):
        self.copied.wait()
        return ([host_copies.copy(np.empty_like(host), host) for host in self.hosts],
                not self.flag[0])
