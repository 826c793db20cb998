// Activations, their gradients, and the passes that follow a linear part fused with them:
// bias + activation, and Darknet's inference batch norm + activation (one read, one write).
#include "activation_functions.cuh"
#include "packs.cuh"
#include "strided.cuh"

// Index of the per-channel parameter of element i of an NCHW tensor: (i / spatial) % channels.
// PER_ACTIVATION statistics use spatial = 1 and channels = C*H*W.

// The whole-array passes take a 16-byte pack per thread where `vec` (packs.cuh), else a value.
extern "C" __global__ void activate_kernel(act_t *x, int n, int act, int vec)
{
    update_values(x, (size_t)blockIdx.x * blockDim.x + threadIdx.x, n, vec,
                  [=](float v) { return activate(v, act); });
}

extern "C" __global__ void gradient_kernel(const act_t *y, act_t *delta, int n, int act, int vec)
{
    update_values(delta, y, (size_t)blockIdx.x * blockDim.x + threadIdx.x, n, vec,
                  [=](float d, float out) { return d * gradient(out, act); });
}

// act on the n elements of a strided window of x (strided.cuh), in place.
extern "C" __global__ void activate_strided_kernel(act_t *x, int n, WINDOW_COUNTS,
                                                   WINDOW_STRIDES(x_), int act)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long at = AT(x_, i);
    x[at] = store(activate(load(x[at]), act));
}

// delta *= act'(x) for the activations whose gradient needs the input x.
extern "C" __global__ void input_gradient_kernel(const act_t *x, act_t *delta, int n, int act,
                                                 int vec)
{
    update_values(delta, x, (size_t)blockIdx.x * blockDim.x + threadIdx.x, n, vec,
                  [=](float d, float in) { return d * gradient_from_input(in, act); });
}

// AlexeyAB's normalize_channels activations across the C channels of each (image, position);
// one thread per position. mode 0: positive values over (eps + their sum), others 0;
// 1: exp(x) / (eps + sum exp(x)); 2: as 1 with the channels' maximum subtracted first
// (eps: NORMALIZE_CHANNELS_EPSILON).
extern "C" __global__ void normalize_channels_kernel(const act_t *x, act_t *y, int positions,
                                                     int channels, int spatial, int mode)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= positions) return;
    size_t base = (size_t)(i / spatial) * channels * spatial + i % spatial;
    float shift = 0.f, sum = NORMALIZE_CHANNELS_EPSILON;
    if (mode == 2) {
        shift = load(x[base]);
        for (int k = 1; k < channels; ++k) shift = fmaxf(shift, load(x[base + (size_t)k * spatial]));
    }
    for (int k = 0; k < channels; ++k) {
        float v = load(x[base + (size_t)k * spatial]);
        sum += mode == 0 ? (v > 0.f ? v : 0.f) : expf(v - shift);
    }
    for (int k = 0; k < channels; ++k) {
        float v = load(x[base + (size_t)k * spatial]);
        y[base + (size_t)k * spatial] = store(mode == 0 ? (v > 0.f ? v / sum : 0.f) : expf(v - shift) / sum);
    }
}

// The exact gradient of normalize_channels_kernel at input x: dx replaces delta, in place.
extern "C" __global__ void normalize_channels_backward_kernel(const act_t *x, act_t *delta,
                                                              int positions, int channels,
                                                              int spatial, int mode)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= positions) return;
    size_t base = (size_t)(i / spatial) * channels * spatial + i % spatial;
    float shift = 0.f, sum = NORMALIZE_CHANNELS_EPSILON, inner = 0.f;
    int winner = 0;
    if (mode == 2) {
        shift = load(x[base]);
        for (int k = 1; k < channels; ++k) {
            float v = load(x[base + (size_t)k * spatial]);
            if (v > shift) { shift = v; winner = k; }
        }
    }
    for (int k = 0; k < channels; ++k) {
        float v = load(x[base + (size_t)k * spatial]);
        sum += mode == 0 ? (v > 0.f ? v : 0.f) : expf(v - shift);
    }
    for (int k = 0; k < channels; ++k) {
        size_t at = base + (size_t)k * spatial;
        float v = load(x[at]);
        float y = mode == 0 ? (v > 0.f ? v / sum : 0.f) : expf(v - shift) / sum;
        inner += y * load(delta[at]);
    }
    float winner_shift = 0.f;
    for (int k = 0; k < channels; ++k) {
        size_t at = base + (size_t)k * spatial;
        float v = load(x[at]);
        if (mode == 0) {
            delta[at] = store(v > 0.f ? (load(delta[at]) - inner) / sum : 0.f);
        } else {
            float y = expf(v - shift) / sum;
            delta[at] = store(y * (load(delta[at]) - inner));
        }
    }
    if (mode == 2) {
        winner_shift = inner * NORMALIZE_CHANNELS_EPSILON / sum;
        delta[base + (size_t)winner * spatial] = store(load(delta[base + (size_t)winner * spatial]) - winner_shift);
    }
}

