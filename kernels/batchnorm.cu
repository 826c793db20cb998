// Training batch norm over channels (SPATIAL statistics of an NCHW tensor), cuDNN's rule: the
// batch mean and biased variance normalise, the rolling statistics move BN_MOMENTUM toward the
// mean and the unbiased variance. cuDNN's NCHW kernels (bn_fw_tr_1C11, bn_bw_1C11) took 1.4-6.4
// ms per call on an H200 on YOLO's first layers (16-64 channels of 416x416 or 208x208 planes at
// batch 64), far from the memory's speed: they parallelise over channels, of which these layers
// have few. Here every block of the reductions takes a piece of one plane and adds its partial
// sums into per-channel doubles (zeroed before), then a small kernel per channel finishes; the
// elementwise passes take a thread per pack of values. The activation that follows is fused in,
// any elementwise one: the forward stores only act(z), z = scale * x_normalised + bias; the
// backward takes act' from the output y, or, for those whose gradient needs their input (mish,
// swish...: gradient_needs_input), from z recomputed from x, the statistics, scale and bias, so
// that neither z nor an extra pass is needed.
#include "activation_functions.cuh"
#include "packs.cuh"

#ifndef BN_MOMENTUM
#error "compile with engine.constants.kernel_define_options() (engine/backends/cuda/kernels.py passes them)"
#endif

#define REDUCE_THREADS 256

// Values travel in 16-byte packs (packs.cuh) where a plane's length and every array's address
// allow (`vec` set by the host), and a block of the sums kernels takes `chunk` values of a plane
// (4096: 16 per thread), so that its reduction and its two float64 atomics are paid for a few
// times per plane, not every 1024 values.

// Calls visit(i, value) for the values of [begin, end) of `row` this thread takes, in packs
// where `vec` (begin, end and row then multiples of VEC values).
template <typename Visit>
__device__ __forceinline__ void for_values(const act_t *row, int begin, int end, int vec,
                                           Visit visit)
{
    if (vec) {
        const Pack *packs = (const Pack *)row;
        for (int p = begin / VEC + threadIdx.x; p < end / VEC; p += blockDim.x) {
            Pack pack = packs[p];
#pragma unroll
            for (int k = 0; k < VEC; k++)
                visit(p * VEC + k, load(pack.v[k]));
        }
    } else {
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x)
            visit(i, load(row[i]));
    }
}

// The same over the values at one index of three rows: visit(a value, b value, c value), c's
// read only where c is not null (else 0).
template <typename Visit>
__device__ __forceinline__ void for_value_triples(const act_t *a, const act_t *b, const act_t *c,
                                                  int begin, int end, int vec, Visit visit)
{
    if (vec) {
        const Pack *as = (const Pack *)a, *bs = (const Pack *)b, *cs = (const Pack *)c;
        for (int p = begin / VEC + threadIdx.x; p < end / VEC; p += blockDim.x) {
            Pack pa = as[p], pb = bs[p], pc;
            if (c) pc = cs[p];
#pragma unroll
            for (int k = 0; k < VEC; k++)
                visit(load(pa.v[k]), load(pb.v[k]), c ? load(pc.v[k]) : 0.f);
        }
    } else {
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x)
            visit(load(a[i]), load(b[i]), c ? load(c[i]) : 0.f);
    }
}

// The block's sums of a and b (one pair per thread) added into total[0] and total[1].
__device__ void add_block_pair(double a, double b, double *total)
{
    __shared__ double shared_a[REDUCE_THREADS / 32], shared_b[REDUCE_THREADS / 32];
    for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_down_sync(0xffffffff, a, offset);
        b += __shfl_down_sync(0xffffffff, b, offset);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { shared_a[warp] = a; shared_b[warp] = b; }
    __syncthreads();
    if (warp == 0) {
        // the warps' partial sums (lane * 32 < blockDim.x: also a block of one thread, as
        // tests/test_kernels_on_cpu.py runs it)
        a = lane * 32 < blockDim.x ? shared_a[lane] : 0.0;
        b = lane * 32 < blockDim.x ? shared_b[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            a += __shfl_down_sync(0xffffffff, a, offset);
            b += __shfl_down_sync(0xffffffff, b, offset);
        }
        if (lane == 0) {
            atomicAdd(total, a);
            atomicAdd(total + 1, b);
        }
    }
}

