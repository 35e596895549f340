"""Triton kernels for ``entmath.entropy``: H(softmax(z)) and its gradient, one program per row.

Forward: one read of the row, in BLOCK-wide chunks, folding each chunk into the online
statistics of ``softmax_stats`` (running max m, count at the max c, mass below T, moment A).
Writes H and the log-normaliser lse = m + log S (kept for the backward and for validation).

Backward: dH/dz_k = -p_k (log p_k + H), an elementwise map once lse and H are known.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import block_size, num_warps
from .softmax_stats import coded_lse, load_row_chunk, log_normaliser, update_stats


@triton.jit
def entropy_fwd_kernel(z_ptr, h_ptr, lse_ptr, n_cols, stride_row, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)
    n_nan = tl.zeros([], tl.int32)
    for start in range(0, n_cols, BLOCK):
        x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
        n_nan += k
        m, c, T, A = update_stats(m, c, T, A, x)
    log_s = log_normaliser(c, T)
    h = log_s - A / (c + T)
    tl.store(h_ptr + row, h)  # meaningless for a bad row, which the coded lse reports
    tl.store(lse_ptr + row, coded_lse(m, log_s, n_nan))


@triton.jit
def entropy_bwd_kernel(z_ptr, gz_ptr, gh_ptr, h_ptr, lse_ptr, n_cols, stride_row, stride_grad,
                       BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gh = tl.load(gh_ptr + row).to(ACC)
    h = tl.load(h_ptr + row)
    lse = tl.load(lse_ptr + row)
    lse = tl.where(tl.abs(lse) < float("inf"), lse, float("nan"))  # a bad row: NaN everywhere, as in torch
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(z_ptr + row * stride_row + start + cols, mask=mask, other=0.0).to(ACC)
        live = z > float("-inf")
        log_p = tl.where(live, z - lse, 0.0)  # -inf logits: p = 0 and gradient 0, not 0 * (-inf)
        p = tl.where(live, tl.exp(log_p), 0.0)
        g = -gh * p * (log_p + h)
        tl.store(gz_ptr + row * stride_grad + start + cols, g.to(gz_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def entropy_fwd(z2d: torch.Tensor):
    """z2d: (rows, n) with unit column stride.  Returns fp32/fp64 (H, lse) of shape (rows,)."""
    rows, n = z2d.shape
    acc_dtype = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    h = torch.empty(rows, device=z2d.device, dtype=acc_dtype)
    lse = torch.empty_like(h)
    if rows:
        blk = block_size(n)
        wrap_triton(entropy_fwd_kernel)[(rows,)](z2d, h, lse, n, z2d.stride(0), BLOCK=blk, ACC=_acc(z2d.dtype),
                                    num_warps=num_warps(blk))
    return h, lse


def entropy_bwd(z2d: torch.Tensor, grad_h: torch.Tensor, h: torch.Tensor, lse: torch.Tensor):
    rows, n = z2d.shape
    gz = torch.empty_like(z2d)
    if rows:
        blk = block_size(n)
        wrap_triton(entropy_bwd_kernel)[(rows,)](z2d, gz, grad_h.contiguous(), h, lse, n, z2d.stride(0), gz.stride(0),
                                    BLOCK=blk, ACC=_acc(z2d.dtype), num_warps=num_warps(blk))
    return gz
