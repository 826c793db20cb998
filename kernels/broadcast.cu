// Broadcasting arithmetic on NCHW arrays seen as (batch, channels, positions): the products of
// AlexeyAB's [sam], [scale_channels] and weighted [shortcut], and the sums that are their adjoint.

// out[i] = a[i] * b[...] where b's element strides over (batch, channel, position) are 0 along
// the axes it is broadcast on.
extern "C" __global__ void broadcast_multiply_kernel(const float *a, const float *b, float *out,
                                                     int n, int channels, int spatial,
                                                     int b_batch, int b_channel, int b_position)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int s = i % spatial, c = (i / spatial) % channels, n_ = i / (spatial * channels);
    out[i] = a[i] * b[(size_t)n_ * b_batch + (size_t)c * b_channel + (size_t)s * b_position];
}

// out = x (batch, channels, spatial) summed over the axes whose keep flag is 0; one thread per
// output element.
extern "C" __global__ void sum_to_kernel(const float *x, float *out, int n, int batch,
                                         int channels, int spatial, int keep_batch,
                                         int keep_channel, int keep_position)
{
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    int out_s = keep_position ? spatial : 1, out_c = keep_channel ? channels : 1;
    int s0 = o % out_s, c0 = (o / out_s) % out_c, b0 = o / (out_s * out_c);
    float sum = 0.f;
    for (int b = keep_batch ? b0 : 0; b < (keep_batch ? b0 + 1 : batch); ++b)
        for (int c = keep_channel ? c0 : 0; c < (keep_channel ? c0 + 1 : channels); ++c)
            for (int s = keep_position ? s0 : 0; s < (keep_position ? s0 + 1 : spatial); ++s)
                sum += x[((size_t)b * channels + c) * spatial + s];
    out[o] = sum;
}
