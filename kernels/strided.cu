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

// The same for views that are rows of contiguous elements (a route's block of channels in each
// image, a shortcut of whole arrays): row r of `length` elements starts at src_offset +
// r * src_step in src and likewise in dst. Each thread moves 16 bytes at a time (the host
// checks that offsets, steps and length are whole vectors) and no thread divides per element:
// the strided kernel moved 2-byte halves at a third of the memory bandwidth. A block per
// ROW_CHUNK elements of a row.
#define ROW_CHUNK 4096

// to[k] = scale * from[k] + shift (or += that when accumulate) for one 16-byte vector; plain
// (scale 1, shift 0, no accumulate) moves it untouched.
__device__ __forceinline__ void move_vector(const uint4 *from, uint4 *to, int k, bool plain,
                                            float scale, float shift, int accumulate)
{
    const int V = sizeof(uint4) / sizeof(act_t);
    uint4 in = from[k];
    if (plain) {
        to[k] = in;
        return;
    }
    uint4 out = accumulate ? to[k] : in;
    const act_t *a = (const act_t *)&in;
    act_t *o = (act_t *)&out;
    for (int e = 0; e < V; ++e) {
        float v = scale * load(a[e]) + shift;
        o[e] = store(accumulate ? load(o[e]) + v : v);
    }
    to[k] = out;
}

extern "C" __global__ void copy_rows_kernel(const act_t *src, act_t *dst, int length, int chunks,
                                            int src_offset, int src_step, int dst_offset,
                                            int dst_step, float scale, float shift,
                                            int accumulate)
{
    const int V = sizeof(uint4) / sizeof(act_t);
    int row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
    const uint4 *from = (const uint4 *)(src + src_offset + (size_t)row * src_step);
    uint4 *to = (uint4 *)(dst + dst_offset + (size_t)row * dst_step);
    bool plain = scale == 1.f && shift == 0.f && !accumulate;
    int end = min(length / V, (chunk + 1) * (ROW_CHUNK / V));
    for (int k = chunk * (ROW_CHUNK / V) + threadIdx.x; k < end; k += blockDim.x)
        move_vector(from, to, k, plain, scale, shift, accumulate);
}

// copy_rows_kernel for rows shorter than a block's work (a [route] of channels-last arrays: a
// row is one position's channels): a thread per 16-byte vector of any row.
extern "C" __global__ void copy_vectors_kernel(const act_t *src, act_t *dst, int n,
                                               int row_vectors, int src_offset, int src_step,
                                               int dst_offset, int dst_step, float scale,
                                               float shift, int accumulate)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    int row = t / row_vectors, k = t % row_vectors;
    const uint4 *from = (const uint4 *)(src + src_offset + (size_t)row * src_step);
    uint4 *to = (uint4 *)(dst + dst_offset + (size_t)row * dst_step);
    move_vector(from, to, k, scale == 1.f && shift == 0.f && !accumulate, scale, shift,
                accumulate);
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
