// Max pooling over windows of size x size cells, stride apart, the first at (-top, -top) (the
// layer computes Darknet's top = padding/2); cells outside the input never win, a window with none
// inside gives -FLT_MAX. Windowed average pooling, and AlexeyAB's maximum across channels.
// (Global average pooling is strided.cu's sum_to_kernel.)
#include <float.h>
#include <math.h>
#include "storage.cuh"

// The largest of window (oh, ow)'s cells inside the input, whose cell h*width+w is at
// input[(h*width+w) * cell_step] (1 stored NCHW, the channel count stored channels last); its
// cell in *winner (-1: none inside). Only the cells inside are read: a window far larger than
// the input costs no more than the input.
__device__ float window_max(const act_t *input, size_t cell_step, int oh, int ow, int height,
                           int width, int size, int stride, int top, int *winner)
{
    float best = -FLT_MAX;  // Darknet's start: a window with no cell inside the input gives it
    int best_index = -1;
    int h0 = oh * stride - top, w0 = ow * stride - top;
    int r0 = max(0, -h0), r1 = min(size, height - h0);
    int s0 = max(0, -w0), s1 = min(size, width - w0);
    for (int r = r0; r < r1; ++r) {
        int h = h0 + r;
        for (int s = s0; s < s1; ++s) {
            int w = w0 + s;
            float v = load(input[(h * width + w) * cell_step]);
            if (v > best) { best = v; best_index = h * width + w; }  // first max wins ties
        }
    }
    *winner = best_index;
    return best;
}

// The windows holding input cell (h, w): rows oh0..oh1, columns ow0..ow1 of the output.
__device__ void windows_holding(int h, int w, int out_h, int out_w, int size, int stride, int top,
                                int *oh0, int *oh1, int *ow0, int *ow1)
{
    int ph = h + top, pw = w + top;  // position in the padded frame the windows tile
    int low_h = ph - size + 1, low_w = pw - size + 1;
    *oh0 = low_h <= 0 ? 0 : (low_h + stride - 1) / stride;
    *ow0 = low_w <= 0 ? 0 : (low_w + stride - 1) / stride;
    *oh1 = min(ph / stride, out_h - 1);
    *ow1 = min(pw / stride, out_w - 1);
}

extern "C" __global__ void maxpool_forward_kernel(const act_t *x, act_t *y, int *winner, int n,
                                                  int height, int width, int out_h, int out_w,
                                                  int size, int stride, int top)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int ow = i % out_w, oh = (i / out_w) % out_h, plane = i / (out_w * out_h);
    const act_t *input = x + (size_t)plane * height * width;
    y[i] = store(window_max(input, 1, oh, ow, height, width, size, stride, top, &winner[i]));
}

// Gathers, for each input cell, the deltas of the windows it won (no atomics, deterministic).
extern "C" __global__ void maxpool_backward_kernel(const act_t *delta, const int *winner, act_t *dx,
                                                   int n, int height, int width, int out_h,
                                                   int out_w, int size, int stride, int top)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int w = i % width, h = (i / width) % height, plane = i / (width * height);
    int oh0, oh1, ow0, ow1;
    windows_holding(h, w, out_h, out_w, size, stride, top, &oh0, &oh1, &ow0, &ow1);
    int cell = h * width + w;
    size_t base = (size_t)plane * out_h * out_w;
    float sum = 0.f;
    for (int oh = oh0; oh <= oh1; ++oh)
        for (int ow = ow0; ow <= ow1; ++ow) {
            size_t o = base + oh * out_w + ow;
            if (winner[o] == cell) sum += load(delta[o]);
        }
    dx[i] = store(sum);
}

// The same where windows do not overlap (stride >= size): each window's delta goes to the cell
// that won it, one thread per window, into a zeroed dx (one division per window instead of three
// per input cell: 4x faster for YOLO's 2x2/2 pools).
extern "C" __global__ void maxpool_scatter_kernel(const act_t *delta, const int *winner, act_t *dx,
                                                  int n, int out_plane, int in_plane)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || winner[i] < 0) return;
    dx[(size_t)(i / out_plane) * in_plane + winner[i]] = delta[i];
}

// Average pooling over the max pooling's windows (the first at (-pad, -pad)): the mean of the
// input cells in each window (cells outside the input are not counted). One thread per output.
extern "C" __global__ void local_avgpool_kernel(const act_t *x, act_t *y, int n, int c, int h,
                                                int w, int out_h, int out_w, int size, int stride,
                                                int pad)
{
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= n) return;
    int j = index % out_w, i = (index / out_w) % out_h, plane = index / (out_w * out_h);
    int offset = -pad;
    float sum = 0.f;
    int count = 0;
    for (int m = 0; m < size; ++m)
        for (int k = 0; k < size; ++k) {
            int row = offset + i * stride + m, col = offset + j * stride + k;
            if (row >= 0 && row < h && col >= 0 && col < w) {
                sum += load(x[((size_t)plane * h + row) * w + col]);
                ++count;
            }
        }
    y[index] = store(sum / count);
}

