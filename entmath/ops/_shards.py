"""Rows whose classes are split into shards: the P-way merge of their summaries (Chapter 6).

A row's classes are split into disjoint shards k = 1..P: the vocabulary splits of a kernel, or
the ranks of a process group that each hold a contiguous slice of the vocabulary.  Each shard
summarises its part of the row by (m_k, R_k, A_k): its maximum, S_k = sum e^{z_i - m_k} = 1 + R_k
and A_k = sum e^{z_i - m_k}(z_i - m_k) (``_stats.chunk_summary``).  The merge of all of them
(eq-lh-allreduce) needs one maximum and one sum over the shards:

    M = max_k m_k,   delta_k = m_k - M,
    S = sum_k e^{delta_k} S_k,   A = sum_k e^{delta_k} (A_k + delta_k S_k),

which is ``_stats.merge_summaries`` applied P - 1 times, in any order.  The functions here take the
maximum and the sum as arguments, ``reduce_max`` and ``reduce_sum``: an all-reduce over a process
group (``entmath.distributed``), or a reduction over a leading dimension that stacks the shards
(the kernel's splits, and the book's demonstration).  One code path, so what the book shows is
what the ranks compute.

Accuracy.  The shard holding the maximum contributes S_k = 1 + R_k: its 1 is kept out of the sum,
so that log S = log1p(R) stays accurate for nearly one-hot rows, and ties (several shards at the
maximum) add their 1's back exactly as integers.  Rows with a NaN anywhere come out NaN, whatever
the reduction does with NaN (NCCL's maximum may drop it): NaN shards are counted in the sum.
"""
from __future__ import annotations

import torch

from .._validate import compute_dtype
from ._library import acc_dtype, register_row_vmap, triton_kernel_op
from ._rows import kernels, rows_2d
from ._stats import chunk_summary, exp_tail, rebase_gap
from .cross_entropy import CHUNK_BYTES

__all__ = ["combine_summaries", "combine_kl", "stacked", "logits_summary"]


def stacked(dim: int = 0):
    """(reduce_max, reduce_sum) over dimension ``dim`` of tensors that stack the shards: a
    single-process stand-in for the all-reduce (shards as a leading dimension)."""
    return (lambda x: x.amax(dim)), (lambda x: x.sum(dim))


def _rescale(m_k: torch.Tensor, M: torch.Tensor):
    """delta_k = m_k - M (0 where M is not finite), w_k = e^{delta_k}, and whether k is at M."""
    delta = m_k - torch.where(torch.isfinite(M), M, 0.0)
    return delta, delta.exp(), m_k == M


def combine_summaries(m_k, r_k, a_k, extra, reduce_max, reduce_sum, gap=None):
    """Merge per-shard summaries (m_k, R_k, A_k) of each row into the row's (M, R, A).

    ``extra``: further per-shard tensors (e.g. the target's logit, held by one shard, and the sum
    of the logits) that are summed over the shards in the same reduction.  ``gap``: optionally
    (G_k, n_k), each shard's sum_i (m_k - z_i) over its n_k logits; it is moved to the row's
    maximum, G_k + n_k (M - m_k) (terms >= 0), and summed last.  Returns ``(M, R, A, sums)`` with
    ``sums[..., j]`` the sum of ``extra[j]`` (then of the gaps: sum_i (M - z_i) over the row).  Two reductions: a
    maximum of one number per row and a sum of 4 + len(extra) numbers per row.  M is NaN for a
    row with a NaN in some shard, +inf for a +inf, -inf when every shard's row is empty (all -inf).
    """
    M = reduce_max(m_k)
    delta, _, top = _rescale(m_k, M)
    w, t = exp_tail(delta)  # e^delta = w t, so that a shard's moment survives a deep delta
    s_k = 1.0 + r_k
    live = w > 0  # shards whose row is empty (m_k = -inf) add nothing, not 0 * NaN
    if gap is not None:
        extra = [*extra, rebase_gap(gap[0], gap[1], m_k, M)]
    parts = [torch.where(top, r_k, torch.where(live, w * s_k * t, 0.0)),  # R: the top shard's 1 left out
             top.to(w.dtype),  # shards at the maximum; their 1's beyond the first go back into R
             torch.where(live, w * (a_k + delta * s_k) * t, 0.0),
             torch.isnan(m_k).to(w.dtype), *extra]
    sums = reduce_sum(torch.stack(parts, -1))
    R = sums[..., 0] + (sums[..., 1] - 1.0)
    M = torch.where(sums[..., 3] > 0, float("nan"), M)
    return M, R, sums[..., 2], sums[..., 4:]


