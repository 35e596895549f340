"""Triton kernels for ``entmath.noise_softmax`` (Chapter 4): one program per row.

Nodes in groups, no padding.  The row's K quadrature nodes are processed NB at a time (NB = 8, a
power of two that divides the default K of every family), as [NB, BLOCK] tiles x_kj = t_k - mu_j
with the row read in BLOCK-wide chunks.  Only a K that is not a multiple of NB pays for padding
(fewer than NB nodes).  Each group's Newton iteration stops when *its* nodes have converged, so a
fast group does not keep paying for a slow one.

Forward: a safeguarded Newton iteration puts each group's nodes at F(t_k) = u_k; each step is one
pass over the row that sums -log Phi(x_kj) and S_k = sum_j r(x_kj).  For the normal and logistic
families r is computed directly (r <= 8 for any node inside its bracket, and the largest term,
the row maximum's, stays above 1e-22 for rows of up to 2^31 logits, so the sum neither overflows
nor loses its leading terms, in fp32 as in fp64); the Cauchy family's r spans more than fp32's
range at the extreme nodes, so it keeps log r and an online log-sum-exp.  The nodes t and
log S (rows, K) are written out; a last pass re-reads them, group by group, and writes
p_j = sum_k omega_k r(x_kj) / S_k.

Backward: one pass per group for the per-node reductions G1, G2, A of the implicit-function
gradient (written to a (rows, 3, K) scratch), then one pass that writes the gradient.

HBM passes per row (n logits): forward, sum over groups of E_g reads (Newton evaluations; at
128256 fp32 logits 4-6 per group for normal noise, 2-4 logistic, 1-3 Cauchy), plus one read and
one write; backward, (K / NB + 1) reads of z and of the incoming gradient, one write.  The
kernels are compute-bound by far: a pass costs NB x 30-100 instructions per logit (fp32; the
compile check counts them), where an H100 issues about 10 instructions per byte of HBM bandwidth,
so the pair count, not the traffic, sets their time (performance appendix).

Triton has no log Phi for the normal: we evaluate erfcx(z) = exp(z^2) erfc(z), z >= 0, with a
Chebyshev series of (1 + 2z) erfcx(z) in y = (z - 3.75) / (z + 3.75) (the form of Shepherd and
Laframboise, 1981): degree 24 in fp64 (relative error < 5e-18) and degree 12 in fp32 (< 6e-9,
below fp32's rounding), both by Chebyshev interpolation in mpmath at 50 digits, converted to
monomial form in mpmath (coefficient sums 1.8: Horner's rule loses only a few ulp;
tests/test_noise_softmax.py checks log Phi, log r and d log r/dx of the kernel against mpmath in
both precisions).  Then, with e = erfcx(|x|/sqrt 2) and v = e exp(-x^2/2) / 2 = Phi(-|x|), one
logarithm serves both sides: x < 0: log Phi = log(e/2) - x^2/2, r = sqrt(2/pi) / e;  x >= 0:
log Phi = log1p(-v), r = phi(x) / (1 - v); no exp(-x^2/2) / exp(-x^2/2) cancellation.  The Cauchy
CDF needs atan, also absent: a degree-9 polynomial in s^2 on [0, tan(pi/12)] after the reduction
atan(s) = pi/6 + atan((s sqrt3 - 1)/(s + sqrt3)).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .softmax_stats import log1p

# Family codes: constexpr so that jit functions may read them (and branch at compile time).
NORMAL, LOGISTIC, CAUCHY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FAMILY_ID = {"normal": 0, "logistic": 1, "cauchy": 2}
NB = 8  # nodes per group
TILE = 512  # elements of one [NB, BLOCK] tile: BLOCK = 64 logits at NB = 8 (more spills)
_PI = tl.constexpr(3.141592653589793)
_LOG_PI = tl.constexpr(1.1447298858494002)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_LOG_SQRT_2PI = tl.constexpr(0.9189385332046727)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_LN2 = tl.constexpr(0.6931471805599453)
_HALF_LOG_2_OVER_PI = tl.constexpr(-0.22579135264472744)
_SQRT3 = tl.constexpr(1.7320508075688772)
_TAN_PI_12 = tl.constexpr(0.2679491924311227)


@triton.jit
def erfcx_pos(z, ACC: tl.constexpr):
    """exp(z^2) erfc(z) for z >= 0 (finite, < 1e4): degree 24 in fp64, degree 12 in fp32.  One
    division serves both quotients: y = (z - 3.75) q (1 + 2z) and e = P(y) q (z + 3.75) with
    q = 1 / ((z + 3.75)(1 + 2z)) (the product stays below 2e8)."""
    d1 = z + 3.75
    d2 = 1.0 + 2.0 * z
    q = 1.0 / (d1 * d2)
    y = (z - 3.75) * (q * d2)
    if ACC == tl.float64:
        p = 4.2514714447963898e-10
        p = p * y + 3.1114333809799252e-10
        p = p * y - 5.1739902140113096e-9
        p = p * y - 3.7442100809620186e-9
        p = p * y + 3.8675334242222357e-8
        p = p * y + 2.3263508708859124e-8
        p = p * y - 2.5866850716155885e-7
        p = p * y - 5.7218230603224088e-8
        p = p * y + 1.7516376488490621e-6
        p = p * y - 9.7355989673677493e-7
        p = p * y - 1.1444146237700523e-5
        p = p * y + 2.238423915508223e-5
        p = p * y + 5.1649098892682403e-5
        p = p * y - 2.9015408054084171e-4
        p = p * y + 2.9371366559134482e-4
        p = p * y + 1.7556258528952954e-3
        p = p * y - 9.7465795580292755e-3
        p = p * y + 2.8362277418956404e-2
        p = p * y - 5.8693398589636774e-2
        p = p * y + 9.2304321160377478e-2
        p = p * y - 1.0880393014174886e-1
        p = p * y + 8.2276738490145208e-2
        p = p * y + 3.5854154854644294e-3
        p = p * y - 1.4024059858554696e-1
        p = p * y + 1.2375126308378276
    else:
        p = 2.3634820068462686e-05
        p = p * y - 2.2405204951954954e-04
        p = p * y + 3.253884645535187e-04
        p = p * y + 1.6757342508064283e-03
        p = p * y - 9.764690497787632e-03
        p = p * y + 2.840943039147911e-02
        p = p * y - 5.868825204940161e-02
        p = p * y + 9.229069167207876e-02
        p = p * y - 1.0880456454860984e-01
        p = p * y + 8.227843390475284e-02
        p = p * y + 3.585438016476337e-03
        p = p * y - 1.4024065901788993e-01
        p = p * y + 1.2375126308378275
    return p * (q * d1)


@triton.jit
def atan_unit(s):
    """atan(s) for 0 <= s <= 1."""
    big = s > _TAN_PI_12
    v = tl.where(big, (s * _SQRT3 - 1.0) / (s + _SQRT3), s)
    w = v * v
    q = -0.038356423529657398
    q = q * w + 0.056779120848698237
    q = q * w - 0.066499383368271782
    q = q * w + 0.076914699007263421
    q = q * w - 0.090908829562115287
    q = q * w + 0.11111110612993444
    q = q * w - 0.14285714280248971
    q = q * w + 0.19999999999969503
    q = q * w - 0.33333333333333267
    q = q * w + 1.0
    return tl.where(big, _PI / 6 + v * q, v * q)


@triton.jit
def family(x, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """(log Phi(x), r(x), log r(x)) of the standard noise family, r = phi / Phi.  x = +inf gives
    (0, 0, -inf) exactly.  Each caller uses what it needs; the compiler drops the rest (the normal
    and logistic kernels never compute log r, the Cauchy ones never r)."""
    if FAMILY == NORMAL:
        xc = tl.minimum(tl.abs(x), 1e4)  # beyond 1e4 the tail is 0 anyway; keeps erfcx's y finite
        half_sq = 0.5 * xc * xc  # x^2/2 with one rounding (not (|x|/sqrt 2)^2 with three)
        e = erfcx_pos(xc * _SQRT_HALF, ACC)
        g = tl.exp(-half_sq)
        v = 0.5 * e * g  # Phi(-|x|)
        u = 1.0 - v  # Phi(|x|)
        left = x < 0
        lg = tl.log(tl.where(left, 0.5 * e, u))  # one log for both sides
        # log1p(-v) = log(u) * (-v) / (u - 1) (Goldberg's form, as softmax_stats.log1p), and
        # r = num / den: one division for both, 1 / (q1 q2) with q1 q2 in [5e-12, 0.7].
        q1 = tl.where(u == 1.0, -1.0, u - 1.0)
        q2 = tl.where(left, e, u)
        inv = 1.0 / (q1 * q2)
        log_right = tl.where(u == 1.0, -v, lg * (-v) * (inv * q2))
        log_cdf = tl.where(left, lg - half_sq, log_right)
        r = tl.where(left, _SQRT_2_OVER_PI, _INV_SQRT_2PI * g) * (inv * q1)
        log_rh = tl.where(left, _HALF_LOG_2_OVER_PI - (lg + _LN2), -0.5 * x * x - _LOG_SQRT_2PI - log_right)
    elif FAMILY == LOGISTIC:
        # log sigmoid(+-x) = -(max(-+x, 0) + log1p(e^{-|x|})): no cancellation on either side.
        big = tl.exp(-tl.abs(x))
        tail = log1p(big)
        log_cdf = -(tl.maximum(-x, 0.0) + tail)
        log_rh = -(tl.maximum(x, 0.0) + tail)  # r = phi / Phi = 1 - sigmoid(x) = sigmoid(-x)
        r = tl.where(x >= 0, big, 1.0) / (1.0 + big)
    else:
        ax = tl.abs(x)
        big = ax > 1.0
        s = tl.where(big, 1.0 / ax, ax)
        at = atan_unit(s)
        q = tl.where(big, at, _PI / 2 - at) / _PI  # atan(1/|x|) / pi: the smaller tail
        log_cdf = tl.where(x < 0, tl.log(q), log1p(-q))
        log1p_sq = tl.where(big, 2.0 * tl.log(ax) + log1p(s * s), log1p(x * x))
        log_rh = -_LOG_PI - log1p_sq - log_cdf
        r = tl.exp(log_rh)
    return log_cdf, r, log_rh


@triton.jit
def dlog_rh(x, r, FAMILY: tl.constexpr):
    """c = d log r / dx (finite where r > 0)."""
    if FAMILY == NORMAL:
        c = -x - r
    elif FAMILY == LOGISTIC:
        c = r - 1.0  # -sigmoid(x) = sigmoid(-x) - 1
        small = tl.exp(-tl.abs(x))
        c = tl.where(x < 0, -small / (1.0 + small), c)  # keeps the relative accuracy of a tiny sigmoid(x)
    else:
        ax = tl.abs(x)
        c = -2.0 * x / (1.0 + x * x) - r
        c = tl.where(ax > 1.0, -2.0 / (x + 1.0 / x) - r, c)  # 2x/(1+x^2) without overflow
    return c


@triton.jit
def node_sums(z_row, n_cols, t, FAMILY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """-log F(t_k) and log S(t_k) for a group of nodes: one pass over the row."""
    cols = tl.arange(0, BLOCK)
    # Sums are kept elementwise over the [NB, BLOCK] tile and reduced once after the loop: a
    # reduction along the chunk per iteration costs shuffles and a barrier every time.
    y = tl.zeros([t.shape[0], BLOCK], ACC)
    s = tl.zeros([t.shape[0], BLOCK], ACC)
    m = tl.full(t.shape, float("-inf"), ACC)
    s_node = tl.zeros_like(t)
    for start in range(0, n_cols, BLOCK):
        # Padding loads -inf: x = +inf, which adds 0 to -log F and r = 0 to S, like a -inf logit.
        mu = tl.load(z_row + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(ACC)
        log_cdf, r, log_rh = family(t[:, None] - mu[None, :], FAMILY, ACC)
        y -= log_cdf
        if FAMILY == CAUCHY:
            # online log-sum-exp over the chunks: r itself under/overflows fp32 at extreme nodes
            m_new = tl.maximum(m, tl.max(log_rh, axis=1))
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            s_node = s_node * tl.exp(m - m_ref) + tl.sum(tl.exp(log_rh - m_ref[:, None]), axis=1)
            m = m_new
        else:
            s += r
    if FAMILY == CAUCHY:
        log_s = m + tl.log(s_node)
    else:
        log_s = tl.log(tl.sum(s, axis=1))
    return tl.sum(y, axis=1), log_s


@triton.jit
def weights(x, log_s, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """w_kj = r(x_kj) / S_k on a [NB, BLOCK] tile, and r itself."""
    _, r, log_rh = family(x, FAMILY, ACC)
    if FAMILY == CAUCHY:
        w = tl.exp(log_rh - log_s[:, None])
    else:
        w = r * tl.exp(-log_s)[:, None]
    return w, r


@triton.jit
def noise_softmax_fwd_kernel(z_ptr, p_ptr, t_ptr, ls_ptr, m_ptr, y_ptr, w_ptr, xlo_ptr, xhi_ptr,
                             n_cols, stride_z, stride_p, K, max_iter, n_free, tol_step, tol_stall,
                             FAMILY: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = tl.load(m_ptr + row).to(ACC)
    for g0 in range(0, K, NB):
        kk = g0 + tl.arange(0, NB)
        on = kk < K  # padding nodes (only when NB does not divide K): y = 1, bracket [m, m], weight 0
        y = tl.load(y_ptr + kk, mask=on, other=1.0).to(ACC)
        lo = m + tl.load(xlo_ptr + kk, mask=on, other=0.0).to(ACC)
        hi = m + tl.load(xhi_ptr + kk, mask=on, other=0.0).to(ACC)
        t = hi
        prev = tl.full([NB], float("inf"), ACC)
        dx_old = hi - lo
        log_s = tl.zeros([NB], ACC)
        it = 0
        go = it < max_iter
        # Safeguarded Newton on log(-log F(t)) = log y, the group's nodes at once, until all of
        # them have converged (as the torch path does for the whole row).
        while go:
            y_cur, log_s = node_sums(z_row, n_cols, t, FAMILY, BLOCK, ACC)
            right = y_cur <= y
            hi = tl.where(right, t, hi)
            lo = tl.where(right, lo, t)
            step = (tl.log(y_cur) - tl.log(y)) * y_cur * tl.exp(-log_s)
            # bisect when Newton leaves the bracket (or is NaN), or cycles (see ops.noise_softmax)
            shrinks = (it < n_free) | (tl.abs(step) <= 0.5 * dx_old) | (tl.abs(step) <= tol_stall * (1.0 + tl.abs(t)))
            ok = (t + step >= lo) & (t + step <= hi) & shrinks
            t_new = tl.where(ok, t + step, 0.5 * (lo + hi))
            dx_old = tl.abs(t_new - t)
            rel = dx_old / (1.0 + tl.abs(t))
            # converged: a rounding-level step, or a small step that no longer halves (Newton is
            # quadratic, so that is rounding noise in the sum -log F); padding nodes are done.
            done = (rel <= tol_step) | ((rel <= tol_stall) & (rel >= 0.5 * prev)) | (kk >= K)
            it += 1
            go = (tl.sum((~done).to(tl.int32), axis=0) > 0) & (it < max_iter)
            t = tl.where(go, t_new, t)  # on exit keep the t at which log S was evaluated
            prev = rel
        tl.store(t_ptr + row * K + kk, t, mask=on)
        tl.store(ls_ptr + row * K + kk, log_s, mask=on)
    tl.debug_barrier()  # the nodes just written are read back by other threads of the program
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        mu = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        p = tl.zeros([NB, BLOCK], ACC)  # summed over the nodes once, after the groups
        for g0 in range(0, K, NB):
            kk = g0 + tl.arange(0, NB)
            on = kk < K
            t = tl.load(t_ptr + row * K + kk, mask=on, other=0.0)
            log_s = tl.load(ls_ptr + row * K + kk, mask=on, other=0.0)
            w = tl.load(w_ptr + kk, mask=on, other=0.0).to(ACC)
            wk, _ = weights(t[:, None] - mu[None, :], log_s, FAMILY, ACC)
            p += tl.where(on[:, None], w[:, None] * wk, 0.0)
        tl.store(p_ptr + row * stride_p + start + cols, tl.sum(p, axis=0).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _node_terms(mu, t, log_s, FAMILY: tl.constexpr, ACC: tl.constexpr):
    """w_kj = r / S and a_kj = w_kj d log r / dx on a [NB, BLOCK] tile (a = 0 where w = 0)."""
    x = t[:, None] - mu[None, :]
    wj, r = weights(x, log_s, FAMILY, ACC)
    a = tl.where(wj > 0, wj * dlog_rh(x, r, FAMILY), 0.0)  # 0, not 0 * inf
    return wj, a


@triton.jit
def noise_softmax_bwd_kernel(z_ptr, g_ptr, gz_ptr, t_ptr, ls_ptr, w_ptr, red_ptr, n_cols, stride_z, stride_g,
                             stride_gz, K, FAMILY: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
                             ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    red = red_ptr + row * 3 * K
    # Pass 1, per group: G1 = sum g w, G2 = sum g a, A = sum a with a = w d(log r)/dx.
    for g0 in range(0, K, NB):
        kk = g0 + tl.arange(0, NB)
        on = kk < K
        t = tl.load(t_ptr + row * K + kk, mask=on, other=0.0)
        log_s = tl.load(ls_ptr + row * K + kk, mask=on, other=0.0)
        g1 = tl.zeros([NB, BLOCK], ACC)  # elementwise sums, reduced after the loop
        g2 = tl.zeros([NB, BLOCK], ACC)
        big_a = tl.zeros([NB, BLOCK], ACC)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            mu = tl.load(z_ptr + row * stride_z + start + cols, mask=mask, other=float("-inf")).to(ACC)
            g = tl.load(g_ptr + row * stride_g + start + cols, mask=mask, other=0.0).to(ACC)
            wj, a = _node_terms(mu, t, log_s, FAMILY, ACC)
            g1 += g[None, :] * wj
            g2 += g[None, :] * a
            big_a += a
        tl.store(red + kk, tl.sum(g1, axis=1), mask=on)
        tl.store(red + K + kk, tl.sum(g2, axis=1), mask=on)
        tl.store(red + 2 * K + kk, tl.sum(big_a, axis=1), mask=on)
    tl.debug_barrier()  # the reductions just written are read back by other threads of the program
    # Pass 2: dL/dmu_j = sum_k omega_k [a_kj (G1_k - g_j) + w_kj (G2_k - A_k G1_k)].
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        mu = tl.load(z_ptr + row * stride_z + start + cols, mask=mask, other=float("-inf")).to(ACC)
        g = tl.load(g_ptr + row * stride_g + start + cols, mask=mask, other=0.0).to(ACC)
        gz = tl.zeros([NB, BLOCK], ACC)  # summed over the nodes once, after the groups
        for g0 in range(0, K, NB):
            kk = g0 + tl.arange(0, NB)
            on = kk < K
            t = tl.load(t_ptr + row * K + kk, mask=on, other=0.0)
            log_s = tl.load(ls_ptr + row * K + kk, mask=on, other=0.0)
            w = tl.load(w_ptr + kk, mask=on, other=0.0).to(ACC)
            g1 = tl.load(red + kk, mask=on, other=0.0)
            g2 = tl.load(red + K + kk, mask=on, other=0.0)
            big_a = tl.load(red + 2 * K + kk, mask=on, other=0.0)
            wj, a = _node_terms(mu, t, log_s, FAMILY, ACC)
            term = a * (g1[:, None] - g[None, :]) + wj * (g2 - big_a * g1)[:, None]
            gz += tl.where(on[:, None], w[:, None] * term, 0.0)
        tl.store(gz_ptr + row * stride_gz + start + cols, tl.sum(gz, axis=0).to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def family_values_kernel(x_ptr, out_ptr, n, FAMILY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Elementwise (log Phi, log r, d log r/dx, r), for testing the helpers against mpmath."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    log_cdf, r, log_rh = family(x, FAMILY, ACC)
    tl.store(out_ptr + i, log_cdf, mask=mask)
    tl.store(out_ptr + n + i, log_rh, mask=mask)
    tl.store(out_ptr + 2 * n + i, dlog_rh(x, r, FAMILY), mask=mask)
    tl.store(out_ptr + 3 * n + i, r, mask=mask)


def noise_config(n: int, K: int) -> dict:
    """Node group NB, chunk BLOCK, warps and register budget of the noise_softmax kernels (what
    the launchers and tests/gpu_compile_check.py use).  maxnreg = 255, the most a thread may have:
    left to choose, ptxas spilled 8-24 bytes of the fp64 kernels at 64-80 registers."""
    nb = min(NB, triton.next_power_of_2(K))
    block = max(1, min(triton.next_power_of_2(n), TILE // nb))
    return dict(NB=nb, BLOCK=block, num_warps=4, maxnreg=255)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def noise_softmax_fwd(z2d, m, y, w, x_lo, x_hi, noise: str, max_iter: int, n_free: int, tol_step: float,
                      tol_stall: float):
    """z2d: (rows, n) fp32/fp64 with unit column stride; m: row maxima; (y, w, x_lo, x_hi): the K
    nodes (see ``ops.noise_softmax.node_brackets``).  Returns p (rows, n) and the nodes t and
    log S, each (rows, K) (what the backward takes)."""
    rows, n = z2d.shape
    K = y.numel()
    cfg = noise_config(n, K)
    p = torch.empty_like(z2d)
    t = torch.empty(rows, K, dtype=z2d.dtype, device=z2d.device)
    log_s = torch.empty_like(t)
    if rows:
        wrap_triton(noise_softmax_fwd_kernel)[(rows,)](
            z2d, p, t, log_s, m.contiguous(), y, w, x_lo, x_hi, n, z2d.stride(0), p.stride(0), K, max_iter,
            n_free, tol_step, tol_stall, FAMILY=FAMILY_ID[noise], NB=cfg["NB"], BLOCK=cfg["BLOCK"],
            ACC=_acc(z2d.dtype), num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return p, t, log_s


def noise_softmax_bwd(z2d, g2d, t, log_s, w, noise: str):
    """The gradient for mu given dL/dp (g2d) and the forward's nodes t, log S (rows, K)."""
    rows, n = z2d.shape
    K = w.numel()
    cfg = noise_config(n, K)
    gz = torch.empty_like(z2d)
    reductions = torch.empty(rows, 3, K, dtype=t.dtype, device=t.device)  # G1, G2, A per node
    if rows:
        wrap_triton(noise_softmax_bwd_kernel)[(rows,)](
            z2d, g2d, gz, t, log_s, w, reductions, n, z2d.stride(0), g2d.stride(0), gz.stride(0), K,
            FAMILY=FAMILY_ID[noise], NB=cfg["NB"], BLOCK=cfg["BLOCK"], ACC=_acc(z2d.dtype),
            num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return gz


def family_values(x: torch.Tensor, noise: str) -> torch.Tensor:
    """(4, n): log Phi(x), log r(x), d log r/dx, r(x) computed by the kernel helpers (for the tests)."""
    x = x.contiguous().view(-1)
    out = torch.empty(4, x.numel(), dtype=x.dtype, device=x.device)
    block = 1024
    wrap_triton(family_values_kernel)[(triton.cdiv(x.numel(), block),)](x, out.view(-1), x.numel(), FAMILY=FAMILY_ID[noise],
                                                            BLOCK=block, ACC=_acc(x.dtype))
    return out
