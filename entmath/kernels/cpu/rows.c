/* The CPU kernels of the row ops: entropy and KL (Chapter 1) and cross-entropy against class
 * indices or probability targets (Chapters 1 and 5), forward and backward.
 *
 * rows.py (beside this file) builds it like the entropy-normalization kernel and calls the
 * entmath_* functions through ctypes on float32 or bfloat16 rows, one range of rows per call.
 *
 * One row at a time, in cache.  The first sweep reads a row from memory (its max and NaN flag);
 * the second reads it from L1/L2 (a row of 32000 float32 logits is 125 KiB) and forms every sum
 * at once; the backward reads each row once and writes its gradient once.  torch's eager
 * log_softmax, exp, product and sum make six to eight sweeps, most of them over memory.  KL reads
 * its row pair twice (the scan, then the normalisers, which keep the exps and log-ratios that the
 * terms sweep reads instead of the rows).
 *
 * The sums (Chapter 1, eq-ent-stable).  With m the row max and d_i = z_i - m <= 0, the entries at
 * the max are counted (c), the rest summed on their own (T = sum e^{d_i}, A = sum e^{d_i} d_i), so
 * S = c + T, log S = log c + log1p(T / c) keeps its relative accuracy for nearly one-hot rows, and
 * H = log S - A / S.  The cross-entropy's target terms are sums of (m - z_j) >= 0 (Chapter 5,
 * eq-ce-stable): nothing of the size of lse is subtracted.  Sums run in float over CHUNK entries
 * (vectorised) and then in double.  -inf logits have weight exactly 0 and add 0 to every sum.
 *
 * The deep tail.  exp_nonpos flushes e^d to 0 below d = -87.68, where float's e^d is subnormal.
 * The vector sweeps (for KL, the first sweep's least entries) flag a row with an entry there
 * (-inf excluded) and that row is done again by a scalar loop in double: its entropy, then, is
 * not 0 when every other entry sits 90 below the max, and its gradient keeps its subnormal
 * entries.  Rows without such entries never pay for it.
 *
 * A row without a distribution gets the coded log-normaliser validation reads (NaN: a NaN in the
 * row; +inf: a +inf; -inf: no finite logit) and NaN results (its gradient is NaN).
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

/* Entries per float partial sum: ~32 terms per AVX2 lane keep each float sum's rounding small.
 * A power of two (the target sums are scaled by 1 / CHUNK exactly). */
#ifndef CHUNK
#define CHUNK 256
#endif
/* Rows handed to an OpenMP thread at a time, as threads free up. */
#define ROW_RUN 8
/* Entries of a KL row pair whose scratch lives on the stack (24 KiB); longer rows malloc it. */
#define SCRATCH_ON_STACK 2048
/* Below this d, exp_nonpos's result is flushed or subnormal: the row is redone in double. */
#define DEEP (-87.0f)

static inline float bf16_to_float(uint16_t x)
{
    union { uint32_t i; float f; } u = {(uint32_t)x << 16};
    return u.f;
}

static inline uint16_t float_to_bf16(float x)
{
    union { float f; uint32_t i; } u = {x};
    if (x != x)
        return 0x7fc0;
    return (uint16_t)((u.i + 0x7fffu + ((u.i >> 16) & 1u)) >> 16);  /* round to nearest even */
}

static inline float ld_f32(const float *p, int64_t i) { return p[i]; }
static inline float ld_bf16(const uint16_t *p, int64_t i) { return bf16_to_float(p[i]); }
static inline void st_f32(float *p, int64_t i, float x) { p[i] = x; }
static inline void st_bf16(uint16_t *p, int64_t i, float x) { p[i] = float_to_bf16(x); }

/* The coded log-normaliser of a row with max m and NaN flag, or 0 when the row is valid. */
static inline int row_fault(float m, int nan, float *code)
{
    if (nan) { *code = NAN; return 1; }
    if (m == INFINITY || m == -INFINITY) { *code = m; return 1; }
    return 0;
}

/* log S for S = c + T with c >= 1 maxima of weight 1 and T below them, accurate for T << c. */
static inline double log_normaliser(double c, double t) { return log(c) + log1p(t / c); }

/* lse = fl(m + log S) and its rounding (m + log S) - lse, for log p in the backward: m - fl(..)
 * of two floats is exact in double, whatever m's size (m + log S itself would drop log S at
 * m = 1e30). */
static inline void put_lse(float m, double log_s, float *lse, float *res)
{
    *lse = (float)((double)m + log_s);
    *res = (float)(((double)m - (double)*lse) + log_s);
}

/* What the second sweep gathers: c, T, A as above; D = sum_j w_j (m - z_j) / 2 over the classes
 * with w_j != 0 (w = 1 without class weights; halved so that a span beyond FLT_MAX overflows only
 * where the loss does), or for probability targets D = sum_j u_j (m - z_j) / 2 over u_j != 0 and
 * U = sum_j u_j, u_j = w_j ((1 - eps) y_j + eps / C), and bad_y: a NaN or +-inf target; deep: an
 * entry with -inf < d < DEEP. */
typedef struct { double c, t, a, d, u; int deep, bad_y; } row_sums;

/* What the first sweep of a KL row pair finds (scan_pair_): maxima, NaN flags, the least finite
 * entries (+inf if none), whether a has a -inf, and lost: a finite a against b = -inf. */
typedef struct { float ma, mb, lo_a, lo_b; int nan_a, nan_b, masked_a, lost; } pair_scan;

/* chi(y) = e^y - 1 - y for |y| <= 1 by its series y^2 sum_{k<=9} y^k / (k + 2)!, as
 * ops/_divergence.chi: 9 terms after the first (float), the remainder below the unit roundoff.
 * Evaluated by Estrin's scheme (y^2, y^4 and pairs), not Horner's: three dependent multiply-adds
 * deep instead of nine.  The factor 1/2 of (y^2/2)(...) is in the coefficients (exact: a power
 * of two), which saves a multiply on the terms sweep's busiest ports. */
static inline float chi_series_f(float y)
{
    const float y2 = y * y, y4 = y2 * y2;
    const float p01 = y * (1.0f / 6.0f) + 0.5f, p23 = y * (1.0f / 120.0f) + 1.0f / 24.0f;
    const float p45 = y * (1.0f / 5040.0f) + 1.0f / 720.0f;
    const float p67 = y * (1.0f / 362880.0f) + 1.0f / 40320.0f;
    const float p89 = y * (1.0f / 39916800.0f) + 1.0f / 3628800.0f;
    const float s = (y2 * p23 + p01) + y4 * ((y2 * p67 + p45) + y4 * p89);
    return s * y2;
}

static inline double chi_d(double y)
{
    if (fabs(y) > 1.0)
        return expm1(y) - y;
    double s = 1.0;
    for (int k = 18; k > 2; --k)  /* 16 terms (double) */
        s = s * y * (1.0 / (double)k) + 1.0;
    return s * y * y * 0.5;
}

/* (s, e): s = fl(x + y), s + e = x + y exactly (TwoSum).  e is NaN where x or y is infinite. */
#define TWO_SUM(FT, x, y, s, e)                                                                    \
    do {                                                                                           \
        const FT s_ = (x) + (y), t_ = s_ - (x);                                                    \
        s = s_;                                                                                    \
        e = ((x) - (s_ - t_)) + ((y) - t_);                                                        \
    } while (0)

