"""Without a GPU: every kernels/*.cu compiles with nvcc for the architectures we support, and the
cuDNN binding's enum values and argument types agree with cuDNN (its headers where installed,
else the values cuDNN documents)."""

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.backends.cuda import cublas, cudnn, cudnn_graph
from engine.backends.cuda.kernels import COMPILE_OPTIONS, KERNEL_DIR, SIGNATURES, STORAGE_TYPES

ARCHITECTURES = ("75", "80", "90")
SOURCES = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")))


def find_nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def test_every_kernel_the_backend_launches_has_a_source():
    assert SOURCES
    names = {os.path.basename(p) for p in SOURCES}
    for kernel, (source, _) in SIGNATURES.items():
        assert source in names, kernel
        with open(os.path.join(KERNEL_DIR, source)) as handle:
            assert re.search(rf'extern "C" __global__ void {kernel}\(', handle.read()), kernel


def test_kernels_compile_for_sm75_sm80_sm90_and_each_storage(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")

    # --cubin compiles device code only (what PyCUDA loads), much faster than a full -c.
    def compile_one(job):
        source, arch, storage = job
        out = tmp_path / f"{os.path.basename(source)}.sm_{arch}.{storage}.cubin"
        result = subprocess.run([nvcc, "--cubin", *COMPILE_OPTIONS, f"-DSTORAGE={storage}",
                                 f"-arch=sm_{arch}", "-I", KERNEL_DIR, source, "-o", str(out)],
                                capture_output=True, text=True)
        return f"{source} (sm_{arch}, {storage})", result.returncode, result.stderr

    # float storage for every architecture; fp16 and bf16 storage (engine/precision.py) for the
    # tensor-core ones.
    jobs = [(source, arch, "float") for source in SOURCES for arch in ARCHITECTURES]
    jobs += [(source, "80", storage) for source in SOURCES
             for storage in STORAGE_TYPES.values() if storage != "float"]
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2)) as pool:
        failures = [f"{s}:\n{err}" for s, rc, err in pool.map(compile_one, jobs) if rc]
    assert not failures, "\n".join(failures)


# ---- cuDNN binding -------------------------------------------------------------------------------
# The values cuDNN's documentation (and cudnn_graph.h / cudnn_ops.h of cuDNN 8 and 9) gives.
DOCUMENTED_ENUMS = {
    "CUDNN_STATUS_SUCCESS": 0,
    "CUDNN_DATA_FLOAT": 0,
    "CUDNN_DATA_HALF": 2,
    "CUDNN_DATA_BFLOAT16": 9,
    "CUDNN_TENSOR_NCHW": 0,
    "CUDNN_TENSOR_NHWC": 1,
    "CUDNN_CROSS_CORRELATION": 1,
    "CUDNN_DEFAULT_MATH": 0,
    "CUDNN_TENSOR_OP_MATH": 1,
    "CUDNN_FMA_MATH": 3,
    "CUDNN_BATCHNORM_PER_ACTIVATION": 0,
    "CUDNN_BATCHNORM_SPATIAL": 1,
    "CUDNN_DETERMINISTIC": 1,
    "CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED": 7,
    "CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED": 5,
    "CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED": 5,
}


def cudnn_headers():
    roots = ["/usr/include", "/usr/include/x86_64-linux-gnu", "/usr/local/cuda/include"]
    roots += [os.path.join(p, "nvidia", "cudnn", "include") for p in sys.path]
    seen, found = set(), []
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "cudnn*.h"))):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(path)
    return found


def header_text():
    text = ""
    for path in cudnn_headers():
        with open(path, errors="replace") as handle:
            text += handle.read() + "\n"
    return text


def test_enum_values_match_the_documentation():
    assert {k: cudnn.ENUMS[k] for k in DOCUMENTED_ENUMS} == DOCUMENTED_ENUMS
    assert set(cudnn.ENUMS) <= set(DOCUMENTED_ENUMS), "add new enums to DOCUMENTED_ENUMS"


def test_enum_values_match_the_headers():
    text = header_text()
    if "cudnnBatchNormMode_t" not in text:
        pytest.skip("no cuDNN headers on this machine")
    for name, value in cudnn.ENUMS.items():
        match = re.search(rf"\b{name}\s*=\s*(\d+)", text)
        assert match, f"{name} not in the cuDNN headers"
        assert int(match.group(1)) == value, name


def ctypes_kind(argtype):
    if argtype is ctypes.c_void_p or getattr(argtype, "_type_", None) in (ctypes.c_int,
                                                                           ctypes.c_size_t,
                                                                           ctypes.c_float,
                                                                           ctypes.c_int64):
        return "pointer"
    return {ctypes.c_int: "int", ctypes.c_double: "double", ctypes.c_size_t: "size_t",
            ctypes.c_int64: "int64"}[argtype]


