"""Triton kernels for ``entmath.linear_cross_entropy`` and ``entmath.distributed`` (Chapter 6).

The logits of row r are z_r = (W h_r + b) / T for hidden states h (N, d), a weight W (V, d) and a
bias b (V,).  Nothing here writes them to memory whole.

Forward (``linear_summary_kernel``).  A program owns BLOCK_M rows and one *split* of the
vocabulary (grid: row blocks x splits; splits give small N enough programs).  It walks its
columns in BLOCK_N-wide blocks; for each it computes the (BLOCK_N x BLOCK_M) tile of logits on
the tensor cores, ``tl.dot`` over BLOCK_K-wide slices of d, and folds the tile into per-row online
statistics with ``softmax_stats.update_stats`` (the tile is computed transposed, vocabulary along
axis 0, because update_stats reduces over axis 0).  Per row and split it writes the summary
(m, R, A) of Chapter 6 (R = c - 1 + T: the count at the maximum minus one plus the mass below),
the target's logit z_t (only the split holding the target adds to it) and, for label smoothing,
the gap G = sum_j (m - z_j) of its columns (terms >= 0, moved to the new maximum whenever it rises:
a plain sum of the logits would carry the rounding of their offset, and lse - mean z would cancel).
The splits are merged afterwards by ``_shards.combine_summaries``, the same merge the ranks of a
process group perform with an all-reduce.
HBM traffic: every row block streams its split of W (and re-reads its own rows of h, which stay in
L1/L2), so W is read N / BLOCK_M times in all unless the programs in flight share it through the
L2 cache, as a GEMM's programs do when they walk the columns in step; at the very least h and W
once.  The outputs are O(N x splits).  FLOPs: one N x V x d matmul; no N x V tensor is written.

Backward (``linear_grad_logits_kernel``).  dL/dz is needed to form dh = dz W / T and dW = dz^T h / T,
and the accumulator of either product over the vocabulary (BLOCK_M x d) or over the rows
(BLOCK_N x d) does not fit on chip at d = 4096.  So the backward recomputes the logits tile by
tile, as in the forward, turns each tile into its gradient in registers (eq-lh-grad-z) and
writes it, for one chunk of rows at a time, into a (rows_chunk x V) buffer in the inputs' dtype;
two ordinary GEMMs (cuBLAS) then give the chunk's dh and its contribution to dW.  The chunk is a
sixteenth of the rows: the buffer is at most 1/16 of a logits buffer (1/32 for bf16 inputs).
HBM traffic per chunk: the buffer written once and read twice.  FLOPs: the recompute plus the
two products, 3 x N x V x d multiply-adds against 2 for the materialised computation's backward.

Dot precision: fp16/bf16 inputs go to the tensor cores with fp32 accumulation; fp32 inputs use
``input_precision="ieee"`` (FMA, no TF32 rounding: the op promises fp32 accuracy); fp64 stays fp64.

``logits_summary_kernel`` is the row kernel of ``entmath.distributed``: the same summary
(m, R, A, z_t, G) of rows of logits that are already in memory (one shard of a vocabulary).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .rows import row_config
from .softmax_stats import load_row_chunk, update_stats


@triton.jit
def _logits_tile_t(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACC: tl.constexpr, DOT: tl.constexpr):
    """The (BLOCK_N x BLOCK_M) tile W[cols] h[rows]^T, accumulated over d in BLOCK_K slices.
    Padding rows, columns and features load as 0 (they add 0 to every dot product)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(h), acc, input_precision=DOT, out_dtype=ACC)
    return acc


