// 16-byte packs of stored values (8 halves or 4 floats): one load instruction brings VEC values
// instead of one. A kernel takes a pack per thread where the host found that the length and
// every array's address allow it (`vec` set: CudaBackend._packs), else a value per thread.
#pragma once

#include "storage.cuh"

#define VEC ((int)(16 / sizeof(act_t)))
struct __align__(16) Pack { act_t v[VEC]; };

// x[k] = f(x[k]) for the values thread `t` of an elementwise pass over n values takes: pack t
// where `vec` (n then a multiple of VEC), else value t.
template <typename F>
__device__ __forceinline__ void update_values(act_t *x, size_t t, int n, int vec, F f)
{
    if (vec) {
        if (t >= (size_t)(n / VEC)) return;
        Pack pack = ((Pack *)x)[t];
#pragma unroll
        for (int k = 0; k < VEC; k++) pack.v[k] = store(f(load(pack.v[k])));
        ((Pack *)x)[t] = pack;
    } else if (t < (size_t)n) {
        x[t] = store(f(load(x[t])));
    }
}

// x[k] = f(x[k], a[k]) likewise, `a` another array of n values.
template <typename F>
__device__ __forceinline__ void update_values(act_t *x, const act_t *a, size_t t, int n, int vec,
                                              F f)
{
    if (vec) {
        if (t >= (size_t)(n / VEC)) return;
        Pack pack = ((Pack *)x)[t], other = ((const Pack *)a)[t];
#pragma unroll
        for (int k = 0; k < VEC; k++) pack.v[k] = store(f(load(pack.v[k]), load(other.v[k])));
        ((Pack *)x)[t] = pack;
    } else if (t < (size_t)n) {
        x[t] = store(f(load(x[t]), load(a[t])));
    }
}
