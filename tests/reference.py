"""High-precision references (mpmath, 50 digits) for the tests.  Independent of entmath's code."""
from __future__ import annotations

from fractions import Fraction

import mpmath as mp

mp.mp.dps = 50
NEG_INF = float("-inf")


def softmax(z):
    zs = [mp.mpf(v) for v in z if v != NEG_INF]
    m = max(zs)
    s = mp.fsum(mp.exp(v - m) for v in zs)
    return [mp.mpf(0) if v == NEG_INF else mp.exp(mp.mpf(v) - m) / s for v in z]


def logsumexp(z):
    zs = [mp.mpf(v) for v in z if v != NEG_INF]
    m = max(zs)
    return m + mp.log(mp.fsum(mp.exp(v - m) for v in zs))


def entropy(z):
    return mp.fsum(-pi * mp.log(pi) for pi in softmax(z) if pi > 0)


def kl(a, b):
    p, q = softmax(a), softmax(b)
    total = mp.mpf(0)
    for pi, qi in zip(p, q):
        if pi == 0:
            continue
        if qi == 0:
            return mp.inf
        total += pi * (mp.log(pi) - mp.log(qi))
    return total


def cross_entropy_index(z, t, eps=0.0):
    lse = logsumexp(z)
    n = len(z)
    loss = (1 - mp.mpf(eps)) * (lse - mp.mpf(z[t]))
    if eps:
        loss += mp.mpf(eps) / n * mp.fsum(lse - mp.mpf(v) for v in z)
    return loss


def cross_entropy_probs(z, y, eps=0.0):
    lse = logsumexp(z)
    n = len(z)
    total = mp.mpf(0)
    for zi, yi in zip(z, y):
        w = (1 - mp.mpf(eps)) * mp.mpf(yi) + mp.mpf(eps) / n
        if w != 0:
            total += w * (lse - mp.mpf(zi))
    return total


# ---- References that stay exact at the extremes (issue 19) -------------------------------------
# The functions above evaluate the definitions at 50 digits, which is enough for ordinary rows.
# At the extremes it is not: 1 + R rounds to 1 at 50 digits once R < 1e-50 (a gap above ~115),
# and a divergence of size eps^2 between rows that differ by eps is a sum of terms of size eps.
# These work in log space from the exact offsets d_i = z_i - max z (log p_i = d_i - log1p(R), no
# 1 + R formed), and with enough digits for the cancellation in the divergences.

def log_softmax_exact(z):
    """log softmax(z) as mpf (-inf for -inf logits), accurate however peaked the row is."""
    live = [i for i, v in enumerate(z) if v != NEG_INF]
    m = max(mp.mpf(z[i]) for i in live)
    k = next(i for i in live if mp.mpf(z[i]) == m)
    d = {i: mp.mpf(z[i]) - m for i in live}
    log_s = mp.log1p(mp.fsum(mp.exp(d[i]) for i in live if i != k))
    return [d[i] - log_s if i in d else mp.ninf for i in range(len(z))]


def entropy_exact(z, dps=60):
    """H(softmax(z)) = -sum p log p, with each log p accurate (see log_softmax_exact)."""
    with mp.workdps(dps):
        return +mp.fsum(-mp.exp(lp) * lp for lp in log_softmax_exact(z) if lp != mp.ninf)


def _same_distribution(a, b):
    """softmax(a) == softmax(b) exactly: the same -inf entries, and b - a constant on the rest
    (differences of floats taken exactly, as fractions)."""
    if [v == NEG_INF for v in a] != [v == NEG_INF for v in b]:
        return False
    return len({Fraction(y) - Fraction(x) for x, y in zip(a, b) if x != NEG_INF}) <= 1


def _enough_digits(divergence, dps, a, b):
    """divergence(dps) with enough digits: rows that differ by eps give a divergence of size
    eps^2 from terms of size up to 1, so a result below 10^(25 - dps) may be rounding noise (at 120
    digits, logits that differ by 1e-89 gave twice the exact 3e-180, and 1e-160 gave 0); it is
    recomputed with twice the digits, until 400 or more (noise far below float64's smallest
    subnormal).  Equal distributions give 0 at once."""
    if _same_distribution(a, b):
        return mp.mpf(0)
    while True:
        total = divergence(dps)
        if dps >= 400 or total == mp.inf or abs(total) >= mp.mpf(10) ** (25 - dps):
            return total
        dps *= 2


