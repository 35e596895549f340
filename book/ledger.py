"""The verification ledger: every numbered equation in the book is checked by a machine.

A chapter labels an equation with MyST's dollar-math syntax::

    $$
    H(p) = -\\sum_i p_i \\log p_i
    $$ (eq-entropy)

and a code cell checks it by calling one of the functions below with the label as the first
argument, for example ``ledger.sym_equal("eq-entropy", lhs, rhs)``.  Each function raises
``AssertionError`` when the check fails, so nbval and the book build fail with it.
``tests/test_ledger.py`` fails if any label in any chapter has no such call.

The checks record what they verified; ``ledger.summary()`` prints the table at the end of a
chapter.
"""
from __future__ import annotations

import random
from typing import Callable, Iterable

__all__ = ["check", "sym_equal", "sym_zero", "close", "random_points", "summary", "CHECKS"]

#: label -> list of one-line descriptions of the checks that passed in this kernel session.
CHECKS: dict[str, list[str]] = {}


def check(label: str, ok: bool, what: str = "") -> bool:
    """Record a passed check of equation ``label``; raise if ``ok`` is false."""
    if not isinstance(label, str) or not label:
        raise TypeError("label must be a non-empty string")
    if not bool(ok):
        raise AssertionError(f"check of equation ({label}) FAILED: {what}")
    CHECKS.setdefault(label, []).append(what or "check")
    return True


def sym_zero(label: str, expr, what: str = "sympy: simplify(expr) == 0") -> bool:
    """Check that a SymPy expression simplifies to exactly zero."""
    import sympy as sp

    residual = sp.simplify(expr)
    return check(label, residual == 0, f"{what}; residual = {residual}")


def sym_equal(label: str, lhs, rhs, what: str = "sympy: simplify(lhs - rhs) == 0") -> bool:
    """Check ``sp.simplify(lhs - rhs) == 0``."""
    return sym_zero(label, lhs - rhs, what)


def close(label: str, got, want, *, rtol: float = 1e-12, atol: float = 0.0, what: str = "") -> bool:
    """Check ``|got - want| <= atol + rtol * |want|`` elementwise (floats, mpf, numpy, torch)."""
    import mpmath as mp

    gots = list(got) if _iterable(got) else [got]
    wants = list(want) if _iterable(want) else [want]
    if len(gots) != len(wants):
        raise AssertionError(f"check of ({label}): {len(gots)} values vs {len(wants)} expected")
    worst = mp.mpf(0)
    for g, w in zip(gots, wants):
        g, w = mp.mpf(_scalar(g)), mp.mpf(_scalar(w))
        err = abs(g - w)
        if not err <= atol + rtol * abs(w):
            raise AssertionError(
                f"check of equation ({label}) FAILED: got {g}, want {w}, |err| = {mp.nstr(err, 3)} "
                f"> atol {atol} + rtol {rtol}*|want|. {what}"
            )
        worst = max(worst, err)
    return check(label, True, f"{what or 'numeric'}: {len(gots)} point(s), max |err| = {mp.nstr(worst, 3)}")


def random_points(n: int, sampler: Callable[[random.Random], object], seed: int = 0) -> list:
    """``n`` reproducible random points drawn by ``sampler(rng)``."""
    rng = random.Random(seed)
    return [sampler(rng) for _ in range(n)]


def summary(labels: Iterable[str] | None = None) -> None:
    """Print the ledger; with ``labels``, also fail if one of them was never checked."""
    wanted = list(labels) if labels is not None else sorted(CHECKS)
    missing = [lab for lab in wanted if lab not in CHECKS]
    width = max((len(lab) for lab in wanted), default=5)
    print(f"{'equation':<{width}}  checks  first check")
    for lab in wanted:
        got = CHECKS.get(lab, [])
        print(f"{lab:<{width}}  {len(got):>6}  {got[0] if got else 'MISSING'}")
    if missing:
        raise AssertionError(f"equations with no passing check: {missing}")


def _iterable(x) -> bool:
    if isinstance(x, (str, bytes)):
        return False
    if hasattr(x, "ndim") and getattr(x, "ndim") == 0:
        return False
    return hasattr(x, "__iter__") or hasattr(x, "tolist") and not isinstance(x, (int, float))


def _scalar(x):
    if hasattr(x, "item"):
        return x.item()
    return x
