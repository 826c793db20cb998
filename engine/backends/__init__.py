"""Compute backends: each implements the operation set the layers call, declared once in
operations.py (`Operations`).

`numpy_backend.NumpyBackend` is the CPU reference. The CUDA backend lives in `cuda/` and is
imported only when asked for, so the CPU engine needs nothing beyond numpy.
"""

from ..errors import BackendError
from .numpy_backend import NumpyBackend


def get_backend(name="cpu", device=0, seed=0, allow_tf32=False):
    """'cpu' -> NumpyBackend; 'gpu' -> the CUDA backend on `device` (BackendError if unusable).
    allow_tf32 lets cuDNN convolutions use TF32 tensor cores, as PyTorch does by default."""
    if name == "cpu":
        return NumpyBackend(seed=seed)
    if name == "gpu":
        try:
            from .cuda import CudaBackend
        except ImportError as error:
            raise BackendError(f"the GPU backend is not available: {error}") from None
        return CudaBackend(device=device, seed=seed, allow_tf32=allow_tf32)
    raise BackendError(f"unknown backend '{name}'; expected 'cpu' or 'gpu'")
