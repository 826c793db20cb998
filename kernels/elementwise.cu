// Small elementwise passes: sums of deltas, scaling, masks, and Darknet's SGD step.

extern "C" __global__ void add_kernel(float *dst, const float *src, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}

extern "C" __global__ void scale_kernel(float *x, float factor, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= factor;
}

extern "C" __global__ void multiply_kernel(const float *a, const float *b, float *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * b[i];
}

// Darknet's update for one tensor (numpy_backend.sgd_update): v = momentum*v + gradient -
// decay*batch*p; p += lr/batch * v; gradient = 0 (the velocity v is the optimiser's state).
// lr_over_batch comes as an argument, or, when learning_rate is not null, from device memory
// (a captured CUDA graph replays with the rate of each step).
extern "C" __global__ void sgd_kernel(float *param, float *gradient, float *velocity, int n,
                                      float lr_over_batch, const float *learning_rate,
                                      float inverse_batch, float momentum, float decay_times_batch)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float rate = learning_rate ? learning_rate[0] * inverse_batch : lr_over_batch;
    float p = param[i];
    float v = __fmul_rn(velocity[i], momentum) + gradient[i] - decay_times_batch * p;
    param[i] = p + rate * v;
    velocity[i] = v;
    gradient[i] = 0.0f;
}
