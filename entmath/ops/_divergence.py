"""Divergences between two softmaxes, term by term: the torch twin of ``kernels/triton/divergence.py``.

``kl`` and ``jsd`` share one way of comparing p = softmax(a) with q = softmax(b) (Chapter 1,
"Divergences without cancellation").  With each row's own maximum and normaliser,

    log p_i = d_a,i - log S_a,   log q_i = d_b,i - log S_b,   d = z - max z,

the log-ratio is  r_i = log q_i - log p_i = (d_b,i - d_a,i) - (log S_b - log S_a).  No term is of
the size of the logits: d_b - d_a is formed with error-free transforms (TwoSum) on halved logits,
so it is exact to a few ulp of itself (rows that differ by eps give r of size eps, accurate to
eps u, not to u |z|), whatever the offset, and spans up to twice the dtype's max do not
overflow.  The shift log S_b - log S_a carries a rounding error eta (of order u log n), so the
per-element y = r + eta; since sum_i p_i e^{r_i} = sum_{p_i > 0} q_i exactly, eta is measured by

    Z = sum_{p_i > 0} p_i (e^{y_i} - 1) = e^eta (1 - q_out) - 1,   q_out = sum_{p_i = 0} q_i,

to within u (|eta| + sum_i p_i |r_i|): ``kl`` takes its effect out exactly, ``jsd`` re-evaluates
with it.  That error is u |eta| ~ u^2 log n even when p = q to far better than u: y_i = r_i + eta
rounds away every |r_i| < u |eta|, and a divergence of size r^2 (rows whose logits differ by
1e-80, say) would come out as 0, or as eta^2 ~ 1e-32, or wrong by a factor.  So the first shift is
taken from the data where it is as good as log S_b - log S_a: at k, the first maximum of a
(d_a,k = 0, p_k = max p >= 1/n), the pivot D_k = d_b,k = r_k + (log S_b - log S_a) is the shift up
to r_k, and |r_k| <= max |r|; it is used where it agrees with log S_b - log S_a to within that
one's rounding (``pivot_shift``), so its error is of the size of the r it must resolve.

The divergences are then sums of non-negative terms, built on

    chi(y) = e^y - 1 - y >= 0,   psi(s) = (1 + s) log(1 + s) - s >= 0,

each evaluated without cancellation (a series for small arguments).  ``pieces`` gives the
per-element quantities every stage starts from; ``kl_rows`` and ``jsd_rows`` sum them per row.
Each stage is elementwise followed by row sums, done in cache-sized blocks in eager mode.
"""
from __future__ import annotations

import torch

SERIES = 1.0  # chi and psi use their series for |argument| <= SERIES
CHUNK = 1 << 15  # elements per block of the per-element pass in eager mode (temporaries stay in cache)


def series_terms(dtype: torch.dtype) -> int:
    """Terms of the chi series for |y| <= 1: the remainder 2 / (terms + 3)! is below the unit
    roundoff (float64: 19! > 1.2e17; float32: 12! > 4.8e8)."""
    return 16 if dtype == torch.float64 else 9


def two_sum(x: torch.Tensor, y: torch.Tensor):
    """(s, e) with s = fl(x + y) and s + e = x + y exactly (Knuth's TwoSum; additions only, so
    nothing can be contracted into an FMA)."""
    s = x + y
    t = s - x
    # (x - (s - t)) + (y - t); 0 when x or y is infinite (NaN there otherwise)
    return s, (x - (s - t)).add_(t.neg_().add_(y)).nan_to_num_(0.0, 0.0, 0.0)


def chi(y: torch.Tensor):
    """(e^y - 1 - y, |y| <= 1): the series (y^2/2)(1 + y/3 (1 + y/4 (...))) where the direct form
    cancels, direct beyond; accurate to a few ulp for every y (+inf at y = +-inf)."""
    small = y.abs() <= SERIES
    ys = y.clamp(-SERIES, SERIES)
    s = torch.ones_like(ys)
    for k in range(series_terms(y.dtype) + 2, 2, -1):
        s.mul_(ys).mul_(1.0 / k).add_(1.0)
    s.mul_(ys).mul_(ys).mul_(0.5)
    return torch.where(small, s, torch.expm1(y).sub_(y)), small


def psi(s: torch.Tensor) -> torch.Tensor:
    """(1 + s) log(1 + s) - s for s >= -1 (psi(-1) = 1), accurate to a few ulp.  With t = log1p(s)
    it is 1 - e^t (1 - t) = t^2 + (t - 1) chi(t), which has no cancellation beyond a factor 4 for
    |t| <= 1; direct beyond."""
    t = torch.log1p(s)
    c, small = chi(t)
    near = c.mul_(t - 1.0).add_(t * t)
    far = torch.where(s > -1.0, (1.0 + s) * t, 0.0).sub_(s)
    return torch.where(small, near, far)