@triton.jit
def linear_summary_kernel(h_ptr, w_ptr, b_ptr, t_ptr, coef_ptr, m_ptr, r_ptr, a_ptr, zt_ptr, sz_ptr,
                          N, V, D, cols_per_split, stride_h, stride_w,
                          HAS_BIAS: tl.constexpr, GAP: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)  # target column, relative to W's first row
    inv_t = tl.load(coef_ptr)  # 1 / temperature in the accumulation dtype
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    c = tl.zeros([BLOCK_M], ACC)
    T = tl.zeros([BLOCK_M], ACC)
    A = tl.zeros([BLOCK_M], ACC)
    z_t = tl.zeros([BLOCK_M], ACC)
    gap = tl.zeros([BLOCK_M], ACC)  # sum_j (m - z_j) over the columns seen
    n_nan = tl.zeros([BLOCK_M], tl.int32)
    v_lo = split * cols_per_split
    v_hi = tl.minimum(V, v_lo + cols_per_split)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_hi
        x = _logits_tile_t(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                           BLOCK_M, BLOCK_N, BLOCK_K, ACC, DOT)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[:, None]
        x = x * inv_t
        # update_stats wants NaN-free input: count NaNs, fold them in as -inf, report them in m.
        nan = (x != x) & col_ok[:, None]
        n_nan += tl.sum(nan.to(tl.int32), axis=0)
        x = tl.where(col_ok[:, None] & ~nan, x, float("-inf"))
        # (columns past the split's end may equal a target of the next split: masked)
        z_t += tl.sum(tl.where((cols[:, None] == t[None, :]) & col_ok[:, None], x, 0.0), axis=0)
        if GAP:  # the v0 - v_lo columns seen move to the new maximum; the tile's add m - x >= 0
            m_new = tl.maximum(m, tl.max(x, axis=0))  # update_stats's new maximum
            gap = tl.where((m_new == m) | (v0 == v_lo), gap, gap + (v0 - v_lo) * (m_new - m))
            gap += tl.sum(tl.where(col_ok[:, None], tl.where(x == float("-inf"), float("inf"), m_new[None, :] - x),
                                   0.0), axis=0)
        # (last: the tile x is dead after update_stats, whose temporaries are the register peak)
        m, c, T, A = update_stats(m, c, T, A, x)
    out = split * N + rows
    tl.store(m_ptr + out, tl.where(n_nan > 0, float("nan"), m), mask=row_ok)
    tl.store(r_ptr + out, (c - 1.0) + T, mask=row_ok)  # S = c + T = 1 + R
    tl.store(a_ptr + out, A, mask=row_ok)
    tl.store(zt_ptr + out, z_t, mask=row_ok)
    tl.store(sz_ptr + out, gap, mask=row_ok)