// sums[2c], sums[2c+1] += the sum of x and of x^2 over channel c's planes; a block takes `chunk`
// values of one plane.
extern "C" __global__ void bn_sums_kernel(const act_t *x, double *sums, int spatial,
                                          int channels, int chunk, int chunks, int vec)
{
    int plane = blockIdx.x / chunks, begin = blockIdx.x % chunks * chunk;
    float sum = 0.f, squares = 0.f;  // at most chunk / blockDim.x values per thread
    for_values(x + (size_t)plane * spatial, begin, min(spatial, begin + chunk), vec,
               [&](int, float v) { sum += v; squares += v * v; });
    add_block_pair(sum, squares, sums + 2 * (plane % channels));
}

// Per channel: the batch mean and 1/sqrt(var + epsilon) saved for the backward, the rolling
// statistics moved. count: the values per channel.
extern "C" __global__ void bn_statistics_kernel(const double *sums, float *mean, float *inv_std,
                                                float *rolling_mean, float *rolling_variance,
                                                int channels, int count)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    double m = sums[2 * c] / count;
    double variance = fmax(sums[2 * c + 1] / count - m * m, 0.0);
    mean[c] = (float)m;
    inv_std[c] = (float)(1.0 / sqrt(variance + BN_TRAINING_EPSILON));
    double unbiased = count > 1 ? variance * count / (count - 1) : variance;
    rolling_mean[c] = (float)((1.0 - BN_MOMENTUM) * rolling_mean[c] + BN_MOMENTUM * m);
    rolling_variance[c] = (float)((1.0 - BN_MOMENTUM) * rolling_variance[c] + BN_MOMENTUM * unbiased);
}

// z = scale * x_normalised + bias, k = inv_std * scale: written once, so that the backward's
// recomputed z is the forward's to the bit.
__device__ __forceinline__ float bn_affine(float v, float m, float k, float b)
{
    return (v - m) * k + b;
}

// Whether the backward reads the output y: not for linear (act' = 1), nor where act' comes from z.
__device__ __forceinline__ bool bn_reads_output(int act)
{
    return act != ACT_LINEAR && !gradient_needs_input(act);
}

// act'(z) at value v of x; `output()` reads its y, called only where bn_reads_output.
template <typename Output>
__device__ __forceinline__ float bn_activation_gradient(float v, Output output, float m, float k,
                                                        float b, int act)
{
    if (gradient_needs_input(act)) return gradient_from_input(bn_affine(v, m, k, b), act);
    return act == ACT_LINEAR ? 1.f : gradient(output(), act);
}

// y = act(scale * (x - mean) * inv_std + bias): a thread per pack of VEC values where `vec`
// (a pack lies in one plane), else per value; n: the values.
extern "C" __global__ void bn_normalize_kernel(const act_t *x, act_t *y, const float *mean,
                                               const float *inv_std, const float *scale,
                                               const float *bias, int spatial, int channels,
                                               int n, int act, int vec)
{
    int width = vec ? VEC : 1;
    size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * width;
    if (first >= (size_t)n) return;
    int c = (int)(first / spatial % channels);
    float m = mean[c], k = inv_std[c] * scale[c], b = bias[c];
    if (vec) {
        Pack in = *(const Pack *)(x + first), out;
#pragma unroll
        for (int j = 0; j < VEC; j++)
            out.v[j] = store(activate(bn_affine(load(in.v[j]), m, k, b), act));
        *(Pack *)(y + first) = out;
    } else {
        y[first] = store(activate(bn_affine(load(x[first]), m, k, b), act));
    }
}

