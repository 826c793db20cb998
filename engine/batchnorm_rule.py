"""Darknet's inference batch norm, written once: scales * (x - rolling_mean) /
(sqrt(rolling_variance + e0) + e1) + biases, as one affine map per statistic. The numpy backend
applies it, folding (layers/base.py) and the ONNX export bake it into weights, and
kernels/activations.cu's bn_inference_activate_kernel is its GPU implementation (checked against
the numpy backend by tests/test_gpu_backend.py)."""

import numpy as np


def inference_affine(scales, biases, rolling_mean, rolling_variance, epsilons):
    """(factor, shift) with y = x * factor + shift, in the arrays' dtype: (e0, e1) = `epsilons`,
    pjreddie's (0, 1e-6) or AlexeyAB's (1e-5, 0)."""
    inside, outside = (scales.dtype.type(e) for e in epsilons)
    factor = scales / (np.sqrt(rolling_variance + inside) + outside)
    return factor, biases - rolling_mean * factor
