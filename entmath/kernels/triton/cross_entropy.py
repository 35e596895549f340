"""Triton kernels for ``entmath.cross_entropy``: per-row loss, lse and entropy, and the gradient.

HBM traffic.  Forward: n logits read once (and n targets for probabilities; the n class
weights are shared by all rows and stay in L2), four numbers per row written.  Backward: n
logits (and targets) read once, n gradients (and n target gradients) written; the per-row sums
of the target mass it needs are formed by the launcher (a rows-sized vector for class weights,
one more read of the targets for probabilities).

Forward, one program per row, one read of the row (and of the target row for probabilities):
BLOCK-wide chunks fold into the online statistics of ``softmax_stats`` (max m, count at the max
c, mass below T, moment A) and into what the target needs.  With u_j the smoothed, weighted
target mass (u_j = w_j ((1 - eps) y_j + eps / C) for probabilities, eps w_j / C plus
(1 - eps) w_t at the target class for an index t; w = 1 without class weights):

    loss = sum_j u_j (lse - z_j) = (sum_j u_j) log S + sum_j u_j (m - z_j)

accumulated as U = sum u_j and B = sum u_j (m - z_j) over the finite logits, B relative to the
running max (when m grows by delta, B += delta U): every term is >= 0, so nothing of the size of
lse is subtracted, whatever the offset of the logits.  The differences are halved, m / 2 - z / 2
(exact scaling), and B doubled at the end, so a span beyond the dtype's max overflows only where
the loss does.  A class with u_j != 0 at z_j = -inf makes
the loss +inf; u_j = 0 adds 0.  The target class's own term, (1 - eps) w_t ((m - z_t) + log S),
is added from one more load of z_t.  Entropy: H = log S - A / S.  Besides the coded lse, the
kernel stores its rounding residual (m + log S) - fl(m + log S) (TwoSum), with which the backward
forms log p = (z - lse) - residual accurately.  With SOFTCAP every logit is first replaced by
c tanh(z / c) (after the load, so padding stays -inf).

Backward, one program per row, one read of the row (and of y) and one write of the gradient:

    dL/dz = [g_loss ((sum u) p - u) + g_lse p - g_H p (log p + H)] * sech^2(z / c),

(the last factor only with soft-capping), p = exp((z - lse) - residual), and for probability
targets dL/dy = -g_loss (1 - eps) w log p.  z-loss reaches the kernel as g_lse = 2 z_loss lse
g_loss (it is added outside, from the lse).  The gradient buffer may be the logits themselves
(``inplace_backward``): each program reads a chunk before it writes it.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .rows import row_config
from .softmax_stats import coded_lse, load_row_chunk, log_normaliser, update_stats


@triton.jit
def expm1_neg(x):
    """e^x - 1 for x <= 0, accurate near 0: with u = fl(e^x), (u - 1) x / log u (Kahan)."""
    u = tl.exp(x)
    safe = tl.where((u == 1.0) | (u == 0.0), 0.5, u)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (safe - 1.0) * x / tl.log(safe)))


@triton.jit
def soft_cap(z, cap):
    """c tanh(z / c), with tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): accurate for small |x|,
    1 for large; -inf -> -c."""
    x = z / cap
    em = expm1_neg(-2.0 * tl.abs(x))
    th = -em / (2.0 + em)
    return cap * tl.where(x < 0, -th, th)


@triton.jit
def soft_cap_slope(z, cap):
    """sech^2(z / c) = 4u / (1 + u)^2, u = e^{-2|z|/c}: the derivative of c tanh(z / c)."""
    u = tl.exp(-2.0 * tl.abs(z / cap))
    return 4.0 * u / ((1.0 + u) * (1.0 + u))


@triton.jit
def lse_residual(m, log_s, lse):
    """(m + log S) - lse exactly for lse = fl(m + log S) (TwoSum); 0 where lse is not finite."""
    back = lse - m
    res = (m - (lse - back)) + (log_s - back)
    return tl.where(tl.abs(lse) < float("inf"), res, 0.0)


@triton.jit
def cross_entropy_fwd_kernel(z_ptr, t_ptr, y_ptr, w_ptr, loss_ptr, lse_ptr, res_ptr, ent_ptr, coef_ptr,
                             n_cols, stride_z, stride_y, ignore_index,
                             SOFT: tl.constexpr, SMOOTH: tl.constexpr, WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                             ENTROPY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    # (1 - eps, eps / C, softcap) in the accumulation dtype: scalar arguments would be fp32.
    keep, spread, cap = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 2)
    m = tl.full([], float("-inf"), ACC)
    c = tl.zeros([], ACC)
    T = tl.zeros([], ACC)
    A = tl.zeros([], ACC)
    n_nan = tl.zeros([], tl.int32)
    U = tl.zeros([], ACC)  # sum_j u_j over the finite logits so far
    B = tl.zeros([], ACC)  # sum_j u_j (m - z_j) / 2 over them, m the running max (halved: no overflow)
    lost = tl.zeros([], tl.int32)  # classes with u_j != 0 at z_j = -inf: the loss is +inf
    for start in range(0, n_cols, BLOCK):
        inside = start + cols < n_cols
        x, k = load_row_chunk(z_row + start, cols, n_cols - start, ACC)
        if SOFTCAP:  # (a NaN, read as -inf, becomes -c; its row is coded NaN by n_nan)
            x = tl.where(inside, soft_cap(x, cap), float("-inf"))
        n_nan += k
        m_old = m
        m, c, T, A = update_stats(m, c, T, A, x)
        if SOFT or SMOOTH:
            if SOFT:
                u = keep * tl.load(y_row + start + cols, mask=inside, other=0.0).to(ACC) + spread
            else:
                u = tl.zeros([BLOCK], ACC) + spread
            if WEIGHT:
                u *= tl.load(w_ptr + start + cols, mask=inside, other=0.0)
            u = tl.where(inside, u, 0.0)
            live = x > float("-inf")
            # Move B to the new max: every finite z_j so far is (m - m_old) further below it.  U = 0
            # while no finite logit has mass (m_old = -inf among them): then B stays 0, never inf * 0.
            B = tl.where(U != 0.0, B + (0.5 * m - 0.5 * m_old) * U, B)
            counts = live & (u != 0.0)  # u_j = 0 adds exactly 0
            B += tl.sum(tl.where(counts, u * (0.5 * m - 0.5 * x), 0.0), axis=0)
            U += tl.sum(tl.where(counts, u, 0.0), axis=0)
            lost += tl.sum(((u != 0.0) & ~live).to(tl.int32), axis=0)
    log_s = log_normaliser(c, T)
    lse = m + log_s
    valid = True
    loss = tl.zeros([], ACC)
    if SOFT or SMOOTH:
        loss = U * log_s + 2.0 * B + tl.where(lost > 0, float("inf"), 0.0)
    if not SOFT:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < n_cols)  # out of range only with validation off: NaN, no stray read
        t_safe = tl.where(valid & in_range, t, 0)
        z_t = tl.load(z_row + t_safe).to(ACC)
        if SOFTCAP:
            z_t = soft_cap(z_t, cap)
        coef_t = keep
        if WEIGHT:
            coef_t = keep * tl.load(w_ptr + t_safe)
        # (m - z_t) + log S is lse - z_t without cancellation (m - z_t halved: no overflow below a
        # loss of max); a weight of 0 gives 0 even at z_t = -inf.
        loss += tl.where(coef_t != 0.0, 2.0 * (coef_t * (0.5 * m - 0.5 * z_t)) + coef_t * log_s, 0.0)
        loss = tl.where(in_range | ~valid, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    lse_c = coded_lse(m, log_s, n_nan)
    tl.store(lse_ptr + row, lse_c)
    tl.store(res_ptr + row, lse_residual(m, log_s, lse_c))
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_s - A / (c + T), 0.0))


@triton.jit
def cross_entropy_bwd_kernel(z_ptr, t_ptr, y_ptr, w_ptr, lse_ptr, res_ptr, ent_ptr, gl_ptr, glse_ptr, ge_ptr,
                             sum_u_ptr, coef_ptr, grad_ptr, grad_y_ptr, n_cols, stride_z, stride_y, stride_g,
                             stride_gy, ignore_index,
                             SOFT: tl.constexpr, WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, GLSE: tl.constexpr,
                             ENTROPY: tl.constexpr, GRAD_Y: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    keep, spread, cap = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 2)
    lse = tl.load(lse_ptr + row)
    lse = tl.where(tl.abs(lse) < float("inf"), lse, float("nan"))  # a bad row: NaN everywhere, as in torch
    res = tl.load(res_ptr + row)
    gl = tl.load(gl_ptr + row).to(ACC)
    if SOFT:
        valid = True
        bad = False
        t = -1
        coef_t = 0.0
        sum_u = tl.load(sum_u_ptr + row)  # sum_j u_j
    else:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n_cols))  # only with validation off: a NaN row
        coef_t = keep
        sum_u = 1.0  # (1 - eps) + C (eps / C)
        if WEIGHT:
            coef_t = keep * tl.load(w_ptr + tl.where(valid & ~bad, t, 0))
            sum_u = tl.load(sum_u_ptr + row)
    coef = gl * sum_u
    if GLSE:
        coef += tl.load(glse_ptr + row).to(ACC)
    if ENTROPY:
        ge = tl.load(ge_ptr + row).to(ACC)
        h = tl.load(ent_ptr + row)
    for start in range(0, n_cols, BLOCK):
        inside = start + cols < n_cols
        z_in = tl.load(z_row + start + cols, mask=inside, other=float("-inf")).to(ACC)
        z = z_in
        if SOFTCAP:
            z = tl.where(inside, soft_cap(z_in, cap), float("-inf"))
        live = z > float("-inf")
        log_p = (z - lse) - res  # z - fl(lse) is exact near the max; the residual restores log S
        p = tl.where(live, tl.exp(log_p), 0.0)
        if SOFT:
            u = keep * tl.load(y_row + start + cols, mask=inside, other=0.0).to(ACC) + spread
        else:
            u = tl.zeros([BLOCK], ACC) + spread
        if WEIGHT:
            u *= tl.load(w_ptr + start + cols, mask=inside, other=0.0)
        if not SOFT:
            u += tl.where(start + cols == t, coef_t, 0.0)
        g = coef * p - gl * u
        if ENTROPY:
            g -= ge * p * (tl.where(live, log_p, 0.0) + h)
        if SOFTCAP:
            g *= soft_cap_slope(z_in, cap)
        # Ignored rows get exactly 0 (they may be all -inf, with lse = NaN: select, don't multiply).
        g = tl.where(bad, float("nan"), tl.where(valid, g, 0.0))
        tl.store(grad_ptr + row * stride_g + start + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
        if GRAD_Y:
            gy = -gl * keep * log_p
            if WEIGHT:
                gy *= tl.load(w_ptr + start + cols, mask=inside, other=0.0)
            tl.store(grad_y_ptr + row * stride_gy + start + cols, gy.to(grad_y_ptr.dtype.element_ty), mask=inside)


def _coef(z2d, eps, softcap):
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    return torch.tensor([1.0 - eps, eps / z2d.shape[1], softcap or 1.0], dtype=acc, device=z2d.device)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def cross_entropy_fwd(z2d, t1d, y2d, w, eps: float, ignore_index: int, softcap: float, want_entropy: bool):
    """Per-row (loss, coded lse, lse residual, entropy) of (rows, n) logits, in the accumulation
    dtype.  Exactly one of t1d (rows,) int64 / y2d (rows, n) is given; w: (n,) class weights in
    the accumulation dtype, or None; softcap: c, or 0 for none; the entropy is empty unless
    wanted.  The loss is the weighted cross-entropy without z-loss."""
    rows, n = z2d.shape
    acc = torch.float64 if z2d.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, device=z2d.device, dtype=acc)
    lse = torch.empty_like(loss)
    res = torch.empty_like(loss)
    ent = torch.empty(rows if want_entropy else 0, device=z2d.device, dtype=acc)
    if rows:
        soft = y2d is not None
        # BLOCK, warps and the register budget: the forward carries more per-row state than the
        # other row kernels (target sums, entropy moment); at two programs per SM (64 registers)
        # ptxas spilled 8-16 B with smoothing and the entropy, so one program per SM (128).
        cfg = row_config(n, z2d, ctas_per_sm=1)
        wrap_triton(cross_entropy_fwd_kernel)[(rows,)](
            z2d, t1d if not soft else loss, y2d if soft else z2d, w if w is not None else loss, loss, lse, res,
            ent if want_entropy else loss, _coef(z2d, eps, softcap), n, z2d.stride(0), y2d.stride(0) if soft else 0,
            int(ignore_index), SOFT=soft, SMOOTH=(eps > 0 and not soft), WEIGHT=w is not None,
            SOFTCAP=bool(softcap), ENTROPY=want_entropy, BLOCK=cfg["BLOCK"], ACC=_acc(z2d.dtype),
            num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return loss, lse, res, ent


def cross_entropy_bwd(z2d, t1d, y2d, w, lse, res, ent, g_loss, g_lse, g_ent, sum_u, eps: float, ignore_index: int,
                      softcap: float, grad, grad_y):
    """Write dL/dz into ``grad`` (rows, n; may be z2d itself) and, if given, dL/dy into ``grad_y``.
    ``g_loss`` (rows,) and ``g_lse``/``g_ent`` (rows,) or None: incoming gradients; ``sum_u``:
    (rows,) sums of the smoothed, weighted target mass (None for unweighted class targets)."""
    rows, n = z2d.shape
    if rows:
        soft = y2d is not None
        cfg = row_config(n, z2d)
        wrap_triton(cross_entropy_bwd_kernel)[(rows,)](
            z2d, t1d if not soft else lse, y2d if soft else z2d, w if w is not None else lse, lse, res,
            ent if g_ent is not None else lse, g_loss, g_lse if g_lse is not None else g_loss,
            g_ent if g_ent is not None else g_loss, sum_u if sum_u is not None else lse, _coef(z2d, eps, softcap),
            grad, grad_y if grad_y is not None else grad, n, z2d.stride(0), y2d.stride(0) if soft else 0,
            grad.stride(0), grad_y.stride(0) if grad_y is not None else 0, int(ignore_index),
            SOFT=soft, WEIGHT=w is not None, SOFTCAP=bool(softcap), GLSE=g_lse is not None, ENTROPY=g_ent is not None,
            GRAD_Y=grad_y is not None, BLOCK=cfg["BLOCK"], ACC=_acc(z2d.dtype), num_warps=cfg["num_warps"],
            maxnreg=cfg["maxnreg"])
