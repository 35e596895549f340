"""The verification ledger: every numbered equation in the book is checked by a machine.

A chapter labels an equation with MyST's dollar-math syntax::

    $$
    H(p) = -\\sum_i p_i \\log p_i
    $$ (eq-entropy)

and code cells check it.  Three kinds of call take the label as their first argument, and each
raises ``AssertionError`` when its check fails, so nbval and the book build fail with it:

* **Math checks** verify the mathematics of the equation: ``sym_equal`` and ``sym_zero`` (a SymPy
  identity; the symbols carry their assumptions), ``close`` (numbers against a reference, usually
  mpmath at 30 to 50 digits) and ``check`` (a predicate: an inequality on sampled regimes, a limit,
  a count).
* **The display tie** connects the equation *as displayed* to what the checks verify.  ``tie``
  parses the display's LaTeX (``entmath/ledger/displays.py``) and verifies every relation in it, with each
  name bound to the object the chapter's checks use: symbolically, or numerically at the points
  given.  ``tie_text`` is for the few displays that are prose as much as mathematics (a
  probability of an argmax event, a definition by cases in words): the display must equal a
  registered text, and the math checks of the label state its content.  Every label has one tie.
* **Implementation checks** (``implementation``) compare two implementations of the same
  mathematics (a Triton kernel with the torch path, a C kernel with the eager path, chunked with
  unchunked) or count work (evaluations).  They are recorded apart, so that the math checks of an
  equation measure the mathematics.

The module ships with entmath (``pip install entmath[book]`` brings SymPy and mpmath, which it
needs; ``import entmath`` never imports it), so that a chapter downloaded as a notebook runs on its
own.  ``display(label)`` reads the chapters' sources when they are there (a checkout of the book,
or ``$ENTMATH_BOOK``), else the table of displays packaged beside this file
(``book_displays.json``, written by ``python -m entmath.ledger --write``; the tests fail when
it differs from the chapters).

``tests/test_ledger.py`` fails if a label has no tie or no math check, and it feeds the tie of
every display with that display changed in one sign or one number, to show that each change is
noticed.  ``summary()`` prints the chapter's ledger at its end.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterable

from . import displays
from . import index as ledger_index

__all__ = ["check", "sym_equal", "sym_zero", "close", "implementation", "tie", "tie_text", "display",
           "random_points", "summary", "CHECKS", "TIES", "IMPLEMENTATION", "MUTATIONS"]

#: label -> list of one-line descriptions of the math checks that passed in this kernel session.
CHECKS: dict[str, list[str]] = {}
#: label -> how its display is tied ({"how": "parsed" | "text", "what": ..., "kinds": {...}}).
TIES: dict[str, dict] = {}
#: label -> list of one-line descriptions of the implementation checks that passed.
IMPLEMENTATION: dict[str, list[str]] = {}
#: label -> list of (mutation, caught, why): filled only while ``MUTATE`` is true (the tests).
MUTATIONS: dict[str, list] = {}
#: every check that passed, as a record: label, function, kind, description, points, digits.
RECORDS: list = []
MUTATE = False

def _book_dir() -> Path | None:
    """The folder of the chapters' sources: ``$ENTMATH_BOOK``, else ``book/`` beside the package in
    a checkout (an editable install), else None (an installed package: the packaged table)."""
    for candidate in (os.environ.get("ENTMATH_BOOK"), Path(__file__).resolve().parents[2] / "book"):
        if candidate and any(Path(candidate).glob("ch*.md")):
            return Path(candidate)
    return None


BOOK = _book_dir()
PACKAGED_DISPLAYS = Path(__file__).resolve().parent / "book_displays.json"


def _record(store, label, what, fn="check", kind="predicate", points=None, digits=None):
    if not isinstance(label, str) or not label:
        raise TypeError("label must be a non-empty string")
    store.setdefault(label, []).append(what)
    RECORDS.append({"label": label, "fn": fn, "kind": kind, "what": what, "points": points, "digits": digits})


def check(label: str, ok: bool, what: str = "") -> None:
    """Record a passed check of equation ``label``; raise if ``ok`` is false."""
    if not isinstance(label, str) or not label:
        raise TypeError("label must be a non-empty string")
    if not bool(ok):
        raise AssertionError(f"check of equation ({label}) FAILED: {what}")
    _record(CHECKS, label, what or "check", **_kind)
    return None


_kind: dict = {}


def sym_zero(label: str, expr, what: str = "sympy: simplify(expr) == 0") -> None:
    """Check that a SymPy expression simplifies to exactly zero."""
    import sympy as sp

    residual = sp.simplify(expr)
    assumed = any(bool(s.assumptions0) for s in getattr(expr, "free_symbols", ()))
    return _as(dict(fn="sym_zero", kind="symbolic, with assumptions" if assumed else "symbolic"),
               lambda: check(label, residual == 0, f"{what}; residual = {residual}"))


def _as(kind, f):
    global _kind
    saved, _kind = _kind, kind
    try:
        return f()
    finally:
        _kind = saved


def sym_equal(label: str, lhs, rhs, what: str = "sympy: simplify(lhs - rhs) == 0") -> None:
    """Check ``sp.simplify(lhs - rhs) == 0``."""
    return sym_zero(label, lhs - rhs, what)


def _compare(label, got, want, rtol, atol, what, kind):
    import mpmath as mp

    gots = list(got) if _iterable(got) else [got]
    wants = list(want) if _iterable(want) else [want]
    if len(gots) != len(wants):
        raise AssertionError(f"check of ({label}): {len(gots)} values vs {len(wants)} expected")
    worst = mp.mpf(0)
    for g, w in zip(gots, wants):
        g, w = mp.mpf(_scalar(g)), mp.mpf(_scalar(w))
        err = abs(g - w) if not (mp.isinf(g) and g == w) else mp.mpf(0)
        if not err <= atol + rtol * abs(w):
            raise AssertionError(
                f"{kind} check of equation ({label}) FAILED: got {g}, want {w}, |err| = {mp.nstr(err, 3)} "
                f"> atol {atol} + rtol {rtol}*|want|. {what}"
            )
        worst = max(worst, err)
    return f"{what or 'numeric'}: {len(gots)} point(s), max |err| = {mp.nstr(worst, 3)}", len(gots)


def close(label: str, got, want, *, rtol: float = 1e-12, atol: float = 0.0, what: str = "") -> None:
    """Check ``|got - want| <= atol + rtol * |want|`` elementwise (floats, mpf, numpy, torch)."""
    import mpmath as mp

    text, n = _compare(label, got, want, rtol, atol, what, "check")
    return _as(dict(fn="close", kind="numeric", points=n, digits=mp.mp.dps), lambda: check(label, True, text))


def implementation(label: str, got, want=None, *, rtol: float = 0.0, atol: float = 0.0, what: str = "") -> None:
    """An implementation check: two implementations agree, or a count of work is within bounds.

    With ``want``, ``got`` and ``want`` are compared like ``close``; without it, ``got`` is a
    condition that must be true.  Recorded in ``IMPLEMENTATION``, not in ``CHECKS``.
    """
    if want is None:
        if not bool(got):
            raise AssertionError(f"implementation check of ({label}) FAILED: {what}")
        _record(IMPLEMENTATION, label, what or "implementation check", fn="implementation", kind="implementation")
        return None
    text, n = _compare(label, got, want, rtol, atol, what, "implementation")
    _record(IMPLEMENTATION, label, text, fn="implementation", kind="implementation", points=n)
    return None


# ------------------------------------------------------------------------------------------------
# Display ties

_DISPLAYS: dict = {}
_SOURCES: dict = {}


def display(label: str) -> str:
    """The LaTeX of the display labelled ``label``, read from the chapter that labels it."""
    if BOOK is None:
        if not _DISPLAYS:
            _DISPLAYS.update(json.loads(PACKAGED_DISPLAYS.read_text(encoding="utf-8")))
    else:
        for path in sorted(BOOK.glob("ch*.md")):
            mtime = path.stat().st_mtime_ns
            if _SOURCES.get(path) != mtime:
                _SOURCES[path] = mtime
                for lab, text in ledger_index.displays_in(path.read_text(encoding="utf-8")).items():
                    _DISPLAYS[lab] = text
    if label in OVERRIDE:
        return OVERRIDE[label]
    if label not in _DISPLAYS:
        raise KeyError(f"no display is labelled {label}")
    return _DISPLAYS[label]


#: label -> display text to use instead of the chapter's (the mutation test sets it).
OVERRIDE: dict = {}


def tie(label: str, envs, *, symbolic: bool = False, rtol=None, atol=None, tight=None,
        equivalent: dict | None = None, what: str = "") -> None:
    """Tie the display ``label`` to the checked objects: parse it and verify every relation in it.

    ``envs`` is one environment or a list of them (see ``displays.check`` for what a relation
    must satisfy, and ``displays`` for how names are bound).  ``symbolic`` proves the equations
    with SymPy; otherwise they are compared at every environment.  ``tight`` asks that each
    non-strict inequality be attained (to that tolerance) somewhere; as ``{(statement, relation):
    tol}`` it names the relations, and a strict one named there (a supremum) must be approached.  ``equivalent`` lists the
    one-sign or one-number changes of this display that are also true (so no check can catch
    them), each with the reason: the mutation test requires the list to be exact.
    """
    envs = envs if isinstance(envs, list) else [envs]
    opts = dict(symbolic=symbolic, rtol=rtol, atol=atol, tight=tight)
    text = display(label)
    try:
        report = displays.check(text, envs, **opts)
    except (displays.DisplayError, AssertionError) as err:
        raise AssertionError(f"display ({label}) does not match what is checked: {err}") from None
    kinds = dict(report.kinds)
    if label in TIES and TIES[label]["how"] == "parsed":
        for k, v in TIES[label]["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    TIES[label] = {"how": "parsed", "what": what or report.describe(), "kinds": kinds,
                   "symbolic": symbolic or TIES.get(label, {}).get("symbolic", False),
                   "points": report.points + TIES.get(label, {}).get("points", 0)}
    import mpmath as mp

    _record(CHECKS, label, f"the display itself, parsed: {report.describe()}", fn="tie",
            kind="display, " + ("symbolic" if symbolic else "numeric"), points=report.points, digits=mp.mp.dps)
    TIES[label]["relation_kinds"] = dict(report.kinds)
    if MUTATE:
        _merge_mutations(label, _mutation_run(label, text, envs, opts, equivalent or {}))
    return None


def _merge_mutations(label, runs):
    """A label may have several ties (environments of different kinds): a mutation is caught if
    any of them catches it."""
    old = {d: (c, w) for d, c, w in MUTATIONS.get(label, [])}
    merged = []
    for d, c, w in runs:
        if d in old and old[d][0] and not c:
            c, w = old[d]
        merged.append((d, c, w))
    MUTATIONS[label] = merged


def _mutation_run(label, text, envs, opts, equivalent):
    out = []
    for desc, mutant in displays.mutants(text):
        try:
            displays.check(mutant, envs, fast_fail=True, **opts)
            caught, why = False, "passes"
        except (displays.DisplayError, AssertionError) as err:
            caught, why = True, f"{type(err).__name__}: {str(err)[:160]}"
        except (ArithmeticError, TypeError, ValueError, KeyError, IndexError) as err:
            caught, why = True, f"does not evaluate ({type(err).__name__})"
        out.append((desc, caught, why if caught else equivalent.get(desc, "NOT DECLARED")))
    declared = set(equivalent)
    stale = declared - {d for d, _, _ in out}
    if stale:
        raise AssertionError(f"({label}): mutations declared equivalent do not exist: {sorted(stale)}")
    return out


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def tie_text(label: str, canonical: str, what: str) -> None:
    """Tie a display that is prose as much as mathematics: its text must be ``canonical``
    (whitespace aside); ``what`` says which math checks of the label state its content."""
    text = display(label)
    if _normalize(text) != _normalize(canonical):
        raise AssertionError(f"display ({label}) is not the registered text:\n  display:    {_normalize(text)}\n"
                             f"  registered: {_normalize(canonical)}")
    TIES[label] = {"how": "text", "what": what, "kinds": {"registered text": 1}, "symbolic": False, "points": 0}
    _record(CHECKS, label, f"the display is the registered text; its content: {what}", fn="tie_text",
            kind="display, registered text")
    if MUTATE:
        MUTATIONS[label] = [(desc, _normalize(m) != _normalize(canonical), "text differs")
                            for desc, m in displays.mutants(text)]
    return None


# ------------------------------------------------------------------------------------------------

def random_points(n: int, sampler: Callable[[random.Random], object], seed: int = 0) -> list:
    """``n`` reproducible random points drawn by ``sampler(rng)``."""
    rng = random.Random(seed)
    return [sampler(rng) for _ in range(n)]


def summary(labels: Iterable[str] | None = None, *, table: bool = False) -> None:
    """Say in one line how many checks passed (the verification ledger page has the table; with
    ``table=True`` it is printed here too); with ``labels``, fail if one of them has no math check
    or no tie."""
    wanted = list(labels) if labels is not None else sorted(CHECKS)
    missing = [lab for lab in wanted if lab not in CHECKS]
    untied = [lab for lab in wanted if lab not in TIES]
    if table:
        width = max((len(lab) for lab in wanted), default=5)
        print(f"{'equation':<{width}}  tie     math  impl  first math check")
        for lab in wanted:
            got = CHECKS.get(lab, [])
            tie_how = TIES.get(lab, {}).get("how", "NONE")
            print(f"{lab:<{width}}  {tie_how:<6} {len(got):>5} {len(IMPLEMENTATION.get(lab, [])):>5}  "
                  f"{got[0] if got else 'MISSING'}")
    if missing:
        raise AssertionError(f"equations with no passing check: {missing}")
    if untied:
        raise AssertionError(f"equations whose display is not tied to a check: {untied}")
    n_math = sum(len(CHECKS.get(lab, [])) for lab in wanted)
    n_impl = sum(len(IMPLEMENTATION.get(lab, [])) for lab in wanted)
    print(f"{len(wanted)} numbered equations, each tied to its display: {n_math} mathematical checks "
          f"and {n_impl} implementation checks passed (the verification ledger lists them).")
    _glue(wanted)


def _glue(labels):
    """Hand this chapter's records to the book build (myst-nb's glue; the ledger page reads them)."""
    import json

    try:
        from myst_nb import glue
    except ImportError:  # a plain Python run of the chapter: nothing to hand over
        return
    wanted = set(labels)
    record = {"ties": {lab: TIES[lab] for lab in labels if lab in TIES},
              "records": [r for r in RECORDS if r["label"] in wanted]}
    glue("entmath-ledger", json.dumps(record, default=str), display=False)


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
