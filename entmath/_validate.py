"""Argument checks shared by the ops.

Cheap structural checks (types, shapes, ``dim``) run before any computation.  Value checks
(NaN, +inf, rows with no finite logit) are read off the per-row log-normaliser that every op
computes anyway, so they cost a rows-sized reduction rather than another pass over the logits.
"""
from __future__ import annotations

import torch

__all__ = ["check_float_tensor", "normalize_dim", "check_rows_finite", "coded_lse", "compute_dtype", "lowest"]


def check_float_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")


def normalize_dim(x: torch.Tensor, dim, name: str) -> int:
    """Return ``dim`` as a non-negative index; the class dimension must exist and be non-empty."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the class dimension), got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} with {x.dim()} dimension(s)")
    dim %= x.dim()
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has an empty class dimension (size 0 along dim={dim}); softmax needs at least one class")
    return dim


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 stays fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lowest(dtype: torch.dtype) -> float:
    """Most negative finite value: clamping -inf to it turns 0 * (-inf) = NaN into 0 * finite = 0."""
    return torch.finfo(dtype).min


def check_rows_finite(lse: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> None:
    """Raise if some row's log-normaliser is not finite, naming ``name``, the cause and the rows.

    Every op returns its per-row lse *coded*: NaN if the row holds a NaN, +inf if it holds +inf,
    -inf if every logit is -inf (see ``coded_lse``).  So the cause is read off a rows-sized tensor,
    without another look at the logits (which an in-place op may already have overwritten).
    ``rows`` optionally restricts the check to a boolean mask of rows that matter.
    """
    bad = ~torch.isfinite(lse.reshape(lse.shape or (1,)))  # a 1-D input has a 0-dim lse: one row
    if rows is not None:
        bad &= rows.reshape(bad.shape)
    if not bool(bad.any()):
        return
    for test, what in ((torch.isnan, f"{name} contains NaN"),
                       (torch.isposinf, f"{name} contains +inf (softmax is undefined there)"),
                       (torch.isneginf, f"{name} has row(s) where every logit is -inf: the distribution has no support")):
        hit = bad & test(lse.reshape(bad.shape))
        if bool(hit.any()):
            idx = hit.nonzero()[:5].tolist()
            where = ", ".join(str(tuple(i)) if len(i) > 1 else str(i[0]) for i in idx)
            raise ValueError(f"{what} (row(s) {where})")


def coded_lse(m: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """lse where the row max m is finite, else m itself: NaN (a NaN in the row; torch's max
    propagates it), +inf (a +inf in the row) or -inf (no finite logit)."""
    return torch.where(torch.isfinite(m), lse, m)