// With d = delta * act'(z): sums[2c], sums[2c+1] += the sum of d and of d * x_normalised over
// channel c; a block takes `chunk` values of one plane.
extern "C" __global__ void bn_backward_sums_kernel(const act_t *x, const act_t *y,
                                                   const act_t *delta, const float *mean,
                                                   const float *inv_std, const float *scale,
                                                   const float *bias, double *sums,
                                                   int spatial, int channels, int chunk,
                                                   int chunks, int act, int vec)
{
    int plane = blockIdx.x / chunks, begin = blockIdx.x % chunks * chunk, c = plane % channels;
    float m = mean[c], s = inv_std[c], k = s * scale[c], b = bias[c];
    size_t base = (size_t)plane * spatial;
    float sum = 0.f, inner = 0.f;
    for_value_triples(x + base, delta + base, bn_reads_output(act) ? y + base : nullptr, begin,
                      min(spatial, begin + chunk), vec, [&](float v, float dy, float out) {
        float d = dy * bn_activation_gradient(v, [&] { return out; }, m, k, b, act);
        sum += d;
        inner += d * (v - m) * s;
    });
    add_block_pair(sum, inner, sums + 2 * c);
}

// The parameters' updates accumulate the sums (bias: of delta; scale: of delta * x_normalised).
extern "C" __global__ void bn_updates_kernel(const double *sums, float *scale_updates,
                                             float *bias_updates, int channels)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    bias_updates[c] += (float)sums[2 * c];
    scale_updates[c] += (float)sums[2 * c + 1];
}

// The delta for x: scale * inv_std * (d - (sum d + x_normalised * sum d*x_normalised) / count),
// d = delta * act'(z): the exact backward of the activation and the batch statistics. A thread
// per pack where `vec`, else per value; n: the values.
extern "C" __global__ void bn_backward_kernel(const act_t *x, const act_t *y, const act_t *delta,
                                              act_t *dx, const float *mean, const float *inv_std,
                                              const float *scale, const float *bias,
                                              const double *sums, int spatial, int channels,
                                              int n, int count, int act, int vec)
{
    int width = vec ? VEC : 1;
    size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * width;
    if (first >= (size_t)n) return;
    int c = (int)(first / spatial % channels);
    float m = mean[c], s = inv_std[c], k = s * scale[c], b = bias[c];
    float mean_delta = (float)(sums[2 * c] / count), mean_inner = (float)(sums[2 * c + 1] / count);
    if (vec) {
        Pack xs = *(const Pack *)(x + first), ds = *(const Pack *)(delta + first), ys, out;
        if (bn_reads_output(act)) ys = *(const Pack *)(y + first);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float v = load(xs.v[j]);
            float d = load(ds.v[j]) *
                      bn_activation_gradient(v, [&] { return load(ys.v[j]); }, m, k, b, act);
            out.v[j] = store(k * (d - mean_delta - (v - m) * s * mean_inner));
        }
        *(Pack *)(dx + first) = out;
    } else {
        float v = load(x[first]);
        float d = load(delta[first]) *
                  bn_activation_gradient(v, [&] { return load(y[first]); }, m, k, b, act);
        dx[first] = store(k * (d - mean_delta - (v - m) * s * mean_inner));
    }
}

// ---- x stored channels last (NHWC): rows of `channels` values, one per position ----------------
// A thread takes packs of VEC neighbouring channels (the host checks channels % VEC == 0 and at
// most REDUCE_THREADS packs a row), always the same pack column, of every few rows, so that its
// channels' parameters and sums stay in registers. The reductions take `rows` rows a block (a
// chunk): its threads' partial sums meet in shared memory (a tree over the row lanes), then one
// float64 atomic per channel. Any block size works (the CPU tests run blocks of one thread).

// The pack columns a thread of a reduction block takes (first, then every `stride`-th) and its
// row lane.
struct NhwcLanes {
    int first, stride, row_lane, row_lanes;
    bool active;
};

__device__ __forceinline__ NhwcLanes nhwc_lanes(int packs)
{
    NhwcLanes l;
    int width = min(packs, (int)blockDim.x);  // threads across a row's packs
    l.row_lanes = max(1, (int)blockDim.x / packs);
    l.active = threadIdx.x < width * l.row_lanes;
    l.first = threadIdx.x % width;
    l.stride = width;
    l.row_lane = threadIdx.x / width;
    return l;
}

