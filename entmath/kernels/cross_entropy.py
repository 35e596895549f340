"""Triton kernels for ``entmath.cross_entropy``: per-row loss and its gradient.

Forward, one read of the row: the online statistics of ``softmax_stats`` give
lse = m + log S; alongside them each chunk accumulates what the target needs:

* class index t:   loss = (lse - z_t)(1 - eps) + eps (lse - mean_j z_j)
* probabilities y: loss = sum_j y'_j (lse - z_j),  y' = (1 - eps) y + eps / C,
  accumulated as (sum_j y'_j) lse - sum_{y'_j != 0} y'_j z_j  (0 * log 0 = 0).

Backward: dL/dz_k = g (sum_j y'_j p_k - y'_k), elementwise once lse is known.
"""
import torch
import triton
import triton.language as tl

from . import block_size, num_warps
from .softmax_stats import load_row_chunk, log_normaliser, update_stats


@triton.jit
def cross_entropy_fwd_kernel(z_ptr, t_ptr, y_ptr, loss_ptr, lse_ptr, coef_ptr, n_cols, stride_row, stride_y,
                             ignore_index,
                             SOFT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    # (1 - eps, eps / C, eps) in the accumulation dtype (scalar kernel arguments would be fp32).
    keep, spread, eps = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 2)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)  # carried by update_stats; unused here
    n_nan = tl.zeros([], tl.int32)
    sum_z = tl.zeros([], ACC)    # sum_j z_j, for the smoothing term
    sum_y = tl.zeros([], ACC)    # sum_j y'_j
    sum_yz = tl.zeros([], ACC)   # sum_{y'_j != 0} y'_j z_j
    for start in range(0, n_cols, BLOCK):
        x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
        n_nan += k
        m, c, T, A = update_stats(m, c, T, A, x)
        if SMOOTH:
            sum_z += tl.sum(tl.where(start + cols < n_cols, x, 0.0), axis=0)
        if SOFT:
            y = tl.load(y_ptr + row * stride_y + start + cols, mask=start + cols < n_cols, other=0.0).to(ACC)
            y = tl.where(start + cols < n_cols, keep * y + spread, 0.0)
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
    loss = tl.where(n_nan > 0, float("nan"), loss)
    lse = tl.where(n_nan > 0, float("nan"), lse)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def cross_entropy_bwd_kernel(z_ptr, t_ptr, y_ptr, g_ptr, lse_ptr, gz_ptr, coef_ptr, n_cols, stride_row, stride_y,
                             stride_grad, ignore_index, SOFT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    keep, spread = tl.load(coef_ptr), tl.load(coef_ptr + 1)
    g = tl.load(g_ptr + row).to(ACC)
    lse = tl.load(lse_ptr + row)
    cols = tl.arange(0, BLOCK)
    if SOFT:
        # sum_j y'_j: one extra read of the target row (targets do not sum to 1 in general).
        sum_y = tl.zeros([], ACC)
        for start in range(0, n_cols, BLOCK):
            y = tl.load(y_ptr + row * stride_y + start + cols, mask=start + cols < n_cols, other=0.0).to(ACC)
            sum_y += tl.sum(tl.where(start + cols < n_cols, keep * y + spread, 0.0), axis=0)
        t = -1
    else:
        t = tl.load(t_ptr + row)
        sum_y = 1.0
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(z_ptr + row * stride_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        p = tl.exp(z - lse)
        if SOFT:
            y = tl.load(y_ptr + row * stride_y + start + cols, mask=mask, other=0.0).to(ACC)
            y = keep * y + spread
        else:
            y = tl.where(start + cols == t, keep, 0.0) + spread
        grad = g * (sum_y * p - y)
        if not SOFT:
            # an ignored row may be all -inf (lse = NaN): select 0, don't multiply by it
            grad = tl.where(t != ignore_index, grad, 0.0)
        tl.store(gz_ptr + row * stride_grad + start + cols, grad.to(gz_ptr.dtype.element_ty), mask=mask)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _coef(z2d, eps: float):
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    n = z2d.shape[1]
    return torch.tensor([1.0 - eps, eps / n, eps], dtype=acc, device=z2d.device)


def cross_entropy_fwd(z2d, t1d, y2d, eps: float, ignore_index: int):
    """Per-row loss and lse.  Exactly one of t1d (rows,) int64 / y2d (rows, n) is given."""
    rows, n = z2d.shape
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, device=z2d.device, dtype=acc)
    lse = torch.empty_like(loss)
    if rows:
        soft = y2d is not None
        blk = block_size(n)
        cross_entropy_fwd_kernel[(rows,)](
            z2d, t1d if not soft else loss, y2d if soft else z2d, loss, lse, _coef(z2d, eps), n, z2d.stride(0),
            y2d.stride(0) if soft else 0, int(ignore_index),
            SOFT=soft, SMOOTH=(eps > 0 and not soft), BLOCK=blk, ACC=_acc(z2d.dtype), num_warps=num_warps(blk))
    return loss, lse


def cross_entropy_bwd(z2d, t1d, y2d, grad_rows, lse, eps: float, ignore_index: int):
    rows, n = z2d.shape
    gz = torch.empty_like(z2d)
    if rows:
        soft = y2d is not None
        blk = block_size(n)
        cross_entropy_bwd_kernel[(rows,)](
            z2d, t1d if not soft else lse, y2d if soft else z2d, grad_rows.contiguous(), lse, gz, _coef(z2d, eps), n,
            z2d.stride(0), y2d.stride(0) if soft else 0, gz.stride(0), int(ignore_index),
            SOFT=soft, BLOCK=blk, ACC=_acc(z2d.dtype), num_warps=num_warps(blk))
    return gz
