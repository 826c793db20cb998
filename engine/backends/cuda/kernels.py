"""Loads kernels/*.cu with PyCUDA (compiled once per process and storage type; PyCUDA also caches
the binaries on disk) and launches them on the device's stream through prepared calls (cheapest
from Python).

Every source is compiled for each storage type of activations a backend uses (kernels/storage.cuh:
float, and __half or __nv_bfloat16 in fp16 or bf16 precision); a launch names the numpy dtype of
the arrays it works on and gets that build of the kernel.
"""

import os

import numpy as np

from ...constants import kernel_define_options
from ...errors import BackendError

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "kernels")

BLOCK = 256
PLANE_CHUNK = 1024  # elements of a channel plane per block in the *_planes kernels
ROW_CHUNK = 4096  # elements of a row per block in copy_rows_kernel (kernels/strided.cu)

# nvcc options of every kernel: optimised, and engine/constants.py's values as -D definitions.
COMPILE_OPTIONS = ["-O3"] + kernel_define_options()

# kernel name -> (source file, PyCUDA argument signature: P pointer, i int, I uint, f float)
SIGNATURES = {
    "activate_kernel": ("activations.cu", "Piii"),
    "gradient_kernel": ("activations.cu", "PPiii"),
    "bias_activate_kernel": ("activations.cu", "PPiiii"),
    "bias_activate_nhwc_kernel": ("activations.cu", "PPiiii"),
    "input_gradient_kernel": ("activations.cu", "PPiii"),
    "activate_strided_kernel": ("activations.cu", "P" + "i" * 14),
    "normalize_channels_kernel": ("activations.cu", "PPiiii"),
    "normalize_channels_backward_kernel": ("activations.cu", "PPiiii"),
    "bn_inference_activate_kernel": ("activations.cu", "PPPPPPiiiiff"),
    "bias_backward_kernel": ("activations.cu", "PPiii"),
    "bias_activate_planes_kernel": ("activations.cu", "PPiiii"),
    "bn_inference_activate_planes_kernel": ("activations.cu", "PPPPPPiiiiff"),
    "add_scaled_kernel": ("broadcast.cu", "PPPiff"),
    "add_kernel": ("elementwise.cu", "PPii"),
    "scale_kernel": ("elementwise.cu", "Pfi"),
    "multiply_kernel": ("elementwise.cu", "PPPi"),
    "sgd_kernel": ("elementwise.cu", "PPPifPfffP"),
    "loss_scale_kernel": ("loss_scale.cu", "PiP"),
    "flag_non_finite_kernel": ("loss_scale.cu", "PiP"),
    "update_loss_scale_kernel": ("loss_scale.cu", "Pii"),
    "maxpool_forward_kernel": ("pooling.cu", "PPPiiiiiiii"),
    "maxpool_forward_nhwc_kernel": ("pooling.cu", "PPPiiiiiiiii"),
    "maxpool_backward_kernel": ("pooling.cu", "PPPiiiiiiii"),
    "maxpool_scatter_kernel": ("pooling.cu", "PPPiii"),
    "maxpool_backward_nhwc_kernel": ("pooling.cu", "PPPiiiiiiiii"),
    "maxpool_scatter_nhwc_kernel": ("pooling.cu", "PPPiiii"),
    "dropout_forward_kernel": ("dropout.cu", "PPPiffIPI"),
    "softmax_kernel": ("softmax.cu", "PPiif"),
    "broadcast_multiply_kernel": ("broadcast.cu", "PPPiiiiii"),
    "broadcast_add_kernel": ("broadcast.cu", "PPPiiiiiiff"),
    "sum_to_kernel": ("strided.cu", "PP" + "i" * 8 + "f"),
    "strided_copy_kernel": ("strided.cu", "PP" + "i" * 20 + "ffi"),
    "copy_rows_kernel": ("strided.cu", "PPiiiiiiffi"),
    "copy_vectors_kernel": ("strided.cu", "PPiiiiiiffi"),
    "softmax_strided_kernel": ("softmax.cu", "P" + "i" * 15),
    "local_avgpool_kernel": ("pooling.cu", "PPiiiiiiiii"),
    "channel_max_kernel": ("pooling.cu", "PPPiiii"),
    "channel_max_backward_kernel": ("pooling.cu", "PPPiiii"),
    "local_avgpool_backward_kernel": ("pooling.cu", "PPiiiiiiiii"),
    "cross_entropy_kernel": ("softmax.cu", "PPPPi"),
    "sse_kernel": ("softmax.cu", "PPPPi"),
    "from_float_kernel": ("elementwise.cu", "PPi"),
    "to_float_kernel": ("elementwise.cu", "PPii"),
    "nonfinite_kernel": ("elementwise.cu", "PPi"),
    "hold_kernel": ("elementwise.cu", "i"),
    "bn_sums_kernel": ("batchnorm.cu", "PPiiiii"),
    "bn_statistics_kernel": ("batchnorm.cu", "PPPPPii"),
    "bn_normalize_kernel": ("batchnorm.cu", "PPPPPPiiiii"),
    "bn_backward_sums_kernel": ("batchnorm.cu", "P" * 8 + "i" * 6),
    "bn_updates_kernel": ("batchnorm.cu", "PPPi"),
    "bn_backward_kernel": ("batchnorm.cu", "P" * 9 + "i" * 6),
    "bn_sums_nhwc_kernel": ("batchnorm.cu", "PPiii"),
    "bn_normalize_nhwc_kernel": ("batchnorm.cu", "P" * 6 + "iiii"),
    "bn_backward_sums_nhwc_kernel": ("batchnorm.cu", "P" * 8 + "iiii"),
    "bn_backward_nhwc_kernel": ("batchnorm.cu", "P" * 9 + "iiii"),
    "truth_overlap_kernel": ("yolo_loss.cu", "PPPPPiiiiiiffiif"),
    "objectness_delta_kernel": ("yolo_loss.cu", "PPPiiiiffi"),
    "gather_cells_kernel": ("yolo_loss.cu", "PPPiiiii"),
    "scatter_cells_kernel": ("yolo_loss.cu", "PPPiiiii"),
    "sum_of_squares_kernel": ("yolo_loss.cu", "PPi"),
    "truth_events_kernel": ("yolo_truths.cu", "P" * 8 + "i" * 6 + "ff" + "i" * 8),
}