// sums[2c], sums[2c+1] += the block's partial sums of channel c over its row lanes; partial
// holds row_lanes x (packs * VEC) pairs, row lane after row lane.
__device__ void add_nhwc_partials(float *partial, double *sums, int packs, int row_lanes)
{
    int pairs = 2 * packs * VEC;
    for (int lanes = row_lanes; lanes > 1;) {  // fold the upper half of the lanes onto the lower
        int half = (lanes + 1) / 2;
        __syncthreads();
        for (int i = threadIdx.x; i < (lanes - half) * pairs; i += blockDim.x)
            partial[i] += partial[half * pairs + i];
        lanes = half;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < pairs; i += blockDim.x)
        atomicAdd(sums + i, (double)partial[i]);
}

// Pack p's channels' parameters: mean m, inverse deviation s, k = s * scale, bias b.
__device__ __forceinline__ void load_pack_params(int p, const float *mean, const float *inv_std,
                                                 const float *scale, const float *bias,
                                                 float *m, float *s, float *k, float *b)
{
    for (int j = 0; j < VEC; j++) {
        int c = p * VEC + j;
        m[j] = mean[c]; s[j] = inv_std[c]; k[j] = s[j] * scale[c]; b[j] = bias[c];
    }
}

// bn_sums_kernel for NHWC x of `count` rows.
extern "C" __global__ void bn_sums_nhwc_kernel(const act_t *x, double *sums, int count,
                                               int channels, int rows)
{
    __shared__ float partial[2 * REDUCE_THREADS * VEC];
    int packs = channels / VEC;
    NhwcLanes l = nhwc_lanes(packs);
    int begin = blockIdx.x * rows, end = min(count, begin + rows);
    if (l.active)
        for (int p = l.first; p < packs; p += l.stride) {
            float sum[VEC], squares[VEC];
            for (int k = 0; k < VEC; k++) sum[k] = squares[k] = 0.f;
            for (int r = begin + l.row_lane; r < end; r += l.row_lanes) {
                Pack pack = ((const Pack *)x)[(size_t)r * packs + p];
#pragma unroll
                for (int k = 0; k < VEC; k++) {
                    float v = load(pack.v[k]);
                    sum[k] += v;
                    squares[k] += v * v;
                }
            }
            float *at = partial + 2 * (size_t)(l.row_lane * packs + p) * VEC;
            for (int k = 0; k < VEC; k++) { at[2 * k] = sum[k]; at[2 * k + 1] = squares[k]; }
        }
    add_nhwc_partials(partial, sums, packs, l.row_lanes);
}

// The elementwise passes: thread g takes pack column g % packs of rows g / packs, then every
// `groups`-th row after it (the host launches packs * groups threads).
#define FOR_NHWC_ROWS(count, packs, groups, p, r)                                                  \
    int g_ = blockIdx.x * blockDim.x + threadIdx.x, p = g_ % (packs);                               \
    if (g_ / (packs) < (groups))                                                                    \
        for (int r = g_ / (packs); r < (count); r += (groups))

// bn_normalize_kernel for NHWC x of `count` rows.
extern "C" __global__ void bn_normalize_nhwc_kernel(const act_t *x, act_t *y, const float *mean,
                                                    const float *inv_std, const float *scale,
                                                    const float *bias, int count, int channels,
                                                    int groups, int act)
{
    int packs = channels / VEC;
    float m[VEC], s[VEC], k[VEC], b[VEC];
    bool loaded = false;
    FOR_NHWC_ROWS(count, packs, groups, p, r) {
        if (!loaded) {
            load_pack_params(p, mean, inv_std, scale, bias, m, s, k, b);
            loaded = true;
        }
        size_t at = (size_t)r * packs + p;
        Pack in = ((const Pack *)x)[at], out;
#pragma unroll
        for (int j = 0; j < VEC; j++)
            out.v[j] = store(activate(bn_affine(load(in.v[j]), m[j], k[j], b[j]), act));
        ((Pack *)y)[at] = out;
    }
}

