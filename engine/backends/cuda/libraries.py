"""Finding what the GPU backend needs, in one place: NVIDIA's shared libraries (the system's
first, else the copies pip's nvidia-* wheels keep under site-packages/nvidia/<name>/lib) and the
Python packages (pycuda, cuda-bindings). `pip install -e '.[gpu]'` brings all of them; a missing
one is one BackendError that names what to install, never a silent fallback.
"""

import ctypes
import glob
import importlib
import os
import sys
from dataclasses import dataclass

from ...errors import BackendError

INSTALL_ALL = "pip install -e '.[gpu]'"


@dataclass(frozen=True)
class NvidiaLibrary:
    title: str          # for messages
    sonames: tuple      # tried in order, the system's loader first
    wheel_folder: str   # site-packages/nvidia/<wheel_folder>/lib in the wheel
    wheel: str          # the pip package that ships it (setup.cfg's [gpu] extra)

    def missing(self):
        return (f"{self.title} not found ({', '.join(self.sonames)}): install it with "
                f"pip install {self.wheel} (or {INSTALL_ALL})")


# The CUDA 12 wheels: their libraries run under the drivers of CUDA 12 and 13 alike.
CUDNN = NvidiaLibrary("cuDNN 9", ("libcudnn.so.9",), "cudnn", "nvidia-cudnn-cu12")
CUBLAS = NvidiaLibrary("cuBLAS", ("libcublas.so.12", "libcublas.so.13", "libcublas.so"), "cublas",
                       "nvidia-cublas-cu12")


def nvrtc(major):
    """NVRTC of one CUDA major version. cuDNN compiles its runtime-fused kernels
    (cudnn_graph.py) with the NVRTC of its own CUDA major, which it opens by soname. Optional:
    without it convolutions run unfused, and cudnn_graph says so."""
    return NvidiaLibrary("NVRTC", (f"libnvrtc.so.{major}",), "cuda_nvrtc",
                         f"nvidia-cuda-nvrtc-cu{major}")


NVRTC = nvrtc(12)  # the [gpu] extra's, for its CUDA 12 cuDNN
# Python modules: import name -> (who needs it, the pip package that provides it).
PYTHON_PACKAGES = {
    "pycuda.driver": ("the GPU backend needs", "pycuda"),
    "cuda.bindings.driver": ("CUDA graphs (recorded training steps and inference) need",
                             "cuda-bindings"),
}


def wheel_paths(folder, name):
    """`name` inside the nvidia-* wheels installed on sys.path (nvidia/<folder>/lib)."""
    found = []
    for root in sys.path:
        found += sorted(glob.glob(os.path.join(root, "nvidia", folder, "lib", name)))
    return found


def load_library(names, wheel_folder, missing):
    """The first of `names` (sonames or glob patterns) that loads: each from the system's loader
    path first, then from the wheels' folders; BackendError(`missing`, with the loader's first
    complaint) when none does."""
    candidates = list(names) + [path for name in names for path in wheel_paths(wheel_folder, name)]
    errors = []
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError as error:
            errors.append(str(error))
    raise BackendError(f"{missing}; tried: {errors[0] if errors else 'nothing'}")


def load(library):
    """A NvidiaLibrary loaded (ctypes.CDLL), or the BackendError naming its wheel."""
    return load_library(library.sonames, library.wheel_folder, library.missing())


def import_package(name):
    """A module of PYTHON_PACKAGES imported, or a BackendError naming the pip package."""
    who, package = PYTHON_PACKAGES[name]
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise BackendError(f"{who} the {package} package ({error}): install it with "
                           f"pip install {package} (or {INSTALL_ALL})") from None


def cuda_driver():
    """cuda-bindings' driver module (cuStreamBeginCapture, cuGraphLaunch...)."""
    return import_package("cuda.bindings.driver")


def check_gpu_dependencies():
    """Everything the GPU path imports or loads, checked before a GPU backend is made: the
    first that is missing is one BackendError naming its package."""
    for name in PYTHON_PACKAGES:
        import_package(name)
    for library in (CUBLAS, CUDNN):  # cuBLAS first: a wheel's cuDNN finds its cublasLt loaded
        load(library)
