// Loss scaling (engine/loss_scaling.py): a state of four floats in device memory, (S, overflow,
// good steps, skipped steps), that the host writes once, before training, and reads
// asynchronously after iterations. Kernels read S from there, never as an argument, so a
// recorded iteration replays with each iteration's scale; update_loss_scale_kernel, the last
// launch of an update, moves S on and clears the flag, so no iteration waits for the host.
// sgd_kernel (elementwise.cu) unscales and skips with the same state.
#include "storage.cuh"

// delta *= S: a loss layer's delta before the backward pass (in the storage type, so an fp16
// delta that S pushes past 65504 becomes infinite, and the gradients it reaches are flagged).
extern "C" __global__ void loss_scale_kernel(act_t *delta, int n, const float *loss_scale)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) delta[i] = store(load(delta[i]) * loss_scale[0]);
}

// overflow = 1 where any of the n values is NaN or infinite (one gradient tensor per launch;
// every tensor of an iteration ORs into the same flag).
extern "C" __global__ void flag_non_finite_kernel(const act_t *x, int n, float *loss_scale)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && !isfinite(load(x[i]))) loss_scale[1] = 1.0f;
}

// After every step of an update (stream order): an overflow halves S (when dynamic), resets the
// good-step count and counts a skipped step; else the count grows, and at growth_interval S
// doubles (when dynamic) and the count restarts. Then the flag is cleared. One thread.
extern "C" __global__ void update_loss_scale_kernel(float *loss_scale, int dynamic,
                                                    int growth_interval)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (loss_scale[1] != 0.0f) {
        if (dynamic) loss_scale[0] *= 0.5f;
        loss_scale[2] = 0.0f;
        loss_scale[3] += 1.0f;
    } else {
        loss_scale[2] += 1.0f;
        if (loss_scale[2] >= (float)growth_interval) {
            if (dynamic) loss_scale[0] *= 2.0f;
            loss_scale[2] = 0.0f;
        }
    }
    loss_scale[1] = 0.0f;
}
