"""Triton kernels for ``entmath.entropy``: H(softmax(z)) and its gradient, one program per row.

Forward, one read of the row (HBM: n elements read, two scalars written): the row is walked in
BLOCK-wide chunks of an aligned frame (``rows.py``: full chunks unmasked with 16-byte loads, the
two end chunks masked), each chunk folded into the online statistics of ``softmax_stats`` (running
max m, count at the max c, mass below T, moment A).  Writes H and the log-normaliser
lse = m + log S (kept for the backward and for validation).

Backward, one read of the row and one write of the gradient: dH/dz_k = -p_k (log p_k + H), an
elementwise map once lse and H are known.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .rows import end_chunks, frame_base, in_row, row_config, row_frame
from .softmax_stats import coded_lse, drop_nan, log_normaliser, update_stats


@triton.jit
def entropy_fwd_kernel(z_ptr, h_ptr, lse_ptr, n_cols, stride_row, BLOCK: tl.constexpr, VEC: tl.constexpr,
                       ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lead, n_chunks = row_frame(row * stride_row, n_cols, BLOCK, VEC)
    z_row = frame_base(z_ptr, row * stride_row, lead, VEC, True)
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)
    n_nan = tl.zeros([], tl.int32)
    for i in range(1, n_chunks - 1):  # full chunks: no mask, 16-byte loads
        x, k = drop_nan(tl.load(z_row + i * BLOCK + cols).to(ACC))
        n_nan += k
        m, c, T, A = update_stats(m, c, T, A, x)
    for i in range(0, n_chunks, end_chunks(n_chunks)):  # the first and the last chunk, masked
        f = i * BLOCK + cols
        x, k = drop_nan(tl.load(z_row + f, mask=in_row(f, lead, n_cols), other=float("-inf")).to(ACC))
        n_nan += k
        m, c, T, A = update_stats(m, c, T, A, x)
    log_s = log_normaliser(c, T)
    h = log_s - A / (c + T)
    tl.store(h_ptr + row, h)  # meaningless for a bad row, which the coded lse reports
    tl.store(lse_ptr + row, coded_lse(m, log_s, n_nan))


@triton.jit
def _entropy_grad(z, gh, h, lse):
    live = z > float("-inf")
    log_p = tl.where(live, z - lse, 0.0)  # -inf logits: p = 0 and gradient 0, not 0 * (-inf)
    p = tl.where(live, tl.exp(log_p), 0.0)
    return -gh * p * (log_p + h)


@triton.jit
def entropy_bwd_kernel(z_ptr, gz_ptr, gh_ptr, h_ptr, lse_ptr, n_cols, stride_row, stride_grad,
                       BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gh = tl.load(gh_ptr + row).to(ACC)
    h = tl.load(h_ptr + row)
    lse = tl.load(lse_ptr + row)
    lse = tl.where(tl.abs(lse) < float("inf"), lse, float("nan"))  # a bad row: NaN everywhere, as in torch
    lead, n_chunks = row_frame(row * stride_row, n_cols, BLOCK, VEC)
    z_row = frame_base(z_ptr, row * stride_row, lead, VEC, True)
    g_row = frame_base(gz_ptr, row * stride_grad, lead, VEC, ALIGNED)
    cols = tl.arange(0, BLOCK)
    for i in range(1, n_chunks - 1):  # full chunks: no mask, 16-byte loads and stores
        f = i * BLOCK + cols
        g = _entropy_grad(tl.load(z_row + f).to(ACC), gh, h, lse)
        tl.store(g_row + f, g.to(gz_ptr.dtype.element_ty))
    for i in range(0, n_chunks, end_chunks(n_chunks)):  # the first and the last chunk, masked
        f = i * BLOCK + cols
        mask = in_row(f, lead, n_cols)
        g = _entropy_grad(tl.load(z_row + f, mask=mask, other=0.0).to(ACC), gh, h, lse)
        tl.store(g_row + f, g.to(gz_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def entropy_fwd(z2d: torch.Tensor):
    """z2d: (rows, n) with unit column stride.  Returns fp32/fp64 (H, lse) of shape (rows,)."""
    rows, n = z2d.shape
    acc_dtype = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    h = torch.empty(rows, device=z2d.device, dtype=acc_dtype)
    lse = torch.empty_like(h)
    if rows:
        cfg = row_config(n, z2d)
        wrap_triton(entropy_fwd_kernel)[(rows,)](z2d, h, lse, n, z2d.stride(0), BLOCK=cfg["BLOCK"], VEC=cfg["VEC"],
                                    ACC=_acc(z2d.dtype), num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return h, lse


def entropy_bwd(z2d: torch.Tensor, grad_h: torch.Tensor, h: torch.Tensor, lse: torch.Tensor):
    rows, n = z2d.shape
    gz = torch.empty_like(z2d)
    if rows:
        cfg = row_config(n, z2d, gz)
        wrap_triton(entropy_bwd_kernel)[(rows,)](z2d, gz, grad_h.contiguous(), h, lse, n, z2d.stride(0), gz.stride(0),
                                    BLOCK=cfg["BLOCK"], VEC=cfg["VEC"], ALIGNED=cfg["ALIGNED"], ACC=_acc(z2d.dtype),
                                    num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return gz
