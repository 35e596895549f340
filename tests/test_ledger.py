"""The verification ledger: every labelled equation is checked, and its display is tied to the check.

Labels are MyST dollar-math labels (``$$ ... $$ (eq-...)``) or ``{math}`` directives with
``:label:``; a check is a call ``ledger.<fn>("<label>", ...)`` inside a ``{code-cell}``.  The calls
themselves raise when the equation is wrong, which nbval and the book build turn into failures.

Here, without running the chapters:

* every label has a math check and a tie (``ledger.tie`` or ``ledger.tie_text``), and no check
  names a label that does not exist;
* every tie can be re-run from the chapter's notation cells alone (it uses no name that a later
  cell defines or redefines);
* **the display-mutation run**: each chapter's notation cells are executed, and every tie is run
  on its display and on each copy of the display with one sign or one number changed
  (``displays.mutants``).  Each changed display must fail its tie, unless the tie declares it
  equivalent (a true statement too: ``log x <= x + 1``), and a declaration must name a change
  that does pass.  The totals are printed at the end.
"""
import ast
import inspect
import os
import re
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
from entmath import ledger  # noqa: E402
from entmath.ledger import displays  # noqa: E402
# The parser is shared with the book's generated verification-ledger page (book/_ext/entmath_book.py).
from entmath.ledger.index import (CHECK_FUNCTIONS, KIND, WHAT_DEFAULT, WHAT_POSITION, _blank_magics, checks_in,  # noqa: E402
                                  checks_in_code, code_cells, display_table as displays_table, displays_in,
                                  labels_in, notation_cells, tie_calls_in_code)

CHAPTERS = sorted(BOOK.glob("ch*.md"))
MUTATION_TOTALS: dict = {}


def test_there_are_chapters():
    assert CHAPTERS, "no chapters found in book/"


def test_the_packaged_table_of_displays_is_the_chapters_displays():
    """entmath.ledger ships the displays for notebooks run without the book (``python -m
    entmath.ledger --write`` rewrites the table after a display changes)."""
    import json

    packaged = json.loads(ledger.PACKAGED_DISPLAYS.read_text(encoding="utf-8"))
    assert packaged == displays_table(BOOK), "run: python -m entmath.ledger --write"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_labelled_equation_has_a_math_check_and_a_tie(chapter):
    text = chapter.read_text()
    labels = labels_in(text)
    assert labels, f"{chapter.name} has no numbered equations"
    checks = checks_in(text)
    untied = [lab for lab in labels if not {"tie", "tie_text"} & set(checks.get(lab, []))]
    assert not untied, f"{chapter.name}: displays not tied to their checks: {untied}"
    # a parsed tie verifies the display itself (a math check); a registered text needs math checks beside it
    unchecked = [lab for lab in labels
                 if not any(KIND[fn] == "math" or fn == "tie" for fn in checks.get(lab, []))]
    assert not unchecked, f"{chapter.name}: equations with no math check: {unchecked}"
    orphans = [lab for lab in checks if lab not in labels]
    assert not orphans, f"{chapter.name}: checks of labels that do not exist here: {orphans}"
    missing_text = [lab for lab in labels if lab not in displays_in(text)]
    assert not missing_text, f"{chapter.name}: labels whose display text cannot be read: {missing_text}"


def test_labels_are_unique_across_the_book():
    seen = {}
    for chapter in CHAPTERS:
        for lab in labels_in(chapter.read_text()):
            assert lab not in seen, f"label {lab} in both {seen[lab]} and {chapter.name}"
            seen[lab] = chapter.name


def _top_level_names(tree) -> set:
    out = set()
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, (ast.For, ast.With, ast.If)):
            if isinstance(node, ast.For):
                targets = [node.target]
            for sub in node.body + getattr(node, "orelse", []):
                out |= _top_level_names(ast.Module(body=[sub], type_ignores=[]))
        for t in targets:
            elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
            out |= {e.id for e in elts if isinstance(e, ast.Name)}
    return out


