"""Softmax cross-entropy: loss, entropy and z-loss from one read of the logits.

Derived in Chapter 1 (H(y, p) = H(y) + KL(y || p)) and Chapter 5 (the gradient).  Per row, with
lse = log sum_j e^{z_j}, C classes, label smoothing eps and y' = (1 - eps) y + eps / C:

* class index t:    loss = (1 - eps)(lse - z_t) + eps (lse - mean_j z_j)
* probabilities y:  loss = sum_j y'_j (lse - z_j)
* z-loss:           + z_loss * lse^2

Backward (``cross_entropy_vjp``): dloss/dz_k = (sum_j y'_j + 2 z_loss lse) p_k - y'_k (p - y' for
one-hot targets), dloss/dy_k = (1 - eps)(lse - z_k), and the entropy returned with
``return_entropy`` has the gradient of Chapter 1, -p (log p + H).

The forward reads the logits once and keeps per-row numbers (loss, lse, entropy); the backward
reads them once more and writes the gradient, which is the least traffic the math allows when a
row does not fit on chip (the gradient needs lse, which needs the whole row).  The gradient is
not computed ahead in the forward: a stored gradient handed to autograd would alias a saved
buffer (``retain_graph`` and in-place hooks would corrupt it).  With ``inplace_backward`` the
backward writes the gradient over the logits themselves, so no logits-sized buffer is allocated.

Paths: ``cross_entropy_rows_torch`` (the reference, plain torch, in row chunks that stay in
cache) and ``torch.ops.entmath.cross_entropy_triton`` (``entmath/kernels/triton/cross_entropy.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import resolve_backend
from .._validate import (check_float_tensor, check_rows_finite, coded_lse, compute_dtype, normalize_dim,
                         value_checks_active)
from ._library import acc_dtype, register_row_vmap, triton_kernel_op
from ._rows import kernels, output_dtype, rows_2d, upcast
from ._stats import clamped, nan_unless_finite

__all__ = ["cross_entropy"]

REDUCTIONS = ("none", "mean", "sum")
# The torch path's row chunk (~32 MiB of fp32 temporaries).  Small chunks keep temporaries in cache
# but pay torch's per-op threading overhead: at 4096 x 32000 on 2 cores, 2 MiB chunks ran 4x slower
# than F.cross_entropy, 32 MiB chunks 0.9x (benchmarks/bench_cross_entropy.py).
CHUNK_BYTES = 1 << 25


def cross_entropy_rows_torch(z2d, t1d, y2d, eps: float, ignore_index: int, z_loss: float, want_entropy: bool):
    """Reference forward on (rows, n) logits: per-row (loss, coded lse, entropy or empty), in the
    accumulation dtype.  Exactly one of t1d (rows,) int64 / y2d (rows, n) is given.  The twin of
    ``kernels.triton.cross_entropy.cross_entropy_fwd`` (same contract)."""
    rows, n = z2d.shape
    acc = compute_dtype(z2d)
    soft = y2d is not None
    keep, spread = 1.0 - eps, eps / n
    pieces = []
    # Row chunks keep the temporaries in cache in eager mode; a compiler fuses the passes itself.
    step = rows if torch.compiler.is_compiling() else max(1, CHUNK_BYTES // (4 * n))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        z = upcast(z2d[r0:r1])
        m, argmax = z.max(dim=-1, keepdim=True)
        d = z - m
        if want_entropy:
            clamped(d)  # -inf -> lowest finite, so e * d = 0 there
        e = d.exp()
        e.scatter_(-1, argmax, 0.0)  # log S = log1p(rest): accurate for nearly one-hot rows
        rest = e.sum(-1)
        m = m.squeeze(-1)
        log_s = torch.log1p(rest)
        lse = m + log_s
        if soft:
            y = upcast(y2d[r0:r1]).to(acc) * keep + spread
            # sum_j y'_j (lse - z_j); 0 * log 0 = 0, even against z = -inf
            loss = y.sum(-1) * lse - torch.where(y != 0, y * z, 0.0).sum(-1)
            valid = None
        else:
            t = t1d[r0:r1]
            valid = t != ignore_index
            in_range = (t >= 0) & (t < n)  # out of range only with validation off: NaN, no stray read
            z_t = z.gather(-1, torch.where(valid & in_range, t, 0).unsqueeze(-1)).squeeze(-1)
            loss = keep * ((m - z_t) + log_s)  # lse - z_t without cancellation at the arg-max
            if eps > 0:
                loss = loss + eps * (lse - z.mean(-1))
            loss = torch.where(in_range | ~valid, loss, float("nan"))
        if z_loss:
            loss = loss + z_loss * lse * lse
        ent = None
        if want_entropy:
            ent = log_s - d.mul_(e).sum(-1) / (1.0 + rest)
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
            ent = None if ent is None else torch.where(valid, ent, 0.0)
        pieces.append((loss, coded_lse(m, lse), ent if want_entropy else z.new_empty(0)))
    if not pieces:
        empty = z2d.new_empty(0, dtype=acc)
        return empty, empty, empty
    if len(pieces) == 1:
        return pieces[0]
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def cross_entropy_vjp(z, t, y, eps, ignore_index, z_loss, lse, ent, g_loss, g_lse, g_ent, want_gy=True):
    """The vector-Jacobian product of (loss, lse, entropy) per row, in torch ops.

    z: (rows, n); exactly one of t (rows,) / y (rows, n); any gradient may be None.  Returns
    (dz, dy) in the dtypes of z and y (dy None for class targets or if not ``want_gy``):

        dz = p (g_loss (sum y' + 2 z_loss lse) + g_lse - g_H (log p + H)) - g_loss y',
        dy = g_loss (1 - eps)(lse - z).

    While autograd records (``create_graph=True``) every op is out of place, so the result is
    differentiable again; otherwise the same ops work in place on fresh temporaries.
    """
    fast = not torch.is_grad_enabled()  # no graph: in place on the temporaries made here
    zc = upcast(z)
    acc, n = zc.dtype, zc.shape[-1]
    keep, spread = 1.0 - eps, eps / n
    lse = nan_unless_finite(lse).unsqueeze(-1)  # a row without a distribution: NaN, as in torch
    log_p = clamped(zc - lse)  # -inf logits: p = 0 with a finite log p
    p = log_p.exp_() if fast and g_ent is None else log_p.exp()
    coef = torch.zeros_like(lse)  # per row: g_loss (sum y' + 2 z_loss lse) + g_lse
    gl = yc = None
    if g_loss is not None:
        gl = g_loss.to(acc).unsqueeze(-1)
        if y is not None:
            yc = upcast(y).to(acc) * keep + spread
            sum_y = yc.sum(-1, keepdim=True)
        else:
            sum_y = 1.0
        coef = coef + gl * (sum_y + 2.0 * z_loss * lse if z_loss else sum_y)
    if g_lse is not None:
        coef = coef + g_lse.to(acc).unsqueeze(-1)
    if g_ent is not None:  # - g_H p (log p + H): fold into the per-entry factor before multiplying p
        inner = log_p.add_(ent.unsqueeze(-1)) if fast else log_p + ent.unsqueeze(-1)
        inner = inner.mul_(-g_ent.to(acc).unsqueeze(-1)).add_(coef) if fast else \
            inner * -g_ent.to(acc).unsqueeze(-1) + coef
        gz = p.mul_(inner) if fast else p * inner
    else:
        gz = p.mul_(coef) if fast else p * coef
    gy = None
    valid = bad = None
    if t is not None:
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n))
    if gl is not None:
        if yc is not None:
            gz = gz.sub_(yc.mul_(gl)) if fast else gz - yc * gl
            if want_gy:
                gy = (gl * keep * (lse - zc)).to(y.dtype)
        else:
            if eps > 0:
                gz = gz.sub_(gl * spread) if fast else gz - gl * spread
            idx = torch.where(valid & ~bad, t, 0).unsqueeze(-1)
            gz = gz.scatter_add_(-1, idx, -keep * gl) if fast else gz.scatter_add(-1, idx, -keep * gl)
    if valid is not None:
        # Ignored rows: exactly 0 (they may be all -inf, with NaN p); out-of-range targets: NaN.
        if fast:
            gz.masked_fill_(~valid.unsqueeze(-1), 0.0).masked_fill_(bad.unsqueeze(-1), float("nan"))
        else:
            gz = torch.where(bad.unsqueeze(-1), float("nan"), torch.where(valid.unsqueeze(-1), gz, 0.0))
    return gz.to(z.dtype), gy


class _CrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse, entropy) of the rows of z against class indices t or probabilities y,
    as one autograd unit on either backend.  ``inplace`` writes the gradient over z."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, t, y, eps, ignore_index, z_loss, want_entropy, inplace, backend):
        if backend == "triton":
            return torch.ops.entmath.cross_entropy_triton(z, t, y, eps, ignore_index, z_loss, want_entropy)
        return cross_entropy_rows_torch(z, t, y, eps, ignore_index, z_loss, want_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, t, y, eps, ignore_index, z_loss, want_entropy, inplace, backend = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, t, y, output[1], output[2])
        ctx.options = (eps, ignore_index, z_loss)
        ctx.inplace, ctx.backend, ctx.used = inplace, backend, False

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_ent):
        if ctx.used:
            raise RuntimeError("cross_entropy(inplace_backward=True) can be backpropagated once: its gradient was "
                               "written over the logits; use inplace_backward=False to backpropagate again")
        z, t, y, lse, ent = ctx.saved_tensors
        eps, ignore_index, z_loss = ctx.options
        g_ent = g_ent if ent.numel() else None
        if torch.is_grad_enabled() or g_lse is not None or g_loss is None:  # a graph of the backward
            gz, gy = cross_entropy_vjp(z, t, y, eps, ignore_index, z_loss, lse, ent, g_loss, g_lse, g_ent,
                                       want_gy=ctx.needs_input_grad[2])
            return gz, None, gy, *([None] * 6)
        want_gy = y is not None and ctx.needs_input_grad[2]
        if ctx.inplace:
            ctx.used = True
            grad = z
        else:
            grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        if ctx.backend == "triton":
            gy = torch.ops.entmath.cross_entropy_backward_triton(
                grad, z, t, y, lse, ent, g_loss, g_ent, eps, ignore_index, z_loss, want_gy)
        else:
            gy = _vjp_into(grad, z, t, y, eps, ignore_index, z_loss, lse, ent, g_loss, g_ent, want_gy)
        if ctx.inplace:
            # Another node may have saved these logits for its backward: autograd's version
            # counter turns its use of the overwritten values into an error, never a wrong number.
            torch.autograd.graph.increment_version(z)
        return grad, None, gy if want_gy else None, *([None] * 6)


def _vjp_into(grad, z, t, y, eps, ignore_index, z_loss, lse, ent, g_loss, g_ent, want_gy):
    """``cross_entropy_vjp`` in row chunks, written into ``grad`` (which may be z itself: each
    chunk is read before it is written), so temporaries stay chunk-sized.  Returns dL/dy."""
    rows, n = z.shape
    step = max(1, CHUNK_BYTES // (4 * max(n, 1)))
    gys = []
    for r0 in range(0, rows, step):
        sl = slice(r0, min(rows, r0 + step))
        gz, gy = cross_entropy_vjp(z[sl], None if t is None else t[sl], None if y is None else y[sl], eps,
                                   ignore_index, z_loss, lse[sl], ent[sl] if g_ent is not None else ent, g_loss[sl],
                                   None, None if g_ent is None else g_ent[sl], want_gy=want_gy)
        grad[sl].copy_(gz)
        if want_gy:
            gys.append(gy)
    return torch.cat(gys) if gys else None


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
@triton_kernel_op("cross_entropy_triton")
def cross_entropy_triton(z: torch.Tensor, t: Optional[torch.Tensor], y: Optional[torch.Tensor], eps: float,
                         ignore_index: int, z_loss: float,
                         want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, coded lse, entropy or empty) of (rows, n) logits, one read of each row."""
    return kernels("cross_entropy").cross_entropy_fwd(rows_2d(z), None if t is None else t.contiguous(),
                                                      None if y is None else rows_2d(y), eps, ignore_index,
                                                      z_loss, want_entropy)


@cross_entropy_triton.register_fake
def _(z, t, y, eps, ignore_index, z_loss, want_entropy):
    loss = z.new_empty(z.shape[:1], dtype=acc_dtype(z))
    return loss, torch.empty_like(loss), z.new_empty(z.shape[0] if want_entropy else 0, dtype=acc_dtype(z))


@triton_kernel_op("cross_entropy_backward_triton", mutates_args=("grad",))
def cross_entropy_backward_triton(grad: torch.Tensor, z: torch.Tensor, t: Optional[torch.Tensor],
                                  y: Optional[torch.Tensor], lse: torch.Tensor, ent: torch.Tensor,
                                  g_loss: torch.Tensor, g_ent: Optional[torch.Tensor], eps: float,
                                  ignore_index: int, z_loss: float, want_grad_y: bool) -> torch.Tensor:
    """Write dL/dz into ``grad`` (which may be z itself); return dL/dy (empty unless wanted).
    One read of each row of z (and y), one write of the gradient."""
    k = kernels("cross_entropy")
    grad_y = torch.empty_like(y, memory_format=torch.contiguous_format) if want_grad_y else None
    sum_y = None if y is None else (y.to(acc_dtype(z)) * (1.0 - eps) + eps / z.shape[-1]).sum(-1)
    k.cross_entropy_bwd(z if grad is z else rows_2d(z), None if t is None else t.contiguous(),
                        None if y is None else rows_2d(y), lse, ent, g_loss.contiguous(),
                        None if g_ent is None else g_ent.contiguous(), sum_y, eps, ignore_index, z_loss,
                        grad, grad_y)
    return grad_y if grad_y is not None else z.new_empty(0)


@cross_entropy_backward_triton.register_fake
def _(grad, z, t, y, lse, ent, g_loss, g_ent, eps, ignore_index, z_loss, want_grad_y):
    return torch.empty_like(y) if want_grad_y else z.new_empty(0)


def _setup(ctx, inputs, output):
    z, t, y, eps, ignore_index, z_loss, want_entropy = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, t, y, output[1], output[2])
    ctx.options = (eps, ignore_index, z_loss)


def _backward(ctx, g_loss, g_lse, g_ent):
    z, t, y, lse, ent = ctx.saved_tensors
    g_ent = g_ent if ent.numel() else None
    gz, gy = cross_entropy_vjp(z, t, y, *ctx.options, lse, ent, g_loss, g_lse, g_ent,
                               want_gy=ctx.needs_input_grad[2])
    return gz, None, gy, None, None, None, None


# Direct callers of torch.ops.entmath.cross_entropy_triton get autograd (the torch formula).
cross_entropy_triton.register_autograd(_backward, setup_context=_setup)
register_row_vmap(cross_entropy_triton, (1, 0, 1, None, None, None, None))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                  dim: int = -1, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: Optional[float] = None, return_entropy: bool = False,
                  inplace_backward: bool = False, backend: str = "auto"):
    """Softmax cross-entropy between ``logits`` and ``target`` along ``dim``, fused with its gradient.

    Matches ``torch.nn.functional.cross_entropy(logits.movedim(dim, 1), target, ...)`` for the
    options the two share; accumulates in fp32 for fp16/bf16 logits.

    Args:
        logits: floating-point tensor; ``-inf`` marks impossible classes.
        target: class indices (integer dtype, the shape of ``logits`` without ``dim``) or class
            probabilities (floating dtype, the shape of ``logits``; rows need not sum to 1; a
            target of 0 contributes 0 even against a ``-inf`` logit).  Probability targets are
            differentiable.
        weight: class weights, a 1-D tensor of C entries, as in ``torch.nn.functional.cross_entropy``.
        dim: the class dimension (keyword-only: the third positional argument is ``weight``, as in
            ``torch.nn.functional.cross_entropy``).
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) y + eps / C.
        ignore_index: class-index targets equal to it contribute 0 loss, 0 gradient, 0 entropy.
        reduction: ``"none"`` (per-row losses), ``"sum"``, or ``"mean"`` (over non-ignored rows
            for class indices, over all rows for probabilities).  **Documented value:** ``"mean"``
            over zero non-ignored rows is 0.0 with zero gradient (``torch`` returns NaN).
        z_loss: weight of the auxiliary ``z_loss * lse**2`` per row (PaLM's z-loss), included in
            the returned loss and its gradient ``2 z_loss lse p``.
        softcap: logit soft-capping, ``softcap * tanh(logits / softcap)`` before the softmax; None: off.
        return_entropy: also return the per-row entropy of softmax(logits) (shape of ``logits``
            without ``dim``; 0 for ignored rows), from the same pass, differentiable (an entropy
            bonus ``loss - beta * entropy.mean()`` backpropagates through it).
        inplace_backward: let the backward write the gradient over ``logits``, so that
            forward + backward allocate no logits-sized buffer.  ``logits`` must be the output of
            an operation (a leaf that requires grad, such as a parameter, or a view of one is
            refused with ``ValueError``) and must not be used after the backward; the graph can
            be backpropagated once.  If another autograd node saved the same logits and runs
            its backward later, autograd raises its "modified by an inplace operation" error
            rather than compute with overwritten values.  The saving needs the class dimension
            to be the last, contiguous one (otherwise a copy is made and written).  Ignored
            under ``torch.compile`` (the compiler plans buffers itself) and when building a
            graph of the backward (``create_graph=True``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The loss (dtype of ``logits``; float32 under ``torch.autocast``), or ``(loss, entropy)``
        if ``return_entropy``.  Differentiable twice (double backward gives the Hessian-vector
        products of Chapter 5) in ``logits`` and probability targets.

    Raises:
        TypeError: non-float ``logits``; ``target`` neither integer nor float; non-number options.
        ValueError: bad ``dim``, empty class dimension, ``target`` shape mismatch, a class index
            outside [0, C) other than ``ignore_index``, ``label_smoothing`` outside [0, 1],
            negative or non-finite ``z_loss``, unknown ``reduction``; NaN, +inf, or all ``-inf``
            logits in a row that is not ignored.  With validation off
            (``entmath.set_validation(False)``) the value errors are not raised: such rows, and
            rows whose class index is out of range, give NaN.
    """
    check_float_tensor(logits, "logits")
    if weight is not None or softcap is not None:  # the signature first; the options follow
        raise NotImplementedError("cross_entropy: weight and softcap are not implemented yet")
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
    inplace = bool(inplace_backward)
    if inplace:
        _check_inplace(logits)
    n_classes = logits.shape[dim]
    z = logits.movedim(dim, -1)
    lead = z.shape[:-1]
    t1d = y2d = None
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"target holds probabilities, so its shape must equal logits' shape "
                             f"{tuple(logits.shape)}; got {tuple(target.shape)}")
        y2d = rows_2d(target.movedim(dim, -1))
    elif target.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if target.shape != lead:
            raise ValueError(f"target holds class indices, so its shape must be logits' shape without "
                             f"dim={dim}, {tuple(lead)}; got {tuple(target.shape)}")
        t1d = target.reshape(-1).long().contiguous()
        if value_checks_active(t1d):
            out_of_range = (t1d != ignore_index) & ((t1d < 0) | (t1d >= n_classes))
            if bool(out_of_range.any()):
                bad = t1d[out_of_range][:5].tolist()
                raise ValueError(f"target has class indices outside [0, {n_classes}): {bad} "
                                 f"(ignore_index={ignore_index})")
    else:
        raise TypeError(f"target must hold class indices (integer dtype) or probabilities "
                        f"(floating dtype), got {target.dtype}")
    backend = resolve_backend(backend, logits)
    z2d = rows_2d(z)
    loss, lse, ent = _CrossEntropy.apply(z2d, t1d, y2d, eps, ignore_index, z_loss, bool(return_entropy),
                                         inplace and not torch.compiler.is_compiling(), backend)
    valid = None if t1d is None else t1d != ignore_index
    check_rows_finite(lse, "logits", rows=valid)
    if valid is None:
        bad_row = ~torch.isfinite(lse)
    else:
        bad_row = valid & ~torch.isfinite(lse)
    loss = torch.where(bad_row, float("nan"), loss)  # NaN / +inf / no finite logit: a NaN row
    out_dtype = output_dtype(logits)
    if reduction == "none":
        out = loss.view(lead)
    elif reduction == "sum":
        out = loss.sum()
    else:
        count = valid.sum().clamp_min(1) if valid is not None else max(loss.numel(), 1)
        out = loss.sum() / count
    out = out.to(out_dtype)
    if return_entropy:
        return out, torch.where(bad_row, float("nan"), ent).view(lead).to(out_dtype)
    return out


def _check_inplace(logits: torch.Tensor) -> None:
    """``inplace_backward`` overwrites the logits with their gradient: never a tensor the user
    (or an optimizer) still holds as a parameter.  Tensors that other nodes saved are caught in
    the backward, through autograd's version counter."""
    base = logits._base if logits._base is not None else logits
    if base.is_leaf and base.requires_grad:
        what = "a view of a leaf tensor" if logits._base is not None else "a leaf tensor"
        raise ValueError(f"inplace_backward=True would overwrite logits, {what} that requires grad (such as a "
                         f"parameter), with its gradient; pass the output of an operation, or "
                         f"inplace_backward=False")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)