// Its adjoint, gathered per input cell: the sum of delta / count over the windows holding it.
extern "C" __global__ void local_avgpool_backward_kernel(const act_t *delta, act_t *dx, int n,
                                                         int c, int h, int w, int out_h,
                                                         int out_w, int size, int stride,
                                                         int pad)
{
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= n) return;
    int col = index % w, row = (index / w) % h, plane = index / (w * h);
    int offset = -pad;
    float sum = 0.f;
    for (int i = 0; i < out_h; ++i) {
        int top = offset + i * stride;
        if (row < top || row >= top + size) continue;
        for (int j = 0; j < out_w; ++j) {
            int left = offset + j * stride;
            if (col < left || col >= left + size) continue;
            int count = 0;
            for (int m = 0; m < size; ++m)
                for (int k = 0; k < size; ++k) {
                    int r = top + m, q = left + k;
                    if (r >= 0 && r < h && q >= 0 && q < w) ++count;
                }
            sum += load(delta[((size_t)plane * out_h + i) * out_w + j]) / count;
        }
    }
    dx[index] = store(sum);
}

// AlexeyAB's maxpool_depth: output channel g = max over input channels g, g+groups, ... (the
// first maximum wins); winner holds that channel. One thread per output element.
extern "C" __global__ void channel_max_kernel(const act_t *x, act_t *y, int *winner, int n,
                                              int channels, int groups, int spatial)
{
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= n) return;
    int s = index % spatial, g = (index / spatial) % groups, b = index / (spatial * groups);
    float best = -INFINITY;
    int best_k = g;
    for (int k = g; k < channels; k += groups) {
        float v = load(x[((size_t)b * channels + k) * spatial + s]);
        if (v > best) { best = v; best_k = k; }
    }
    y[index] = store(best);
    winner[index] = best_k;
}

// Its backward, gathered per input element: the delta of the output this channel won, else 0.
extern "C" __global__ void channel_max_backward_kernel(const act_t *delta, const int *winner,
                                                       act_t *dx, int n, int channels, int groups,
                                                       int spatial)
{
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= n) return;
    int s = index % spatial, k = (index / spatial) % channels, b = index / (spatial * channels);
    size_t out = ((size_t)b * groups + k % groups) * spatial + s;
    dx[index] = winner[out] == k ? delta[out] : store(0.f);
}

// maxpool_forward_kernel for x and y stored channels last (NHWC; i runs over y's NHWC
// elements, neighbouring threads over neighbouring channels); winner in NCHW order, as there.
extern "C" __global__ void maxpool_forward_nhwc_kernel(const act_t *x, act_t *y, int *winner,
                                                       int n, int channels, int height,
                                                       int width, int out_h, int out_w,
                                                       int size, int stride, int top)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int c = i % channels, ow = (i / channels) % out_w, oh = (i / channels / out_w) % out_h;
    int b = i / (channels * out_w * out_h);
    const act_t *input = x + (size_t)b * height * width * channels + c;
    int best_index;
    y[i] = store(window_max(input, channels, oh, ow, height, width, size, stride, top,
                            &best_index));
    winner[(((size_t)b * channels + c) * out_h + oh) * out_w + ow] = best_index;
}

// maxpool_backward_kernel for delta and dx stored channels last (winner in NCHW order, as
// maxpool_forward_nhwc_kernel leaves it): i runs over dx's NHWC elements.
extern "C" __global__ void maxpool_backward_nhwc_kernel(const act_t *delta, const int *winner,
                                                        act_t *dx, int n, int channels,
                                                        int height, int width, int out_h,
                                                        int out_w, int size, int stride, int top)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int c = i % channels, w = (i / channels) % width, h = (i / channels / width) % height;
    int b = i / (channels * width * height);
    int oh0, oh1, ow0, ow1;
    windows_holding(h, w, out_h, out_w, size, stride, top, &oh0, &oh1, &ow0, &ow1);
    int cell = h * width + w;
    size_t plane = ((size_t)b * channels + c) * out_h * out_w;
    float sum = 0.f;
    for (int oh = oh0; oh <= oh1; ++oh)
        for (int ow = ow0; ow <= ow1; ++ow)
            if (winner[plane + oh * out_w + ow] == cell)
                sum += load(delta[(((size_t)b * out_h + oh) * out_w + ow) * channels + c]);
    dx[i] = store(sum);
}

// maxpool_scatter_kernel for delta and a zeroed dx stored channels last (winner in NCHW order):
// i runs over delta's NHWC elements.
extern "C" __global__ void maxpool_scatter_nhwc_kernel(const act_t *delta, const int *winner,
                                                       act_t *dx, int n, int channels,
                                                       int out_plane, int in_plane)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int c = i % channels, position = (i / channels) % out_plane;
    int b = i / (channels * out_plane);
    int cell = winner[((size_t)b * channels + c) * out_plane + position];
    if (cell >= 0) dx[((size_t)b * in_plane + cell) * channels + c] = delta[i];
}
