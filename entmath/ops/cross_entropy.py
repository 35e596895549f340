"""Softmax cross-entropy: loss, entropy and z-loss from one read of the logits.

Derived in Chapter 1 (H(y, p) = H(y) + KL(y || p)) and Chapter 5 (the gradient, soft-capping).
Per row, with m = max_j z_j, log S = log sum_j e^{z_j - m} (so lse = m + log S), C classes,
label smoothing eps, class weights w (1 without them) and the smoothed, weighted target mass

    u_j = w_j ((1 - eps) y_j + eps / C)              (probabilities y)
    u_j = (1 - eps) w_t [j = t] + (eps / C) w_j        (class index t),

the loss is sum_j u_j (lse - z_j), computed as

    loss = (sum_j u_j) log S + sum_j u_j (m - z_j)

so that every term is >= 0 and no lse-sized quantity is ever subtracted (lse - z_j with
|lse| >> lse - z_j would lose the digits of the difference: at logits near 1e4 in float32 the
old form sum_j u_j lse - sum_j u_j z_j kept three).  Terms with u_j = 0 contribute 0, even at
z_j = -inf.  z-loss, z_loss * lse^2 per row, is added outside the kernels (from the lse they
return), so that "mean" can average it over the counted rows while class weights normalise the
cross-entropy, as Liger-Kernel and F.cross_entropy + z-loss do.  With ``softcap`` = c every z is
first replaced by c tanh(z / c) (Gemma 2's logit soft-capping).

Backward (``cross_entropy_vjp``): dloss/dz_k = (sum_j u_j) p_k - u_k, times c tanh'(z_k / c) =
sech^2(z_k / c) with soft-capping; dloss/dy_k = w_k (1 - eps)(lse - z_k); d lse/dz_k = p_k; the
entropy returned with ``return_entropy`` has the gradient of Chapter 1, -p (log p + H).  p is
computed as exp((z - lse) - delta), with delta the rounding error of lse = m + log S (an exact
TwoSum residual the forward returns): z - fl(lse) is exact near the maximum, and the residual
restores the digits of log S that rounding m + log S dropped (at logits near 1e6, all of them).

The forward reads the logits once and keeps per-row numbers (loss, lse, its residual, entropy);
the backward reads them once more and writes the gradient, which is the least traffic the math
allows when a row does not fit on chip (the gradient needs lse, which needs the whole row).  The
gradient is not computed ahead in the forward: a stored gradient handed to autograd would alias
a saved buffer (``retain_graph`` and in-place hooks would corrupt it).  With ``inplace_backward``
the backward writes the gradient over the logits themselves, so no logits-sized buffer is
allocated.

Paths: ``cross_entropy_rows_torch`` (the reference, plain torch, in row chunks that stay in
cache), ``torch.ops.entmath.cross_entropy_triton`` (``entmath/kernels/triton/cross_entropy.py``)
and, for float32/bfloat16 logits on the CPU of at least ``kernels.cpu.rows.MIN_ELEMS`` entries
without soft-capping, the C kernels of ``entmath/kernels/cpu/rows.c``: against class indices
``torch.ops.entmath.cross_entropy_cpu``, against probability targets of the logits' dtype
``torch.ops.entmath.cross_entropy_probs_cpu`` (one read of each row of the logits and targets
from memory forward; one read and one write backward, and one write of dL/dy when it is
wanted).  Soft-capping on the CPU, and probability targets of another dtype than the logits',
take the torch path.  The call most programs make (those CPU logits, classes last, against int64
class indices or such probability targets, with only ``ignore_index``, ``reduction`` and
``label_smoothing``) is the *common call* (``_common_call``): the same kernels, entered with the
reduction done in the forward's kernel call and one autograd node, so that a small input costs
about what ``F.cross_entropy`` costs.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .._backend import resolve_backend
from .._validate import (check_float_tensor, check_rows_finite, coded_lse, compute_dtype, is_validation_enabled, lowest,
                         normalize_dim, value_checks_active)
from ..kernels.cpu import rows as cpu_rows
from ._library import (acc_dtype, cpu_kernel_op, eager_apply, eager_call, eager_function, register_row_vmap,
                       triton_kernel_op)
from ._rows import kernels, output_dtype, rows_2d, upcast
from ._stats import clamped, nan_unless_finite

__all__ = ["cross_entropy"]

REDUCTIONS = ("none", "mean", "sum")
# Class-index dtypes: every integer dtype (the unsigned ones are read as int64; uint64 values
# of 2^63 and above are out of range, never taken for ignore_index).
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
                torch.uint64)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# The torch path's row chunk (~32 MiB of fp32 temporaries).  Small chunks keep temporaries in cache
# but pay torch's per-op threading overhead: at 4096 x 32000 on 2 cores, 2 MiB chunks ran 4x slower
# than F.cross_entropy, 32 MiB chunks 0.9x (benchmarks/bench_cross_entropy.py).
CHUNK_BYTES = 1 << 25


def soft_cap(z: torch.Tensor, cap: float) -> torch.Tensor:
    """c tanh(z / c): logit soft-capping (a new tensor).  -inf and +inf become -c and c."""
    return torch.tanh(z / cap) * cap


def soft_cap_slope(z: torch.Tensor, cap: float) -> torch.Tensor:
    """d/dz c tanh(z / c) = sech^2(z / c) = 4u / (1 + u)^2 with u = e^{-2|z|/c}: no cancellation
    (1 - tanh^2 loses every digit where tanh rounds to 1), no overflow (cosh would), and
    differentiable again without an inf * 0."""
    u = torch.exp(z.abs() * (-2.0 / cap))
    return 4.0 * u / (1.0 + u).square()


def lse_residual(m: torch.Tensor, log_s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(m + log S) - lse exactly, for lse = fl(m + log S) (Knuth's TwoSum), 0 where lse is not
    finite.  The backward forms log p = (z - lse) - residual: z - lse is exact near the max."""
    back = lse - m
    res = (m - (lse - back)) + (log_s - back)
    return torch.where(torch.isfinite(lse), res, 0.0)


