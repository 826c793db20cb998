// The detection-model operations: shortcut (Darknet's shortcut_cpu geometry), the YOLO/region
// output activation, and reorg.

// Overlap element o of a shortcut: (b, k < minc, j < minh, i < minw); the output map is sampled
// every `sample` cells and the added map every `stride` cells.
__device__ __forceinline__ void shortcut_indexes(int o, int minc, int minh, int minw, int c2,
                                                 int h2, int w2, int c1, int h1, int w1,
                                                 int stride, int sample, size_t *out, size_t *add)
{
    int i = o % minw, j = (o / minw) % minh, k = (o / (minw * minh)) % minc;
    int b = o / (minw * minh * minc);
    *out = (((size_t)b * c2 + k) * h2 + j * sample) * w2 + i * sample;
    *add = (((size_t)b * c1 + k) * h1 + j * stride) * w1 + i * stride;
}

// y (a copy of x) = alpha*x + beta*add on the overlap.
extern "C" __global__ void shortcut_forward_kernel(const float *x, const float *add, float *y,
                                                   int n, int minc, int minh, int minw, int c2,
                                                   int h2, int w2, int c1, int h1, int w1,
                                                   int stride, int sample, float alpha, float beta)
{
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    size_t out, a;
    shortcut_indexes(o, minc, minh, minw, c2, h2, w2, c1, h1, w1, stride, sample, &out, &a);
    y[out] = alpha * x[out] + beta * add[a];
}

// dx (a copy of delta) *= alpha and d_add (zeroed) = beta*delta on the overlap.
extern "C" __global__ void shortcut_backward_kernel(const float *delta, float *dx, float *d_add,
                                                    int n, int minc, int minh, int minw, int c2,
                                                    int h2, int w2, int c1, int h1, int w1,
                                                    int stride, int sample, float alpha,
                                                    float beta)
{
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    size_t out, a;
    shortcut_indexes(o, minc, minh, minw, c2, h2, w2, c1, h1, w1, stride, sample, &out, &a);
    float d = delta[out];
    dx[out] = alpha * d;
    d_add[a] = beta * d;
}

// y viewed as (groups = B*anchors, entries, spatial): logistic on entries [start, start+count).
extern "C" __global__ void anchor_logistic_kernel(float *y, int n, int entries, int start,
                                                  int count, int spatial)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, e = start + (i / spatial) % count, g = i / (spatial * count);
    size_t index = ((size_t)g * entries + e) * spatial + s;
    y[index] = 1.f / (1.f + expf(-y[index]));
}

// v*scale + shift on entries [start, start+count) (AlexeyAB's scale_x_y), laid out as above.
extern "C" __global__ void anchor_affine_kernel(float *y, int n, int entries, int start, int count,
                                                int spatial, float scale, float shift)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, e = start + (i / spatial) % count, g = i / (spatial * count);
    size_t index = ((size_t)g * entries + e) * spatial + s;
    y[index] = y[index] * scale + shift;
}

// Softmax over entries [start, start+count) at each (group, position); n = groups*spatial.
extern "C" __global__ void anchor_softmax_kernel(float *y, int n, int entries, int start,
                                                 int count, int spatial)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, g = i / spatial;
    float *v = y + ((size_t)g * entries + start) * spatial + s;
    float largest = -INFINITY;
    for (int e = 0; e < count; ++e) largest = fmaxf(largest, v[(size_t)e * spatial]);
    float sum = 0.f;
    for (int e = 0; e < count; ++e) {
        float t = expf(v[(size_t)e * spatial] - largest);
        v[(size_t)e * spatial] = t;
        sum += t;
    }
    for (int e = 0; e < count; ++e) v[(size_t)e * spatial] /= sum;
}

// Darknet's reorg on input dims (c, h, w): element (b, k, j, i) of the (c, h, w) view pairs with
// (b, k % oc, j*stride + (k/oc)/stride, i*stride + (k/oc)%stride) of the (oc, h*stride,
// w*stride) view. forward = 0 gathers the (c, h, w) result from that view; 1 scatters into it.
extern "C" __global__ void reorg_kernel(const float *x, float *y, int n, int c, int h, int w,
                                        int stride, int forward)
{
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= n) return;
    int i = index % w, j = (index / w) % h, k = (index / (w * h)) % c, b = index / (w * h * c);
    int oc = c / (stride * stride), offset = k / oc;
    size_t other = (((size_t)b * oc + k % oc) * h * stride + j * stride + offset / stride) *
                   w * stride + i * stride + offset % stride;
    if (forward) y[other] = x[index];
    else y[index] = x[other];
}
