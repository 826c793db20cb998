"""Numeric precisions a backend computes in (`--precision`, `get_backend(precision=...)`).

- fp32: float32 everywhere, exact float32 products (the default; the CPU backend's only one).
- tf32: float32 storage; cuDNN convolutions may round their inputs to TF32 on tensor cores, as
  PyTorch's do by default (about 1e-3 relative).
- fp16, bf16: activations and deltas stored in half precision (IEEE binary16 or bfloat16),
  convolutions on tensor cores with float32 accumulation; parameters, their updates, batch-norm
  statistics and losses stay float32 (the master weights AlexeyAB's CUDNN_HALF and PyTorch's
  AMP also keep). Inference outputs are within about 1e-2 of fp32's, relative to their scale.
"""

import numpy as np

from .errors import BackendError

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
REDUCED = ("fp16", "bf16")

# numpy has no bfloat16: device arrays of bf16 values are uint16 arrays of their bits, and reach
# the host only through a conversion to float32 on the device.
STORAGE_DTYPES = {"fp32": np.dtype(np.float32), "tf32": np.dtype(np.float32),
                  "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


def check_precision(precision, backend_name):
    """precision, or a BackendError naming the choices (the CPU backend computes in fp32)."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision '{precision}'; expected one of "
                           f"{', '.join(PRECISIONS)}")
    if backend_name == "cpu" and precision != "fp32":
        raise BackendError(f"precision {precision} needs the GPU backend (--gpu); the CPU "
                           "computes in fp32")
    return precision
