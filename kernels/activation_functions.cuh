// Darknet's activations (src/activations.h) and their gradients written through the output y,
// as engine/activations.py computes them. The ids follow activations.NAMES. The slopes and
// thresholds (LEAKY_SLOPE ...) are engine/constants.py's, given as -D options at compile time.
#pragma once

#ifndef LEAKY_SLOPE
#error "compile with engine.constants.kernel_define_options() (engine/backends/cuda/kernels.py passes them)"
#endif

#define ACT_LOGISTIC 0
#define ACT_LOGGY 1
#define ACT_RELU 2
#define ACT_ELU 3
#define ACT_SELU 4
#define ACT_RELIE 5
#define ACT_RAMP 6
#define ACT_LINEAR 7
#define ACT_TANH 8
#define ACT_PLSE 9
#define ACT_LEAKY 10
#define ACT_STAIR 11
#define ACT_HARDTAN 12
#define ACT_LHTAN 13
#define ACT_MISH 14
#define ACT_SWISH 15
#define ACT_HARD_MISH 16
#define ACT_RELU6 17
#define ACT_GELU 18
#define ACT_REVLEAKY 19

// mish(x) = x tanh(softplus(x)), softplus as AlexeyAB's softplus_activate(x, MISH_THRESHOLD):
// above the threshold it is x, and tanh(x) is 1 in float, so mish is x and its gradient 1.
// Below, with w = e^x, tanh(log(1 + w)) = n / (n + 2) where n = w (w + 2), and the gradient
// tanh(sp) + x sech^2(sp) sigmoid(x) = n / (n + 2) + 4 x w (1 + w) / (n + 2)^2: one exponential
// instead of exp, log1p and tanh (training batch norm recomputes mish's gradient in both of its
// backward passes, which that arithmetic bound). n stays finite up to the threshold (e^40).
__device__ __forceinline__ float mish(float x)
{
    if (x > MISH_THRESHOLD) return x;
    float w = expf(x), n = w * (w + 2.f);
    return x * n / (n + 2.f);
}

__device__ __forceinline__ float mish_gradient(float x)
{
    if (x > MISH_THRESHOLD) return 1.f;
    float w = expf(x), n = w * (w + 2.f), d = 1.f / (n + 2.f);
    return n * d + 4.f * x * w * (1.f + w) * d * d;
}

__device__ __forceinline__ float gelu_inner(float x) { return GELU_LINEAR * x + GELU_CUBIC * x * x * x; }

__device__ __forceinline__ float activate(float x, int act)
{
    switch (act) {
    case ACT_LOGISTIC: return 1.f / (1.f + expf(-x));
    case ACT_LOGGY: return 2.f / (1.f + expf(-x)) - 1.f;
    case ACT_RELU: return x > 0.f ? x : 0.f;
    case ACT_ELU: return x >= 0.f ? x : expm1f(x);
    case ACT_SELU: return x >= 0.f ? SELU_LAMBDA * x : SELU_LAMBDA_ALPHA * expm1f(x);
    case ACT_RELIE: return x > 0.f ? x : RELIE_SLOPE * x;
    case ACT_RAMP: return (x > 0.f ? x : 0.f) + RAMP_SLOPE * x;
    case ACT_TANH: return tanhf(x);
    case ACT_PLSE:
        if (x < -4.f) return PLSE_OUTER_SLOPE * (x + 4.f);
        if (x > 4.f) return PLSE_OUTER_SLOPE * (x - 4.f) + 1.f;
        return PLSE_SLOPE * x + 0.5f;
    case ACT_LEAKY: return x > 0.f ? x : LEAKY_SLOPE * x;
    case ACT_STAIR: {
        float n = floorf(x);
        float half = floorf(x / 2.f);
        return fmodf(n, 2.f) != 0.f ? (x - n) + half : half;
    }
    case ACT_HARDTAN: return fminf(fmaxf(x, -1.f), 1.f);
    case ACT_LHTAN:
        if (x < 0.f) return LHTAN_SLOPE * x;
        if (x > 1.f) return LHTAN_SLOPE * (x - 1.f) + 1.f;
        return x;
    case ACT_MISH: return mish(x);
    case ACT_SWISH: return x / (1.f + expf(-x));
    case ACT_HARD_MISH:
        if (x > 0.f) return x;
        if (x > -2.f) return x * x / 2.f + x;
        return 0.f;
    case ACT_RELU6: return fminf(fmaxf(x, 0.f), 6.f);
    case ACT_GELU: return 0.5f * x * (1.f + tanhf(gelu_inner(x)));
    case ACT_REVLEAKY: return x > 0.f ? x : LEAKY_SLOPE * x;
    default: return x;  // linear
    }
}

__device__ __forceinline__ float gradient(float y, int act)
{
    switch (act) {
    case ACT_LOGISTIC: return (1.f - y) * y;
    case ACT_LOGGY: { float s = (y + 1.f) / 2.f; return 2.f * (1.f - s) * s; }
    case ACT_RELU: return y > 0.f ? 1.f : 0.f;
    case ACT_ELU: return y >= 0.f ? 1.f : y + 1.f;
    case ACT_SELU: return y >= 0.f ? SELU_LAMBDA : y + SELU_LAMBDA_ALPHA;
    case ACT_RELIE: return y > 0.f ? 1.f : RELIE_SLOPE;
    case ACT_RAMP: return (y > 0.f ? 1.f : 0.f) + RAMP_SLOPE;
    case ACT_TANH: return 1.f - y * y;
    case ACT_PLSE: return (y < 0.f || y > 1.f) ? PLSE_OUTER_SLOPE : PLSE_SLOPE;
    case ACT_LEAKY: return y > 0.f ? 1.f : LEAKY_SLOPE;
    case ACT_STAIR: return floorf(y) != y ? 1.f : 0.f;
    case ACT_HARDTAN: return (y > -1.f && y < 1.f) ? 1.f : 0.f;
    case ACT_LHTAN: return (y > 0.f && y < 1.f) ? 1.f : LHTAN_SLOPE;
    case ACT_RELU6: return (y > 0.f && y < 6.f) ? 1.f : 0.f;
    case ACT_REVLEAKY: return y > 0.f ? 1.f : LEAKY_SLOPE;
    default: return 1.f;  // linear
    }
}

// Whether act's gradient needs its input x (activations.INPUT_GRADIENT), not only its output.
__device__ __forceinline__ bool gradient_needs_input(int act)
{
    return act == ACT_MISH || act == ACT_SWISH || act == ACT_HARD_MISH || act == ACT_GELU;
}

// The gradient at the input x, for the activations whose gradient needs it
// (activations.INPUT_GRADIENT: mish, swish, hard_mish, gelu).
__device__ __forceinline__ float gradient_from_input(float x, int act)
{
    switch (act) {
    case ACT_MISH: return mish_gradient(x);
    case ACT_SWISH: {
        float sigmoid = 1.f / (1.f + expf(-x)), y = x * sigmoid;
        return y + sigmoid * (1.f - y);
    }
    case ACT_HARD_MISH:
        if (x > 0.f) return 1.f;
        if (x > -2.f) return x + 1.f;
        return 0.f;
    case ACT_GELU: {
        float t = tanhf(gelu_inner(x));
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * (GELU_LINEAR + 3.f * GELU_CUBIC * x * x);
    }
    default: return 1.f;
    }
}
