/* Entropy normalization on the CPU, one row at a time, every evaluation in cache (Chapter 2).
 *
 * entropy_normalization.py (beside this file) compiles this file with the machine's C compiler and calls
 * entmath_entropy_normalize_rows() through ctypes, one range of rows per thread.
 *
 * Why one row at a time.  A row of 32000 float32 logits is 125 KiB: it and its output stay in L2
 * while the row is solved, so it is read from memory once and p is written back once, however
 * many times H(gamma) is evaluated.  (The eager torch path sweeps the whole tensor per product and
 * sum instead; here each evaluation is one loop.)
 *
 * The iteration is the eager path's (_solve_block in entropy_normalization.py), in double: the
 * start gamma_0 from the Taylor expansion of H at gamma = 0, then Halley steps on
 * G = log((H - log c) / (t - log c)) inside a bracket (halley_step below is the twin of
 * halley_update() there; tests/test_entropy_normalization.py holds them to the same iterates).
 * Only the sweeps over the row run in float32.  A row whose root gamma leaves float32's range,
 * whose logits span more than FLT_MAX / 4, or whose steering sums find no scale (see
 * steering_frame()) is declined to the float64 eager path.  Three economies:
 *
 *  - The sketch start (rows of SKETCH_MIN_N or more).  Before any sweep, two Halley steps on a
 *    sketch of the row (its upper tail exactly and a 1/16 sample of the rest, an eighth of the row)
 *    move gamma_0 to within ~0.3% of the root, so that one exponential sweep is followed by
 *    updates.  See "The sketch" below.
 *  - Update sweeps.  Each sweep leaves the weights w_i = exp(gamma d_i) in p.  When the next gamma
 *    is close (|step d_i| <= UPDATE_REACH over the row), the next weights are
 *    w_i exp(step d_i), whose second factor a Taylor polynomial of degree 2 to 9 (as low as
 *    the step allows) gives to float precision: 40% of the work of an exponential or less.
 *    Halley's last steps are small, so the last sweeps of a row are usually updates.
 *  - Predicted normalisation.  When the step is below PREDICT_STEP the sweep is expected to be the
 *    last, so it writes p already divided by S, predicted from the previous sweep's cumulants
 *    (log S(gamma + h) = log S + h mu + h^2 k2 / 2 + h^3 k3 / 6 + O(h^4)); the sums of the same
 *    sweep check both the entropy and the prediction, and only a miss costs another pass.
 *
 * Vectorisation without intrinsics (but one): the loops are plain C, and the compiler emits SIMD
 * code for what the machine has (AVX2, AVX-512, NEON); only the sketch's gather_tail has an AVX2
 * path in intrinsics, beside its plain C one.  Float sums are reassociated only inside
 * `#pragma omp simd reduction` loops over CHUNK entries (-fopenmp-simd: no OpenMP runtime), whose
 * lane sums are added into double accumulators, so each sum carries the rounding of a few float
 * additions per term, not of n / lanes of them.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__GNUC__)
#include <immintrin.h>

#include "vecmath.h"  /* exp_nonpos: shared with rows.c */
#endif

/* Entries per float partial sum: 256 is 32 terms per AVX2 lane (16 with AVX-512), a relative
 * rounding of at most ~32 ulp and typically ~6; the horizontal reduction into double that ends each
 * chunk then costs a few percent of a sweep, against a fifth at 64. */
#ifndef CHUNK
#define CHUNK 256
#endif
/* The largest |(gamma - gamma_prev) d| for an update sweep: the degree-9 Taylor polynomial of
 * exp then errs by at most e^0.5 0.5^10 / 10! < 5e-10, relative, and its float evaluation loses
 * at most a factor e^(2 * 0.5) = 2.7 to cancellation (x < 0): under 1.5 ulp.  An update costs 40%
 * of an exponential sweep (no range reduction), so a reach this wide lets the step after a 1%
 * step be an update. */
#define UPDATE_REACH 0.5f
/* A relative step below this makes the next sweep the expected last (Halley converges cubically:
 * the step after a 1% step is typically ~1e-6). */
#define PREDICT_STEP 0.01

/* exp(x) for |x| <= UPDATE_REACH: its Taylor polynomial of degree `degree` (9, 6, 3 or 2; a
 * constant at every call site, so each inlined copy evaluates only its own terms).  The degree an
 * update sweep uses is the lowest whose remainder e^|x| |x|^(degree + 1) / (degree + 1)! stays
 * below 2e-8, a third of float32's half ulp, over the sweep's largest |x| (update_degree()). */
