"""kernels/batchnorm.cu, activations.cu, elementwise.cu, strided.cu and pooling.cu without a GPU:
the sources compiled as C++ by the host compiler (CUDA's qualifiers and intrinsics defined away,
float storage; every block one thread, run block after block) and launched by CudaBackend's own
methods (its batchnorm_forward_train, batchnorm_backward, activate_, activation_backward_,
activation_input_backward_, add_, maxpool_forward, maxpool_backward and strided_copy_, on host
arrays that carry a `ptr`), against the numpy backend. This checks the training batch norm with
every fused activation (mish and the other activations.INPUT_GRADIENT, whose backward
recomputes z from x), and the 16-byte pack and one-value paths of each kernel
(kernels/packs.cuh), with the host's arguments as the backend passes them; and the kernels for
arrays stored channels last (NHWC: batch norm, max pooling, a route's short rows). The GPU's
own arithmetic (its libm, FMA contraction, half storage) is checked by the gpu-marked tests
(test_gpu_backend.py, test_reduced_precision.py, test_channels_last.py)."""

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from engine import activations
from engine.backends.cuda.backend import CudaBackend
from engine.backends.cuda.kernels import BLOCK, KERNEL_DIR, PLANE_CHUNK, SIGNATURES
from engine.backends.numpy_backend import NumpyBackend
from engine.constants import kernel_define_options

SOURCES = ("batchnorm.cu", "activations.cu", "elementwise.cu", "strided.cu", "pooling.cu")
HEADERS = ("activation_functions.cuh", "packs.cuh", "strided.cuh")

# kernels/storage.cuh for the host compiler: float storage, and what the kernels use of CUDA
HOST_STORAGE = r'''
#pragma once
#include <cmath>
#include <math.h>
#include <cstddef>
#include <algorithm>
using std::min;
using std::max;
struct Dim { int x; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
static Dim blockIdx, blockDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define host_asm(...) ((void)0)
static inline void __syncthreads() {}
// a block of one thread: no other lane holds a value
static inline double __shfl_down_sync(unsigned, double, int) { return 0.0; }
static inline float __shfl_down_sync(unsigned, float, int) { return 0.f; }
static inline double atomicAdd(double *a, double v) { double old = *a; *a += v; return old; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
typedef float act_t;
static inline float load(float v) { return v; }
#define store(v) ((float)(v))
extern "C" void set_thread(int block) { blockIdx.x = block; blockDim.x = 1; threadIdx.x = 0; }
'''

CTYPES = {"P": ctypes.c_void_p, "i": ctypes.c_int, "I": ctypes.c_uint, "f": ctypes.c_float}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("kernels")
    for name in SOURCES + HEADERS:
        with open(os.path.join(KERNEL_DIR, name)) as handle:
            # inline PTX (hold_kernel's timer reads, never run here) becomes nothing
            (folder / name).write_text(handle.read().replace("asm volatile", "host_asm"))
    (folder / "storage.cuh").write_text(HOST_STORAGE)
    (folder / "kernels.cpp").write_text("".join(f'#include "{name}"\n'
                                                for name in ("storage.cuh",) + SOURCES))
    subprocess.run([compiler, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-w",
                    *kernel_define_options(), "-I", str(folder), str(folder / "kernels.cpp"),
                    "-o", str(folder / "kernels.so")], check=True)
    return ctypes.CDLL(str(folder / "kernels.so"))