def cross_entropy_rows_torch(z2d, t1d, y2d, w, eps: float, ignore_index: int, softcap: float, want_entropy: bool):
    """Reference forward on (rows, n) logits: per-row (loss, coded lse, lse residual, entropy or
    empty), in the accumulation dtype.  Exactly one of t1d (rows,) int64 / y2d (rows, n) is
    given; w: (n,) class weights in the accumulation dtype, or None; softcap: c, or 0 for none.
    The loss is the weighted cross-entropy without z-loss, 0 for ignored rows.  The twin of
    ``kernels.triton.cross_entropy.cross_entropy_fwd`` (same contract)."""
    rows, n = z2d.shape
    acc = compute_dtype(z2d)
    keep, spread = 1.0 - eps, eps / n
    pieces = []
    # Row chunks keep the temporaries in cache in eager mode; a compiler fuses the passes itself.
    step = rows if torch.compiler.is_compiling() else max(1, CHUNK_BYTES // (4 * n))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        z = upcast(z2d[r0:r1])
        if softcap:
            z = soft_cap(z, softcap)
        m, argmax = z.max(dim=-1, keepdim=True)
        d = z - m  # z_j - m <= 0: exact near the max; -inf at -inf logits
        e = d.exp()
        e.scatter_(-1, argmax, 0.0)  # log S = log1p(rest): accurate for nearly one-hot rows
        rest = e.sum(-1)
        log_s = torch.log1p(rest)
        valid = None
        # loss = (sum u) log S + sum_j u_j (m - z_j): all terms >= 0; u_j = 0 adds 0 even at z_j = -inf.
        # The differences are taken halved, (z_j - m) / 2 = z_j / 2 - m / 2 (exact scaling, one
        # rounding), and the sums doubled at the end: a span beyond the dtype's max (z - m < -max)
        # then overflows only if the loss itself does.
        if y2d is not None or eps > 0:
            half = torch.add(m * -0.5, z, alpha=0.5)  # (z - m) / 2, never overflowing
        if y2d is not None:
            u = upcast(y2d[r0:r1]).to(acc) * keep + spread
            if w is not None:
                u.mul_(w)
            loss = u.sum(-1) * log_s - 2.0 * torch.where(u != 0, u * half, 0.0).sum(-1)
        else:
            t = t1d[r0:r1]
            valid = t != ignore_index
            in_range = (t >= 0) & (t < n)  # out of range only with validation off: NaN, no stray read
            idx = torch.where(valid & in_range, t, 0)
            gap_t = m.squeeze(-1) * 0.5 - z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * 0.5  # (m - z_t) / 2
            coef_t = keep if w is None else keep * w[idx]
            loss = 2.0 * (coef_t * gap_t) + coef_t * log_s  # (1 - eps) w_t ((m - z_t) + log S)
            if w is not None:  # a target weight of 0 gives 0, even against z_t = -inf
                loss = torch.where(coef_t != 0, loss, 0.0)
            elif not keep:
                loss = torch.zeros_like(log_s)
            if eps > 0:  # (eps / C) sum_j w_j (lse - z_j), each (m - z_j) scaled before the sum
                if w is None:
                    loss = loss + (eps * log_s - 2.0 * (half * spread).sum(-1))
                else:
                    ws = w * spread
                    loss = loss + (ws.sum() * log_s - 2.0 * torch.where(ws != 0, half * ws, 0.0).sum(-1))
            loss = torch.where(in_range | ~valid, loss, float("nan"))
        m = m.squeeze(-1)
        lse = m + log_s
        ent = z.new_empty(0)
        if want_entropy:
            ent = log_s - clamped(d).mul_(e).sum(-1) / (1.0 + rest)  # -inf -> lowest: e * d = 0 there
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
            ent = torch.where(valid, ent, 0.0) if want_entropy else ent
        lse_c = coded_lse(m, lse)
        pieces.append((loss, lse_c, lse_residual(m, log_s, lse_c), ent))
    if not pieces:
        empty = z2d.new_empty(0, dtype=acc)
        return empty, empty, empty, empty
    if len(pieces) == 1:
        return pieces[0]
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def target_mass_sum(t, y, w, eps: float, ignore_index: int, n: int, acc):
    """Per row, sum_j u_j (the coefficient of p in the gradient), (rows, 1); None for unweighted
    class targets (where it is 1)."""
    keep, spread = 1.0 - eps, eps / n
    if y is not None:
        u = upcast(y).to(acc) * keep + spread
        return (u if w is None else u * w).sum(-1, keepdim=True)
    if w is None:
        return None
    idx = torch.where((t != ignore_index) & (t >= 0) & (t < n), t, 0)
    return (keep * w[idx] + spread * w.sum()).unsqueeze(-1)


def cross_entropy_vjp(z, t, y, w, eps, ignore_index, softcap, lse, lse_res, ent, g_loss, g_lse, g_ent,
                      want_gy=True):
    """The vector-Jacobian product of (loss, lse, entropy) per row, in torch ops.

    z: (rows, n); exactly one of t (rows,) / y (rows, n); w: (n,) or None; any gradient may be
    None.  Returns (dz, dy) in the dtypes of z and y (dy None for class targets or if not
    ``want_gy``).  With z' = c tanh(z / c) (z' = z without soft-capping), p = softmax(z') and
    u the smoothed, weighted target mass (module docstring):

        dz = [p (g_loss sum u + g_lse - g_H (log p + H)) - g_loss u] * dz'/dz,
        dy = g_loss (1 - eps) w (lse - z').

    While autograd records (``create_graph=True``) every op is out of place, so the result is
    differentiable again; otherwise the same ops work in place on fresh temporaries.
    """
    fast = not torch.is_grad_enabled()  # no graph: in place on the temporaries made here
    zc = upcast(z)
    acc, n = zc.dtype, zc.shape[-1]
    keep, spread = 1.0 - eps, eps / n
    zs = soft_cap(zc, softcap) if softcap else zc
    lse = nan_unless_finite(lse).unsqueeze(-1)  # a row without a distribution: NaN, as in torch
    # log p = (z - fl(lse)) - res: z - fl(lse) is exact near the max, and res, lse's rounding error
    # (per row), restores the digits of log S.  It is folded into per-row factors below:
    # p = e^{z - fl(lse)} e^{-res}, log p + H = (z - fl(lse)) + (H - res).
    res = lse_res.unsqueeze(-1)
    log_p = zs - lse
    wc = None if w is None else w.to(acc)
    gl = None if g_loss is None else g_loss.to(acc).unsqueeze(-1)
    gy = None
    if gl is not None and y is not None and want_gy:  # -g (1 - eps) w log p; +inf at z = -inf
        fac = -keep * gl if wc is None else (-keep * gl) * wc
        gy = ((log_p - res).mul_(fac) if fast else (log_p - res) * fac).to(y.dtype)
    log_p = clamped(log_p) if fast else log_p.clamp_min(lowest(acc))  # -inf logits: p = 0, finite log p
    p = log_p.exp_() if fast and g_ent is None else log_p.exp()  # e^{res} p
    u = None
    if gl is not None and y is not None:  # the soft target mass, once (its sum and itself are needed)
        u = upcast(y).to(acc) * keep + spread
        u = u if wc is None else (u.mul_(wc) if fast else u * wc)
    coef = torch.zeros_like(lse)  # per row: g_loss sum_j u_j + g_lse
    if gl is not None:
        sum_u = u.sum(-1, keepdim=True) if u is not None else target_mass_sum(t, None, wc, eps, ignore_index, n, acc)
        coef = coef + (gl if sum_u is None else gl * sum_u)
    if g_lse is not None:
        coef = coef + g_lse.to(acc).unsqueeze(-1)
    back = torch.exp(-res)  # e^{-res}: from the p computed above to p
    coef = coef * back
    if g_ent is not None:  # - g_H p (log p + H): fold into the per-entry factor before multiplying p
        inner = log_p.add_(ent.unsqueeze(-1) - res) if fast else log_p + (ent.unsqueeze(-1) - res)
        inner = inner.mul_(-g_ent.to(acc).unsqueeze(-1) * back).add_(coef) if fast else \
            inner * (-g_ent.to(acc).unsqueeze(-1) * back) + coef
        gz = p.mul_(inner) if fast else p * inner
    else:
        gz = p.mul_(coef) if fast else p * coef
    valid = bad = None
    if t is not None:
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n))
    if gl is not None:
        if u is not None:
            gz = gz.sub_(u.mul_(gl)) if fast else gz - u * gl
        else:
            if eps > 0:
                off = gl * spread if wc is None else gl * (spread * wc)
                gz = gz.sub_(off) if fast else gz - off
            idx = torch.where(valid & ~bad, t, 0).unsqueeze(-1)
            at_t = -keep * gl if wc is None else -keep * gl * wc[idx]
            gz = gz.scatter_add_(-1, idx, at_t) if fast else gz.scatter_add(-1, idx, at_t)
    if softcap:
        slope = soft_cap_slope(zc, softcap)
        gz = gz.mul_(slope) if fast else gz * slope
    if valid is not None:
        # Ignored rows: exactly 0 (they may be all -inf, with NaN p); out-of-range targets: NaN.
        if fast:
            gz.masked_fill_(~valid.unsqueeze(-1), 0.0).masked_fill_(bad.unsqueeze(-1), float("nan"))
        else:
            gz = torch.where(bad.unsqueeze(-1), float("nan"), torch.where(valid.unsqueeze(-1), gz, 0.0))
    return gz.to(z.dtype), gy