/* The KL terms of one element (Chapter 1, eq-ent-kl-stable; the twin of ops/_divergence.kl_sums),
 * in two steps.  KL_LOG_RATIO: the compensated offsets da + ea = a - ma and db + eb = b - mb
 * (exact) and r = (db - da) + (eb - ea), from which the log-ratio y = log q - log p + eta is
 * r - shift, shift = log S_b - log S_a; r is NaN where a or b is -inf.  The twin halves the
 * logits first, so that a span a - ma beyond the dtype's max cannot overflow; here such a span
 * only occurs in a row that reaches the deep tail, whose terms are summed in double.
 * KL_ADD, given in_p (p > 0), p and q: K += p chi(y), Z += p (e^y - 1), Y += p y over p > 0 (the
 * twin sums p y / 2); Q += q where p = 0.  Off p's support (where y may be NaN) y is taken as 0,
 * which adds exactly 0 to K, Z and Y.  chi of |y| > 1 is evaluated and not used (finite in the
 * float sweep, where |y| < ~200).  Whether a finite a meets b = -inf (KL = +inf) the pair scan
 * finds.  FT is float (the vector sweeps) or double (the deep tail). */
#define KL_LOG_RATIO(FT, x, v, nma, nmb, da, db, r)                                                \
    do {                                                                                           \
        FT ea_, eb_;                                                                               \
        TWO_SUM(FT, x, nma, da, ea_);                                                              \
        TWO_SUM(FT, v, nmb, db, eb_);                                                              \
        r = (db - da) + (eb_ - ea_);                                                               \
    } while (0)

#define KL_ADD(FT, CHI, in_p_, p, q, y, K, Z, Y, Q)                                                \
    do {                                                                                           \
        const int in_p = (in_p_);                                                                  \
        const FT y_ = in_p ? (y) : (FT)0;                                                          \
        const FT c = CHI(y_);                                                                      \
        const int small = y_ * y_ <= (FT)1;  /* |y| <= 1 (y^2 rounds above 1 for |y| > 1) */       \
        const FT qmp = (q) - (p);                                                                  \
        K += small ? c * (p) : qmp - (p) * y_;                                                     \
        Z += small ? (c + y_) * (p) : qmp;                                                         \
        Y += (p) * y_;                                                                             \
        Q += in_p ? (FT)0 : (q);                                                                   \
    } while (0)

/* The terms sweep of a KL row pair without deep entries: K, Z, Y, Q of KL_ADD from what the
 * normaliser sweep kept (ea, eb, er; the rows themselves are not read again).  Without deep
 * entries p > 0 exactly where a > -inf (no p is subnormal or flushed), so a row pair whose a has
 * no -inf (`masked` 0, a constant in each call) needs no test of p: every element is on p's
 * support and Q = 0.  (With the test GCC moved loads under it as masked loads.) */
static inline __attribute__((always_inline)) void kl_terms(int64_t n, const float *ea,
        const float *eb, const float *er, float inv_sa, float inv_sb, float shift, int masked,
        double sums[4])
{
    double K = 0.0, Z = 0.0, Y = 0.0, Q = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        float kf = 0.0f, zf = 0.0f, yf = 0.0f, qf = 0.0f;
        _Pragma("omp simd reduction(+ : kf, zf, yf, qf)")
        for (int64_t i = i0; i < i1; ++i) {
            const float p = ea[i] * inv_sa, q = eb[i] * inv_sb;
            KL_ADD(float, chi_series_f, masked ? p > 0.0f : 1, p, q, er[i] - shift, kf, zf, yf, qf);
        }
        K += kf; Z += zf; Y += yf; Q += qf;
    }
    sums[0] = K; sums[1] = Z; sums[2] = Y; sums[3] = Q;
}

#define DEFINE_ROW_OPS(SUF, T, LD, ST)                                                             \
                                                                                                   \
/* Max and NaN flag of a row (the first sweep: from memory). */                                    \
static void scan_##SUF(const T *z, int64_t n, float *m_out, int *nan_out)                          \
{                                                                                                  \
    float m = -INFINITY;                                                                           \
    int nan = 0;                                                                                   \
    _Pragma("omp simd reduction(max : m) reduction(| : nan)")                                      \
    for (int64_t i = 0; i < n; ++i) {                                                              \
        const float x = LD(z, i);                                                                  \
        m = x > m ? x : m;                                                                         \
        nan |= x != x;                                                                             \
    }                                                                                              \
    *m_out = m;                                                                                    \
    *nan_out = nan;                                                                                \
}                                                                                                  \
                                                                                                   \
/* The first sweep of a KL row pair (from memory): both maxima and NaN flags, the smallest finite  \
 * entry of each row, and whether a finite a meets b = -inf (p has mass where q has none: KL =     \
 * +inf).  The smallest entries tell whether a row reaches the deep tail (an entry with p or q     \
 * subnormal) without a test per element in the terms sweep: fl(x - m) grows with x, so the        \
 * least x gives the least offset. */                                                              \
static void scan_pair_##SUF(const T *a, const T *b, int64_t n, pair_scan *out)                     \
{                                                                                                  \
    float ma = -INFINITY, mb = -INFINITY, la = INFINITY, lb = INFINITY;                            \
    int na = 0, nb = 0, ka = 0, l = 0;  /* NaN in a, in b; -inf in a; lost */                      \
    _Pragma("omp simd reduction(max : ma, mb) reduction(min : la, lb) reduction(| : na, nb, ka, l)")\
    for (int64_t i = 0; i < n; ++i) {                                                              \
        const float x = LD(a, i), v = LD(b, i);                                                    \
        ma = x > ma ? x : ma;                                                                      \
        mb = v > mb ? v : mb;                                                                      \
        la = x < la && x > -INFINITY ? x : la;                                                     \
        lb = v < lb && v > -INFINITY ? v : lb;                                                     \
        na |= x != x;                                                                              \
        nb |= v != v;                                                                              \
        ka |= x == -INFINITY;                                                                      \
        l |= (x > -INFINITY) & (v == -INFINITY);                                                   \
    }                                                                                              \
    *out = (pair_scan){ma, mb, la, lb, na, nb, ka, l};                                             \
}                                                                                                  \
                                                                                                   \
/* The second sweep of a valid row with max m.  want_d: 0 none, 1 unweighted, 2 weighted by w,   \
 * 3 the probability targets y (a row of z's dtype), u_j = keep y_j + spread, 4 those times w_j.  \
 * Always inlined, and called with constant flags: each caller gets its own branch-free loop. */  \
