"""Softmax cross-entropy as one fused op: loss, gradient, entropy and z-loss from one pass.

Derived in Chapter 1 (H(y, p) = H(y) + KL(y || p)) and Chapter 5 (the gradient).  Per row, with
lse = log sum_j e^{z_j}, C classes, label smoothing eps and y' = (1 - eps) y + eps / C:

* class index t:    loss = (1 - eps)(lse - z_t) + eps (lse - mean_j z_j)
* probabilities y:  loss = sum_j y'_j (lse - z_j)
* z-loss:           + z_loss * lse^2

and dloss/dz_k = (sum_j y'_j + 2 z_loss lse) p_k - y'_k  (p - y' for one-hot targets).

The gradient is computed in the forward pass, while the row is at hand, already multiplied by
the reduction's scale (1 / #non-ignored rows for "mean"), and kept for the backward, which only
multiplies it by the incoming gradient (skipped when that is exactly 1, the usual
``loss.backward()``).  So forward + backward reads the logits twice and allocates one
logits-sized buffer, or none with ``inplace_backward=True``, where the gradient is written over
the logits themselves.  The torch path works through row chunks so that its temporaries stay
in cache; the Triton path is ``entmath/kernels/triton/cross_entropy.py``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, coded_lse, compute_dtype, normalize_dim
from ._rows import kernels, rows_2d, upcast
from ._stats import clamped

__all__ = ["cross_entropy"]

REDUCTIONS = ("none", "mean", "sum")
# The torch path's row chunk (~32 MiB of fp32 temporaries).  Small chunks keep temporaries in cache
# but pay torch's per-op threading overhead: at 4096 x 32000 on 2 cores, 2 MiB chunks ran 4x slower
# than F.cross_entropy, 32 MiB chunks 0.9x (benchmarks/bench_cross_entropy.py).
CHUNK_BYTES = 1 << 25


def cross_entropy_rows_torch(z2d, t1d, y2d, eps: float, ignore_index: int, z_loss: float, want_entropy: bool,
                             grad, grad_y, scale):
    """Reference/CPU twin of ``kernels.triton.cross_entropy.cross_entropy_rows`` (same contract)."""
    rows, n = z2d.shape
    acc = compute_dtype(z2d)
    soft = y2d is not None
    keep, spread = 1.0 - eps, eps / n
    loss = torch.empty(rows, dtype=acc, device=z2d.device)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if want_entropy else None
    step = max(1, CHUNK_BYTES // (4 * n))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        z = upcast(z2d[r0:r1])  # a view for fp32/fp64: read everything needed before grad overwrites it
        m, argmax = z.max(dim=-1, keepdim=True)
        if soft:
            y = upcast(y2d[r0:r1]).to(acc).mul(keep).add_(spread)
            sum_y = y.sum(-1)
            sum_yz = torch.where(y != 0, y * z, 0.0).sum(-1)  # 0 * log 0 = 0, even against z = -inf
            valid = None
        else:
            t = t1d[r0:r1]
            valid = t != ignore_index
            t_safe = torch.where(valid, t, 0).unsqueeze(-1)
            z_t = z.gather(-1, t_safe).squeeze(-1)
            mean_z = z.mean(-1) if eps > 0 else None
        if grad_y is not None:
            grad_y_chunk = z.neg()  # (lse - z) once lse is known
        d = z - m
        if want_entropy:
            clamped(d)  # -inf -> lowest finite, so e * d = 0 there
        # e = exp(d) goes straight into the gradient buffer when it can hold it (no copy later)
        direct = grad is not None and grad.dtype == acc
        e = torch.exp(d, out=grad[r0:r1]) if direct else d.exp()
        e.scatter_(-1, argmax, 0.0)  # log S = log1p(rest): accurate for nearly one-hot rows
        rest = e.sum(-1)
        if want_entropy:
            moment = d.mul_(e).sum(-1)
        e.scatter_(-1, argmax, 1.0)
        m = m.squeeze(-1)
        log_s = torch.log1p(rest)
        lse_c = m + log_s
        if soft:
            row_loss = sum_y * lse_c - sum_yz
        else:
            row_loss = keep * ((m - z_t) + log_s)  # lse - z_t without cancellation at the arg-max
            if eps > 0:
                row_loss = row_loss + eps * (lse_c - mean_z)
        if z_loss:
            row_loss = row_loss + z_loss * lse_c * lse_c
        loss[r0:r1] = row_loss if soft else torch.where(valid, row_loss, 0.0)
        lse[r0:r1] = coded_lse(m, lse_c)
        if want_entropy:
            h = log_s - moment / (1.0 + rest)
            ent[r0:r1] = h if soft else torch.where(valid, h, 0.0)
        if grad is None and grad_y is None:
            continue
        s = scale if valid is None else scale * valid  # ignored rows: scale 0
        if grad is not None:
            coef = (sum_y if soft else 1.0) + 2.0 * z_loss * lse_c if z_loss else (sum_y if soft else torch.ones_like(m))
            g = e.mul_((coef * s / (1.0 + rest)).unsqueeze(-1))  # scale * coef * p
            if soft:
                g.sub_(y.mul_(s.unsqueeze(-1) if s.dim() else s))
            else:
                if eps > 0:
                    g.sub_((spread * s).unsqueeze(-1))
                g.scatter_add_(-1, t_safe, (-keep * s).unsqueeze(-1))
                if not bool(valid.all()):
                    g.masked_fill_(~valid.unsqueeze(-1), 0.0)  # an ignored row may be all -inf (NaN p)
            if not direct:
                grad[r0:r1] = g
        if grad_y is not None:
            grad_y[r0:r1] = grad_y_chunk.add_(lse_c.unsqueeze(-1)).mul_(keep * (s.unsqueeze(-1) if s.dim() else s))
    return loss, lse, ent


class CrossEntropyFunction(torch.autograd.Function):
    """Reduced softmax cross-entropy along the last dim, gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, z, target, soft: bool, eps: float, ignore_index: int, reduction: str, z_loss: float,
                want_entropy: bool, inplace: bool, backend: str):
        z2d = rows_2d(z)
        # Kernels index targets as a dense vector: a strided or expanded view must not reach them.
        t1d = None if soft else target.reshape(-1).contiguous()
        y2d = rows_2d(target) if soft else None
        rows = z2d.shape[0]
        if reduction == "mean":
            count = y2d.new_tensor(float(max(rows, 1))) if soft else (t1d != ignore_index).sum().clamp_min(1)
            scale = 1.0 / count.to(compute_dtype(z2d)).reshape(1)
        else:
            scale = torch.ones(1, dtype=compute_dtype(z2d), device=z2d.device)
        need_grad = ctx.needs_input_grad[0]
        grad = (z2d if inplace else torch.empty_like(z2d)) if need_grad else None
        grad_y = torch.empty_like(y2d) if soft and ctx.needs_input_grad[1] else None
        rows_fn = kernels("cross_entropy").cross_entropy_rows if backend == "triton" else cross_entropy_rows_torch
        loss, lse, ent = rows_fn(z2d, t1d, y2d, eps, ignore_index, z_loss, want_entropy, grad, grad_y,
                                 scale if backend == "triton" else scale[0])
        check_rows_finite(lse, "logits", rows=None if soft else t1d != ignore_index)
        ctx.shapes = (z.shape, target.shape if soft else None)
        ctx.reduction, ctx.inplace, ctx.used = reduction, inplace, False
        ctx.grads = (grad, grad_y)
        lead = z.shape[:-1]
        if reduction == "none":
            out = loss.view(lead).to(z.dtype)
        else:
            out = loss.sum() * scale[0] if reduction == "mean" else loss.sum()
            out = out.to(z.dtype)
        ent_out = ent.view(lead).to(z.dtype) if want_entropy else z.new_empty(0)
        ctx.mark_non_differentiable(ent_out)
        return out, ent_out

    @staticmethod
    @once_differentiable  # the gradient is a stored buffer: no graph for a second derivative
    def backward(ctx, g_loss, _g_entropy):
        grad, grad_y = ctx.grads
        if ctx.inplace and ctx.used:
            raise RuntimeError("cross_entropy(inplace_backward=True) can be backpropagated once: its gradient "
                               "buffer is the logits tensor and was consumed; use inplace_backward=False to "
                               "backpropagate through it again")
        ctx.used = True
        outs = []
        for buf, shape in zip((grad, grad_y), ctx.shapes):
            if buf is None:
                outs.append(None)
                continue
            if ctx.reduction == "none":
                g = g_loss.reshape(-1, 1).to(buf.dtype)
            elif g_loss.device.type == "cpu" and float(g_loss) == 1.0:
                outs.append(buf.view(shape))  # the usual loss.backward(): nothing to multiply
                continue
            else:
                g = g_loss.to(buf.dtype)
            outs.append((buf.mul_(g) if ctx.inplace else buf * g).view(shape))
        return outs[0], outs[1], None, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, dim: int = -1, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                  return_entropy: bool = False, inplace_backward: bool = False, *, backend: str = "auto"):
    """Softmax cross-entropy between ``logits`` and ``target`` along ``dim``, fused with its gradient.

    Matches ``torch.nn.functional.cross_entropy(logits.movedim(dim, 1), target, ...)`` for the
    options the two share; accumulates in fp32 for fp16/bf16 logits.

    Args:
        logits: floating-point tensor; ``-inf`` marks impossible classes.
        target: class indices (integer dtype, the shape of ``logits`` without ``dim``) or class
            probabilities (floating dtype, the shape of ``logits``; rows need not sum to 1; a
            target of 0 contributes 0 even against a ``-inf`` logit).  Probability targets are
            differentiable.
        dim: the class dimension.
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) y + eps / C.
        ignore_index: class-index targets equal to it contribute 0 loss, 0 gradient, 0 entropy.
        reduction: ``"none"`` (per-row losses), ``"sum"``, or ``"mean"`` (over non-ignored rows
            for class indices, over all rows for probabilities).  **Documented value:** ``"mean"``
            over zero non-ignored rows is 0.0 with zero gradient (``torch`` returns NaN).
        z_loss: weight of the auxiliary ``z_loss * lse**2`` per row (PaLM's z-loss), included in
            the returned loss and its gradient ``2 z_loss lse p``.
        return_entropy: also return the per-row entropy of softmax(logits) (shape of ``logits``
            without ``dim``), from the same pass.  It is a monitoring output without gradient;
            use ``entmath.entropy`` for a differentiable entropy.
        inplace_backward: write the gradient over ``logits`` during the forward pass, so that
            forward + backward allocate no logits-sized buffer.  ``logits`` must not be used
            afterwards, and the graph can be backpropagated once.  The saving needs the class
            dimension to be the last, contiguous one (otherwise a copy is made and written).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The loss (dtype of ``logits``), or ``(loss, entropy)`` if ``return_entropy``.

    Raises:
        TypeError: non-float ``logits``; ``target`` neither integer nor float; non-number options.
        ValueError: bad ``dim``, empty class dimension, ``target`` shape mismatch, a class index
            outside [0, C) other than ``ignore_index``, ``label_smoothing`` outside [0, 1],
            negative or non-finite ``z_loss``, unknown ``reduction``; NaN, +inf, or all ``-inf``
            logits in a row that is not ignored.
    """
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    eps = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = _number(z_loss, "z_loss")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
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
        if target.shape != z.shape[:-1]:
            raise ValueError(f"target holds class indices, so its shape must be logits' shape without "
                             f"dim={dim}, {tuple(z.shape[:-1])}; got {tuple(target.shape)}")
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
    loss, ent = CrossEntropyFunction.apply(z, target, soft, eps, ignore_index, reduction, z_loss,
                                           bool(return_entropy), bool(inplace_backward), backend)
    return (loss, ent) if return_entropy else loss


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)