class _CrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse, lse residual, entropy) of the rows of z against class indices t or
    probabilities y, as one autograd unit on either backend.  The residual is the rounding error
    of lse (0 in exact arithmetic): not differentiable.  ``inplace`` writes the gradient over z."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, t, y, w, eps, ignore_index, softcap, want_entropy, inplace, backend):
        return _forward(z, t, y, w, eps, ignore_index, softcap, want_entropy, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, t, y, w, eps, ignore_index, softcap, want_entropy, inplace, backend = inputs
        _setup(ctx, inputs[:8], output)
        ctx.inplace, ctx.backend, ctx.used = inplace, backend, False
        ctx.cpu_kernel = backend == "cpu"

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_res, g_ent):
        if ctx.used:
            raise RuntimeError("cross_entropy(inplace_backward=True) can be backpropagated once: its gradient was "
                               "written over the logits; use inplace_backward=False to backpropagate again")
        z, t, y, w, lse, res, ent = ctx.saved_tensors
        eps, ignore_index, softcap = ctx.options
        g_ent = g_ent if ent.numel() else None
        if torch.is_grad_enabled() or g_loss is None:  # a graph of the backward (or only lse/entropy used)
            gz, gy = cross_entropy_vjp(z, t, y, w, eps, ignore_index, softcap, lse, res, ent, g_loss, g_lse, g_ent,
                                       want_gy=ctx.needs_input_grad[2])
            return gz, None, gy, *([None] * 7)
        want_gy = y is not None and ctx.needs_input_grad[2]
        if ctx.inplace:
            ctx.used = True
            grad = z
        else:
            grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        if ctx.backend == "triton":
            gy = torch.ops.entmath.cross_entropy_backward_triton(
                grad, z, t, y, w, lse, res, ent, g_loss, g_lse, g_ent, eps, ignore_index, softcap, want_gy)
        elif ctx.cpu_kernel and y is not None:
            direct = getattr(ctx, "direct", False)
            backward_c = _backward_probs_c if direct else torch.ops.entmath.cross_entropy_probs_backward_cpu
            gy = backward_c(grad, z, y, w, lse, res, ent, g_loss, g_lse, g_ent, eps, want_gy)
        elif ctx.cpu_kernel:
            backward_c = _backward_c if getattr(ctx, "direct", False) else torch.ops.entmath.cross_entropy_backward_cpu
            backward_c(grad, z, t, w, lse, res, ent, g_loss, g_lse, g_ent, eps, ignore_index)
            gy = None
        else:
            gy = _vjp_into(grad, z, t, y, w, eps, ignore_index, softcap, lse, res, ent, g_loss, g_lse, g_ent, want_gy)
        if ctx.inplace:
            # Another node may have saved these logits for its backward: autograd's version
            # counter turns its use of the overwritten values into an error, never a wrong number.
            torch.autograd.graph.increment_version(z)
        return grad, None, gy if want_gy else None, *([None] * 7)

    @staticmethod
    def eager_forward(z, t, y, w, eps, ignore_index, softcap, want_entropy, inplace, backend, counts):
        return _forward(z, t, y, w, eps, ignore_index, softcap, want_entropy, backend, direct=True, counts=counts)


_CrossEntropyEager = eager_function(_CrossEntropy)  # the same unit for eager calls that record a graph


def _forward(z, t, y, w, eps, ignore_index, softcap, want_entropy, backend, direct=False, counts=None):
    """Per-row (loss, lse, residual, entropy) on the chosen path ("triton", "cpu": the C kernel,
    or "torch"); ``direct``: call the C kernel itself rather than its registered operator (plain
    eager calls only), which fills ``counts`` if given (see ``kernels.cpu.rows.ce_fwd``)."""
    if backend == "triton":
        return torch.ops.entmath.cross_entropy_triton(z, t, y, w, eps, ignore_index, softcap, want_entropy)
    if backend == "cpu" and y is not None:
        if direct and cpu_rows.available():
            return cpu_rows.ce_probs_fwd(z, y, w, eps, want_entropy, counts)[:4]
        return torch.ops.entmath.cross_entropy_probs_cpu(z, y, w, eps, want_entropy)
    if backend == "cpu":
        if direct and cpu_rows.available():
            return cpu_rows.ce_fwd(z, t, w, eps, ignore_index, want_entropy, counts)
        return torch.ops.entmath.cross_entropy_cpu(z, t, w, eps, ignore_index, want_entropy)
    return cross_entropy_rows_torch(z, t, y, w, eps, ignore_index, softcap, want_entropy)