// x's values at pack `at` of NHWC arrays (v), and delta's there times the activation's gradient
// (d), as the NHWC backward passes take them (y read only where the activation needs it).
__device__ __forceinline__ void load_pack_deltas(const act_t *x, const act_t *y,
                                                 const act_t *delta, size_t at, bool reads_output,
                                                 const float *m, const float *k, const float *b,
                                                 int act, float *v, float *d)
{
    Pack xs = ((const Pack *)x)[at], ds = ((const Pack *)delta)[at], ys;
    if (reads_output) ys = ((const Pack *)y)[at];
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        v[j] = load(xs.v[j]);
        d[j] = load(ds.v[j]) * bn_activation_gradient(
            v[j], [&] { return load(ys.v[j]); }, m[j], k[j], b[j], act);
    }
}

// bn_backward_sums_kernel for NHWC x, y, delta of `count` rows.
extern "C" __global__ void bn_backward_sums_nhwc_kernel(const act_t *x, const act_t *y,
                                                        const act_t *delta, const float *mean,
                                                        const float *inv_std, const float *scale,
                                                        const float *bias, double *sums,
                                                        int count, int channels, int rows,
                                                        int act)
{
    __shared__ float partial[2 * REDUCE_THREADS * VEC];
    int packs = channels / VEC;
    NhwcLanes l = nhwc_lanes(packs);
    int begin = blockIdx.x * rows, end = min(count, begin + rows);
    bool reads_output = bn_reads_output(act);
    if (l.active)
        for (int p = l.first; p < packs; p += l.stride) {
            float m[VEC], s[VEC], k[VEC], b[VEC], sum[VEC], inner[VEC];
            load_pack_params(p, mean, inv_std, scale, bias, m, s, k, b);
            for (int j = 0; j < VEC; j++) sum[j] = inner[j] = 0.f;
            for (int r = begin + l.row_lane; r < end; r += l.row_lanes) {
                float v[VEC], d[VEC];
                load_pack_deltas(x, y, delta, (size_t)r * packs + p, reads_output, m, k, b, act,
                                 v, d);
#pragma unroll
                for (int j = 0; j < VEC; j++) {
                    sum[j] += d[j];
                    inner[j] += d[j] * (v[j] - m[j]) * s[j];
                }
            }
            float *out = partial + 2 * (size_t)(l.row_lane * packs + p) * VEC;
            for (int j = 0; j < VEC; j++) { out[2 * j] = sum[j]; out[2 * j + 1] = inner[j]; }
        }
    add_nhwc_partials(partial, sums, packs, l.row_lanes);
}

// bn_backward_kernel for NHWC arrays of `count` rows.
extern "C" __global__ void bn_backward_nhwc_kernel(const act_t *x, const act_t *y,
                                                   const act_t *delta, act_t *dx,
                                                   const float *mean, const float *inv_std,
                                                   const float *scale, const float *bias,
                                                   const double *sums, int count, int channels,
                                                   int groups, int act)
{
    int packs = channels / VEC;
    float m[VEC], s[VEC], k[VEC], b[VEC], mean_delta[VEC], mean_inner[VEC];
    bool loaded = false, reads_output = bn_reads_output(act);
    FOR_NHWC_ROWS(count, packs, groups, p, r) {
        if (!loaded) {
            load_pack_params(p, mean, inv_std, scale, bias, m, s, k, b);
            for (int j = 0; j < VEC; j++) {
                int c = p * VEC + j;
                mean_delta[j] = (float)(sums[2 * c] / count);
                mean_inner[j] = (float)(sums[2 * c + 1] / count);
            }
            loaded = true;
        }
        size_t at = (size_t)r * packs + p;
        float v[VEC], d[VEC];
        load_pack_deltas(x, y, delta, at, reads_output, m, k, b, act, v, d);
        Pack out;
#pragma unroll
        for (int j = 0; j < VEC; j++)
            out.v[j] = store(k[j] * (d[j] - mean_delta[j] - (v[j] - m[j]) * s[j] * mean_inner[j]));
        ((Pack *)dx)[at] = out;
    }
}
