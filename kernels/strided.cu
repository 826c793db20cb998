// The general operations on strided views (engine/backends/views.py; the numpy backend's
// strided_copy_ and sum_to are the reference): a copy between two views, and sums over axes.
#include "storage.cuh"
#include "strided.cuh"

// dst[window] = scale * src[window'] + shift, or += that when accumulate; n elements.
extern "C" __global__ void strided_copy_kernel(const act_t *src, act_t *dst, int n,
                                               WINDOW_COUNTS, WINDOW_STRIDES(src_),
                                               WINDOW_STRIDES(dst_), float scale, float shift,
                                               int accumulate)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = scale * load(src[AT(src_, i)]) + shift;
    long long d = AT(dst_, i);
    dst[d] = store(accumulate ? load(dst[d]) + v : v);
}

// out = scale * (x summed over the axes whose bit in `keep` is 0), x contiguous with counts
// c0..c5 (bit k: axis k kept; c5 fastest). One thread per output element.
extern "C" __global__ void sum_to_kernel(const act_t *x, act_t *out, int n, int c0, int c1,
                                         int c2, int c3, int c4, int c5, int keep, float scale)
{
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    const int count[6] = {c0, c1, c2, c3, c4, c5};
    long long stride[6], base = 0, rest = o, reduced = 1, step = 1;
    for (int k = 5; k >= 0; --k) {
        stride[k] = step;
        step *= count[k];
        if (keep >> k & 1) {
            base += (rest % count[k]) * stride[k];
            rest /= count[k];
        } else {
            reduced *= count[k];
        }
    }
    // The innermost summed axis is walked by its stride; the others (rarely any: the host merges
    // neighbouring summed axes) by dividing.
    int inner = -1;
    for (int k = 5; k >= 0 && inner < 0; --k)
        if (!(keep >> k & 1) && count[k] > 1) inner = k;
    long long inner_count = inner < 0 ? 1 : count[inner];
    long long inner_stride = inner < 0 ? 0 : stride[inner];
    float sum = 0.f;
    for (long long r = 0; r < reduced / inner_count; ++r) {
        long long at = base, q = r;
        for (int k = 5; k >= 0; --k)
            if (!(keep >> k & 1) && k != inner) {
                at += (q % count[k]) * stride[k];
                q /= count[k];
            }
        for (long long j = 0; j < inner_count; ++j) sum += load(x[at + j * inner_stride]);
    }
    out[o] = store(scale * sum);
}