def _vjp_into(grad, z, t, y, w, eps, ignore_index, softcap, lse, res, ent, g_loss, g_lse, g_ent, want_gy):
    """``cross_entropy_vjp`` in row chunks, written into ``grad`` (which may be z itself: each
    chunk is read before it is written), so temporaries stay chunk-sized.  Returns dL/dy."""
    rows, n = z.shape
    step = max(1, CHUNK_BYTES // (4 * max(n, 1)))
    gys = []

    def part(x, sl):
        return None if x is None else x[sl]

    for r0 in range(0, rows, step):
        sl = slice(r0, min(rows, r0 + step))
        gz, gy = cross_entropy_vjp(z[sl], part(t, sl), part(y, sl), w, eps, ignore_index, softcap, lse[sl], res[sl],
                                   ent[sl] if g_ent is not None else ent, g_loss[sl], part(g_lse, sl),
                                   part(g_ent, sl), want_gy=want_gy)
        grad[sl].copy_(gz)
        if want_gy:
            gys.append(gy)
    return torch.cat(gys) if gys else None


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
@triton_kernel_op("cross_entropy_triton")
def cross_entropy_triton(z: torch.Tensor, t: Optional[torch.Tensor], y: Optional[torch.Tensor],
                         w: Optional[torch.Tensor], eps: float, ignore_index: int, softcap: float,
                         want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, coded lse, lse residual, entropy or empty) of (rows, n) logits, one read of
    each row."""
    return kernels("cross_entropy").cross_entropy_fwd(
        rows_2d(z), None if t is None else t.contiguous(), None if y is None else rows_2d(y),
        None if w is None else w.to(acc_dtype(z)).contiguous(), eps, ignore_index, softcap, want_entropy)


@cross_entropy_triton.register_fake
def _(z, t, y, w, eps, ignore_index, softcap, want_entropy):
    loss = z.new_empty(z.shape[:1], dtype=acc_dtype(z))
    ent = z.new_empty(z.shape[0] if want_entropy else 0, dtype=acc_dtype(z))
    return loss, torch.empty_like(loss), torch.empty_like(loss), ent


@triton_kernel_op("cross_entropy_backward_triton", mutates_args=("grad",))
def cross_entropy_backward_triton(grad: torch.Tensor, z: torch.Tensor, t: Optional[torch.Tensor],
                                  y: Optional[torch.Tensor], w: Optional[torch.Tensor], lse: torch.Tensor,
                                  lse_res: torch.Tensor, ent: torch.Tensor, g_loss: torch.Tensor,
                                  g_lse: Optional[torch.Tensor], g_ent: Optional[torch.Tensor], eps: float,
                                  ignore_index: int, softcap: float, want_grad_y: bool) -> torch.Tensor:
    """Write dL/dz into ``grad`` (which may be z itself); return dL/dy (empty unless wanted).
    One read of each row of z (and y), one write of the gradient."""
    k = kernels("cross_entropy")
    acc = acc_dtype(z)
    wc = None if w is None else w.to(acc).contiguous()
    grad_y = torch.empty_like(y, memory_format=torch.contiguous_format) if want_grad_y else None
    sum_u = target_mass_sum(t, y, wc, eps, ignore_index, z.shape[-1], acc)
    k.cross_entropy_bwd(z if grad is z else rows_2d(z), None if t is None else t.contiguous(),
                        None if y is None else rows_2d(y), wc, lse, lse_res, ent, g_loss.contiguous(),
                        None if g_lse is None else g_lse.contiguous(), None if g_ent is None else g_ent.contiguous(),
                        None if sum_u is None else sum_u.reshape(-1).contiguous(), eps, ignore_index, softcap,
                        grad, grad_y)
    return grad_y if grad_y is not None else z.new_empty(0)


@cross_entropy_backward_triton.register_fake
def _(grad, z, t, y, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, ignore_index, softcap, want_grad_y):
    return torch.empty_like(y) if want_grad_y else z.new_empty(0)


# ---- the C path (CPU; no soft-capping), registered the same way ------------------------------
def _on_cpu_kernel(z, t, softcap, y=None) -> bool:
    """Whether the torch backend hands these rows to the C kernel (kernels/cpu/rows.py): class
    indices t, or probability targets y of the logits' dtype, without soft-capping."""
    if softcap or not cpu_rows.takes(z):
        return False
    return t is not None or (y is not None and y.dtype == z.dtype and y.device == z.device)


@cpu_kernel_op("cross_entropy_cpu")
def cross_entropy_cpu(z: torch.Tensor, t: torch.Tensor, w: Optional[torch.Tensor], eps: float, ignore_index: int,
                      want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, coded lse, lse residual, entropy or empty), float32, of float32/bfloat16
    logits (rows, n) against class indices, by the C kernel (one read of each row from memory;
    the eager path if it cannot be built)."""
    if not cpu_rows.available():
        return cross_entropy_rows_torch(z, t, None, w, eps, ignore_index, 0.0, want_entropy)
    return cpu_rows.ce_fwd(z if z.stride(-1) == 1 else z.contiguous(), t, w, eps, ignore_index, want_entropy)


@cross_entropy_cpu.register_fake
def _(z, t, w, eps, ignore_index, want_entropy):
    loss = z.new_empty(z.shape[:1], dtype=torch.float32)
    return loss, torch.empty_like(loss), torch.empty_like(loss), z.new_empty(z.shape[0] if want_entropy else 0,
                                                                           dtype=torch.float32)


@cpu_kernel_op("cross_entropy_backward_cpu", mutates_args=("grad",))
def cross_entropy_backward_cpu(grad: torch.Tensor, z: torch.Tensor, t: torch.Tensor, w: Optional[torch.Tensor],
                               lse: torch.Tensor, lse_res: torch.Tensor, ent: torch.Tensor, g_loss: torch.Tensor,
                               g_lse: Optional[torch.Tensor], g_ent: Optional[torch.Tensor], eps: float,
                               ignore_index: int) -> None:
    """Write dL/dz into ``grad`` (contiguous rows; may be z itself) by the C kernel: one read of
    each row, one write."""
    _backward_c(grad, z, t, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, ignore_index)


def _backward_c(grad, z, t, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, ignore_index):
    """``cross_entropy_backward_cpu`` itself (called directly by eager calls)."""
    if not cpu_rows.available():
        _vjp_into(grad, z, t, None, w, eps, ignore_index, 0.0, lse, lse_res, ent, g_loss, g_lse, g_ent, False)
        return
    wc = None if w is None else w.to(torch.float32)
    sum_u = target_mass_sum(t, None, wc, eps, ignore_index, z.shape[-1], torch.float32)
    cpu_rows.ce_bwd(grad, z if z.stride(-1) == 1 else z.contiguous(), t, wc, eps, ignore_index, lse, lse_res,
                    ent if g_ent is not None else None, g_loss, g_lse, g_ent,
                    None if sum_u is None else sum_u.reshape(-1))


@cross_entropy_backward_cpu.register_fake
def _(grad, z, t, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, ignore_index):
    return None


def _c_takes_probs(z, y) -> bool:
    """Whether the C kernel can run these logits and probability targets (else the eager path)."""
    return z.dtype in (torch.float32, torch.bfloat16) and y.dtype == z.dtype and cpu_rows.available()


@cpu_kernel_op("cross_entropy_probs_cpu")
def cross_entropy_probs_cpu(z: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], eps: float,
                            want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, coded lse, lse residual, entropy or empty) of logits (rows, n) against
    probability targets y (rows, n), by the C kernel for float32/bfloat16 logits and targets of
    their dtype (one read of each row of z and y from memory), else by the eager path; in the
    accumulation dtype."""
    if not _c_takes_probs(z, y):
        return cross_entropy_rows_torch(z, None, y, w, eps, -100, 0.0, want_entropy)
    return cpu_rows.ce_probs_fwd(z if z.stride(-1) == 1 else z.contiguous(),
                                 y if y.stride(-1) == 1 else y.contiguous(), w, eps, want_entropy)[:4]


@cross_entropy_probs_cpu.register_fake
def _(z, y, w, eps, want_entropy):
    loss = z.new_empty(z.shape[:1], dtype=acc_dtype(z))
    return loss, torch.empty_like(loss), torch.empty_like(loss), z.new_empty(z.shape[0] if want_entropy else 0,
                                                                           dtype=acc_dtype(z))


@cpu_kernel_op("cross_entropy_probs_backward_cpu", mutates_args=("grad",))
def cross_entropy_probs_backward_cpu(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor],
                                     lse: torch.Tensor, lse_res: torch.Tensor, ent: torch.Tensor,
                                     g_loss: torch.Tensor, g_lse: Optional[torch.Tensor],
                                     g_ent: Optional[torch.Tensor], eps: float, want_grad_y: bool) -> torch.Tensor:
    """Write dL/dz into ``grad`` (contiguous rows; may be z itself); return dL/dy (empty unless
    wanted).  By the C kernel, one read of each row of z and y and one write of each gradient."""
    gy = _backward_probs_c(grad, z, y, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, want_grad_y)
    return gy if gy is not None else z.new_empty(0)


