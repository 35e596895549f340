/* Vectorisable float32 elementary functions shared by entmath's C kernels.
 *
 * Plain C without branches or intrinsics: loops that call these inline functions vectorise for
 * what the machine has (AVX2, AVX-512, NEON) when compiled with -O3 -march=native.
 */
#ifndef ENTMATH_VECMATH_H
#define ENTMATH_VECMATH_H

#include <stdint.h>

/* exp(x) in float32 for x <= 0: x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite: ln2 = L1 + L2,
 * L1 with trailing zero bits, so r1 = x - k L1 is exact and r = r1 - k L2), exp(r1) by its Taylor
 * polynomial of degree 7 (error < e^0.35 0.35^8 / 8! < 8e-9, relative), times 2^k (1 - k L2), the
 * factor exp(-k L2) to first order (|k L2| <= 127 * 1.43e-6 = 1.8e-4, so the error is below
 * 1.7e-8), with 2^k written into the exponent field.  Multiplying by 1 - k L2 beside the
 * polynomial, instead of subtracting k L2 from r1 before it, keeps one multiply-add off the chain
 * from x to exp(x) (see the Estrin note below).
 * Below x = -87.68 (-inf included) k = -127, whose exponent field 0 makes the result exactly 0:
 * such a weight is below 1e-38 of the maximum's, which weighs 1.  NaN gives NaN.  No branches:
 * loops that call it vectorise. */
static inline float exp_nonpos(float x)
{
    const float xc = x < -88.0f ? -88.0f : x;
    /* kb = 1.5 * 2^23 + 127 + k, k the nearest integer to x / ln2: at that magnitude a float's
     * last mantissa bits are the integer 127 + k itself, which `<< 23` below moves into the
     * exponent field, giving 2^k without a conversion. */
    const float kb = xc * 1.44269504f + 12583039.0f;
    const float k = kb - 12583039.0f;
    const float r = k * -0.693145752f + xc;             /* L1 = 0.693145752, L2 = 1.42860677e-6 */
    /* Estrin's scheme, not Horner's: three dependent multiply-adds deep instead of seven.  A
     * sweep's throughput is bound by how many iterations the out-of-order window holds, and that
     * by the latency of one iteration's chain, which the polynomial dominated. */
    const float r2 = r * r, r4 = r2 * r2;
    const float p01 = r + 1.0f, p23 = r * (1.0f / 6.0f) + 0.5f;
    const float p45 = r * (1.0f / 120.0f) + 1.0f / 24.0f;
    const float p67 = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    const float e = (r2 * p23 + p01) + r4 * (r2 * p67 + p45);
    union { float f; uint32_t i; } two_k = {kb};
    two_k.i <<= 23;
    return e * (two_k.f * (k * -1.42860677e-6f) + two_k.f);
}

#endif