static inline float exp_small(float x, int degree)
{
    if (degree == 2)
        return (0.5f * x + 1.0f) * x + 1.0f;
    const float x2 = x * x;  /* Estrin's scheme, as in exp_nonpos */
    const float e3 = x2 * (x * (1.0f / 6.0f) + 0.5f) + (x + 1.0f);
    if (degree == 3)
        return e3;
    const float x4 = x2 * x2, p45 = x * (1.0f / 120.0f) + 1.0f / 24.0f;
    if (degree == 6)
        return x4 * (x2 * (1.0f / 720.0f) + p45) + e3;
    const float p67 = x * (1.0f / 5040.0f) + 1.0f / 720.0f;
    const float p89 = x * (1.0f / 362880.0f) + 1.0f / 40320.0f;
    return x4 * ((x4 * p89 + x2 * p67) + p45) + e3;
}

/* The degree of exp_small() for an update sweep whose largest |x| is `reach`: 2 up to 0.0045
 * (e^x x^3 / 6 < 1.6e-8), 3 up to 0.025 (x^4 / 24 ... < 1.7e-8), 6 up to 0.25 (< 1.6e-8), else 9
 * (up to UPDATE_REACH). */
static inline int update_degree(double reach)
{
    return reach <= 0.0045 ? 2 : reach <= 0.025 ? 3 : reach <= 0.25 ? 6 : 9;
}

/* One evaluation at gamma.  The weights are e_i = exp(gamma d_i), d = z - m (1 at a maximum, 0 at
 * a -inf logit), from scratch, or (degree != 0: an update) from the previous sweep's, which p
 * holds times 1 / unscale: e_i = p_i * unscale * exp_small(step d_i, degree).  Writes
 * p_i = scale * e_i and returns in s the sums of e, e y, e v^2, e v^3 with y = gamma d and
 * v = kappa d, the first over the entries below the maximum only (the maxima enter the caller's
 * formulas through their count c, which keeps T = s[0] accurate when it is tiny next to c; they
 * add 0 to the others).  moments = 0 skips the last two (s[2] = s[3] = 0), which only steer;
 * neginf = 0 promises that no logit is -inf.  ahead, if not NULL, is the next row this thread
 * solves: the sweep asks for it to be brought into cache a chunk at a time (see solve_row).
 *
 * Sizes.  The mean's term e y is at most 1 / e wherever the logits lie (e = 0 where y < -88), so
 * its float sums cannot overflow, as sums of e d would under a mask at -1e37.  The steering terms
 * need a frame of their own: in units of d they overflow while a mask at -1e30 still weighs, in
 * units of y they underflow once gamma has silenced it (the flat top, Chapter 2, eq-en-quad),
 * where the step needs them.  kappa (a power of two) is 1 / R, R the row's range, or, on rows of
 * several scales, the reciprocal of the largest |d| that can still weigh at gamma (see
 * steering_frame()): then e v^2 and e v^3 are at most of order 1. */
static inline void sweep(const float *z, float *p, int64_t n, float m, float gamma, float step,
                         float dcut, float unscale, float scale, float kappa, int degree,
                         int neginf, int moments, const float *ahead, double s[4])
{
    double T = 0.0, A1 = 0.0, A2 = 0.0, A3 = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        float t = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : t, a1, a2, a3)
        for (int64_t i = i0; i < i1; ++i) {
            const float d = z[i] - m;                    /* 0 at a maximum, -inf at -inf */
            const float dl = !neginf || d > -INFINITY ? d : 0.0f;  /* finite: no 0 * inf */
            /* d clamped at dcut, below which the weight is exactly 0: -88 / gamma_prev for an
             * update (exp_nonpos flushed it), -128 / gamma otherwise.  The clamp keeps an
             * update's |x| within the reach update_degree() was chosen for, and y and v finite
             * (a masked logit at -1e30 cannot make 0 * inf = NaN). */
            const float dc = dl > dcut ? dl : dcut, x = step * dc, y = gamma * dc, v = kappa * dc;
            const float e = degree ? p[i] * unscale * exp_small(x, degree)
                                   : exp_nonpos(neginf ? gamma * d : y);  /* 0 at -inf */
            p[i] = moments ? e : e * scale;              /* scale is 1 when moments are asked */
            const float ey = e * y, ev = e * v, evv = ev * v;
            t += d < 0.0f ? e : 0.0f;
            a1 += ey;
            a2 += moments ? evv : 0.0f;
            a3 += moments ? evv * v : 0.0f;
        }
        T += t, A1 += a1, A2 += a2, A3 += a3;
#if defined(__GNUC__)
        if (ahead)  /* one request per 64-byte line, into L2 (locality 2) */
            for (int64_t i = i0; i < i1; i += 64 / sizeof(float))
                __builtin_prefetch(ahead + i, 0, 2);
