"""The CUDA backend: PyCUDA kernels (kernels/*.cu), cuDNN (its legacy API, cudnn.py, and its
graph API for fused convolutions, cudnn_graph.py) and cuBLAS through small ctypes bindings
(libraries.py finds them and every other dependency). Imported only when the GPU backend is
asked for."""

from .backend import CudaBackend

__all__ = ["CudaBackend"]
