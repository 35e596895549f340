"""The verification ledger: every labelled equation in every chapter is checked by a code cell.

Labels are MyST dollar-math labels (``$$ ... $$ (eq-...)``) or ``{math}`` directives with
``:label:``; a check is a call ``ledger.<fn>("<label>", ...)`` inside a ``{code-cell}``.  The calls
themselves raise when the equation is wrong, which nbval and the book build turn into failures.
"""
import re
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path.insert(0, str(BOOK))
import ledger  # noqa: E402

CHAPTERS = sorted(BOOK.glob("ch*.md"))
DOLLAR_LABEL = re.compile(r"^\s*\$\$\s*\(([^)\s]+)\)\s*$", re.M)
DIRECTIVE_LABEL = re.compile(r"^```\{math\}[^\n]*\n(?::[a-z]+:[^\n]*\n)*?:label:\s*(\S+)", re.M)
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.M | re.S)
CHECK_CALL = re.compile(r"\bledger\.(\w+)\(\s*[\"']([^\"']+)[\"']")
CHECK_FUNCTIONS = {"check", "sym_equal", "sym_zero", "close"}


def labels_in(text: str) -> list:
    return DOLLAR_LABEL.findall(text) + DIRECTIVE_LABEL.findall(text)


def checks_in(text: str) -> dict:
    found = {}
    for cell in CODE_CELL.findall(text):
        for fn, label in CHECK_CALL.findall(cell):
            if fn in CHECK_FUNCTIONS:
                found.setdefault(label, []).append(fn)
    return found


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