@triton.jit
def linear_grad_logits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, cp_ptr, ce_ptr, ct_ptr, cs_ptr,
                              coef_ptr, g_ptr, N, V, D, stride_h, stride_w, stride_g,
                              HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    # One (BLOCK_N x BLOCK_M) tile of dL/du, u = W h + b the raw logits (eq-lh-grad-z):
    #   dL/du = p (c_p - c_e (log p + H)) - c_t [col = t] - c_s,   p = e^{u / T - lse},
    # with per-row coefficients c_* computed on the host (they already hold the factor 1 / T).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < V
    x = _logits_tile_t(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                       BLOCK_M, BLOCK_N, BLOCK_K, ACC, DOT)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[:, None]
    x = x * tl.load(coef_ptr)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # NaN on a bad row: a NaN gradient row
    log_p = x - lse[None, :]
    p = tl.exp(log_p)
    f = tl.load(cp_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if ENTROPY:
        h_row = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        f -= tl.load(ce_ptr + rows, mask=row_ok, other=0.0)[None, :] * (log_p + h_row[None, :])
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    g = p * f - tl.where(cols[:, None] == t[None, :], tl.load(ct_ptr + rows, mask=row_ok, other=0.0)[None, :], 0.0)
    g -= tl.load(cs_ptr + rows, mask=row_ok, other=0.0)[None, :]
    ptrs = g_ptr + rows[None, :].to(tl.int64) * stride_g + cols[:, None]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def logits_summary_kernel(z_ptr, t_ptr, m_ptr, r_ptr, a_ptr, zt_ptr, sz_ptr, n_cols, stride_row,
                          GAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # One program per row of logits in memory, one read of the row: (m, R, A, z_t, G).
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    t = tl.load(t_ptr + row)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)
    gap = tl.zeros([], ACC)  # sum_j (m - z_j) over the columns read, as in linear_summary_kernel
    n_nan = tl.zeros([], tl.int32)
    for start in range(0, n_cols, BLOCK):
        x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
        n_nan += k
        m_old = m
        m, c, T, A = update_stats(m, c, T, A, x)
        if GAP:
            gap = tl.where((m == m_old) | (start == 0), gap, gap + start * (m - m_old))
            gap += tl.sum(tl.where(start + cols < n_cols, tl.where(x == float("-inf"), float("inf"), m - x), 0.0),
                          axis=0)
    in_row = (t >= 0) & (t < n_cols)
    z_t = tl.where(in_row, tl.load(z_row + tl.where(in_row, t, 0)).to(ACC), 0.0)
    tl.store(m_ptr + row, tl.where(n_nan > 0, float("nan"), m))
    tl.store(r_ptr + row, (c - 1.0) + T)
    tl.store(a_ptr + row, A)
    tl.store(zt_ptr + row, z_t)
    tl.store(sz_ptr + row, gap)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype):
    # "ieee" keeps fp32 out of TF32 (10-bit mantissa); half types use the tensor cores natively.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _blocks(n, cap):
    # tl.dot needs every tile dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def linear_config(N, V, D, on_gpu, dtype=torch.bfloat16):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); ``on_gpu``: any device but the CPU, so
    that meta tensors get the GPU configuration.  The interpreter pays per step, not per element:
    large tiles on the CPU.  On a GPU: 64 rows x 64 columns x 32 features per step, 8 warps; half
    types in two pipeline stages, fp32/fp64 (FMA units) in one.  The statistics keep several
    tile-sized temporaries live, and the register budget is tight: a 128 x 128 tile spilled 1.8 KB
    per thread on sm_90; with the running gap of the smoothing term, 64 features per step spilled
    8-16 B on sm_100 (half types), and 4 warps or two stages 8-32 B on sm_80 (fp32).  The compile
    check (tests/gpu_compile_check.py) holds the choice to no spills on sm_80/90/100."""
    if not on_gpu:
        return _blocks(N, 64), _blocks(V, 128), _blocks(D, 64), 4, 1
    if dtype in (torch.float16, torch.bfloat16):
        return _blocks(N, 64), _blocks(V, 64), _blocks(D, 32), 8, 2
    return _blocks(N, 64), _blocks(V, 64), _blocks(D, 32), 8, 1


def linear_summary_fwd(h2d, w, b, t_rel, inv_t, want_gap, splits=None):
    """Per-row, per-split summaries of the logits (h2d W^T + b) * inv_t: five tensors
    (splits, N) in the accumulation dtype (m, R, A, z_t, G = sum_j (m - z_j) over the split), and
    each split's number of columns (splits, 1).  h2d (N, d) and w (V, d) share a
    dtype and have unit stride along d; b (V,) contiguous or None; t_rel (N,) int64 contiguous."""
    N, D = h2d.shape
    V = w.shape[0]
    acc = torch.float64 if h2d.dtype == torch.float64 else torch.float32
    bm, bn, bk, warps, stages = linear_config(N, V, D, h2d.device.type != "cpu", h2d.dtype)
    row_blocks = triton.cdiv(N, bm)
    if splits is None:
        # Enough programs to fill a GPU's SMs (about 132 on an H100) when N is small.
        sms = torch.cuda.get_device_properties(h2d.device).multi_processor_count if h2d.is_cuda else 1
        splits = max(1, min(triton.cdiv(V, bn), triton.cdiv(2 * sms, max(row_blocks, 1))))
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), bn) * bn
    splits = triton.cdiv(V, cols_per_split)
    outs = [torch.empty(splits, N, device=h2d.device, dtype=acc) for _ in range(5)]
    if N:
        coef = torch.tensor([inv_t], dtype=acc, device=h2d.device)
        wrap_triton(linear_summary_kernel)[(row_blocks, splits)](
            h2d, w, b if b is not None else w, t_rel, coef, *outs, N, V, D, cols_per_split,
            h2d.stride(0), w.stride(0), HAS_BIAS=b is not None, GAP=bool(want_gap),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=_acc(h2d.dtype), DOT=_dot_precision(h2d.dtype),
            num_warps=warps, num_stages=stages)
    starts = torch.arange(splits, device=h2d.device, dtype=acc).unsqueeze(1) * cols_per_split
    return (*outs, (V - starts).clamp_max(cols_per_split))


def linear_grad_logits(h2d, w, b, t_rel, lse, ent, c_p, c_e, c_t, c_s, inv_t, out):
    """Write dL/du for the rows of h2d into ``out`` (rows, V) (eq-lh-grad-z); per-row vectors
    (rows,) contiguous in the accumulation dtype; ``ent``/``c_e`` None: no entropy term."""
    N, D = h2d.shape
    V = w.shape[0]
    if N == 0:
        return out
    acc = torch.float64 if h2d.dtype == torch.float64 else torch.float32
    bm, bn, bk, warps, stages = linear_config(N, V, D, h2d.device.type != "cpu", h2d.dtype)
    coef = torch.tensor([inv_t], dtype=acc, device=h2d.device)
    entropy = c_e is not None
    wrap_triton(linear_grad_logits_kernel)[(triton.cdiv(N, bm), triton.cdiv(V, bn))](
        h2d, w, b if b is not None else w, t_rel, lse, ent if entropy else lse, c_p, c_e if entropy else c_p,
        c_t, c_s, coef, out, N, V, D, h2d.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=b is not None, ENTROPY=entropy, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        ACC=_acc(h2d.dtype), DOT=_dot_precision(h2d.dtype), num_warps=warps, num_stages=stages)
    return out


def logits_summary_fwd(z2d, t_rel, want_gap):
    """(m, R, A, z_t, G = sum_j (m - z_j)) of each row of z2d (rows, n) with unit column stride, in the
    accumulation dtype; t_rel (rows,) int64: the target's column, or any value outside [0, n)."""
    rows, n = z2d.shape
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    outs = [torch.empty(rows, device=z2d.device, dtype=acc) for _ in range(5)]
    if rows:
        cfg = row_config(n, z2d)  # BLOCK, warps and the register budget (ptxas spilled 8 B without it)
        wrap_triton(logits_summary_kernel)[(rows,)](
            z2d, t_rel, *outs, n, z2d.stride(0), GAP=bool(want_gap), BLOCK=cfg["BLOCK"], ACC=_acc(z2d.dtype),
            num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return outs