class HostKernels:
    """engine/backends/cuda/kernels.Kernels' launches, a block of one thread at a time; keeps
    (name, arguments) of every launch."""

    def __init__(self, library):
        self.library = library
        self.launches = []

    def _run(self, name, blocks, args):
        source, signature = SIGNATURES[name]
        assert source in SOURCES, name
        assert len(args) == len(signature), (name, len(args), signature)
        function = getattr(self.library, name)
        function.argtypes = [CTYPES[kind] for kind in signature]
        values = [float(a) if kind == "f" else int(a) for a, kind in zip(args, signature)]
        self.launches.append((name, values))
        for block in range(blocks):
            self.library.set_thread(block)
            function(*values)

    def launch(self, name, n, *args, dtype=None):
        if n > 0:
            self._run(name, (n + BLOCK - 1) // BLOCK * BLOCK, args)  # threads as blocks of 1

    @staticmethod
    def plane_chunks(spatial):
        return (spatial + PLANE_CHUNK - 1) // PLANE_CHUNK

    def launch_blocks(self, name, blocks, *args, dtype=None):
        if blocks > 0:
            self._run(name, blocks, args)

    def launch_planes(self, name, planes, spatial, *args, dtype=None):
        if planes > 0 and spatial > 0:
            self.launch_blocks(name, planes * self.plane_chunks(spatial), *args, dtype=dtype)


class HostArray(np.ndarray):
    """A host array with the `ptr` of a GPUArray."""

    @property
    def ptr(self):
        return self.ctypes.data


def aligned(shape, dtype=np.float32, offset=0):
    """An uninitialised HostArray starting `offset` values after a 16-byte boundary."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.empty(count + offset + 16, dtype)
    skip = (-raw.ctypes.data % 16) // dtype.itemsize + offset
    return raw[skip:skip + count].reshape(shape).view(HostArray)


class HostCuda:
    @staticmethod
    def memset_d32_async(pointer, value, count, stream):
        assert value == 0  # the backend zeroes its float64 sums
        ctypes.memset(pointer, 0, 4 * count)


class HostBackend(CudaBackend):
    """CudaBackend's methods on host memory, its kernels compiled for the host."""

    def __init__(self, library):  # none of the GPU runtime
        self.precision = "fp32"
        self.dtype = np.dtype(np.float32)
        self.kernels = HostKernels(library)
        self.cuda = HostCuda()
        self.stream = None
        self._converted = {}
        self._recording = False

    def _empty(self, shape, dtype=np.float32):
        return aligned(tuple(int(s) for s in shape), dtype)

    def asarray(self, host, offset=0):
        array = aligned(np.shape(host), offset=offset)
        array[...] = host
        return array

    def to_host(self, array):
        return np.array(array, dtype=np.float32)


def close(got, want, what, tolerance=2e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    error = float(np.abs(got - want).max()) / scale
    assert error <= tolerance, f"{what}: {error:.2e} of the largest value"


def vec_of(backend, name):
    """The `vec` argument of the latest launch of kernel `name`."""
    return next(values[-1] for kernel, values in reversed(backend.kernels.launches)
                if kernel == name)


@pytest.mark.parametrize("activation", ["linear", "leaky", "logistic", "mish", "swish",
                                        "hard_mish", "gelu"])
@pytest.mark.parametrize("shape, offset, vec", [
    ((2, 3, 10, 12), 0, 1),  # planes of 120 values: packs of 4 floats
    ((3, 2, 7, 5), 0, 0),    # planes of 35: a value per thread
    ((2, 3, 4, 4), 1, 0),    # x off a 16-byte boundary: a value per thread
    ((5, 4, 1, 1), 0, 0)])   # a connected layer's output
def test_training_batchnorm_kernels_equal_numpy(library, activation, shape, offset, vec):
    rng = np.random.default_rng(8)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    delta = rng.standard_normal(shape).astype(np.float32)
    params = [rng.uniform(0.5, 1.5, c), rng.standard_normal(c), rng.standard_normal(c) * 0.1,
              rng.uniform(0.5, 1.5, c)]
    params = [p.astype(np.float32) for p in params]
    host = HostBackend(library)
    cpu = NumpyBackend()
    device = [host.asarray(p) for p in params]
    cpu_params = [p.copy() for p in params]
    y, cache = host.batchnorm_forward_train(host.asarray(x, offset), *device,
                                            activation=activation)
    y_cpu, cache_cpu = cpu.batchnorm_forward_train(x, *cpu_params, activation=activation)
    assert vec_of(host, "bn_normalize_kernel") == vec
    close(y, y_cpu, "y")
    close(device[2], cpu_params[2], "rolling mean")
    close(device[3], cpu_params[3], "rolling variance")
    updates = [host.asarray(np.full(c, 0.5, np.float32)) for _ in range(2)]
    cpu_updates = [np.full(c, 0.5, np.float32) for _ in range(2)]
    dx = host.batchnorm_backward(host.asarray(delta), cache, device[0], *updates)
    dx_cpu = cpu.batchnorm_backward(delta.copy(), cache_cpu, cpu_params[0], *cpu_updates)
    assert vec_of(host, "bn_backward_kernel") == vec
    assert vec_of(host, "bn_backward_sums_kernel") == vec
    close(dx, dx_cpu, "dx", 2e-5)
    close(updates[0], cpu_updates[0], "scale updates", 2e-5)
    close(updates[1], cpu_updates[1], "bias updates", 2e-5)


@pytest.mark.parametrize("activation", ["leaky", "logistic", "mish", "swish", "gelu"])
@pytest.mark.parametrize("shape, offset, vec", [((3, 4, 6, 2), 0, 1), ((3, 5, 3, 3), 0, 0),
                                                ((2, 2, 4, 4), 3, 0)])
def test_elementwise_kernels_take_packs_or_values(library, activation, shape, offset, vec):
    """activate_kernel, gradient_kernel, input_gradient_kernel and add_kernel: 16-byte packs
    where the length and the addresses allow, else a value per thread; numpy's values."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    delta = rng.standard_normal(shape).astype(np.float32)
    host, cpu = HostBackend(library), NumpyBackend()
    close(host.activate_(host.asarray(x, offset), activation), cpu.activate_(x.copy(),
                                                                             activation), "act")
    assert vec_of(host, "activate_kernel") == vec
    y = activations.activate(x, activation)
    close(host.activation_backward_(host.asarray(y), host.asarray(delta, offset), activation)
          if activation not in activations.INPUT_GRADIENT else
          host.activation_input_backward_(host.asarray(x), host.asarray(delta, offset),
                                          activation),
          cpu.activation_backward_(y, delta.copy(), activation)
          if activation not in activations.INPUT_GRADIENT else
          cpu.activation_input_backward_(x, delta.copy(), activation), "gradient")
    name = "input_gradient_kernel" if activation in activations.INPUT_GRADIENT \
        else "gradient_kernel"
    assert vec_of(host, name) == vec
    close(host.add_(host.asarray(x, offset), host.asarray(delta)), x + delta, "add", 0)
    assert vec_of(host, "add_kernel") == vec


def test_the_kernels_input_gradient_activations_are_activations_input_gradient():
    """gradient_needs_input (kernels/activation_functions.cuh) names activations.INPUT_GRADIENT:
    the fused backward takes act' from z for exactly those."""
    with open(os.path.join(KERNEL_DIR, "activation_functions.cuh")) as handle:
        text = handle.read()
    body = re.search(r"bool gradient_needs_input\(int act\)\s*\{(.*?)\}", text, re.S).group(1)
    assert set(re.findall(r"ACT_(\w+)", body)) == {name.upper() for name in
                                                   activations.INPUT_GRADIENT}


def stored_nhwc(values):
    """A HostArray of NCHW values stored channels last (as the GPU's NHWC activations are): its
    shape NCHW, its memory NHWC."""
    b, c, h, w = values.shape
    memory = aligned((b, h, w, c))
    memory[...] = values.transpose(0, 2, 3, 1)
    array = memory.reshape(b, c, h, w)
    array.channels_last = True
    return array


def nchw_values(array):
    b, c, h, w = array.shape
    return np.asarray(array).reshape(b, h, w, c).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("activation", ["linear", "leaky", "mish", "swish"])
@pytest.mark.parametrize("shape", [(2, 8, 80, 60),  # 9600 positions: two blocks of rows
                                   (3, 12, 3, 5)])  # three packs of channels a row
def test_training_batchnorm_kernels_on_channels_last_arrays(library, activation, shape):
    """The NHWC reductions and passes (bn_*_nhwc_kernel) against numpy on the NCHW values: y,
    the rolling statistics, dx and the updates; y and dx stored channels last."""
    rng = np.random.default_rng(10)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    delta = rng.standard_normal(shape).astype(np.float32)
    params = [p.astype(np.float32) for p in (rng.uniform(0.5, 1.5, c), rng.standard_normal(c),
                                             rng.standard_normal(c) * 0.1,
                                             rng.uniform(0.5, 1.5, c))]
    host, cpu = HostBackend(library), NumpyBackend()
    device, cpu_params = [host.asarray(p) for p in params], [p.copy() for p in params]
    y, cache = host.batchnorm_forward_train(stored_nhwc(x), *device, activation=activation)
    y_cpu, cache_cpu = cpu.batchnorm_forward_train(x, *cpu_params, activation=activation)
    assert host.kernels.launches[0][0] == "bn_sums_nhwc_kernel" and y.channels_last
    close(nchw_values(y), y_cpu, "y")
    close(device[2], cpu_params[2], "rolling mean")
    close(device[3], cpu_params[3], "rolling variance")
    updates = [host.asarray(np.full(c, 0.5, np.float32)) for _ in range(2)]
    cpu_updates = [np.full(c, 0.5, np.float32) for _ in range(2)]
    dx = host.batchnorm_backward(stored_nhwc(delta), cache, device[0], *updates)
    dx_cpu = cpu.batchnorm_backward(delta.copy(), cache_cpu, cpu_params[0], *cpu_updates)
    assert dx.channels_last and "bn_backward_nhwc_kernel" in dict(host.kernels.launches)
    close(nchw_values(dx), dx_cpu, "dx", 2e-5)
    close(updates[0], cpu_updates[0], "scale updates", 2e-5)
    close(updates[1], cpu_updates[1], "bias updates", 2e-5)


def test_the_nhwc_reductions_thread_bound_is_the_backends():
    """BN_REDUCE_THREADS (the most packs a row the host gives the NHWC reductions) is the
    kernels' REDUCE_THREADS, which sizes their shared memory."""
    from engine.backends.cuda.backend import BN_REDUCE_THREADS

    with open(os.path.join(KERNEL_DIR, "batchnorm.cu")) as handle:
        defined = re.search(r"#define REDUCE_THREADS (\d+)", handle.read()).group(1)
    assert int(defined) == BN_REDUCE_THREADS


@pytest.mark.parametrize("size, stride, pad", [(2, 2, 0), (5, 1, 2), (3, 2, 1)])
def test_max_pooling_kernels_on_channels_last_arrays(library, size, stride, pad):
    """maxpool_forward_nhwc_kernel and, for windows apart (stride >= size) and overlapping,
    maxpool_scatter_nhwc_kernel and maxpool_backward_nhwc_kernel: numpy's pooling and its
    backward on the NCHW values, the outputs stored channels last."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 8, 9, 7)).astype(np.float32)
    out_h, out_w = ((n + 2 * pad - size) // stride + 1 for n in x.shape[2:])
    host, cpu = HostBackend(library), NumpyBackend()
    y, winner = host.maxpool_forward(stored_nhwc(x), size, stride, pad, out_h, out_w)
    y_cpu, winner_cpu = cpu.maxpool_forward(x, size, stride, pad, out_h, out_w)
    assert y.channels_last and host.kernels.launches[-1][0] == "maxpool_forward_nhwc_kernel"
    close(nchw_values(y), y_cpu, "pooled", 0)
    delta = rng.standard_normal(y_cpu.shape).astype(np.float32)
    dx = host.maxpool_backward(stored_nhwc(delta), winner, x.shape, size, stride, pad)
    expected = "maxpool_scatter_nhwc_kernel" if stride >= size else "maxpool_backward_nhwc_kernel"
    assert dx.channels_last and host.kernels.launches[-1][0] == expected
    close(nchw_values(dx), cpu.maxpool_backward(delta, winner_cpu, x.shape, size, stride, pad),
          "dx")  # overlapping windows: sums in another order


def test_route_copies_of_channels_last_arrays_take_a_thread_per_vector(library):
    """A [route] of NHWC arrays copies one position's channels per row: copy_vectors_kernel
    (rows under SHORT_ROW), plain and accumulating; a copy of long NCHW rows stays on
    copy_rows_kernel. numpy's values either way."""
    from engine.layers.channels import add_channel_slice_, concat_channels

    rng = np.random.default_rng(12)
    a, b = (rng.standard_normal((2, c, 5, 6)).astype(np.float32) for c in (8, 12))
    host = HostBackend(library)
    y = concat_channels(host, [stored_nhwc(a), stored_nhwc(b)])
    assert y.channels_last and host.kernels.launches[-1][0] == "copy_vectors_kernel"
    close(nchw_values(y), np.concatenate([a, b], axis=1), "route", 0)
    add_channel_slice_(host, y, 8, stored_nhwc(b))
    assert host.kernels.launches[-1][0] == "copy_vectors_kernel"
    close(nchw_values(y), np.concatenate([a, 2 * b], axis=1), "accumulated", 0)
    planes = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)  # rows of 4096 values
    whole = concat_channels(host, [host.asarray(planes), host.asarray(planes)])
    assert host.kernels.launches[-1][0] == "copy_rows_kernel"
    close(np.asarray(whole), np.concatenate([planes, planes], axis=1), "long rows", 0)