def _backward_probs_c(grad, z, y, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, want_grad_y):
    """``cross_entropy_probs_backward_cpu`` itself (called directly by eager calls); dL/dy or None."""
    if not _c_takes_probs(z, y):
        return _vjp_into(grad, z, None, y, w, eps, -100, 0.0, lse, lse_res, ent, g_loss, g_lse, g_ent, want_grad_y)
    return cpu_rows.ce_probs_bwd(grad, z if z.stride(-1) == 1 else z.contiguous(),
                                 y if y.stride(-1) == 1 else y.contiguous(), w, eps, lse, lse_res,
                                 ent if g_ent is not None else None, g_loss, g_lse, g_ent, want_grad_y)


@cross_entropy_probs_backward_cpu.register_fake
def _(grad, z, y, w, lse, lse_res, ent, g_loss, g_lse, g_ent, eps, want_grad_y):
    return torch.empty_like(y, memory_format=torch.contiguous_format) if want_grad_y else z.new_empty(0)


def _setup(ctx, inputs, output):
    z, t, y, w, eps, ignore_index, softcap, want_entropy = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])  # the rounding residual of lse: 0 in exact arithmetic
    ctx.save_for_backward(z, t, y, w, output[1], output[2], output[3])
    ctx.options = (eps, ignore_index, softcap)


def _backward(ctx, g_loss, g_lse, g_res, g_ent):
    z, t, y, w, lse, res, ent = ctx.saved_tensors
    g_ent = g_ent if ent.numel() else None
    gz, gy = cross_entropy_vjp(z, t, y, w, *ctx.options, lse, res, ent, g_loss, g_lse, g_ent,
                               want_gy=ctx.needs_input_grad[2])
    return gz, None, gy, None, None, None, None, None


# Direct callers of the registered operators get autograd (the torch formula).
cross_entropy_triton.register_autograd(_backward, setup_context=_setup)
register_row_vmap(cross_entropy_triton, (1, 0, 1, None, None, None, None, None))


def _setup_cpu(ctx, inputs, output):
    z, t, w, eps, ignore_index, want_entropy = inputs
    _setup(ctx, (z, t, None, w, eps, ignore_index, 0.0, want_entropy), output)


cross_entropy_cpu.register_autograd(lambda ctx, gl, gs, gr, ge: _backward(ctx, gl, gs, gr, ge)[:2]
                                    + (None, None, None, None), setup_context=_setup_cpu)
register_row_vmap(cross_entropy_cpu, (1, 0, None, None, None, None))


def _setup_probs_cpu(ctx, inputs, output):
    z, y, w, eps, want_entropy = inputs
    _setup(ctx, (z, None, y, w, eps, -100, 0.0, want_entropy), output)
    ctx.want_gy = ctx.needs_input_grad[1]


def _backward_probs_cpu(ctx, g_loss, g_lse, g_res, g_ent):
    z, t, y, w, lse, res, ent = ctx.saved_tensors
    g_ent = g_ent if ent.numel() else None
    gz, gy = cross_entropy_vjp(z, t, y, w, *ctx.options, lse, res, ent, g_loss, g_lse, g_ent, want_gy=ctx.want_gy)
    return gz, gy, None, None, None


cross_entropy_probs_cpu.register_autograd(_backward_probs_cpu, setup_context=_setup_probs_cpu)
register_row_vmap(cross_entropy_probs_cpu, (1, 1, None, None, None))


