"""The numbers that define what the engine computes, in one place.

Darknet's batch-norm epsilons and momentum, the activations' slopes and thresholds, and the
floors of the losses. The numpy backend, the CUDA backend (cuDNN calls), engine/activations.py
and the ONNX exporter import them from here; the CUDA kernels receive KERNEL_DEFINES as -D
options when they are compiled (engine/backends/cuda/kernels.py), so kernels/*.cu hold none of
these literals. Changing one changes every backend alike.
"""

import numpy as np

# ---- batch normalisation -------------------------------------------------------------------------
# Training (cuDNN's rule, which both backends follow): y = (x - mean) / sqrt(var + epsilon) with
# the biased batch variance; the rolling statistics move BN_MOMENTUM of the way toward the batch
# mean and unbiased variance (cuDNN's exponentialAverageFactor; Darknet's .01).
BN_TRAINING_EPSILON = 1e-5
BN_MOMENTUM = 0.01
# Inference: scales * (x - mean) / (sqrt(var + e0) + e1) + biases with (e0, e1) the rule of the
# Darknet a cfg comes from: pjreddie's divides by sqrt(var) + .000001f (normalize_cpu), AlexeyAB's
# by sqrt(var + .00001f) (normalize_cpu, fuse_conv_batchnorm).
PJREDDIE_BN_EPSILON = 1e-6
ALEXEYAB_BN_EPSILON = 1e-5
PJREDDIE_BN_EPSILONS = (0.0, PJREDDIE_BN_EPSILON)
ALEXEYAB_BN_EPSILONS = (ALEXEYAB_BN_EPSILON, 0.0)

# ---- activations (Darknet's src/activations.h, AlexeyAB's additions) -----------------------------
LEAKY_SLOPE = 0.1          # leaky and revleaky: x > 0 ? x : .1x
RELIE_SLOPE = 0.01         # relie: x > 0 ? x : .01x
RAMP_SLOPE = 0.1           # ramp: relu(x) + .1x
PLSE_SLOPE = 0.125         # plse: .125x + .5 on [-4, 4] ...
PLSE_OUTER_SLOPE = 0.01    # ... and .01 slopes outside
LHTAN_SLOPE = 0.001        # lhtan: .001 slopes outside [0, 1]
SELU_LAMBDA = 1.0507
SELU_ALPHA = 1.6732
MISH_THRESHOLD = 20.0      # AlexeyAB's softplus: x above it, exp(x) below -it, else log(exp(x)+1)
GELU_LINEAR = 0.797885     # AlexeyAB's gelu: .5x(1 + tanh(.797885x + .035677x^3))
GELU_CUBIC = 0.035677
NORMALIZE_CHANNELS_EPSILON = 1e-4  # AlexeyAB's normalize_channels(_softmax): added to the sum

# ---- losses --------------------------------------------------------------------------------------
CROSS_ENTROPY_FLOOR = 1e-30  # softmax cross-entropy takes log(max(p, this))


def _float_literal(value):
    """A C float literal holding exactly float32(value): the value the numpy backend computes
    with (its arithmetic is float32), so the kernels compute with the same one."""
    return f"{float(np.float32(value))!r}f"


# name -> C literal, passed to nvcc as -DNAME=literal (kernels/*.cu check that they are defined).
KERNEL_DEFINES = {
    "LEAKY_SLOPE": _float_literal(LEAKY_SLOPE),
    "RELIE_SLOPE": _float_literal(RELIE_SLOPE),
    "RAMP_SLOPE": _float_literal(RAMP_SLOPE),
    "PLSE_SLOPE": _float_literal(PLSE_SLOPE),
    "PLSE_OUTER_SLOPE": _float_literal(PLSE_OUTER_SLOPE),
    "LHTAN_SLOPE": _float_literal(LHTAN_SLOPE),
    "SELU_LAMBDA": _float_literal(SELU_LAMBDA),
    "SELU_LAMBDA_ALPHA": _float_literal(SELU_LAMBDA * SELU_ALPHA),  # as activations.py rounds it
    "MISH_THRESHOLD": _float_literal(MISH_THRESHOLD),
    "GELU_LINEAR": _float_literal(GELU_LINEAR),
    "GELU_CUBIC": _float_literal(GELU_CUBIC),
    "NORMALIZE_CHANNELS_EPSILON": _float_literal(NORMALIZE_CHANNELS_EPSILON),
    "CROSS_ENTROPY_FLOOR": _float_literal(CROSS_ENTROPY_FLOOR),
    # kernels/batchnorm.cu computes the statistics in double, as cuDNN takes these two
    "BN_MOMENTUM": repr(float(BN_MOMENTUM)),
    "BN_TRAINING_EPSILON": repr(float(BN_TRAINING_EPSILON)),
}


def kernel_define_options():
    """The -D options that give kernels/*.cu the constants above (PyCUDA and the compile test
    pass the same)."""
    return [f"-D{name}={literal}" for name, literal in KERNEL_DEFINES.items()]
