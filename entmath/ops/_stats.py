"""Per-row softmax statistics in torch, the reference twin of ``kernels/triton/softmax_stats.py``.

Written for CPU speed as well as accuracy: fused torch primitives where they exist, in-place
updates of one temporary otherwise (an extra logits-sized allocation costs as much as a pass).
"""
from __future__ import annotations

import math

import torch

from .._validate import coded_lse, lowest


def log_normaliser(z: torch.Tensor):
    """Return ``(m, log_s)`` with m = max z (keepdim) and log S = log sum_i e^{z_i - m}.

    The first maximal entry contributes exactly 1 to S; it is kept out of the sum so that
    log S = log1p(rest) stays accurate when the row is nearly one-hot (rest << 1), where
    log(1 + rest) would round to 0.
    """
    m, argmax = z.max(dim=-1, keepdim=True)
    e = (z - m).exp_()
    e.scatter_(-1, argmax, 0.0)
    return m, torch.log1p(e.sum(-1))


def log_softmax_and_lse(z: torch.Tensor):
    """``(log p, lse)`` from torch's fused log_softmax; lse = max z - max log p costs two max passes
    instead of a separate logsumexp.  The lse is coded for validation (``coded_lse``)."""
    log_p = torch.log_softmax(z, dim=-1)
    m = z.amax(-1)
    return log_p, coded_lse(m, m - log_p.amax(-1))


def nan_unless_finite(lse: torch.Tensor) -> torch.Tensor:
    """A coded lse (NaN, +inf or -inf on a row without a distribution) as NaN there: a backward
    computed from it then gives the whole row NaN gradients, as torch's own ops do, instead of a
    NaN at one entry (which a later op might drop)."""
    return torch.where(torch.isfinite(lse), lse, float("nan"))


def clamped(x: torch.Tensor) -> torch.Tensor:
    """-inf -> lowest finite value, in place: then 0 * x = 0 where x was -inf."""
    return x.clamp_min_(lowest(x.dtype))


# ---- Summaries of a block of logits, and their associative merge -----------------------------
# (Moved here from ops/attention_entropy.py, which used them first; linear_cross_entropy and
# entmath.distributed use them too.)  A summary of a set of logits z_i is (m, R, A) with
# m = max z, S = sum_i e^{z_i - m} = 1 + R (the first maximal entry contributes exactly 1, left
# out of R so that log S = log1p(R) stays accurate) and A = sum_i e^{z_i - m} (z_i - m).  Then
# lse = m + log1p(R) and H = log1p(R) - A / (1 + R): Chapter 3 (eq-ln-rescale), Chapter 6.

def chunk_summary(z: torch.Tensor, masked: bool, moment: bool = True, gap: bool = False):
    """(m, R, A) of each row of one block of logits z (rows x columns), overwriting z; with
    ``gap`` also G = sum_i (m - z_i) >= 0 (+inf if some z_i = -inf), the sum of the logits that
    label smoothing needs, held relative to the maximum (``rebase_gap`` moves it to another).

    Max, e^{z-m} with the first maximal entry left out, first moment, computed in place: on CPU
    each pass over a block costs about as much as the matmul that made it, so every temporary
    matters.  ``entropy_torch`` uses it too (on a copy).  ``masked``: the block may hold -inf
    logits (they then contribute exactly 0); the row maximum must be finite (else R and A are NaN).
    ``moment=False``: A is not needed (no entropy); it is returned as zeros, two passes sooner.

    The deep tail: e^{z_i - m} is formed plainly, so where it rounds to 0 (z_i - m < -103.9 in
    float32) or to a subnormal, its moment term e^d d (representable down to d ~ -108.6) is lost
    or blurred with it; in a block whose every entry but the maximum lies that deep, that term is
    the whole entropy.  ``restore_tail`` recomputes (R, A) with ``exp_tail`` for the rows where
    the loss can show (only rows with a tiny A).  On the CPU that is a check of one value per row
    and a recomputation of the flagged rows only: on a 2 MiB float32 tile (64 x 8192, one thread)
    ordinary rows cost 2.25-2.40 ms before and after (within noise), a tile of rows all in the
    deep tail 13 -> 27 ms (their plain pass is already slow: subnormal arithmetic).  Elsewhere
    (CUDA, compiled, faked or torch.func-transformed calls) a host branch would be a sync, so the
    recomputation runs for every row, branch-free: about 2x this function's time, on the torch
    fallback only (the Triton kernels split the tail themselves, ``exp_tail``).
    """
    m, idx = z.max(-1, keepdim=True)
    d = z.sub_(m)  # d = z - m <= 0, exactly 0 at the maxima
    g = None
    if gap:  # a sum of terms >= 0: sum_i z_i itself would carry the offset's rounding (lse - mean z cancels)
        g = d.sum(-1).neg_()
        g = torch.where(torch.isneginf(m.squeeze(-1)), float("inf"), g)  # an all -inf row: -inf logits
    if masked and moment:
        d.clamp_min_(lowest(d.dtype))  # -inf -> lowest finite: e = 0 and e * d = 0, not NaN
    e = d.exp()
    e.scatter_(-1, idx, 0.0)  # leave the first maximal entry (e = 1) out: S = 1 + R
    r = e.sum(-1)
    if not moment:
        a = torch.zeros_like(r)
    else:
        a = e.mul_(d).sum(-1)  # sum e d; the maxima have d = 0 anyway
        r, a = restore_tail(d, r, a)
    return (m.squeeze(-1), r, a, g) if gap else (m.squeeze(-1), r, a)


