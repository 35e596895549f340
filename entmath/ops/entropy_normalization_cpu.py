"""The fused CPU path of entropy normalization (Chapter 2): each evaluation of H is one loop.

The eager torch path (``entropy_normalization.py``) spends a separate sweep over the row on every
product and sum of an evaluation: about ten per Halley step.  Here the same iteration runs on
loops that ``torch.compile`` (Inductor's C++ backend: OpenMP over rows, SIMD over classes,
cascade summation) turns into one sweep each:

* ``row_setup``: the max m, the count c of maximal entries, the size of the support and the first
  two moments of d = z - m on it, which give the start gamma_0 (the root of the Taylor expansion
  of H at gamma = 0) and the two edges (gamma = 0 and gamma = inf);
* ``evaluate``: for one gamma per row, the sums T = sum e, sum e d, sum e d^2, sum e d^3 over the
  entries below the max, e = exp(gamma d); the scalar Halley step between sweeps is
  ``halley_update`` of the eager path (numpy on vectors of rows);
* ``write_weights``: the last sweep.  A Halley step below ``PREDICT_STEP`` lands on the root to
  float32 accuracy as a rule (the convergence is cubic), so instead of evaluating there and then
  writing p, one sweep writes exp(gamma d) and takes the sums that check it.  Rows whose check
  fails (a few percent) iterate on and are rewritten by ``write_weights_of_rows``; then one
  in-place pass divides by S.

Only the rows still iterating are swept (the kernels gather them by index), so a slow row does
not make every row pay.  A sweep reads the row once; the whole solve reads it about four times
and writes it twice, against ten sweeps per evaluation on the eager path.

Compiling costs seconds once per process (about 40 s with an empty Inductor cache on a 2-core
machine, 8 s with a warm one), so the path is taken only for float32 inputs of at least
``MIN_ELEMS`` logits on the CPU, where it repays that within a few calls; ``ENTMATH_COMPILE=0``
turns it off, and if compilation fails (no C++ compiler) the op warns once and stays on the eager
path.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings

import torch

__all__ = ["enabled", "solve"]

#: Smallest input (rows x classes) for the fused path: 4 MiB of float32.
MIN_ELEMS = 1 << 20
NEG_INF = float("-inf")

_compiled = {}
_failed = False


#: -inf logits are clamped to the lowest float before the exponential: exp(gamma d) is then
#: exactly 0 for every gamma above ``GAMMA_FLOOR``, and the products e * d * d * d stay 0 (each
#: factor is finite), where -inf would give 0 * inf = NaN.
LOWEST = torch.finfo(torch.float32).min
GAMMA_FLOOR = 1000.0 / -LOWEST
#: A Halley step smaller than this (relative) is taken to land on the root: the next sweep writes
#: p there and checks it in the same loop, instead of an evaluation sweep and then a write.
#: (Halley converges cubically: the step after a 1% step is typically ~1e-6.)
PREDICT_STEP = 0.01
#: The error of H from ``evaluate``'s float32 sums, in ulp of the terms of H (measured: a few
#: 1e-6 relative at n = 32000, i.e. ~30 ulp); below it a residual says nothing.
STEER_NOISE_ULPS = 64.0


def row_setup(z):
    """(m, c, n_live, sum d, sum d^2) per row: d = z - m over the support, c counts the maxima."""
    m = z.amax(-1, keepdim=True)  # NaN for a row with a NaN, +inf / -inf for the bad rows
    d = z - m
    finite = z > NEG_INF
    dl = torch.where(finite, d, 0.0)
    c = torch.where(d == 0, 1.0, 0.0).sum(-1)
    return m, c, torch.where(finite, 1.0, 0.0).sum(-1), dl.sum(-1), (dl * dl).sum(-1)


def evaluate(z, rows, m, gamma):
    """(T, sum e d, sum e d^2, sum e d^3) for the ``rows`` of ``z``, e = exp(gamma d).

    ``m``, ``gamma``: (len(rows), 1); gamma at least ``GAMMA_FLOOR``.  The sums run over the
    entries strictly below the max: the maxima (weight 1 each) enter through their count c, which
    keeps T accurate when it is tiny next to c, and -inf logits weigh 0.
    """
    d = torch.clamp_min(z[rows] - m, LOWEST)  # a gather by row index: live rows read in place
    e = torch.where(d == 0, 0.0, torch.exp(gamma * d))
    ed = e * d
    edd = ed * d
    return torch.stack([e.sum(-1), ed.sum(-1), edd.sum(-1), (edd * d).sum(-1)])


def write_weights(z, m, gamma, out):
    """out = exp(gamma d) in place (1 at the maxima, 0 at -inf logits); returns (T, sum e d).

    The last sweep: it writes the unnormalised p at the gamma where the iteration stopped (or
    predicts the root) and, in the same loop, the two sums that check it and normalise p.  These
    two are accumulated in float64: in float32 each SIMD lane adds n/16 terms in sequence, which
    leaves T and sum e d with relative errors of a few 1e-6 at n = 32000, and H = log S - gamma
    sum e d / S magnifies them (its two terms nearly cancel); a float64 accumulator costs about a
    third of a sweep.  ``evaluate`` keeps float32: its sums only steer.
    """
    d = torch.clamp_min(z - m, LOWEST)
    at_max = d == 0
    e = torch.where(at_max, 0.0, torch.exp(gamma * d))
    out.copy_(torch.where(at_max, 1.0, e))
    return torch.stack([e.double().sum(-1), (e * d).double().sum(-1)])


def write_weights_of_rows(z, rows, m, gamma, out):
    """``write_weights`` for the ``rows`` of ``z`` (those the last sweep found short of the root),
    with the float32 sums e d^2, e d^3 for their next step."""
    d = torch.clamp_min(z[rows] - m, LOWEST)
    at_max = d == 0
    e = torch.where(at_max, 0.0, torch.exp(gamma * d))
    out[rows] = torch.where(at_max, 1.0, e)
    ed = e * d
    edd = ed * d
    return torch.stack([e.double().sum(-1), ed.double().sum(-1), edd.sum(-1).double(), (edd * d).sum(-1).double()])


def _compile(fn):
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn.__name__]


def enabled(z2d: torch.Tensor, min_elems: int = MIN_ELEMS) -> bool:
    """True if ``z2d`` (rows, n) takes the fused path: see the module docstring."""
    return (not _failed and z2d.device.type == "cpu" and z2d.dtype == torch.float32
            and z2d.numel() >= min_elems and z2d.shape[0] >= 2 and z2d.shape[1] >= 2
            and os.environ.get("ENTMATH_COMPILE", "1") != "0"
            and importlib.util.find_spec("numpy") is not None)


def _first_call(fn, *args):
    """Call the compiled ``fn``; on a compile failure, warn once and return None."""
    global _failed
    try:
        return _compile(fn)(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the eager path"
        if fn.__name__ in _compiled and getattr(_compiled[fn.__name__], "_entmath_ok", False):
            raise  # it compiled before: this is a real error, not a missing compiler
        _failed = True
        warnings.warn(f"entmath: torch.compile failed ({type(exc).__name__}: {exc}); "
                      "entropy_normalize uses its eager CPU path", RuntimeWarning, stacklevel=4)
        return None


def solve(z2d: torch.Tensor, t, max_evals: int, ftol_ulps: float):
    """The fused forward on contiguous float32 (rows, n) logits and float64 numpy targets (rows,).

    Returns (p, gamma, E_p[z] - max z, evaluations, max z) as in ``_solve_block``, the last four as
    float64 numpy vectors, or None if the compiler is unavailable.
    """
    with torch.no_grad():  # one compiled graph per kernel, whatever the caller's grad mode
        return _solve(z2d.contiguous(), t, max_evals, ftol_ulps)


def _solve(z2d, t, max_evals, ftol_ulps):
    import numpy as np

    from .entropy_normalization import halley_update, initial_gamma

    setup = _first_call(row_setup, z2d)
    if setup is None:
        return None
    _compiled["row_setup"]._entmath_ok = True
    m, c, n_live, s1, s2 = setup
    m_np = m.squeeze(-1).double().numpy()
    c, n_live = c.double().numpy(), n_live.double().numpy()
    s1, s2 = s1.double().numpy(), s2.double().numpy()
    eps = float(torch.finfo(torch.float32).eps)
    with np.errstate(all="ignore"):  # x/0 in the where-selections of the invalid rows
        mean = s1 / n_live
        k2_0 = s2 / n_live - mean * mean
        h_max, h_min = np.log(n_live), np.log(c)
        valid = np.isfinite(m_np) & (c > 0)
        hi_edge = valid & (t >= h_max)
        lo_edge = valid & ~hi_edge & (t <= h_min)
        inner = valid & ~hi_edge & ~lo_edge
        gamma = initial_gamma(np, h_max, t, k2_0)
        gamma = np.where(np.isfinite(gamma) & (gamma > 0), gamma, 1.0)
        gamma = np.where(hi_edge, 0.0, np.where(lo_edge, math.inf, gamma))
        q, ftol = t - h_min, ftol_ulps * eps * t
        lo, hi = np.zeros_like(gamma), np.full_like(gamma, math.inf)
        S, mu = np.where(valid, n_live, 1.0), np.where(hi_edge, mean, 0.0)
        evals = np.zeros_like(gamma)
        k2, k3 = np.zeros_like(gamma), np.zeros_like(gamma)
        m_col = m.view(-1, 1)

        def update(rows, sums, steer_only=False):
            """Take the sums at gamma[rows]; return the rows not yet converged and their Halley
            steps (gamma, lo, hi updated in place).  Without e d^2, e d^3 in ``sums``, the step
            uses the moments k2, k3 of the row's previous evaluation (they change slowly).  Also
            returns, per row, whether its next gamma is close enough to be the last sweep's: a
            step below PREDICT_STEP, or (``steer_only``: float32 sums, too coarse to decide
            convergence at 8 ulp) a residual within the error of those sums."""
            sums = sums.double().numpy()
            T, A1 = sums[0], sums[1]
            g = gamma[rows]
            Sg = c[rows] + T
            mug = A1 / Sg
            S[rows], mu[rows] = Sg, mug
            evals[rows] += 1
            r1, r2 = np.log1p(T / c[rows]), -g * mug  # H - log c = r1 + r2, both >= 0
            f = r1 + r2 - q[rows]  # H - t
            if len(sums) == 4:  # moments about the max (steering only: see _solve_row)
                M2 = sums[2] / Sg
                k2[rows] = M2 - mug * mug
                k3[rows] = sums[3] / Sg - 3.0 * mug * M2 + 2.0 * mug ** 3
            go = (hi[rows] - lo[rows] > 2.0 * eps * g) & (np.abs(f) > ftol[rows])
            # float32 sums: a residual within their error says "close", not "converged"
            quiet = steer_only & (np.abs(f) <= STEER_NOISE_ULPS * eps * (1.0 + r1 + r2))
            rows, g, f, quiet = rows[go], g[go], f[go], quiet[go]
            new, lo[rows], hi[rows] = halley_update(np, g, lo[rows], hi[rows], f, f + q[rows], q[rows],
                                                    k2[rows], k3[rows])
            gamma[rows] = np.maximum(new, GAMMA_FLOOR).astype(np.float32)  # the gamma evaluated next
            return rows, quiet | (np.abs(gamma[rows] / g - 1.0) <= PREDICT_STEP)

        def iterate(rows, out=None):
            """Evaluate and step until every row converges (or MAX_EVALS).  Without ``out``, a
            row also stops when its step is below PREDICT_STEP (its next gamma is then taken as
            the root, to be checked by the last sweep); with ``out``, each evaluated row is
            written into it, and the last write of a row is at its final gamma."""
            while rows.size and evals[rows].max() < max_evals:
                pad = np.append(rows, rows) if rows.size == 1 else rows  # no size-1 recompile
                idx = torch.from_numpy(pad)
                args = (z2d, idx, m_col[idx], torch.from_numpy(gamma[pad]).float().view(-1, 1))
                if out is None:
                    sums = _compile(evaluate)(*args)
                else:
                    sums = _compile(write_weights_of_rows)(*args, out)
                rows, close = update(rows, sums[:, : rows.size], steer_only=out is None)
                if out is None:
                    rows = rows[~close]

        gamma = np.where(inner, np.maximum(gamma, GAMMA_FLOOR).astype(np.float32), gamma)
        inner_rows = np.flatnonzero(inner)
        iterate(inner_rows)
        # The last sweep writes every row at its gamma (inf on lo_edge rows: the maxima only) and
        # checks every inner row with accurate sums; a miss (a few percent of the rows) iterates
        # on and is written again.  Its sums also give the S that normalises p.
        p = torch.empty_like(z2d)
        g_col = torch.from_numpy(np.where(inner, gamma, math.inf)).float().view(-1, 1)
        sums = _compile(write_weights)(z2d, m_col, g_col, p)
        missed, _ = update(inner_rows, sums[:, inner_rows])  # the float64 check
        iterate(missed, out=p)
        S = np.where(lo_edge, c, S)
        mu = np.where(lo_edge, 0.0, mu)
    side = np.flatnonzero(~inner & ~lo_edge)  # gamma = 0 (uniform on the support) and invalid rows
    if side.size:
        idx = torch.from_numpy(side)
        p[idx] = (z2d[idx] > NEG_INF).to(p.dtype)
    p.mul_(torch.from_numpy(1.0 / S).float().view(-1, 1))
    return p, gamma, mu, evals, m_np
