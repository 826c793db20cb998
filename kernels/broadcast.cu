// Broadcasting arithmetic on NCHW arrays seen as (batch, channels, positions): products (AlexeyAB's
// [sam], [scale_channels], weighted [shortcut]) and weighted sums ([shortcut]); the sums that are
// their adjoint are strided.cu's sum_to_kernel.
#include "storage.cuh"

// out[i] = a[i] * b[...] where b's element strides over (batch, channel, position) are 0 along
// the axes it is broadcast on.
extern "C" __global__ void broadcast_multiply_kernel(const act_t *a, const act_t *b, act_t *out,
                                                     int n, int channels, int spatial,
                                                     int b_batch, int b_channel, int b_position)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, c = (i / spatial) % channels, n_ = i / (spatial * channels);
    out[i] = store(load(a[i]) *
                   load(b[(size_t)n_ * b_batch + (size_t)c * b_channel + (size_t)s * b_position]));
}

// out[i] = alpha * a[i] + beta * b[...], b broadcast as in broadcast_multiply_kernel.
extern "C" __global__ void broadcast_add_kernel(const act_t *a, const act_t *b, act_t *out, int n,
                                                int channels, int spatial, int b_batch,
                                                int b_channel, int b_position, float alpha,
                                                float beta)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, c = (i / spatial) % channels, n_ = i / (spatial * channels);
    out[i] = store(alpha * load(a[i]) +
                   beta * load(b[(size_t)n_ * b_batch + (size_t)c * b_channel +
                                 (size_t)s * b_position]));
}

// out[i] = alpha * a[i] + beta * b[i] for arrays of one shape (a [shortcut]'s sum): no index
// arithmetic beyond i.
extern "C" __global__ void add_scaled_kernel(const act_t *a, const act_t *b, act_t *out, int n,
                                             float alpha, float beta)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store(alpha * load(a[i]) + beta * load(b[i]));
}
