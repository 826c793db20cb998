// Small elementwise passes: sums of deltas, scaling, masks, and Darknet's SGD step (whose
// parameters are float in every storage), and conversions between float and the storage type.
#include "packs.cuh"

// dst += src: a 16-byte pack per thread where `vec` (packs.cuh), else a value.
extern "C" __global__ void add_kernel(act_t *dst, const act_t *src, int n, int vec)
{
    update_values(dst, src, (size_t)blockIdx.x * blockDim.x + threadIdx.x, n, vec,
                  [](float a, float b) { return a + b; });
}

extern "C" __global__ void scale_kernel(act_t *x, float factor, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = store(load(x[i]) * factor);
}

extern "C" __global__ void multiply_kernel(const act_t *a, const act_t *b, act_t *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store(load(a[i]) * load(b[i]));
}

// Darknet's update for one tensor (numpy_backend.sgd_update): v = momentum*v + gradient -
// decay*batch*p; p += lr/batch * v; gradient = 0 (the velocity v is the optimiser's state).
// lr_over_batch comes as an argument, or, when learning_rate is not null, from device memory
// (a captured CUDA graph replays with the rate of each step). With a loss-scale state
// (loss_scale.cu: S, overflow) the gradient holds S times the gradients: the step uses
// gradient / S, and is skipped (param and velocity unchanged, gradient zeroed) on overflow.
extern "C" __global__ void sgd_kernel(float *param, float *gradient, float *velocity, int n,
                                      float lr_over_batch, const float *learning_rate,
                                      float inverse_batch, float momentum, float decay_times_batch,
                                      const float *loss_scale)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gradient[i];
    if (loss_scale) {
        gradient[i] = 0.0f;
        if (loss_scale[1] != 0.0f) return;
        g = __fdiv_rn(g, loss_scale[0]);
    }
    float rate = learning_rate ? learning_rate[0] * inverse_batch : lr_over_batch;
    float p = param[i];
    float v = __fmul_rn(velocity[i], momentum) + g - decay_times_batch * p;
    param[i] = p + rate * v;
    velocity[i] = v;
    gradient[i] = 0.0f;
}

// Conversions: storage from float, and float from storage (added to `to` when accumulate: a
// reduced-precision weight gradient joins its float updates).
extern "C" __global__ void from_float_kernel(const float *src, act_t *dst, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = store(src[i]);
}

extern "C" __global__ void to_float_kernel(const act_t *src, float *dst, int n, int accumulate)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = accumulate ? dst[i] + load(src[i]) : load(src[i]);
}

// flag[0] = 1 if any of the n values is NaN or infinite (flag zeroed before): the finiteness
// check of outputs without copying them to the host first.
extern "C" __global__ void nonfinite_kernel(const act_t *x, int *flag, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && !isfinite(load(x[i]))) *flag = 1;
}

// Keeps the GPU busy for `microseconds` (one thread's wait on the global timer). Queued before
// work that events time, it lets the host issue that work ahead of the GPU, so the events time
// the GPU alone: a small convolution's kernels run in microseconds, while issuing one from
// Python takes tens of them.
extern "C" __global__ void hold_kernel(int microseconds)
{
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < 1000ull * microseconds);
}
