// Loss scaling (engine/loss_scaling.py): a state of two floats in device memory, (S, overflow),
// that the host sets before an iteration and reads after it. Kernels read S from there, never
// as an argument, so a recorded iteration replays with each iteration's scale; the overflow
// flag is only ever set here (several threads may write the same 1), never read back inside
// an iteration. sgd_kernel (elementwise.cu) unscales and skips with the same state.
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
