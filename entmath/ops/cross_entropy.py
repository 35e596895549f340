"""Softmax cross-entropy.  Chapter 1 (H(p, q) = H(p) + KL(p || q)) and Chapter 5 (its gradient).

Per row, with lse = log sum_j e^{z_j}, C classes and label smoothing eps:

* class index t:  loss = (1 - eps)(lse - z_t) + eps (lse - mean_j z_j)
* probabilities y: loss = sum_j y'_j (lse - z_j),  y' = (1 - eps) y + eps / C

which is ``torch.nn.functional.cross_entropy`` (class dim moved to ``dim``).  The gradient is
dL/dz_k = (sum_j y'_j) p_k - y'_k, i.e. p - y' for normalised targets; for probability targets
dL/dy_k = (1 - eps)(lse - z_k).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, normalize_dim
from ._rows import kernels, rows_2d, upcast
from ._stats import log_normaliser

__all__ = ["cross_entropy"]

REDUCTIONS = ("none", "mean", "sum")


def cross_entropy_torch(z, target, soft: bool, eps: float, ignore_index: int):
    """Reference per-row loss along the last dim.  Returns (loss, lse) in the accumulation dtype."""
    zc = upcast(z)
    m, log_s = log_normaliser(zc)
    m = m.squeeze(-1)
    lse = m + log_s
    n = zc.shape[-1]
    if soft:
        y = (1.0 - eps) * upcast(target).to(zc.dtype) + eps / n
        terms = torch.where(y != 0, y * (lse.unsqueeze(-1) - zc), 0.0)  # 0 * log 0 = 0
        return terms.sum(-1), lse
    valid = target != ignore_index
    z_t = zc.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    # (m - z_t) + log S is lse - z_t without cancellation when the target is the arg-max.
    loss = (1.0 - eps) * ((m - z_t) + log_s)
    if eps > 0:
        loss = loss + eps * (lse - zc.mean(-1))
    return torch.where(valid, loss, 0.0), lse


def cross_entropy_backward_torch(z, target, soft: bool, eps: float, ignore_index: int, grad_rows, lse):
    zc = upcast(z)
    n = zc.shape[-1]
    p = (zc - lse.unsqueeze(-1)).exp_()
    g = grad_rows.to(zc.dtype).unsqueeze(-1)
    if soft:
        y = (1.0 - eps) * upcast(target).to(zc.dtype) + eps / n
        grad_z = g * (y.sum(-1, keepdim=True) * p - y)
        grad_y = g * (1.0 - eps) * (lse.unsqueeze(-1) - zc)
        return grad_z.to(z.dtype), grad_y.to(target.dtype)
    valid = (target != ignore_index).unsqueeze(-1)
    grad_z = p.sub_(eps / n) if eps > 0 else p
    grad_z.scatter_add_(-1, torch.where(valid, target.unsqueeze(-1), 0),
                        torch.full_like(p[..., :1], -(1.0 - eps)))
    # where, not multiply, for the mask: an ignored row may be all -inf, and its p is then NaN.
    grad_z = grad_z.mul_(g).masked_fill_(~valid, 0.0)
    return grad_z.to(z.dtype), None


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row softmax cross-entropy along the last dim; backward (sum y') p - y'."""

    @staticmethod
    def forward(ctx, z, target, soft: bool, eps: float, ignore_index: int, backend: str):
        if backend == "triton":
            z2d = rows_2d(z)
            t1d = None if soft else target.reshape(-1).contiguous()
            y2d = rows_2d(target) if soft else None
            loss, lse = kernels("cross_entropy").cross_entropy_fwd(z2d, t1d, y2d, eps, ignore_index)
            loss, lse = loss.view(z.shape[:-1]), lse.view(z.shape[:-1])
        else:
            loss, lse = cross_entropy_torch(z, target, soft, eps, ignore_index)
        check_rows_finite(lse, z, "logits", rows=None if soft else target != ignore_index)
        ctx.soft, ctx.eps, ctx.ignore_index, ctx.backend = soft, eps, ignore_index, backend
        ctx.save_for_backward(z, target, lse)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        z, target, lse = ctx.saved_tensors
        soft, eps, ignore = ctx.soft, ctx.eps, ctx.ignore_index
        if ctx.backend == "triton" and not (soft and ctx.needs_input_grad[1]):
            z2d = rows_2d(z)
            t1d = None if soft else target.reshape(-1).contiguous()
            y2d = rows_2d(target) if soft else None
            gz = kernels("cross_entropy").cross_entropy_bwd(
                z2d, t1d, y2d, grad_rows.reshape(-1), lse.reshape(-1), eps, ignore)
            return gz.view(z.shape), None, None, None, None, None
        grad_z, grad_y = cross_entropy_backward_torch(z, target, soft, eps, ignore, grad_rows, lse)
        return grad_z, grad_y, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, dim: int = -1, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean", *, backend: str = "auto") -> torch.Tensor:
    """Softmax cross-entropy between ``logits`` and ``target`` along ``dim``.

    Matches ``torch.nn.functional.cross_entropy(logits.movedim(dim, 1), target, ...)`` for the
    options the two share, and accumulates in fp32 for fp16/bf16 logits.

    Args:
        logits: floating-point tensor; ``-inf`` marks impossible classes.
        target: either class indices (integer dtype, the shape of ``logits`` without ``dim``) or
            class probabilities (floating dtype, the shape of ``logits``; rows need not sum to 1,
            and entries where the target is 0 contribute 0 even against a ``-inf`` logit).
        dim: the class dimension.
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) y + eps / C.
        ignore_index: class-index targets equal to it contribute 0 loss and 0 gradient.
        reduction: ``"none"`` (per-row losses, shape of ``logits`` without ``dim``), ``"sum"``,
            or ``"mean"`` (over non-ignored rows for class indices, over all rows for
            probabilities).  **Documented value:** ``"mean"`` over zero non-ignored rows is 0.0
            with zero gradient (``torch`` returns NaN there).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Raises:
        TypeError: non-float ``logits``; ``target`` neither integer nor float.
        ValueError: bad ``dim``, empty class dimension, ``target`` shape mismatch, a class index
            outside [0, C) (other than ``ignore_index``), ``label_smoothing`` outside [0, 1],
            unknown ``reduction``; NaN, +inf, or all ``-inf`` logits in a non-ignored row.
    """
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    n_classes = logits.shape[dim]
    z = logits.movedim(dim, -1)
    if target.is_floating_point():
        soft = True
        if target.shape != logits.shape:
            raise ValueError(f"target holds probabilities, so its shape must equal logits' shape "
                             f"{tuple(logits.shape)}; got {tuple(target.shape)}")
        target = target.movedim(dim, -1)
    elif target.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        soft = False
        expected = z.shape[:-1]
        if target.shape != expected:
            raise ValueError(f"target holds class indices, so its shape must be logits' shape without "
                             f"dim={dim}, {tuple(expected)}; got {tuple(target.shape)}")
        target = target.long()
        out_of_range = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bool(out_of_range.any()):
            bad = target[out_of_range][:5].tolist()
            raise ValueError(f"target has class indices outside [0, {n_classes}): {bad} "
                             f"(ignore_index={ignore_index})")
    else:
        raise TypeError(f"target must hold class indices (integer dtype) or probabilities "
                        f"(floating dtype), got {target.dtype}")
    backend = resolve_backend(backend, logits)
    loss = CrossEntropyFunction.apply(z, target, soft, eps, ignore_index, backend)
    if reduction == "none":
        return loss.to(logits.dtype)
    total = loss.sum()
    if reduction == "mean":
        count = loss.numel() if soft else (target != ignore_index).sum().clamp_min(1)
        total = total / count
    return total.to(logits.dtype)