extern "C" __global__ void bias_activate_kernel(act_t *x, const float *bias, int n, int spatial,
                                                int channels, int act)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = store(activate(load(x[i]) + bias[(i / spatial) % channels], act));
}

// The same for x stored channels last (NHWC: element i has channel i % channels); where `vec`
// (channels a multiple of VEC) a pack of VEC neighbouring channels per thread.
extern "C" __global__ void bias_activate_nhwc_kernel(act_t *x, const float *bias, int n,
                                                     int channels, int act, int vec)
{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        if (t >= (size_t)(n / VEC)) return;
        Pack pack = ((Pack *)x)[t];
        const float *b = bias + (t * VEC) % channels;
#pragma unroll
        for (int k = 0; k < VEC; k++) pack.v[k] = store(activate(load(pack.v[k]) + b[k], act));
        ((Pack *)x)[t] = pack;
    } else if (t < (size_t)n) {
        x[t] = store(activate(load(x[t]) + bias[t % channels], act));
    }
}

// The same over whole channel planes: block b works on plane b / chunks (batch * channels planes
// of `spatial` elements), on its chunk b % chunks of PLANE_CHUNK elements. No division per
// element, and every thread's four elements are a block apart (coalesced). For large maps.
#define PLANE_CHUNK 1024
extern "C" __global__ void bias_activate_planes_kernel(act_t *x, const float *bias, int spatial,
                                                       int channels, int chunks, int act)
{
    int plane = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
    float b = bias[plane % channels];
    act_t *row = x + (size_t)plane * spatial;
    for (int i = chunk * PLANE_CHUNK + threadIdx.x; i < min(spatial, (chunk + 1) * PLANE_CHUNK);
         i += blockDim.x)
        row[i] = store(activate(load(row[i]) + b, act));
}

// Darknet's inference rule: scale * (x - mean) / (sqrt(var + inside) + outside) + bias, then
// act; (inside, outside) are engine/constants.py's PJREDDIE_BN_EPSILONS or ALEXEYAB_BN_EPSILONS.
extern "C" __global__ void bn_inference_activate_kernel(const act_t *x, act_t *y, const float *mean,
                                                        const float *variance, const float *scale,
                                                        const float *bias, int n, int spatial,
                                                        int channels, int act, float inside,
                                                        float outside)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int c = (i / spatial) % channels;
    float normalized = (load(x[i]) - mean[c]) / (sqrtf(variance[c] + inside) + outside);
    y[i] = store(activate(normalized * scale[c] + bias[c], act));
}

// bn_inference_activate_kernel over whole channel planes, as bias_activate_planes_kernel.
extern "C" __global__ void bn_inference_activate_planes_kernel(
    const act_t *x, act_t *y, const float *mean, const float *variance, const float *scale,
    const float *bias, int spatial, int channels, int chunks, int act, float inside,
    float outside)
{
    int plane = blockIdx.x / chunks, chunk = blockIdx.x % chunks, c = plane % channels;
    // The same arithmetic as bn_inference_activate_kernel, so both give the same values.
    float denominator = sqrtf(variance[c] + inside) + outside, m = mean[c], s = scale[c];
    float b = bias[c];
    size_t base = (size_t)plane * spatial;
    for (int i = chunk * PLANE_CHUNK + threadIdx.x; i < min(spatial, (chunk + 1) * PLANE_CHUNK);
         i += blockDim.x)
        y[base + i] = store(activate((load(x[base + i]) - m) / denominator * s + b, act));
}

// bias_updates[c] += sum over batch and space of delta; one block per channel.
extern "C" __global__ void bias_backward_kernel(const act_t *delta, float *bias_updates, int batch,
                                                int channels, int spatial)
{
    __shared__ float partial[256];
    int c = blockIdx.x;
    float sum = 0.f;
    int count = batch * spatial;
    for (int k = threadIdx.x; k < count; k += blockDim.x) {
        int b = k / spatial, s = k % spatial;
        sum += load(delta[((size_t)b * channels + c) * spatial + s]);
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) bias_updates[c] += partial[0];
}