# ---- the common call: one C kernel call forward, one backward ---------------------------------
@eager_apply
class _CommonCall(torch.autograd.Function):
    """``cross_entropy`` of (rows, n) CPU logits against int64 class indices or probability
    targets of their dtype, with no class weights, entropy, z-loss, soft-capping or in-place
    backward, reduced, for eager calls that record a graph (``_common_call``): the forward is
    one kernel call that also reduces (``kernels.cpu.rows.ce_fwd_reduced``,
    ``ce_probs_fwd_reduced``), the backward one that reads the reduction's gradient as it is (a
    scalar, or the rows' gradients at any stride).  One autograd node instead of the unit's
    three (the unit, a division and a sum): on small inputs the graph's bookkeeping is most of
    the time.  A graph of the backward (``create_graph=True``) is built by the unit itself,
    recomputed from the inputs, so that double backward sees lse's dependence on them."""

    @staticmethod
    def forward(ctx, z, target, options):
        probs, eps, ignore_index, reduction, counts, threads = options
        code = _REDUCTION_CODES[reduction]
        if probs:
            out, scratch = cpu_rows.ce_probs_fwd_reduced(z, target, eps, code, counts, threads, keep=True)
        else:
            out, scratch = cpu_rows.ce_fwd_reduced(z, target, eps, ignore_index, code, counts, threads, keep=True)
        ctx.save_for_backward(z, target, scratch)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, g):
        z, target, scratch = ctx.saved_tensors
        probs, eps, ignore_index, reduction, counts, threads = ctx.options
        need_z, need_y = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                t, y = (None, target) if probs else (target, None)
                loss = _CrossEntropy.apply(z, t, y, None, eps, ignore_index, 0.0, False, False, "cpu")[0]
                out = _reduce(loss, None, reduction, None if probs else target != ignore_index, None)
            grads = iter(torch.autograd.grad(out, [x for x, need in ((z, need_z), (target, need_y)) if need], g,
                                             create_graph=True))
            return next(grads) if need_z else None, next(grads) if need_y else None, None
        rows = z.shape[0]
        counted = rows if probs else rows - counts[2]  # rows not ignored (the kernel counted the others)
        g_div = float(counted) if reduction == "mean" and counted > 0 else 1.0
        if probs:
            gz, gy = cpu_rows.ce_probs_bwd_reduced(z, target, eps, scratch, g, g_div, threads, need_y)
            return gz if need_z else None, gy, None
        return cpu_rows.ce_bwd_reduced(z, target, eps, ignore_index, scratch, g, g_div, threads), None, None


_NUMBERS = (float, int)
_C_DTYPES = (torch.float32, torch.bfloat16)
_COUNTS = ctypes.c_int64 * 3  # what the kernel counts (``kernels.cpu.rows.ce_fwd``, ``ce_probs_fwd``)
_REDUCTION_CODES = cpu_rows.REDUCTION_CODES