def kl_exact(a, b, dps=120):
    """KL(softmax(a) || softmax(b)); +inf where p has mass q lacks.  At least 120 digits: rows that
    differ by eps give a divergence of size eps^2 from terms of size eps (``_enough_digits``)."""
    def divergence(dps):
        with mp.workdps(dps):
            lp, lq = log_softmax_exact(a), log_softmax_exact(b)
            if any(x != mp.ninf and y == mp.ninf for x, y in zip(lp, lq)):
                return mp.inf
            return +mp.fsum(mp.exp(x) * (x - y) for x, y in zip(lp, lq) if x != mp.ninf)
    return _enough_digits(divergence, dps, a, b)


def jsd_exact(a, b, beta, dps=120):
    """Generalised Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m),
    m = beta p + (1 - beta) q; KL(p || q) at beta = 0 and KL(q || p) at beta = 1 (as Liger-Kernel
    defines beta); at least 120 digits (``_enough_digits``)."""
    if beta == 0:
        return kl_exact(a, b, dps)
    if beta == 1:
        return kl_exact(b, a, dps)

    def divergence(dps):
        with mp.workdps(dps):
            bt = mp.mpf(beta)
            w = 1 - bt
            lp, lq = log_softmax_exact(a), log_softmax_exact(b)
            total = mp.mpf(0)
            for x, y in zip(lp, lq):
                if x == mp.ninf and y == mp.ninf:
                    continue
                # log m from the larger of the two, without forming 1 + tiny
                if y == mp.ninf or (x != mp.ninf and x >= y):
                    lm = x + (mp.log(bt) if y == mp.ninf else mp.log1p(w * mp.expm1(y - x)))
                else:
                    lm = y + (mp.log(w) if x == mp.ninf else mp.log1p(bt * mp.expm1(x - y)))
                if x != mp.ninf:
                    total += bt * mp.exp(x) * (x - lm)
                if y != mp.ninf:
                    total += w * mp.exp(y) * (y - lm)
            return +total
    return _enough_digits(divergence, dps, a, b)


def soft_capped(z, softcap):
    """c tanh(z / c) for every logit (as mpf; -inf -> -c, +inf -> c)."""
    c = mp.mpf(softcap)
    return [-c if v == NEG_INF else c if v == -NEG_INF else c * mp.tanh(mp.mpf(v) / c) for v in z]


def cross_entropy_exact(z, target, eps=0.0, weight=None, softcap=None):
    """One row's cross-entropy -sum_j u_j log p_j as torch.nn.functional.cross_entropy defines it:
    ``target`` an int (class index: u = (1 - eps) w_t e_t + eps w / C) or a list of probabilities
    (u = w ((1 - eps) y + eps / C)); class weights w (1 if None); ``softcap`` c replaces every z
    by c tanh(z / c) first.  Terms with u_j = 0 are 0, even at z_j = -inf (then +inf otherwise).
    Exact at any offset: log p from ``log_softmax_exact``."""
    n = len(z)
    zz = soft_capped(z, softcap) if softcap is not None else z
    w = [mp.mpf(1)] * n if weight is None else [mp.mpf(v) for v in weight]
    e = mp.mpf(eps)
    if isinstance(target, int):
        u = [w[j] * (e / n + ((1 - e) if j == target else 0)) for j in range(n)]
    else:
        u = [w[j] * ((1 - e) * mp.mpf(target[j]) + e / n) for j in range(n)]
    return mp.fsum(-uj * lp for uj, lp in zip(u, log_softmax_exact(zz)) if uj != 0)


def softmax_exact(z, softcap=None):
    """softmax(z) (of c tanh(z / c) with ``softcap``), each entry accurate at any offset."""
    zz = soft_capped(z, softcap) if softcap is not None else z
    return [mp.mpf(0) if lp == mp.ninf else mp.exp(lp) for lp in log_softmax_exact(zz)]


def overflow_threshold(dtype):
    """The least real number that rounds to +inf in ``dtype`` (round to nearest): max + ulp(max) / 2.
    An exact result below it is representable (it rounds to max at worst), so a correct op returns
    a finite number there; at or above it, +inf."""
    import torch

    fi = torch.finfo(dtype)
    return mp.mpf(fi.max) + mp.mpf(fi.max) * fi.eps / (2 * (2 - fi.eps))
