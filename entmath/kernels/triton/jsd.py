"""Triton kernels for ``entmath.jsd``: the generalised Jensen-Shannon divergence per row, and its gradient.

Forward, three reads of each row pair (HBM: 6n elements read, five scalars written; the later
reads of a row of up to BLOCK elements are of the same addresses, usually from L2): pass 1 folds
a and b into the online statistics of ``softmax_stats`` and keeps b at a's maximum
(``divergence.pair_stats``), whose offset is the shift to start from where it agrees with
log S_b - log S_a (``divergence.pivot_shift``); pass 2 is ``kl``'s, which measures that shift's
error eta; pass 3 sums, per element, with eta taken out, the non-negative terms m_i psi(p_i / m_i - 1) and m_i psi(q_i / m_i - 1)
of KL(p || m) and KL(q || m), m = beta p + (1 - beta) q (Chapter 1, eq-ent-jsd-stable; the twin
of ``ops/_divergence.jsd_rows``).  Each term starts from the larger of p_i and q_i and from
E = e^{-|y|} - 1, y the compensated log-ratio, so nothing overflows and m_i is never formed as a
difference.  Writes JSD = beta KL(p || m) + (1 - beta) KL(q || m), both divergences (for the
backward) and the two coded log-normalisers.

Backward, one read of both rows and one write of both gradients, t_p = log(p/m), t_q = log(q/m):
dJSD/da_k = beta p_k (t_p,k - KL(p || m)),  dJSD/db_k = (1 - beta) q_k (t_q,k - KL(q || m)).
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops._divergence import series_terms
from . import block_size, num_warps
from .divergence import SERIES, chi, kl_sums, pair_stats, pieces, pivot_shift, psi
from .softmax_stats import DEEP, coded_lse, log1p


@triton.jit
def jsd_fwd_kernel(a_ptr, b_ptr, j_ptr, kp_ptr, kq_ptr, lse_a_ptr, lse_b_ptr, n_cols, stride_a, stride_b, beta_ptr,
                   BLOCK: tl.constexpr, ACC: tl.constexpr, TERMS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_a
    b_row = b_ptr + row * stride_b
    ma, log_sa, nan_a, mb, log_sb, nan_b, b_k = pair_stats(a_row, b_row, n_cols, BLOCK, ACC)
    # Pass 2: the error eta of the shift, measured (Z = e^eta (1 - q_out) - 1) and then left out of
    # pass 3, where it would add about beta (1 - beta) eta^2 / 2.  The shift starts at the pivot
    # where it can: from log S_b - log S_a, y = r + eta would round away every |r| < u |eta|.
    shift0, shift = pivot_shift(b_k, mb, log_sa, log_sb, ACC)
    K, Z, s_yh, q_out, n_lost = kl_sums(a_row, b_row, n_cols, ma, mb, log_sa, log_sb, shift, BLOCK, ACC, TERMS)
    # q_out > 1/2: the divergence is large (log1p(-q_out) inaccurate), shift0's eta negligible
    shift = tl.where(q_out <= 0.5, shift + (log1p(Z) - log1p(-q_out)), shift0)
    beta = tl.load(beta_ptr)  # beta, 1 - beta in ACC (a float argument would be a float32)
    w = tl.load(beta_ptr + 1)
    cols = tl.arange(0, BLOCK)
    kp = tl.zeros([], ACC)
    kq = tl.zeros([], ACC)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        a = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        b = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        lp, d_b, y_h = pieces(a, b, ma, mb, log_sa, shift)
        p = tl.exp(lp)
        y = 2.0 * y_h  # +inf where p = 0 (q is the reference, E = -1), -inf where q = 0 (p is)
        q = tl.exp(d_b - log_sb)  # from its own row (not p e^y: where p underflows, log p and y cancel)
        neg = y <= 0.0  # p >= q: p is the reference
        ay = -tl.abs(y)
        ex = tl.exp(ay)
        E = tl.where(ay >= -SERIES, ay + chi(ay, TERMS), ex - 1.0)  # e^{-|y|} - 1, in [-1, 0]
        ex = tl.where(ay >= -SERIES, 1.0 + E, ex)  # e^{-|y|}
        # m / reference as beta + w e^{-|y|} or w + beta e^{-|y|} (terms >= 0): 1 + w E cancels
        # where E ~ -1 (q = 0 gave 1 - fl(1 - beta) for beta, 280 ulps in KL(q || m) at beta = 0.01)
        D = tl.where(neg, beta + w * ex, w + beta * ex)  # in [min(beta, w), 1]
        m = tl.where(neg, p, q) * D
        s1 = tl.where(neg, -w, w) * E / D  # p / m - 1
        s2 = tl.where(neg, beta, -beta) * E / D  # q / m - 1
        alive = (a > float("-inf")) | (b > float("-inf"))
        kp += tl.sum(tl.where(alive, m * psi(s1, TERMS), 0.0), axis=0)
        kq += tl.sum(tl.where(alive, m * psi(s2, TERMS), 0.0), axis=0)
    tl.store(j_ptr + row, beta * kp + w * kq)
    tl.store(kp_ptr + row, kp)
    tl.store(kq_ptr + row, kq)
    tl.store(lse_a_ptr + row, coded_lse(ma, log_sa, nan_a))
    tl.store(lse_b_ptr + row, coded_lse(mb, log_sb, nan_b))


@triton.jit
def jsd_bwd_kernel(a_ptr, b_ptr, g_ptr, kp_ptr, kq_ptr, lse_a_ptr, lse_b_ptr, ga_ptr, gb_ptr, n_cols, stride_a,
                   stride_b, stride_ga, stride_gb, beta_ptr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row).to(ACC)
    kp = tl.load(kp_ptr + row)
    kq = tl.load(kq_ptr + row)
    lse_a = tl.load(lse_a_ptr + row)
    lse_b = tl.load(lse_b_ptr + row)
    # A bad row (coded lse NaN / +inf / -inf): NaN everywhere, as in torch.
    lse_a = tl.where(tl.abs(lse_a) < float("inf"), lse_a, float("nan"))
    lse_b = tl.where(tl.abs(lse_b) < float("inf"), lse_b, float("nan"))
    ga_scale = g * tl.load(beta_ptr)
    gb_scale = g * tl.load(beta_ptr + 1)
    log_beta = tl.load(beta_ptr + 2)
    log_w = tl.load(beta_ptr + 3)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        a = tl.load(a_ptr + row * stride_a + start + cols, mask=mask, other=float("-inf")).to(ACC)
        b = tl.load(b_ptr + row * stride_b + start + cols, mask=mask, other=float("-inf")).to(ACC)
        # log p and log q clamped where p = q = 0 exactly: finite logs, no -inf - -inf.
        lp = tl.maximum(a - lse_a, DEEP)
        lq = tl.maximum(b - lse_b, DEEP)
        xa = lp + log_beta
        xb = lq + log_w
        lm = tl.maximum(xa, xb) + tl.log(1.0 + tl.exp(-tl.abs(xa - xb)))  # log m
        ga = ga_scale * tl.exp(lp) * ((lp - lm) - kp)
        gb = gb_scale * tl.exp(lq) * ((lq - lm) - kq)
        tl.store(ga_ptr + row * stride_ga + start + cols, ga.to(ga_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_ptr + row * stride_gb + start + cols, gb.to(gb_ptr.dtype.element_ty), mask=mask)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _beta(beta: float, x: torch.Tensor):
    """(beta, 1 - beta, log beta, log(1 - beta)) in the accumulation dtype, on x's device."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor([beta, 1.0 - beta, math.log(beta), math.log1p(-beta)], dtype=acc, device=x.device)


