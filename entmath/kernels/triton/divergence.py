"""Divergences between two softmaxes, term by term: the pieces shared by the ``kl`` and ``jsd`` kernels.

The line-by-line twin of ``entmath/ops/_divergence.py`` (whose docstring derives the method;
Chapter 1, "KL without cancellation"): both kernels read a row pair twice, first folding a and b
into the online statistics of ``softmax_stats`` (``pair_stats``), then, from a shift chosen by
``pivot_shift``, evaluating non-negative terms that need each row's final max and
log-normaliser (``pieces``, ``chi``, ``psi``).  Scalars
are carried in the accumulation dtype; constants that are not exact in float32 (the 1/k of the
series) are formed in that dtype, since a Python float in a kernel is a float32 constant.
"""
import triton
import triton.language as tl

from .softmax_stats import load_row_chunk, log1p, log_normaliser, update_stats

SERIES = tl.constexpr(1.0)  # chi and omega use their series for |argument| <= SERIES


@triton.jit
def pair_stats(a_row, b_row, n_cols, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Pass 1 over a row pair: (max, log S, NaN count) of a and of b, and b_k: the largest b where
    a is at its maximum (the pivot of ``pivot_shift``)."""
    cols = tl.arange(0, BLOCK)
    ma = tl.full([], float("-inf"), ACC)
    ca = tl.zeros([], ACC)
    Ta = tl.zeros([], ACC)
    Aa = tl.zeros([], ACC)
    mb = tl.full([], float("-inf"), ACC)
    cb = tl.zeros([], ACC)
    Tb = tl.zeros([], ACC)
    Ab = tl.zeros([], ACC)
    nan_a = tl.zeros([], tl.int32)
    nan_b = tl.zeros([], tl.int32)
    b_k = tl.full([], float("-inf"), ACC)
    for start in range(0, n_cols, BLOCK):
        a, ka = load_row_chunk(a_row + start, cols, n_cols - start, ACC)
        b, kb = load_row_chunk(b_row + start, cols, n_cols - start, ACC)
        nan_a += ka
        nan_b += kb
        ma_old = ma
        ma, ca, Ta, Aa = update_stats(ma, ca, Ta, Aa, a)
        mb, cb, Tb, Ab = update_stats(mb, cb, Tb, Ab, b)
        # b at a's maximum: replaced when the maximum grows, the larger kept on a tie (b_top is
        # -inf where this chunk does not reach the maximum)
        b_top = tl.max(tl.where(a == ma, b, float("-inf")), axis=0)
        b_k = tl.where(ma > ma_old, b_top, tl.maximum(b_k, b_top))
    return ma, log_normaliser(ca, Ta), nan_a, mb, log_normaliser(cb, Tb), nan_b, b_k


@triton.jit
def pivot_shift(b_k, mb, log_sa, log_sb, ACC: tl.constexpr):
    """(shift0, shift) as ``ops/_divergence.pivot_shift``: shift0 = log S_b - log S_a, and the pivot
    D_k = b_k - max b (exact to u |D_k|, of the size of the log-ratios) where it is within 16 u
    (1 + |log S_a| + |log S_b|) of shift0, else shift0 (D_k -inf, NaN or far)."""
    EPS: tl.constexpr = 2.220446049250313e-16 if ACC == tl.float64 else 1.1920928955078125e-07
    shift0 = log_sb - log_sa
    d_k = b_k - mb
    tol = 8.0 * EPS * (1.0 + tl.abs(log_sa) + tl.abs(log_sb))
    return shift0, tl.where(tl.abs(d_k - shift0) <= tol, d_k, shift0)


@triton.jit
def two_sum(x, y):
    """(s, e): s = fl(x + y), s + e = x + y exactly (TwoSum: additions only, nothing to contract)."""
    s = x + y
    t = s - x
    e = (x - (s - t)) + (y - t)
    return s, tl.where(e == e, e, 0.0)  # 0, not NaN, when x or y is infinite


@triton.jit
def pieces(a, b, ma, mb, log_sa, shift):
    """(lp, d_b, y_h) per element: log p, b - max b, and y_h = (d_b - d_a - shift) / 2 formed from
    halved logits with TwoSum (exact to a few ulp of itself; no overflow for spans up to twice
    the max): -inf where b = -inf, +inf where a = -inf, NaN where both are."""
    ha, ea = two_sum(0.5 * a, -0.5 * ma)
    hb, eb = two_sum(0.5 * b, -0.5 * mb)
    y_h = ((hb - ha) + (eb - ea)) - 0.5 * shift
    return 2.0 * ha - log_sa, 2.0 * hb, y_h


@triton.jit
def kl_sums(a_row, b_row, n_cols, ma, mb, log_sa, log_sb, shift, BLOCK: tl.constexpr, ACC: tl.constexpr,
            TERMS: tl.constexpr):
    """A pass over a row pair with y = r + eta: (K, Z, sum p y / 2, q_out, lost), K = sum p chi(y),
    Z = sum p (e^y - 1) and sum p y over p_i > 0, q_out = sum of q where p = 0, lost = the number
    of entries with a finite a and b = -inf (K is +inf then)."""
    cols = tl.arange(0, BLOCK)
    K = tl.zeros([], ACC)
    Z = tl.zeros([], ACC)
    s_yh = tl.zeros([], ACC)
    q_out = tl.zeros([], ACC)
    n_lost = tl.zeros([], tl.int32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        a = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        b = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        lp, d_b, y_h = pieces(a, b, ma, mb, log_sa, shift)
        p = tl.exp(lp)
        in_p = p > 0.0
        # p chi(y) and p (e^y - 1); beyond the series through q' = p e^y, which cannot overflow
        # (2 (lp / 2 + y_h)).
        y = 2.0 * y_h
        c = chi(y, TERMS)
        small = tl.abs(y) <= SERIES
        q_minus_p = tl.exp(2.0 * (0.5 * lp + y_h)) - p
        K += tl.sum(tl.where(in_p, tl.where(small, p * c, q_minus_p - 2.0 * (p * y_h)), 0.0), axis=0)
        Z += tl.sum(tl.where(in_p, tl.where(small, p * (c + y), q_minus_p), 0.0), axis=0)
        s_yh += tl.sum(tl.where(in_p, p * y_h, 0.0), axis=0)
        q_out += tl.sum(tl.where(in_p, 0.0, tl.exp(d_b - log_sb)), axis=0)  # 0 where b = -inf
        # p has mass where q has none: KL = +inf, however small that mass (even if p underflows).
        n_lost += tl.sum(((a > float("-inf")) & (b == float("-inf"))).to(tl.int32), axis=0)
    return K, Z, s_yh, q_out, n_lost


@triton.jit
def chi(y, TERMS: tl.constexpr):
    """e^y - 1 - y: (y^2/2)(1 + y/3 (1 + y/4 (...))) for |y| <= 1, direct beyond."""
    one = tl.full([], 1.0, y.dtype)
    ys = tl.minimum(tl.maximum(y, -SERIES), SERIES)
    s = one
    for i in tl.static_range(TERMS):
        s = 1.0 + ys * s * (one / (TERMS + 2 - i))  # k = TERMS + 2, ..., 3
    return tl.where(tl.abs(y) <= SERIES, 0.5 * ys * ys * s, tl.exp(y) - 1.0 - y)


@triton.jit
def psi(s, TERMS: tl.constexpr):
    """(1 + s) log(1 + s) - s for s >= -1: t^2 + (t - 1) chi(t) with t = log1p(s) for |t| <= 1,
    direct beyond (psi(-1) = 1, not 0 * (-inf))."""
    t = log1p(s)
    small = tl.abs(t) <= SERIES
    tc = tl.where(small, t, 0.0)
    near = tc * tc + (tc - 1.0) * chi(tc, TERMS)
    far = tl.where(s > -1.0, (1.0 + s) * t, 0.0) - s
    return tl.where(small, near, far)
