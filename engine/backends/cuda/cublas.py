"""cuBLAS through scikit-cuda: the one place `skcuda` is imported.

scikit-cuda 0.5.3's package __init__ reads its version through `pkg_resources`, which setuptools
81+ no longer ships; a stub serves that import and is removed again.
Only `skcuda.cublas` is used: `skcuda.misc`/`linalg` do not import under numpy 2.
"""

import sys
import types
import warnings

from ...errors import BackendError


def _import_skcuda_cublas():
    # A stub stands in for pkg_resources during the import (the real one, where installed, only
    # adds deprecation warnings); skcuda's __init__ then falls back to pkgutil namespaces.
    stub = types.ModuleType("pkg_resources")
    stub.require = lambda name: [types.SimpleNamespace(version="0.5.3")]

    def declare_namespace(name):
        raise ImportError("pkg_resources stub")
    stub.declare_namespace = declare_namespace
    saved = sys.modules.get("pkg_resources")
    sys.modules["pkg_resources"] = stub
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "creating CUBLAS context to get version number"
            import skcuda.cublas as cublas
    except ImportError as error:
        raise BackendError(f"the GPU backend needs scikit-cuda ({error}); install it with "
                           "pip install -e .[gpu]") from None
    except OSError as error:  # skcuda raises OSError('cublas library not found')
        raise BackendError(f"cuBLAS not found: {error}") from None
    finally:
        if saved is not None:
            sys.modules["pkg_resources"] = saved
        else:
            del sys.modules["pkg_resources"]
    return cublas


class Cublas:
    def __init__(self, stream_handle):
        self.lib = _import_skcuda_cublas()
        try:
            self.handle = self.lib.cublasCreate()
            self.lib.cublasSetStream(self.handle, stream_handle)
        except self.lib.cublasError as error:
            raise BackendError(f"cuBLAS could not start: {type(error).__name__} {error}") from None

    def gemm(self, trans_a, trans_b, m, n, k, a, b, c, beta=0.0):
        """Row-major C (m x n) = op(A) @ op(B) + beta * C, with A (m x k) or (k x m) if trans_a
        and B (k x n) or (n x k) if trans_b. cuBLAS is column-major, so this computes
        C^T = op(B)^T op(A)^T."""
        lda = m if trans_a else k
        ldb = k if trans_b else n
        self.lib.cublasSgemm(self.handle, "t" if trans_b else "n", "t" if trans_a else "n",
                             n, m, k, 1.0, b, ldb, a, lda, beta, c, n)
