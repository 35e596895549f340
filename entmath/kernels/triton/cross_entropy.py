"""Triton kernel for ``entmath.cross_entropy``: loss, lse, entropy and the gradient in one launch.

One program per row.  Loop 1 reads the row once, in BLOCK-wide chunks, folding each chunk into
the online statistics of ``softmax_stats`` (max m, count at the max c, mass below T, moment A)
and into what the target needs:

* class index t:    loss = (1 - eps)((m - z_t) + log S) + eps (lse - mean_j z_j)
* probabilities y:  loss = sum_j y'_j (lse - z_j),  y' = (1 - eps) y + eps / C,
                    accumulated as (sum_j y'_j) lse - sum_{y'_j != 0} y'_j z_j   (0 log 0 = 0)
* z-loss:           + z_loss * lse^2
* entropy:          H = log S - A / S

Loop 2 (only when a gradient is wanted) re-reads the row -- from L2 on a GPU when the row was
just streamed -- and writes  scale * ((sum y' + 2 z_loss lse) p - y')  into ``grad``, which may be
the logits buffer itself (``inplace_backward``): each program reads a chunk before writing it.
"""
import torch
import triton
import triton.language as tl

from . import block_size, num_warps
from .softmax_stats import coded_lse, load_row_chunk, log_normaliser, update_stats


@triton.jit
def cross_entropy_kernel(z_ptr, t_ptr, y_ptr, loss_ptr, lse_ptr, ent_ptr, grad_ptr, grad_y_ptr, coef_ptr, scale_ptr,
                         n_cols, stride_z, stride_y, stride_g, stride_gy, ignore_index,
                         SOFT: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, ENTROPY: tl.constexpr,
                         GRAD: tl.constexpr, GRAD_Y: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
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
        z_t = tl.load(z_row + tl.where(valid, t, 0)).to(ACC)
        # (m - z_t) + log S is lse - z_t without cancellation when the target is the arg-max.
        loss = keep * ((m - z_t) + log_s)
        if SMOOTH:
            loss += eps * (lse - sum_z / n_cols)
        sum_y = 1.0
    if ZLOSS:
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, coded_lse(m, log_s, n_nan))
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_s - A / (c + T), 0.0))
    if GRAD:
        # Ignored rows get exactly 0 (they may be all -inf, with lse = NaN: select, don't multiply).
        s = tl.where(valid, tl.load(scale_ptr).to(ACC), 0.0)
        coef = sum_y + 2.0 * z_loss * lse if ZLOSS else sum_y
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            z = tl.load(z_row + start + cols, mask=inside, other=float("-inf")).to(ACC)
            p = tl.exp(z - lse)
            if SOFT:
                y = keep * tl.load(y_row + start + cols, mask=inside, other=0.0).to(ACC) + spread
            else:
                y = tl.where(start + cols == t, keep, 0.0) + spread
            g = tl.where(valid, s * (coef * p - y), 0.0)
            tl.store(grad_ptr + row * stride_g + start + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
            if GRAD_Y:
                gy = s * keep * (lse - z)
                tl.store(grad_y_ptr + row * stride_gy + start + cols, gy.to(grad_y_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows(z2d, t1d, y2d, eps: float, ignore_index: int, z_loss: float, want_entropy: bool,
                       grad, grad_y, scale):
    """Launch over (rows, n) logits.  Exactly one of t1d (rows,) int64 / y2d (rows, n) is given.
    ``grad``/``grad_y``: (rows, n) outputs or None; ``scale``: 1-element tensor (reduction scale).
    Returns per-row (loss, coded lse, entropy or None) in the accumulation dtype."""
    rows, n = z2d.shape
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, device=z2d.device, dtype=acc)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if want_entropy else None
    if rows:
        soft = y2d is not None
        coef = torch.tensor([1.0 - eps, eps / n, eps, z_loss], dtype=acc, device=z2d.device)
        blk = block_size(n)
        cross_entropy_kernel[(rows,)](
            z2d, t1d if not soft else loss, y2d if soft else z2d, loss, lse, ent if want_entropy else loss,
            grad if grad is not None else z2d, grad_y if grad_y is not None else z2d, coef,
            scale if scale is not None else coef,
            n, z2d.stride(0), y2d.stride(0) if soft else 0, grad.stride(0) if grad is not None else 0,
            grad_y.stride(0) if grad_y is not None else 0, int(ignore_index),
            SOFT=soft, SMOOTH=(eps > 0 and not soft), ZLOSS=z_loss != 0.0, ENTROPY=want_entropy,
            GRAD=grad is not None, GRAD_Y=grad_y is not None, BLOCK=blk, ACC=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=num_warps(blk))
    return loss, lse, ent
