// Nearest-neighbour upsampling, its adjoint (block sums), and the channel copies route needs.

extern "C" __global__ void upsample_kernel(const float *x, float *y, int n, int height, int width,
                                           int stride, float scale)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int out_w = width * stride, out_h = height * stride;
    int ow = i % out_w, oh = (i / out_w) % out_h, plane = i / (out_w * out_h);
    y[i] = scale * x[((size_t)plane * height + oh / stride) * width + ow / stride];
}

extern "C" __global__ void downsample_sum_kernel(const float *x, float *y, int n, int out_h,
                                                 int out_w, int stride, float scale)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int ow = i % out_w, oh = (i / out_w) % out_h, plane = i / (out_w * out_h);
    int width = out_w * stride, height = out_h * stride;
    const float *input = x + (size_t)plane * height * width;
    float sum = 0.f;
    for (int r = 0; r < stride; ++r)
        for (int s = 0; s < stride; ++s) sum += input[(oh * stride + r) * width + ow * stride + s];
    y[i] = scale * sum;
}

// dst[b, dst_start + c] (+)= src[b, src_start + c] for c < count, each channel `spatial` floats.
extern "C" __global__ void channel_copy_kernel(const float *src, float *dst, int n, int count,
                                               int spatial, int src_channels, int src_start,
                                               int dst_channels, int dst_start, int accumulate)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, c = (i / spatial) % count, b = i / (spatial * count);
    float v = src[((size_t)b * src_channels + src_start + c) * spatial + s];
    size_t d = ((size_t)b * dst_channels + dst_start + c) * spatial + s;
    dst[d] = accumulate ? dst[d] + v : v;
}

// Darknet's [crop]: y[p, i, j] = x[p, top + i, col(j)] * scale + shift, with col(j) = left + j,
// or width - left - 1 - j when flipped (p runs over batch x channels).
extern "C" __global__ void crop_kernel(const float *x, float *y, int n, int height, int width,
                                       int top, int left, int crop_h, int crop_w, int flip,
                                       float scale, float shift)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int j = i % crop_w, r = (i / crop_w) % crop_h, plane = i / (crop_w * crop_h);
    int col = flip ? width - left - 1 - j : left + j;
    y[i] = x[((size_t)plane * height + top + r) * width + col] * scale + shift;
}
