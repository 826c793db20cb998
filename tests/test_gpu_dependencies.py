"""Without a GPU: the GPU path's dependencies are found in one place (backends/cuda/libraries.py),
the system's library first and the nvidia-* wheel's otherwise, and a missing one is one
BackendError naming the package to install (never a silent fallback); the [gpu] extra declares
each of them; the cuBLAS binding passes row-major products to column-major cuBLAS correctly."""

import configparser
import ctypes
import os
import shutil
import sys
import types

import numpy as np
import pytest

from engine.backends import get_backend
from engine.backends.cuda import backend as cuda_backend
from engine.backends.cuda import cublas, libraries
from engine.errors import BackendError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_extra():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    lines = config["options.extras_require"]["gpu"].split("\n")
    return {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in lines if line.strip()}


def test_the_gpu_extra_declares_everything_the_gpu_path_needs():
    needed = {package for _, package in libraries.PYTHON_PACKAGES.values()}
    needed |= {libraries.CUDNN.wheel, libraries.CUBLAS.wheel}
    needed |= {libraries.NVRTC.wheel}  # optional (cuDNN's fused convolutions), but installed
    assert needed == gpu_extra()


@pytest.mark.parametrize("module, package", [("pycuda.driver", "pycuda"),
                                             ("cuda.bindings.driver", "cuda-bindings")])
def test_a_missing_python_package_is_one_line_naming_it(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import fails
    with pytest.raises(BackendError) as caught:
        libraries.import_package(module)
    message = str(caught.value)
    assert "\n" not in message and f"pip install {package} " in message, message
    assert "pip install -e '.[gpu]'" in message


def test_the_gpu_backend_refuses_to_start_without_cuda_bindings(monkeypatch):
    """Before, graph capture turned itself off without cuda-bindings and training ran several
    times slower; now the backend is not made, and the CLI says why in one line."""
    monkeypatch.setitem(sys.modules, "pycuda.driver", types.ModuleType("pycuda.driver"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    monkeypatch.setattr(cuda_backend, "_RUNTIMES", {})  # as in a fresh process
    with pytest.raises(BackendError, match=r"CUDA graphs .* need the cuda-bindings package"):
        get_backend("gpu")


@pytest.mark.parametrize("library", [libraries.CUDNN, libraries.CUBLAS], ids=lambda l: l.title)
def test_a_missing_library_names_its_wheel(monkeypatch, tmp_path, library):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # no wheels there
    missing = libraries.NvidiaLibrary(library.title, ("libengine-test-missing.so.9",),
                                      library.wheel_folder, library.wheel)
    with pytest.raises(BackendError) as caught:
        libraries.load(missing)
    message = str(caught.value)
    assert "\n" not in message and f"pip install {library.wheel} " in message, message


def loaded_path(soname):
    """The file of a shared library this process has loaded (from /proc/self/maps)."""
    ctypes.CDLL(soname)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(soname):  # libz.so.1.2.13
                return path
    return None


def test_a_wheels_library_is_used_when_the_system_has_none(monkeypatch, tmp_path):
    try:
        source = loaded_path("libz.so.1")  # stands in for a wheel's libcublas.so.12
    except OSError:
        source = None
    if source is None:
        pytest.skip("no libz.so.1 to stand in for a wheel's library")
    folder = tmp_path / "nvidia" / "fakewheel" / "lib"
    folder.mkdir(parents=True)
    shutil.copy(source, folder / "libengine-wheel-test.so.1")
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    library = libraries.NvidiaLibrary("fake", ("libengine-wheel-test.so.1",), "fakewheel", "fake")
    loaded = libraries.load(library)
    assert loaded._name == str(folder / "libengine-wheel-test.so.1")
    assert loaded.zlibVersion() is not None


def test_the_system_library_comes_first(monkeypatch, tmp_path):
    folder = tmp_path / "nvidia" / "fakewheel" / "lib"
    folder.mkdir(parents=True)
    (folder / "libc.so.6").write_bytes(b"not a library")  # would fail to load if tried first
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    assert libraries.load_library(["libc.so.6"], "fakewheel", "libc").getpid() > 0


# ---- the cuBLAS binding, against a column-major reference ------------------------------------
def host_sgemm(memory):
    """cublasSgemm_v2's semantics on host memory: column-major C = alpha op(A) op(B) + beta C."""
    def sgemm(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        def matrix(pointer, rows, cols, ld):  # column-major rows x cols with leading dim ld
            return memory[pointer.value][:cols * ld].reshape(cols, ld)[:, :rows].T

        op_a = matrix(a, k, m, lda).T if transa == cublas.CUBLAS_OP_T else matrix(a, m, k, lda)
        op_b = matrix(b, n, k, ldb).T if transb == cublas.CUBLAS_OP_T else matrix(b, k, n, ldb)
        out = matrix(c, m, n, ldc)
        out[...] = alpha._obj.value * (op_a.astype(np.float64) @ op_b) + beta._obj.value * out
        return cublas.CUBLAS_STATUS_SUCCESS
    return sgemm


@pytest.mark.parametrize("trans_a, trans_b, beta", [(False, True, 0.0), (True, False, 1.0),
                                                    (False, False, 0.0)])
def test_gemm_computes_row_major_products(trans_a, trans_b, beta):
    """The three products the connected layers ask for (backend.py): y = x W^T,
    W_updates += delta^T x, dx = delta W."""
    rng = np.random.default_rng(0)
    m, n, k = 3, 5, 4
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    expected = (a.T if trans_a else a) @ (b.T if trans_b else b) + beta * c
    memory = {1000: a.reshape(-1), 2000: b.reshape(-1), 3000: c.reshape(-1)}
    binding = cublas.Cublas.__new__(cublas.Cublas)  # no library: the reference above
    binding.lib = types.SimpleNamespace(cublasSgemm_v2=host_sgemm(memory))
    binding.handle = None
    binding._alpha, binding._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    binding.gemm(trans_a, trans_b, m, n, k, 1000, 2000, 3000, beta=beta)
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)


def test_a_failed_cublas_call_names_it():
    binding = cublas.Cublas.__new__(cublas.Cublas)
    binding.lib = types.SimpleNamespace(cublasGetStatusString=lambda status: b"CUBLAS_STATUS_X")
    with pytest.raises(BackendError, match=r"^cuBLAS call cublasSgemm_v2 failed: CUBLAS_STATUS_X"):
        binding.check("cublasSgemm_v2", 13)
