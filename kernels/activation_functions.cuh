// Darknet's activations (src/activations.h) and their gradients written through the output y,
// as engine/activations.py computes them. The ids follow activations.NAMES.
#pragma once

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

#define SELU_LAMBDA 1.0507f
#define SELU_LAMBDA_ALPHA ((float)(1.0507 * 1.6732))

__device__ __forceinline__ float activate(float x, int act)
{
    switch (act) {
    case ACT_LOGISTIC: return 1.f / (1.f + expf(-x));
    case ACT_LOGGY: return 2.f / (1.f + expf(-x)) - 1.f;
    case ACT_RELU: return x > 0.f ? x : 0.f;
    case ACT_ELU: return x >= 0.f ? x : expm1f(x);
    case ACT_SELU: return x >= 0.f ? SELU_LAMBDA * x : SELU_LAMBDA_ALPHA * expm1f(x);
    case ACT_RELIE: return x > 0.f ? x : 0.01f * x;
    case ACT_RAMP: return (x > 0.f ? x : 0.f) + 0.1f * x;
    case ACT_TANH: return tanhf(x);
    case ACT_PLSE:
        if (x < -4.f) return 0.01f * (x + 4.f);
        if (x > 4.f) return 0.01f * (x - 4.f) + 1.f;
        return 0.125f * x + 0.5f;
    case ACT_LEAKY: return x > 0.f ? x : 0.1f * x;
    case ACT_STAIR: {
        float n = floorf(x);
        float half = floorf(x / 2.f);
        return fmodf(n, 2.f) != 0.f ? (x - n) + half : half;
    }
    case ACT_HARDTAN: return fminf(fmaxf(x, -1.f), 1.f);
    case ACT_LHTAN:
        if (x < 0.f) return 0.001f * x;
        if (x > 1.f) return 0.001f * (x - 1.f) + 1.f;
        return x;
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
    case ACT_RELIE: return y > 0.f ? 1.f : 0.01f;
    case ACT_RAMP: return (y > 0.f ? 1.f : 0.f) + 0.1f;
    case ACT_TANH: return 1.f - y * y;
    case ACT_PLSE: return (y < 0.f || y > 1.f) ? 0.01f : 0.125f;
    case ACT_LEAKY: return y > 0.f ? 1.f : 0.1f;
    case ACT_STAIR: return floorf(y) != y ? 1.f : 0.f;
    case ACT_HARDTAN: return (y > -1.f && y < 1.f) ? 1.f : 0.f;
    case ACT_LHTAN: return (y > 0.f && y < 1.f) ? 1.f : 0.001f;
    default: return 1.f;  // linear
    }
}
