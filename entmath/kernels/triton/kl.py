"""Triton kernels for ``entmath.kl``: KL(softmax(a) || softmax(b)) per row and its gradient.

Forward, two reads of each row pair (HBM: 4n elements read, three scalars written; the second
read of a row of up to BLOCK elements is of the same addresses, usually from L2): pass 1 folds
a and b into the online statistics of ``softmax_stats`` (max and log S of each row, NaN counts,
b at a's maximum for ``divergence.pivot_shift``); pass 2 sums the non-negative terms of Chapter
1's cancellation-free form (``divergence.py``, twin of ``ops/_divergence.kl_rows``)

    K = sum_{p_i > 0} p_i chi(y_i),  Z = sum_{p_i > 0} p_i (e^{y_i} - 1),  y = log q - log p + eta,
    KL = K - chi(log1p Z) - log1p(-q_out)    (or -sum p y when q_out > 1/2),

none of whose terms is of the size of the logits (the old one-pass form B / S_a - lse_a + lse_b
subtracted lse-sized numbers: 0.0 for logits at -1e38, errors of 1e-3 at an offset of 1e4).
Entries with a_i = -inf add nothing; a finite a_i with b_i = -inf makes the row +inf (p has mass
that q lacks).

Backward, one read of both rows and one write of both gradients:
dKL/da_k = p_k (log p_k - log q_k - KL),  dKL/db_k = q_k - p_k.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops._divergence import series_terms
from . import block_size, num_warps
from .divergence import chi, kl_sums, pair_stats, pivot_shift
from .softmax_stats import coded_lse, log1p


@triton.jit
def kl_fwd_kernel(a_ptr, b_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, n_cols, stride_a, stride_b,
                  BLOCK: tl.constexpr, ACC: tl.constexpr, TERMS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_a
    b_row = b_ptr + row * stride_b
    ma, log_sa, nan_a, mb, log_sb, nan_b, b_k = pair_stats(a_row, b_row, n_cols, BLOCK, ACC)
    # From the pivot where it can (log S_b - log S_a's rounding eta would swamp log-ratios below
    # u eta); -sum p y is linear in the shift, so the far form steps back to shift0.
    # (shift0 = log S_b - log S_a is formed again after the loop: kept live, it spilled in float64)
    _, shift = pivot_shift(b_k, mb, log_sa, log_sb, ACC)
    K, Z, s_yh, q_out, n_lost = kl_sums(a_row, b_row, n_cols, ma, mb, log_sa, log_sb, shift, BLOCK, ACC, TERMS)
    kl = tl.where(q_out <= 0.5, K - chi(log1p(Z), TERMS) - log1p(-q_out), -2.0 * s_yh - (shift - (log_sb - log_sa)))
    kl = tl.where(kl < 0.0, 0.0, kl)  # Gibbs: KL >= 0
    kl = tl.where(n_lost > 0, float("inf"), kl)
    # Each argument gets its own coded lse, so validation can name the argument at fault.
    tl.store(kl_ptr + row, kl)
    tl.store(lse_a_ptr + row, coded_lse(ma, log_sa, nan_a))
    tl.store(lse_b_ptr + row, coded_lse(mb, log_sb, nan_b))


@triton.jit
def kl_bwd_kernel(a_ptr, b_ptr, g_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, ga_ptr, gb_ptr, n_cols, stride_a, stride_b,
                  stride_ga, stride_gb, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row).to(ACC)
    kl = tl.load(kl_ptr + row)
    lse_a = tl.load(lse_a_ptr + row)
    lse_b = tl.load(lse_b_ptr + row)
    # A bad row (coded lse NaN / +inf / -inf): NaN everywhere, as in torch.
    lse_a = tl.where(tl.abs(lse_a) < float("inf"), lse_a, float("nan"))
    lse_b = tl.where(tl.abs(lse_b) < float("inf"), lse_b, float("nan"))
    finite = kl < float("inf")  # rows with KL = +inf get a zero gradient w.r.t. a (documented)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        a = tl.load(a_ptr + row * stride_a + start + cols, mask=mask, other=float("-inf")).to(ACC)
        b = tl.load(b_ptr + row * stride_b + start + cols, mask=mask, other=float("-inf")).to(ACC)
        p = tl.exp(a - lse_a)
        q = tl.exp(b - lse_b)
        both = (a > float("-inf")) & (b > float("-inf"))
        ratio = tl.where(both, a - lse_a, 0.0) - tl.where(both, b - lse_b, 0.0)
        ga = tl.where(finite, g * p * (ratio - tl.where(finite, kl, 0.0)), 0.0)
        tl.store(ga_ptr + row * stride_ga + start + cols, ga.to(ga_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_ptr + row * stride_gb + start + cols, (g * (q - p)).to(gb_ptr.dtype.element_ty), mask=mask)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def kl_fwd(a2d, b2d):
    rows, n = a2d.shape
    acc = torch.float64 if a2d.dtype == torch.float64 else torch.float32
    kl = torch.empty(rows, device=a2d.device, dtype=acc)
    lse_a, lse_b = torch.empty_like(kl), torch.empty_like(kl)
    if rows:
        blk = block_size(n)
        wrap_triton(kl_fwd_kernel)[(rows,)](a2d, b2d, kl, lse_a, lse_b, n, a2d.stride(0), b2d.stride(0),
                                            BLOCK=blk, ACC=_acc(a2d.dtype), TERMS=series_terms(a2d.dtype),
                                            num_warps=num_warps(blk))
    return kl, lse_a, lse_b


def kl_bwd(a2d, b2d, g, kl, lse_a, lse_b):
    rows, n = a2d.shape
    ga, gb = torch.empty_like(a2d), torch.empty_like(b2d)
    if rows:
        blk = block_size(n)
        wrap_triton(kl_bwd_kernel)[(rows,)](a2d, b2d, g.contiguous(), kl, lse_a, lse_b, ga, gb, n, a2d.stride(0), b2d.stride(0),
                               ga.stride(0), gb.stride(0), BLOCK=blk, ACC=_acc(a2d.dtype), num_warps=num_warps(blk))
    return ga, gb
