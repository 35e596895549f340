"""Triton kernels for ``entmath.entropy_normalize``: solve H(softmax(gamma z)) = t per row, write
softmax(gamma z).  Derived in Chapter 2 (book/ch02_entropy_normalization.md).

One program per row.  Every evaluation of H at a trial gamma needs the whole row (one exp per
logit and four sums), and a row needs a handful of evaluations E (3-4 on Gaussian rows), so the
cost is set by where the row lives between evaluations.  HBM traffic per row of n logits:

* ONE_TILE (n <= ONE_TILE_MAX): the row is loaded once into registers; the setup, every evaluation
  and the write of p run from there: one read of z, one write of p.
* tiled (longer rows, BLOCK-wide chunks): one read for the setup (maximum, counts, range and the
  uniform moments, in one online pass), one read per evaluation, and the last evaluation also
  writes p, normalised by the sum S predicted from the previous evaluation's cumulants (the same
  pass's sums check it; a miss costs one more read and write of p, and a row whose last step was
  not small one more read of z for the write): 1 + E reads of z and one write of p.  The row
  (0.5 MB at 128256 fp32 logits) does not fit on chip, and with one program per SM in flight the
  rows outgrow L2, so every evaluation is an HBM read.

The iteration is the one of ``entmath/ops/entropy_normalization.py`` (``halley_update``: Halley's
method on G = log((H - log c) / (t - log c)) as a relative change of gamma, inside a bracket, with
geometric bisection as the safeguard), on float64 scalars whatever the row's dtype: gamma and the
bracket range over float64, so a root beyond float32's range (a spread of 1e-40 puts it near 1e41,
a mask at -3e38 near 3e-39) is found like any other, and the products gamma d are formed as
(d 2^a) (gamma 2^-a) in the row's float32.  The sums that set H are of e = exp(y) and e y,
y = gamma d, bounded wherever the logits lie; the two that steer the step are of e w^2 and e w^3,
w = kappa d (moments about the maximum), with kappa near the reciprocal of the spread under p (the
previous evaluation's, or after a jump that lost it, the distance of the mean from the maximum),
so that neither a mask at -1e30 while it weighs nor the flat top after it is silenced under- or
overflows them in float32.

Backward (the implicit function theorem, Chapter 2): with dz = z - zbar, the row sums <p, g>,
<p, g dz>, <p, dz^2>, then grad z = p (gamma (g - <p, g>) - coef dz).  Rows of at most
BWD_ONE_TILE_MAX logits are loaded into registers once: z, p and g are read once and grad z is
written once, the fewest the math allows.  Longer rows take two passes, the sums and then the
elementwise gradient: z, p and g are read twice, grad z written once.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import block_size, num_warps
from .softmax_stats import load_row_chunk, log1p

#: Rows up to this length are solved from registers (one HBM read).  Longer rows use the tiled
#: path with MAX_BLOCK-wide chunks.
ONE_TILE_MAX = 16384
#: Backward rows up to this length are read once into registers (z, p and g).
BWD_ONE_TILE_MAX = 8192
MAX_EVALS = 60
FTOL_ULPS = 8.0
#: A relative step below this makes the next evaluation the expected last (Halley converges
#: cubically: after a 1% step gamma is typically within 1e-6), so the tiled path writes p with it.
PREDICT_STEP = 0.01


@triton.jit
def _setup_chunk(x, z0, LOG2_HS: tl.constexpr):
    """Partial setup sums of one chunk ``x`` (-inf padded): (max, count at that max, lowest live
    logit, live count, sum h 2^-11, sum h^2, sum (h HS)^2) with h = (z - z0) / 2 over the live
    logits (halved so that a span of twice the dtype's max does not overflow, scaled so that 4096
    of them do not; the last sum stands in for the one before where that overflows, under a far
    mask: HS = 2^LOG2_HS, 2^-70 in float32, 2^-540 in float64)."""
    live = x > float("-inf")
    cm = tl.max(x, axis=0)
    h = tl.where(live, x * 0.5 - z0 * 0.5, 0.0)
    hs = h * tl.exp2(tl.full([], LOG2_HS, x.dtype))
    return (cm, tl.sum((x == cm).to(tl.float32), axis=0), tl.min(tl.where(live, x, float("inf")), axis=0),
            tl.sum(live.to(tl.float32), axis=0), tl.sum(h * 0.00048828125, axis=0), tl.sum(h * h, axis=0),
            tl.sum(hs * hs, axis=0))


@triton.jit
def _eval_chunk(x, m, sc, pre, gs, dcut, kappa):
    """Partial sums of one chunk at gamma = pre gs (in units of 1 / ds, ds = sc (z - max), sc = 1,
    or 1/4 on rows spanning more than the dtype's range): T = sum e, sum e y and sum e w^2, e w^3,
    with e = exp(y), y = gamma ds, below the maximum only, and w = kappa ds.  ds is clamped at
    dcut = -YCUT / (pre gs): e is 0 beyond (YCUT = 128 in float32, 800 in float64), where y or w
    could overflow (0 * inf = NaN)."""
    below = (x < m) & (x > float("-inf"))
    ds = tl.where(below, tl.maximum(x * sc - m * sc, dcut), 0.0)  # 0 where e = 0: no 0 * inf
    y = (ds * pre) * gs
    e = tl.where(below, tl.exp(y), 0.0)
    w = ds * kappa
    ew2 = e * w * w
    return tl.sum(e, axis=0), tl.sum(e * y, axis=0), tl.sum(ew2, axis=0), tl.sum(ew2 * w, axis=0)


@triton.jit
def _p_chunk(x, m, sc, pre, gs, dcut, inv_s, lo_edge):
    """p = exp(y) / S below the max, 1 / S at the maxima; at gamma = inf (lo_edge) only the maxima."""
    below = (x < m) & (x > float("-inf")) & (lo_edge == 0)
    y = (tl.where(below, tl.maximum(x * sc - m * sc, dcut), 0.0) * pre) * gs
    return tl.where(x == m, 1.0, tl.where(below, tl.exp(y), 0.0)) * inv_s


@triton.jit
def _halley_update(gamma, lo, hi, f, r, q, K2, K3, f_prev):
    """Scalar twin of ``entmath.ops.entropy_normalization.halley_update`` (K2 = gamma^2 k2 and
    K3 = gamma^3 k3, the cumulants of y = gamma d)."""
    lo = tl.where(f > 0, gamma, lo)
    hi = tl.where(f < 0, gamma, hi)
    g0 = tl.log(r / q)
    g1 = -K2 / r                   # gamma G'
    g2 = -(K2 + K3) / r - g1 * g1  # gamma^2 G''
    den = 2.0 * g1 * g1 - g0 * g2
    rel = tl.where(den > 0, -2.0 * g0 * g1 / den, -g0 / g1)
    settled = (tl.abs(rel) <= 8.881784197001252e-16) & (r > 0) & (K2 > 0) & (K2 < float("inf"))  # 2^-50
    new = gamma * (1.0 + rel)
    # On the flat top, at least the quadratic model's root (Chapter 2, eq-en-quad).
    top = (f > 0) & (hi == float("inf")) & (K2 > 0) & (K2 < 0.25 * f)
    quad = gamma * tl.sqrt(1.0 + 2.0 * tl.where(top, f / tl.where(K2 > 0, K2, 1.0), 0.0))
    new = tl.where(top & ~(new >= quad), quad, new)
    # A closed bracket and a step that did not halve |f|: a flat stretch, bisect.
    stall = (lo > 0) & (hi < float("inf")) & (tl.abs(f) > 0.5 * tl.abs(f_prev))
    ok = (new == new) & (tl.abs(new) < float("inf")) & (new > lo) & (new < hi) & (stall == 0)
    ok = ok & (r > 0) & (K2 > 0)  # no step from a spread lost to its frame (NaN fails too)
    bis = tl.where(lo > 0, tl.sqrt(lo) * tl.sqrt(hi), 0.5 * hi)  # lo * hi may underflow
    fallback = tl.where(hi == float("inf"), 4.0 * gamma, bis)
    return tl.where(settled, gamma, tl.where(ok, new, fallback)), lo, hi


@triton.jit
def _split(gamma_s):
    """gamma_s = pre * gs with pre a power of two and gs a float32 of moderate size, pre = 1 while
    gamma_s itself is one: y = (ds pre) gs then keeps float32's precision for any float64 gamma_s."""
    a = tl.minimum(tl.maximum(tl.floor(tl.log2(gamma_s)), -126.0), 126.0)
    a = tl.where((gamma_s >= 7.888609052210118e-31) & (gamma_s <= 1.2676506002282294e30), 0.0, a)  # 2^-100, 2^100
    pre = tl.exp2(a)
    return pre, gamma_s / pre


@triton.jit
def _frame(log2_sigma, mean, reach, LIM: tl.constexpr):
    """kappa for the steering sums: a power of two near 1 / sigma, sigma the spread of ds under p
    at the last evaluation that measured one (log2_sigma, NaN if none), else near 1 / |mean|
    (after a jump that lost it: the distance of the mean from the maximum), else 1 / R; within
    2^-LIM .. 2^LIM (the row dtype's normal range).  sigma is carried as its logarithm: a float64
    row spanning 1e308 has a variance beyond float64's range."""
    lg = tl.where(log2_sigma == log2_sigma, log2_sigma, tl.log2(tl.where(mean < 0, -mean, reach)))
    return tl.exp2(tl.minimum(tl.maximum(-tl.floor(lg), -LIM), LIM - 1.0))


@triton.jit
def entropy_normalize_fwd_kernel(z_ptr, t_ptr, p_ptr, gamma_ptr, zbar_ptr, evals_ptr, n_cols, stride_z,
                                 stride_p, eps, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                                 ACC: tl.constexpr, BIG: tl.constexpr, MAX_EVALS: tl.constexpr,
                                 FTOL_ULPS: tl.constexpr, PREDICT_STEP: tl.constexpr,
                                 WRITE_EVALS: tl.constexpr):
    F64: tl.constexpr = tl.float64
    # Scales by the row's dtype: the setup's overflow stand-in (_setup_chunk) and kappa's range.
    LOG2_HS: tl.constexpr = -540.0 if ACC == tl.float64 else -70.0
    YCUT: tl.constexpr = 800.0 if ACC == tl.float64 else 128.0  # exp(-YCUT) is 0
    FLOOR: tl.constexpr = 9.332636185032189e-302 if ACC == tl.float64 else 1.1754943508222875e-38  # 2^-1000, 2^-126
    LIM: tl.constexpr = 1000.0 if ACC == tl.float64 else 126.0
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    p_row = p_ptr + row * stride_p
    cols = tl.arange(0, BLOCK)
    t = tl.load(t_ptr + row).to(F64)
    z0 = tl.load(z_row, mask=n_cols > 0, other=0.0).to(ACC)
    z0 = tl.where((z0 == z0) & (tl.abs(z0) < float("inf")), z0, 0.0)  # the moments' shift
    # Setup (one read, or the registers): max m, count c at it, lowest live logit, live count,
    # NaN count and the uniform moments, folded chunk by chunk (c restarts when the max grows).
    if ONE_TILE:
        x_reg, n_nan = load_row_chunk(z_row, cols, n_cols, ACC)
        m, c, lowest, n_live, s1, s2, s2s = _setup_chunk(x_reg, z0, LOG2_HS)
        c, n_live, s1, s2, s2s = c.to(F64), n_live.to(F64), s1.to(F64), s2.to(F64), s2s.to(F64)
    else:
        m = tl.full([], float("-inf"), ACC)
        lowest = tl.full([], float("inf"), ACC)
        c = tl.zeros([], F64)
        n_live = tl.zeros([], F64)
        s1 = tl.zeros([], F64)
        s2 = tl.zeros([], F64)
        s2s = tl.zeros([], F64)
        n_nan = tl.zeros([], tl.int32)
        for start in range(0, n_cols, BLOCK):
            x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
            cm, cc, cl, cn, c1, c2, c3 = _setup_chunk(x, z0, LOG2_HS)
            c = tl.where(cm > m, cc.to(F64), tl.where(cm == m, c + cc.to(F64), c))
            m = tl.maximum(m, cm)
            lowest = tl.minimum(lowest, cl)
            n_live += cn.to(F64)
            s1 += c1.to(F64)
            s2 += c2.to(F64)
            s2s += c3.to(F64)
            n_nan += k
    valid = (n_nan == 0) & (tl.abs(m) < float("inf"))
    m64 = m.to(F64)
    # R = max z - min z over the support, halved so that it cannot overflow.  A row spanning more
    # than the dtype's range is taken in units of ds = (z - max) / 4.
    reach_half = 0.5 * m64 - 0.5 * lowest.to(F64)
    sc = tl.where(reach_half > 0.25 * BIG, 0.25, 1.0)
    reach_s = reach_half * (2.0 * sc)
    h_max = tl.log(n_live)
    h_min = tl.log(tl.maximum(c, 1.0))
    hi_edge = t >= h_max
    lo_edge = (t <= h_min) & (hi_edge == 0) & valid
    inner = (hi_edge == 0) & (lo_edge == 0) & valid
    q = t - h_min
    ftol = FTOL_ULPS * eps * t + FLOOR  # (see FTOL_FLOOR of the torch path)
    # The uniform distribution's mean and spread (gamma = 0), in units of ds; the spread as log2
    # (from the stand-in sum where the plain one overflowed).
    mean_h = s1 / n_live * 2048.0
    mean = 2.0 * mean_h * sc + (z0.to(F64) * sc - m64 * sc)
    hsc = tl.exp2(tl.full([], LOG2_HS, F64))
    var_h = tl.where(s2 < float("inf"), s2 / n_live - mean_h * mean_h, s2s / n_live - (mean_h * hsc) * (mean_h * hsc))
    log2_sd = tl.where(s2 < float("inf"), 0.0, -LOG2_HS) + 0.5 * tl.log2(var_h) + tl.log2(2.0 * sc)
    # The start (eq-en-start), sqrt(2 (log|S| - t)) / sd, ...
    gamma = tl.exp2(0.5 * tl.log2(2.0 * tl.maximum(h_max - t, 0.0)) - log2_sd)
    good = inner & (gamma == gamma) & (gamma > 0) & (gamma < float("inf"))
    gamma = tl.where(good, gamma, tl.where(inner, 1.0, 0.0))
    # ... and the floor of the bracket (eq-en-floor): half of sqrt(8 (log|S| - t)) / R.
    floor_ok = inner & (reach_s > 0) & (reach_s < float("inf"))
    lo = tl.where(floor_ok, 0.5 * tl.sqrt(8.0 * tl.maximum(h_max - t, 0.0)) / tl.where(floor_ok, reach_s, 1.0), 0.0)
    gamma = tl.maximum(gamma, lo)  # gamma, lo, hi in units of 1 / ds from here on
    hi = tl.full([], float("inf"), F64)
    f_prev = tl.full([], float("inf"), F64)  # the previous evaluation's H - t
    log2_sigma = log2_sd  # the spread that sets the first frame: the uniform one
    K2p = tl.zeros([], F64)  # the last evaluation's cumulants of y, for the prediction of S
    K3p = tl.zeros([], F64)
    g_prev = tl.zeros([], F64)
    log_s = tl.zeros([], F64)
    S = n_live  # the values at gamma = 0, kept for the edge rows
    evals = 0
    wrote = 0  # whether the last pass wrote p, normalised by s_pred
    s_pred = tl.zeros([], F64)
    go = inner
    while go:
        pre, gs = _split(gamma)
        pre32 = pre.to(ACC)
        gs32 = gs.to(ACC)
        dcut = tl.maximum(-YCUT / gamma, -BIG).to(ACC)
        kappa = _frame(log2_sigma, mean, reach_s, LIM)
        k32 = kappa.to(ACC)
        # The tiled path writes p in this pass when the step that led here was small: it is
        # expected to be the last.  S is predicted from the last pass's cumulants,
        # log S(gamma) = log S + rho nu + rho^2 K2 / 2 + rho^3 K3 / 6, rho = gamma / g_prev - 1.
        rho = gamma / g_prev - 1.0
        log_pred = log_s + rho * (g_prev * mean + rho * (K2p / 2.0 + rho * K3p / 6.0))
        predict = (evals > 0) & (tl.abs(rho) <= PREDICT_STEP) & (log_pred == log_pred)  # (tiled only)
        s_pred = tl.where(predict, tl.exp(log_pred), 0.0)
        inv_pred = tl.where(predict, 1.0 / s_pred, 0.0).to(ACC)
        if ONE_TILE:
            T, A1, A2, A3 = _eval_chunk(x_reg, m, sc, pre32, gs32, dcut, k32)
            T, A1, A2, A3 = T.to(F64), A1.to(F64), A2.to(F64), A3.to(F64)
        else:
            T = tl.zeros([], F64)
            A1 = tl.zeros([], F64)
            A2 = tl.zeros([], F64)
            A3 = tl.zeros([], F64)
            for start in range(0, n_cols, BLOCK):
                x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
                a, b, u, v = _eval_chunk(x, m, sc, pre32, gs32, dcut, k32)
                T += a.to(F64)
                A1 += b.to(F64)
                A2 += u.to(F64)
                A3 += v.to(F64)
                p = _p_chunk(x, m, sc, pre32, gs32, dcut, inv_pred, 0)
                tl.store(p_row + start + cols, p.to(p_ptr.dtype.element_ty), mask=(start + cols < n_cols) & predict)
        S = c + T
        nu = A1 / S  # E_p[y]; the c maxima (weight 1) sit at y = 0
        r = log1p(T / c) - nu  # = H - log c, two terms >= 0
        f = r - q
        evals += 1
        wrote = predict.to(tl.int32)
        g_prev = gamma
        log_s = tl.log(S)
        # Cumulants of y from the frame's moments about the maximum (where the c maxima sit, at
        # w = 0), M1 of w from the mean.  A K2 that is not clear of the sums' rounding (under
        # 2^-16 of M2: the frame missed the scale of the weight) counts as lost.
        m1 = nu / gamma * kappa
        m2 = A2 / S
        vw = m2 - m1 * m1  # the variance of w
        measured = (vw > 0.0000152587890625 * m2) & (vw < float("inf"))
        gk = gamma / kappa
        # K2 = (gamma sigma)^2 underflows deep on a flat top of a float64 row spanning ~1e300
        # (gamma sigma < 1e-154); there a floor of 2^-1000 keeps the flat top's jump, by 1e150,
        # instead of losing the step.
        K2 = tl.where(measured, tl.maximum(gk * gk * vw, 9.332636185032189e-302), gk * gk * vw)
        K3 = gk * gk * gk * (A3 / S - 3.0 * m1 * m2 + 2.0 * m1 * m1 * m1)
        K3 = tl.where(K3 == K3, K3, 0.0)  # (only refines Halley's step; dropped if it overflowed)
        # sigma = sqrt(vw) / kappa in units of ds; NaN when lost (the next frame uses the mean).
        log2_sigma = tl.where(measured, 0.5 * tl.log2(vw) - tl.log2(kappa), float("nan"))
        K2p = tl.where(measured, K2, 0.0)
        K3p = tl.where(measured, K3, 0.0)
        mean = nu / gamma
        done = (tl.abs(f) <= ftol) | (hi - lo <= 2.0 * eps * gamma) | (evals >= MAX_EVALS)
        new, lo_n, hi_n = _halley_update(gamma, lo, hi, f, r, q, K2, K3, f_prev)
        done = done | (new == gamma)  # settled: float64 cannot get closer
        gamma = tl.where(done, gamma, new)
        lo = tl.where(done, lo, lo_n)
        hi = tl.where(done, hi, hi_n)
        f_prev = f
        go = done == 0
    S = tl.where(lo_edge, c, S)
    mean = tl.where(lo_edge | (valid == 0), 0.0, mean)
    g_eval = tl.where(inner, gamma, 0.0)
    # gamma beyond the accumulation dtype's range (a float32 spread below ~1e-37) saturates.
    g_out = tl.where(lo_edge, float("inf"), tl.minimum(g_eval * sc, BIG))
    tl.store(gamma_ptr + row, g_out.to(gamma_ptr.dtype.element_ty))
    # zbar = E_p[z]; on an invalid row the coded max instead (NaN, +inf or -inf: see coded_lse).
    zbar = tl.where(valid, m64 + mean / sc, tl.where(n_nan > 0, float("nan"), m64))
    tl.store(zbar_ptr + row, zbar.to(zbar_ptr.dtype.element_ty))
    if WRITE_EVALS:
        tl.store(evals_ptr + row, evals)
    pre, gs = _split(g_eval)
    pre32 = pre.to(ACC)
    gs32 = gs.to(ACC)
    dcut = tl.maximum(-YCUT / g_eval, -BIG).to(ACC)
    inv_s = (1.0 / S).to(ACC)
    if ONE_TILE:
        p = _p_chunk(x_reg, m, sc, pre32, gs32, dcut, inv_s, lo_edge.to(tl.int32))
        tl.store(p_row + cols, p.to(p_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        fix = s_pred / S  # the prediction's error, if the last pass wrote p
        if (wrote == 1) & (tl.abs(fix - 1.0) <= 2.0 * eps):
            pass  # p is written and normalised
        elif wrote == 1:  # mispredicted: rescale what was written (one read and write of p)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                pw = tl.load(p_row + start + cols, mask=mask, other=0.0).to(ACC)
                tl.store(p_row + start + cols, (pw * fix.to(ACC)).to(p_ptr.dtype.element_ty), mask=mask)
        else:  # an edge row, or a row whose last step was not small: one more read of z
            for start in range(0, n_cols, BLOCK):
                x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
                p = _p_chunk(x, m, sc, pre32, gs32, dcut, inv_s, lo_edge.to(tl.int32))
                tl.store(p_row + start + cols, p.to(p_ptr.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def _bwd_terms(z, p, g, zbar):
    """Row sums of one chunk: <p, g>, <p, g dz>, <p, dz>, <p, dz^2>, dz = z - zbar (0 where
    z = -inf)."""
    dz = tl.where(z > float("-inf"), z - zbar, 0.0)
    pg = p * g
    pd = p * dz
    return tl.sum(pg, axis=0), tl.sum(pg * dz, axis=0), tl.sum(pd, axis=0), tl.sum(pd * dz, axis=0)


@triton.jit
def _bwd_grad(z, p, g, zbar, pg, gam, coef, interior):
    """grad z = p (gamma (g - <p, g>) - coef dz) on interior rows, 0 on the edge rows."""
    dz = tl.where(z > float("-inf"), z - zbar, 0.0)
    return tl.where(interior, p * (gam * (g - pg) - coef * dz), 0.0)


@triton.jit
def entropy_normalize_bwd_kernel(z_ptr, p_ptr, gp_ptr, gg_ptr, gamma_ptr, zbar_ptr, gz_ptr, gt_ptr, n_cols,
                                 stride_z, stride_p, stride_gp, stride_gz, BLOCK: tl.constexpr,
                                 ONE_TILE: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    z_row = z_ptr + row * stride_z
    p_row = p_ptr + row * stride_p
    g_row = gp_ptr + row * stride_gp
    gz_row = gz_ptr + row * stride_gz
    gamma = tl.load(gamma_ptr + row).to(ACC)
    zbar = tl.load(zbar_ptr + row).to(ACC)
    # Pass 1 (ONE_TILE: the only read, into registers): <p, g>, <p, g dz>, <p, dz>, <p, dz^2>.
    if ONE_TILE:
        mask = cols < n_cols
        z_reg = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(ACC)
        p_reg = tl.load(p_row + cols, mask=mask, other=0.0).to(ACC)
        g_reg = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
        pg, pgd, pd, pdd = _bwd_terms(z_reg, p_reg, g_reg, zbar)
    else:
        pg = tl.zeros([], ACC)
        pgd = tl.zeros([], ACC)
        pd = tl.zeros([], ACC)
        pdd = tl.zeros([], ACC)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
            p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(ACC)
            a, b, u, v = _bwd_terms(z, p, g, zbar)
            pg += a
            pgd += b
            pd += u
            pdd += v
    interior = (gamma > 0) & (gamma < float("inf")) & (pdd > 0)
    # d loss / d gamma: through softmax(gamma z), <p (g - gbar), dz>, plus the gamma output's own.
    g_gamma = pgd - pg * pd + tl.load(gg_ptr + row).to(ACC)
    k2 = tl.where(interior, pdd, 1.0)
    coef = tl.where(interior, g_gamma * gamma / k2, 0.0)
    gam = tl.where(interior, gamma, 1.0)
    tl.store(gt_ptr + row, tl.where(interior, -g_gamma / (gam * k2), 0.0))
    # Pass 2: the elementwise gradient (ONE_TILE: from the registers).
    if ONE_TILE:
        gz = _bwd_grad(z_reg, p_reg, g_reg, zbar, pg, gam, coef, interior)
        tl.store(gz_row + cols, gz.to(gz_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
            p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(ACC)
            gz = _bwd_grad(z, p, g, zbar, pg, gam, coef, interior)
            tl.store(gz_row + start + cols, gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def entropy_normalize_fwd(z2d: torch.Tensor, t: torch.Tensor, one_tile_max: int = ONE_TILE_MAX, block: int = 0,
                          evals_out: torch.Tensor | None = None):
    """z2d: (rows, n), unit column stride; t: (rows,) targets.  Returns (p, gamma, zbar).

    ``one_tile_max`` and ``block`` exist for tests (forcing the tiled path on small rows);
    ``evals_out``, an int32 tensor of ``rows`` entries, receives each row's number of
    evaluations of H.
    """
    rows, n = z2d.shape
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    p = torch.empty((rows, n), device=z2d.device, dtype=z2d.dtype)
    gamma = torch.empty(rows, device=z2d.device, dtype=acc)
    zbar = torch.empty_like(gamma)
    if rows:
        one_tile = n <= one_tile_max
        blk = block or (triton.next_power_of_2(max(n, 1)) if one_tile else block_size(n))
        fi = torch.finfo(acc)
        # (without evals_out, a scratch of its own: the kernel stores to it only if WRITE_EVALS)
        ev = evals_out if evals_out is not None else torch.empty(1, device=z2d.device, dtype=torch.int32)
        wrap_triton(entropy_normalize_fwd_kernel)[(rows,)](
            z2d, t.to(torch.float64).contiguous(), p, gamma, zbar, ev, n, z2d.stride(0), p.stride(0), fi.eps,
            BLOCK=blk, ONE_TILE=one_tile and blk >= n, ACC=_acc(z2d.dtype), BIG=fi.max, MAX_EVALS=MAX_EVALS,
            FTOL_ULPS=FTOL_ULPS, PREDICT_STEP=PREDICT_STEP, WRITE_EVALS=evals_out is not None,
            num_warps=num_warps(blk))
    return p, gamma, zbar


def entropy_normalize_bwd(z2d, p, gamma, zbar, grad_p, grad_gamma, block: int = 0, one_tile_max: int = BWD_ONE_TILE_MAX):
    """Implicit-function backward.  Returns (grad z in z's dtype, grad t in the accumulation dtype)."""
    rows, n = z2d.shape
    gz = torch.empty((rows, n), device=z2d.device, dtype=z2d.dtype)
    gt = torch.empty_like(gamma)
    gp = torch.zeros_like(p) if grad_p is None else grad_p
    if gp.stride(-1) != 1:
        gp = gp.contiguous()
    gg = torch.zeros_like(gamma) if grad_gamma is None else grad_gamma.contiguous()
    if rows:
        one_tile = n <= one_tile_max
        blk = block or (triton.next_power_of_2(max(n, 1)) if one_tile else block_size(n))
        wrap_triton(entropy_normalize_bwd_kernel)[(rows,)](
            z2d, p, gp, gg, gamma, zbar, gz, gt, n, z2d.stride(0), p.stride(0), gp.stride(0), gz.stride(0),
            BLOCK=blk, ONE_TILE=one_tile and blk >= n, ACC=_acc(z2d.dtype), num_warps=num_warps(blk))
    return gz, gt