#endif
    }
    s[0] = T, s[1] = A1, s[2] = A2, s[3] = A3;
}

/* The sketch: a start for the first full sweep from an eighth of the row.
 *
 * The Taylor start from gamma = 0 lands 20-40% from the root on Gaussian-like rows, two full
 * exponential sweeps from the end.  The sums of sweep() are sums over the row, and a sample
 * estimates them: the sketch holds the row's upper tail exactly (every d >= -tau, about
 * SKETCH_TAIL entries) and a 1 / SKETCH_STRIDE sample of the rest, each entry standing for an
 * equal share of the live entries below the tail (about SKETCH_STRIDE).  The sample is
 * SKETCH_RUN consecutive entries of each CHUNK, at an offset that varies from chunk to chunk,
 * copied by the first pass; its counts above R / 2^j, j = 1..4 (R the row's range), estimate the
 * row's, and tau is the widest whose estimate is at most SKETCH_TAIL.  Halley on the sketch's H
 * lands within ~0.3% of the row's root on Gaussian-like rows, close enough that the step after
 * the first full sweep is an update.  The sketch only proposes where to start: the bracket and
 * every accepted step still come from full sweeps, so a poor sketch costs sweeps, never the
 * entropy's accuracy.  (Near the top of the range, where H is flat, it could cost gamma's, so it
 * is not used there: see solve_row.) */
#define SKETCH_MIN_N 8192
#define SKETCH_TAIL 2048
#define SKETCH_STRIDE 16
#define SKETCH_RUN (CHUNK / SKETCH_STRIDE)
/* Halley steps on the sketch: the first lands within a few % of the sketch's root, the second
 * within ~1e-6 of it, well inside the sketch's own error; it is taken without a third look. */
#define SKETCH_EVALS 2

#if defined(__AVX2__) && defined(__GNUC__)
/* pack_table[mask]: the indices of mask's set bits, lowest first, one per byte. */
static uint64_t pack_table[256];
__attribute__((constructor)) static void fill_pack_table(void)
{
    for (int mask = 0; mask < 256; ++mask) {
        uint64_t packed = 0;
        for (int b = 0, j = 0; b < 8; ++b)
            if (mask >> b & 1)
                packed |= (uint64_t)b << (8 * j++);
        pack_table[mask] = packed;
    }
}
#endif

/* Writes to out the d = z - m of the entries z >= thr, in order, and returns how many, or -1 if
 * they would pass cap (out has room for cap + 8: the vector path stores eight at a time). */
static int64_t gather_tail(const float *z, int64_t n, float m, float thr, float *out, int64_t cap)
{
    int64_t k = 0, i = 0;
#if defined(__AVX2__) && defined(__GNUC__)
    /* Sixteen at a time; most groups hold no tail entry and cost two comparisons.  In the others
     * each comparison's bit mask picks, from a table, the permutation that packs the chosen lanes
     * first; all eight are stored and k advances by their number. */
    const __m256 vthr = _mm256_set1_ps(thr), vm = _mm256_set1_ps(m);
    for (; i + 16 <= n; i += 16) {
        const __m256 x = _mm256_loadu_ps(z + i), y = _mm256_loadu_ps(z + i + 8);
        const int mx = _mm256_movemask_ps(_mm256_cmp_ps(x, vthr, _CMP_GE_OQ));
        const int my = _mm256_movemask_ps(_mm256_cmp_ps(y, vthr, _CMP_GE_OQ));
        if (!(mx | my))
            continue;
        const __m256i px = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)pack_table[mx]));
        _mm256_storeu_ps(out + k, _mm256_permutevar8x32_ps(_mm256_sub_ps(x, vm), px));
        k += __builtin_popcount(mx);
        if (k > cap)
            return -1;
        const __m256i py = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)pack_table[my]));
        _mm256_storeu_ps(out + k, _mm256_permutevar8x32_ps(_mm256_sub_ps(y, vm), py));
        k += __builtin_popcount(my);
        if (k > cap)
            return -1;
    }
#endif
    for (; i < n; ++i) {
        out[k] = z[i] - m;
        k += z[i] >= thr;
        if (k > cap)
            return -1;
    }
    return k;
}

/* The sums of sweep() at gamma over the sketch: nt tail entries d (weight 1) and ns sample
 * entries z (-inf where the entry is in the tail, is -inf or lies past the row's end), each of the
 * others standing for `weight` entries of the row; scratch takes the weights sweep() writes. */