def pieces(a, b, ma, mb, log_sa, shift):
    """Per-element (lp, d_b, y_h, live_a, live_b) of two rows of logits (classes last) given their
    maxima (keepdim), a's log-normaliser and the shift log S_b - log S_a: lp = log p (-inf off p's
    support), d_b = b - max b, and y_h = (d_b - d_a - shift) / 2, compensated (see the module
    docstring): -inf where b = -inf, +inf where a = -inf, NaN where both are."""
    ha, ea = two_sum(0.5 * a, -0.5 * ma)
    hb, eb = two_sum(0.5 * b, -0.5 * mb)
    y_h = (hb - ha).add_(eb - ea).sub_(0.5 * shift)
    return ha.mul_(2.0).sub_(log_sa), hb.mul_(2.0), y_h, a > float("-inf"), b > float("-inf")


def pivot_shift(a, b, ma, mb, log_sa, log_sb):
    """(shift0, shift), keepdim: shift0 = log S_b - log S_a (rounding eta ~ u log n), and the shift
    to start from: the pivot D_k = max{b_k : a_k = max a} - max b where it is within 16 u (1 + |log
    S_a| + |log S_b|) of shift0 (then its error -r_k is at most of that size and of the size of
    the log-ratios themselves), else shift0 (the pivot may be -inf, NaN, or far: p and q differ by
    more than rounding there, and u |eta| is negligible against the divergence)."""
    shift0 = log_sb - log_sa
    d_k = torch.where(a == ma, b, float("-inf")).amax(-1, keepdim=True) - mb
    tol = 8.0 * torch.finfo(a.dtype).eps * (1.0 + log_sa.abs() + log_sb.abs())
    return shift0, torch.where((d_k - shift0).abs() <= tol, d_k, shift0)


