"""Triton kernels for ``entmath.cross_entropy``: per-row loss, lse and entropy, and the gradient.

Forward, one program per row, one read of the row: BLOCK-wide chunks fold into the online
statistics of ``softmax_stats`` (max m, count at the max c, mass below T, moment A) and into what
the target needs:

* class index t:    loss = (1 - eps)((m - z_t) + log S) + eps (lse - mean_j z_j)
* probabilities y:  loss = sum_j y'_j (lse - z_j),  y' = (1 - eps) y + eps / C,
                    accumulated as (sum_j y'_j) lse - sum_{y'_j != 0} y'_j z_j   (0 log 0 = 0)
* z-loss:           + z_loss * lse^2
* entropy:          H = log S - A / S

Backward, one program per row, one read of the row (and of y) and one write of the gradient:

    dL/dz = g_loss ((sum y' + 2 z_loss lse) p - y') - g_H p (log p + H),   p = e^{z - lse},

and for probability targets dL/dy = g_loss (1 - eps)(lse - z).  The gradient buffer may be the
logits themselves (``inplace_backward``): each program reads a chunk before it writes it.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import block_size, num_warps
from .softmax_stats import coded_lse, load_row_chunk, log_normaliser, update_stats


@triton.jit
def cross_entropy_fwd_kernel(z_ptr, t_ptr, y_ptr, loss_ptr, lse_ptr, ent_ptr, coef_ptr,
                             n_cols, stride_z, stride_y, ignore_index,
                             SOFT: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, ENTROPY: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    # (1 - eps, eps / C, eps, z_loss) in the accumulation dtype: scalar arguments would be fp32.
    keep, spread = tl.load(coef_ptr), tl.load(coef_ptr + 1)
    eps, z_loss = tl.load(coef_ptr + 2), tl.load(coef_ptr + 3)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)
    n_nan = tl.zeros([], tl.int32)
    sum_z = tl.zeros([], ACC)   # sum_j z_j             (smoothing, class targets)
    sum_y = tl.zeros([], ACC)   # sum_j y'_j            (probability targets)
    sum_yz = tl.zeros([], ACC)  # sum_{y'_j != 0} y'_j z_j
    for start in range(0, n_cols, BLOCK):
        x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
        n_nan += k
        m, c, T, A = update_stats(m, c, T, A, x)
        inside = start + cols < n_cols
        if SMOOTH:
            sum_z += tl.sum(tl.where(inside, x, 0.0), axis=0)
        if SOFT:
            y = tl.load(y_row + start + cols, mask=inside, other=0.0).to(ACC)
            y = tl.where(inside, keep * y + spread, 0.0)
            sum_y += tl.sum(y, axis=0)
            sum_yz += tl.sum(y * tl.where(y != 0.0, x, 0.0), axis=0)
    log_s = log_normaliser(c, T)
    lse = m + log_s
    if SOFT:
        loss = sum_y * lse - sum_yz
        valid = True
    else:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < n_cols)  # out of range only with validation off: NaN, no stray read
        z_t = tl.load(z_row + tl.where(valid & in_range, t, 0)).to(ACC)
        # (m - z_t) + log S is lse - z_t without cancellation when the target is the arg-max.
        loss = keep * ((m - z_t) + log_s)
        if SMOOTH:
            loss += eps * (lse - sum_z / n_cols)
        loss = tl.where(in_range | ~valid, loss, float("nan"))
    if ZLOSS:
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, coded_lse(m, log_s, n_nan))
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_s - A / (c + T), 0.0))


@triton.jit
def cross_entropy_bwd_kernel(z_ptr, t_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, sum_y_ptr, coef_ptr,
                             grad_ptr, grad_y_ptr, n_cols, stride_z, stride_y, stride_g, stride_gy, ignore_index,
                             SOFT: tl.constexpr, ZLOSS: tl.constexpr, ENTROPY: tl.constexpr, GRAD_Y: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    keep, spread, z_loss = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 3)
    lse = tl.load(lse_ptr + row)
    lse = tl.where(tl.abs(lse) < float("inf"), lse, float("nan"))  # a bad row: NaN everywhere, as in torch
    gl = tl.load(gl_ptr + row).to(ACC)
    if SOFT:
        valid = True
        bad = False
        t = -1
        sum_y = tl.load(sum_y_ptr + row)  # sum_j y'_j
    else:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n_cols))  # only with validation off: a NaN row
        sum_y = 1.0
    coef = sum_y + 2.0 * z_loss * lse if ZLOSS else sum_y
    if ENTROPY:
        ge = tl.load(ge_ptr + row).to(ACC)
        h = tl.load(ent_ptr + row)
    for start in range(0, n_cols, BLOCK):
        inside = start + cols < n_cols
        z = tl.load(z_row + start + cols, mask=inside, other=float("-inf")).to(ACC)
        live = z > float("-inf")
        log_p = tl.where(live, z - lse, 0.0)
        p = tl.where(live, tl.exp(log_p), 0.0)
        if SOFT:
            y = keep * tl.load(y_row + start + cols, mask=inside, other=0.0).to(ACC) + spread
        else:
            y = tl.where(start + cols == t, keep, 0.0) + spread
        g = gl * (coef * p - y)
        if ENTROPY:
            g -= ge * p * (log_p + h)
        # Ignored rows get exactly 0 (they may be all -inf, with lse = NaN: select, don't multiply).
        g = tl.where(bad, float("nan"), tl.where(valid, g, 0.0))
        tl.store(grad_ptr + row * stride_g + start + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
        if GRAD_Y:
            gy = gl * keep * (lse - z)
            tl.store(grad_y_ptr + row * stride_gy + start + cols, gy.to(grad_y_ptr.dtype.element_ty), mask=inside)


def _coef(z2d, eps, z_loss):
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    return torch.tensor([1.0 - eps, eps / z2d.shape[1], eps, z_loss], dtype=acc, device=z2d.device)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def cross_entropy_fwd(z2d, t1d, y2d, eps: float, ignore_index: int, z_loss: float, want_entropy: bool):
    """Per-row (loss, coded lse, entropy) of (rows, n) logits, in the accumulation dtype.  Exactly
    one of t1d (rows,) int64 / y2d (rows, n) is given; the entropy is empty unless wanted."""
    rows, n = z2d.shape
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, device=z2d.device, dtype=acc)
    lse = torch.empty_like(loss)
    ent = torch.empty(rows if want_entropy else 0, device=z2d.device, dtype=acc)
    if rows:
        soft = y2d is not None
        blk = block_size(n)
        wrap_triton(cross_entropy_fwd_kernel)[(rows,)](
            z2d, t1d if not soft else loss, y2d if soft else z2d, loss, lse, ent if want_entropy else loss,
            _coef(z2d, eps, z_loss), n, z2d.stride(0), y2d.stride(0) if soft else 0, int(ignore_index),
            SOFT=soft, SMOOTH=(eps > 0 and not soft), ZLOSS=z_loss != 0.0, ENTROPY=want_entropy,
            BLOCK=blk, ACC=_acc(z2d.dtype), num_warps=num_warps(blk))
    return loss, lse, ent


def cross_entropy_bwd(z2d, t1d, y2d, lse, ent, g_loss, g_ent, sum_y, eps: float, ignore_index: int, z_loss: float,
                      grad, grad_y):
    """Write dL/dz into ``grad`` (rows, n; may be z2d itself) and, if given, dL/dy into ``grad_y``.
    ``g_loss``/``g_ent``: (rows,) incoming gradients (g_ent None: no entropy term); ``sum_y``:
    (rows,) sums of the smoothed probability targets (None for class targets)."""
    rows, n = z2d.shape
    if rows:
        soft = y2d is not None
        blk = block_size(n)
        wrap_triton(cross_entropy_bwd_kernel)[(rows,)](
            z2d, t1d if not soft else lse, y2d if soft else z2d, lse, ent if g_ent is not None else lse,
            g_loss, g_ent if g_ent is not None else g_loss, sum_y if soft else lse, _coef(z2d, eps, z_loss),
            grad, grad_y if grad_y is not None else grad, n, z2d.stride(0), y2d.stride(0) if soft else 0,
            grad.stride(0), grad_y.stride(0) if grad_y is not None else 0, int(ignore_index),
            SOFT=soft, ZLOSS=z_loss != 0.0, ENTROPY=g_ent is not None, GRAD_Y=grad_y is not None,
            BLOCK=blk, ACC=_acc(z2d.dtype), num_warps=num_warps(blk))