static void sketch_sums(const float *tail, int64_t nt, const float *sample, int64_t ns, float m,
                        double weight, float gamma, float kappa, float *scratch, double s[4])
{
    double st[4], ss[4];
    const float dcut = -128.0f / gamma;
    sweep(tail, scratch, nt, 0.0f, gamma, 0.0f, dcut, 1.0f, 1.0f, kappa, 0, 0, 1, NULL, st);
    sweep(sample, scratch, ns, m, gamma, 0.0f, dcut, 1.0f, 1.0f, kappa, 0, 1, 1, NULL, ss);
    for (int k = 0; k < 4; ++k)
        s[k] = st[k] + weight * ss[k];
}

/* The cumulants K2 = gamma^2 k2 and K3 = gamma^3 k3 of y = gamma d from a sweep's sums s at
 * gamma and kappa (s[2] = sum e v^2, s[3] = sum e v^3, v = kappa d), S = c + s[0] and the mean
 * nu = E_p[y]: the moments about the maximum, re-centred.  K3 only refines Halley's step: if
 * its sum overflowed (deep on a flat top), it is dropped. */
static void cumulants(const double s[4], double S, double nu, double gamma, double kappa,
                      double *K2, double *K3)
{
    const double g = gamma / kappa;
    const double M2 = g * g * s[2] / S, M3 = g * g * g * s[3] / S;  /* E_p[y^2], E_p[y^3] */
    *K2 = M2 - nu * nu;
    *K3 = isfinite(M3) ? M3 - 3.0 * nu * M2 + 2.0 * nu * nu * nu : 0.0;
}

/* A power of two near 1 / x, within float32's normal range. */
static float reciprocal_pow2(double x)
{
    int e;
    frexp(x, &e);
    return ldexpf(1.0f, e < -125 ? 125 : e > 126 ? -126 : -e);
}

/* Counts of the binary exponents of |d| below the maximum (hist[b]: |d| in [2^(b-127),
 * 2^(b-126)), the biased exponent b of float32), for steering_frame() on rows of several
 * scales.  A scalar loop, run once, on the rare row that needs it. */
static void exponent_histogram(const float *z, int64_t n, float m, int32_t hist[256])
{
    for (int b = 0; b < 256; ++b)
        hist[b] = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float d = z[i] - m;
        if (d < 0.0f && d > -INFINITY) {
            union { float f; uint32_t u; } bits = {d};
            ++hist[(bits.u >> 23) & 0xffu];
        }
    }
}

/* kappa of a sweep at gamma.  Without a histogram: 1 / R, which keeps every v in [-1, 0] and the
 * steering sums from overflowing, and resolves spreads down to about R / 2^40.  With one (once
 * the sums have found no spread in that frame: a mask at -1e30 silenced, the rest of the row on
 * the flat top): the reciprocal of the largest |d| that can still weigh at gamma, those with
 * gamma |d| <= 128 (beyond, exp(y) is 0 in float32). */
static float steering_frame(const int32_t *hist, double reach, double gamma)
{
    if (!hist)
        return reciprocal_pow2(reach);
    for (int b = 254; b >= 1; --b)
        if (hist[b] > 0 && ldexp(gamma, b - 127) <= 128.0)
            return reciprocal_pow2(ldexp(1.0, b - 126));
    return reciprocal_pow2(1.0 / gamma);  /* no entry can weigh: units of y */
}

/* The twin of halley_update() in entropy_normalization.py: one safeguarded step on G, carried as
 * a relative change of gamma (g1 = gamma G', g2 = gamma^2 G''); f_prev is the previous
 * evaluation's f (INFINITY at the first). */
static double halley_step(double gamma, double *lo, double *hi, double f, double r, double q,
                          double K2, double K3, double f_prev)
{
    if (f > 0.0)
        *lo = gamma;
    else if (f < 0.0)
        *hi = gamma;
    double next = NAN;
    if (r > 0.0 && K2 > 0.0) {
        const double g0 = log(r / q);
        const double g1 = -K2 / r;
        const double g2 = -(K2 + K3) / r - g1 * g1;
        const double den = 2.0 * g1 * g1 - g0 * g2;
        const double rel = den > 0.0 ? -2.0 * g0 * g1 / den : -g0 / g1;
        if (fabs(rel) <= 0x1p-50 && K2 < INFINITY)  /* below float64's resolution of gamma: settled */
            return gamma;
        next = gamma * (1.0 + rel);
    }
    if (f > 0.0 && isinf(*hi) && K2 > 0.0 && K2 < 0.25 * f) {
        const double quad = gamma * sqrt(1.0 + 2.0 * f / K2);  /* the flat top: eq-en-quad */
        if (!(next >= quad))
            next = quad;
    }
    /* A closed bracket and a step that did not halve |f|: a flat stretch, bisect. */
    const int stall = *lo > 0.0 && isfinite(*hi) && fabs(f) > 0.5 * fabs(f_prev);
    /* (r > 0 and K2 > 0 again: no step at all, the flat top's included, from a lost spread) */
    if (isfinite(next) && *lo < next && next < *hi && !stall && r > 0.0 && K2 > 0.0)
        return next;
    if (isinf(*hi))
        return 4.0 * gamma;
    return *lo > 0.0 ? sqrt(*lo) * sqrt(*hi) : 0.5 * *hi;
}

