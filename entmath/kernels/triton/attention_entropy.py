"""Triton kernel for ``entmath.attention_entropy`` (Chapter 3, book/ch03_logn_attention.md).

For every query row i of every (batch, head) the forward computes the entropy of
p_i = softmax_j(scale_i * q_i . k_j) without ever storing the L x S matrix of logits.

Tiling.  One program owns BLOCK_M queries of one (batch, head) and walks over the keys in
BLOCK_N-wide blocks, flash-attention style.  Each step computes a BLOCK_M x BLOCK_N tile of
logits with ``tl.dot`` (queries along axis 0, keys along axis 1) and folds it into per-query
online statistics with ``softmax_stats.update_stats(..., AXIS=1)``: running max m, count at the
max c, mass below T, first moment A.  The reduction runs along the keys, which the warps of an MMA
tile share row-wise, so it needs no shared memory.  At the end H = log S - A / S with S = c + T,
exactly as in ``entmath.entropy``.

Tensor cores.  q and k reach ``tl.dot`` in their own dtype: fp16/bf16 tiles go to the tensor
cores (mma.sync on sm_80, wgmma on sm_90, tcgen05 on sm_100) with fp32 accumulation, so the logits
are the exact products of the stored inputs summed in fp32 -- what a bf16 attention layer itself
computes.  fp32 inputs use ``input_precision="ieee"``: fp32 FMA, no TF32, the precision torch's
matmul uses by default (the dot product's error is at most D 2^-24 sum_d |q_d k_d|, the standard
bound).  3xTF32 ("tf32x3") would run fp32 on the tensor cores too, but its split operands spilled
on sm_80 at every tile size tried (tests/gpu_compile_check.py); fp32 attention at scale is rare
next to bf16, so it stays on FMA with 32 x 32 tiles.  fp64 uses IEEE fp64 (DMMA on sm_80+).

Masking is by index, not by a stored mask: key j is visible to query i when j < S and, under
causal masking, j <= i + offset.  With causal masking a query block never reads key blocks that
lie entirely to the right of its last query's horizon, so the causal forward does about half the
work; the grid runs the longest query blocks first.  A non-finite visible logit marks the row
(H = NaN); the host checks its inputs before the launch, so this is a second line of defence,
not the error path.

Indexing.  Offsets are int64 (q and k may exceed 2^31 elements) and the grid is one-dimensional,
(query blocks) x (batch * heads) programs on axis 0, so B*H is not bound by the 65535 limit of
grid axes 1 and 2 (``attention_config`` checks the total against 2^31 - 1).

HBM traffic.  q is read once, the outputs (H, lse) written once; each program reads the k rows it
needs, so k is read once per query block of its (batch, head).  The programs of one (batch, head)
run next to each other in the grid, so after the first read those re-reads come from L2 (at
L = S = 4096, D = 128 one head's k is 1 MiB in bf16).  On chip: O(BLOCK_M * BLOCK_N) per program.
The backward uses the chunked torch path (entmath/ops/attention_entropy.py), see there.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .softmax_stats import log_normaliser, update_stats


MAX_GRID = 2**31 - 1  # programs on grid axis 0


@triton.jit
def row_offsets(idx, stride):
    """Element offsets idx * stride in int64: (query or key index) x (row stride) passes 2^31
    once L * stride does (e.g. L = 65536 rows of a (B, L, H, D) tensor with H * D = 32768)."""
    return idx.to(tl.int64) * stride


@triton.jit
def attention_entropy_fwd_kernel(q_ptr, k_ptr, scale_ptr, h_ptr, lse_ptr, L, S, D, offset, n_mblocks,
                                 stride_qb, stride_ql, stride_kb, stride_ks,
                                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, WIDEN: tl.constexpr,
                                 ACC: tl.constexpr):
    pid = tl.program_id(0)
    bh = (pid // n_mblocks).to(tl.int64)
    pid_m = pid % n_mblocks
    if CAUSAL:
        pid_m = n_mblocks - 1 - pid_m  # the longest rows first: better load balance at the tail
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    # Padding rows and feature columns load as 0: they add 0 to every dot product.
    q = tl.load(q_ptr + bh * stride_qb + row_offsets(rows, stride_ql)[:, None] + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    if WIDEN:
        q = q.to(ACC)
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
        k = tl.load(k_ptr + bh * stride_kb + row_offsets(keys, stride_ks)[:, None] + dims[None, :],
                    mask=(keys[:, None] < S) & (dims[None, :] < D), other=0.0)
        if WIDEN:
            k = k.to(ACC)
        # (BLOCK_M, BLOCK_N) logits, queries along axis 0, keys along axis 1.  "ieee" keeps fp32
        # out of TF32 (fp16/bf16 tiles go to the tensor cores whatever this says).
        x = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale[:, None]
        visible = keys[None, :] < S
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + offset)
        # Never -inf by masking (that is by index): any non-finite visible logit is an error.
        bad = visible & ~(tl.abs(x) < float("inf"))
        n_bad += tl.sum(bad.to(tl.int32), axis=1)
        x = tl.where(visible & ~bad, x, float("-inf"))
        m, c, T, A = update_stats(m, c, T, A, x, AXIS=1)
    log_s = log_normaliser(c, T)
    h = log_s - A / (c + T)
    lse = m + log_s
    h = tl.where(n_bad > 0, float("nan"), h)
    lse = tl.where(n_bad > 0, float("nan"), lse)
    tl.store(h_ptr + bh * L + rows, h, mask=row_ok)
    tl.store(lse_ptr + bh * L + rows, lse, mask=row_ok)


def _pow2(n: int, lo: int, cap: int) -> int:
    # tl.dot needs every tile dimension >= 16.
    return max(lo, min(cap, triton.next_power_of_2(max(int(n), 1))))


def attention_config(bh: int, L: int, S: int, D: int, dtype: torch.dtype, block_m: int = 0, block_n: int = 0,
                     interpreted: bool = False) -> dict:
    """Tiles, warps and grid of ``attention_entropy_fwd_kernel`` (what the launcher and
    tests/gpu_compile_check.py use).  ``block_m``/``block_n`` override the tiles (the interpreter
    pays per step, so CPU runs take big ones).  ``interpreted``: Triton 3.7's interpreter gets
    tl.dot of bf16 tiles wrong, so there bf16 tiles are widened to fp32 first (WIDEN): the same
    logits, since a bf16 x bf16 product is exact in fp32 and both sum in fp32.

    Chosen so that no target spills (checked by the compile check): the (BLOCK_M, BLOCK_N) fp32
    tile of logits and its update_stats temporaries live in registers, the q tile in registers
    (A operand) or shared memory and the k tile in shared memory."""
    bd = _pow2(D, 16, 1 << 30)
    if dtype in (torch.float64, torch.float32):
        bm, bn, warps = 32, 32, 4  # FMA (fp32) or DMMA (fp64): larger tiles spill (fp32: 760 B+ on sm_90)
    else:
        bm, bn, warps = 128, 64 if bd <= 128 else 32, 8
    bm = _pow2(L, 16, block_m or bm)
    bn = _pow2(S, 16, block_n or bn)
    n_mblocks = triton.cdiv(L, bm)
    programs = n_mblocks * bh
    if programs > MAX_GRID:
        raise ValueError(f"attention_entropy: {bh} x {L} queries need {programs} programs of {bm} queries, "
                         f"more than the {MAX_GRID} a grid axis holds")
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, grid=(programs,), n_mblocks=n_mblocks,
                WIDEN=interpreted and dtype == torch.bfloat16)


def attention_entropy_fwd(q3: torch.Tensor, k3: torch.Tensor, scale2: torch.Tensor, is_causal: bool,
                          offset: int, block_m: int = 0, block_n: int = 0):
    """q3: (BH, L, D), k3: (BH, S, D), unit stride along D, in their own dtype (fp16/bf16 go to
    the tensor cores as they are); scale2: (BH, L) contiguous in the accumulation dtype (fp32, or
    fp64 for fp64 inputs).  Returns (H, lse), each (BH, L) in the accumulation dtype."""
    bh, L, D = q3.shape
    S = k3.shape[1]
    acc = scale2.dtype
    h = torch.empty(bh, L, device=q3.device, dtype=acc)
    lse = torch.empty_like(h)
    if bh == 0 or L == 0:
        return h, lse
    cfg = attention_config(bh, L, S, D, q3.dtype, block_m, block_n, interpreted=q3.device.type == "cpu")
    wrap_triton(attention_entropy_fwd_kernel)[cfg["grid"]](
        q3, k3, scale2, h, lse, L, S, D, offset, cfg["n_mblocks"], q3.stride(0), q3.stride(1), k3.stride(0),
        k3.stride(1), CAUSAL=bool(is_causal), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        WIDEN=cfg["WIDEN"], ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=cfg["num_warps"])
    return h, lse