def combine_kl(kl_k, lse_a_k, lse_b_k, reduce_max, reduce_sum):
    """KL(p || q) of rows split into shards, from each shard's (KL_k, lse_a_k, lse_b_k), where
    KL_k is the divergence between p and q restricted to shard k and renormalised (eq-lh-kl-group):

        KL(p || q) = sum_k pi_k KL_k + sum_k pi_k log(pi_k / rho_k),

    pi_k = e^{lse_a_k - lse_a} and rho_k = e^{lse_b_k - lse_b} the shards' masses under p and q.
    Both sums are >= 0, so neither cancels the other.  Returns (KL, lse_a, lse_b), the lse's coded
    as ``_validate.coded_lse`` does (NaN, +inf, -inf for bad rows).  +inf where p has mass in a
    shard where q has none.
    """
    M = reduce_max(torch.stack([lse_a_k, lse_b_k], -1))
    Ma, Mb = M[..., 0], M[..., 1]
    da, wa, ta = _rescale(lse_a_k, Ma)
    db, wb, tb = _rescale(lse_b_k, Mb)
    has_p = wa > 0
    # pi_k (KL_k + log pi_k - log rho_k) * S_a, without the log S terms (added once, below);
    # +inf where the shard has p-mass and no q-mass (the local KL_k may be anything there).
    term = torch.where(torch.isneginf(lse_b_k), float("inf"), wa * (kl_k + (da - db)))
    term = torch.where(has_p, term, 0.0)
    bad = torch.isnan(lse_a_k) | torch.isnan(lse_b_k)
    parts = [torch.where(ta, 0.0, torch.where(has_p, wa, 0.0)), ta.to(wa.dtype),
             torch.where(tb, 0.0, torch.where(wb > 0, wb, 0.0)), tb.to(wb.dtype), term, bad.to(wa.dtype)]
    sums = reduce_sum(torch.stack(parts, -1))
    log_sa = torch.log1p(sums[..., 0] + (sums[..., 1] - 1.0))
    log_sb = torch.log1p(sums[..., 2] + (sums[..., 3] - 1.0))
    kl = (sums[..., 4] / log_sa.exp() - log_sa + log_sb).clamp_min(0.0)  # Gibbs: >= 0 up to rounding
    kl = torch.where(torch.isposinf(sums[..., 4]), float("inf"), kl)
    nan = sums[..., 5] > 0
    lse_a = torch.where(nan, float("nan"), torch.where(torch.isfinite(Ma), Ma + log_sa, Ma))
    lse_b = torch.where(nan, float("nan"), torch.where(torch.isfinite(Mb), Mb + log_sb, Mb))
    return kl, lse_a, lse_b


# ---- the summary of one shard of rows already in memory -------------------------------------
def logits_summary_torch(z2d: torch.Tensor, t_rel: torch.Tensor, want_gap: bool, want_moment: bool = True):
    """Per-row (m, R, A, z_t, G) of the rows of z2d (rows, n) in the accumulation dtype, with
    G = sum_j (m - z_j) (0 unless ``want_gap``; +inf for a row with -inf logits), in row
    chunks (a copy of one chunk at a time; the input is not modified).  ``t_rel``: each row's
    target column, any value outside [0, n) for none (z_t = 0).  Rows that are entirely -inf
    (a shard the row has no mass in) give m = -inf, which ``combine_summaries`` weighs by 0."""
    rows, n = z2d.shape
    acc = compute_dtype(z2d)
    step = rows if torch.compiler.is_compiling() else max(1, CHUNK_BYTES // (4 * max(n, 1)))
    pieces = []
    for r0 in range(0, rows, step):
        rs = slice(r0, min(rows, r0 + step))
        z = z2d[rs].to(acc, copy=True)
        col = t_rel[rs]
        inside = (col >= 0) & (col < n)
        z_t = torch.where(inside, z.gather(1, col.clamp(0, n - 1).unsqueeze(1)).squeeze(1), 0.0)
        m, r, a, *g = chunk_summary(z, masked=True, moment=want_moment, gap=want_gap)
        pieces.append((m, r, a, z_t, g[0] if want_gap else torch.zeros_like(z_t)))
    if not pieces:
        empty = z2d.new_empty(0, dtype=acc)
        return (empty,) * 5
    if len(pieces) == 1:
        return pieces[0]
    return tuple(torch.cat(parts) for parts in zip(*pieces))


@triton_kernel_op("logits_summary_triton")
def logits_summary_triton(z: torch.Tensor, t_rel: torch.Tensor, want_gap: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (m, R, A, z_t, G = sum_j (m - z_j)) of the rows of z (rows, n): one read of each row."""
    return tuple(kernels("linear_cross_entropy").logits_summary_fwd(rows_2d(z), t_rel.contiguous(), want_gap))


@logits_summary_triton.register_fake
def _(z, t_rel, want_gap):
    m = z.new_empty(z.shape[:1], dtype=acc_dtype(z))
    return tuple(torch.empty_like(m) for _ in range(5))


register_row_vmap(logits_summary_triton, (1, 0, None))


def logits_summary(z2d, t_rel, want_gap: bool, want_moment: bool, backend: str):
    """The shard summary on either backend (the kernel always computes the moment)."""
    if backend == "triton":
        return torch.ops.entmath.logits_summary_triton(z2d, t_rel, want_gap)
    return logits_summary_torch(z2d, t_rel, want_gap, want_moment)