# numpy dtype of a device array -> the C type kernels/storage.cuh stores it as (bf16 values are
# held in uint16 arrays: engine/precision.py).
STORAGE_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half",
                 np.dtype(np.uint16): "__nv_bfloat16"}
FLOAT32 = np.dtype(np.float32)


class Kernels:
    def __init__(self, device, kernel_dir=KERNEL_DIR):
        self.stream = device.stream
        self.kernel_dir = kernel_dir
        self.builds = {}  # numpy dtype -> {kernel name: prepared function}
        self.functions = self._build(FLOAT32)

    def _build(self, dtype):
        """Every kernel compiled with -DSTORAGE=<dtype's C type>, made once per process."""
        from pycuda.compiler import SourceModule
        from pycuda.driver import CompileError

        dtype = np.dtype(dtype)
        if dtype in self.builds:
            return self.builds[dtype]
        options = COMPILE_OPTIONS + [f"-DSTORAGE={STORAGE_TYPES[dtype]}"]
        modules, functions = {}, {}
        for name, (source, signature) in SIGNATURES.items():
            if source not in modules:
                path = os.path.join(self.kernel_dir, source)
                try:
                    with open(path) as handle:
                        code = handle.read()
                except OSError as error:
                    raise BackendError(f"cannot read kernel source {path}: {error}") from None
                try:
                    modules[source] = SourceModule(code, no_extern_c=True,
                                                   include_dirs=[self.kernel_dir], options=options)
                except CompileError as error:
                    message = (error.stderr or error.stdout or str(error)).strip()
                    raise BackendError(f"kernel {path} failed to compile:\n{message}") from None
                except OSError as error:  # nvcc missing
                    raise BackendError(f"cannot compile {path}: {error} (is nvcc on PATH?)") from None
            function = modules[source].get_function(name)
            function.prepare(signature)
            functions[name] = _Launcher(function, self.stream)
        self.builds[dtype] = functions
        return functions

    def _function(self, name, dtype):
        functions = self.builds.get(dtype) if dtype is not None else self.functions
        return (functions or self._build(dtype))[name]

    def launch(self, name, n, *args, dtype=None):
        """One thread per element for n elements; args follow the kernel's signature; dtype: the
        storage of its activation arrays (float32 when None)."""
        if n > 0:
            self._function(name, dtype)(((n + BLOCK - 1) // BLOCK, 1), args)

    @staticmethod
    def plane_chunks(spatial):
        """Blocks per channel plane of `spatial` elements in the *_planes kernels."""
        return (spatial + PLANE_CHUNK - 1) // PLANE_CHUNK

    def launch_planes(self, name, planes, spatial, *args, dtype=None):
        """A *_planes kernel (kernels/activations.cu) over `planes` channel planes of `spatial`
        elements; args follow its signature (they include plane_chunks(spatial))."""
        if planes > 0 and spatial > 0:
            self.launch_blocks(name, planes * self.plane_chunks(spatial), *args, dtype=dtype)

    def launch_blocks(self, name, blocks, *args, dtype=None):
        """One block of BLOCK threads per item (reductions)."""
        if blocks > 0:
            self._function(name, dtype)((blocks, 1), args)


class _Launcher:
    """A prepared kernel launched with BLOCK threads a block on the stream. PyCUDA's
    prepared_async_call imports its packer, sets the legacy block shape and checks its keyword
    arguments on every call before it calls the function's _launch_kernel; this calls that
    directly, with the arguments packed by the same packer: 5.2 us of host time a launch on an
    H200 against 6.2, and eager steps of small networks issue dozens. Where a PyCUDA has no
    _launch_kernel, prepared_async_call does the launch."""

    def __init__(self, function, stream):
        from pycuda._pvt_struct import pack

        self.function, self.stream = function, stream
        self.pack, self.arg_format = pack, function.arg_format
        self.launch_kernel = getattr(function, "_launch_kernel", None)

    def __call__(self, grid, args):
        if self.launch_kernel is None:
            self.function.prepared_async_call(grid, (BLOCK, 1, 1), self.stream, *args)
        else:
            self.launch_kernel(grid, (BLOCK, 1, 1), self.pack(self.arg_format, *args), 0,
                               self.stream)