def rebase_gap(g, n, m, new_m):
    """sum_i (new_m - z_i) over n logits, from g = sum_i (m - z_i) and new_m >= m: g + n (new_m - m),
    a sum of terms >= 0 (label smoothing's sum of the logits, merged across tiles, splits or ranks
    without the offset's cancellation).  +inf stays +inf; n = 0 adds nothing."""
    if isinstance(n, (int, float)) and n == 0:
        return g
    return torch.where(m == new_m, g, g + n * (new_m - m))


# The deep tail of a rescaling factor e^delta (the twin of kernels/triton/softmax_stats.py's
# exp_tail): below delta = -87.3 in float32 e^delta is subnormal and below -103.9 it is 0, while the
# moment's term e^delta delta S is still representable down to about -108.6 (1.6e-45: the whole
# entropy of a row whose other entries all lie that deep).  So e^delta is taken as e^{delta + 64}
# times e^-64, and the factor delta S is applied before the scale.  delta + 64 is exact there.
TAIL = -64.0
E_TAIL = 1.603810890548637853e-28  # e^-64


def exp_tail(delta: torch.Tensor):
    """(w, s) with e^delta = w s: s = 1 for delta >= TAIL, e^TAIL below, where w = e^{delta - TAIL}
    is a normal number wherever e^delta delta is representable.  Per-row factors (the merges),
    and the per-logit sums of the rows ``restore_tail`` recomputes."""
    deep = delta < TAIL
    w = torch.where(deep, delta - TAIL, delta).exp()
    return w, torch.where(deep, delta.new_full((), E_TAIL), delta.new_ones(()))


# What one entry's moment term can lose when e^d is formed plainly: below smallest_subnormal / 2
# e^d rounds to 0 (and a subnormal e^d is off by up to that much), times |d| <= -log(smallest) + 8;
# a row whose plain |A| exceeds n such losses over eps carries them inside its own rounding.
def _tail_threshold(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    tiny = fi.smallest_normal * fi.eps  # the smallest subnormal
    return tiny * (8 - math.log(tiny)) / fi.eps


def _tail_sums(d: torch.Tensor):
    """(R, A) of rows of d = z - m <= 0 (clamped: finite) with e^d split as ``exp_tail`` does: the shallow
    terms summed as they are, the deep ones as e^TAIL times a sum of normal numbers, so that no term
    e^d d that is representable is lost.  The first maximal entry (d = 0) is left out of R."""
    deep = d < TAIL
    w = torch.where(deep, d - TAIL, d).exp_()
    w.scatter_(-1, d.argmax(-1, keepdim=True), 0.0)  # argmax: the first maximal entry, as in R
    wd = w * d
    zero = w.new_zeros(())
    r = torch.where(deep, zero, w).sum(-1) + E_TAIL * torch.where(deep, w, zero).sum(-1)
    a = torch.where(deep, zero, wd).sum(-1) + E_TAIL * torch.where(deep, wd, zero).sum(-1)
    return r, a


def _may_branch(t: torch.Tensor) -> bool:
    """Whether a data-dependent Python branch on t is free: a plain CPU tensor in eager mode (on CUDA
    it would be a device-to-host sync; compiled, faked or torch.func-transformed it cannot run)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def restore_tail(d: torch.Tensor, r: torch.Tensor, a: torch.Tensor):
    """(R, A) of the rows of d = z - m (finite, <= 0) given the plain sums r = sum' e^d and
    a = sum e^d d, with the deep tail put back (``_tail_sums``) in the rows where it can matter:
    those whose |a| is under n losses per entry over eps (``_tail_threshold``).  A row with
    every other entry far below its maximum (or masked) has a tiny A and is recomputed; an ordinary
    row is not.  On the CPU only those rows are recomputed; elsewhere every row, branch-free."""
    if d.dim() == 1:  # one row (a 1-D input): as a batch of one
        r, a = restore_tail(d.unsqueeze(0), r.reshape(1), a.reshape(1))
        return r.reshape(()), a.reshape(())
    bad = a.neg() < d.shape[-1] * _tail_threshold(d.dtype)
    if _may_branch(d):
        if not bad.any():
            return r, a
        r_t, a_t = _tail_sums(d[bad])
        return r.index_put((bad,), r_t), a.index_put((bad,), a_t)
    r_t, a_t = _tail_sums(d)
    return torch.where(bad, r_t, r), torch.where(bad, a_t, a)


def merge_summaries(run, new):
    """Merge two (m, R, A) summaries of disjoint sets of logits (eq-ln-rescale, eq-lh-merge).

    With m = max(m1, m2) and delta_t = m_t - m <= 0, each S_t is rescaled by e^{delta_t} and each
    A_t becomes e^{delta_t} (A_t + delta_t S_t).  Associative and commutative, so blocks can be
    merged in any order or tree (vocabulary chunks, kernel splits, ranks).  Both maxima finite."""
    (m1, r1, a1), (m2, r2, a2) = run, new
    m = torch.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m  # <= 0; the side holding the maximum has 0
    (w1, t1), (w2, t2) = exp_tail(d1), exp_tail(d2)  # e^{d_t} = w_t t_t: the deep tail survives
    s1, s2 = 1 + r1, 1 + r2
    a = w1 * (a1 + d1 * s1) * t1 + w2 * (a2 + d2 * s2) * t2
    # R of the merged set: everything but the one entry at the new maximum, added without
    # forming 1 + R first (that rounding is what log1p avoids).
    r = torch.where(m2 > m1, r2 + w1 * s1 * t1, r1 + w2 * s2 * t2)
    return m, r, a
