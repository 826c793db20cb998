// Strided views (engine/backends/views.py): element i of a window of counts (c0..c5, c5
// fastest; c0 is implied by the element count) sits at offset + sum_k index_k * s_k in its
// array. The kernels that walk views take the counts c1..c5 and then offset, s0..s5.
#pragma once

#define WINDOW_COUNTS int c1, int c2, int c3, int c4, int c5
#define WINDOW_STRIDES(p) int p##offset, int p##s0, int p##s1, int p##s2, int p##s3, int p##s4, \
                          int p##s5
#define AT(p, i) strided_at(i, c1, c2, c3, c4, c5, p##offset, p##s0, p##s1, p##s2, p##s3, \
                            p##s4, p##s5)

__device__ __forceinline__ long long strided_at(int i, int c1, int c2, int c3, int c4, int c5,
                                                int offset, int s0, int s1, int s2, int s3,
                                                int s4, int s5)
{
    // The host merges axes and pads with counts of 1, which cost no division here.
    long long at = offset;
    if (c5 != 1) { at += (long long)(i % c5) * s5; i /= c5; }
    if (c4 != 1) { at += (long long)(i % c4) * s4; i /= c4; }
    if (c3 != 1) { at += (long long)(i % c3) * s3; i /= c3; }
    if (c2 != 1) { at += (long long)(i % c2) * s2; i /= c2; }
    if (c1 != 1) { at += (long long)(i % c1) * s1; i /= c1; }
    return at + (long long)i * s0;
}