def _common_call(logits, target, dim, ignore_index, reduction, eps, backend):
    """``cross_entropy`` for the calls most programs make, or None (the general path then runs):
    an eager call (``eager_call``) with CPU float32/bfloat16 logits (rows, n), classes last and
    contiguous, against int64 class indices (rows,), contiguous, or probability targets of the
    logits' dtype and shape, classes contiguous, with only ``ignore_index``, ``reduction`` and
    ``label_smoothing`` among the options.  It computes what the general path computes, by the
    same C kernel, with the reduction in the kernel call (summed in double: within a rounding or
    two of the general path's float32 sum of the rows divided first), and reads the kernel's
    counts for validation: a handful of Python steps in all, so that a small input costs about
    what ``F.cross_entropy`` costs.  Anything it does not accept, including every bad argument,
    goes to the general path, which raises the documented errors."""
    if torch.compiler.is_compiling():  # (first: nothing below is for the compiler to trace)
        return None
    if not (type(target) is torch.Tensor and logits.dim() == 2 and type(dim) is int and (dim == -1 or dim == 1)
            and type(ignore_index) is int and INT64_MIN <= ignore_index <= INT64_MAX):
        return None
    rows, n = logits.shape
    probs = target.dtype is logits.dtype
    if probs:
        if not (target.shape == logits.shape and target.is_cpu and target.stride(1) == 1 and ignore_index < 0):
            return None
    elif not (target.dtype is torch.int64 and target.dim() == 1 and target.shape[0] == rows
              and target.is_contiguous()):
        return None
    if not (n and logits.dtype in _C_DTYPES and logits.is_cpu and logits.stride(1) == 1
            and rows * n >= cpu_rows.MIN_ELEMS and cpu_rows.on() and backend in ("auto", "torch")
            and type(eps) in _NUMBERS and 0.0 <= eps <= 1.0):
        return None
    threads = cpu_rows.threads_of_one_call(rows, n)
    mode = eager_call(logits, target) if probs else eager_call(logits)
    if mode is None or not threads or not cpu_rows.available():
        return None
    counts, eps = _COUNTS(), float(eps)
    if mode == "graph":
        out = _CommonCall.apply(logits, target, (probs, eps, ignore_index, reduction, counts, threads))
    elif probs:
        out = cpu_rows.ce_probs_fwd_reduced(logits, target, eps, _REDUCTION_CODES[reduction], counts, threads)[0]
    else:
        out = cpu_rows.ce_fwd_reduced(logits, target, eps, ignore_index, _REDUCTION_CODES[reduction], counts,
                                      threads)[0]
    if (counts[0] or counts[1]) and is_validation_enabled():
        # (raises, naming the targets or rows; the rows' coded lse, which name the cause, come
        # from one more call that keeps them)
        z, again = logits.detach(), _COUNTS()
        if probs:
            if counts[0]:
                _check_probabilities(target)
            lse = cpu_rows.ce_probs_fwd_reduced(z, target.detach(), eps, 0, again, threads, keep=True)[1]
            check_rows_finite(lse[rows:2 * rows], "logits")
        else:
            if counts[0]:
                _check_class_indices(target, target, ignore_index, n)
            lse = cpu_rows.ce_fwd_reduced(z, target, eps, ignore_index, 0, again, threads, keep=True)[1]
            check_rows_finite(lse[rows:2 * rows], "logits", rows=target != ignore_index)
    if logits.dtype is not torch.float32:
        out = out.to(output_dtype(logits))
    return out


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                  dim: int = -1, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: Optional[float] = None, return_entropy: bool = False,
                  inplace_backward: bool = False, backend: str = "auto"):
    """Softmax cross-entropy between ``logits`` and ``target`` along ``dim``, fused with its gradient.

    Matches ``torch.nn.functional.cross_entropy(logits.movedim(dim, 1), target, weight, ...)`` for
    the options the two share (class weights, ``ignore_index``, label smoothing, probability
    targets, every reduction, forward and backward); accumulates in fp32 for fp16/bf16 logits.

    Accuracy (tests/test_cross_entropy.py holds both backends to it against mpmath, on rows
    shifted by 1e2 to 1e30 or to near the dtype's max, spans up to and beyond the max, masks
    from -1e4 to -max mixed with -inf, subnormal spreads, fp16/bf16 near their max): for finite
    logits (-inf allowed) and non-negative targets and weights, each row's loss is within

        8 r (L + U H)

    of the exact cross-entropy L of the given values, plus the rounding to the output dtype
    (and, below its smallest normal number, an absolute error of that size).  r is the unit
    roundoff of the accumulation dtype (2^-24 for fp16, bf16 and fp32, 2^-53 for fp64), U =
    sum_j u_j the smoothed, weighted target mass and H the entropy of softmax(logits): U H
    covers exp's amplification of the rounding of z_j - max z in nearly one-hot rows.  The loss
    is +inf exactly where a class with target mass sits at a -inf logit or the exact loss
    exceeds the dtype's max; never 0, NaN or inf otherwise.  "mean" divides each row before the
    sum, so it does not overflow when its value is representable.  The gradient's entry k is
    within ``16 r (U p_k (1 + |log p_k| + H) + u_k)`` of the exact (U p_k - u_k), at any offset
    too.  Soft-capping adds tanh's rounding (a few r of ``softcap`` per logit, absolute) and,
    in the gradient's entry k, ``2 r |z_k| / softcap`` relative (the slope sech^2(z_k / c)).
    Measured worst over 400 such rows per backend and dtype (benchmarks/accuracy_cross_entropy.py):
    0.4 of the loss bound in fp32 and fp64; fp16/bf16 results are dominated by their own output
    rounding.

    Args:
        logits: floating-point tensor; ``-inf`` marks impossible classes.
        target: class indices (any integer dtype, the shape of ``logits`` without ``dim``) or class
            probabilities (floating dtype, the shape of ``logits``; rows need not sum to 1; a
            target of 0 contributes 0 even against a ``-inf`` logit).  Probability targets are
            differentiable.
        weight: class weights, a 1-D floating tensor of C entries (C = ``logits.shape[dim]``), as
            in ``torch.nn.functional.cross_entropy``: the loss of a row with class index t is
            scaled by ``weight[t]`` (label smoothing's uniform part weights class j by
            ``weight[j]``), a probability target's term j by ``weight[j]``; ``"mean"`` over class
            indices divides by the sum of the target classes' weights over the non-ignored rows.
            Not differentiable (a ``weight`` that requires grad is refused, as torch refuses it
            for class indices).
        dim: the class dimension (keyword-only: the third positional argument is ``weight``, as
            in ``torch.nn.functional.cross_entropy``).
        ignore_index: class-index targets equal to it contribute 0 loss, 0 gradient, 0 entropy.
            Must fit in int64.  With probability targets it must be negative (the default), as
            in torch.
        reduction: ``"none"`` (per-row losses), ``"sum"``, or ``"mean"`` (over non-ignored rows for
            class indices, weighted by ``weight[t]`` if given; over all rows for probabilities).
            **Documented value:** ``"mean"`` over zero non-ignored rows is 0.0 with zero
            gradient (``torch`` returns NaN).
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) y + eps / C.
        z_loss: weight of the auxiliary ``z_loss * lse**2`` per row (PaLM's z-loss), included in
            the returned loss and its gradient ``2 z_loss lse p``.  Not scaled by ``weight``;
            ``"mean"`` averages it over the non-ignored rows (as Liger-Kernel does), so the
            result is ``F.cross_entropy(...) + z_loss * mean(lse**2)``.
        softcap: logit soft-capping, ``softcap * tanh(logits / softcap)`` before the softmax (as
            Gemma 2 and Liger-Kernel use), a finite number > 0, or None (off).  The formula
            maps +-inf to +-softcap, so a ``-inf`` logit is a class of logit ``-softcap``, not
            an impossible one, and a +inf logit is no error.  The gradient is chained through
            ``sech^2(logits / softcap)`` (Chapter 5).
        return_entropy: also return the per-row entropy of softmax(logits) (of the capped logits
            with ``softcap``; shape of ``logits`` without ``dim``; 0 for ignored rows), from the
            same pass, differentiable (an entropy bonus ``loss - beta * entropy.mean()``
            backpropagates through it).
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
        TypeError: non-float ``logits`` or ``weight``; ``target`` neither integer nor float;
            non-number options.
        ValueError: bad ``dim``, empty class dimension, ``target`` or ``weight`` shape
            mismatch, ``weight`` on another device or requiring grad, ``ignore_index`` outside
            int64 or >= 0 with probability targets, ``label_smoothing`` outside [0, 1],
            negative or non-finite ``z_loss``, ``softcap`` not finite and > 0, unknown
            ``reduction``.  Value checks (read the data, see ``entmath.set_validation``): a
            class index outside [0, C) other than ``ignore_index``; NaN or +-inf probability
            targets; non-finite weights; NaN, +inf, or all ``-inf`` logits in a row that is
            not ignored.  With validation off these are not raised: such rows (and rows whose
            class index is out of range) give NaN (a row with a +inf probability target: NaN
            or +inf); other rows are unaffected.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
        >>> target = torch.tensor([0, 2])
        >>> entmath.cross_entropy(logits, target)
        tensor(0.6700)
        >>> entmath.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
        tensor([0.3913, 1.0986])
    """
    if (weight is None and softcap is None and not return_entropy and not inplace_backward
            and type(z_loss) in _NUMBERS and z_loss == 0 and type(reduction) is str and reduction in REDUCTIONS
            and isinstance(logits, torch.Tensor)):
        out = _common_call(logits, target, dim, ignore_index, reduction, label_smoothing, backend)
        if out is not None:
            return out
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
    cap = 0.0
    if softcap is not None:
        cap = _number(softcap, "softcap")
        if not 0.0 < cap < float("inf"):
            raise ValueError(f"softcap must be a finite number > 0 (or None: no capping), got {softcap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (class indices are int64), got {ignore_index}")
    inplace = bool(inplace_backward)
    if inplace:
        _check_inplace(logits)
    n_classes = logits.shape[dim]
    w = None if weight is None else _class_weights(weight, logits, n_classes)
    z = logits if dim == logits.dim() - 1 else logits.movedim(dim, -1)
    lead = z.shape[:-1]
    t1d = y2d = None
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"target holds probabilities, so its shape must equal logits' shape "
                             f"{tuple(logits.shape)}; got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise ValueError(f"ignore_index is not supported for probability targets (floating-point target), as "
                             f"in torch.nn.functional.cross_entropy: it must be negative (the default is -100), "
                             f"got {ignore_index}")
        y2d = rows_2d(target.movedim(dim, -1))
    elif target.dtype in INDEX_DTYPES:
        if target.shape != lead:
            raise ValueError(f"target holds class indices, so its shape must be logits' shape without "
                             f"dim={dim}, {tuple(lead)}; got {tuple(target.shape)}")
        t1d = (target if target.dim() == 1 else target.reshape(-1)).long().contiguous()
        if target.dtype == torch.uint64:  # values >= 2^63 read as negative: out of range, never ignore_index
            t1d = torch.where(t1d < 0, -1 if ignore_index != -1 else -2, t1d)
    else:
        raise TypeError(f"target must hold class indices (an integer dtype) or probabilities "
                        f"(a floating dtype), got {target.dtype}")
    backend = resolve_backend(backend, logits)
    z2d = rows_2d(z)
    if backend == "torch" and _on_cpu_kernel(z2d, t1d, cap, y2d):
        backend = "cpu"  # the C kernel of the torch path (kernels/cpu/rows.py)
    mode = eager_call(z2d, y2d, w)
    # On the C kernel, called directly, the kernel counts bad class indices, rows without a
    # distribution and ignored rows (into a buffer of three int64 the kernel writes and Python
    # reads, no tensor): the checks below then cost nothing instead of a dozen small tensor ops
    # (most of the time of a small call).
    # Probability targets: the kernel counts the rows with a NaN or +-inf target in the same sweep
    # (a torch check is one more read of the targets, most of the time of a large call).
    checks = t1d is not None and value_checks_active(z2d, t1d)
    y_checks = y2d is not None and value_checks_active(z2d, y2d)
    counts = ((ctypes.c_int64 * 3)() if mode and backend == "cpu" and (checks or y_checks) and cpu_rows.available()
              else None)
    if counts is None and checks:
        _check_class_indices(target, t1d, ignore_index, n_classes)
    if counts is None and y_checks:
        _check_probabilities(y2d)
    if mode == "plain":
        loss, lse, _, ent = _forward(z2d, t1d, y2d, w, eps, ignore_index, cap, bool(return_entropy), backend,
                                     direct=True, counts=counts)
    elif mode == "graph":
        loss, lse, _, ent = _CrossEntropyEager.apply(z2d, t1d, y2d, w, eps, ignore_index, cap, bool(return_entropy),
                                                     inplace, backend, counts)
    else:
        loss, lse, _, ent = _CrossEntropy.apply(z2d, t1d, y2d, w, eps, ignore_index, cap, bool(return_entropy),
                                                inplace and not torch.compiler.is_compiling(), backend)
    if counts is not None and y2d is not None:
        bad_targets, faults, _ = counts
        if bad_targets:
            _check_probabilities(y2d)  # raises, naming the rows
        valid = None
        if faults:
            check_rows_finite(lse, "logits")  # raises, naming the rows
        all_finite = True
    elif counts is not None:
        out_of_range, faults, ignored = counts
        if out_of_range:
            _check_class_indices(target, t1d, ignore_index, n_classes)
        # no ignored row and no class weights: every row counts alike (the mean divides by rows)
        valid = None if ignored == 0 and w is None else t1d != ignore_index
        if faults:
            check_rows_finite(lse, "logits", rows=t1d != ignore_index)  # raises, naming the rows
        all_finite = True
    else:
        valid = None if t1d is None else t1d != ignore_index
        all_finite = check_rows_finite(lse, "logits", rows=valid)  # True: verified, nothing to mask
    bad_row = None
    if not all_finite:
        bad_row = ~torch.isfinite(lse) if valid is None else valid & ~torch.isfinite(lse)
        loss = torch.where(bad_row, float("nan"), loss)  # NaN / +inf / no finite logit: a NaN row
    z_rows = None
    if z_loss:
        finite_lse = lse if all_finite else torch.where(torch.isfinite(lse), lse, 0.0)  # (bad rows: NaN already)
        z_rows = z_loss * finite_lse * finite_lse
        if valid is not None:
            z_rows = torch.where(valid, z_rows, 0.0)
    out = _reduce(loss, z_rows, reduction, valid, None if w is None else (w, t1d, n_classes))
    out_dtype = output_dtype(logits)
    if reduction == "none" and out.shape != lead:
        out = out.view(lead)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    if return_entropy:
        ent = ent if bad_row is None else torch.where(bad_row, float("nan"), ent)
        return out, ent.view(lead).to(out_dtype)
    return out


