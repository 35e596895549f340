"""Per-row softmax statistics in torch, the reference twin of ``kernels/triton/softmax_stats.py``.

Written for CPU speed as well as accuracy: fused torch primitives where they exist, in-place
updates of one temporary otherwise (an extra logits-sized allocation costs as much as a pass).
"""
from __future__ import annotations

import torch

from .._validate import coded_lse, lowest


def log_normaliser(z: torch.Tensor, keep_exp: bool = False):
    """Return ``(m, log_s)`` with m = max z (keepdim) and log S = log sum_i e^{z_i - m}.

    The first maximal entry contributes exactly 1 to S; it is kept out of the sum so that
    log S = log1p(rest) stays accurate when the row is nearly one-hot (rest << 1), where
    log(1 + rest) would round to 0.  With ``keep_exp`` also return e = exp(z - m) with that entry
    zeroed.
    """
    m, argmax = z.max(dim=-1, keepdim=True)
    e = (z - m).exp_()
    e.scatter_(-1, argmax, 0.0)
    log_s = torch.log1p(e.sum(-1))
    return (m, log_s, e) if keep_exp else (m, log_s)


def softmax_stats(z: torch.Tensor):
    """``(m, d, e, log_s)``: as ``log_normaliser(z, keep_exp=True)`` plus d = z - m with -inf
    clamped to the lowest finite value (so e * d = 0 there)."""
    m, log_s, e = log_normaliser(z, keep_exp=True)
    return m, clamped(z - m), e, log_s


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

    The statistics of ``softmax_stats`` (max, e^{z-m} with the first maximal entry left out,
    first moment), computed in place: on CPU each pass over a block costs about as much as the
    matmul that made it, so the two temporaries softmax_stats allocates matter.  ``masked``: the
    block may hold -inf logits (they then contribute exactly 0); the row maximum must be finite.
    ``moment=False``: A is not needed (no entropy); it is returned as zeros, two passes sooner.

    Known gap: e^{z_i - m} is formed plainly, so where it rounds to 0 (z_i - m < -103.9 in float32)
    its moment term is lost with it; in a block whose every entry but the maximum lies 104..109
    below it, that term is the whole entropy, a subnormal, and A comes out 0 (the Triton kernels
    split such terms with ``exp_tail``; here that cost 2-3x this function's time, so it is left:
    tests/test_extremes.py marks the case).  Each lost term is under 60 sigma (float32's smallest
    subnormal), inside the entropy bound's absolute term; only a result of 0 breaks the rule.
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
    a = e.mul_(d).sum(-1) if moment else torch.zeros_like(r)  # sum e d; the maxima have d = 0 anyway
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
    is a normal number wherever e^delta delta is representable.  Per-row factors (the merges):
    the per-logit sums of ``chunk_summary`` keep the plain e^d (see its docstring)."""
    deep = delta < TAIL
    w = torch.where(deep, delta - TAIL, delta).exp()
    return w, torch.where(deep, delta.new_full((), E_TAIL), delta.new_ones(()))


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
