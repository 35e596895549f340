"""Online per-row softmax statistics: the building block of every forward kernel.

For a row z the kernels keep, relative to the running maximum m,

    c = #{i : z_i = m}                      (how many logits sit at the maximum)
    T = sum_{z_i < m} exp(z_i - m)          (mass strictly below the maximum)
    A = sum_{z_i < m} exp(z_i - m)(z_i - m) (first moment of that mass)

so that S = sum_i exp(z_i - m) = c + T, log S = log c + log1p(T / c) and
H = log S - A / S.  Keeping the maximal entries out of T is what makes log S accurate when the
row is nearly one-hot (T << 1): a plain sum would round 1 + T to 1 and lose the entropy.
Terms more than 64 below the maximum are formed as e^{d + 64} d e^{-64} (``exp_tail``), so that A
keeps the entropy of a row whose whole tail lies where e^d itself underflows.
"""
import triton
import triton.language as tl

# A logit offset below which e^d is 0 in every accumulation dtype (fp64 underflows below -745);
# offsets beyond it are clamped there, so that e^d * d is 0 and never 0 * (-inf).
DEEP = tl.constexpr(-1.0e4)
# The deep tail.  Below d = -87.3 (float32; -708.4 in float64) e^d is subnormal, and below -103.9
# (-745.1) it rounds to 0, while the moment's term e^d d is |d| times larger: at d = -107.8 it is
# 1.6e-45, a float32 subnormal, and it is the whole entropy of a row whose other entries all lie
# that deep (which came out 0).  So below TAIL the kernels take e^d as e s, e = e^{d - TAIL} and
# s = e^{TAIL}, and form e d before the scale s.  d - TAIL is exact (d and 64 are multiples of
# ulp(d) while that is at most 64; beyond, e^d d is 0 anyway), e is a normal number wherever e^d d
# is representable, and offsets above TAIL keep s = 1 (the same bits as a plain e^d).
TAIL = tl.constexpr(-64.0)
E_TAIL = tl.constexpr(1.603810890548637853e-28)  # e^-64 (correctly rounded in each dtype by tl.full)


@triton.jit
def load_row_chunk(ptr, cols, n_cols, ACC: tl.constexpr):
    """Load one chunk of a row in the accumulation dtype; padding and NaN are returned as -inf,
    NaN-ness separately (so it can be propagated explicitly: tl.max need not propagate NaN)."""
    x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
    is_nan = x != x
    return tl.where(is_nan, float("-inf"), x), tl.sum(is_nan.to(tl.int32), axis=0)


@triton.jit
def drop_nan(x):
    """(x with NaN replaced by -inf, the number of NaNs): NaN-ness is counted apart and propagated
    explicitly, since tl.max need not propagate NaN."""
    is_nan = x != x
    return tl.where(is_nan, float("-inf"), x), tl.sum(is_nan.to(tl.int32), axis=0)


@triton.jit
def exp_tail(d):
    """(e, s) with e^d = e s, d <= 0: s = 1 above TAIL, e^{TAIL} below it, where e = e^{d - TAIL}
    stays normal so that e d s keeps a product e^d d that is representable when e^d is not."""
    deep = d < TAIL
    s = tl.where(deep, tl.full([], E_TAIL, d.dtype), tl.full([], 1.0, d.dtype))
    return tl.exp(tl.where(deep, d - TAIL, d)), s


@triton.jit
def update_stats(m, c, T, A, x, AXIS: tl.constexpr = 0):
    """Fold one chunk ``x`` into the running (m, c, T, A), reducing over ``AXIS``.

    Row kernels pass a 1-D chunk of one row (scalar statistics, AXIS = 0); the attention kernel
    passes a (queries, keys) tile and per-query statistics (vectors, AXIS = 1)."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    grow = m_new > m
    # m_new is -inf only while every logit so far is -inf; subtracting 0 then avoids -inf - -inf.
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    # Rescale the old statistics to the new maximum: old maxima become "below" mass.
    old_mass = T + c
    # delta = m - m_new <= 0 is -inf while the row has had no finite logit (then old_mass = 0),
    # and overflows to -inf when the maximum jumps by more than the dtype's max: clamped at
    # DEEP, where e^delta is already 0, so that e^delta * delta * old_mass is 0, not 0 * (-inf).
    # alpha s = e^delta, split at the deep tail (TAIL): the old mass's moment e^delta delta
    # old_mass survives a jump of the maximum so large that e^delta alone rounds to 0.
    delta = tl.maximum(tl.where(grow & (old_mass > 0), m - m_ref, 0.0), DEEP)
    alpha, s = exp_tail(delta)
    T = tl.where(grow, alpha * old_mass * s, T)
    A = tl.where(grow, alpha * (A + delta * old_mass) * s, A)
    c = tl.where(grow, 0.0, c)
    # This chunk's contributions.  -inf logits (and padding) and the maxima get d = DEEP, hence
    # e = 0, so they add exactly nothing to T and A: never 0 * (-inf) = NaN.  A finite logit more
    # than the dtype's max below the maximum ([M, -M] spans 2M) overflows x - m to -inf: clamped
    # at DEEP as well.
    m_x = tl.expand_dims(m_new, AXIS) if AXIS == 1 else m_new
    d = x - (tl.expand_dims(m_ref, AXIS) if AXIS == 1 else m_ref)
    at_max = (x == m_x) & (x > float("-inf"))
    below = (x < m_x) & (x > float("-inf"))
    d = tl.where(below, tl.maximum(d, DEEP), DEEP)
    e, s = exp_tail(d)  # e^d = e s, with e d s representable whenever e^d d is (see TAIL)
    c += tl.sum(at_max.to(c.dtype), axis=AXIS)
    T += tl.sum(e * s, axis=AXIS)
    A += tl.sum(e * d * s, axis=AXIS)
    return m_new, c, T, A


@triton.jit
def log1p(x):
    # log1p without cancellation: with u = fl(1 + x), log(u) * x / (u - 1) is accurate to a few
    # ulp (Goldberg 1991, "What every computer scientist should know about floating point").
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def log_normaliser(c, T):
    """log S = log(c + T), accurate when T << c."""
    return tl.log(c) + log1p(T / c)


@triton.jit
def coded_lse(m, log_s, n_nan):
    """m + log S, or the code validation reads (``_validate.check_rows_finite``): NaN if the row
    held a NaN, else m itself when m is not finite (+inf: a +inf logit; -inf: no finite logit)."""
    lse = tl.where((m > float("-inf")) & (m < float("inf")), m + log_s, m)
    return tl.where(n_nan > 0, float("nan"), lse)