def _check_probabilities(y2d) -> None:
    """Raise if a probability target is NaN or +-inf, naming the rows."""
    if not bool(torch.isfinite(y2d).all()):
        rows = (~torch.isfinite(y2d)).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"target contains NaN or +-inf probabilities (row(s) {rows} of the flattened rows)")


def _check_class_indices(target, t1d, ignore_index: int, n_classes: int) -> None:
    """Raise if a class index other than ``ignore_index`` is outside [0, n_classes), naming them."""
    out_of_range = (t1d != ignore_index) & ((t1d < 0) | (t1d >= n_classes))
    if bool(out_of_range.any()):
        bad = target.reshape(-1)[out_of_range][:5].tolist()
        raise ValueError(f"target has class indices outside [0, {n_classes}): {bad} (ignore_index={ignore_index})")


def _reduce(loss, z_rows, reduction, valid, weighting):
    """Per-row losses (cross-entropy, z-loss or None) to the result.  "mean" divides each row by
    its denominator before summing, so a mean of rows near the dtype's max does not overflow:
    cross-entropy by the rows (probabilities), the non-ignored rows, or the sum of their target
    classes' weights; z-loss by the rows counted."""
    if reduction != "mean":
        rows = loss if z_rows is None else loss + z_rows
        return rows if reduction == "none" else rows.sum()
    if valid is None:
        count = max(loss.numel(), 1)
        denom = count
    else:
        count = valid.sum()
        if weighting is None:
            denom = count.to(loss.dtype)
        else:
            w, t, n = weighting
            denom = torch.where(valid, w[torch.where(valid & (t >= 0) & (t < n), t, 0)], 0.0).sum()
        denom = torch.where(count > 0, denom, 1.0)  # documented: no counted row -> 0 (the rows are 0)
        count = count.clamp_min(1)
    per_row = loss / denom
    if z_rows is not None:
        per_row = per_row + z_rows / count
    return per_row.sum()


def _class_weights(weight, logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The ``weight`` argument checked and in the accumulation dtype: (C,), contiguous."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of class weights or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating-point dtype, got {weight.dtype}")
    if weight.shape != (n_classes,):
        raise ValueError(f"weight must be a 1-D tensor with one weight per class ({n_classes}), got shape "
                         f"{tuple(weight.shape)}")
    if weight.device != logits.device:
        raise ValueError(f"weight is on {weight.device}, logits on {logits.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight requires grad, but cross_entropy does not differentiate with respect to class "
                         "weights (torch.nn.functional.cross_entropy refuses it for class indices too); pass "
                         "weight.detach()")
    w = weight.to(compute_dtype(logits)).contiguous()
    if value_checks_active(w) and not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight contains NaN or +-inf: {w.tolist()[:8]}")
    return w


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
