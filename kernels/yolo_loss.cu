// The dense part of the [yolo] losses, and the cell gathers their host part uses
// (engine/backends/operations.py: truth_overlap, objectness_delta_, gather_cells, scatter_cells_,
// sum_of_squares). Outputs are (B, A*E, H, W): anchor a's E entries are channels a*E .. a*E+E-1,
// x, y, w, h, objectness, then the class scores.
#include "storage.cuh"

// Darknet's box_iou of boxes given by centre and size.
__device__ float box_iou(float ax, float ay, float aw, float ah, float bx, float by, float bw,
                         float bh)
{
    float w = fminf(ax + aw / 2, bx + bw / 2) - fmaxf(ax - aw / 2, bx - bw / 2);
    float h = fminf(ay + ah / 2, by + bh / 2) - fmaxf(ay - ah / 2, by - bh / 2);
    float inter = (w < 0.f || h < 0.f) ? 0.f : w * h;
    float uni = aw * ah + bw * bh - inter;
    return (inter == 0.f || uni == 0.f) ? 0.f : inter / uni;
}

// One thread per prediction (b, a, j, i): its decoded box's best IoU with image b's truths
// (`rows` rows of (x, y, w, h, class) per image, the list ending at x == 0; with classes >= 0 a
// row whose class lies outside [0, classes) is skipped) and that truth's row (-1: none). With
// gate >= 0, best is 0 where no class score of the prediction exceeds gate.
extern "C" __global__ void truth_overlap_kernel(const act_t *out, const float *truths,
                                                const float *anchors, float *best, int *index,
                                                int batch, int anchor_count, int entries,
                                                int height, int width, int rows, float net_w,
                                                float net_h, int new_coords, int classes,
                                                float gate)
{
    int n = batch * anchor_count * height * width;
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    int i = p % width, j = p / width % height, a = p / (width * height) % anchor_count;
    int b = p / (width * height * anchor_count);
    size_t plane = (size_t)height * width;
    const act_t *cell = out + ((size_t)b * anchor_count * entries + (size_t)a * entries) * plane
                        + (size_t)j * width + i;
    float x = load(cell[0]), y = load(cell[plane]), w = load(cell[2 * plane]);
    float h = load(cell[3 * plane]);
    float px = (i + x) / width, py = (j + y) / height, pw, ph;
    if (new_coords) {
        pw = w * w * 4 * anchors[2 * a] / net_w;
        ph = h * h * 4 * anchors[2 * a + 1] / net_h;
    } else {
        pw = expf(w) * anchors[2 * a] / net_w;
        ph = expf(h) * anchors[2 * a + 1] / net_h;
    }
    float top = 0.f;
    int found = -1;
    const float *truth = truths + (size_t)b * rows * 5;
    for (int t = 0; t < rows; ++t) {
        const float *row = truth + 5 * t;
        if (row[0] == 0.f) break;
        if (classes >= 0 && ((int)row[4] < 0 || (int)row[4] >= classes)) continue;
        float iou = box_iou(px, py, pw, ph, row[0], row[1], row[2], row[3]);
        if (found < 0 || iou > top) {
            top = iou;
            found = t;
        }
    }
    if (gate >= 0.f) {
        bool match = false;
        for (int k = 5; k < entries && !match; ++k) match = load(cell[k * plane]) > gate;
        if (!match) top = 0.f;
    }
    best[p] = top;
    index[p] = found;
}

// The objectness delta of every prediction: normalizer * (0 - o), or where best > thresh, 0
// (smooth: the larger of that and normalizer * (best - o)).
extern "C" __global__ void objectness_delta_kernel(act_t *delta, const act_t *out,
                                                   const float *best, int n, int anchor_count,
                                                   int entries, int plane, float normalizer,
                                                   float thresh, int smooth)
{
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    int a = p / plane % anchor_count, b = p / (plane * anchor_count);
    size_t at = ((size_t)b * anchor_count * entries + (size_t)a * entries + 4) * plane + p % plane;
    float o = load(out[at]), d = normalizer * (0.f - o);
    if (best[p] > thresh) d = smooth ? fmaxf(d, normalizer * (best[p] - o)) : 0.f;
    delta[at] = store(d);
}

// values[u, e] = x at cell u's entry e; cells: rows of (b, a, j, i).
extern "C" __global__ void gather_cells_kernel(const act_t *x, const int *cells, float *values,
                                               int count, int anchor_count, int entries,
                                               int height, int width)
{
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= count * entries) return;
    const int *cell = cells + 4 * (k / entries);
    int e = k % entries;
    size_t plane = (size_t)height * width;
    size_t channel = (size_t)cell[0] * anchor_count * entries + (size_t)cell[1] * entries + e;
    values[k] = load(x[channel * plane + (size_t)cell[2] * width + cell[3]]);
}

// The inverse: x at cell u's entry e = values[u, e] (cells unique).
extern "C" __global__ void scatter_cells_kernel(act_t *x, const int *cells, const float *values,
                                                int count, int anchor_count, int entries,
                                                int height, int width)
{
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= count * entries) return;
    const int *cell = cells + 4 * (k / entries);
    int e = k % entries;
    size_t plane = (size_t)height * width;
    size_t channel = (size_t)cell[0] * anchor_count * entries + (size_t)cell[1] * entries + e;
    x[channel * plane + (size_t)cell[2] * width + cell[3]] = store(values[k]);
}

// total += the sum of x^2 (each block's partial sum in float, added in double).
extern "C" __global__ void sum_of_squares_kernel(const act_t *x, double *total, int n)
{
    __shared__ float partial[256];
    float sum = 0.f;
    for (int k = blockIdx.x * blockDim.x * 4 + threadIdx.x;
         k < min(n, (blockIdx.x + 1) * blockDim.x * 4); k += blockDim.x) {
        float v = load(x[k]);
        sum += v * v;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(total, (double)partial[0]);
}
