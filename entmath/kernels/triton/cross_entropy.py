"""Triton kernels for ``entmath.cross_entropy``: a forward kernel (loss, lse, entropy) and a
backward kernel (the gradient), one program per row each.

Forward, one read of the row (and of the target row for probability targets); HBM: n logits read
(+ n targets), a few scalars per row written.  The row is walked in the aligned frame of
``rows.py`` (16-byte loads for full chunks) and folded into the online statistics of
``softmax_stats`` (max m, count at the max c, mass below T, moment A) and into what the target
needs:

* class index t:    loss = (1 - eps)((m - z_t) + log S) + eps (lse - mean_j z_j)
* probabilities y:  loss = sum_j y'_j (lse - z_j),  y' = (1 - eps) y + eps / C,
                    accumulated as (sum_j y'_j) lse - sum_{y'_j != 0} y'_j z_j   (0 log 0 = 0)
* z-loss:           + z_loss * lse^2
* entropy:          H = log S - A / S

Backward, one read of the row (and of y) and one write of the gradient, from the forward's lse
(and sum_j y'_j for probability targets) and a per-row scale s (the reduction's scale times the
incoming gradient):  grad = s ((sum y' + 2 z_loss lse) p - y'),  and for probability targets
grad_y = s (1 - eps)(lse - z).  ``grad`` may be the logits buffer itself (``inplace_backward``):
each program reads a chunk before writing it.

So loss + gradient read the logits twice and write the gradient once.  That is the fewest HBM
passes the math allows once the row no longer fits on chip (p needs lse, which needs the whole
row: 128256 fp32 logits are 501 KiB, more than an SM's registers and shared memory), and what
autograd needs anyway: the backward must recompute p from z and lse, since storing p or the
gradient in the forward costs a write there and a read-modify-write in the backward.
"""
import torch
import triton
import triton.language as tl

from .rows import end_chunks, frame_base, in_row, row_config, row_frame
from .softmax_stats import coded_lse, drop_nan, log_normaliser, update_stats


@triton.jit
def _ce_fold(x, y_chunk, m, c, T, A, sum_z, sum_y, sum_yz, keep, spread, inside,
             SOFT: tl.constexpr, SMOOTH: tl.constexpr):
    """Fold one chunk of logits x (-inf padded) and of targets into the row's sums."""
    m, c, T, A = update_stats(m, c, T, A, x)
    if SMOOTH:
        sum_z += tl.sum(tl.where(inside, x, 0.0), axis=0)
    if SOFT:
        y = tl.where(inside, keep * y_chunk + spread, 0.0)
        sum_y += tl.sum(y, axis=0)
        sum_yz += tl.sum(y * tl.where(y != 0.0, x, 0.0), axis=0)
    return m, c, T, A, sum_z, sum_y, sum_yz


@triton.jit
def cross_entropy_fwd_kernel(z_ptr, t_ptr, y_ptr, loss_ptr, lse_ptr, ent_ptr, sum_y_ptr, coef_ptr,
                             n_cols, stride_z, stride_y, ignore_index,
                             SOFT: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, ENTROPY: tl.constexpr,
                             BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lead, n_chunks = row_frame(row * stride_z, n_cols, BLOCK, VEC)
    z_row = frame_base(z_ptr, row * stride_z, lead, VEC, True)
    y_row = frame_base(y_ptr, row * stride_y, lead, VEC, ALIGNED)
    cols = tl.arange(0, BLOCK)
    # (1 - eps, eps / C, eps, z_loss) in the accumulation dtype: scalar arguments would be fp32.
    # eps and z_loss are loaded after the loops: values live across them can spill (sm_100).
    keep, spread = tl.load(coef_ptr), tl.load(coef_ptr + 1)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)
    n_nan = tl.zeros([], tl.int32)
    sum_z = tl.zeros([], ACC)   # sum_j z_j             (smoothing, class targets)
    sum_y = tl.zeros([], ACC)   # sum_j y'_j            (probability targets)
    sum_yz = tl.zeros([], ACC)  # sum_{y'_j != 0} y'_j z_j
    y = tl.zeros([BLOCK], ACC)
    for i in range(1, n_chunks - 1):  # full chunks: no mask, 16-byte loads
        x, k = drop_nan(tl.load(z_row + i * BLOCK + cols).to(ACC))
        if SOFT:
            y = tl.load(y_row + i * BLOCK + cols).to(ACC)
        n_nan += k
        m, c, T, A, sum_z, sum_y, sum_yz = _ce_fold(x, y, m, c, T, A, sum_z, sum_y, sum_yz, keep, spread,
                                                    cols >= 0, SOFT, SMOOTH)
    for i in range(0, n_chunks, end_chunks(n_chunks)):  # the first and the last chunk, masked
        f = i * BLOCK + cols
        inside = in_row(f, lead, n_cols)
        x, k = drop_nan(tl.load(z_row + f, mask=inside, other=float("-inf")).to(ACC))
        if SOFT:
            y = tl.load(y_row + f, mask=inside, other=0.0).to(ACC)
        n_nan += k
        m, c, T, A, sum_z, sum_y, sum_yz = _ce_fold(x, y, m, c, T, A, sum_z, sum_y, sum_yz, keep, spread,
                                                    inside, SOFT, SMOOTH)
    log_s = log_normaliser(c, T)
    lse = m + log_s
    eps, z_loss = tl.load(coef_ptr + 2), tl.load(coef_ptr + 3)
    if SOFT:
        loss = sum_y * lse - sum_yz
        valid = True
        tl.store(sum_y_ptr + row, sum_y)
    else:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        z_t = tl.load(z_ptr + row * stride_z + tl.where(valid, t, 0)).to(ACC)
        # (m - z_t) + log S is lse - z_t without cancellation when the target is the arg-max.
        loss = keep * ((m - z_t) + log_s)
        if SMOOTH:
            loss += eps * (lse - sum_z / n_cols)
    if ZLOSS:
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, coded_lse(m, log_s, n_nan))
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_s - A / (c + T), 0.0))


