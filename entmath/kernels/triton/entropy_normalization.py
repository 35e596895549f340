"""Triton kernels for ``entmath.entropy_normalize``: solve H(softmax(gamma z)) = t per row, write
softmax(gamma z).  Derived in Chapter 2 (book/ch02_entropy_normalization.md).

One program per row.  Every evaluation of H at a trial gamma needs the whole row (one exp per
logit and four sums), and a row needs a handful of evaluations, so the cost is set by where the
row lives between evaluations:

* ONE_TILE (n <= ONE_TILE_MAX): the row is loaded once into registers, every evaluation and the
  final write run from there: one read of the row from HBM, one write of p.
* tiled fallback (longer rows): each evaluation streams the row again in BLOCK-wide chunks, so
  the reads grow with the number of evaluations (typically 3-5).

The iteration is the one of ``entmath/ops/entropy_normalization.py`` (Halley's method on
G = log((H - log c) / (t - log c)) inside a bracket, geometric bisection as the safeguard),
written for scalars.  In one evaluation the sums are taken about the previous mean of d
(a nearly central shift), so one pass gives T, the mean and the central moments k2, k3.

Backward: two passes, first the row sums <p, g>, <p, g dz>, <p, dz>, <p, dz^2> with
dz = z - zbar, then the elementwise implicit-function gradient.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import block_size, num_warps
from .softmax_stats import load_row_chunk, log1p

#: Rows up to this length are solved from registers (one HBM read).  Longer rows use the tiled
#: fallback with MAX_BLOCK-wide chunks.
ONE_TILE_MAX = 16384
MAX_EVALS = 60
FTOL_ULPS = 8.0


@triton.jit
def _row_setup(x, m):
    """Partial (c, n_below, sum d, sum d^2, min d) of one chunk ``x`` (-inf padded) about the
    max m; -min d over the row is its reach R = max z - min z on the support."""
    at_max = x == m
    below = (x < m) & (x > float("-inf"))
    d = tl.where(below, x - m, 0.0)
    return (tl.sum(at_max.to(x.dtype), axis=0), tl.sum(below.to(x.dtype), axis=0),
            tl.sum(d, axis=0), tl.sum(d * d, axis=0), tl.min(d, axis=0))


@triton.jit
def _row_eval(x, m, gamma, ctr):
    """Partial sums of one chunk at gamma: T = sum e, and sum e (d - ctr)^k for k = 1, 2, 3, where
    e = exp(gamma d) strictly below the maximum (0 at the maxima, -inf logits and padding)."""
    below = (x < m) & (x > float("-inf"))
    d = tl.where(below, x - m, 0.0)
    e = tl.where(below, tl.exp(gamma * d), 0.0)
    y = d - ctr
    w = e * y
    return tl.sum(e, axis=0), tl.sum(w, axis=0), tl.sum(w * y, axis=0), tl.sum(w * y * y, axis=0)


@triton.jit
def _row_p(x, m, gamma, inv_s, lo_edge):
    """p = exp(gamma d) / S below the max, 1 / S at the maxima; at gamma = inf only the maxima."""
    below = (x < m) & (x > float("-inf"))
    e = tl.where(below & (lo_edge == 0), tl.exp(gamma * tl.where(below, x - m, 0.0)), 0.0)
    return tl.where(x == m, 1.0, e) * inv_s


@triton.jit
def _halley_update(gamma, lo, hi, f, r, q, k2, k3, f_prev):
    """Scalar twin of ``entmath.ops.entropy_normalization.halley_update``."""
    lo = tl.where(f > 0, gamma, lo)
    hi = tl.where(f < 0, gamma, hi)
    f1 = -gamma * k2
    f2 = -k2 - gamma * k3
    g0 = tl.log(r / q)
    g1 = f1 / r
    g2 = f2 / r - g1 * g1
    den = 2.0 * g1 * g1 - g0 * g2
    new = gamma + tl.where(den > 0, -2.0 * g0 * g1 / den, -g0 / g1)
    # On the flat top, at least the quadratic model's root (Chapter 2, eq-en-quad).
    top = (f > 0) & (hi == float("inf")) & (k2 > 0) & (gamma * gamma * k2 < 0.25 * f)
    quad = tl.sqrt(gamma * gamma + 2.0 * tl.where(top, f / tl.where(k2 > 0, k2, 1.0), 0.0))
    new = tl.where(top & ~(new >= quad), quad, new)
    # A closed bracket and a step that did not halve |f|: a flat stretch, bisect.
    stall = (lo > 0) & (hi < float("inf")) & (tl.abs(f) > 0.5 * tl.abs(f_prev))
    ok = (new == new) & (tl.abs(new) < float("inf")) & (new > lo) & (new < hi) & (stall == 0)
    ok = ok & (r > 0) & (k2 > 0)  # as halley_step: no step from a variance lost to cancellation
    bis = tl.where(lo > 0, tl.sqrt(lo) * tl.sqrt(hi), 0.5 * hi)  # lo * hi may underflow float32
    fallback = tl.where(hi == float("inf"), 4.0 * gamma, bis)
    return tl.where(ok, new, fallback), lo, hi


@triton.jit
def entropy_normalize_fwd_kernel(z_ptr, t_ptr, p_ptr, gamma_ptr, zbar_ptr, n_cols, stride_z, stride_p,
                                 eps, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr, ACC: tl.constexpr,
                                 MAX_EVALS: tl.constexpr, FTOL_ULPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    p_row = p_ptr + row * stride_p
    cols = tl.arange(0, BLOCK)
    t = tl.load(t_ptr + row).to(ACC)
    # Pass 1: the maximum (and NaN detection).  ONE_TILE keeps the row in registers from here on.
    if ONE_TILE:
        x_reg, n_nan = load_row_chunk(z_row, cols, n_cols, ACC)
        m = tl.max(x_reg, axis=0)
    else:
        m = tl.full([], float("-inf"), ACC)
        n_nan = tl.zeros([], tl.int32)
        for start in range(0, n_cols, BLOCK):
            x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
            n_nan += k
            m = tl.maximum(m, tl.max(x, axis=0))
    valid = (n_nan == 0) & (tl.abs(m) < float("inf"))
    # Pass 2: counts and the uniform moments (gamma = 0) that give the starting point.
    if ONE_TILE:
        c, n_below, s1, s2, d_min = _row_setup(x_reg, m)
    else:
        c = tl.zeros([], ACC)
        n_below = tl.zeros([], ACC)
        s1 = tl.zeros([], ACC)
        s2 = tl.zeros([], ACC)
        d_min = tl.zeros([], ACC)
        for start in range(0, n_cols, BLOCK):
            x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
            a, b, u, v, w = _row_setup(x, m)
            c += a
            n_below += b
            s1 += u
            s2 += v
            d_min = tl.minimum(d_min, w)
    n_live = c + n_below
    h_max = tl.log(n_live)
    h_min = tl.log(tl.maximum(c, 1.0))
    hi_edge = t >= h_max
    lo_edge = (t <= h_min) & (hi_edge == 0) & valid
    inner = (hi_edge == 0) & (lo_edge == 0) & valid
    q = t - h_min
    ftol = FTOL_ULPS * eps * t
    mean0 = s1 / n_live
    k2_0 = s2 / n_live - mean0 * mean0
    gamma = tl.sqrt(2.0 * tl.maximum(h_max - t, 0.0) / k2_0)
    good = inner & (gamma == gamma) & (gamma > 0) & (gamma < float("inf"))
    gamma = tl.where(good, gamma, tl.where(inner, 1.0, 0.0))
    # The floor of the bracket (eq-en-floor): half of sqrt(8 (log|S| - t)) / R.
    reach = -d_min
    floor_ok = inner & (reach > 0) & (reach < float("inf"))
    lo = tl.where(floor_ok, 0.5 * tl.sqrt(8.0 * tl.maximum(h_max - t, 0.0)) / tl.where(floor_ok, reach, 1.0), 0.0)
    gamma = tl.maximum(gamma, lo)
    hi = tl.full([], float("inf"), ACC)
    f_prev = tl.full([], float("inf"), ACC)  # the previous evaluation's H - t
    # Centre of the moment sums: the previous mean of d.  At the start, the uniform mean, unless
    # logits far below the maximum (a mask at -1e30, say) drag it where e * (d - ctr)^2 overflows
    # and the mean cancels: then the maximum itself.
    ctr = tl.where(valid & (reach * gamma <= 64.0), mean0, 0.0)
    evals = 0
    go = inner
    T = n_below  # the values at gamma = 0, kept for the edge rows
    mu = ctr
    # Evaluate H(gamma) and its derivatives until |H - t| <= ftol (or the bracket is exhausted).
    while go:
        if ONE_TILE:
            T, P1, P2, P3 = _row_eval(x_reg, m, gamma, ctr)
        else:
            T = tl.zeros([], ACC)
            P1 = tl.zeros([], ACC)
            P2 = tl.zeros([], ACC)
            P3 = tl.zeros([], ACC)
            for start in range(0, n_cols, BLOCK):
                x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
                a, b, u, v = _row_eval(x, m, gamma, ctr)
                T += a
                P1 += b
                P2 += u
                P3 += v
        S = c + T
        # The c maxima (weight 1, d = 0) sit at -ctr in the shifted frame.
        M1 = (P1 - c * ctr) / S
        M2 = (P2 + c * ctr * ctr) / S
        M3 = (P3 - c * ctr * ctr * ctr) / S
        mu = ctr + M1
        k2 = M2 - M1 * M1
        k3 = M3 - 3.0 * M1 * M2 + 2.0 * M1 * M1 * M1
        r = log1p(T / c) - gamma * mu  # H - log c, two terms >= 0
        f = r - q
        evals += 1
        done = (tl.abs(f) <= ftol) | (hi - lo <= 2.0 * eps * gamma) | (evals >= MAX_EVALS)
        new, lo_n, hi_n = _halley_update(gamma, lo, hi, f, r, q, k2, k3, f_prev)
        gamma = tl.where(done, gamma, new)
        lo = tl.where(done, lo, lo_n)
        hi = tl.where(done, hi, hi_n)
        f_prev = f
        # The next centre: this mean, unless it overflowed (logits masked near -FLT_MAX, whose
        # weights wake up below the root): then the maximum, which keeps the sums finite.
        ctr = tl.where((mu == mu) & (tl.abs(mu) < float("inf")), mu, 0.0)
        go = done == 0
    S = tl.where(lo_edge, c, c + T)
    inv_s = 1.0 / S
    mu = tl.where(lo_edge, 0.0, mu)
    g_out = tl.where(lo_edge, float("inf"), tl.where(inner, gamma, 0.0))
    tl.store(gamma_ptr + row, g_out)
    # zbar = E_p[z]; on an invalid row the coded max instead (NaN, +inf or -inf: see coded_lse).
    tl.store(zbar_ptr + row, tl.where(valid, m + mu, tl.where(n_nan > 0, float("nan"), m)))
    g_eval = tl.where(inner, gamma, 0.0)
    if ONE_TILE:
        p = _row_p(x_reg, m, g_eval, inv_s, lo_edge.to(tl.int32))
        tl.store(p_row + cols, p.to(p_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        for start in range(0, n_cols, BLOCK):
            x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
            p = _row_p(x, m, g_eval, inv_s, lo_edge.to(tl.int32))
            tl.store(p_row + start + cols, p.to(p_ptr.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def entropy_normalize_bwd_kernel(z_ptr, p_ptr, gp_ptr, gg_ptr, gamma_ptr, zbar_ptr, gz_ptr, gt_ptr, n_cols,
                                 stride_z, stride_p, stride_gp, stride_gz, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    gamma = tl.load(gamma_ptr + row).to(ACC)
    zbar = tl.load(zbar_ptr + row).to(ACC)
    # Pass 1: <p, g>, <p, g dz>, <p, dz>, <p, dz^2>, with dz = z - zbar (0 where z = -inf).
    pg = tl.zeros([], ACC)
    pgd = tl.zeros([], ACC)
    pd = tl.zeros([], ACC)
    pdd = tl.zeros([], ACC)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(z_ptr + row * stride_z + start + cols, mask=mask, other=float("-inf")).to(ACC)
        p = tl.load(p_ptr + row * stride_p + start + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(gp_ptr + row * stride_gp + start + cols, mask=mask, other=0.0).to(ACC)
        dz = tl.where(z > float("-inf"), z - zbar, 0.0)
        pg += tl.sum(p * g, axis=0)
        pgd += tl.sum(p * g * dz, axis=0)
        pd += tl.sum(p * dz, axis=0)
        pdd += tl.sum(p * dz * dz, axis=0)
    interior = (gamma > 0) & (gamma < float("inf")) & (pdd > 0)
    # d loss / d gamma: through softmax(gamma z), <p (g - gbar), dz>, plus the gamma output's own.
    g_gamma = pgd - pg * pd + tl.load(gg_ptr + row).to(ACC)
    k2 = tl.where(interior, pdd, 1.0)
    coef = tl.where(interior, g_gamma * gamma / k2, 0.0)
    gam = tl.where(interior, gamma, 1.0)
    tl.store(gt_ptr + row, tl.where(interior, -g_gamma / (gam * k2), 0.0))
    # Pass 2: grad z = p (gamma (g - gbar) - coef dz) on interior rows, 0 on the edge rows.
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(z_ptr + row * stride_z + start + cols, mask=mask, other=float("-inf")).to(ACC)
        p = tl.load(p_ptr + row * stride_p + start + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(gp_ptr + row * stride_gp + start + cols, mask=mask, other=0.0).to(ACC)
        dz = tl.where(z > float("-inf"), z - zbar, 0.0)
        gz = tl.where(interior, p * (gam * (g - pg) - coef * dz), 0.0)
        tl.store(gz_ptr + row * stride_gz + start + cols, gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def entropy_normalize_fwd(z2d: torch.Tensor, t: torch.Tensor, one_tile_max: int = ONE_TILE_MAX, block: int = 0):
    """z2d: (rows, n), unit column stride; t: (rows,) targets.  Returns (p, gamma, zbar).

    ``one_tile_max`` and ``block`` exist for tests (forcing the tiled path on small rows).
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
        wrap_triton(entropy_normalize_fwd_kernel)[(rows,)](
            z2d, t.to(acc).contiguous(), p, gamma, zbar, n, z2d.stride(0), p.stride(0), fi.eps,
            BLOCK=blk, ONE_TILE=one_tile and blk >= n, ACC=_acc(z2d.dtype), MAX_EVALS=MAX_EVALS,
            FTOL_ULPS=FTOL_ULPS, num_warps=num_warps(blk))
    return p, gamma, zbar


def entropy_normalize_bwd(z2d, p, gamma, zbar, grad_p, grad_gamma, block: int = 0):
    """Implicit-function backward.  Returns (grad z in z's dtype, grad t in the accumulation dtype)."""
    rows, n = z2d.shape
    gz = torch.empty((rows, n), device=z2d.device, dtype=z2d.dtype)
    gt = torch.empty_like(gamma)
    gp = torch.zeros_like(p) if grad_p is None else grad_p
    if gp.stride(-1) != 1:
        gp = gp.contiguous()
    gg = torch.zeros_like(gamma) if grad_gamma is None else grad_gamma.contiguous()
    if rows:
        blk = block or block_size(n)
        wrap_triton(entropy_normalize_bwd_kernel)[(rows,)](z2d, p, gp, gg, gamma, zbar, gz, gt, n, z2d.stride(0), p.stride(0),
                                              gp.stride(0), gz.stride(0), BLOCK=blk, ACC=_acc(z2d.dtype),
                                              num_warps=num_warps(blk))
    return gz, gt