def blockwise(fn, a, b, *per_row):
    """Row sums ``fn(a, b, *per_row)`` (a (k, rows) tensor) of an elementwise stage, computed in
    blocks small enough that its temporaries stay in cache in eager mode (a stage makes ~50
    elementwise sweeps); in one block while compiling or under torch.func, which trace it."""
    rows, n = a.shape
    if (rows * n <= CHUNK or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return fn(a, b, *per_row)
    width = min(n, CHUNK)
    height = max(1, CHUNK // width)
    out = []
    for r in range(0, rows, height):
        rs = slice(r, r + height)
        parts = [fn(a[rs, c:c + width], b[rs, c:c + width], *(t[rs] for t in per_row)) for c in range(0, n, width)]
        out.append(torch.stack(parts).sum(0) if len(parts) > 1 else parts[0])
    return torch.cat(out, dim=1)


def kl_sums(a, b, ma, mb, log_sa, log_sb, shift):
    """Row sums (K, Z, sum p y / 2, q_out, lost) of the KL stage, y = r + eta: K = sum p chi(y),
    Z = sum p (e^y - 1) and sum p y over p_i > 0; q_out = sum of q where p = 0; lost = the number
    of entries with a finite a and b = -inf (K is +inf then)."""
    lp, d_b, y_h, live_a, live_b = pieces(a, b, ma, mb, log_sa, shift)
    p = lp.exp()
    y = 2.0 * y_h
    c, small = chi(y)
    # p chi(y) and p (e^y - 1); beyond the series through q' = p e^y, which cannot overflow
    # (2 (lp / 2 + y_h)).
    q_minus_p = (0.5 * lp + y_h).mul_(2.0).exp_().sub_(p)
    p_yh = y_h.mul_(p)
    terms = torch.stack([torch.where(small, c * p, q_minus_p - 2.0 * p_yh),
                         torch.where(small, c.add_(y).mul_(p), q_minus_p), p_yh])
    in_p = p > 0
    q_out = d_b.sub_(log_sb).exp_().masked_fill(in_p, 0.0)  # q where p is 0 (0 where b is -inf)
    lost = live_a > live_b  # a finite where b is -inf
    return torch.cat([terms.masked_fill_(~in_p, 0.0).sum(-1), q_out.sum(-1)[None],
                      lost.sum(-1).to(a.dtype)[None]])


def kl_rows(a, b, ma, mb, log_sa, log_sb):
    """KL(p || q) per row of 2-D a, b (classes last), as Chapter 1 derives it (eq-ent-kl-stable):

        K = sum_{p_i > 0} p_i chi(y_i),   Z = sum_{p_i > 0} p_i (e^{y_i} - 1),   y = r + eta,
        KL = K - chi(log1p Z) - log1p(-q_out),

    q_out the mass of q where p is 0.  Every term of K is >= 0, and chi(log1p Z) = eta^2/2 + ...
    takes out exactly what the rounding eta of the shift adds.  When q_out > 1/2 (q has little mass
    where p has: KL > log 2 and large) the first-order form KL = -sum p y is used instead, which
    stays finite up to the dtype's max (sum p y is linear in the shift: started from the pivot,
    the step back to log S_b - log S_a is subtracted).  +inf where p has mass and q none.  The
    shift starts at ``pivot_shift``: from log S_b - log S_a alone, KL of rows whose logits differ
    by 1e-77 came out as 0.0 (the exact 1.7e-155 lost under eta^2 / 2)."""
    shift0, shift = pivot_shift(a, b, ma, mb, log_sa, log_sb)
    K, Z, s_yh, q_out, lost = blockwise(kl_sums, a, b, ma, mb, log_sa, log_sb, shift)
    kl = torch.where(q_out <= 0.5, K - chi(torch.log1p(Z))[0] - torch.log1p(-q_out),
                     -2.0 * s_yh - (shift - shift0).squeeze(-1))
    kl = kl.clamp_min(0.0)  # Gibbs: KL >= 0
    return torch.where(lost > 0, float("inf"), kl)  # p has mass where q has none, however small


def jsd_rows(a, b, ma, mb, log_sa, log_sb, beta: float):
    """(KL(p || m), KL(q || m)) per row of 2-D a, b, m = beta p + (1 - beta) q, 0 < beta < 1, as sums
    of the non-negative terms m_i psi(p_i / m_i - 1) and m_i psi(q_i / m_i - 1) (Chapter 1,
    eq-ent-jsd-stable).  The KL stage first measures eta (from Z and q_out), which the terms are
    then evaluated without: left in, it would add about beta (1 - beta) eta^2 / 2 to a divergence
    that can be far smaller.  The KL stage starts from ``pivot_shift``, so that eta (and what the
    measurement leaves of it) is of the size of the log-ratios however small they are."""
    shift0, shift = pivot_shift(a, b, ma, mb, log_sa, log_sb)
    _, Z, _, q_out, _ = blockwise(kl_sums, a, b, ma, mb, log_sa, log_sb, shift)
    # q_out > 1/2: the divergence is large, and log1p(-q_out) inaccurate; shift0's eta is negligible
    shift = torch.where((q_out <= 0.5).unsqueeze(-1), shift + (torch.log1p(Z) - torch.log1p(-q_out)).unsqueeze(-1),
                        shift0)
    kp, kq = blockwise(lambda *args: _jsd_sums(*args, beta), a, b, ma, mb, log_sa, log_sb, shift)
    return kp, kq


def _jsd_sums(a, b, ma, mb, log_sa, log_sb, shift, beta):
    lp, d_b, y_h, live_a, live_b = pieces(a, b, ma, mb, log_sa, shift)
    w = 1.0 - beta
    p = lp.exp()
    y = 2.0 * y_h  # +inf where p = 0 (q is the reference, E = -1), -inf where q = 0 (p is)
    # q from its own row (not p e^y: where p underflows, log p and y are huge and cancel)
    q = d_b.sub_(log_sb).exp_()
    neg = y <= 0  # p >= q: p is the reference
    ay = y.abs_().neg_()
    c, small = chi(ay)
    E = torch.where(small, c.add_(ay), torch.expm1(ay))  # e^{-|y|} - 1, in [-1, 0]
    ey = torch.where(small, E + 1.0, ay.exp())  # e^{-|y|} (1 + E would lose it where E ~ -1)
    # m / reference, in [min(beta, w), 1], as beta + w e^{-|y|} (p the reference) or w + beta e^{-|y|}:
    # terms >= 0.  1 + w E cancels where E ~ -1: at q = 0 it gave 1 - fl(1 - beta), 8 ulps from beta
    # at beta = 0.01, and psi(q / m - 1) near s = -1 amplified that to 280 ulps of KL(q || m).
    D = torch.where(neg, ey * w + beta, ey * beta + w)
    m = torch.where(neg, p, q).mul_(D)
    s1 = torch.where(neg, E * -w, E * w).div_(D)  # p / m - 1
    s2 = torch.where(neg, E * beta, E * -beta).div_(D)  # q / m - 1
    dead = ~(live_a | live_b)
    kp = psi(s1).mul_(m).masked_fill_(dead, 0.0).sum(-1)
    kq = psi(s2).mul_(m).masked_fill_(dead, 0.0).sum(-1)
    return torch.stack([kp, kq])