@triton.jit
def _ce_grad(z, y_chunk, f, lead, t, s, coef, lse, keep, spread, valid, SOFT: tl.constexpr, GRAD_Y: tl.constexpr):
    """(grad, grad_y) of one chunk (grad_y 0 unless GRAD_Y); f - lead is the class index of frame
    column f."""
    p = tl.exp(z - lse)
    if SOFT:
        y = keep * y_chunk + spread
    else:
        y = tl.where(f - lead == t, keep, 0.0) + spread
    # Ignored rows get exactly 0 (they may be all -inf, with lse = NaN: select, don't multiply).
    g = tl.where(valid, s * (coef * p - y), 0.0)
    if GRAD_Y:
        return g, s * keep * (lse - z)
    return g, tl.zeros_like(g)


@triton.jit
def cross_entropy_bwd_kernel(z_ptr, t_ptr, y_ptr, lse_ptr, sum_y_ptr, scale_ptr, grad_ptr, grad_y_ptr, coef_ptr,
                             n_cols, stride_z, stride_y, stride_g, stride_gy, stride_scale, ignore_index,
                             SOFT: tl.constexpr, ZLOSS: tl.constexpr, GRAD: tl.constexpr, GRAD_Y: tl.constexpr,
                             BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lead, n_chunks = row_frame(row * stride_z, n_cols, BLOCK, VEC)
    z_row = frame_base(z_ptr, row * stride_z, lead, VEC, True)
    y_row = frame_base(y_ptr, row * stride_y, lead, VEC, ALIGNED)
    g_row = frame_base(grad_ptr, row * stride_g, lead, VEC, ALIGNED)
    gy_row = frame_base(grad_y_ptr, row * stride_gy, lead, VEC, ALIGNED)
    cols = tl.arange(0, BLOCK)
    keep, spread, z_loss = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 3)
    lse = tl.load(lse_ptr + row)
    if SOFT:
        t = -1
        valid = True
        sum_y = tl.load(sum_y_ptr + row)
    else:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        sum_y = 1.0  # (1 - eps) + C (eps / C)
    s = tl.where(valid, tl.load(scale_ptr + row * stride_scale).to(ACC), 0.0)
    coef = sum_y + 2.0 * z_loss * lse if ZLOSS else sum_y
    y = tl.zeros([BLOCK], ACC)
    for i in range(1, n_chunks - 1):  # full chunks: no mask, 16-byte loads and stores
        f = i * BLOCK + cols
        z = tl.load(z_row + f).to(ACC)
        if SOFT:
            y = tl.load(y_row + f).to(ACC)
        g, gy = _ce_grad(z, y, f, lead, t, s, coef, lse, keep, spread, valid, SOFT, GRAD_Y)
        if GRAD:
            tl.store(g_row + f, g.to(grad_ptr.dtype.element_ty))
        if GRAD_Y:
            tl.store(gy_row + f, gy.to(grad_y_ptr.dtype.element_ty))
    for i in range(0, n_chunks, end_chunks(n_chunks)):  # the first and the last chunk, masked
        f = i * BLOCK + cols
        inside = in_row(f, lead, n_cols)
        z = tl.load(z_row + f, mask=inside, other=float("-inf")).to(ACC)
        if SOFT:
            y = tl.load(y_row + f, mask=inside, other=0.0).to(ACC)
        g, gy = _ce_grad(z, y, f, lead, t, s, coef, lse, keep, spread, valid, SOFT, GRAD_Y)
        if GRAD:
            tl.store(g_row + f, g.to(grad_ptr.dtype.element_ty), mask=inside)
        if GRAD_Y:
            tl.store(gy_row + f, gy.to(grad_y_ptr.dtype.element_ty), mask=inside)


