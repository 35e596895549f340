"""Triton kernels for ``entmath.attention_entropy`` (Chapter 3, book/ch03_logn_attention.md).

For every query row i of every (batch, head) the forward computes the entropy of
p_i = softmax_j(scale_i * q_i . k_j) without ever storing the L x S matrix of logits.

Tiling.  One program owns BLOCK_M queries of one (batch, head) and walks over the keys in
BLOCK_N-wide blocks.  Each step computes a BLOCK_N x BLOCK_M tile of logits with ``tl.dot`` and
folds it into the per-query online statistics of ``softmax_stats.update_stats`` (running max m,
count at the max c, mass below T, first moment A).  The tile is computed *transposed*, keys along
axis 0, because ``update_stats`` reduces over axis 0: the same code that folds a chunk of one row
into scalar statistics here folds a block of keys into a BLOCK_M-vector of statistics, one per
query.  At the end H = log S - A / S with S = c + T, exactly as in ``entmath.entropy``.

Masking is by index, not by a stored mask: key j is visible to query i when j < S and, under
causal masking, j <= i + offset.  With causal masking a query block never reads key blocks that
lie entirely to the right of its last query's horizon, so the causal forward does about half the
work.  A non-finite visible logit marks the row (H = NaN); the host checks its inputs before the
launch, so this is a second line of defence, not the error path.

Memory: O(BLOCK_M * BLOCK_N) on chip per program, O(L) outputs per (batch, head) in global memory.
The backward uses the chunked torch path (entmath/ops/attention_entropy.py), see there.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .softmax_stats import log_normaliser, update_stats


@triton.jit
def attention_entropy_fwd_kernel(q_ptr, k_ptr, scale_ptr, h_ptr, lse_ptr, L, S, D, offset,
                                 stride_qb, stride_ql, stride_kb, stride_ks,
                                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    # Padding rows and feature columns load as 0: they add 0 to every dot product.
    q = tl.load(q_ptr + bh * stride_qb + rows[:, None] * stride_ql + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    scale = tl.load(scale_ptr + bh * L + rows, mask=row_ok, other=0.0).to(ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    c = tl.zeros([BLOCK_M], ACC)
    T = tl.zeros([BLOCK_M], ACC)
    A = tl.zeros([BLOCK_M], ACC)
    n_bad = tl.zeros([BLOCK_M], tl.int32)
    hi = S
    if CAUSAL:
        # The last query of this block sees keys up to (its index + offset): stop there.
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bh * stride_kb + keys[:, None] * stride_ks + dims[None, :],
                    mask=(keys[:, None] < S) & (dims[None, :] < D), other=0.0)
        # (BLOCK_N, BLOCK_M) logits, keys along axis 0; "ieee" keeps fp32 inputs out of TF32.
        x = tl.dot(k, tl.trans(q), input_precision="ieee", out_dtype=ACC) * scale[None, :]
        visible = keys[:, None] < S
        if CAUSAL:
            visible = visible & (keys[:, None] <= rows[None, :] + offset)
        # Never -inf by masking (that is by index): any non-finite visible logit is an error.
        bad = visible & ((x != x) | (x == float("inf")) | (x == float("-inf")))
        n_bad += tl.sum(bad.to(tl.int32), axis=0)
        x = tl.where(visible & ~bad, x, float("-inf"))
        m, c, T, A = update_stats(m, c, T, A, x)
    log_s = log_normaliser(c, T)
    h = log_s - A / (c + T)
    lse = m + log_s
    h = tl.where(n_bad > 0, float("nan"), h)
    lse = tl.where(n_bad > 0, float("nan"), lse)
    tl.store(h_ptr + bh * L + rows, h, mask=row_ok)
    tl.store(lse_ptr + bh * L + rows, lse, mask=row_ok)


def _block(n: int, cap: int) -> int:
    # tl.dot needs every tile dimension >= 16; larger tiles mean fewer (interpreted) steps.
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def attention_entropy_fwd(q3: torch.Tensor, k3: torch.Tensor, scale2: torch.Tensor, is_causal: bool,
                          offset: int, block_m: int = 64, block_n: int = 64):
    """q3: (BH, L, D), k3: (BH, S, D), unit stride along D; scale2: (BH, L) contiguous in the
    accumulation dtype.  Returns (H, lse), each (BH, L) in the accumulation dtype."""
    bh, L, D = q3.shape
    S = k3.shape[1]
    acc = scale2.dtype
    h = torch.empty(bh, L, device=q3.device, dtype=acc)
    lse = torch.empty_like(h)
    if bh == 0 or L == 0:
        return h, lse
    bm, bn, bd = _block(L, block_m), _block(S, block_n), _block(D, 1 << 30)
    grid = (triton.cdiv(L, bm), bh)
    wrap_triton(attention_entropy_fwd_kernel)[grid](
        q3, k3, scale2, h, lse, L, S, D, offset, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
        CAUSAL=bool(is_causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=4)
    return h, lse