static inline __attribute__((always_inline)) row_sums target_sums_##SUF(const T *z, const T *y, int64_t n, float m, \
        int want_a, int want_d, const float *w, float keep, float spread)                          \
{                                                                                                  \
    row_sums s = {0.0, 0.0, 0.0, 0.0, 0.0, 0, 0};                                                  \
    const float hm = 0.5f * m;                                                                     \
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                                    \
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;                                        \
        float cf = 0.0f, tf = 0.0f, af = 0.0f, df = 0.0f, uf = 0.0f;                               \
        int deep = 0, bad_y = 0;                                                                   \
        _Pragma("omp simd reduction(+ : cf, tf, af, df, uf) reduction(| : deep, bad_y)")           \
        for (int64_t i = i0; i < i1; ++i) {                                                        \
            const float x = LD(z, i);                                                              \
            const float d = x - m;                                                                 \
            const float dc = d < -88.0f ? -88.0f : d;                                              \
            const float e = d < 0.0f ? exp_nonpos(dc) : 0.0f;                                      \
            cf += d == 0.0f ? 1.0f : 0.0f;                                                         \
            tf += e;                                                                               \
            deep |= (d < DEEP) & (x > -INFINITY);                                                  \
            if (want_a)                                                                            \
                af += e * dc;                                                                      \
            /* (m - z) / 2 <= FLT_MAX, scaled by 1 / CHUNK so that the chunk's float sum cannot \
             * overflow (exact: a power of two); undone in double below */                       \
            if (want_d == 1)                                                                       \
                df += (hm - 0.5f * x) * (1.0f / CHUNK);                                            \
            else if (want_d == 2)                                                                  \
                df += w[i] != 0.0f ? w[i] * ((hm - 0.5f * x) * (1.0f / CHUNK)) : 0.0f;             \
            else if (want_d >= 3) {  /* u_j = 0 adds 0 even at z_j = -inf; u_j > 0 there: +inf */  \
                const float yi = LD(y, i), v = keep * yi + spread, u = want_d == 4 ? v * w[i] : v;  \
                bad_y |= yi - yi != 0.0f;  /* NaN or +-inf: for validation */                      \
                uf += u;                                                                           \
                df += u != 0.0f ? u * ((hm - 0.5f * x) * (1.0f / CHUNK)) : 0.0f;                   \
            }                                                                                      \
        }                                                                                          \
        s.c += cf; s.t += tf; s.a += af; s.d += (double)df * CHUNK; s.u += uf; s.deep |= deep;     \
        s.bad_y |= bad_y;                                                                          \
    }                                                                                              \
    if (s.deep) {  /* the deep tail: T and A again, in double (see the top of the file) */          \
        double t = 0.0, a = 0.0;                                                                   \
        for (int64_t i = 0; i < n; ++i) {                                                          \
            const double d = (double)LD(z, i) - (double)m;                                         \
            if (d < 0.0 && d > -INFINITY) {                                                        \
                const double e = exp(d);                                                           \
                t += e;                                                                            \
                a += e * d;                                                                        \
            }                                                                                      \
        }                                                                                          \
        s.t = t;                                                                                   \
        s.a = a;                                                                                   \
    }                                                                                              \
    return s;                                                                                      \
}                                                                                                  \
                                                                                                   \
static inline __attribute__((always_inline)) row_sums sums_##SUF(const T *z, int64_t n, float m, int want_a, int want_d, const float *w)  \
{                                                                                                  \
    return target_sums_##SUF(z, NULL, n, m, want_a, want_d, w, 0.0f, 0.0f);                        \
}                                                                                                  \
                                                                                                   \
static void entropy_row_##SUF(const T *z, int64_t n, float *h, float *lse)                         \
{                                                                                                  \
    float m, code;                                                                                 \
    int nan;                                                                                       \
    scan_##SUF(z, n, &m, &nan);                                                                    \
    if (row_fault(m, nan, &code)) {                                                                \
        *h = NAN;                                                                                  \
        *lse = code;                                                                               \
        return;                                                                                    \
    }                                                                                              \
    const row_sums s = sums_##SUF(z, n, m, 1, 0, NULL);                                            \
    const double log_s = log_normaliser(s.c, s.t);                                                 \
    *h = (float)(log_s - s.a / (s.c + s.t));                                                       \
    *lse = (float)((double)m + log_s);                                                             \
}                                                                                                  \
                                                                                                   \
/* g_loss u_i in the gradient: from probability targets y, g_loss w_i (keep y_i + spread); from a \
 * class index, gu (w_i) for every class plus gt at class t. */                                    \
static inline __attribute__((always_inline)) float mass_##SUF(const T *y, const float *w, int64_t i, float keep, \
        float spread, float gl, float gu, int64_t t, float gt)                                     \
{                                                                                                  \
    if (y) {                                                                                       \
        const float v = keep * LD(y, i) + spread;                                                  \
        return (w ? v * w[i] : v) * gl;                                                            \
    }                                                                                              \
    return (w ? w[i] * gu : gu) + (i == t ? gt : 0.0f);                                            \
}                                                                                                  \
                                                                                                   \
/* One row's gradient  gz_i = p_i (coef + gh (log p_i + H')) - u_i,  log p_i = (z_i - lse) - res, \
 * p_i = e^{z_i - lse} back with back = e^{-res}: the entropy's (coef = 0, gh = -g, res = 0, no   \
 * u) and the cross-entropy's (u_i = mass_ above).  With gy, also dL/dy_i = gyf w_i log p_i       \
 * (gyf = -g_loss (1 - eps); no exp, so the deep tail leaves it alone).  In place (gz = z) is     \
 * safe: each entry is read before it is written.  The deep tail is redone with the libm exp. */  \
