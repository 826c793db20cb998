// Activations, their gradients, and the passes that follow a linear part fused with them:
// bias + activation, and Darknet's inference batch norm + activation (one read, one write).
#include "activation_functions.cuh"

// Index of the per-channel parameter of element i of an NCHW tensor: (i / spatial) % channels.
// PER_ACTIVATION statistics use spatial = 1 and channels = C*H*W.

extern "C" __global__ void activate_kernel(float *x, int n, int act)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = activate(x[i], act);
}

extern "C" __global__ void gradient_kernel(const float *y, float *delta, int n, int act)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) delta[i] *= gradient(y[i], act);
}

extern "C" __global__ void bias_activate_kernel(float *x, const float *bias, int n, int spatial,
                                                int channels, int act)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = activate(x[i] + bias[(i / spatial) % channels], act);
}

// Darknet's inference rule: scale * (x - mean) / (sqrt(var) + 1e-6) + bias, then act.
extern "C" __global__ void bn_inference_activate_kernel(const float *x, float *y, const float *mean,
                                                        const float *variance, const float *scale,
                                                        const float *bias, int n, int spatial,
                                                        int channels, int act)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int c = (i / spatial) % channels;
    float normalized = (x[i] - mean[c]) / (sqrtf(variance[c]) + 1e-6f);
    y[i] = activate(normalized * scale[c] + bias[c], act);
}

// bias_updates[c] += sum over batch and space of delta; one block per channel.
extern "C" __global__ void bias_backward_kernel(const float *delta, float *bias_updates, int batch,
                                                int channels, int spatial)
{
    __shared__ float partial[256];
    int c = blockIdx.x;
    float sum = 0.f;
    int count = batch * spatial;
    for (int k = threadIdx.x; k < count; k += blockDim.x) {
        int b = k / spatial, s = k % spatial;
        sum += delta[((size_t)b * channels + c) * spatial + s];
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) bias_updates[c] += partial[0];
}
