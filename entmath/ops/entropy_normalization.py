"""Entropy normalization: the power (temperature) transform softmax(gamma * z) whose entropy is a
prescribed number of nats.  Derived in Chapter 2 (book/ch02_entropy_normalization.md).

For logits z (one row, classes last) write d_i = z_i - max z <= 0 and p_i(gamma) proportional to
exp(gamma d_i).  With S = sum_i exp(gamma d_i) = c + T, where c counts the maximal entries (their
weight is exactly 1) and T is the mass strictly below the maximum, and mu = E_p[d] <= 0,

    H(gamma) = log c + [log1p(T / c) - gamma mu]                            (three terms >= 0)
    H'(gamma) = -gamma k2,            H''(gamma) = -k2 - gamma k3,

where k2, k3 are the central moments of z under p(gamma).  H falls from log|support| at
gamma = 0 to log c as gamma -> inf.  Per row we solve H(gamma) = target by Halley's method on
G(gamma) = log(H - log c) - log(target - log c) (nearly linear in gamma in the exponential tail,
where Halley on H itself crawls), inside a bracket [lo, hi] that every evaluation tightens, with
geometric bisection whenever a step would leave the bracket.  The start is the root of the
second-order Taylor expansion of H at gamma = 0, gamma_0 = sqrt(2 (log|support| - target) / k2(0));
the bracket starts at half the floor sqrt(8 (log|support| - target)) / R, R = max z - min z on the
support (``bracket_floor``: Var <= R^2 / 4 bounds dH/dgamma), not at 0.

Backward (Chapter 2, the implicit function theorem, never through the iterations): with
F(gamma, z, t) = H(softmax(gamma z)) - t = 0,

    d gamma / d z_k = -gamma p_k (z_k - zbar) / k2,        d gamma / d t = -1 / (gamma k2),

and p = softmax(gamma z) chains through both gamma and z.

Edge rows: target >= log|support| gives gamma = 0 and the uniform distribution on the support;
otherwise target <= log c gives gamma = +inf and the uniform distribution on the arg-max set.
Both are locally constant in (z, target) away from ties, and their gradients are defined as 0.

Scale.  The sums that set H are taken in units of the exponent y = gamma d itself (e y, with
e = exp(y)), which stay of order one wherever the logits and the root lie; the steering step is
Halley's written for the relative change of gamma, from the cumulants of y.  A root anywhere in
the dtype's range is found in a few evaluations: a mask at -3e37, a spread of 1e-40 or logits
spanning 2 * FLT_MAX change gamma, not the size of the sums.

Execution of the torch path.  Every evaluation of H is a pass over the row, so the row should stay
in cache across the evaluations.  The eager path solves blocks of rows of about BLOCK_ELEMS logits
(all rows at once on a GPU), in float64 whatever the input dtype (every float32, fp16 or bf16 row
and its root lie well inside float64's range, and its sums hold every scale of such a row), to the
tolerance of the input's accumulation dtype; the per-row scalars are float64 numpy vectors on the
CPU.  Intra-op threads cost more in synchronisation than they return on such pieces; the op
leaves the thread count to the caller (``torch.set_num_threads``) rather than change
process-wide state.  float32, fp16 and bf16 inputs on the CPU of at least
``kernels.cpu.entropy_normalization.MIN_ELEMS`` logits take the C kernel of
``entmath/kernels/cpu/entropy_normalization.c`` instead: the same iteration, one row at a time in
cache, each evaluation one vectorised float32 loop with the scalars in double (compiled once per
machine into a per-user cache, which later processes load in milliseconds;
``ENTMATH_COMPILE=0`` turns it off).  The rows it declines (a
root outside float32's range, logits spanning more than FLT_MAX / 4, steering sums that find no
scale) are solved by the eager path.

Accuracy.  For any finite logits and any target, on every path (eager, C, Triton),

    |H(p) - t*| <= (16 eps + u) (1 + t*) + n tau (1 - log tau) / 2,

where t* is the target clamped to the reachable range [log c, log|S|], H(p) the exact entropy of
the returned p (rounded to its dtype), eps the machine epsilon of the accumulation dtype (float32
for fp16/bf16), u the unit roundoff of p's dtype and tau its smallest subnormal (the last term
matters for fp16 only).  The solver stops within FTOL_ULPS eps t of the target as it computes H;
the rest is the rounding of its sums and of p.  tests/test_entropy_normalization_extremes.py
checks it on rows shifted by up to 1e30, spanning up to the dtype's max, masked down to -max,
of spread 1e-40 and near the fp16/bf16 max (worst measured: 4.6 eps (1 + t*) for float32,
3.2 eps for float64, within u (1 + t*) for fp16/bf16).  p, gamma and zbar are never NaN on
valid rows; gamma is +inf only at the lower edge.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Optional

import torch

from .._backend import resolve_backend
from .._validate import (check_float_tensor, check_rows_finite, coded_lse, compute_dtype, normalize_dim,
                         value_checks_active)
from ..kernels.cpu import entropy_normalization as fused_cpu
from ._library import acc_dtype, register_row_vmap, triton_kernel_op
from ._rows import kernels, rows_2d

__all__ = ["entropy_normalize", "solve_gamma", "sample"]

#: Most evaluations of H per row.  Typical rows converge in 3-6; the cap only matters for
#: adversarial rows that force bisection, and a row that hits it keeps its last iterate.
MAX_EVALS = 60
#: Convergence: |H - target| <= FTOL_ULPS * eps * target + FTOL_FLOOR.  H is a sum of
#: non-negative terms, so it is computed to a few ulp of itself; 8 ulp leaves room for that and
#: nothing more.  The floor, 2^-1000, is for targets so small (1.5e-309, say) that H - log c near
#: them is below float64's normal range and cannot be resolved relatively (the kernels, whose
#: sums are float32, use 2^-126).
FTOL_ULPS = 8.0
FTOL_FLOOR = 2.0 ** -1000
#: CPU blocks of rows hold about this many logits: large enough that the per-block scalar work
#: (numpy on vectors of rows) is small against the passes over the block, small enough that a
#: block's few arrays stay in the last-level cache between evaluations.
BLOCK_ELEMS = 1 << 18
#: float64 rows: past this gamma the root is out of float64's reach (logits whose spread is
#: subnormal) and the row is reported as unfinished (it counts MAX_EVALS evaluations).
F64_GAMMA_MAX = 2.0 ** 1000


# ----------------------------------------------------------------------------------------------
# The per-row iteration.  The C kernel (entmath/kernels/cpu/entropy_normalization.c) and the
# Triton kernel mirror halley_update line by line; tests/test_entropy_normalization.py holds the
# three to the same iterates.
#
# Scale.  Every quantity the step uses is taken in units of gamma d = gamma (z - max z), the
# exponent itself: its mean nu = gamma mu and its cumulants K2 = gamma^2 k2, K3 = gamma^3 k3 are
# bounded by the row length alone (|nu| <= log|S|, and e^y |y|^k <= (k / e)^k for y <= 0), so no
# sum overflows or underflows wherever the logits and the root lie: a mask at -3e37 or a spread of
# 1e-40 changes gamma, not the size of the sums.  The step is Halley's on G written for the
# relative change of gamma, the same iterate as on gamma itself.
# ----------------------------------------------------------------------------------------------

def initial_gamma(xp, h_max, target, sd_0):
    """Root of the Taylor expansion H(gamma) ~ log|S| - k2(0) gamma^2 / 2 at gamma = 0, from the
    standard deviation sd_0 = sqrt(k2(0)) (whose square can overflow for float64 logits)."""
    return xp.sqrt(2.0 * xp.maximum(h_max - target, 0.0 * h_max)) / sd_0


def bracket_floor(xp, h_max, target, reach):
    """Half the lower bound sqrt(8 (log|S| - t)) / R on the root, R = max z - min z over the
    support (Chapter 2, eq-en-floor: Popoviciu's inequality Var <= R^2 / 4 in dH/dgamma).  Half,
    so that rounding cannot lift it above the root; 0 where R is 0 or not finite."""
    ok = (reach > 0) & (reach < math.inf)
    r_safe = xp.where(ok, reach, 1.0 + 0.0 * reach)
    return xp.where(ok, 0.5 * xp.sqrt(8.0 * xp.maximum(h_max - target, 0.0 * h_max)) / r_safe, 0.0 * reach)


def halley_update(xp, gamma, lo, hi, f, r, q, K2, K3, f_prev):
    """One safeguarded step on vectors of rows (``xp`` is numpy or torch).

    ``f = H - t``, ``r = H - log c``, ``q = t - log c`` (> 0), ``K2 = gamma^2 k2`` and
    ``K3 = gamma^3 k3`` (the cumulants of gamma d under p), ``f_prev`` the previous evaluation's f
    (inf at the first).  Returns the new (gamma, lo, hi): Halley's method on G = log(r / q), with
    G' = -gamma k2 / r and G'' = (-k2 - gamma k3) / r - G'^2 carried as gamma G' and gamma^2 G''
    (so the step is a relative change of gamma); Newton on G if Halley's denominator is not
    positive; at least the quadratic model's root on the flat top (Chapter 2, eq-en-quad);
    geometric bisection of [lo, hi] (expansion by 4 while hi = inf, halving while lo = 0) if the
    step leaves the bracket or is not finite, or if the bracket is closed and the last step did
    not halve |f| (a flat stretch, where Halley crawls).  A Halley or Newton step below float64's
    resolution of gamma (2^-50 relative) returns gamma itself: float64 cannot get closer (where H
    is steep in gamma, the tolerance on |f| can lie below what one ulp of gamma moves), and the
    caller stops.
    """
    lo = xp.where(f > 0, gamma, lo)
    hi = xp.where(f < 0, gamma, hi)
    g0 = xp.log(r / q)
    g1 = -K2 / r                   # gamma G'
    g2 = -(K2 + K3) / r - g1 * g1  # gamma^2 G''
    den = 2.0 * g1 * g1 - g0 * g2
    rel = xp.where(den > 0, -2.0 * g0 * g1 / den, -g0 / g1)
    settled = (abs(rel) <= 2.0 ** -50) & (r > 0) & (K2 > 0) & (K2 < math.inf)
    new = gamma * (1.0 + rel)
    top = (f > 0) & xp.isinf(hi) & (K2 > 0) & (K2 < 0.25 * f)
    quad = gamma * xp.sqrt(1.0 + 2.0 * xp.where(top, f / xp.where(K2 > 0, K2, 1.0 + 0.0 * K2), 0.0 * f))
    new = xp.where(top & ~(new >= quad), quad, new)
    stall = (lo > 0) & ~xp.isinf(hi) & (abs(f) > 0.5 * abs(f_prev))
    ok = xp.isfinite(new) & (new > lo) & (new < hi) & ~stall & (r > 0) & (K2 > 0)
    # sqrt(lo) sqrt(hi): lo * hi itself may underflow or overflow.
    fallback = xp.where(xp.isinf(hi), 4.0 * gamma, xp.where(lo > 0, xp.sqrt(lo) * xp.sqrt(hi), 0.5 * hi))
    return xp.where(settled, gamma, xp.where(ok, new, fallback)), lo, hi


def _scalar_ns(device: torch.device):
    if device.type == "cpu":
        try:
            import numpy

            return numpy
        except ImportError:  # numpy is optional: fall back to torch for the scalars
            pass
    return torch


class _Scalars:
    """Moves (B,) vectors between the row-sized torch ops and the scalar namespace ``xp``."""

    def __init__(self, xp, B, acc, device):
        self.xp = xp
        self.sums = torch.empty(4, B, dtype=acc, device=device)  # written by the reductions
        self.out = list(self.sums.unbind(0))
        self.cols = torch.empty(3, B, 1, dtype=acc, device=device)  # per-row factors, as columns
        self.col = list(self.cols.unbind(0))
        if xp is not torch:
            self.sums_np = self.sums.numpy()
            self.cols_np = [c.numpy().reshape(B) for c in self.col]

    def get(self, k0, k1):
        """Sums k0:k1 as float64 vectors (copies: the next reductions overwrite them)."""
        if self.xp is torch:
            return self.sums[k0:k1].to(torch.float64, copy=True)
        return self.sums_np[k0:k1].astype("float64")

    def put(self, j, x):
        if self.xp is torch:
            self.cols[j, :, 0].copy_(x)
        else:
            self.cols_np[j][:] = x
        return self.col[j]



def _row_setup(zb, d, at_max, below, xp):
    """The pass before the iteration, for a block of float64 rows (classes last).

    Fills d = z - max z strictly below the maximum and -FOLD at the maxima and at -inf logits,
    at_max (1 at the maxima, else 0) and below (1 strictly below the maximum on the support, else
    0).  Returns float64 vectors in ``xp``: (max z, c, n_below, mean of d, standard deviation of
    d, R, scale), the moments of the uniform distribution on the support (the maxima at d = 0,
    summed in units of about R, so that neither a row spanning 1e308 nor one of 1e-300 over- or
    underflows them), R = max z - min z over the support.  A row whose logits span more than half
    of float64's range (d = z - max z would overflow) is taken in units of ``scale`` = 1/4:
    d = z / 4 - max / 4.
    """
    m = zb.amax(-1, keepdim=True)  # NaN if the row holds a NaN: the validity code (coded_lse)
    lowest = torch.nan_to_num(zb, nan=math.nan, neginf=math.inf).amin(-1, keepdim=True)  # over the support
    wide = (0.5 * m - 0.5 * lowest) > 0.25 * torch.finfo(zb.dtype).max  # R > max / 2
    scale = torch.where(wide, 0.25, 1.0)
    if bool(wide.any()):
        torch.sub(zb * scale, m * scale, out=d)
    else:
        torch.sub(zb, m, out=d)
    reach = m * scale - lowest * scale
    # Masks are built from sign() rather than comparisons (bool tensors are slow on the CPU):
    # sign(d) is 0 at the maxima and -1 below them, -inf logits included.
    torch.sign(d, out=at_max).add_(1.0)
    c = at_max.sum(-1)
    d.nan_to_num_(neginf=0.0)  # -inf logits now sit at d = 0, like the maxima
    torch.sign(d, out=below).neg_()
    n_below = below.sum(-1)
    n_live = c + n_below
    # The uniform moments in units of 2^e >= R (a power of two: exact).
    _, e = torch.frexp(torch.where((reach > 0) & (reach < math.inf), reach, 1.0))
    unit = torch.ldexp(torch.ones_like(reach), e)
    scaled = d / unit
    mean_u = scaled.sum(-1, keepdim=True) / n_live.unsqueeze(-1)
    var_u = (torch.linalg.vector_norm(scaled, dim=-1, keepdim=True) ** 2 / n_live.unsqueeze(-1) - mean_u * mean_u)
    mean0 = (mean_u * unit).squeeze(-1)
    sd0 = (var_u.clamp_min(0.0).sqrt() * unit).squeeze(-1)
    # Fold the maxima and the -inf logits to d = -FOLD: while gamma FOLD >= 120 their weight
    # exp(gamma d) is exactly 0, which saves a masking pass per evaluation (the maxima's weight,
    # 1, enters the sums in closed form through c).
    d.add_(below - 1.0, alpha=FOLD)
    out = (m.squeeze(-1), c, n_below, mean0, sd0, reach.squeeze(-1), scale.squeeze(-1))
    return out if xp is torch else tuple(v.cpu().numpy() for v in out)


#: The fold of ``_row_setup``: the maxima and -inf logits sit at d = -FOLD, silent for every
#: gamma >= 120 / FOLD = 6e-89 (every float32, fp16 or bf16 row's root is far above that).
FOLD = 2.0 ** 300


def _solve_block(zb, t, eps, out, res):
    """Solve the rows of ``zb`` (B, n, float64) for the targets ``t`` (B,), to the tolerance
    FTOL_ULPS * eps * t.

    Writes p into ``out`` (B, n, any float dtype) and (gamma, E_p[z] - max z, evaluations, max z)
    into ``res`` (4, B), in the scalar namespace's float64.

    One evaluation: y = gamma d, e = exp(y) (0 at the folded entries), and the sums of e and e y,
    which set H; then, if the row goes on, of e y (phi d) and e y (phi d)^2 (gamma times the
    moments of d about the maximum, in units of 1 / phi near the spread), which steer the step:
    five passes over the block, or eleven.  Every sum is float64.
    """
    B, n = zb.shape
    xp = _scalar_ns(zb.device)
    sc = _Scalars(xp, B, zb.dtype, zb.device)
    big = float(torch.finfo(zb.dtype).max)
    d, at_max, below = torch.empty_like(zb), torch.empty_like(zb), torch.empty_like(zb)
    m, c, n_below, mean0, sd0, reach, scale = _row_setup(zb, d, at_max, below, xp)
    n_live = c + n_below
    h_max, h_min = xp.log(n_live), xp.log(c)
    valid = xp.isfinite(m) & (c > 0)  # NaN / +inf / all -inf rows: no iterations (reported later)
    hi_edge = (t >= h_max) & valid
    lo_edge = ~hi_edge & (t <= h_min) & valid
    inner = ~hi_edge & ~lo_edge & valid
    q = t - h_min
    ftol = FTOL_ULPS * eps * t + FTOL_FLOOR
    # gamma = 0 is the uniform distribution on the support; its spread starts the iteration.
    gamma = initial_gamma(xp, h_max, t, sd0)
    gamma = xp.where(inner & xp.isfinite(gamma) & (gamma > 0), gamma, 1.0 * inner)
    lo = xp.where(inner, bracket_floor(xp, h_max, t, reach), 0.0 * gamma)
    gamma = xp.maximum(gamma, lo)
    hi = 0.0 * gamma + math.inf
    done = ~inner
    evals = 0.0 * gamma
    f_prev = 0.0 * gamma + math.inf
    mu = xp.where(valid, mean0, 0.0 * gamma)  # E_p[d]: the uniform mean until the first evaluation
    reach_fold = xp.maximum(reach, 0.0 * reach + FOLD)  # the largest |d| after the fold
    spread = sd0  # the spread of d under p that sets the steering sums' units (see below)

    e = out if out.dtype == zb.dtype else torch.empty_like(d)
    y, w = torch.empty_like(d), torch.empty_like(d)
    for it in range(MAX_EVALS):
        lost = ~done & (gamma > F64_GAMMA_MAX)  # a subnormal spread: out of float64's reach
        evals = xp.where(lost, float(MAX_EVALS), evals)
        done = done | lost
        live = ~done
        torch.mul(d, sc.put(0, gamma), out=y)
        # Guards for float64 logits near the ends of the range (every inner row counts, finished
        # or not: its p is taken from the last evaluation).
        if bool((inner & (gamma * reach_fold > 0.25 * big)).any()):
            y.clamp_(min=-(2.0 ** 14))  # exp(y) is 0 there anyway, but y itself could be -inf
        torch.exp(y, out=e)
        if bool((inner & (gamma * FOLD < 120.0)).any()):
            e.mul_(below)  # a gamma so small that the folded entries are not yet silent
        torch.sum(e, -1, out=sc.out[0])
        torch.sum(torch.mul(e, y, out=w), -1, out=sc.out[1])
        T, P1 = sc.get(0, 2)
        S = c + T
        nu = P1 / S  # E_p[y] = gamma mu; the c maxima (weight 1) sit at y = 0
        r = xp.log1p(T / c) - nu  # = H - log c, a sum of two terms >= 0
        f = r - q
        mu = xp.where(live & (gamma > 0), nu / xp.where(gamma > 0, gamma, 1.0 + 0.0 * gamma), mu)
        evals = evals + live
        done = done | (abs(f) <= ftol) | (hi - lo <= 2.0 * eps * gamma)
        if done.all() or it == MAX_EVALS - 1:  # the last: p and gamma stay this evaluation's
            break
        # The cumulants that steer the step, from the moments about the maximum, sums of
        # e y (phi d)^k with phi a power of two near 1 / (the spread of d under p): the last
        # evaluation's, or the mean's distance from the maximum after a jump lost it.  (A float64
        # row spanning 1e308 would overflow sums of e y d.)  They lose digits to cancellation only
        # when the mean lies far below the maximum in units of the spread, which can slow a step
        # (the bracket still holds) but never moves the answer, which T and the mean set.
        _, ex = xp.frexp(xp.where((spread > 0) & (spread < math.inf), spread, 1.0 + 0.0 * spread))
        phi = xp.ldexp(1.0 + 0.0 * spread, -ex)
        # phi d clamped: it may overflow where e = 0 (0 * inf = NaN).
        torch.mul(d, sc.put(1, phi), out=y).clamp_(min=-1e300)
        torch.sum(w.mul_(y), -1, out=sc.out[2])
        torch.sum(w.mul_(y), -1, out=sc.out[3])
        P2, P3 = sc.get(2, 4)
        # With phi = 2^-ex and gamma = gm 2^ge (gm in [1/2, 1)), the powers of two are applied
        # last, in one step: no intermediate leaves the range where the result is in it.
        gm, ge = xp.frexp(xp.where(gamma > 0, gamma, 1.0 + 0.0 * gamma))
        M2 = xp.ldexp(gm * P2 / S, ge + ex)  # E_p[y^2], E_p[y^3]
        M3 = xp.ldexp(gm * gm * P3 / S, 2 * (ge + ex))
        D2 = xp.ldexp(P2 / gm / S, ex - ge)  # E_p[d^2] (for the deep flat top below)
        K2 = M2 - nu * nu
        K3 = M3 - 3.0 * nu * M2 + 2.0 * nu * nu * nu
        K3 = xp.where(xp.isfinite(K3), K3, 0.0 * K3)  # (only refines Halley's step)
        # Deep on a flat top of a float64 row spanning ~1e300 (gamma sigma < 1e-154), E_p[y^2]
        # underflows; the cumulants of d do not, so they stand in, with K2 kept above 2^-1000:
        # the flat top's jump is then by 1e150 at least, not lost.
        k2 = D2 - mu * mu
        measured = (k2 > 0) & (k2 < math.inf)
        spread = xp.where(live & measured, xp.sqrt(xp.where(measured, k2, 1.0 + 0.0 * k2)),
                          xp.where(live & (mu < 0), -mu, spread))
        deep = ~((K2 > 2.0 ** -900) & (K2 < math.inf)) & measured
        K2 = xp.where(deep, xp.maximum(gamma * gamma * k2, 2.0 ** -1000 + 0.0 * k2), K2)
        K3 = xp.where(deep, 0.0 * K3, K3)
        new, lo_n, hi_n = halley_update(xp, gamma, lo, hi, f, r, q, K2, K3, f_prev)
        done = done | (new == gamma)  # settled: float64 cannot get closer (halley_update)
        gamma = xp.where(done, gamma, new)
        lo = xp.where(done, lo, lo_n)
        hi = xp.where(done, hi, hi_n)
        f_prev = xp.where(live, f, f_prev)
        if done.all():  # (e still holds the last evaluation's weights)
            break

    # p = (e + at_max) / S: the c maxima weigh 1; on the lower edge (gamma = inf) only they do,
    # on the upper edge (gamma = 0) every live logit weighs 1 (below is 1 strictly below the max).
    if lo_edge.any() or hi_edge.any():
        e.mul_(sc.put(0, 1.0 * inner)).addcmul_(below, sc.put(1, 1.0 * hi_edge))
        S = xp.where(lo_edge, c, xp.where(hi_edge, n_live, S))
        gamma = xp.where(lo_edge, math.inf, gamma)
        mu = xp.where(lo_edge, 0.0, mu)
    e.add_(at_max).mul_(sc.put(0, 1.0 / S))
    if e is not out:
        out.copy_(e)
    res[0], res[1], res[2], res[3] = gamma * scale, mu / scale, evals, m


def entropy_normalize_torch(z2d: torch.Tensor, t: torch.Tensor, block_elems: int = BLOCK_ELEMS,
                            fused_min_elems: int | None = None):
    """Reference forward on (rows, n) logits and (rows,) targets.

    Returns (p in z2d's dtype, gamma, zbar, evals), the last three (rows,); gamma and zbar in the
    accumulation dtype (float64 for float64 logits, else float32).  ``zbar = E_p[z]`` on valid
    rows and the coded row max elsewhere; evals counts the evaluations of H.  float32, fp16 and
    bf16 inputs on the CPU of at least ``fused_min_elems`` logits (default
    ``kernels.cpu.entropy_normalization.MIN_ELEMS``) take the C kernel of
    ``kernels.cpu.entropy_normalization`` (the same iteration with float32 sweeps, a row at a
    time in cache; the rows it declines come back here).  Other inputs are solved in float64, in
    blocks of about ``block_elems`` logits (all rows at once on a GPU), to the tolerance of their
    accumulation dtype.

    Accuracy: the bound of the module docstring, |H(p) - t*| <= (16 eps + u)(1 + t*) plus the
    fp16 subnormal term, wherever the logits lie in the dtype's range.  Where the root gamma
    exceeds the accumulation dtype's range (a float32 row whose spread is below ~1e-37), p is
    still right; gamma is returned as the dtype's largest finite value, with a RuntimeWarning
    naming the rows.
    """
    rows, n = z2d.shape
    acc = compute_dtype(z2d)
    tt = t.detach().to(device=z2d.device, dtype=torch.float64)
    fused = fused_cpu.solve(z2d, tt, MAX_EVALS, FTOL_ULPS) if fused_cpu.enabled(z2d, fused_min_elems) else None
    if fused is not None:
        p, gamma, mu, evals, m = fused
        zbar = coded_lse(m, m + mu)
        # Rows the kernel declined (their gamma or span left float32's range), and rows it could
        # not finish in float32: solved here in float64.
        # (A declined row reports -1 - the sweeps it took; they count with the float64 ones.)
        redo = ((evals < 0) | (evals >= MAX_EVALS)).nonzero().flatten()
        if redo.numel():
            p64, g64, z64, e64 = _solve_float64(z2d[redo], tt[redo], float(torch.finfo(acc).eps), block_elems)
            spent = torch.where(evals[redo] < 0, -1.0 - evals[redo], evals[redo])
            p[redo], gamma[redo], zbar[redo], evals[redo] = p64.to(p.dtype), g64, z64, e64 + spent
        return p.to(z2d.dtype), _gamma_in(gamma, acc), zbar.to(acc), evals
    p, gamma, zbar, evals = _solve_float64(z2d, tt, float(torch.finfo(acc).eps), block_elems)
    return p, _gamma_in(gamma, acc), zbar.to(acc), evals


def _solve_float64(z2d, t, eps, block_elems=BLOCK_ELEMS):
    """The block solver on (rows, n) logits of any float dtype, in float64, to FTOL_ULPS * eps * t.
    Returns (p in z2d's dtype, then gamma, zbar, evals as float64 vectors)."""
    rows, n = z2d.shape
    p = torch.empty_like(z2d, memory_format=torch.contiguous_format)
    res = torch.empty(4, rows, dtype=torch.float64, device=z2d.device)
    xp = _scalar_ns(z2d.device)
    tx, rx = (t.numpy(), res.numpy()) if xp is not torch else (t, res)
    step = rows if z2d.is_cuda else max(1, block_elems // max(n, 1))
    ctx = xp.errstate(all="ignore") if xp is not torch else contextlib.nullcontext()
    with ctx:  # numpy warns on the x/0 that the where-selections discard
        for r0 in range(0, rows, step):
            sl = slice(r0, min(rows, r0 + step))
            _solve_block(z2d[sl].to(torch.float64), tx[sl], eps, p[sl], rx[:, sl])
    # zbar = E_p[z] on valid rows; elsewhere the row max, which codes the fault (coded_lse).
    return p, res[0], coded_lse(res[3], res[3] + res[1]), res[2]


def _gamma_in(gamma, acc):
    """gamma (float64) in the accumulation dtype.  A root beyond that dtype's range (a float32 row
    whose spread is below about 1e-37: the float64 solve found it) cannot be returned: it is
    saturated to the dtype's largest finite value, and a RuntimeWarning names the rows."""
    big = torch.isfinite(gamma) & (gamma > torch.finfo(acc).max)
    if bool(big.any()):
        idx = big.nonzero().flatten()
        rows = ", ".join(str(i) for i in idx[:5].tolist()) + (", ..." if idx.numel() > 5 else "")
        warnings.warn(f"entropy_normalize: row(s) {rows}: the root gamma ({gamma[idx[0]].item():.3g}) exceeds "
                      f"{acc}'s range (the logits' spread is below about 1 / max); p meets the target, "
                      f"but gamma is returned as {torch.finfo(acc).max:.3g}", RuntimeWarning, stacklevel=4)
        gamma = torch.where(big, torch.finfo(acc).max, gamma)
    return gamma.to(acc)


def entropy_normalize_vjp(z2d, p, gamma, grad_p, grad_gamma, zbar=None):
    """Implicit-function backward, in torch ops (differentiable again, for double backward).

    z2d (rows, n), p (rows, n), gamma (rows,), grad_p (rows, n) or None, grad_gamma (rows,) or
    None.  ``zbar = E_p[z]`` is recomputed from p and z unless given.  Returns (grad_z in z's
    dtype, grad_t in the accumulation dtype); the edge rows (gamma = 0 or +inf) get 0.
    """
    acc = gamma.dtype
    pa = p.to(acc)
    zc = z2d.to(acc)
    live = zc > float("-inf")
    z_live = torch.where(live, zc, 0.0)  # -inf logits have p = 0: keep infinities out of every product
    if zbar is None:
        zbar = (pa * z_live).sum(-1)
    dz = torch.where(live, z_live - zbar.unsqueeze(-1), 0.0)
    k2 = (pa * dz * dz).sum(-1)
    interior = torch.isfinite(gamma) & (gamma > 0) & (k2 > 0)
    # Safe stand-ins on the edge rows, so that no branch of a where() holds an inf or a NaN that a
    # second derivative would multiply by 0.
    gamma_s = torch.where(interior, gamma, 1.0)
    k2_s = torch.where(interior, k2, 1.0)
    g_gamma = torch.zeros_like(gamma) if grad_gamma is None else grad_gamma.to(acc)
    gz = torch.zeros_like(pa)
    if grad_p is not None:
        gp = grad_p.to(acc)
        gbar = (pa * gp).sum(-1, keepdim=True)
        gx = pa * (gp - gbar)  # gradient w.r.t. x = gamma z through softmax
        g_gamma = g_gamma + (gx * dz).sum(-1)  # = <gx, z> because sum(gx) = 0
        gz = gx * gamma_s.unsqueeze(-1)
    coef = g_gamma * gamma_s / k2_s
    gz = gz - coef.unsqueeze(-1) * pa * dz
    gt = -g_gamma / (gamma_s * k2_s)
    # Edge rows (gamma = 0 or inf) are locally constant: their gradient is 0 by definition.
    gz = torch.where(interior.unsqueeze(-1), gz, 0.0)
    gt = torch.where(interior, gt, 0.0)
    return gz.to(z2d.dtype), gt


def _warn_if_capped(evals):
    """Warn (naming the rows) if a row spent all MAX_EVALS evaluations: its |H - target| may
    then exceed the tolerance.  No such row is known; the warning keeps one from passing silently."""
    if not value_checks_active(evals):
        return
    capped = (evals >= MAX_EVALS).nonzero().flatten()
    if capped.numel():
        rows = ", ".join(str(i) for i in capped[:5].tolist()) + (", ..." if capped.numel() > 5 else "")
        warnings.warn(f"entropy_normalize: row(s) {rows} used all {MAX_EVALS} evaluations of H; their entropy "
                      "may miss the target by more than the tolerance", RuntimeWarning, stacklevel=4)


# ---- the solver and the Triton path, registered as operators (see _library.py) -------------
# The root solve iterates until each row converges, which no compiler can trace: on the torch
# backend it is an opaque operator (C kernel or eager solver inside), everything around it is
# traced.
@torch.library.custom_op("entmath::entropy_normalize_solve", mutates_args=())
def entropy_normalize_solve(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor]:
    """(p, gamma, zbar, evals) of the rows of z (rows, n) for the targets t (rows,): the torch
    backend's forward (``entropy_normalize_torch``)."""
    p, gamma, zbar, evals = entropy_normalize_torch(rows_2d(z), t)
    # The per-row results may be views of one scratch tensor; an operator's outputs may not alias.
    return p, gamma.clone(), zbar.clone(), evals.clone()


@entropy_normalize_solve.register_fake
def _(z, t):
    rows = z.shape[0]
    acc = acc_dtype(z)
    return (torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(rows, dtype=acc),
            z.new_empty(rows, dtype=acc), z.new_empty(rows, dtype=torch.float64))


@triton_kernel_op("entropy_normalize_triton")
def entropy_normalize_triton(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, gamma, zbar) of the rows of z (rows, n) for the targets t (rows,), by the Triton kernel."""
    return kernels("entropy_normalization").entropy_normalize_fwd(rows_2d(z), t)


@entropy_normalize_triton.register_fake
def _(z, t):
    acc = acc_dtype(z)
    return (torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(z.shape[0], dtype=acc),
            z.new_empty(z.shape[0], dtype=acc))


@triton_kernel_op("entropy_normalize_backward_triton")
def entropy_normalize_backward_triton(z: torch.Tensor, p: torch.Tensor, gamma: torch.Tensor, zbar: torch.Tensor,
                                      grad_p: Optional[torch.Tensor],
                                      grad_gamma: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dz, dL/dt) by the implicit function theorem, one Triton kernel."""
    return kernels("entropy_normalization").entropy_normalize_bwd(rows_2d(z), p, gamma, zbar, grad_p, grad_gamma)


@entropy_normalize_backward_triton.register_fake
def _(z, p, gamma, zbar, grad_p, grad_gamma):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(gamma)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[2:])  # zbar (and the evaluation count)
    ctx.save_for_backward(inputs[0], *output[:3])


def _backward(ctx, grad_p, grad_gamma, *_, kernel=False):
    z, p, gamma, zbar = ctx.saved_tensors
    if kernel and not torch.is_grad_enabled():
        gz, gt = torch.ops.entmath.entropy_normalize_backward_triton(z, p, gamma, zbar, grad_p, grad_gamma)
    else:
        gz, gt = entropy_normalize_vjp(z, p, gamma, grad_p, grad_gamma,
                                       zbar=None if torch.is_grad_enabled() else zbar)
    return gz, gt.to(ctx.t_dtype)


def _setup_op(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.t_dtype = inputs[1].dtype


# Direct callers of the operators get the same autograd (the torch formula).
entropy_normalize_solve.register_autograd(_backward, setup_context=_setup_op)
entropy_normalize_triton.register_autograd(_backward, setup_context=_setup_op)
register_row_vmap(entropy_normalize_solve, (1, 0))
register_row_vmap(entropy_normalize_triton, (1, 0))


class _EntropyNormalize(torch.autograd.Function):
    """(p, gamma) with p = softmax(gamma z) and H(p) = t for the rows of z2d (rows, n), as one
    autograd unit on either backend; also (zbar, evals), which are not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z2d, t, backend):
        if backend == "triton":
            p, gamma, zbar = torch.ops.entmath.entropy_normalize_triton(z2d, t)
            return p, gamma, zbar, torch.zeros_like(zbar, dtype=torch.float64)
        return torch.ops.entmath.entropy_normalize_solve(z2d, t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.t_dtype = inputs[1].dtype
        ctx.backend = inputs[2]

    @staticmethod
    def backward(ctx, grad_p, grad_gamma, _g_zbar, _g_evals):
        gz, gt = _backward(ctx, grad_p, grad_gamma, kernel=ctx.backend == "triton")
        return gz, gt, None


def _normalize(z, t, backend):
    """Shared by entropy_normalize, solve_gamma and sample: (p, gamma) along the last dim of z."""
    z2d = rows_2d(z)
    p, gamma, zbar, evals = _EntropyNormalize.apply(z2d, t.reshape(-1), backend)
    # zbar = E_p[z] is finite exactly when the row is valid (no NaN, no +inf, some finite
    # logit); otherwise it is the row max, NaN / +inf / -inf, which names the fault.
    check_rows_finite(zbar.view(z.shape[:-1]), "logits")
    if backend != "triton":
        _warn_if_capped(evals)
    bad = ~torch.isfinite(zbar)
    p = torch.where(bad.unsqueeze(-1), float("nan"), p)  # a bad row is NaN (validation off)
    gamma = torch.where(bad, float("nan"), gamma)
    return p.view(z.shape), gamma.view(z.shape[:-1]).to(z.dtype)


def _prepare(logits, target, dim, backend, name="target"):
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    backend = resolve_backend(backend, logits)
    z = logits.movedim(dim, -1)
    t = _check_target(target, z.shape[:-1], z, name)
    return z, t, dim, backend


def _target_float(target: numbers.Real) -> float:
    """A real number as a float; one beyond float64 (an int such as 10**400) as +-inf, so that a
    huge target is the documented edge (uniform on the support) and a huge negative one the
    "must be >= 0" error, never an OverflowError."""
    try:
        return float(target)
    except OverflowError:
        return math.inf if target > 0 else -math.inf


def _check_target(target, rows_shape, z, name):
    """``target`` as a tensor of the rows' shape (differentiable if it was), or a clear error."""
    if isinstance(target, torch.Tensor):
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got dtype {target.dtype}")
        t = target if target.is_floating_point() else target.to(compute_dtype(z))
        t = t.to(z.device)
    elif isinstance(target, numbers.Real) and not isinstance(target, bool):
        # A Python number keeps its double precision: log(2) must stay log(2) for a fp32 row
        # whose two maxima make log(2) its infimum.
        t = torch.tensor(_target_float(target), dtype=torch.float64, device=z.device)
    else:
        raise TypeError(f"{name} must be a real number or a tensor, got {type(target).__name__}")
    try:
        shape = torch.broadcast_shapes(t.shape, rows_shape)
    except RuntimeError:
        shape = None
    if shape != tuple(rows_shape):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the rows of logits, shape {tuple(rows_shape)}"
        )
    td = t.detach()
    if not value_checks_active(td):
        return t.expand(rows_shape)
    if bool(torch.isnan(td).any()):
        raise ValueError(f"{name} contains NaN; an entropy target must be a number >= 0 (nats)")
    if bool((td < 0).any()):
        raise ValueError(f"{name} must be >= 0 (an entropy in nats), got a minimum of {td.min().item()}")
    return t.expand(rows_shape)


def entropy_normalize(logits: torch.Tensor, target, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Probabilities ``softmax(gamma * logits)`` along ``dim`` whose Shannon entropy is ``target``.

    The power transform p_i -> p_i^gamma / sum_j p_j^gamma of Chapter 2 (熵归一化, entropy
    normalization): it keeps the order of the probabilities and, with gamma >= 0 chosen per row,
    sets the entropy to ``target`` nats.

    Args:
        logits: floating-point tensor (fp16, bf16, fp32 or fp64), any leading shape.  ``-inf``
            entries are impossible classes: they stay at probability 0 and are not part of the
            support.
        target: the entropy in nats, a number >= 0 or a tensor that broadcasts to the rows
            (``logits`` without ``dim``); ``+inf`` is allowed (it means "as flat as possible").
        dim: the class dimension.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``entmath._backend``).

    Returns:
        Probabilities with the shape and dtype of ``logits`` (fp16/bf16 are computed in fp32).
        Rows with ``target >= log|support|`` are uniform on the support; rows with
        ``target <= log(number of maximal logits)`` (and below log|support|) are uniform on the
        arg-max set.  Otherwise ``|H(p) - target|`` is within a few ulp of ``target`` in the
        accumulation dtype.  Differentiable in ``logits`` and ``target`` by the implicit function
        theorem; the two edge cases have gradient 0.

    The op never changes torch's process-wide settings (thread count included); to run it
    single-threaded on a busy CPU, call ``torch.set_num_threads(1)`` yourself.  On the CPU,
    float32 inputs of at least 2^16 logits run a C kernel that solves each row in cache, on
    ``torch.get_num_threads()`` threads: the first such call on a machine compiles it with the
    machine's C compiler (seconds) into a per-user cache, from which later processes load it in
    about 0.05 s (README); it is about twice as fast as the eager path or more.  Set ``ENTMATH_COMPILE=0`` to keep to the eager path; without a C compiler the op warns
    once and keeps to it.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor, or ``target`` is not real.
        ValueError: bad ``dim``; a row of ``logits`` contains NaN or +inf or is entirely ``-inf``;
            ``target`` is NaN, negative, or does not broadcast to the rows.

    Warns:
        RuntimeWarning: (torch backend) a row used all of its evaluations of H without meeting the
            tolerance; the warning names the rows.

    Examples:
        >>> logits = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
        >>> p = entmath.entropy_normalize(logits, 1.0)  # flattened to exactly 1 nat, order kept
        >>> p
        tensor([[0.6314, 0.2088, 0.1201, 0.0397]])
        >>> -(p * p.log()).sum(-1)
        tensor([1.])
    """
    z, t, dim, backend = _prepare(logits, target, dim, backend)
    p, _ = _normalize(z, t, backend)
    return p.movedim(-1, dim)


def solve_gamma(logits: torch.Tensor, target, dim: int = -1, keepdim: bool = False, *,
                backend: str = "auto") -> torch.Tensor:
    """The exponent gamma >= 0 per row with H(softmax(gamma * logits)) = target (Chapter 2).

    Arguments as for :func:`entropy_normalize`.  The result has the dtype of ``logits`` and the
    shape of ``logits`` without ``dim``; with ``keepdim=True`` that dimension is kept with size 1,
    so ``softmax(gamma * logits, dim)`` broadcasts.  ``gamma = 0`` where ``target >=
    log|support|``; ``gamma = +inf`` where ``target <= log(number of maximal logits)`` (then
    softmax(gamma * logits) is understood as its limit, the uniform distribution on the arg-max
    set).  For a constant row every gamma gives the same distribution and the rule above picks
    0 or +inf.  Differentiable (implicit function theorem), with gradient 0 at the two edges.

    Examples:
        >>> logits = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
        >>> gamma = entmath.solve_gamma(logits, 1.0)
        >>> gamma
        tensor([0.5533])
        >>> entmath.entropy(gamma[:, None] * logits)
        tensor([1.])
    """
    z, t, dim, backend = _prepare(logits, target, dim, backend)
    _, gamma = _normalize(z, t, backend)
    return gamma.unsqueeze(dim) if keepdim else gamma


#: torch.multinomial draws from at most this many classes; beyond, ``sample`` inverts the CDF.
MULTINOMIAL_MAX_CLASSES = 1 << 24


def _eager(z: torch.Tensor) -> bool:
    """True when nothing traces or fakes ``z``: the solver may then be called directly, without
    the operator and autograd layers that a traced or differentiated call needs."""
    return (not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None
            and not z.is_meta and not isinstance(z, torch._subclasses.FakeTensor))


def _sampling_probabilities(z: torch.Tensor, t: torch.Tensor, backend: str):
    """(p, valid) with p of ``_normalize``, for sampling (no gradient); ``valid`` says that every
    row is known to be a distribution (checked, or no bad row could have passed the checks).

    In eager mode on the torch backend, float32 CPU rows of any size go straight to the C kernel,
    which solves a short row in microseconds where the eager iteration's Python steps cost a
    millisecond; a sampler called once per generated token cannot afford the operator and
    autograd layers either.  Only when every row came back finished and valid is its p used as
    it is; otherwise (a bad row, a row the kernel declined or did not finish) the full path runs,
    with its errors, warnings and float64 re-solves."""
    z2d = rows_2d(z)
    if backend == "torch" and _eager(z) and fused_cpu.enabled(z2d, min_elems=1):
        out = fused_cpu.solve(z2d, t.reshape(-1), MAX_EVALS, FTOL_ULPS)
        if out is not None:
            p, _, _, evals, m = out
            if z2d.shape[0] <= 64:  # a few rows (decoding): Python reads them faster than 5 ops
                ok = all(0 <= e < MAX_EVALS for e in evals.tolist()) and all(map(math.isfinite, m.tolist()))
            else:
                ok = bool(((evals >= 0) & (evals < MAX_EVALS) & torch.isfinite(m)).all())
            if ok:
                return p.view(z.shape), True
    # With value checks active a bad row raises in _normalize; without, it comes back NaN.
    return _normalize(z, t, backend)[0], value_checks_active(z)


def _prepare_sampling(logits, target, dim, backend):
    """``_prepare`` for ``sample``; a Python number as the target is checked in Python (a sampler
    runs once per token, and the tensor checks cost as much as the solve of a short row)."""
    if not (isinstance(target, numbers.Real) and not isinstance(target, bool)):
        return _prepare(logits, target, dim, backend, name="target_entropy")
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    backend = resolve_backend(backend, logits)
    value = _target_float(target)
    if math.isnan(value):
        raise ValueError("target_entropy contains NaN; an entropy target must be a number >= 0 (nats)")
    if value < 0:
        raise ValueError(f"target_entropy must be >= 0 (an entropy in nats), got a minimum of {value}")
    z = logits.movedim(dim, -1)
    return z, torch.full(z.shape[:-1], value, dtype=torch.float64, device=z.device), dim, backend


def _one_draw_per_row(p2d: torch.Tensor, generator) -> torch.Tensor:
    """One index per row of a valid p2d (rows, n), any n: the exponential race, argmax_i p_i / E_i
    with E_i ~ Exp(1) (P[i wins] = p_i).  It is the algorithm of torch.multinomial(p, 1) (on the
    CPU the same draws for the same generator state: tests/test_sample.py), without the validity
    checks (reductions and a host read) it runs first: p is a distribution by construction here."""
    e = torch.empty_like(p2d).exponential_(generator=generator)
    return torch.div(p2d, e, out=e).argmax(-1, keepdim=True)


def _inverse_cdf_draws(p2d: torch.Tensor, num_samples: int, replacement: bool, generator) -> torch.Tensor:
    """Class indices drawn from the rows of p2d (rows, n) for any n, where torch.multinomial stops
    at 2^24 classes: with replacement, uniform draws located in the float64 cumulative sums (a
    class of probability 0 has an empty interval and is never drawn); without, the exponential
    race (the k largest p_i / E_i, E_i ~ Exp(1), which is sampling without replacement)."""
    if replacement:
        cdf = p2d.double().cumsum(-1)
        u = torch.rand(p2d.shape[0], num_samples, dtype=torch.float64, device=p2d.device,
                       generator=generator) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_max_(p2d.shape[1] - 1)
    e = torch.empty(p2d.shape, dtype=torch.float64, device=p2d.device).exponential_(generator=generator)
    return (p2d.double() / e).topk(num_samples, dim=-1).indices


def sample(logits: torch.Tensor, target_entropy, num_samples: int = 1, generator: torch.Generator | None = None,
           dim: int = -1, *, replacement: bool = True, backend: str = "auto") -> torch.Tensor:
    """Draw class indices from ``entropy_normalize(logits, target_entropy, dim)`` (Chapter 2).

    Entropy-targeted sampling: every row is sharpened or flattened to the same entropy before it
    is sampled, an alternative to top-k / top-p truncation.

    Args:
        logits: floating-point tensor, any leading shape, classes along ``dim`` (as for
            :func:`entropy_normalize`; ``-inf`` entries are never drawn).
        target_entropy: the entropy in nats of the distribution each row is sampled from: a
            number >= 0 or a tensor that broadcasts to the rows.
        num_samples: draws per row, >= 1.
        generator: an optional ``torch.Generator`` for the draws (as for ``torch.multinomial``).
        dim: the class dimension.
        replacement: draw with replacement (the default) or without (then ``num_samples`` may
            not exceed the number of classes a row can draw).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``entmath._backend``).

    Returns:
        int64 indices with the shape of ``logits`` where ``dim`` now has size ``num_samples``.
        Not differentiable.  The draws are those of ``torch.multinomial`` (one draw per row: its
        exponential race, run without its checks; on the CPU the same draws for the same
        generator state); beyond the 2^24 classes it accepts, several draws with replacement
        invert the CDF in float64.

    Cost.  On the CPU a call costs a small multiple of ``torch.softmax`` + ``torch.multinomial``
    on the same logits: eager float32 calls solve every row with the C kernel, whatever its size
    (``benchmarks/bench_sample.py`` measures the ratio).

    Raises:
        TypeError: ``num_samples`` is not an int, ``generator`` is not a ``torch.Generator``, and
            the errors of :func:`entropy_normalize`.
        ValueError: ``num_samples < 1``, or ``num_samples`` exceeds a row's support when
            ``replacement=False``, and the errors of :func:`entropy_normalize`.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
        >>> idx = entmath.sample(logits, 1.0, num_samples=5, generator=g)  # each row at 1 nat
        >>> idx.shape, idx.dtype
        (torch.Size([2, 5]), torch.int64)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(replacement, bool):
        raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
    num_samples = int(num_samples)
    with torch.no_grad():
        z, t, dim, backend = _prepare_sampling(logits, target_entropy, dim, backend)
        p, valid = _sampling_probabilities(z, t, backend)
        p2d = p.reshape(-1, p.shape[-1])
        if p2d.dtype in (torch.float16, torch.bfloat16):
            p2d = p2d.float()
        if valid and replacement and num_samples == 1:
            return _one_draw_per_row(p2d, generator).view(*p.shape[:-1], 1).movedim(-1, dim)
        if not replacement:
            support = (p2d > 0).sum(-1).min().item() if p2d.shape[0] else num_samples
            if num_samples > support:
                raise ValueError(
                    f"num_samples={num_samples} exceeds the support ({support} classes) of a row; "
                    "use replacement=True"
                )
        if p2d.shape[-1] > MULTINOMIAL_MAX_CLASSES:
            idx = _inverse_cdf_draws(p2d, num_samples, replacement, generator)
        else:
            idx = torch.multinomial(p2d, num_samples, replacement=replacement, generator=generator)
        return idx.view(*p.shape[:-1], num_samples).movedim(-1, dim)
