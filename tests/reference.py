"""High-precision references (mpmath, 50 digits) for the tests.  Independent of entmath's code."""
from __future__ import annotations

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
