"""Hypothesis strategies shared by the tests."""
from __future__ import annotations

import hypothesis.strategies as st

NEG_INF = float("-inf")


@st.composite
def logit_rows(draw, min_n=1, max_n=24, lo=-40.0, hi=40.0, allow_neg_inf=True):
    """A row of logits with at least one finite entry; some entries may be -inf."""
    n = draw(st.integers(min_n, max_n))
    vals = draw(st.lists(st.floats(lo, hi, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
    if allow_neg_inf and n > 1:
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        keep = draw(st.integers(0, n - 1))
        vals = [NEG_INF if (mk and i != keep) else v for i, (mk, v) in enumerate(zip(mask, vals))]
    return vals


@st.composite
def logit_row_pairs(draw, max_n=24):
    """Two rows of equal length; q's -inf entries are a subset of p's unless `lost` is drawn."""
    a = draw(logit_rows(max_n=max_n))
    b = draw(st.lists(st.floats(-40, 40, allow_nan=False), min_size=len(a), max_size=len(a)))
    return a, b


# ---- Rows at the extremes of the floating-point range (issue 19) -------------------------------
# Each op is held to: for any finite inputs (and -inf masks), the result is within a stated bound
# of the exact result for those same input values, whatever the offset, spread or mask, up to the
# dtype's max.  These strategies draw such rows; values are rounded to the dtype first and the
# reference is computed from the rounded values.
SHIFTS = (0.0, 1e2, 1e4, 1e6, 1e30)
MASKS = (float("-inf"), -1e4, -1e30, "-max", "-max/3")


def round_to(vals, dtype):
    """``vals`` rounded to ``dtype`` (overflow clamps to +-max, -inf stays), as exact floats."""
    import torch

    big = torch.finfo(dtype).max
    out = []
    for v in vals:
        if v == NEG_INF:
            out.append(v)
        else:
            out.append(float(torch.tensor(min(max(v, -big), big), dtype=torch.float64).to(dtype).double()))
    return out


@st.composite
def extreme_rows(draw, dtype, n=None, max_n=12, mask=True):
    """A row of ``n`` logits (drawn if None) in ``dtype``: a base row scaled by a spread (1e-40
    makes subnormal differences), shifted by +-c for c in SHIFTS (those below the dtype's max, or
    near the max itself), with entries replaced by +-max (spans up to twice the max) and by finite
    masks from -1e4 to -max mixed with -inf (never every entry)."""
    import torch

    big = torch.finfo(dtype).max
    n = n if n is not None else draw(st.integers(1, max_n))
    base = draw(st.lists(st.floats(-30, 30), min_size=n, max_size=n))
    spread = draw(st.sampled_from([1.0, 1.0, 1e-40, 1e-3, 30.0]))
    shifts = [c for c in SHIFTS if c < big / 4] + [0.9 * big]
    shift = draw(st.sampled_from(shifts)) * draw(st.sampled_from([1.0, -1.0]))
    vals = [shift + spread * x for x in base]
    if n > 1 and draw(st.booleans()):  # a span up to the dtype's max
        for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2, unique=True)):
            vals[i] = draw(st.sampled_from([big, -big, big / 2, -big / 2]))
    if mask and n > 1 and draw(st.booleans()):
        keep = draw(st.integers(0, n - 1))
        for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True)):
            if i != keep:
                m = draw(st.sampled_from(MASKS))
                vals[i] = -big if m == "-max" else -big / 3 if m == "-max/3" else m
    return round_to(vals, dtype)


@st.composite
def extreme_row_pairs(draw, dtype, max_n=12, lost=True):
    """Two rows of one length for the divergences: independent rows, or q's logits near p's
    (relative perturbations 1e-1 .. 1e-6, so the divergence is tiny and computed from terms that
    nearly cancel), possibly shifted by a constant.  With ``lost``, -inf in q may fall where p is
    finite (the divergence is then +inf); without, q's -inf entries are a subset of p's."""
    a = draw(extreme_rows(dtype, max_n=max_n))
    n = len(a)
    kind = draw(st.sampled_from(["independent", "near", "near", "shifted"]))
    if kind == "independent":
        b = draw(extreme_rows(dtype, n=n, mask=lost))
    else:
        eps = draw(st.sampled_from([1e-1, 1e-3, 1e-6]))
        noise = draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n))
        shift = draw(st.sampled_from([0.0, 3.0, 1e4])) if kind == "shifted" else 0.0
        b = [v if v == NEG_INF else v + shift + eps * x * (abs(v) + 1) for v, x in zip(a, noise)]
        b = round_to(b, dtype)
    if not lost:
        live = [i for i in range(n) if a[i] != NEG_INF]
        b = [a[i] if (b[i] == NEG_INF and a[i] != NEG_INF) else b[i] for i in range(n)]
        if all(v == NEG_INF for v in b):
            b[live[0]] = 0.0
    return a, b


# ---- Fixed row pairs in the deep tail (kl and jsd regression tests) ------------------------------
# Rows whose logits differ by 1e-150 .. 1e-41 in a few entries (float64): divergences of 1e-180 ..
# 1e-115.  The first is the kind of row test_jsd's 15-example draw met, where the Triton jsd was
# half the exact value (its log S_a and log S_b rounded one ulp apart, and that rounding of the
# shift log S_b - log S_a swamped the log-ratios) and the Triton kl 0.0; on the second the torch
# jsd gave 3.0e-64 for 1.7e-115.
DEEP_TAIL = [
    ([-7.744314282368549, -34.764245771629454, 0.0, -1.175402730653363e-77, -11.900195745324488, -20.405117042444],
     [-7.744314282368549, -34.764245771629454, 0.0, 0.0, -11.900195745324488, -20.405117042444]),
    ([0.0, -11.803665077491274, -5.54395375182257e-150, -4.863318797704257e-119, -2.112465732339554e-62,
      -3.1198017113661227e-57, 0.0],
     [0.0, -11.803665077491274, -6.681966364796766e-112, 5.647493162226583e-109, 0.0, 0.0, 0.0]),
    ([-4.285611866266426e-86, 0.0, 0.0], [0.0, 4.844088883028431e-91, -1.919869077822797e-76]),
    ([2.0725767373594582e-106, 0.0, 2.793602671459037e-103, -10.292098545229127],
     [0.0, -1.346132571705781e-128, 0.0, -10.292098545229127]),
    ([0.0, 0.0], [0.0, 1e-89]),
]