def c_kind(parameter):
    """What a C parameter declaration is passed as: pointer, int (ints and enums), double,
    size_t. Handles and descriptors are pointers to opaque structs."""
    parameter = parameter.strip()
    if "*" in parameter or re.search(r"\b(cudnnHandle_t|cublasHandle_t|\w+Descriptor_t|cudaStream_t)\b",
                                     parameter):
        return "pointer"
    if re.match(r"(const\s+)?double\b", parameter):
        return "double"
    if re.match(r"(const\s+)?size_t\b", parameter):
        return "size_t"
    if re.match(r"(const\s+)?int64_t\b", parameter):
        return "int64"
    return "int"


@pytest.mark.parametrize("binding", [cudnn, cudnn_graph])
def test_function_argument_types_match_the_headers(binding):
    """The legacy binding's functions and the graph API's (cudnn_graph.py)."""
    text = header_text()
    if "cudnnConvolutionForward" not in text:
        pytest.skip("no cuDNN headers on this machine")
    text = re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)
    for name, argtypes in binding.FUNCTIONS.items():
        match = re.search(rf"\b{name}\s*\(([^)]*)\)\s*;", text)
        assert match, f"{name} not declared in the cuDNN headers"
        declared = [p for p in match.group(1).split(",") if p.strip() not in ("", "void")]
        assert [c_kind(p) for p in declared] == [ctypes_kind(t) for t in argtypes], name


def test_graph_enum_values_match_the_headers():
    """cudnn_graph.py's descriptor types, attribute names and types, pointwise and heuristic
    modes are cudnn_graph.h's (some attributes are marked CUDNN_DEPRECATED_ENUM in later cuDNN 9
    releases, still taken); the values it shares with cudnn.py agree."""
    shared = set(cudnn_graph.ENUMS) & set(cudnn.ENUMS)
    assert shared and all(cudnn_graph.ENUMS[k] == cudnn.ENUMS[k] for k in shared)
    text = header_text()
    if "cudnnBackendAttributeName_t" not in text:
        pytest.skip("no cuDNN graph headers on this machine")
    values = enum_values(re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.DOTALL))
    for name, value in cudnn_graph.ENUMS.items():
        assert name in values, f"{name} not in the cuDNN headers"
        assert values[name] == value, name


def enum_values(text):
    """Every enumerator of the C `enum { ... }` bodies in `text` (comments removed) -> its
    value: the one given, or (none given) the previous one's plus 1, as C counts (cudnn_graph.h
    numbers most descriptor types and notes so); one given as another enumerator's name takes
    its value; one whose value cannot be read is left out, and so are those counted from it."""
    values = {}
    for body in re.findall(r"\benum\b[^{;]*\{(.*?)\}", text, flags=re.DOTALL):
        following = 0
        for item in body.split(","):
            match = re.fullmatch(r"\s*([A-Za-z_]\w*)(?:\s+CUDNN_DEPRECATED_ENUM)?"
                                 r"\s*(?:=\s*(.*?))?\s*", item, flags=re.DOTALL)
            if match is None:
                following = None
                continue
            name, given = match.groups()
            if given is not None:
                following = (int(given, 0) if re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", given)
                             else values.get(given))
            if following is not None:
                values[name] = following
                following += 1
    return values


def test_enum_values_counts_as_c_does():
    text = """typedef enum {
        A_ZERO = 0,
        A_ONE,
        A_TWO CUDNN_DEPRECATED_ENUM,
        A_TEN = 10, A_ELEVEN,
        A_ALIAS CUDNN_DEPRECATED_ENUM = A_ONE,
        A_AFTER_ALIAS,
        A_HEX = 0x10,
        A_ODD = (1 << 3),
        A_AFTER_ODD,
    } a_t;
    enum b_t { B_FIRST, B_SECOND = 7 };"""
    assert enum_values(text) == {"A_ZERO": 0, "A_ONE": 1, "A_TWO": 2, "A_TEN": 10,
                                 "A_ELEVEN": 11, "A_ALIAS": 1, "A_AFTER_ALIAS": 2, "A_HEX": 16,
                                 "B_FIRST": 0, "B_SECOND": 7}


def cublas_header_text():
    roots = ["/usr/include", "/usr/local/cuda/include"]
    roots += [os.path.join(p, "nvidia", "cublas", "include") for p in sys.path]
    for root in roots:
        path = os.path.join(root, "cublas_api.h")
        if os.path.exists(path):
            with open(path, errors="replace") as handle:
                return re.sub(r"/\*.*?\*/|//[^\n]*", " ", handle.read(), flags=re.DOTALL)
    return None


def test_cublas_binding_matches_the_headers():
    """cuBLAS's enums (documented values) and, where cublas_api.h is installed, the argument
    types of every function the binding declares."""
    assert cublas.ENUMS == {"CUBLAS_STATUS_SUCCESS": 0, "CUBLAS_OP_N": 0, "CUBLAS_OP_T": 1}
    text = cublas_header_text()
    if text is None:
        pytest.skip("no cuBLAS headers on this machine")
    for name, value in cublas.ENUMS.items():
        assert int(re.search(rf"\b{name}\s*=\s*(\d+)", text).group(1)) == value, name
    for name, argtypes in cublas.FUNCTIONS.items():
        match = re.search(rf"\b{name}\s*\(([^)]*)\)\s*;", text)
        assert match, f"{name} not declared in cublas_api.h"
        declared = [p for p in match.group(1).split(",") if p.strip() not in ("", "void")]
        assert [c_kind(p) for p in declared] == [ctypes_kind(t) for t in argtypes], name


