"""Shannon entropy of softmax(logits), in nats.  Derived in Chapter 1 (book/ch01_entropy.md).

Forward, with m = max_i z_i, d_i = z_i - m and S = sum_i e^{d_i}:

    H = lse(z) - sum_i p_i z_i = log S - (sum_i e^{d_i} d_i) / S.

The first maximal entry contributes exactly 1 to S; the rest, R = S - 1, is summed on its own so
that log S = log1p(R) keeps its relative accuracy for nearly one-hot rows.  -inf logits have
e^{d_i} = 0 and contribute 0 (the 0 log 0 = 0 convention), never 0 * (-inf) = NaN.

Backward (Chapter 1, the gradient of the entropy):  dH/dz_k = -p_k (log p_k + H).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, coded_lse, normalize_dim
from ._rows import kernels, rows_2d, upcast
from ._stats import clamped, softmax_stats

__all__ = ["entropy"]


def entropy_torch(z: torch.Tensor):
    """Reference forward along the last dim.  Returns (H, lse) in the accumulation dtype."""
    z = upcast(z)
    m, d, e, log_s = softmax_stats(z)  # d = z - m, e = exp(d) without the first maximal entry
    moment = e.mul_(d).sum(-1)  # sum_i e^{d_i} d_i; the maximal entry has d = 0 anyway
    h = log_s - moment / log_s.exp()
    m = m.squeeze(-1)
    return h, coded_lse(m, m + log_s)


def entropy_backward_torch(z: torch.Tensor, grad_h, h, lse):
    zc = upcast(z)
    log_p = clamped(zc - lse.unsqueeze(-1))
    p = log_p.exp()
    g = p.mul_(log_p.add_(h.unsqueeze(-1))).mul_(-grad_h.unsqueeze(-1).to(zc.dtype))
    return g.to(z.dtype)


class EntropyFunction(torch.autograd.Function):
    """H(softmax(z)) along the last dim of z; backward dH/dz = -p (log p + H)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, backend: str):
        if backend == "triton":
            h, lse = kernels("entropy").entropy_fwd(rows_2d(z))
            h, lse = h.view(z.shape[:-1]), lse.view(z.shape[:-1])
        else:
            h, lse = entropy_torch(z)
        check_rows_finite(lse, "logits")
        ctx.backend = backend
        ctx.save_for_backward(z, h, lse)
        return h.to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        z, h, lse = ctx.saved_tensors
        if ctx.backend == "triton":
            z2d = rows_2d(z)
            g = kernels("entropy").entropy_bwd(z2d, grad_h.reshape(-1), h.reshape(-1), lse.reshape(-1))
            return g.view(z.shape), None
        return entropy_backward_torch(z, grad_h, h, lse), None


def entropy(logits: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Shannon entropy, in nats, of ``softmax(logits)`` along ``dim``.

    Args:
        logits: floating-point tensor (fp16, bf16, fp32 or fp64), any leading shape.  Entries may
            be ``-inf`` (impossible classes); they contribute 0 to the entropy.
        dim: the class dimension.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``entmath._backend``).

    Returns:
        The entropy, shape ``logits.shape`` without ``dim``, dtype of ``logits``.  fp16/bf16
        inputs are accumulated in fp32.  Differentiable; the backward is
        ``dH/dz_k = -p_k (log p_k + H)``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``dim`` is out of range or the class dimension is empty; a row contains NaN
            or +inf; a row is entirely ``-inf`` (no distribution).  The message names the rows.
    """
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    backend = resolve_backend(backend, logits)
    return EntropyFunction.apply(logits.movedim(dim, -1), backend)
