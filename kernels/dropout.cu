// Dropout with a counter-based random source: element i of call `seed` draws hash(seed, i), so
// no generator state lives on the GPU and a captured graph gets new masks from a new seed.
#include "storage.cuh"

__device__ __forceinline__ unsigned int mix(unsigned int x)
{
    // lowbias32 (Chris Wellons' integer hash): full avalanche, two multiplies.
    x ^= x >> 16; x *= 0x7feb352dU;
    x ^= x >> 15; x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// seed_in_memory, when not null, overrides seed (read per step by a replayed graph).
extern "C" __global__ void dropout_forward_kernel(const act_t *x, act_t *y, act_t *mask, int n,
                                                  float probability, float survivor_scale,
                                                  unsigned int seed,
                                                  const unsigned int *seed_in_memory,
                                                  unsigned int salt)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int s = seed_in_memory ? seed_in_memory[0] : seed;
    unsigned int bits = mix(mix(s ^ mix(salt)) + (unsigned int)i);
    float uniform = (bits >> 8) * (1.f / 16777216.f);  // 24 bits: exact in float, in [0, 1)
    float factor = uniform >= probability ? survivor_scale : 0.f;
    mask[i] = store(factor);
    y[i] = store(load(x[i]) * factor);
}