static inline __attribute__((always_inline)) void target_grad_row_##SUF(const T *z, T *gz, int64_t n, float lse, \
        float back, float coef, float gh, float h_res, const float *w, float gu, int64_t t, float gt, \
        const T *y, float keep, float spread, float gl, T *gy, float gyf, float res)              \
{                                                                                                  \
    const float l = lse - lse == 0.0f ? lse : NAN;                                                 \
    const float cb = coef * back, ghb = gh * back;                                                 \
    int deep = 0;                                                                                  \
    _Pragma("omp simd reduction(| : deep)")                                                        \
    for (int64_t i = 0; i < n; ++i) {                                                              \
        const float x = LD(z, i);                                                                  \
        const float lp = x - l;                                                                    \
        const float lpc = lp < -88.0f ? -88.0f : lp;                                               \
        const float p = exp_nonpos(lpc);                                                           \
        const float u = mass_##SUF(y, w, i, keep, spread, gl, gu, t, gt);                          \
        const int tail = (lp < DEEP) & (x > -INFINITY);                                            \
        deep |= tail;                                                                              \
        if (gy)  /* +inf at z_i = -inf, as the eager path */                                       \
            ST(gy, i, (lp - res) * (w ? gyf * w[i] : gyf));                                        \
        /* a deep entry keeps its logit until the loop below (gz may be z itself) */                \
        ST(gz, i, tail ? x : p * (cb + ghb * (lpc + h_res)) - u);                                  \
    }                                                                                              \
    if (deep) {                                                                                    \
        for (int64_t i = 0; i < n; ++i) {                                                          \
            const float x = LD(z, i);                                                              \
            const float lp = x - l;                                                                \
            if (lp < DEEP && x > -INFINITY) {                                                      \
                const float lq = lp > -FLT_MAX ? lp : -FLT_MAX;  /* a span beyond the max: p = 0 */ \
                const float p = expf(lq);                                                          \
                const float u = mass_##SUF(y, w, i, keep, spread, gl, gu, t, gt);                  \
                ST(gz, i, p * (cb + ghb * (lq + h_res)) - u);                                      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
static inline __attribute__((always_inline)) void grad_row_##SUF(const T *z, T *gz, int64_t n, float lse, \
        float back, float coef, float gh, float h_res, const float *w, float gu, int64_t t, float gt) \
{                                                                                                  \
    target_grad_row_##SUF(z, gz, n, lse, back, coef, gh, h_res, w, gu, t, gt, NULL, 0.0f, 0.0f, 0.0f, NULL, \
                          0.0f, 0.0f);                                                             \
}                                                                                                  \
                                                                                                   \
/* Cross-entropy of a row against probability targets y (Chapter 5, eq-ce-stable), one sweep of   \
 * the row of z (from cache, after scan_) and of y (from memory):                                  \
 *   loss = U log S + 2 sum_j u_j (m - z_j) / 2,   u_j = w_j (keep y_j + spread),  U = sum_j u_j, \
 * every term >= 0 for targets >= 0; u_j = 0 adds 0 even at z_j = -inf, u_j > 0 there gives +inf. */ \
static int ce_probs_row_##SUF(const T *z, const T *y, int64_t n, float m, const float *w, float keep, \
                              float spread, float *loss, float *lse, float *res, float *h)         \
{                                                                                                  \
    row_sums s;                                                                                    \
    if (h)                                                                                         \
        s = w ? target_sums_##SUF(z, y, n, m, 1, 4, w, keep, spread)                               \
              : target_sums_##SUF(z, y, n, m, 1, 3, NULL, keep, spread);                           \
    else                                                                                           \
        s = w ? target_sums_##SUF(z, y, n, m, 0, 4, w, keep, spread)                               \
              : target_sums_##SUF(z, y, n, m, 0, 3, NULL, keep, spread);                           \
    const double log_s = log_normaliser(s.c, s.t);                                                 \
    *loss = (float)(s.u * log_s + 2.0 * s.d);                                                      \
    put_lse(m, log_s, lse, res);                                                                   \
    if (h)                                                                                         \
        *h = (float)(log_s - s.a / (s.c + s.t));                                                   \
    return s.bad_y;  /* a NaN or +-inf target in the row */                                        \
}                                                                                                  \
                                                                                                   \
/* Whether a row of targets holds a NaN or +-inf (for the rows the sweep above skips). */         \
static int bad_targets_##SUF(const T *y, int64_t n)                                                \
{                                                                                                  \
    int bad = 0;                                                                                   \
    _Pragma("omp simd reduction(| : bad)")                                                         \
    for (int64_t i = 0; i < n; ++i) {                                                              \
        const float yi = LD(y, i);                                                                 \
        bad |= yi - yi != 0.0f;                                                                    \
    }                                                                                              \
    return bad;                                                                                    \
}                                                                                                  \
                                                                                                   \
/* U = sum_j u_j of a row of probability targets (the backward's coefficient of p; the forward   \
 * sums it in its sweep), in float over CHUNK entries and then in double, as target_sums_. */     \
static double mass_sum_##SUF(const T *y, int64_t n, const float *w, float keep, float spread)      \
{                                                                                                  \
    double total = 0.0;                                                                            \
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                                    \
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;                                        \
        float uf = 0.0f;                                                                           \
        if (w) {                                                                                   \
            _Pragma("omp simd reduction(+ : uf)")                                                  \
            for (int64_t i = i0; i < i1; ++i)                                                      \
                uf += (keep * LD(y, i) + spread) * w[i];                                           \
        } else {                                                                                   \
            _Pragma("omp simd reduction(+ : uf)")                                                  \
            for (int64_t i = i0; i < i1; ++i)                                                      \
                uf += keep * LD(y, i) + spread;                                                    \
        }                                                                                          \
        total += uf;                                                                               \
    }                                                                                              \
    return total;                                                                                  \
}                                                                                                  \
                                                                                                   \
/* Cross-entropy of a row against class index t (validity decided by the caller), Chapter 5:      \
 *   loss = (1 - eps) w_t ((m - z_t) + log S) + (eps / C) sum_j w_j ((m - z_j) + log S),           \
 * every term >= 0; a target weight of 0 gives 0 even against z_t = -inf. */                       \
static void ce_row_##SUF(const T *z, int64_t n, float m, int64_t t, const float *w, double w_sum,  \
                         float eps, float *loss, float *lse, float *res, float *h)                 \
{                                                                                                  \
    const int want_d = eps > 0.0f ? (w ? 2 : 1) : 0;                                               \
    row_sums s;                                                                                    \
    if (h)                                                                                         \
        s = want_d == 0 ? sums_##SUF(z, n, m, 1, 0, NULL)                                          \
          : want_d == 1 ? sums_##SUF(z, n, m, 1, 1, NULL) : sums_##SUF(z, n, m, 1, 2, w);          \
    else                                                                                           \
        s = want_d == 0 ? sums_##SUF(z, n, m, 0, 0, NULL)                                          \
          : want_d == 1 ? sums_##SUF(z, n, m, 0, 1, NULL) : sums_##SUF(z, n, m, 0, 2, w);          \
    const double log_s = log_normaliser(s.c, s.t);                                                 \
    const double keep = 1.0 - (double)eps, spread = (double)eps / (double)n;                       \
    const double coef_t = w ? keep * (double)w[t] : keep;                                          \
    double value = coef_t != 0.0 ? coef_t * (((double)m - (double)LD(z, t)) + log_s) : 0.0;        \
    if (want_d)                                                                                    \
        value += spread * (w_sum * log_s + 2.0 * s.d);                                             \
    *loss = (float)value;                                                                          \
    put_lse(m, log_s, lse, res);                                                                   \
    if (h)                                                                                         \
        *h = (float)(log_s - s.a / (s.c + s.t));                                                   \
}                                                                                                  \
                                                                                                   \
/* The normaliser sweep of a valid KL row pair: c and T of S = c + T for a and b (as sums_ forms   \
 * them), and, if `store`, the weights e^{a - ma}, e^{b - mb} and the log-ratio before the shift   \
 * (KL_LOG_RATIO's r) into ea, eb and er, for the terms sweep, which then reads neither row.       \
 * `store` is a constant in each call: the stores stay unconditional (a store under a test         \
 * became a masked store, slower than all the rest of the sweep on AMD Zen).  The TwoSums of       \
 * KL_LOG_RATIO are additions, which this sweep's exps leave room for. */                          \
static inline __attribute__((always_inline)) void kl_normalisers_##SUF(const T *a, const T *b,     \
        int64_t n, float ma, float mb, float *ea, float *eb, float *er, int store, double sums[4]) \
{                                                                                                  \
    double ca = 0.0, ta = 0.0, cb = 0.0, tb = 0.0;                                                 \
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                                    \
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;                                        \
        float caf = 0.0f, taf = 0.0f, cbf = 0.0f, tbf = 0.0f;                                      \
        _Pragma("omp simd reduction(+ : caf, taf, cbf, tbf)")                                      \
        for (int64_t i = i0; i < i1; ++i) {                                                        \
            /* d <= 0: exp_nonpos gives 1 exactly at the max (d = 0) and 0 at -inf */              \
            float da, db, r;                                                                       \
            const float x = LD(a, i), v = LD(b, i);                                                \
            KL_LOG_RATIO(float, x, v, -ma, -mb, da, db, r);                                        \
            const float xa = exp_nonpos(da), xb = exp_nonpos(db);                                  \
            if (store) {                                                                           \
                ea[i] = xa;                                                                        \
                eb[i] = xb;                                                                        \
                er[i] = r;                                                                         \
            }                                                                                      \
            caf += da == 0.0f ? 1.0f : 0.0f;                                                       \
            taf += da < 0.0f ? xa : 0.0f;                                                          \
            cbf += db == 0.0f ? 1.0f : 0.0f;                                                       \
            tbf += db < 0.0f ? xb : 0.0f;                                                          \
        }                                                                                          \
        ca += caf; ta += taf; cb += cbf; tb += tbf;                                                \
    }                                                                                              \
    sums[0] = ca; sums[1] = ta; sums[2] = cb; sums[3] = tb;                                        \
}                                                                                                  \
                                                                                                   \