def _free_names(call) -> set:
    bound = set()
    for n in ast.walk(call):
        if isinstance(n, ast.Lambda):
            bound |= {a.arg for a in n.args.args + n.args.kwonlyargs}
        if isinstance(n, ast.comprehension):
            bound |= {m.id for m in ast.walk(n.target) if isinstance(m, ast.Name)}
    return {n.id for n in ast.walk(call) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_ties_use_only_the_notation(chapter):
    """A tie names only what the notation cells define, and nothing redefines it later, so the
    mutation run below (notation cells and ties only) checks what the chapter checks."""
    text = chapter.read_text()
    cells = code_cells(text)
    notation = notation_cells(text)
    assert notation, f"{chapter.name}: no cell is tagged ledger-notation"
    defined = set().union(*(_top_level_names(ast.parse(_blank_magics(c))) for c in notation))
    later = set().union(*(_top_level_names(ast.parse(_blank_magics(c))) for c in cells[len(notation):]))
    builtins = set(dir(__builtins__)) if isinstance(__builtins__, dict) is False else set(__builtins__)
    for cell in cells:
        for label, call in tie_calls_in_code(cell):
            used = _free_names(call) - {"ledger"} - builtins
            assert not used - defined, f"{chapter.name}: the tie of {label} uses {sorted(used - defined)}, not defined by the notation"
            assert not used & later, f"{chapter.name}: the tie of {label} uses {sorted(used & later)}, redefined after the notation"


def _run_ties(chapter):
    """Execute the notation cells of a chapter, then every tie in it with mutations on."""
    text = chapter.read_text()
    namespace = {"__name__": "__chapter__"}
    os.environ.setdefault("MPLBACKEND", "Agg")
    for cell in notation_cells(text):
        exec(compile(_blank_magics(cell), str(chapter), "exec"), namespace)
    ledger.MUTATE = True
    try:
        for cell in code_cells(text):
            for label, call in tie_calls_in_code(cell):
                eval(compile(ast.Expression(call), str(chapter), "eval"), namespace)
    finally:
        ledger.MUTATE = False
    return [lab for lab in labels_in(text) if lab in displays_in(text)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_changed_display_fails_its_tie(chapter):
    """One sign or one number changed in any display: the tie must fail (or declare the change an
    equivalent, true statement, with its reason)."""
    labels = _run_ties(chapter)
    missed, totals = [], {"parsed": [0, 0], "text": [0, 0], "equivalent": []}
    for label in labels:
        runs = ledger.MUTATIONS.get(label)
        assert runs is not None, f"{label}: its tie did not run"
        how = ledger.TIES[label]["how"]
        for desc, caught, why in runs:
            totals[how][1] += 1
            totals[how][0] += bool(caught)
            if not caught:
                if why == "NOT DECLARED":
                    missed.append(f"{label}: {desc}")
                else:
                    totals["equivalent"].append(f"{label}: {desc} ({why})")
    MUTATION_TOTALS[chapter.name] = totals
    assert not missed, f"{chapter.name}: changed displays that pass their tie: {missed}"


def test_mutation_totals(capsys):
    """Print the result of the display-mutation run (after the chapters' runs above)."""
    if not MUTATION_TOTALS:
        pytest.skip("the mutation run did not run in this session")
    lines = ["", "display-mutation run: one sign or one number changed in every labelled display"]
    grand = [0, 0, 0]
    for name, t in MUTATION_TOTALS.items():
        eq = len(t["equivalent"])
        lines.append(f"  {name}: parsed ties caught {t['parsed'][0]}/{t['parsed'][1]}, registered texts "
                     f"{t['text'][0]}/{t['text'][1]}, equivalent (declared) {eq}")
        grand[0] += t["parsed"][0] + t["text"][0]
        grand[1] += t["parsed"][1] + t["text"][1]
        grand[2] += eq
        lines += [f"      equivalent: {e}" for e in t["equivalent"]]
    lines.append(f"  all: caught {grand[0]} of {grand[1]}; the other {grand[1] - grand[0]} are declared "
                 f"equivalent ({grand[2]})")
    with capsys.disabled():
        print("\n".join(lines))
    assert grand[1] - grand[0] == grand[2]


def test_the_parser_finds_what_it_should():
    text = "$$\nx = 1\n$$ (eq-a)\n\n```{math}\n:label: eq-b\ny\n```\n\n```{code-cell} ipython3\nledger.close(\"eq-a\", 1, 1)\n```\n"
    assert labels_in(text) == ["eq-a", "eq-b"]
    assert checks_in(text) == {"eq-a": ["close"]}
    assert displays_in(text) == {"eq-a": "x = 1"}
    tagged = "```{code-cell} ipython3\n:tags: [ledger-notation]\n\nx = 1\n```\n\n```{code-cell} ipython3\ny = 2\n```\n"
    assert [c.strip() for c in notation_cells(tagged)] == ["x = 1"]
    # Cell metadata as a YAML block (a figure's caption): the block is not code, its tags count.
    yaml_cell = ("```{code-cell} ipython3\n---\nmystnb:\n  figure:\n    caption: H against x\n"
                 "tags: [hide-input, ledger-notation]\n---\nledger.close(\"eq-a\", 1, 1, what=\"w\")\n```\n")
    assert checks_in(yaml_cell) == {"eq-a": ["close"]}
    assert [c.strip() for c in notation_cells(yaml_cell + tagged)][0] == 'ledger.close("eq-a", 1, 1, what="w")'


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
    with pytest.raises(AssertionError, match="eq-test-bad"):
        ledger.implementation("eq-test-bad", 1.0, 1.1, rtol=1e-3)
    ledger.implementation("eq-test-impl", 1.0, 1.0)
    assert "eq-test-impl" in ledger.IMPLEMENTATION and "eq-test-impl" not in ledger.CHECKS
    with pytest.raises(AssertionError, match="no passing check"):
        ledger.summary(["eq-test-ok", "eq-never-checked"])


def test_a_tie_fails_on_a_wrong_display():
    import sympy as sp

    P = sp.Symbol("P", positive=True)
    env = {"E": sp.Symbol("E"), "P": lambda e: P, "I": lambda e: -sp.log(P)}
    ledger.OVERRIDE["eq-test-tie"] = r"I(E) = -\log P(E)"
    try:
        ledger.tie("eq-test-tie", env, symbolic=True)
        ledger.OVERRIDE["eq-test-tie"] = r"I(E) = \log P(E)"
        with pytest.raises(AssertionError, match="eq-test-tie"):
            ledger.tie("eq-test-tie", env, symbolic=True)
    finally:
        del ledger.OVERRIDE["eq-test-tie"]


def test_relations_inequalities_and_approximations():
    import mpmath as mp

    envs = [{"__mode__": "mp", "x": mp.mpf(v)} for v in (0.5, 1, 2, 8)]
    displays.check(r"\log x \le x - 1", envs, tight=0)
    with pytest.raises(displays.DisplayCheckFailed):  # reversed
        displays.check(r"\log x \ge x - 1", envs)
    with pytest.raises(displays.DisplayCheckFailed):  # true, but not attained: a weaker bound
        displays.check(r"\log x \le x + 1", envs, tight=0)
    with pytest.raises(displays.DisplayCheckFailed):  # never strict: a reversal would pass too
        displays.check(r"x \le x", envs)
    displays.check(r"\frac{1}{\ln 2} \approx 1.4427", [{"__mode__": "mp"}])
    with pytest.raises(displays.DisplayCheckFailed):
        displays.check(r"\frac{1}{\ln 2} \approx 1.4428", [{"__mode__": "mp"}])


def test_asymptotic_expansions_must_be_sharp():
    import sympy as sp

    x = sp.Symbol("x", positive=True)
    displays.check(r"e^{x} = 1 + x + O(x^2)", [{"x": x}])
    with pytest.raises(displays.DisplayCheckFailed):  # a wrong coefficient: the ratio grows
        displays.check(r"e^{x} = 1 + 2 x + O(x^2)", [{"x": x}])
    with pytest.raises(displays.DisplayCheckFailed):  # O(x) is true but not what the expansion achieves
        displays.check(r"e^{x} = 1 + x + O(x)", [{"x": x}])


def test_mutants_change_one_sign_or_one_number():
    got = [m for _, m in displays.mutants(r"a - 2 \le \text{step 3} + \tfrac12")]
    assert got == [r"a + 2 \le \text{step 3} + \tfrac12", r"a - 3 \le \text{step 3} + \tfrac12",
                   r"a - 2 \ge \text{step 3} + \tfrac12", r"a - 2 \le \text{step 3} - \tfrac12",
                   r"a - 2 \le \text{step 3} + \tfrac13"]


def test_the_parser_reads_descriptions_and_ignores_strings():
    code = (
        "%matplotlib inline\n"
        "ledger.sym_equal('eq-a', x, y, 'why a')\n"
        "ledger.close('eq-b', 1, 1, rtol=0, what=f'{n} points')\n"
        "ledger.check('eq-c', True)\n"
        "ledger.implementation('eq-d', a, b, what='triton vs torch')\n"
        "s = 'ledger.check(\"eq-e\", True)'  # inside a string: not a check\n"
    )
    got = [(c.fn, c.label, c.what) for c in checks_in_code(code)]
    assert got == [("sym_equal", "eq-a", "why a"), ("close", "eq-b", "{n} points"), ("check", "eq-c", "check"),
                   ("implementation", "eq-d", "triton vs torch")]


@pytest.mark.parametrize("fn", CHECK_FUNCTIONS)
def test_the_parser_knows_the_ledger_signatures(fn):
    params = list(inspect.signature(getattr(ledger, fn)).parameters.values())
    what = next(p for p in params if p.name == "what")
    position = None if what.kind is inspect.Parameter.KEYWORD_ONLY else params.index(what)
    assert WHAT_POSITION[fn] == position
    default = what.default if what.default not in ("", inspect.Parameter.empty) else None
    assert default is None or WHAT_DEFAULT[fn] == default


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_the_chapter_summary_lists_every_label(chapter):
    """``ledger.summary([...])`` at the end of a chapter fails on a listed label with no check or no
    tie, and hands the chapter's records to the ledger page: it must list every label."""
    text = chapter.read_text()
    listed = []
    for cell in code_cells(text):
        tree = ast.parse(_blank_magics(cell))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "summary"
                    and node.args and isinstance(node.args[0], ast.List)):
                listed += [e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
    assert sorted(listed) == sorted(labels_in(text)), f"{chapter.name}: summary lists differ from the labels"


def test_sums_over_a_condition_cases_in_words_and_the_iverson_bracket():
    import mpmath as mp

    p = displays.Vec([mp.mpf(0), mp.mpf("0.25"), mp.mpf("0.75")])
    env = {"__mode__": "mp", "__index__": {"*": [1, 2, 3]}, "p": p}
    displays.check(r"\sum_{i:\, p_i > 0} p_i = 1", [env])
    with pytest.raises(displays.DisplayCheckFailed):  # the condition matters: no index has p_i > 1/2 but one
        displays.check(r"\sum_{i:\, p_i > 0.5} p_i = 1", [env])
    # [i = t] is 1 or 0; a case named in words applies where the environment says so
    displays.check(r"\sum_i p_i [i = t] = 0.75", [{**env, "t": 3}])
    cases = r"u = \begin{cases} 2 & \text{class index } t,\\ 3 & \text{probabilities } y, \end{cases}"
    displays.check(cases, [{"__mode__": "mp", "u": 2, "__case__": "classindex"},
                           {"__mode__": "mp", "u": 3, "__case__": "probabilities"}])
    with pytest.raises(displays.DisplayCheckFailed):
        displays.check(cases, [{"__mode__": "mp", "u": 2, "__case__": "probabilities"}])


def test_two_indices_function_powers_and_absolute_values():
    import mpmath as mp

    G = [displays.Vec([1, 2]), displays.Vec([3, 4])]
    displays.check(r"G_{ri} = 2 r + i - 2", [{"__mode__": "mp", "G": G, "__free__": {"r": [1, 2], "i": [1, 2]}}])
    envs = [{"__mode__": "mp", "sech": mp.sech, "x": mp.mpf(v)} for v in (-3, -0.2, 0, 1.5)]
    displays.check(r"\operatorname{sech}^2 x = \frac{4\, e^{-2|x|}}{\bigl(1 + e^{-2|x|}\bigr)^2}", envs)
    with pytest.raises(displays.DisplayCheckFailed):
        displays.check(r"\operatorname{sech}^2 x = \frac{4\, e^{-|x|}}{\bigl(1 + e^{-2|x|}\bigr)^2}", envs)


def test_a_supremum_must_be_approached_when_asked():
    import mpmath as mp

    envs = [{"__mode__": "mp", "x": mp.mpf(v)} for v in (1, 10, 1e6)]
    displays.check(r"\frac{x}{1 + x} < 1", envs, tight={(1, 1): 1e-5})
    with pytest.raises(displays.DisplayCheckFailed):  # true, but 2 is not the supremum
        displays.check(r"\frac{x}{1 + x} < 2", envs, tight={(1, 1): 1e-5})


def shape(text):
    """The statements of a display without the tokens' positions in the text."""
    return re.sub(r"pos=\d+, end=\d+", "", str(displays.parse(text)))


def test_a_display_set_on_several_lines_parses_like_one_line():
    one_line = r"a = b + 1, \qquad c = 2 a"
    gathered = "\\begin{gathered}\na = b + 1, \\\\\nc = 2 a\n\\end{gathered}"

    assert shape(gathered) == shape(one_line)
    env = {"a": 3, "b": 2, "c": 6}
    displays.check(gathered, [env])
    with pytest.raises(AssertionError):
        displays.check(gathered.replace("2 a", "3 a"), [env])


def test_an_aligned_chain_parses_like_one_line():
    one_line = r"a = b + 1 = c - 1, \qquad d = 2 a"
    aligned = "\\begin{aligned}\na &= b + 1 \\\\\n&= c - 1, \\\\\nd &= 2 a\n\\end{aligned}"

    assert shape(aligned) == shape(one_line)
    env = {"a": 3, "b": 2, "c": 4, "d": 6}
    displays.check(aligned, [env])
    with pytest.raises(AssertionError):  # the continued line is checked: a wrong c - 2 fails
        displays.check(aligned.replace("c - 1", "c - 2"), [env])
    # a line that starts with + or - continues the expression of the line before it
    broken = "\\begin{aligned}\na &= b \\\\\n&\\quad + 1, \\\\\nd &= 2 a\n\\end{aligned}"
    assert shape(broken) == shape(r"a = b + 1, \qquad d = 2 a")
    displays.check(broken, [env])
    # a cases environment inside a display keeps its alignment marks
    cases = r"n_i = \begin{cases} S & \text{not causal}, \\ i + 1 & \text{causal}. \end{cases}"
    assert shape(cases) == shape("\\begin{aligned}" + cases + "\\end{aligned}")


def test_a_long_sum_or_an_implication_carried_over_parses_like_one_line():

    one_line = r"a = b + 1 - c"
    carried = "\\begin{aligned}\na &= b + 1\n\\\\\n&\\qquad - c\n\\end{aligned}"
    assert shape(carried) == shape(one_line)
    env = {"a": 1, "b": 2, "c": 2}
    displays.check(carried, [env])
    with pytest.raises(AssertionError):  # the carried-over term is checked: + c fails
        displays.check(carried.replace("- c", "+ c"), [env])
    implied = "\\begin{gathered}\na = b + 1\n\\\\\n\\Longrightarrow\\quad a - 1 = b\n\\end{gathered}"
    assert shape(implied) == shape(r"a = b + 1 \quad\Longrightarrow\quad a - 1 = b")
    # a statement that starts with a sign on a new line, without the indent, stays a new statement
    assert shape("x = 1, \\\\ -y = 2") == shape(r"x = 1, \qquad -y = 2")


def test_an_aligned_sum_broken_before_a_sign_parses_like_one_line():
    one_line = r"a = b + c - d, \qquad e = 2 a"
    aligned = "\\begin{aligned}\na &= b + c \\\\\n&\\quad - d, \\\\\ne &= 2 a\n\\end{aligned}"

    assert shape(aligned) == shape(one_line)
    env = {"a": 2, "b": 4, "c": 1, "d": 3, "e": 4}
    displays.check(aligned, [env])
    with pytest.raises(AssertionError):  # the continued line counts: a wrong sign fails
        displays.check(aligned.replace("- d", "+ d"), [env])
    # inside a cases a line that starts with a sign is a new branch, not a continuation
    cases = r"s = \begin{cases} 1 & x > 0, \\ -1 & x < 0. \end{cases}"
    assert shape(cases) == shape("\\begin{aligned}" + cases + "\\end{aligned}")
