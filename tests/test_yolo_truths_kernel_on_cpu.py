"""kernels/yolo_truths.cu's truth_events_kernel without a GPU: its source compiled as C++ by the
host compiler (CUDA's qualifiers defined away, float storage, each thread of the launch one call
in turn, atomicAdd a plain add), against the numpy apply_truth_events_ on the same output, dense
delta, truths and plan: every head of yolov3-tiny, yolov4-tiny and yolov3 and every saved case
of test_yolo_loss_cases (those with truth_thresh < 1 run with truth_thresh = 1 here, for their
keys: counters_per_class, label_smooth_eps, max_delta, objectness_smooth, new_coords). The
kernel's own arithmetic is checked here; the GPU's (FMA contraction, its libm) by the gpu-marked
tests (test_gpu_truth_events_equal_the_numpy_ones)."""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from engine.backends.cuda.kernels import KERNEL_DIR
from engine.backends.numpy_backend import NumpyBackend
from engine.backends.yolo_truths import IOU_LOSSES
from test_yolo_loss_cases import CASES, DATA, HEADS, cfg_head_case, make_layer

# what the kernel uses of CUDA, for the host compiler
CUDA_ON_THE_HOST = r'''
#include <cmath>
#include <cfloat>
#include <cstddef>
using namespace std;
struct Dim { int x; };
static Dim blockIdx, blockDim, threadIdx;
#define __global__
#define __device__
typedef float act_t;
static inline float load(float v) { return v; }
#define store(v) ((float)(v))
static inline double atomicAdd(double *a, double v) { double old = *a; *a += v; return old; }
extern "C" void set_thread(int u) { blockIdx.x = u; blockDim.x = 1; threadIdx.x = 0; }
'''


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("kernel")
    with open(os.path.join(KERNEL_DIR, "yolo_truths.cu")) as handle:
        source = handle.read().replace('#include "storage.cuh"', "")
    (folder / "kernel.cpp").write_text(CUDA_ON_THE_HOST + source)
    subprocess.run([compiler, "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                    str(folder / "kernel.cpp"), "-o", str(folder / "kernel.so")], check=True)
    library = ctypes.CDLL(str(folder / "kernel.so"))
    library.truth_events_kernel.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int] * 6 +
                                            [ctypes.c_float] * 2 + [ctypes.c_int] * 8)
    return library


def run_kernel(library, delta, output, truths, plan, loss):
    """The launch CudaBackend.apply_truth_events_ makes, a thread at a time: (delta, the
    statistics the kernel adds: [1:])."""
    delta, output, truths = (np.ascontiguousarray(a, np.float32) for a in (delta, output, truths))
    plan = np.ascontiguousarray(plan, np.int32)
    batch, channels, height, width = output.shape
    capacity = (plan.size - 3) // 3
    anchors = np.ascontiguousarray(loss.anchors, np.float32)
    multipliers = loss.class_multipliers
    numbers = np.array([loss.iou_normalizer, loss.obj_normalizer, loss.cls_normalizer,
                        loss.max_delta, loss.label_smooth_eps] +
                       ([] if multipliers is None else list(multipliers)), np.float64)
    rows = np.zeros((max(capacity, 1), loss.entries), np.float32)
    statistics = np.zeros(5, np.float64)
    arrays = [a.ctypes.data for a in (delta, output, truths, plan, anchors, numbers, rows,
                                      statistics)]
    for u in range(capacity):
        library.set_thread(u)
        library.truth_events_kernel(
            *arrays, capacity, channels // loss.entries, loss.entries, height, width,
            truths.size // (5 * batch), loss.net_w, loss.net_h, int(loss.kind == "alexeyab"),
            IOU_LOSSES.index(loss.iou_loss), int(loss.new_coords), loss.classes,
            int(multipliers is not None), int(bool(loss.focal_loss)),
            int(bool(loss.objectness_smooth)), int(loss.iou_thresh < 1))
    return delta, statistics[1:]


def check(library, layer, output, truth):
    ops = NumpyBackend()
    layer.output = output
    state = layer.device_cost(ops, ops.asarray(truth))
    loss, _, dense, _, _, truths = state
    plan = layer.plan_cost(ops, truth, state).packed
    numbers = loss.numbers
    delta, statistics = run_kernel(library, dense.copy(), output, truths, plan, numbers)
    expected = ops.apply_truth_events_(dense, output, truths, plan, numbers)
    assert expected[4] > 0
    # float32 logf of the host's libm against numpy's: pjreddie's size targets may differ by
    # an ulp; AlexeyAB's arithmetic is double and equal
    assert np.abs(delta - dense).max() <= 1e-6 * np.abs(dense).max()
    np.testing.assert_allclose(statistics, expected[1:], rtol=1e-6)


@pytest.mark.parametrize("cfg, head", HEADS)
def test_kernel_on_cfg_heads(kernel, tmp_path, cfg, head):
    check(kernel, *cfg_head_case(tmp_path, cfg, head))


@pytest.mark.parametrize("name", CASES)
def test_kernel_on_the_saved_cases(kernel, tmp_path, name):
    layer = make_layer(tmp_path, name)
    layer.truth_thresh = 1.0
    with np.load(DATA) as data:
        check(kernel, layer, data[f"{name}/output"], data[f"{name}/truth"])
