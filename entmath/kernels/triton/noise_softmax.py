"""Triton kernels for ``entmath.noise_softmax`` (Chapter 4): one program per row.

The row's K quadrature nodes are held as one [KP] vector (KP = K rounded up to a power of two;
the padding nodes have weight 0), and the row is read in BLOCK-wide chunks, so every pass over
the row works on [KP, BLOCK] tiles x_kj = t_k - mu_j: the cost is O(nK) per pass.

Forward:  a safeguarded Newton iteration puts the nodes at F(t_k) = u_k (each step is one pass
that sums -log Phi(x_kj) and, by an online log-sum-exp, log S_k = log sum_j r(x_kj)); a last pass
writes p_j = sum_k omega_k exp(log r(x_kj) - log S_k).  Backward: one pass for the per-node
reductions G1, G2, A of the implicit-function-theorem gradient, one pass to write it.

Triton has no log Phi for the normal: we evaluate erfcx(z) = exp(z^2) erfc(z), z >= 0, with a
Chebyshev series of (1 + 2z) erfcx(z) in y = (z - 3.75) / (z + 3.75) (the form of Shepherd and
Laframboise, 1981).  The degree-24 truncation (Chebyshev interpolation in mpmath at 50 digits,
converted to monomial form in mpmath) has relative error < 5e-18 (tests/test_noise_softmax.py
checks log Phi, log r and d log r/dx of the kernel against mpmath); in monomial
form the coefficients sum to 1.8 in absolute value, so Horner's rule loses only a few ulp.  Then
log Phi and log r = log phi - log Phi need no exp(-x^2/2) / exp(-x^2/2) cancellation:
x < 0: log Phi = -x^2/2 + log(erfcx/2), log r = log sqrt(2/pi) - log erfcx;  x >= 0:
log Phi = log1p(-exp(-x^2/2) erfcx / 2).  The Cauchy CDF needs atan, also absent: a degree-9
polynomial in s^2 on [0, tan(pi/12)] after the reduction atan(s) = pi/6 + atan((s sqrt3 - 1)/(s + sqrt3)).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .softmax_stats import log1p

# Family codes: constexpr so that jit functions may read them (and branch at compile time).
NORMAL, LOGISTIC, CAUCHY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FAMILY_ID = {"normal": 0, "logistic": 1, "cauchy": 2}
TILE = 4096  # elements of one [KP, BLOCK] tile
_PI = tl.constexpr(3.141592653589793)
_LOG_PI = tl.constexpr(1.1447298858494002)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_LOG_SQRT_2PI = tl.constexpr(0.9189385332046727)
_HALF_LOG_2_OVER_PI = tl.constexpr(-0.22579135264472744)
_SQRT3 = tl.constexpr(1.7320508075688772)
_TAN_PI_12 = tl.constexpr(0.2679491924311227)


@triton.jit
def erfcx_pos(z):
    """exp(z^2) erfc(z) for z >= 0 (finite)."""
    y = (z - 3.75) / (z + 3.75)
    p = 4.2514714447963898e-10
    p = p * y + 3.1114333809799252e-10
    p = p * y - 5.1739902140113096e-9
    p = p * y - 3.7442100809620186e-9
    p = p * y + 3.8675334242222357e-8
    p = p * y + 2.3263508708859124e-8
    p = p * y - 2.5866850716155885e-7
    p = p * y - 5.7218230603224088e-8
    p = p * y + 1.7516376488490621e-6
    p = p * y - 9.7355989673677493e-7
    p = p * y - 1.1444146237700523e-5
    p = p * y + 2.238423915508223e-5
    p = p * y + 5.1649098892682403e-5
    p = p * y - 2.9015408054084171e-4
    p = p * y + 2.9371366559134482e-4
    p = p * y + 1.7556258528952954e-3
    p = p * y - 9.7465795580292755e-3
    p = p * y + 2.8362277418956404e-2
    p = p * y - 5.8693398589636774e-2
    p = p * y + 9.2304321160377478e-2
    p = p * y - 1.0880393014174886e-1
    p = p * y + 8.2276738490145208e-2
    p = p * y + 3.5854154854644294e-3
    p = p * y - 1.4024059858554696e-1
    p = p * y + 1.2375126308378276
    return p / (1.0 + 2.0 * z)


@triton.jit
def atan_unit(s):
    """atan(s) for 0 <= s <= 1."""
    big = s > _TAN_PI_12
    v = tl.where(big, (s * _SQRT3 - 1.0) / (s + _SQRT3), s)
    w = v * v
    q = -0.038356423529657398
    q = q * w + 0.056779120848698237
    q = q * w - 0.066499383368271782
    q = q * w + 0.076914699007263421
    q = q * w - 0.090908829562115287
    q = q * w + 0.11111110612993444
    q = q * w - 0.14285714280248971
    q = q * w + 0.19999999999969503
    q = q * w - 0.33333333333333267
    q = q * w + 1.0
    return tl.where(big, _PI / 6 + v * q, v * q)


@triton.jit
def family(x, FAMILY: tl.constexpr):
    """(log Phi(x), log r(x)) of the standard noise family; x = +inf gives (0, -inf) exactly."""
    if FAMILY == NORMAL:
        xc = tl.minimum(tl.abs(x), 1e4)  # beyond 1e4 the tail is 0 anyway; keeps erfcx's y finite
        half_sq = 0.5 * xc * xc  # x^2/2 with one rounding (not (|x|/sqrt 2)^2 with three)
        e = erfcx_pos(xc * _SQRT_HALF)
        log_left = tl.log(0.5 * e) - half_sq
        log_right = log1p(-0.5 * tl.exp(-half_sq) * e)
        log_cdf = tl.where(x < 0, log_left, log_right)
        log_rh = tl.where(x < 0, _HALF_LOG_2_OVER_PI - tl.log(e), -0.5 * x * x - _LOG_SQRT_2PI - log_right)
    elif FAMILY == LOGISTIC:
        # log sigmoid(+-x) = -(max(-+x, 0) + log1p(e^{-|x|})): no cancellation on either side.
        tail = log1p(tl.exp(-tl.abs(x)))
        log_cdf = -(tl.maximum(-x, 0.0) + tail)
        log_rh = -(tl.maximum(x, 0.0) + tail)  # r = phi / Phi = 1 - sigmoid(x) = sigmoid(-x)
    else:
        ax = tl.abs(x)
        big = ax > 1.0
        s = tl.where(big, 1.0 / ax, ax)
        at = atan_unit(s)
        q = tl.where(big, at, _PI / 2 - at) / _PI  # atan(1/|x|) / pi: the smaller tail
        log_cdf = tl.where(x < 0, tl.log(q), log1p(-q))
        log1p_sq = tl.where(big, 2.0 * tl.log(ax) + log1p(s * s), log1p(x * x))
        log_rh = -_LOG_PI - log1p_sq - log_cdf
    return log_cdf, log_rh


@triton.jit
def dlog_rh(x, log_cdf, r, FAMILY: tl.constexpr):
    """c = d log r / dx (finite where r > 0)."""
    if FAMILY == NORMAL:
        c = -x - r
    elif FAMILY == LOGISTIC:
        c = -tl.exp(log_cdf)  # -sigmoid(x)
    else:
        ax = tl.abs(x)
        c = -2.0 * x / (1.0 + x * x) - r
        c = tl.where(ax > 1.0, -2.0 / (x + 1.0 / x) - r, c)  # 2x/(1+x^2) without overflow
    return c


@triton.jit
def node_sums(z_row, n_cols, t, FAMILY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """-log F(t_k) and log S(t_k) for every node: one pass over the row."""
    cols = tl.arange(0, BLOCK)
    y = tl.zeros_like(t)
    m = tl.full(t.shape, float("-inf"), ACC)
    s = tl.zeros_like(t)
    for start in range(0, n_cols, BLOCK):
        # Padding loads -inf: x = +inf, which adds 0 to -log F and r = 0 to S, like a -inf logit.
        mu = tl.load(z_row + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(ACC)
        x = t[:, None] - mu[None, :]
        log_cdf, log_rh = family(x, FAMILY)
        y -= tl.sum(log_cdf, axis=1)
        # online log-sum-exp over the chunks (the row max of log r is not known in advance)
        m_new = tl.maximum(m, tl.max(log_rh, axis=1))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(log_rh - m_ref[:, None]), axis=1)
        m = m_new
    return y, m + tl.log(s)


@triton.jit
def noise_softmax_fwd_kernel(z_ptr, p_ptr, t_ptr, ls_ptr, m_ptr, y_ptr, w_ptr, xlo_ptr, xhi_ptr,
                             n_cols, stride_z, stride_p, K, max_iter, n_free, tol_step, tol_stall,
                             FAMILY: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    kk = tl.arange(0, KP)
    on = kk < K  # padding nodes: y = 1, bracket [m, m], weight 0
    y = tl.load(y_ptr + kk, mask=on, other=1.0).to(ACC)
    m = tl.load(m_ptr + row).to(ACC)
    lo = m + tl.load(xlo_ptr + kk, mask=on, other=0.0).to(ACC)
    hi = m + tl.load(xhi_ptr + kk, mask=on, other=0.0).to(ACC)
    t = hi
    prev = tl.full([KP], float("inf"), ACC)
    dx_old = hi - lo
    log_s = tl.zeros([KP], ACC)
    it = 0
    go = it < max_iter
    # Safeguarded Newton on log(-log F(t)) = log y, all nodes at once.  The loop runs until every
    # node has converged (a uniform, per-row scalar condition), as the torch path does.
    while go:
        y_cur, log_s = node_sums(z_row, n_cols, t, FAMILY, BLOCK, ACC)
        right = y_cur <= y
        hi = tl.where(right, t, hi)
        lo = tl.where(right, lo, t)
        step = (tl.log(y_cur) - tl.log(y)) * y_cur * tl.exp(-log_s)
        # bisect when Newton leaves the bracket (or is NaN), or cycles (see ops.noise_softmax)
        shrinks = (it < n_free) | (tl.abs(step) <= 0.5 * dx_old) | (tl.abs(step) <= tol_stall * (1.0 + tl.abs(t)))
        ok = (t + step >= lo) & (t + step <= hi) & shrinks
        t_new = tl.where(ok, t + step, 0.5 * (lo + hi))
        dx_old = tl.abs(t_new - t)
        rel = dx_old / (1.0 + tl.abs(t))
        # converged: a rounding-level step, or a small step that no longer halves (Newton is
        # quadratic, so that is rounding noise in the sum -log F); padding nodes are done.
        done = (rel <= tol_step) | ((rel <= tol_stall) & (rel >= 0.5 * prev)) | (kk >= K)
        it += 1
        go = (tl.sum((~done).to(tl.int32), axis=0) > 0) & (it < max_iter)
        t = tl.where(go, t_new, t)  # on exit keep the t at which log S was evaluated
        prev = rel
    tl.store(t_ptr + row * KP + kk, t)
    tl.store(ls_ptr + row * KP + kk, log_s)
    w = tl.load(w_ptr + kk, mask=on, other=0.0).to(ACC)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        mu = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        _, log_rh = family(t[:, None] - mu[None, :], FAMILY)
        wt = tl.where(on[:, None], w[:, None] * tl.exp(log_rh - log_s[:, None]), 0.0)
        tl.store(p_ptr + row * stride_p + start + cols, tl.sum(wt, axis=0).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def noise_softmax_bwd_kernel(z_ptr, g_ptr, gz_ptr, t_ptr, ls_ptr, w_ptr, n_cols, stride_z, stride_g,
                             stride_gz, K, FAMILY: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                             ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
    on = kk < K
    t = tl.load(t_ptr + row * KP + kk)
    log_s = tl.load(ls_ptr + row * KP + kk)
    w = tl.load(w_ptr + kk, mask=on, other=0.0).to(ACC)
    cols = tl.arange(0, BLOCK)
    g1 = tl.zeros([KP], ACC)
    g2 = tl.zeros([KP], ACC)
    big_a = tl.zeros([KP], ACC)
    # Pass 1: per node, G1 = sum g w, G2 = sum g a, A = sum a with a = w d(log r)/dx.
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        mu = tl.load(z_ptr + row * stride_z + start + cols, mask=mask, other=float("-inf")).to(ACC)
        g = tl.load(g_ptr + row * stride_g + start + cols, mask=mask, other=0.0).to(ACC)
        x = t[:, None] - mu[None, :]
        log_cdf, log_rh = family(x, FAMILY)
        wj = tl.exp(log_rh - log_s[:, None])
        a = tl.where(wj > 0, wj * dlog_rh(x, log_cdf, tl.exp(log_rh), FAMILY), 0.0)  # 0, not 0 * inf
        g1 += tl.sum(g[None, :] * wj, axis=1)
        g2 += tl.sum(g[None, :] * a, axis=1)
        big_a += tl.sum(a, axis=1)
    # Pass 2: dL/dmu_j = sum_k omega_k [a_kj (G1_k - g_j) + w_kj (G2_k - A_k G1_k)].
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        mu = tl.load(z_ptr + row * stride_z + start + cols, mask=mask, other=float("-inf")).to(ACC)
        g = tl.load(g_ptr + row * stride_g + start + cols, mask=mask, other=0.0).to(ACC)
        x = t[:, None] - mu[None, :]
        log_cdf, log_rh = family(x, FAMILY)
        wj = tl.exp(log_rh - log_s[:, None])
        a = tl.where(wj > 0, wj * dlog_rh(x, log_cdf, tl.exp(log_rh), FAMILY), 0.0)
        term = a * (g1[:, None] - g[None, :]) + wj * (g2 - big_a * g1)[:, None]
        gz = tl.sum(tl.where(on[:, None], w[:, None] * term, 0.0), axis=0)
        tl.store(gz_ptr + row * stride_gz + start + cols, gz.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def family_values_kernel(x_ptr, out_ptr, n, FAMILY: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise (log Phi, log r, d log r/dx), for testing the helpers against torch."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    log_cdf, log_rh = family(x, FAMILY)
    tl.store(out_ptr + i, log_cdf, mask=mask)
    tl.store(out_ptr + n + i, log_rh, mask=mask)
    tl.store(out_ptr + 2 * n + i, dlog_rh(x, log_cdf, tl.exp(log_rh), FAMILY), mask=mask)


def _shape(n: int, K: int):
    kp = triton.next_power_of_2(K)
    block = max(1, min(triton.next_power_of_2(n), TILE // kp))
    return kp, block


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def noise_softmax_fwd(z2d, m, y, w, x_lo, x_hi, noise: str, max_iter: int, n_free: int, tol_step: float,
                      tol_stall: float):
    """z2d: (rows, n) fp32/fp64 with unit column stride; m: row maxima; (y, w, x_lo, x_hi): the K
    nodes (see ``ops.noise_softmax.node_brackets``).  Returns p (rows, n) and the nodes t and
    log S, (rows, KP) with KP = K rounded up to a power of two (what the backward takes)."""
    rows, n = z2d.shape
    K = y.numel()
    kp, block = _shape(n, K)
    p = torch.empty_like(z2d)
    t = torch.empty(rows, kp, dtype=z2d.dtype, device=z2d.device)
    log_s = torch.empty_like(t)
    if rows:
        wrap_triton(noise_softmax_fwd_kernel)[(rows,)](
            z2d, p, t, log_s, m.contiguous(), y, w, x_lo, x_hi, n, z2d.stride(0), p.stride(0), K, max_iter,
            n_free, tol_step, tol_stall, FAMILY=FAMILY_ID[noise], KP=kp, BLOCK=block, ACC=_acc(z2d.dtype), num_warps=4)
    return p, t, log_s


def noise_softmax_bwd(z2d, g2d, t, log_s, w, noise: str):
    """The gradient for mu given dL/dp (g2d) and the forward's padded nodes t, log S (rows, KP)."""
    rows, n = z2d.shape
    K = w.numel()
    kp, block = _shape(n, K)
    gz = torch.empty_like(z2d)
    if rows:
        wrap_triton(noise_softmax_bwd_kernel)[(rows,)](
            z2d, g2d, gz, t, log_s, w, n, z2d.stride(0), g2d.stride(0), gz.stride(0), K,
            FAMILY=FAMILY_ID[noise], KP=kp, BLOCK=block, ACC=_acc(z2d.dtype), num_warps=4)
    return gz


def family_values(x: torch.Tensor, noise: str) -> torch.Tensor:
    """(3, n): log Phi(x), log r(x), d log r/dx computed by the kernel helpers (for the tests)."""
    x = x.contiguous().view(-1)
    out = torch.empty(3, x.numel(), dtype=x.dtype, device=x.device)
    block = 1024
    wrap_triton(family_values_kernel)[(triton.cdiv(x.numel(), block),)](x, out.view(-1), x.numel(), FAMILY=FAMILY_ID[noise],
                                                            BLOCK=block)
    return out
