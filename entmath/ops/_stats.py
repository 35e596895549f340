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
