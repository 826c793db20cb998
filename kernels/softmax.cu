// Softmax over contiguous rows or along an axis of a strided view, and the two costs:
// cross-entropy after a softmax, and Darknet's sum of squares. The costs are reduced per block
// and added into one float (zeroed before).
#include "storage.cuh"
#include "strided.cuh"

#ifndef CROSS_ENTROPY_FLOOR
#error "compile with engine.constants.kernel_define_options() (engine/backends/cuda/kernels.py passes them)"
#endif

extern "C" __global__ void softmax_kernel(const act_t *x, act_t *y, int rows, int n,
                                          float inverse_temperature)
{
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const act_t *in = x + (size_t)r * n;
    act_t *out = y + (size_t)r * n;
    float largest = -INFINITY;
    for (int k = 0; k < n; ++k) largest = fmaxf(largest, load(in[k]) * inverse_temperature);
    float sum = 0.f;
    for (int k = 0; k < n; ++k) sum += expf(load(in[k]) * inverse_temperature - largest);
    // The second pass recomputes each exponential rather than reading it back rounded to the
    // storage type.
    for (int k = 0; k < n; ++k) out[k] = store(expf(load(in[k]) * inverse_temperature - largest) / sum);
}

// Softmax along one axis of a strided window of x, in place: the window's counts here have 1 on
// that axis (n lanes), which holds `count` elements `stride` apart.
extern "C" __global__ void softmax_strided_kernel(act_t *x, int n, WINDOW_COUNTS,
                                                  WINDOW_STRIDES(x_), int count, int stride)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    act_t *v = x + AT(x_, i);
    float largest = -INFINITY;
    for (int e = 0; e < count; ++e) largest = fmaxf(largest, load(v[(long long)e * stride]));
    float sum = 0.f;
    for (int e = 0; e < count; ++e) sum += expf(load(v[(long long)e * stride]) - largest);
    for (int e = 0; e < count; ++e)
        v[(long long)e * stride] = store(expf(load(v[(long long)e * stride]) - largest) / sum);
}

__device__ void add_block_sum(float value, float *total)
{
    __shared__ float partial[256];
    partial[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(total, partial[0]);
}

// delta = truth - p; cost += -truth * log(max(p, CROSS_ENTROPY_FLOOR)).
extern "C" __global__ void cross_entropy_kernel(const act_t *p, const float *truth, act_t *delta,
                                                float *cost, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float c = 0.f;
    if (i < n) {
        float t = truth[i];
        float q = load(p[i]);
        delta[i] = store(t - q);
        if (t != 0.f) c = -t * logf(fmaxf(q, CROSS_ENTROPY_FLOOR));
    }
    add_block_sum(c, cost);
}

// delta = truth - output; cost += delta^2.
extern "C" __global__ void sse_kernel(const act_t *output, const float *truth, act_t *delta,
                                      float *cost, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float c = 0.f;
    if (i < n) {
        float d = truth[i] - load(output[i]);
        delta[i] = store(d);
        c = d * d;
    }
    add_block_sum(c, cost);
}