/* Whether a float32 sweep at gamma is exact to rounding: gamma a normal float32, not near the
 * ends (the caller solves a row that leaves this range in float64). */
static int in_range(double gamma)
{
    return gamma >= 0x1p-125 && gamma <= 0x1p125;
}

/* 1 if this build runs the rows of one call on OpenMP threads (entropy_normalization.py links
 * it to the OpenMP runtime torch already loaded), 0 if the caller must split them itself. */
int entmath_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The first pass over a row: its max m, its lowest finite entry, whether it holds a NaN, how many
 * entries are not -inf, and the sums of y and y^2 over those, y = z - z0; and, if sample is not
 * NULL, the sketch's sample (SKETCH_RUN entries per chunk, -inf past the row's end).  A function
 * of its own (not inlined): inside solve_row GCC 12 vectorises this loop less well, at twice the
 * cost. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void scan_row(const float *zr, int64_t n, float z0, float *sample, float *m_out,
                     float *lowest_out, int *nan_out, double *live_out, double *s1_out,
                     double *s2_out)
{
    float m = -INFINITY, lowest = INFINITY;
    int nan = 0;
    double live = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        if (sample) {  /* the sketch's sample: one run of SKETCH_RUN in each chunk (see below) */
            const int64_t b = i0 / CHUNK, start = i0 + ((b * 7 + 3) % SKETCH_STRIDE) * SKETCH_RUN;
            for (int64_t k = 0; k < SKETCH_RUN; ++k)
                sample[b * SKETCH_RUN + k] = start + k < i1 ? zr[start + k] : -INFINITY;
        }
        float l = 0.0f, a1 = 0.0f, a2 = 0.0f;
#pragma omp simd reduction(max : m) reduction(min : lowest) reduction(| : nan) \
    reduction(+ : l, a1, a2)
        for (int64_t i = i0; i < i1; ++i) {
            const float x = zr[i];
            const int live_x = x > -INFINITY;
            const float y = live_x ? x - z0 : 0.0f;
            m = x > m ? x : m;
            lowest = live_x && x < lowest ? x : lowest;
            nan |= x != x;
            l += live_x ? 1.0f : 0.0f;
            a1 += y;
            a2 += y * y;
        }
        live += l, s1 += a1, s2 += a2;
    }
    *m_out = m, *lowest_out = lowest, *nan_out = nan, *live_out = live, *s1_out = s1, *s2_out = s2;
}

/* The sums of y and y^2 over the live entries, y = z - z0, in double: for a row whose float
 * partial sums in scan_row() overflowed (logits masked at a large finite value, say -1e30). */
static void rescan_moments(const float *zr, int64_t n, float z0, double *s1, double *s2)
{
    double a1 = 0.0, a2 = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double y = zr[i] > -INFINITY ? (double)zr[i] - (double)z0 : 0.0;
        a1 += y, a2 += y * y;
    }
    *s1 = a1, *s2 = a2;
}

