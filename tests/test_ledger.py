"""The verification ledger: every labelled equation in every chapter is checked by a code cell.

Labels are MyST dollar-math labels (``$$ ... $$ (eq-...)``) or ``{math}`` directives with
``:label:``; a check is a call ``ledger.<fn>("<label>", ...)`` inside a ``{code-cell}``.  The calls
themselves raise when the equation is wrong, which nbval and the book build turn into failures.
"""
import inspect
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path[:0] = [str(BOOK), str(BOOK / "_ext")]
import ledger  # noqa: E402
# The parser is shared with the book's generated verification-ledger page (book/_ext/entmath_book.py).
from ledger_index import CHECK_FUNCTIONS, WHAT_DEFAULT, WHAT_POSITION, checks_in, checks_in_code, labels_in  # noqa: E402

CHAPTERS = sorted(BOOK.glob("ch*.md"))


def test_there_are_chapters():
    assert CHAPTERS, "no chapters found in book/"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_labelled_equation_has_a_check(chapter):
    text = chapter.read_text()
    labels = labels_in(text)
    assert labels, f"{chapter.name} has no numbered equations"
    checks = checks_in(text)
    missing = [lab for lab in labels if lab not in checks]
    assert not missing, f"{chapter.name}: equations with no ledger check: {missing}"
    orphans = [lab for lab in checks if lab not in labels]
    assert not orphans, f"{chapter.name}: checks of labels that do not exist here: {orphans}"


def test_labels_are_unique_across_the_book():
    seen = {}
    for chapter in CHAPTERS:
        for lab in labels_in(chapter.read_text()):
            assert lab not in seen, f"label {lab} in both {seen[lab]} and {chapter.name}"
            seen[lab] = chapter.name


def test_the_parser_finds_what_it_should():
    text = "$$\nx = 1\n$$ (eq-a)\n\n```{math}\n:label: eq-b\ny\n```\n\n```{code-cell} ipython3\nledger.close(\"eq-a\", 1, 1)\n```\n"
    assert labels_in(text) == ["eq-a", "eq-b"]
    assert checks_in(text) == {"eq-a": ["close"]}


def test_ledger_checks_can_fail():
    import sympy as sp

    x = sp.symbols("x", positive=True)
    ledger.sym_equal("eq-test-ok", sp.log(x**2), 2 * sp.log(x))
    with pytest.raises(AssertionError, match="eq-test-bad"):
        ledger.sym_equal("eq-test-bad", sp.log(x**2), 3 * sp.log(x))
    with pytest.raises(AssertionError, match="eq-test-bad"):
        ledger.close("eq-test-bad", 1.0, 1.0 + 1e-9, rtol=1e-12)
    with pytest.raises(AssertionError, match="eq-test-bad"):
        ledger.check("eq-test-bad", False, "a false condition")
    with pytest.raises(AssertionError, match="no passing check"):
        ledger.summary(["eq-test-ok", "eq-never-checked"])


def test_the_parser_reads_descriptions_and_ignores_strings():
    code = (
        "%matplotlib inline\n"
        "ledger.sym_equal('eq-a', x, y, 'why a')\n"
        "ledger.close('eq-b', 1, 1, rtol=0, what=f'{n} points')\n"
        "ledger.check('eq-c', True)\n"
        "s = 'ledger.check(\"eq-d\", True)'  # inside a string: not a check\n"
    )
    got = [(c.fn, c.label, c.what) for c in checks_in_code(code)]
    assert got == [("sym_equal", "eq-a", "why a"), ("close", "eq-b", "{n} points"), ("check", "eq-c", "check")]


@pytest.mark.parametrize("fn", CHECK_FUNCTIONS)
def test_the_parser_knows_the_ledger_signatures(fn):
    params = list(inspect.signature(getattr(ledger, fn)).parameters.values())
    what = next(p for p in params if p.name == "what")
    position = None if what.kind is inspect.Parameter.KEYWORD_ONLY else params.index(what)
    assert WHAT_POSITION[fn] == position
    assert WHAT_DEFAULT[fn] == (what.default or {"check": "check", "close": "numeric"}[fn])
