"""Compute backends: each implements the operation set the layers call, declared once in
operations.py (`Operations`).

`numpy_backend.NumpyBackend` is the CPU reference. The CUDA backend lives in `cuda/` and is
imported only when asked for, so the CPU engine needs nothing beyond numpy.
"""

from ..errors import BackendError
from ..precision import check_precision
from .numpy_backend import NumpyBackend


def get_backend(name="cpu", device=0, seed=0, allow_tf32=False, precision=None):
    """'cpu' -> NumpyBackend; 'gpu' -> the CUDA backend on `device` (BackendError if unusable).
    precision: 'fp32' (default), 'tf32', 'fp16' or 'bf16' (engine/precision.py; the CPU computes
    in fp32 only); allow_tf32=True is the older spelling of precision='tf32'."""
    precision = precision or ("tf32" if allow_tf32 else "fp32")
    if name in ("cpu", "gpu"):
        check_precision(precision, name)
    if name == "cpu":
        return NumpyBackend(seed=seed)
    if name == "gpu":
        try:
            from .cuda import CudaBackend
        except ImportError as error:
            raise BackendError(f"the GPU backend is not available: {error}") from None
        return CudaBackend(device=device, seed=seed, precision=precision)
    raise BackendError(f"unknown backend '{name}'; expected 'cpu' or 'gpu'")
