"""The CUDA backend: PyCUDA kernels (kernels/*.cu), cuDNN through a small ctypes binding of its
legacy API, cuBLAS through scikit-cuda. Imported only when the GPU backend is asked for."""

from .backend import CudaBackend

__all__ = ["CudaBackend"]