/* One row: zr, pr its logits and output, res its first result (res[k * rows]: the k-th). */
static void solve_row(const float *zr, float *pr, int64_t n, double target, double *res,
                      int64_t rows, int64_t max_evals, double ftol_ulps, const float *next)
{
    const double eps = FLT_EPSILON;
    /* The one read from memory: max, support size, extent and moments of z (and a NaN). */
    const float z0 = isfinite(zr[0]) ? zr[0] : 0.0f;  /* a shift for the moments */
    float m, lowest;
    int nan;
    double live, s1, s2;
    /* pr holds the sketch until the sweeps overwrite it: the sample at its end, the tail at its
     * start, a scratch for sketch_sums() between. */
    const int sketch = n >= SKETCH_MIN_N && max_evals > 1;
    const int64_t ns = (n + CHUNK - 1) / CHUNK * SKETCH_RUN;
    float *sample = sketch ? pr + n - ns : NULL;
    scan_row(zr, n, z0, sample, &m, &lowest, &nan, &live, &s1, &s2);
    if (live == 0.0)  /* no finite logit (a reduction may start max at -FLT_MAX, not -inf) */
        m = -INFINITY;
    res[0] = 0.0, res[rows] = 0.0, res[2 * rows] = 0.0, res[3 * rows] = nan ? NAN : m;
    if (nan || !isfinite(m))
        return;
    if ((double)m - (double)lowest > 0.25 * FLT_MAX) {
        res[2 * rows] = -1.0;  /* d = z - m could overflow: declined, the caller solves it */
        return;
    }
    if (!(isfinite(s1) && isfinite(s2)))
        rescan_moments(zr, n, z0, &s1, &s2);
    const int neginf = live < (double)n;
    const double reach = (double)m - (double)lowest; /* max |d| over the support */
    float c32 = 0.0f;  /* the maxima (exact: n < 2^24 is checked by the caller) */
#pragma omp simd reduction(+ : c32)
    for (int64_t i = 0; i < n; ++i)
        c32 += zr[i] == m ? 1.0f : 0.0f;
    const double c = c32, h_max = log(live), h_min = log(c);
    const double shift = (double)z0 - (double)m;   /* d = (z - z0) + shift */
    double mean = s1 / live + shift;
    if (target >= h_max || target <= h_min) {       /* the edges: gamma = 0 or gamma = inf */
        const int top = !(target >= h_max);
        const float w = (float)(top ? 1.0 / c : 1.0 / live);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
            pr[i] = (top ? zr[i] == m : zr[i] > -INFINITY) ? w : 0.0f;
        res[0] = top ? INFINITY : 0.0, res[rows] = top ? 0.0 : mean;
        return;
    }
    /* The floor 2^-126 (FTOL_FLOOR of entropy_normalization.py for float sums): a target so small
     * that H - log c near it is below float32's normal range cannot be met relatively. */
    const double q = target - h_min, ftol = ftol_ulps * eps * target + 0x1p-126;
    const double var_0 = s2 / live - (s1 / live) * (s1 / live);
    double gamma = var_0 > 0.0 ? sqrt(2.0 * (h_max - target) / var_0) : 1.0;
    if (!(isfinite(gamma) && gamma > 0.0))
        gamma = 1.0;
    /* The floor of the bracket: half of sqrt(8 (log|S| - t)) / R (eq-en-floor, bracket_floor()). */
    double lo = reach > 0.0 && isfinite(reach) ? 0.5 * sqrt(8.0 * (h_max - target)) / reach : 0.0;
    gamma = fmax(gamma, lo);
    double hi = INFINITY, S = 1.0, s[4];
    /* Near the top of the range (t within 1/2 nat of log|S|, gamma_0^2 var_0 < 1) the Taylor start
     * is already close, and H is so flat in gamma there that a sketch's error could pass the
     * entropy test and stand (gamma, and with it the gradient, would be off): no sketch. */
    if (sketch && h_max - target >= 0.5 && reach > 0.0 && isfinite(reach)) {
        float thr = INFINITY;
        for (int j = 1; j <= 4 && !(thr < INFINITY); ++j) {  /* tau = R / 2^j, widest first */
            const float t_j = (float)(m - reach / (double)(1 << j));
            float count = 0.0f;
#pragma omp simd reduction(+ : count)
            for (int64_t i = 0; i < ns; ++i)
                count += sample[i] >= t_j ? 1.0f : 0.0f;
            if (count * SKETCH_STRIDE <= SKETCH_TAIL)
                thr = t_j;
        }
        float *scratch = pr + n / 2;
        const int64_t nt = thr < INFINITY ? gather_tail(zr, n, m, thr, pr, n / 2 - ns - 8) : -1;
        if (nt >= 0) {
            float kept = 0.0f;  /* sample entries below the tail (the tail's are in it already) */
#pragma omp simd reduction(+ : kept)
            for (int64_t i = 0; i < ns; ++i) {
                sample[i] = sample[i] >= thr ? -INFINITY : sample[i];
                kept += sample[i] > -INFINITY ? 1.0f : 0.0f;
            }
            /* Each kept entry stands for an equal share of the live entries below the tail, so
             * that the sketch has the row's count (and at gamma = 0 its entropy, log|S|). */
            const double weight = kept > 0.0f ? (live - (double)nt) / kept : 0.0;
            double g = gamma, slo = lo, shi = INFINITY, ss[4];
            const float kappa = steering_frame(NULL, reach, 0.0);
            for (int k = 0; k < SKETCH_EVALS && in_range(g); ++k) {
                const float g32 = (float)g;
                sketch_sums(pr, nt, sample, ns, m, weight, g32, kappa, scratch, ss);
                const double St = c + ss[0], nu = ss[1] / St;
                const double r = log1p(ss[0] / c) - nu;
                double K2s, K3s;
                cumulants(ss, St, nu, g32, kappa, &K2s, &K3s);
                if (!(K2s > 0.0 && K2s < INFINITY))
                    break;  /* no spread in the frame: keep the start so far */
                g = halley_step(g32, &slo, &shi, r - q, r, q, K2s, K3s, INFINITY);
            }
            if (isfinite(g) && g > lo)
                gamma = g;
        }
    }
    /* k2, k3: the cumulants of d (not of y = gamma d) at the last sweep that took them, so that a
     * sweep that skipped them can reuse them at its own gamma. */
    double prev = 0.0, log_S = 0.0, k2 = 0.0, k3 = 0.0, scale = 1.0;
    int32_t hist_store[256], *hist = NULL;  /* see steering_frame() */
    int64_t evals = 0;
    double f_prev = INFINITY;  /* the previous evaluation's H - t */
    while (evals < max_evals) {
        if (!in_range(gamma)) {  /* a root out of float32's reach: the caller's float64 */
            res[2 * rows] = -1.0 - (double)evals;
            return;
        }
        gamma = (double)(float)gamma;  /* the gamma the float sweep uses */
        if (evals > 0 && gamma == prev)                  /* float32 cannot get closer */
            break;
        /* The first sweep also fetches the thread's next row into L2, while this row's
         * arithmetic leaves the memory bus idle: the next row's first read then comes from cache,
         * not from memory at the rate of a stream that starts cold (about twice as fast here). */
        const float *ahead = evals == 0 ? next : NULL;
        const double h = gamma - prev;
        /* Weights below exp(-88) were stored as 0, so only |d| <= 88 / prev counts. */
        const double dmin = -88.0 / prev, step_reach = fabs(h) * fmin(reach, -dmin);
        const int degree = evals > 0 && step_reach <= UPDATE_REACH ? update_degree(step_reach) : 0;
        const double unscale = 1.0 / scale;
        scale = 1.0;
        if (evals > 0 && fabs(h) <= PREDICT_STEP * gamma)  /* expected last: normalise now */
            scale = exp(-(log_S + h * (mean + h * (k2 / 2.0 + h * k3 / 6.0))));
        if (!(scale > 0.0 && scale < INFINITY))          /* float32 moments overflowed */
            scale = 1.0;
        /* An expected-last sweep skips the moments that only steer: if it misses, the next
         * step reuses the previous sweep's, which a tiny step barely changes. */
        const int moments = scale == 1.0;
        /* Constant arguments at each call site: each inlined copy does only its own work. */
        const float g32 = (float)gamma, h32 = (float)h, u32 = (float)unscale, s32 = (float)scale;
        const float dcut = (float)fmax(degree ? dmin : -128.0 / gamma, -FLT_MAX);
        const float kappa = steering_frame(hist, reach, gamma);
#define SWEEP(deg, ni, mo) sweep(zr, pr, n, m, g32, h32, dcut, u32, s32, kappa, deg, ni, mo, ahead, s)
#define SWEEPS(deg)                                                                           \
    if (neginf)                                                                               \
        moments ? SWEEP(deg, 1, 1) : SWEEP(deg, 1, 0);                                        \
    else                                                                                      \
        moments ? SWEEP(deg, 0, 1) : SWEEP(deg, 0, 0);
        switch (degree) {
        case 0: SWEEPS(0); break;
        case 2: SWEEPS(2); break;
        case 3: SWEEPS(3); break;
        case 6: SWEEPS(6); break;
        default: SWEEPS(9); break;
        }
#undef SWEEPS
#undef SWEEP
        ++evals;
        prev = gamma;
        S = c + s[0];
        const double nu = s[1] / S;                      /* E_p[gamma d] */
        mean = nu / gamma;
        const double r = log1p(s[0] / c) - nu;           /* H - log c: two terms >= 0 */
        const double f = r - q;
        if (fabs(f) <= ftol || hi - lo <= 2.0 * eps * gamma)
            break;
        /* The cumulants of y at this gamma: this sweep's, or the last sweep's k2, k3 rescaled
         * (an expected-last sweep skips them: if it misses, a tiny step barely changes them). */
        double K2 = gamma * gamma * k2, K3 = gamma * gamma * gamma * k3;
        if (moments) {
            cumulants(s, S, nu, gamma, kappa, &K2, &K3);
            if (K2 > 0.0 && K2 < INFINITY) {
                k2 = K2 / (gamma * gamma), k3 = K3 / (gamma * gamma * gamma);
            } else if (!hist) {
                /* No spread in this frame: the weight lies on a scale far below R (a mask at
                 * -1e30 silenced, the rest of the row on the flat top).  The next sweeps take
                 * their frame from the exponents of d; this step bisects (K2 is not > 0). */
                hist = hist_store;
                exponent_histogram(zr, n, m, hist);
            } else {  /* none in that frame either: the float64 path, whose sums hold every
                       * scale of a float row, takes the row */
                res[2 * rows] = -1.0 - (double)evals;
                return;
            }
        }
        log_S = log(S);
        gamma = halley_step(gamma, &lo, &hi, f, r, q, K2, K3, f_prev);
        f_prev = f;
    }
    const double total = S * scale;                  /* sum of p as written */
    if (fabs(total - 1.0) > 2.0 * eps) {             /* not normalised yet, or mispredicted */
        const float fix = (float)(1.0 / total);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
            pr[i] *= fix;
    }
    res[0] = prev, res[rows] = mean, res[2 * rows] = (double)evals;
}

