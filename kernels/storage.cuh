// The storage type of activations and deltas (engine/backends/cuda/kernels.py compiles every
// source once per type it needs: -DSTORAGE=float, __half or __nv_bfloat16). Kernels read values
// with load() and write them with store(), and compute in float; parameters (biases, batch-norm
// statistics, weights in the SGD step) and losses stay float whatever the storage.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef STORAGE
#define STORAGE float
#endif
typedef STORAGE act_t;

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
#define store(v) store_as<act_t>(v)
