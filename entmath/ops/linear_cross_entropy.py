"""Cross-entropy and entropy of a linear head's softmax, without its logits.  Chapter 6
(book/ch06_without_logits.md); the loss is Chapter 5's, the entropy Chapter 1's.

For hidden states h (N, d), a weight W (V, d) and bias b (V,) as in ``nn.Linear``, and a
temperature T, row r has the logits z_r = (W h_r + b) / T.  The op returns the loss of
``cross_entropy(z, target)`` and, if asked for, the entropy of softmax(z_r), and never holds the
N x V logits: at d = 4096, V = 152064 they are 2.5 MB per token in fp32, 9.7 GB for 4096 tokens.

Forward.  The logits are formed one (rows x vocabulary) tile at a time.  A tile is reduced to a
summary (m, R, A) per row (``_stats.chunk_summary``: the maximum, S = 1 + R, the first moment),
which is merged into the row's running summary (``_stats.merge_summaries``, eq-lh-merge), and to
the target's logit z_t (from the one tile that holds it) and, with label smoothing, the row's
sum of m - z_j (moved to each new maximum; lse - mean z = log S + that sum / V, with no
cancellation at any offset).  From the summary, lse = m + log1p(R) and H = log1p(R) - A / (1 + R) (eq-lh-stats); the
loss is that of ``cross_entropy`` (``loss_from_statistics``).

Backward.  The loss and the entropy depend on the logits only through per-row statistics whose
gradients Chapters 1 and 5 give: d lse/dz = p, d z_t/dz = e_t, d mean(z)/dz = 1/V and
dH/dz = -p (log p + H).  So, per row (eq-lh-grad-z),

    dL/dz = p (c_p - c_e (log p + H)) - c_t e_t - c_s 1,

with coefficients from the incoming gradients (``row_coefficients``).  The logits are recomputed
tile by tile from h and W, turned into this gradient (``cross_entropy_vjp`` of Chapter 5 with the
loss folded into the lse term, then the target terms), and pushed through the linear map
(eq-lh-grad-hw): dh = dz W / T, dW = dz^T h / T, db = 1^T dz / T.

Memory: O(tile) besides the inputs and the gradients.  FLOPs: the forward's matmul, and in the
backward the recompute plus the two products (4 matmuls of N x V x d against 3 materialised).

Paths: ``linear_cross_entropy_torch`` (the reference, chunked plain torch; its vjp
``linear_cross_entropy_vjp`` is differentiable again when autograd records) and the registered
operators ``torch.ops.entmath.linear_cross_entropy_triton`` / ``..._backward_triton``
(``entmath/kernels/triton/linear_cross_entropy.py``: the tiles on tensor cores).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import resolve_backend
from .._validate import (check_float_tensor, check_rows_finite, coded_lse, value_checks_active)
from ._library import register_row_vmap, triton_kernel_op
from ._rows import kernels, no_autocast, output_dtype
from ._shards import combine_summaries, stacked
from ._stats import chunk_summary, merge_summaries, nan_unless_finite, rebase_gap
from .cross_entropy import REDUCTIONS, cross_entropy_vjp

__all__ = ["linear_cross_entropy"]

# Logits per tile of the torch path (2 MiB in fp32).  The vocabulary is cut into blocks of
# VOCAB_BLOCK columns and the rows into blocks that make a tile of about this size: W is then read
# once per row block, and a tile's temporaries stay near the cache.  The backward holds three
# tiles at once (the logits, log p, p): 6 MiB, a hundredth of the logits at 4096 x 32000.
TILE_LOGITS = 1 << 19
VOCAB_BLOCK = 2048
# Under torch.compile the loops are unrolled: at most this many vocabulary blocks, rows whole.
COMPILED_VOCAB_BLOCKS = 16


def _tiles(n_rows: int, n_vocab: int):
    """(row step, vocabulary step) of the torch path's tiles."""
    if torch.compiler.is_compiling():
        return max(n_rows, 1), max(1, -(-n_vocab // COMPILED_VOCAB_BLOCKS), min(n_vocab, VOCAB_BLOCK))
    cols = max(1, min(n_vocab, VOCAB_BLOCK))
    return max(1, TILE_LOGITS // cols), cols


def acc_dtype_of(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tile_logits(h_r, w_c, b_c, inv_t: float):
    """(h_r W_c^T + b_c) / T, in the dtype of h_r (the accumulation dtype)."""
    if b_c is None:
        z = h_r @ w_c.t()
        return z.mul_(inv_t) if inv_t != 1.0 else z
    return torch.addmm(b_c, h_r, w_c.t(), beta=inv_t, alpha=inv_t)


# ---- forward --------------------------------------------------------------------------------
def linear_summary_torch(h2d, w, b, t_rel, inv_t: float, want_gap: bool, want_moment: bool = True):
    """Per-row summary (m, R, A, z_t, G) of the logits (h2d W^T + b) / T, tile by tile, with
    G = sum_j (m - z_j) (label smoothing's sum of the logits, relative to the maximum; 0 unless
    ``want_gap``).

    ``t_rel`` (N,) int64: each row's target column counted from W's first row; z_t is 0 for rows
    whose target lies outside [0, V) (another shard's, or ignored); A is 0 unless ``want_moment``
    (the entropy needs it, the loss does not).  Eager: O(tile) memory."""
    n_rows, n_vocab = h2d.shape[0], w.shape[0]
    acc = acc_dtype_of(h2d, w, b)
    row_step, col_step = _tiles(n_rows, n_vocab)
    pieces = []
    for r0 in range(0, n_rows, row_step):
        rs = slice(r0, min(n_rows, r0 + row_step))
        h_r, t_r = h2d[rs].to(acc), t_rel[rs]
        run = gap = None
        z_t = h_r.new_zeros(h_r.shape[0])
        for c0 in range(0, n_vocab, col_step):
            c1 = min(n_vocab, c0 + col_step)
            z = _tile_logits(h_r, w[c0:c1].to(acc), None if b is None else b[c0:c1].to(acc), inv_t)
            col = t_r - c0
            inside = (col >= 0) & (col < c1 - c0)
            z_t = z_t + torch.where(inside, z.gather(1, col.clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1), 0.0)
            # masked: a logit can reach -inf only by overflow; it then contributes exactly 0.
            new = chunk_summary(z, masked=True, moment=want_moment, gap=want_gap)
            del z  # before the next tile is formed: one tile alive at a time
            if want_gap:  # G of the columns so far, moved to the new maximum (terms >= 0)
                *new, g_c = new
                if run is None:
                    gap = g_c
                else:
                    m_new = torch.maximum(run[0], new[0])
                    gap = rebase_gap(gap, c0, run[0], m_new) + rebase_gap(g_c, c1 - c0, new[0], m_new)
            run = tuple(new) if run is None else merge_summaries(run, tuple(new))
        pieces.append((*run, z_t, gap if want_gap else z_t.new_zeros(z_t.shape)))
    if not pieces:
        empty = h2d.new_empty(0, dtype=acc)
        return (empty,) * 5
    if len(pieces) == 1:
        return pieces[0]
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def loss_from_statistics(m, log_s, ent, z_t, gap, t, n_vocab: int, eps: float, ignore_index: int, z_loss: float):
    """Per-row (loss, coded lse, entropy) of ``cross_entropy`` from the row's statistics:
    the row maximum m, log S = lse - m >= 0, the entropy, the target's logit and
    G = sum_j (m - z_j) (smoothing).  The loss is formed as
    (1 - eps)((m - z_t) + log S) + eps (log S + G / V) + z_loss lse^2 (lse - mean z = log S + G / V):
    sums of terms >= 0, so no lse-sized quantity is subtracted at any offset, and nothing cancels
    when the target is the arg-max.  Ignored rows give loss and entropy 0; class indices outside
    [0, V) (possible with validation off) give NaN."""
    lse = m + log_s
    valid = t != ignore_index
    in_range = (t >= 0) & (t < n_vocab)
    loss = (1.0 - eps) * ((m - z_t) + log_s)
    if eps > 0:
        loss = loss + eps * (log_s + gap / n_vocab)
    loss = torch.where(in_range | ~valid, loss, float("nan"))
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if ent is not None:
        ent = torch.where(valid, ent, 0.0)
    return loss, coded_lse(m, lse), ent


def summary_to_rows(m, r, a, z_t, gap, t, n_vocab, eps, ignore_index, z_loss, want_entropy):
    """(loss, coded lse, entropy or empty) from a merged summary (eq-lh-stats)."""
    log_s = torch.log1p(r)
    ent = log_s - a / (1.0 + r) if want_entropy else None
    loss, lse, ent = loss_from_statistics(m, log_s, ent, z_t, gap, t, n_vocab, eps, ignore_index, z_loss)
    return loss, lse, ent if want_entropy else loss.new_empty(0)


def linear_cross_entropy_torch(h2d, w, b, t, eps, ignore_index, z_loss, inv_t, want_entropy):
    """Reference forward: per-row (loss, coded lse, entropy or empty) in the accumulation dtype."""
    m, r, a, z_t, gap = linear_summary_torch(h2d, w, b, t, inv_t, eps > 0, want_entropy)
    return summary_to_rows(m, r, a, z_t, gap, t, w.shape[0], eps, ignore_index, z_loss, want_entropy)


# ---- backward -------------------------------------------------------------------------------
def row_coefficients(t, lse, n_vocab: int, eps: float, ignore_index: int, z_loss: float, inv_t: float,
                     g_loss, g_lse, g_ent):
    """Per-row coefficients of dL/du for the raw logits u = W h + b (eq-lh-grad-z):

        dL/du = p (c_p - c_e (log p + H)) - c_t e_t - c_s,
        c_p = (g_loss (1 + 2 z_loss lse) + g_lse) / T,  c_e = g_H / T,
        c_t = g_loss (1 - eps) / T,  c_s = g_loss eps / (V T).

    Ignored rows get 0 (their loss and entropy are constants), rows with a class index outside
    [0, V) get NaN.  Any incoming gradient may be None; returns (c_p, c_e, c_t, c_s), with c_e
    None without an entropy gradient and c_s None without label smoothing."""
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_vocab))
    c_p = c_t = torch.zeros_like(lse)
    c_s = None
    if g_loss is not None:
        gl = torch.where(valid, g_loss.to(lse.dtype), 0.0)
        c_p = gl * (1.0 + 2.0 * z_loss * nan_unless_finite(lse)) if z_loss else gl
        c_t = gl * ((1.0 - eps) * inv_t)
        c_s = gl * (eps * inv_t / n_vocab) if eps > 0 else None
    if g_lse is not None:
        c_p = c_p + g_lse.to(lse.dtype)
    c_p = torch.where(bad, float("nan"), c_p * inv_t)
    c_e = None if g_ent is None else torch.where(valid, g_ent.to(lse.dtype), 0.0) * inv_t
    return c_p, c_e, c_t, c_s


def logits_grad(z, col, lse, ent, c_p, c_e, c_t, c_s):
    """dL/du on a tile of tempered logits z (rows x columns), eq-lh-grad-z.  ``col``: each row's
    target column within the tile (any value outside [0, columns) for none).  The p-terms are
    Chapter 5's ``cross_entropy_vjp`` with the loss folded into the lse gradient (d lse/dz = p);
    the target and smoothing terms follow.  In place on its temporaries unless autograd records."""
    fast = not torch.is_grad_enabled()
    gz, _ = cross_entropy_vjp(z=z, t=None, y=None, w=None, eps=0.0, ignore_index=-100, softcap=None, lse=lse,
                              lse_res=torch.zeros_like(lse), ent=ent, g_loss=None, g_lse=c_p, g_ent=c_e,
                              want_gy=False)  # lse is the merged summaries' own: no residual
    n = z.shape[-1]
    inside = (col >= 0) & (col < n)
    idx = col.clamp(0, n - 1).unsqueeze(-1)
    minus_t = torch.where(inside, -c_t, 0.0).unsqueeze(-1)
    if fast:
        gz = gz.scatter_add_(-1, idx, minus_t)
        return gz if c_s is None else gz.sub_(c_s.unsqueeze(-1))
    gz = gz.scatter_add(-1, idx, minus_t)
    return gz if c_s is None else gz - c_s.unsqueeze(-1)


def linear_cross_entropy_vjp(h2d, w, b, t_rel, lse, ent, inv_t, coefs, need=(True, True, True)):
    """(dh, dW, db) by recomputing the logits tile by tile (eq-lh-grad-hw), in torch ops.

    ``coefs`` = ``row_coefficients(...)``; ``need``: which of the three to compute (None
    otherwise; db is None without a bias).  While autograd records (``create_graph``) every op is
    out of place, so the result is differentiable again (the graph then holds every tile: double
    backward costs O(N V) memory); otherwise the gradients accumulate in place."""
    # In place only when nothing records and no torch.func transform batches some operands (an
    # unbatched accumulator cannot take a batched tile in place).
    fast = not torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None
    c_p, c_e, c_t, c_s = coefs
    n_rows, n_vocab = h2d.shape[0], w.shape[0]
    acc = acc_dtype_of(h2d, w, b)
    need_h, need_w, need_b = need[0], need[1], need[2] and b is not None
    row_step, col_step = _tiles(n_rows, n_vocab)
    lse = nan_unless_finite(lse)
    dh_rows, dw_cols, db_cols = [], {}, {}
    dh = h2d.new_empty(h2d.shape, dtype=acc) if fast and need_h else None
    dw = h2d.new_zeros(w.shape, dtype=acc) if fast and need_w else None
    db = h2d.new_zeros(n_vocab, dtype=acc) if fast and need_b else None
    for r0 in range(0, n_rows, row_step):
        rs = slice(r0, min(n_rows, r0 + row_step))
        h_r = h2d[rs].to(acc)
        dh_r = None
        for c0 in range(0, n_vocab, col_step):
            c1 = min(n_vocab, c0 + col_step)
            w_c = w[c0:c1].to(acc)
            z = _tile_logits(h_r, w_c, None if b is None else b[c0:c1].to(acc), inv_t)
            g = logits_grad(z, t_rel[rs] - c0, lse[rs], None if c_e is None else ent[rs], c_p[rs],
                            None if c_e is None else c_e[rs], c_t[rs], None if c_s is None else c_s[rs])
            if need_h:
                if fast and c0 == 0:  # straight into the rows of dh
                    dh[rs] = g @ w_c
                elif fast:
                    dh[rs].addmm_(g, w_c)
                else:
                    dh_r = g @ w_c if dh_r is None else dh_r + g @ w_c
            if fast:
                if need_w:
                    dw[c0:c1].addmm_(g.t(), h_r)
                if need_b:
                    db[c0:c1].add_(g.sum(0))
            else:
                if need_w:
                    dw_cols[c0] = g.t() @ h_r if c0 not in dw_cols else dw_cols[c0] + g.t() @ h_r
                if need_b:
                    db_cols[c0] = g.sum(0) if c0 not in db_cols else db_cols[c0] + g.sum(0)
            del z, g  # before the next tile is formed
        if need_h and not fast:
            dh_rows.append(dh_r)
    if not fast:
        if need_h:
            dh = torch.cat(dh_rows) if dh_rows else h2d.new_zeros(h2d.shape, dtype=acc)
        if need_w:
            dw = torch.cat([dw_cols[c] for c in sorted(dw_cols)]) if dw_cols else h2d.new_zeros(w.shape, dtype=acc)
        if need_b:
            db = torch.cat([db_cols[c] for c in sorted(db_cols)]) if db_cols else h2d.new_zeros(n_vocab, dtype=acc)
    return dh, dw, db


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse, entropy) of the logits (h W^T + b) / T against class indices t, as one
    autograd unit on either backend; the backward recomputes the logits (torch vjp, or the
    Triton backward operator when no graph is being built)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h2d, w, b, t, eps, ignore_index, z_loss, inv_t, want_entropy, backend):
        if backend == "triton":
            return torch.ops.entmath.linear_cross_entropy_triton(h2d, w, b, t, eps, ignore_index, z_loss, inv_t,
                                                                 want_entropy)
        return linear_cross_entropy_torch(h2d, w, b, t, eps, ignore_index, z_loss, inv_t, want_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.backend = inputs[9]

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_ent):
        return (*_backward(ctx, g_loss, g_lse, g_ent, kernel=ctx.backend == "triton"), *([None] * 6))


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
def _kernel_operands(h2d, w, b):
    """h and W in one dtype with unit stride along d, bias contiguous: what the kernels read."""
    dtype = torch.promote_types(h2d.dtype, w.dtype)
    if not h2d.is_cuda and dtype in (torch.float16, torch.bfloat16):
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (it reads their bits as another
        # type); the fp32 copy gives what the tensor cores compute: exact products, fp32 sums.
        dtype = torch.float32
    h2d, w = h2d.to(dtype), w.to(dtype)
    h2d = h2d if h2d.stride(-1) == 1 or h2d.shape[-1] <= 1 else h2d.contiguous()
    w = w if w.stride(-1) == 1 or w.shape[-1] <= 1 else w.contiguous()
    return h2d, w, None if b is None else b.contiguous()


def triton_summary(h2d, w, b, t_rel, inv_t: float, want_gap: bool, splits=None):
    """The kernel's per-split summaries merged over the splits (eq-lh-allreduce with the splits
    as shards): per-row (m, R, A, z_t, G) in the accumulation dtype, G = sum_j (m - z_j)."""
    h2d, w, b = _kernel_operands(h2d, w, b)
    m, r, a, z_t, gap, counts = kernels("linear_cross_entropy").linear_summary_fwd(
        h2d, w, b, t_rel.contiguous(), inv_t, want_gap, splits=splits)
    M, R, A, sums = combine_summaries(m, r, a, [z_t], *stacked(0), gap=(gap, counts))
    return M, R, A.clone(), sums[..., 0].clone(), sums[..., 1].clone()  # an operator's outputs: own storage


@triton_kernel_op("linear_cross_entropy_triton")
def linear_cross_entropy_triton(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,
                                eps: float, ignore_index: int, z_loss: float, inv_temperature: float,
                                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, coded lse, entropy or empty) of the logits (h W^T + b) * inv_temperature."""
    m, r, a, z_t, gap = triton_summary(h, w, b, t, inv_temperature, eps > 0)
    return summary_to_rows(m, r, a, z_t, gap, t, w.shape[0], eps, ignore_index, z_loss, want_entropy)


@linear_cross_entropy_triton.register_fake
def _(h, w, b, t, eps, ignore_index, z_loss, inv_temperature, want_entropy):
    loss = h.new_empty(h.shape[:1], dtype=acc_dtype_of(h, w, b))
    return loss, torch.empty_like(loss), h.new_empty(h.shape[0] if want_entropy else 0, dtype=loss.dtype)


@triton_kernel_op("linear_softmax_summary_triton")
def linear_softmax_summary_triton(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t_rel: torch.Tensor,
                                  inv_temperature: float, want_gap: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Per-row summary (m, R, A, z_t, G = sum_j (m - z_j)) of the logits (h W^T + b) * inv_temperature over the
    columns of w (one vocabulary shard, for ``entmath.distributed``)."""
    return triton_summary(h, w, b, t_rel, inv_temperature, want_gap)


@linear_softmax_summary_triton.register_fake
def _(h, w, b, t_rel, inv_temperature, want_gap):
    m = h.new_empty(h.shape[:1], dtype=acc_dtype_of(h, w, b))
    return tuple(torch.empty_like(m) for _ in range(5))


@triton_kernel_op("linear_cross_entropy_backward_triton")
def linear_cross_entropy_backward_triton(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                                         t_rel: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                                         c_p: torch.Tensor, c_e: Optional[torch.Tensor], c_t: torch.Tensor,
                                         c_s: Optional[torch.Tensor], inv_temperature: float, need_h: bool, need_w: bool,
                                         need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) in the dtypes of h, w, b (empty where not needed) from the per-row
    coefficients of ``row_coefficients``: the kernel writes dL/du for a sixteenth of the rows at a
    time into a buffer, two GEMMs push it through the linear map."""
    k = kernels("linear_cross_entropy")
    h2d, wk, bk = _kernel_operands(h, w, b)
    acc = acc_dtype_of(h, w, b)
    n_rows, n_vocab = h2d.shape[0], wk.shape[0]
    lse = nan_unless_finite(lse).contiguous()
    c_p, c_t = c_p.contiguous(), c_t.contiguous()
    c_s = torch.zeros_like(c_t) if c_s is None else c_s.contiguous()
    c_e = None if c_e is None else c_e.contiguous()
    ent = ent.contiguous() if c_e is not None else None
    t_rel = t_rel.contiguous()
    half = h2d.dtype in (torch.float16, torch.bfloat16)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
    db = torch.zeros(n_vocab, dtype=acc, device=w.device) if need_b and b is not None else None
    step = max(64, -(-n_rows // 16))
    buf = torch.empty(min(step, n_rows), n_vocab, dtype=h2d.dtype if half else acc, device=h.device)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        g = k.linear_grad_logits(h2d[r0:r1], wk, bk, t_rel[r0:r1], lse[r0:r1], None if ent is None else ent[r0:r1],
                                 c_p[r0:r1], None if c_e is None else c_e[r0:r1], c_t[r0:r1], c_s[r0:r1],
                                 inv_temperature, buf[: r1 - r0])
        if need_h:
            dh[r0:r1] = (g @ wk.to(g.dtype)).to(h.dtype)
        if need_w:
            dw.add_((g.t() @ h2d[r0:r1].to(g.dtype)).to(acc))
        if db is not None:
            db.add_(g.sum(0, dtype=acc))
    return (dh, dw.to(w.dtype) if need_w else w.new_empty(0),
            db.to(b.dtype) if db is not None else w.new_empty(0))


@linear_cross_entropy_backward_triton.register_fake
def _(h, w, b, t_rel, lse, ent, c_p, c_e, c_t, c_s, inv_temperature, need_h, need_w, need_b):
    return (torch.empty_like(h) if need_h else h.new_empty(0), torch.empty_like(w) if need_w else w.new_empty(0),
            torch.empty_like(b) if need_b and b is not None else w.new_empty(0))


def _setup(ctx, inputs, output):
    h2d, w, b, t, eps, ignore_index, z_loss, inv_t, want_entropy = inputs[:9]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h2d, w, b, t, output[1], output[2])
    ctx.options = (eps, ignore_index, z_loss, inv_t)


def _backward(ctx, g_loss, g_lse, g_ent, kernel=True):
    h2d, w, b, t, lse, ent = ctx.saved_tensors
    eps, ignore_index, z_loss, inv_t = ctx.options
    g_ent = g_ent if ent.numel() else None
    need = tuple(ctx.needs_input_grad[:3])
    coefs = row_coefficients(t, lse, w.shape[0], eps, ignore_index, z_loss, inv_t, g_loss, g_lse, g_ent)
    graph = torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None
    with no_autocast(h2d):  # the recomputed logits stay in the accumulation dtype
        if not kernel or graph:  # a graph of the backward is wanted: differentiable torch
            dh, dw, db = linear_cross_entropy_vjp(h2d, w, b, t, lse, ent, inv_t, coefs, need)
        else:
            dh, dw, db = torch.ops.entmath.linear_cross_entropy_backward_triton(
                h2d, w, b, t, lse, ent, *coefs, inv_t, *need)
            dh, dw, db = (g if n else None for g, n in zip((dh, dw, db), need))
    return (None if dh is None else dh.to(h2d.dtype), None if dw is None else dw.to(w.dtype),
            None if db is None or b is None else db.to(b.dtype), None)


# Direct callers of torch.ops.entmath.linear_cross_entropy_triton get the same autograd.
linear_cross_entropy_triton.register_autograd(
    lambda ctx, gl, gs, ge: (*_backward(ctx, gl, gs, ge), *([None] * 5)), setup_context=_setup)
register_row_vmap(linear_cross_entropy_triton, (1, None, None, 0, None, None, None, None, None))
register_row_vmap(linear_softmax_summary_triton, (1, None, None, 0, None, None))


# ---- the public function --------------------------------------------------------------------
def check_linear_head(hidden, weight, bias, target):
    """Structural checks shared with ``entmath.distributed.linear_cross_entropy``; returns the
    class-index targets as an (N,) int64 tensor."""
    check_float_tensor(hidden, "hidden")
    check_float_tensor(weight, "weight")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., d), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, d) as in nn.Linear, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, d) with d = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: the vocabulary is empty (softmax needs at least one class)")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on the device of hidden ({hidden.device}), got {weight.device}")
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on the device of hidden ({hidden.device}), got {bias.device}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have hidden's shape without the last dimension, {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target must be on the device of hidden ({hidden.device}), got {target.device}")
    return target.reshape(-1).long()


def check_options(label_smoothing, z_loss, temperature, reduction, ignore_index):
    """Option checks shared with ``entmath.distributed``; returns (eps, z_loss, 1 / temperature)."""
    eps = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = _number(z_loss, "z_loss")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    temp = _number(temperature, "temperature")
    if not (0.0 < temp < float("inf")) or not math.isfinite(1.0 / temp):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return eps, z_loss, 1.0 / temp


def check_targets(t1d, n_vocab: int, ignore_index: int) -> None:
    """Class indices in [0, V) or ignore_index (a value check: behind the validation switch)."""
    if value_checks_active(t1d):
        out_of_range = (t1d != ignore_index) & ((t1d < 0) | (t1d >= n_vocab))
        if bool(out_of_range.any()):
            bad = t1d[out_of_range][:5].tolist()
            raise ValueError(f"target has class indices outside [0, {n_vocab}): {bad} (ignore_index={ignore_index})")


def check_finite(*named) -> None:
    """NaN or inf in an input, named (a value check: O((N + V) d), before any O(N V d) work).
    Read off the largest and smallest entries (NaN propagates through both): two reductions and no
    temporary the size of the input (a mask of the weight would be a tenth of the op's memory)."""
    for x, name in named:
        if x is None or not value_checks_active(x) or x.numel() == 0:
            continue
        ends = torch.stack([x.amax(), x.amin()])
        if not bool(torch.isfinite(ends).all()):
            raise ValueError(f"{name} contains {'NaN' if bool(torch.isnan(ends).any()) else 'inf'}")


def reduce_rows(loss, ent, lse, t1d, lead, ignore_index, reduction, out_dtype, return_entropy):
    """Bad rows to NaN, the reduction, the output dtype (as ``cross_entropy``)."""
    valid = t1d != ignore_index
    bad_row = valid & ~torch.isfinite(lse)
    loss = torch.where(bad_row, float("nan"), loss)
    if reduction == "none":
        out = loss.view(lead)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / valid.sum().clamp_min(1)
    out = out.to(out_dtype)
    if return_entropy:
        return out, torch.where(bad_row, float("nan"), ent).view(lead).to(out_dtype)
    return out


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, temperature: float = 1.0,
                         return_entropy: bool = False, backend: str = "auto"):
    """Cross-entropy of the linear head ``(hidden @ weight.T + bias) / temperature``, never
    forming its logits (Chapter 6).

    Equal to ``entmath.cross_entropy(F.linear(hidden, weight, bias) / temperature, target, ...)``
    for the options the two share, with O(tile) memory instead of the N x V logits: the torch path
    forms the logits in tiles of about 2**19 entries and keeps only per-row statistics (online
    max, sum and first moment); the backward recomputes them tile by tile.  The Triton path does
    the same on tensor cores.

    Args:
        hidden: (..., d) hidden states, floating point.
        weight: (V, d) output weight, as ``nn.Linear.weight`` (or a tied embedding).
        target: class indices, shape ``hidden.shape[:-1]``, integer dtype.
        bias: optional (V,) bias.
        ignore_index: targets equal to it contribute 0 loss, 0 gradient and 0 entropy.
        reduction: ``"none"``, ``"sum"``, or ``"mean"`` over the non-ignored rows (0.0 with zero
            gradient when every row is ignored, as ``entmath.cross_entropy``).
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) e_t + eps / V.
        z_loss: weight of ``z_loss * lse**2`` per row (lse of the tempered logits).
        temperature: T > 0; every quantity is that of softmax(logits / T).
        return_entropy: also return the per-token entropy of that softmax (shape
            ``hidden.shape[:-1]``, 0 for ignored rows), differentiable: ``ce - beta * H.mean()``
            backpropagates to hidden, weight and bias.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Accuracy (tests/test_extremes.py, both backends, fp32/fp64/bf16, against mpmath on the
    exact logits of the given hidden, weight, bias and temperature, with bias offsets up to 1e30
    and the dtype's max / 8, spreads from 1e-20 to 30): with u the unit roundoff of the
    accumulation dtype and delta = (d + 3) u max_j (sum_k abs(h_k W_jk) + abs(b_j)) / T the rounding of
    the logits the op forms, each row's loss L is within 8 u (L + H) + 2 delta of the exact one
    (cross_entropy's bound, and the loss moves by at most 2 max_j abs(dz_j)), and its entropy H
    within the bound of ``entmath.entropy`` plus H (e^{2 delta} - 1); plus the rounding to the
    output dtype.  Label smoothing adds no offset-sized error: lse - mean z is formed as
    log S + sum_j (m - z_j) / V.

    Returns:
        The loss (dtype of ``hidden`` and ``weight`` promoted; float32 under ``torch.autocast``
        for half inputs), or ``(loss, entropy)``.  fp16/bf16 inputs accumulate in fp32.
        Differentiable in hidden, weight and bias, twice on either backend (a backward that builds
        a graph, ``create_graph=True``, runs the torch formula and records the recomputed tiles,
        so it needs O(N V) memory: for gradient penalties and Hessian-vector products at small
        sizes).

    Raises:
        TypeError: non-float hidden/weight/bias, non-integer target, non-number options.
        ValueError: shapes that do not match (``weight`` (V, d), ``bias`` (V,), ``target``
            ``hidden.shape[:-1]``), an empty vocabulary, devices that differ, options out of
            range (``label_smoothing`` outside [0, 1], negative ``z_loss``, ``temperature`` not
            > 0, unknown ``reduction``); a class index outside [0, V) other than
            ``ignore_index``; NaN or inf in hidden, weight or bias; logits that overflow.  With
            validation off (``entmath.set_validation(False)``) the value errors are not raised
            and such rows give NaN.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden, weight = torch.randn(4, 8, generator=g), torch.randn(50, 8, generator=g)
        >>> target = torch.tensor([3, 14, 15, 9])
        >>> loss = entmath.linear_cross_entropy(hidden, weight, target)  # no 4 x 50 logits stored
        >>> torch.allclose(loss, entmath.cross_entropy(hidden @ weight.T, target))
        True
    """
    t1d = check_linear_head(hidden, weight, bias, target)
    eps, z_loss, inv_t = check_options(label_smoothing, z_loss, temperature, reduction, ignore_index)
    n_vocab = weight.shape[0]
    check_targets(t1d, n_vocab, ignore_index)
    check_finite((hidden, "hidden"), (weight, "weight"), (bias, "bias"))
    backend = resolve_backend(backend, hidden, weight)
    lead = hidden.shape[:-1]
    with no_autocast(hidden):
        h2d = hidden.reshape(math.prod(lead), hidden.shape[-1])
        loss, lse, ent = _LinearCrossEntropy.apply(h2d, weight, bias, t1d, eps, ignore_index, z_loss, inv_t,
                                                   bool(return_entropy), backend)
    check_rows_finite(lse, "the logits (hidden @ weight.T + bias) / temperature", rows=t1d != ignore_index)
    out_dtype = output_dtype(hidden.new_empty(0, dtype=torch.promote_types(hidden.dtype, weight.dtype)))
    return reduce_rows(loss, ent, lse, t1d, lead, ignore_index, reduction, out_dtype, bool(return_entropy))


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)