def jsd_fwd(a2d, b2d, beta: float):
    rows, n = a2d.shape
    acc = torch.float64 if a2d.dtype == torch.float64 else torch.float32
    j = torch.empty(rows, device=a2d.device, dtype=acc)
    kp, kq, lse_a, lse_b = (torch.empty_like(j) for _ in range(4))
    if rows:
        blk = block_size(n)
        wrap_triton(jsd_fwd_kernel)[(rows,)](a2d, b2d, j, kp, kq, lse_a, lse_b, n, a2d.stride(0), b2d.stride(0),
                                             _beta(beta, a2d), BLOCK=blk, ACC=_acc(a2d.dtype),
                                             TERMS=series_terms(a2d.dtype), num_warps=num_warps(blk))
    return j, kp, kq, lse_a, lse_b


def jsd_bwd(a2d, b2d, g, kp, kq, lse_a, lse_b, beta: float):
    rows, n = a2d.shape
    ga, gb = torch.empty_like(a2d), torch.empty_like(b2d)
    if rows:
        blk = block_size(n)
        wrap_triton(jsd_bwd_kernel)[(rows,)](a2d, b2d, g.contiguous(), kp, kq, lse_a, lse_b, ga, gb, n,
                                             a2d.stride(0), b2d.stride(0), ga.stride(0), gb.stride(0),
                                             _beta(beta, a2d), BLOCK=blk,
                                             ACC=_acc(a2d.dtype), num_warps=num_warps(blk))
    return ga, gb
