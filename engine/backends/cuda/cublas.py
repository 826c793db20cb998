"""A small ctypes binding of cuBLAS (libcublas, found by libraries.py): a handle on the backend's
stream and the single-precision matrix product the connected layers need.

Every function's argument types are declared in FUNCTIONS (tests/test_kernels_compile.py checks
them against cublas_api.h where it is installed) and every status is checked: a failure raises
BackendError naming the call.
"""

import ctypes

from ...errors import BackendError
from .libraries import CUBLAS, load

CUBLAS_STATUS_SUCCESS = 0
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
ENUMS = {name: value for name, value in globals().items() if name.startswith("CUBLAS_")}

P = ctypes.c_void_p
INT = ctypes.c_int
FLOAT_P = ctypes.POINTER(ctypes.c_float)

# name -> argument types (all return cublasStatus_t, except cublasGetStatusString: const char *)
FUNCTIONS = {
    "cublasCreate_v2": [P],
    "cublasSetStream_v2": [P, P],
    "cublasSgemm_v2": [P, INT, INT, INT, INT, INT, FLOAT_P, P, INT, P, INT, FLOAT_P, P, INT],
    "cublasGetStatusString": [INT],
}
RESTYPES = {"cublasGetStatusString": ctypes.c_char_p}


class Cublas:
    """A cuBLAS handle whose work runs on the device's stream (so it is ordered with the
    kernels and can be captured into a CUDA graph)."""

    def __init__(self, stream_handle):
        self.lib = load(CUBLAS)
        for name, argtypes in FUNCTIONS.items():
            try:
                function = getattr(self.lib, name)
            except AttributeError:
                raise BackendError(f"the cuBLAS library has no {name}; cuBLAS 11.4 or newer is "
                                   "needed") from None
            function.argtypes = argtypes
            function.restype = RESTYPES.get(name, ctypes.c_int)
        handle = P()
        self.check("cublasCreate_v2", self.lib.cublasCreate_v2(ctypes.byref(handle)))
        self.handle = handle
        self.check("cublasSetStream_v2", self.lib.cublasSetStream_v2(handle, P(stream_handle)))
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def check(self, name, status):
        if status != CUBLAS_STATUS_SUCCESS:
            message = (self.lib.cublasGetStatusString(status) or b"").decode(errors="replace")
            raise BackendError(f"cuBLAS call {name} failed: {message} (status {status})")

    def gemm(self, trans_a, trans_b, m, n, k, a, b, c, beta=0.0):
        """Row-major C (m x n) = op(A) @ op(B) + beta * C, with A (m x k) or (k x m) if trans_a
        and B (k x n) or (n x k) if trans_b. cuBLAS is column-major, so this computes
        C^T = op(B)^T op(A)^T. alpha and beta are read when the call is issued (host pointer
        mode), also while a graph is captured."""
        lda = m if trans_a else k
        ldb = k if trans_b else n
        self._beta.value = beta
        self.check("cublasSgemm_v2", self.lib.cublasSgemm_v2(
            self.handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
            CUBLAS_OP_T if trans_a else CUBLAS_OP_N, n, m, k, ctypes.byref(self._alpha), P(b), ldb,
            P(a), lda, ctypes.byref(self._beta), P(c), n))
