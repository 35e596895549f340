"""Per-row softmax statistics in torch, the reference twin of ``kernels/softmax_stats.py``."""
from __future__ import annotations

import torch

from .._validate import lowest


def softmax_stats(z: torch.Tensor):
    """For logits ``z`` (classes last, accumulation dtype) return ``(m, d, e, log_s)``.

    m = max z (keepdim), d = z - m with -inf clamped to the lowest finite value, e = exp(d)
    with the first maximal entry set to 0, and log S = log1p(sum e).  Leaving that entry (whose
    e is exactly 1) out of the sum keeps log S accurate for nearly one-hot rows.
    """
    m, argmax = z.max(dim=-1, keepdim=True)
    d = (z - m).clamp_min_(lowest(z.dtype))  # e = 0 and e * d = 0 for -inf logits
    e = d.exp()
    e.scatter_(-1, argmax, 0.0)
    log_s = torch.log1p(e.sum(-1))
    return m, d, e, log_s


def log_softmax_clamped(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log p = z - lse with -inf clamped to the lowest finite value, so p * log p = 0 there."""
    return (z - lse.unsqueeze(-1)).clamp_min_(lowest(z.dtype))
