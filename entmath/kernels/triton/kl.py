"""Triton kernels for ``entmath.kl``: KL(softmax(a) || softmax(b)) per row and its gradient.

Forward, one read of both rows (HBM: 2n elements read, three scalars written): online statistics
give lse_a and lse_b, and alongside them

    B = sum_i e^{a_i - m_a} (a_i - b_i)      (rescaled by e^{m_old - m_new} when m_a grows)

so that KL = B / S_a - lse_a + lse_b.  Entries with a_i = -inf add 0; entries with finite a_i
and b_i = -inf add +inf, which is the answer (p has mass that q lacks).  Rows are walked in the
aligned frame of ``rows.py`` (16-byte loads for every full chunk).

Backward, one read of both rows and one write of both gradients:
dKL/da_k = p_k (log p_k - log q_k - KL),  dKL/db_k = q_k - p_k.
"""
import torch
import triton
import triton.language as tl

from .rows import end_chunks, frame_base, in_row, row_config, row_frame
from .softmax_stats import coded_lse, drop_nan, log_normaliser, update_stats


@triton.jit
def _kl_fold(a, b, ma, ca, Ta, Aa, mb, cb, Tb, Ab, B, n_lost):
    """Fold one chunk of a and b (-inf padded, NaN already dropped) into the row's state."""
    m_old = ma
    ma, ca, Ta, Aa = update_stats(ma, ca, Ta, Aa, a)
    mb, cb, Tb, Ab = update_stats(mb, cb, Tb, Ab, b)
    # Rescale B to the new max of a.  B = 0 while a has had no finite entry, and then the factor
    # is 1: never exp(-inf - -inf) = NaN, which a leading run of -inf chunks used to give.
    B *= tl.exp(tl.where(m_old > float("-inf"), m_old - ma, 0.0))
    live = a > float("-inf")
    both = live & (b > float("-inf"))
    # p has mass where q has none: KL = +inf, however small that mass (even if e^{a-m} underflows).
    n_lost += tl.sum((live & (b == float("-inf"))).to(tl.int32), axis=0)
    w = tl.exp(a - tl.where(ma > float("-inf"), ma, 0.0))
    B += tl.sum(w * (tl.where(both, a, 0.0) - tl.where(both, b, 0.0)), axis=0)
    return ma, ca, Ta, Aa, mb, cb, Tb, Ab, B, n_lost