/* Solve rows [r0, r1) of z (rows x n, contiguous float32) for the targets t (nats), on up to
 * `threads` OpenMP threads if the build has OpenMP (a row is never split).  Writes p and,
 * per row, out[0 * rows + row] = gamma (0: uniform on the support; inf: uniform on the arg-max
 * set), out[1 * rows + row] = E_p[z] - max z, out[2 * rows + row] = sweeps taken, and
 * out[3 * rows + row] = max z coded for validity: NaN if the row holds a NaN, +inf if it holds
 * +inf, -inf if it has no finite logit (p is then left unwritten).  A row the kernel declines,
 * for the caller's float64 path, has sweeps = -1 - (the sweeps it took) and p not final: logits
 * that span more than FLT_MAX / 4, a gamma that leaves float32's range (a root near 1e-38 or
 * beyond 1e38), or steering sums that found no spread in their frame (see frame()). */
/* Rows per unit of work for the OpenMP threads. */
#define ROW_RUN 8

void entmath_entropy_normalize_rows(const float *z, float *p, int64_t rows, int64_t n,
                                    int64_t r0, int64_t r1, const double *t, double *out,
                                    int64_t max_evals, double ftol_ulps, int64_t threads)
{
    max_evals = max_evals < 1 ? 1 : max_evals;           /* p is written by the sweeps */
#ifdef _OPENMP
    if (threads > 1) {  /* one thread never enters the OpenMP runtime (safe after a fork) */
        /* Runs of ROW_RUN rows, handed out as threads free up: a thread slowed by another
         * process on its core does not hold the others up, and within a run each row's first
         * sweep prefetches the next. */
        const int64_t runs = (r1 - r0 + ROW_RUN - 1) / ROW_RUN;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t k = 0; k < runs; ++k) {
            const int64_t a = r0 + k * ROW_RUN, b = a + ROW_RUN < r1 ? a + ROW_RUN : r1;
            for (int64_t row = a; row < b; ++row)
                solve_row(z + row * n, p + row * n, n, t[row], out + row, rows, max_evals,
                          ftol_ulps, row + 1 < b ? z + (row + 1) * n : NULL);
        }
        return;
    }