/* KL(softmax(a) || softmax(b)) of a valid row pair (Chapter 1, eq-ent-kl-stable): S_a, S_b in one \
 * sweep, then the non-negative terms (KL_ADD) in another,                                         \
 *   KL = K - chi(log1p Z) - log1p(-Q)   (or -Y when Q > 1/2),  +inf if lost.                      \
 * A row with an entry whose p or q is subnormal in float (-inf excluded) is summed again in       \
 * double. */                                                                                      \
static float kl_row_##SUF(const T *a, const T *b, int64_t n, const pair_scan *sc, double *log_sa_o,\
                          double *log_sb_o)                                                        \
{                                                                                                  \
    const float ma = sc->ma, mb = sc->mb;                                                          \
    /* e^{a - ma}, e^{b - mb} and r are kept from the normaliser sweep for the terms sweep, which  \
     * then needs no exp: p = e^{a - ma} / S_a, q = e^{b - mb} / S_b.  A row of 32000 pairs keeps  \
     * them in 375 KiB (in L2).  Without the buffer (malloc failed) the row is done by the double  \
     * loop. */                                                                                    \
    float small_buf[n <= SCRATCH_ON_STACK ? 3 * n : 1];                                            \
    float *ea = n <= SCRATCH_ON_STACK ? small_buf : (float *)malloc(sizeof(float) * 3 * (size_t)n);\
    float *eb = ea ? ea + n : NULL, *er = ea ? ea + 2 * n : NULL;                                  \
    double sums[4];  /* c_a, T_a, c_b, T_b */                                                      \
    if (ea)                                                                                        \
        kl_normalisers_##SUF(a, b, n, ma, mb, ea, eb, er, 1, sums);                                \
    else                                                                                           \
        kl_normalisers_##SUF(a, b, n, ma, mb, NULL, NULL, NULL, 0, sums);                          \
    const double ca = sums[0], ta = sums[1], cb = sums[2], tb = sums[3];                           \
    const double log_sa = log_normaliser(ca, ta), log_sb = log_normaliser(cb, tb);                 \
    *log_sa_o = log_sa;                                                                            \
    *log_sb_o = log_sb;                                                                            \
    if (sc->lost) {                                                                                \
        if (ea != small_buf)                                                                       \
            free(ea);                                                                              \
        return INFINITY;                                                                           \
    }                                                                                              \
    const float lsa = (float)log_sa, lsb = (float)log_sb;                                          \
    const float shift = lsb - lsa;                                                                 \
    const float inv_sa = (float)(1.0 / (ca + ta)), inv_sb = (float)(1.0 / (cb + tb));              \
    /* the deep tail: an entry x - ma < DEEP + log S_a (or b's), found from the least entries */   \
    const int deep = !ea || (sc->lo_a - ma < DEEP + lsa) || (sc->lo_b - mb < DEEP + lsb);          \
    double sums_k[4] = {0.0, 0.0, 0.0, 0.0};  /* K, Z, Y, Q */                                     \
    if (!deep && sc->masked_a)                                                                     \
        kl_terms(n, ea, eb, er, inv_sa, inv_sb, shift, 1, sums_k);                                 \
    else if (!deep)                                                                                \
        kl_terms(n, ea, eb, er, inv_sa, inv_sb, shift, 0, sums_k);                                 \
    double K = sums_k[0], Z = sums_k[1], Y = sums_k[2], Q = sums_k[3];                             \
    if (ea != small_buf)                                                                           \
        free(ea);                                                                                  \
    if (deep) {  /* the sums in double: p and q of these entries are not flushed to 0 */           \
        const double dsa = (double)lsa, dsb = (double)lsb, dshift = dsb - dsa;                     \
        const double dnma = -(double)ma, dnmb = -(double)mb;                                       \
        for (int64_t i = 0; i < n; ++i) {                                                          \
            const double x = (double)LD(a, i), v = (double)LD(b, i);                               \
            double da, db, r;                                                                      \
            KL_LOG_RATIO(double, x, v, dnma, dnmb, da, db, r);                                     \
            const double y = r - dshift;                                                           \
            /* p = e^{log p}; log q through p (p e^y: no overflow) where p > 0, else from b */     \
            const double lp = da - dsa;                                                            \
            const double p = exp(lp < 0.0 ? lp : 0.0);                                             \
            const double lq = p > 0.0 ? lp + y : db - dsb;                                         \
            const double q = exp(lq < 0.0 ? lq : 0.0);                                             \
            KL_ADD(double, chi_d, p > 0.0, p, q, y, K, Z, Y, Q);                                   \
        }                                                                                          \
    }                                                                                              \
    const double kl = Q <= 0.5 ? K - chi_d(log1p(Z)) - log1p(-Q) : -Y;                             \
    return kl > 0.0 ? (float)kl : 0.0f;                                                            \
}                                                                                                  \
                                                                                                   \
/* dKL/da = g p (log p - log q - KL), dKL/db = g (q - p); 0 from the KL term where KL = +inf.      \
 * Entries whose p or q is subnormal in float are redone with the libm exp (in place is safe). */ \