def test_perf_struct_layout():
    # cudnnConvolutionFwdAlgoPerf_t: algo, status, time, memory (size_t), determinism, mathType,
    # reserved[3] -> 48 bytes on LP64 platforms.
    assert ctypes.sizeof(cudnn.AlgoPerf) == 48
    assert cudnn.AlgoPerf.memory.offset == 16


def test_a_missing_nvidia_library_is_one_clear_error():
    """cuDNN or NCCL missing: a BackendError saying what to install, not a ctypes OSError."""
    from engine.backends.cuda.libraries import load_library
    from engine.errors import BackendError

    with pytest.raises(BackendError, match=r"^libfoo is missing: install it; tried: "):
        load_library(["libengine-test-missing.so.1"], "nothing", "libfoo is missing: install it")
    assert load_library(["libc.so.6"], "nothing", "libc").getpid() > 0


@pytest.mark.parametrize("call", sorted(cudnn.IMPRECISE_ALGORITHMS))
@pytest.mark.parametrize("exact,size", [(True, 5), (True, 3), (False, 5)])
def test_algorithm_choice(call, exact, size):
    """Of the algorithms cuDNN's Find call returns (fastest first), the choice is the fastest
    that fits the workspace, is deterministic where one is, and, in exact float32 with filters
    larger than 3x3, is not a non-fused Winograd one."""
    imprecise = cudnn.IMPRECISE_ALGORITHMS[call]
    returned = [  # (algo, status, milliseconds, workspace bytes, determinism)
        (imprecise, cudnn.CUDNN_STATUS_SUCCESS, 0.01, 0, cudnn.CUDNN_DETERMINISTIC),
        (9, cudnn.CUDNN_STATUS_SUCCESS, 0.02, 2 * cudnn.WORKSPACE_LIMIT, cudnn.CUDNN_DETERMINISTIC),
        (8, 7, 0.025, 0, cudnn.CUDNN_DETERMINISTIC),  # a failed trial
        (0, cudnn.CUDNN_STATUS_SUCCESS, 0.03, 0, 0),  # atomics: not deterministic
        (1, cudnn.CUDNN_STATUS_SUCCESS, 0.05, 64, cudnn.CUDNN_DETERMINISTIC),
    ]

    expected = (1, 64) if exact and size > 3 else (imprecise, 0)
    found = faking_find(call, returned, exact).find_candidates(call, None, None, None, None,
                                                               filter_size=size)
    assert found[0] == expected


def faking_find(call, returned, exact=True):
    """A Cudnn binding whose Find `call` returns `returned`: (algo, status, milliseconds,
    workspace bytes, determinism), fastest first (no library needed)."""
    def find(handle, *arguments):
        count, results = arguments[-2]._obj, arguments[-1]._obj
        count.value = len(returned)
        for slot, (algo, status, time, memory, determinism) in zip(results, returned):
            slot.algo, slot.status, slot.time = algo, status, time
            slot.memory, slot.determinism = memory, determinism
        return cudnn.CUDNN_STATUS_SUCCESS

    binding = cudnn.Cudnn.__new__(cudnn.Cudnn)
    binding.lib = type("FakeCudnn", (), {call: staticmethod(find)})()
    binding.handle = None
    binding.math_type = cudnn.CUDNN_FMA_MATH if exact else cudnn.CUDNN_DEFAULT_MATH
    return binding


def test_of_near_equal_algorithms_the_one_needing_least_workspace_comes_first():
    """Find's timings of algorithms within NEAR_TIME of each other swap places from run to run
    (and the workspace with them): of those, the deterministic one needing the least workspace
    is chosen; one further off, or not deterministic, is not, however little it needs; the
    others follow in Find's order."""
    call = "cudnnFindConvolutionBackwardFilterAlgorithm"
    success, deterministic, MiB = cudnn.CUDNN_STATUS_SUCCESS, cudnn.CUDNN_DETERMINISTIC, 1 << 20
    near = 0.1 * cudnn.NEAR_TIME
    returned = [
        (2, success, 0.1, 47 * MiB, deterministic),
        (4, success, 0.1, 1 * MiB, 0),  # as fast, needs less, but sums with atomics
        (5, success, 0.99 * near, 28 * MiB, deterministic),
        (1, success, 0.99 * near, 30 * MiB, deterministic),
        (0, success, 1.02 * near, 0, deterministic),  # needs nothing, but too slow
    ]
    found = faking_find(call, returned).find_candidates(call, None, None, None, None)
    assert found == [(5, 28 * MiB), (2, 47 * MiB), (1, 30 * MiB), (0, 0), (4, MiB)]
    assert cudnn.lightest_near_fastest({}) is None
    assert cudnn.lightest_near_fastest({(3, 9): 1.0, (6, 9): 1.0}) == (3, 9)  # a tie: the first
