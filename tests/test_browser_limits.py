"""The layout limits of the browser check (tests/browser_check.py), on made-up measurements."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_check import NARROW, NARROW_SHARE, layout_limits  # noqa: E402


def page(displays=10, wide=(), narrow=(), long_lines=0):
    return {"displays": displays, "wide_eq": list(wide), "wide_eq_narrow": list(narrow), "long_lines": long_lines}


def test_a_book_within_the_limits_passes():
    narrow = ["x"] * int(NARROW_SHARE * 20)
    assert layout_limits({"a.html": page(10, narrow=narrow), "b.html": page(10)}) == {}


def test_each_limit_fails_on_its_own():
    assert list(layout_limits({"a.html": page(wide=["H(p) = ..."])})) == ["a.html"]
    assert "88 characters" in layout_limits({"a.html": page(long_lines=3)})["a.html"][0]
    over = ["x"] * (int(NARROW_SHARE * 20) + 1)
    assert list(layout_limits({"a.html": page(10, narrow=over), "b.html": page(10)})) == [f"{NARROW} px"]
