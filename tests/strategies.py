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