#endif
    (void)threads;
    for (int64_t row = r0; row < r1; ++row)
        solve_row(z + row * n, p + row * n, n, t[row], out + row, rows, max_evals, ftol_ulps,
                  row + 1 < r1 ? z + (row + 1) * n : NULL);
}

/* The exponentials on an array, for the tests: which = 0 gives exp_nonpos (x <= 0), which = 2, 3,
 * 6 or 9 gives exp_small of that degree. */
void entmath_exp_kernels(const float *x, float *out, int64_t n, int64_t which)
{
    for (int64_t i = 0; i < n; ++i)
        out[i] = which ? exp_small(x[i], (int)which) : exp_nonpos(x[i]);
}

/* halley_step() on n rows of inputs, for the test that holds it to its twins: in[9 k .. 9 k + 8]
 * = (gamma, lo, hi, f, r, q, K2, K3, f_prev), out[3 k .. 3 k + 2] = (next gamma, lo, hi). */
void entmath_halley_steps(const double *in, double *out, int64_t n)
{
    for (int64_t k = 0; k < n; ++k) {
        const double *a = in + 9 * k;
        double lo = a[1], hi = a[2];
        const double next = halley_step(a[0], &lo, &hi, a[3], a[4], a[5], a[6], a[7], a[8]);
        out[3 * k] = next, out[3 * k + 1] = lo, out[3 * k + 2] = hi;
    }
}
