"""KL divergence between two softmax distributions.  Derived in Chapter 1 (book/ch01_entropy.md).

    KL(p || q) = sum_i p_i (log p_i - log q_i),   p = softmax(a), q = softmax(b),

with 0 log(0 / q) = 0 and p_i log(p_i / 0) = +inf: the divergence is +inf exactly when p puts
mass where q has none (a finite, b = -inf).  Gibbs' inequality makes it >= 0; values that
rounding pushes below 0 are returned as 0.

Backward:  dKL/da_k = p_k (log p_k - log q_k - KL),   dKL/db_k = q_k - p_k.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, normalize_dim
from ._rows import kernels, rows_2d, upcast
from ._stats import log_softmax_and_lse

__all__ = ["kl"]


def kl_torch(a, b):
    """Reference forward along the last dim: (KL, lse_a, lse_b) in the accumulation dtype."""
    a, b = upcast(a), upcast(b)
    log_p, lse_a = log_softmax_and_lse(a)
    log_q, lse_b = log_softmax_and_lse(b)
    p = log_p.exp()
    ratio = log_p.sub_(log_q)  # log p - log q, in place
    # ratio = +inf exactly where p has mass q lacks (a finite, b = -inf): KL = +inf, however
    # small that mass (even where p underflows to 0).  The other non-finite cases are p = 0 terms
    # (a = -inf): 0 * (-inf) or 0 * NaN, which are 0 by 0 log 0 = 0.  (NaN inputs are caught by
    # the lse check, so nan_to_num cannot hide them.)
    lost = torch.isposinf(ratio).any(-1)
    kl = p.mul_(ratio).nan_to_num_(nan=0.0, posinf=float("inf")).sum(-1)
    kl.clamp_min_(0.0)  # Gibbs: KL >= 0; only rounding goes below
    return kl.masked_fill_(lost, float("inf")), lse_a, lse_b


def kl_backward_torch(a, b, g, kl, lse_a, lse_b):
    ac, bc = upcast(a), upcast(b)
    log_p = ac - lse_a.unsqueeze(-1)
    log_q = bc - lse_b.unsqueeze(-1)
    p, q = log_p.exp(), log_q.exp()
    finite = torch.isfinite(kl).unsqueeze(-1)  # rows with KL = +inf: zero gradient w.r.t. a
    g = g.to(ac.dtype).unsqueeze(-1)
    ratio = log_p.sub_(log_q).sub_(torch.where(finite, kl.unsqueeze(-1), 0.0))
    grad_a = p.mul(ratio).nan_to_num_(nan=0.0).mul_(g).masked_fill_(~finite, 0.0)  # p = 0 terms: 0
    grad_b = q.sub_(p).mul_(g)
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


class KLFunction(torch.autograd.Function):
    """KL(softmax(a) || softmax(b)) along the last dim."""

    @staticmethod
    def forward(ctx, a, b, backend: str):
        if backend == "triton":
            a2d, b2d = rows_2d(a), rows_2d(b)
            kl, lse_a, lse_b = (t.view(a.shape[:-1]) for t in kernels("kl").kl_fwd(a2d, b2d))
        else:
            kl, lse_a, lse_b = kl_torch(a, b)
        check_rows_finite(lse_a, "p_logits")
        check_rows_finite(lse_b, "q_logits")
        ctx.backend = backend
        ctx.save_for_backward(a, b, kl, lse_a, lse_b)
        return kl.to(a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a, b, kl, lse_a, lse_b = ctx.saved_tensors
        if ctx.backend == "triton":
            a2d, b2d = rows_2d(a), rows_2d(b)
            ga, gb = kernels("kl").kl_bwd(a2d, b2d, g.reshape(-1), kl.reshape(-1), lse_a.reshape(-1), lse_b.reshape(-1))
            return ga.view(a.shape), gb.view(b.shape), None
        ga, gb = kl_backward_torch(a, b, g, kl, lse_a, lse_b)
        return ga, gb, None


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) along ``dim``, in nats.

    Args:
        p_logits, q_logits: floating-point tensors of the same shape and dtype; ``-inf`` marks
            impossible classes.
        dim: the class dimension.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Shape of the inputs without ``dim``, their dtype.  **Documented value:** ``+inf`` in rows
        where p has mass that q lacks; the gradient w.r.t. ``p_logits`` of such a row is 0 and
        w.r.t. ``q_logits`` is q - p.

    Raises:
        TypeError: non-float inputs or different dtypes.
        ValueError: shape mismatch, bad ``dim``, empty class dimension; NaN, +inf or all
            ``-inf`` rows (naming ``p_logits`` or ``q_logits``).
    """
    check_float_tensor(p_logits, "p_logits")
    check_float_tensor(q_logits, "q_logits")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits and q_logits must have the same shape, got {tuple(p_logits.shape)} "
                         f"and {tuple(q_logits.shape)}")
    if p_logits.dtype != q_logits.dtype:
        raise TypeError(f"p_logits and q_logits must have the same dtype, got {p_logits.dtype} and {q_logits.dtype}")
    dim = normalize_dim(p_logits, dim, "p_logits")
    backend = resolve_backend(backend, p_logits, q_logits)
    return KLFunction.apply(p_logits.movedim(dim, -1), q_logits.movedim(dim, -1), backend)