@triton.jit
def kl_fwd_kernel(a_ptr, b_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, n_cols, stride_a, stride_b,
                  BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lead, n_chunks = row_frame(row * stride_a, n_cols, BLOCK, VEC)
    a_row = frame_base(a_ptr, row * stride_a, lead, VEC, True)
    b_row = frame_base(b_ptr, row * stride_b, lead, VEC, ALIGNED)
    cols = tl.arange(0, BLOCK)
    ma = tl.full([], float("-inf"), ACC)
    ca = tl.zeros([], ACC)
    Ta = tl.zeros([], ACC)
    Aa = tl.zeros([], ACC)
    mb = tl.full([], float("-inf"), ACC)
    cb = tl.zeros([], ACC)
    Tb = tl.zeros([], ACC)
    Ab = tl.zeros([], ACC)
    B = tl.zeros([], ACC)
    nan_a = tl.zeros([], tl.int32)
    nan_b = tl.zeros([], tl.int32)
    n_lost = tl.zeros([], tl.int32)
    for i in range(1, n_chunks - 1):  # full chunks: no mask, 16-byte loads
        a, ka = drop_nan(tl.load(a_row + i * BLOCK + cols).to(ACC))
        b, kb = drop_nan(tl.load(b_row + i * BLOCK + cols).to(ACC))
        nan_a += ka
        nan_b += kb
        ma, ca, Ta, Aa, mb, cb, Tb, Ab, B, n_lost = _kl_fold(a, b, ma, ca, Ta, Aa, mb, cb, Tb, Ab, B, n_lost)
    for i in range(0, n_chunks, end_chunks(n_chunks)):  # the first and the last chunk, masked
        f = i * BLOCK + cols
        mask = in_row(f, lead, n_cols)
        a, ka = drop_nan(tl.load(a_row + f, mask=mask, other=float("-inf")).to(ACC))
        b, kb = drop_nan(tl.load(b_row + f, mask=mask, other=float("-inf")).to(ACC))
        nan_a += ka
        nan_b += kb
        ma, ca, Ta, Aa, mb, cb, Tb, Ab, B, n_lost = _kl_fold(a, b, ma, ca, Ta, Aa, mb, cb, Tb, Ab, B, n_lost)
    log_sa = log_normaliser(ca, Ta)
    log_sb = log_normaliser(cb, Tb)
    kl = B / (ca + Ta) - (ma + log_sa) + (mb + log_sb)
    kl = tl.where(kl < 0.0, 0.0, kl)  # Gibbs: KL >= 0; only rounding makes it negative
    kl = tl.where(n_lost > 0, float("inf"), kl)
    # Each argument gets its own coded lse, so validation can name the argument at fault.
    tl.store(kl_ptr + row, kl)
    tl.store(lse_a_ptr + row, coded_lse(ma, log_sa, nan_a))
    tl.store(lse_b_ptr + row, coded_lse(mb, log_sb, nan_b))


@triton.jit
def _kl_grads(a, b, g, kl, lse_a, lse_b, finite):
    p = tl.exp(a - lse_a)
    q = tl.exp(b - lse_b)
    both = (a > float("-inf")) & (b > float("-inf"))
    ratio = tl.where(both, a - lse_a, 0.0) - tl.where(both, b - lse_b, 0.0)
    ga = tl.where(finite, g * p * (ratio - tl.where(finite, kl, 0.0)), 0.0)
    return ga, g * (q - p)


@triton.jit
def kl_bwd_kernel(a_ptr, b_ptr, g_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, ga_ptr, gb_ptr, n_cols, stride_a, stride_b,
                  stride_ga, stride_gb, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                  ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row).to(ACC)
    kl = tl.load(kl_ptr + row)
    lse_a = tl.load(lse_a_ptr + row)
    lse_b = tl.load(lse_b_ptr + row)
    finite = kl < float("inf")  # rows with KL = +inf get a zero gradient w.r.t. a (documented)
    lead, n_chunks = row_frame(row * stride_a, n_cols, BLOCK, VEC)
    a_row = frame_base(a_ptr, row * stride_a, lead, VEC, True)
    b_row = frame_base(b_ptr, row * stride_b, lead, VEC, ALIGNED)
    ga_row = frame_base(ga_ptr, row * stride_ga, lead, VEC, ALIGNED)
    gb_row = frame_base(gb_ptr, row * stride_gb, lead, VEC, ALIGNED)
    cols = tl.arange(0, BLOCK)
    for i in range(1, n_chunks - 1):  # full chunks: no mask, 16-byte loads and stores
        f = i * BLOCK + cols
        ga, gb = _kl_grads(tl.load(a_row + f).to(ACC), tl.load(b_row + f).to(ACC), g, kl, lse_a, lse_b, finite)
        tl.store(ga_row + f, ga.to(ga_ptr.dtype.element_ty))
        tl.store(gb_row + f, gb.to(gb_ptr.dtype.element_ty))
    for i in range(0, n_chunks, end_chunks(n_chunks)):  # the first and the last chunk, masked
        f = i * BLOCK + cols
        mask = in_row(f, lead, n_cols)
        a = tl.load(a_row + f, mask=mask, other=float("-inf")).to(ACC)
        b = tl.load(b_row + f, mask=mask, other=float("-inf")).to(ACC)
        ga, gb = _kl_grads(a, b, g, kl, lse_a, lse_b, finite)
        tl.store(ga_row + f, ga.to(ga_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_row + f, gb.to(gb_ptr.dtype.element_ty), mask=mask)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def kl_fwd(a2d, b2d):
    rows, n = a2d.shape
    acc = torch.float64 if a2d.dtype == torch.float64 else torch.float32
    kl = torch.empty(rows, device=a2d.device, dtype=acc)
    lse_a, lse_b = torch.empty_like(kl), torch.empty_like(kl)
    if rows:
        cfg = row_config(n, a2d, b2d, ctas_per_sm=1)  # two online softmaxes: 105+ registers
        kl_fwd_kernel[(rows,)](a2d, b2d, kl, lse_a, lse_b, n, a2d.stride(0), b2d.stride(0), BLOCK=cfg["BLOCK"],
                               VEC=cfg["VEC"], ALIGNED=cfg["ALIGNED"], ACC=_acc(a2d.dtype), num_warps=cfg["num_warps"],
                               maxnreg=cfg["maxnreg"])
    return kl, lse_a, lse_b


def kl_bwd(a2d, b2d, g, kl, lse_a, lse_b):
    rows, n = a2d.shape
    ga, gb = torch.empty_like(a2d), torch.empty_like(b2d)
    if rows:
        cfg = row_config(n, a2d, b2d, ga, gb, ctas_per_sm=1)
        kl_bwd_kernel[(rows,)](a2d, b2d, g.contiguous(), kl, lse_a, lse_b, ga, gb, n, a2d.stride(0), b2d.stride(0),
                               ga.stride(0), gb.stride(0), BLOCK=cfg["BLOCK"], VEC=cfg["VEC"], ALIGNED=cfg["ALIGNED"],
                               ACC=_acc(a2d.dtype), num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return ga, gb