def _acc(z2d):
    return torch.float64 if z2d.dtype == torch.float64 else torch.float32


def _coefs(z2d, eps: float, z_loss: float):
    n = z2d.shape[1]
    return torch.tensor([1.0 - eps, eps / n, eps, z_loss], dtype=_acc(z2d), device=z2d.device)


def cross_entropy_fwd(z2d, t1d, y2d, eps: float, ignore_index: int, z_loss: float, want_entropy: bool):
    """Forward over (rows, n) logits; exactly one of t1d (rows,) int64 / y2d (rows, n) is given.
    Returns per-row (loss, coded lse, entropy or None, sum_j y'_j or None) in the accumulation
    dtype; the last is what ``cross_entropy_bwd`` needs for probability targets."""
    rows, n = z2d.shape
    acc = _acc(z2d)
    loss = torch.empty(rows, device=z2d.device, dtype=acc)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if want_entropy else None
    soft = y2d is not None
    sum_y = torch.empty_like(loss) if soft else None
    if rows:
        cfg = row_config(n, z2d, *([y2d] if soft else []))
        cross_entropy_fwd_kernel[(rows,)](
            z2d, t1d if not soft else loss, y2d if soft else z2d, loss, lse, ent if want_entropy else loss,
            sum_y if soft else loss, _coefs(z2d, eps, z_loss), n, z2d.stride(0), y2d.stride(0) if soft else 0,
            int(ignore_index), SOFT=soft, SMOOTH=(eps > 0 and not soft), ZLOSS=z_loss != 0.0, ENTROPY=want_entropy,
            BLOCK=cfg["BLOCK"], VEC=cfg["VEC"], ALIGNED=cfg["ALIGNED"],
            ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=cfg["num_warps"],
            maxnreg=cfg["maxnreg"])
    return loss, lse, ent, sum_y


def cross_entropy_bwd(z2d, t1d, y2d, lse, sum_y, scale, eps: float, ignore_index: int, z_loss: float,
                      grad, grad_y=None):
    """Write the gradient for (rows, n) logits into ``grad`` (may be ``z2d`` itself, or None) and,
    for probability targets, the gradient for y into ``grad_y`` (or None).  ``lse``, ``sum_y``: from
    ``cross_entropy_fwd``; ``scale``: the per-row factor, a (rows,) tensor or a 1-element one
    broadcast to every row (the reduction's scale times the incoming gradient)."""
    rows, n = z2d.shape
    if rows:
        soft = y2d is not None
        acc = _acc(z2d)
        outs = [t for t in (grad, y2d, grad_y) if t is not None]
        cfg = row_config(n, z2d, *outs)
        cross_entropy_bwd_kernel[(rows,)](
            z2d, t1d if not soft else lse, y2d if soft else z2d, lse, sum_y if soft else lse, scale,
            grad if grad is not None else z2d, grad_y if grad_y is not None else z2d, _coefs(z2d, eps, z_loss), n,
            z2d.stride(0), y2d.stride(0) if soft else 0, grad.stride(0) if grad is not None else 0,
            grad_y.stride(0) if grad_y is not None else 0, 1 if scale.numel() > 1 else 0, int(ignore_index),
            SOFT=soft, ZLOSS=z_loss != 0.0, GRAD=grad is not None, GRAD_Y=grad_y is not None, BLOCK=cfg["BLOCK"],
            VEC=cfg["VEC"], ALIGNED=cfg["ALIGNED"], ACC=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return grad, grad_y


def cross_entropy_rows(z2d, t1d, y2d, eps: float, ignore_index: int, z_loss: float, want_entropy: bool,
                       grad, grad_y, scale):
    """Forward, and the gradient when ``grad`` is given (the contract of
    ``ops.cross_entropy.cross_entropy_rows_torch``): ``grad``/``grad_y``: (rows, n) outputs or
    None; ``scale``: 1-element tensor (reduction scale).  Returns per-row (loss, coded lse, entropy
    or None) in the accumulation dtype.  Two launches: ``cross_entropy_fwd`` then
    ``cross_entropy_bwd`` (two reads of the logits, one write of the gradient)."""
    loss, lse, ent, sum_y = cross_entropy_fwd(z2d, t1d, y2d, eps, ignore_index, z_loss, want_entropy)
    if grad is not None or grad_y is not None:
        cross_entropy_bwd(z2d, t1d, y2d, lse, sum_y, scale, eps, ignore_index, z_loss, grad, grad_y)
    return loss, lse, ent