static void kl_grad_row_##SUF(const T *a, const T *b, T *ga, T *gb, int64_t n, float g, float kl,  \
                              float lse_a, float lse_b)                                            \
{                                                                                                  \
    const float la = lse_a - lse_a == 0.0f ? lse_a : NAN, lb = lse_b - lse_b == 0.0f ? lse_b : NAN; \
    const float klf = kl < INFINITY ? kl : 0.0f, ka = kl < INFINITY ? g : 0.0f;                    \
    int deep = 0;                                                                                  \
    _Pragma("omp simd reduction(| : deep)")                                                        \
    for (int64_t i = 0; i < n; ++i) {                                                              \
        const float x = LD(a, i), v = LD(b, i);                                                    \
        const float lp = x - la, lq = v - lb;                                                      \
        const float lpc = lp < -88.0f ? -88.0f : lp, lqc = lq < -88.0f ? -88.0f : lq;              \
        const float p = exp_nonpos(lpc), q = exp_nonpos(lqc);                                      \
        const int tail = ((lp < DEEP) & (x > -INFINITY)) | ((lq < DEEP) & (v > -INFINITY));        \
        deep |= tail;                                                                              \
        ST(ga, i, tail ? x : ka * (p * ((lpc - lqc) - klf)));                                      \
        ST(gb, i, tail ? v : g * (q - p));                                                         \
    }                                                                                              \
    if (deep) {                                                                                    \
        for (int64_t i = 0; i < n; ++i) {                                                          \
            const float x = LD(a, i), v = LD(b, i);                                                \
            const float lp = x - la, lq = v - lb;                                                  \
            if (((lp < DEEP) & (x > -INFINITY)) | ((lq < DEEP) & (v > -INFINITY))) {               \
                const double dp = (double)x - (double)la, dq = (double)v - (double)lb;             \
                const double p = exp(dp), q = exp(dq);                                             \
                const double lpq = p > 0.0 ? (dp - (dq > -1e300 ? dq : -1e300)) - klf : 0.0;       \
                ST(ga, i, (float)(ka * (p * lpq)));                                                \
                ST(gb, i, (float)(g * (q - p)));                                                   \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

DEFINE_ROW_OPS(f32, float, ld_f32, st_f32)
DEFINE_ROW_OPS(bf16, uint16_t, ld_bf16, st_bf16)

/* ---- entry points: rows [r0, r1) of a (rows, n) array with row stride `stride` (elements) ---- */

#ifdef _OPENMP
#define PARALLEL_ROWS(threads) _Pragma("omp parallel for schedule(dynamic, ROW_RUN) num_threads(threads)")
#else
#define PARALLEL_ROWS(threads)
#endif

/* One thread never enters the OpenMP runtime (safe after a fork). */
#define FOR_ROWS(r0, r1, threads, BODY)                                                            \
    do {                                                                                           \
        if ((threads) > 1) {                                                                       \
            PARALLEL_ROWS(threads)                                                                 \
            for (int64_t row = (r0); row < (r1); ++row) { BODY; }                                  \
        } else {                                                                                   \
            for (int64_t row = (r0); row < (r1); ++row) { BODY; }                                  \
        }                                                                                          \
    } while (0)

/* Rows in [r0, r1) whose coded log-normaliser is not finite (one pass over a rows-sized array). */
static int64_t count_faults(const float *lse, int64_t r0, int64_t r1)
{
    int64_t bad = 0;
    for (int64_t row = r0; row < r1; ++row)
        bad += !isfinite(lse[row]);
    return bad;
}

int entmath_rows_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Returns the number of rows without a distribution (coded lse not finite): the wrapper's
 * validation reads this count instead of the lse tensor. */
int64_t entmath_entropy_fwd(const void *z, int64_t bf16, int64_t n, int64_t stride, int64_t r0, int64_t r1,
                            float *h, float *lse, int64_t threads)
{
    if (bf16)
        FOR_ROWS(r0, r1, threads, entropy_row_bf16((const uint16_t *)z + row * stride, n, h + row, lse + row));
    else
        FOR_ROWS(r0, r1, threads, entropy_row_f32((const float *)z + row * stride, n, h + row, lse + row));
    return count_faults(lse, r0, r1);
}

/* dH/dz = -g p (log p + H): grad_row with coef 0, gh = -g, no target mass. */
void entmath_entropy_bwd(const void *z, void *gz, int64_t bf16, int64_t n, int64_t stride, int64_t gstride,
                         int64_t r0, int64_t r1, const float *g, const float *h, const float *lse,
                         int64_t threads)
{
    if (bf16)
        FOR_ROWS(r0, r1, threads, grad_row_bf16((const uint16_t *)z + row * stride, (uint16_t *)gz + row * gstride,
                                                n, lse[row], 1.0f, 0.0f, -g[row], h[row], NULL, 0.0f, -1, 0.0f));
    else
        FOR_ROWS(r0, r1, threads, grad_row_f32((const float *)z + row * stride, (float *)gz + row * gstride, n,
                                               lse[row], 1.0f, 0.0f, -g[row], h[row], NULL, 0.0f, -1, 0.0f));
}

/* Cross-entropy forward against class indices t: per row the loss (without z-loss), coded lse,
 * its rounding residual and (if h) the entropy.  Ignored rows (t == ignore_index) get loss 0 and
 * entropy 0; an out-of-range index (possible only with validation off) a NaN loss. */
/* counts (optional, int64[3], zeroed by the caller): class indices out of range (not ignore_index),
 * counted rows whose logits have no distribution (a NaN, a +inf, or no finite logit), ignored rows.
 * The wrapper's validation reads them in one host read instead of checking targets and rows with
 * tensor ops; an atomic add only for those rare rows. */
#define COUNT(k) do { if (counts) __atomic_fetch_add(counts + (k), 1, __ATOMIC_RELAXED); } while (0)

#define CE_ROW(SUF, TT)                                                                            \
    do {                                                                                           \
        const TT *zr = (const TT *)z + row * stride;                                               \
        const int64_t ti = t[row];                                                                 \
        const int valid = ti != ignore_index;                                                      \
        float m;                                                                                   \
        int nan;                                                                                   \
        if (!valid)                                                                                \
            COUNT(2);                                                                              \
        else if (ti < 0 || ti >= n)                                                                \
            COUNT(0);                                                                              \
        scan_##SUF(zr, n, &m, &nan);                                                               \
        res[row] = 0.0f;                                                                           \
        if (row_fault(m, nan, lse + row)) {                                                        \
            if (valid)                                                                             \
                COUNT(1);                                                                          \
            loss[row] = valid ? NAN : 0.0f;                                                        \
            if (h) h[row] = valid ? NAN : 0.0f;                                                    \
            break;                                                                                 \
        }                                                                                          \
        const int in_range = ti >= 0 && ti < n;                                                    \
        ce_row_##SUF(zr, n, m, in_range ? ti : 0, w, w_sum, eps, loss + row, lse + row, res + row, \
                     h ? h + row : NULL);                                                          \
        if (!valid) {                                                                              \
            loss[row] = 0.0f;                                                                      \
            if (h) h[row] = 0.0f;                                                                  \
        } else if (!in_range) {                                                                    \
            loss[row] = NAN;                                                                       \
        }                                                                                          \
    } while (0)

void entmath_ce_fwd(const void *z, const int64_t *t, const float *w, int64_t bf16, int64_t n, int64_t stride,
                    int64_t r0, int64_t r1, float eps, int64_t ignore_index, float *loss, float *lse, float *res,
                    float *h, int64_t *counts, int64_t threads)
{
    double w_sum = (double)n;  /* sum_j w_j: smoothing's share of the weights */
    if (w) {
        w_sum = 0.0;
        for (int64_t i = 0; i < n; ++i)
            w_sum += (double)w[i];
    }
    if (bf16)
        FOR_ROWS(r0, r1, threads, CE_ROW(bf16, uint16_t));
    else
        FOR_ROWS(r0, r1, threads, CE_ROW(f32, float));
}

/* The common calls' reduction of the rows' losses into *out: 1 "sum", 2 "mean" over `counted`
 * rows (0 if there are none), summed in double (no overflow, one rounding); 0 "none" (nothing to
 * do: out holds the rows' losses). */
static void reduce_losses(const float *loss, int64_t rows, int64_t counted, int64_t reduction, float *out)
{
    if (!reduction)
        return;
    double sum = 0.0;
    for (int64_t row = 0; row < rows; ++row)
        sum += (double)loss[row];
    if (reduction == 2)
        sum = counted > 0 ? sum / (double)counted : 0.0;
    *out = (float)sum;
}

/* Out of memory for a common call's buffer: NaN results, never a silent number. */
static void fail_reduced(float *out, int64_t rows, int64_t reduction)
{
    for (int64_t row = 0; row < (reduction ? 1 : rows); ++row)
        out[row] = NAN;
}

/* The common call (class indices; no class weights, entropy, z-loss or soft-capping), forward in
 * one call: entmath_ce_fwd over all rows, then its reduction into out: 1 "sum", 2 "mean" over the
 * rows not ignored (0 if there are none), summed in double (no overflow, one rounding); 0 "none"
 * (out is then the rows' losses).  scratch: 3 rows floats, the rows' losses, coded lse and
 * residuals (what the backward reads), or NULL when nobody reads them (a call that records no
 * graph): they then live in a buffer of this call.  counts is required: the mean reads the
 * count of ignored rows.
 * The integer arguments come packed in a[] (z, t, bf16, n, stride, rows, ignore_index, scratch,
 * counts, reduction, out, threads): ctypes converts every argument it passes, about 0.25 us
 * apiece, which was a sixth of a small call. */
void entmath_ce_fwd_reduced(const int64_t *a, float eps)
{
    const void *z = (const void *)a[0];
    const int64_t *t = (const int64_t *)a[1];
    const int64_t bf16 = a[2], n = a[3], stride = a[4], rows = a[5], ignore_index = a[6];
    float *scratch = (float *)a[7];
    int64_t *counts = (int64_t *)a[8];
    const int64_t reduction = a[9], threads = a[11];
    float *out = (float *)a[10];
    float *own = scratch ? NULL : malloc(sizeof(float) * (size_t)(3 * rows + 1));
    float *buf = scratch ? scratch : own;
    if (!buf) {
        fail_reduced(out, rows, reduction);
        return;
    }
    float *loss = reduction ? buf : out;
    entmath_ce_fwd(z, t, NULL, bf16, n, stride, 0, rows, eps, ignore_index, loss, buf + rows, buf + 2 * rows, NULL,
                   counts, threads);
    reduce_losses(loss, rows, rows - counts[2], reduction, out);
    free(own);
}

/* Cross-entropy forward against probability targets y (rows of z's dtype, row stride ystride;
 * keep = 1 - eps, spread = eps / C): per row the loss (without z-loss), coded lse, its rounding
 * residual and (if h) the entropy.  Returns the number of rows without a distribution (their
 * loss and entropy NaN).  bad_y (optional, zeroed by the caller): receives the number of rows
 * with a NaN or +-inf target, which the wrapper's validation reads instead of checking y with
 * tensor ops (a second read of y, most of the time of a call). */
#define CE_PROBS_ROW(SUF, TT)                                                                      \
    do {                                                                                           \
        const TT *zr = (const TT *)z + row * stride, *yr = (const TT *)y + row * ystride;          \
        float m;                                                                                   \
        int nan;                                                                                   \
        scan_##SUF(zr, n, &m, &nan);                                                               \
        res[row] = 0.0f;                                                                           \
        if (row_fault(m, nan, lse + row)) {                                                        \
            loss[row] = NAN;                                                                       \
            if (h) h[row] = NAN;                                                                   \
            if (bad_y && bad_targets_##SUF(yr, n))                                                 \
                __atomic_fetch_add(bad_y, 1, __ATOMIC_RELAXED);                                    \
            break;                                                                                 \
        }                                                                                          \
        if (ce_probs_row_##SUF(zr, yr, n, m, w, keep, spread, loss + row, lse + row, res + row,    \
                               h ? h + row : NULL) && bad_y)                                       \
            __atomic_fetch_add(bad_y, 1, __ATOMIC_RELAXED);                                        \
    } while (0)

int64_t entmath_ce_probs_fwd(const void *z, const void *y, const float *w, int64_t bf16, int64_t n, int64_t stride,
                             int64_t ystride, int64_t r0, int64_t r1, float keep, float spread, float *loss,
                             float *lse, float *res, float *h, int64_t *bad_y, int64_t threads)
{
    if (bf16)
        FOR_ROWS(r0, r1, threads, CE_PROBS_ROW(bf16, uint16_t));
    else
        FOR_ROWS(r0, r1, threads, CE_PROBS_ROW(f32, float));
    return count_faults(lse, r0, r1);
}

/* Cross-entropy backward against probability targets (Chapter 5, eq-ce-grad):
 *   dL/dz = p (g_loss U + g_lse - g_H (log p + H)) - g_loss u,   U = sum_j u_j,
 *   dL/dy = -g_loss (1 - eps) w log p   (into gy, when it is not NULL).
 * g_loss of row r is g_loss[r * g_stride] / g_div (as in entmath_ce_bwd).
 * Per row: U from the row of y (from memory), then one sweep of z (from memory) and y (from
 * cache) that writes dz (and dy). */
#define CE_PROBS_GRAD_ROW(SUF, TT)                                                                 \
    do {                                                                                           \
        const TT *zr = (const TT *)z + row * stride, *yr = (const TT *)y + row * ystride;          \
        TT *gzr = (TT *)gz + row * gstride, *gyr = gy ? (TT *)gy + row * gystride : NULL;         \
        const float gl = g_loss[row * g_stride] / g_div, r = res[row];                             \
        const float u_sum = (float)mass_sum_##SUF(yr, n, w, keep, spread);                         \
        const float coef = gl * u_sum + (g_lse ? g_lse[row] : 0.0f);                               \
        const float back = (float)exp(-(double)r), ghr = g_h ? -g_h[row] : 0.0f;                  \
        const float hr = g_h ? h[row] - r : 0.0f;                                                  \
        if (w)                                                                                     \
            target_grad_row_##SUF(zr, gzr, n, lse[row], back, coef, ghr, hr, w, 0.0f, -1, 0.0f, yr,  \
                                  keep, spread, gl, gyr, -keep * gl, r);                           \
        else                                                                                       \
            target_grad_row_##SUF(zr, gzr, n, lse[row], back, coef, ghr, hr, NULL, 0.0f, -1, 0.0f,   \
                                  yr, keep, spread, gl, gyr, -keep * gl, r);                       \
    } while (0)

void entmath_ce_probs_bwd(const void *z, const void *y, const float *w, void *gz, void *gy, int64_t bf16, int64_t n,
                          int64_t stride, int64_t ystride, int64_t gstride, int64_t gystride, int64_t r0, int64_t r1,
                          float keep, float spread, const float *lse, const float *res, const float *h,
                          const float *g_loss, const float *g_lse, const float *g_h, int64_t g_stride, float g_div,
                          int64_t threads)
{
    if (bf16)
        FOR_ROWS(r0, r1, threads, CE_PROBS_GRAD_ROW(bf16, uint16_t));
    else
        FOR_ROWS(r0, r1, threads, CE_PROBS_GRAD_ROW(f32, float));
}

/* The common call against probability targets (of z's dtype, contiguous classes; no class
 * weights, entropy, z-loss or soft-capping): entmath_ce_probs_fwd over all rows, then the
 * reduction as entmath_ce_fwd_reduced's ("mean" over all rows).  counts[0] receives the rows with
 * a NaN or +-inf target, counts[1] the rows without a distribution.  Packed integer arguments:
 * (z, y, bf16, n, stride, ystride, rows, scratch, counts, reduction, out, threads). */
void entmath_ce_probs_fwd_reduced(const int64_t *a, float keep, float spread)
{
    const int64_t rows = a[6], reduction = a[9];
    float *scratch = (float *)a[7], *out = (float *)a[10];
    int64_t *counts = (int64_t *)a[8];
    float *own = scratch ? NULL : malloc(sizeof(float) * (size_t)(3 * rows + 1));
    float *buf = scratch ? scratch : own;
    if (!buf) {
        fail_reduced(out, rows, reduction);
        return;
    }
    float *loss = reduction ? buf : out;
    counts[1] = entmath_ce_probs_fwd((const void *)a[0], (const void *)a[1], NULL, a[2], a[3], a[4], a[5], 0, rows,
                                     keep, spread, loss, buf + rows, buf + 2 * rows, NULL, counts, a[11]);
    reduce_losses(loss, rows, rows, reduction, out);
    free(own);
}

/* Its backward: dL/dz into gz and, if gy is not NULL, dL/dy into gy (both contiguous), from the
 * forward's scratch and the gradient g of its result (row r's: g[r * g_stride] / g_div).  Packed
 * integer arguments: (z, y, gz, gy, bf16, n, stride, ystride, rows, scratch, g, g_stride,
 * threads). */
void entmath_ce_probs_bwd_reduced(const int64_t *a, float keep, float spread, float g_div)
{
    const int64_t n = a[5], rows = a[8];
    const float *scratch = (const float *)a[9];
    entmath_ce_probs_bwd((const void *)a[0], (const void *)a[1], NULL, (void *)a[2], (void *)a[3], a[4], n, a[6], a[7],
                         n, n, 0, rows, keep, spread, scratch + rows, scratch + 2 * rows, NULL, (const float *)a[10],
                         NULL, NULL, a[11], g_div, a[12]);
}

/* Cross-entropy backward against class indices (Chapter 5, eq-ce-grad):
 *   dL/dz = p (g_loss sum u + g_lse - g_H (log p + H)) - g_loss u,
 * u_j = (eps / C) w_j + (1 - eps) w_t [j = t].  sum_u: the rows' sums of u (NULL: 1, unweighted).
 * g_loss of row r is g_loss[r * g_stride] / g_div: stride 0 and g_div = the rows counted give a
 * "mean" reduction's gradient without a rows-sized copy of it (the common call's backward).
 * Ignored rows get exactly 0; rows whose index is out of range, NaN. */
#define CE_GRAD_ROW(SUF, TT)                                                                       \
    do {                                                                                           \
        const TT *zr = (const TT *)z + row * stride;                                               \
        TT *gzr = (TT *)gz + row * gstride;                                                        \
        const int64_t ti = t[row];                                                                 \
        if (ti == ignore_index || ti < 0 || ti >= n) {                                             \
            const float fill = ti == ignore_index ? 0.0f : NAN;                                    \
            for (int64_t i = 0; i < n; ++i)                                                        \
                st_##SUF(gzr, i, fill);                                                            \
            break;                                                                                 \
        }                                                                                          \
        const float gl = g_loss[row * g_stride] / g_div;                                           \
        const float coef = gl * (sum_u ? sum_u[row] : 1.0f) + (g_lse ? g_lse[row] : 0.0f);        \
        const float r = res[row];                                                                  \
        const float gt = gl * keep * (w ? w[ti] : 1.0f);                                           \
        const float back = (float)exp(-(double)r), ghr = g_h ? -g_h[row] : 0.0f;                  \
        const float hr = g_h ? h[row] - r : 0.0f;                                                  \
        if (w)                                                                                     \
            grad_row_##SUF(zr, gzr, n, lse[row], back, coef, ghr, hr, w, gl * spread, ti, gt);     \
        else                                                                                       \
            grad_row_##SUF(zr, gzr, n, lse[row], back, coef, ghr, hr, NULL, gl * spread, ti, gt);  \
    } while (0)

void entmath_ce_bwd(const void *z, const int64_t *t, const float *w, void *gz, int64_t bf16, int64_t n,
                    int64_t stride, int64_t gstride, int64_t r0, int64_t r1, float eps, int64_t ignore_index,
                    const float *lse, const float *res, const float *h, const float *g_loss, const float *g_lse,
                    const float *g_h, const float *sum_u, int64_t g_stride, float g_div, int64_t threads)
{
    const float keep = 1.0f - eps, spread = eps / (float)n;
    if (bf16)
        FOR_ROWS(r0, r1, threads, CE_GRAD_ROW(bf16, uint16_t));
    else
        FOR_ROWS(r0, r1, threads, CE_GRAD_ROW(f32, float));
}

/* The common call's backward: dL/dz into gz (contiguous rows) from the forward's scratch (lse at
 * scratch + rows, residuals at scratch + 2 rows) and the gradient g of its result: row r's is
 * g[r * g_stride] / g_div (a "mean": g_stride 0, g_div the rows counted).  Integer arguments
 * packed as entmath_ce_fwd_reduced's: (z, t, gz, bf16, n, stride, rows, ignore_index, scratch, g,
 * g_stride, threads). */
void entmath_ce_bwd_reduced(const int64_t *a, float eps, float g_div)
{
    const int64_t n = a[4], rows = a[6];
    const float *scratch = (const float *)a[8];
    entmath_ce_bwd((const void *)a[0], (const int64_t *)a[1], NULL, (void *)a[2], a[3], n, a[5], n, 0, rows, eps,
                   a[7], scratch + rows, scratch + 2 * rows, NULL, (const float *)a[9], NULL, NULL, NULL, a[10],
                   g_div, a[11]);
}

/* KL forward: per row KL, and the coded log-normalisers of a and b. */
#define KL_ROW(SUF, TT)                                                                            \
    do {                                                                                           \
        const TT *ar = (const TT *)a + row * sa, *br = (const TT *)b + row * sb;                   \
        pair_scan sc;                                                                              \
        scan_pair_##SUF(ar, br, n, &sc);                                                           \
        const int fa = row_fault(sc.ma, sc.nan_a, lse_a + row);                                    \
        const int fb = row_fault(sc.mb, sc.nan_b, lse_b + row);                                    \
        if (fa || fb) {                                                                            \
            kl[row] = NAN;                                                                         \
            if (!fa) lse_a[row] = sc.ma;  /* a finite value stands for a valid row */              \
            if (!fb) lse_b[row] = sc.mb;                                                           \
            break;                                                                                 \
        }                                                                                          \
        double log_sa, log_sb;                                                                     \
        kl[row] = kl_row_##SUF(ar, br, n, &sc, &log_sa, &log_sb);                                  \
        lse_a[row] = (float)((double)sc.ma + log_sa);                                              \
        lse_b[row] = (float)((double)sc.mb + log_sb);                                              \
    } while (0)

/* Returns the number of rows in which a or b has no distribution (its coded lse not finite). */
int64_t entmath_kl_fwd(const void *a, const void *b, int64_t bf16, int64_t n, int64_t sa, int64_t sb,
                       int64_t r0, int64_t r1, float *kl, float *lse_a, float *lse_b, int64_t threads)
{
    if (bf16)
        FOR_ROWS(r0, r1, threads, KL_ROW(bf16, uint16_t));
    else
        FOR_ROWS(r0, r1, threads, KL_ROW(f32, float));
    int64_t bad = 0;
    for (int64_t row = r0; row < r1; ++row)
        bad += !isfinite(lse_a[row]) || !isfinite(lse_b[row]);
    return bad;
}

void entmath_kl_bwd(const void *a, const void *b, void *ga, void *gb, int64_t bf16, int64_t n, int64_t sa,
                    int64_t sb, int64_t r0, int64_t r1, const float *g, const float *kl, const float *lse_a,
                    const float *lse_b, int64_t threads)
{
    if (bf16)
        FOR_ROWS(r0, r1, threads, kl_grad_row_bf16((const uint16_t *)a + row * sa, (const uint16_t *)b + row * sb,
                                                   (uint16_t *)ga + row * n, (uint16_t *)gb + row * n, n, g[row],
                                                   kl[row], lse_a[row], lse_b[row]));
    else
        FOR_ROWS(r0, r1, threads, kl_grad_row_f32((const float *)a + row * sa, (const float *)b + row * sb,
                                                  (float *)ga + row * n, (float *)gb + row * n, n, g[row], kl[row],
                                                  lse_a[row], lse_b[row]));
}
