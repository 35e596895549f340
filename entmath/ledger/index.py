"""Find the numbered equations of a chapter and the ledger checks that verify them.

One parser for two readers: ``tests/test_ledger.py`` (every label has a check, labels are unique)
and the book's Sphinx extension ``entmath_book`` (the generated verification-ledger page).  Both
must agree on what counts as a label and as a check, so neither keeps its own regexes.

* A *label* is a MyST dollar-math label on the closing line (``$$ (eq-...)``) or the ``:label:``
  of a ``{math}`` directive.
* A *check* is a call ``ledger.<fn>("<label>", ...)`` with ``fn`` one of :data:`CHECK_FUNCTIONS`,
  inside a ``{code-cell}``; its first argument must be a string literal, so a reader (and this
  parser) can see which equation it verifies.  :data:`KIND` sorts them: math checks, the display
  tie, implementation checks.
* A *display* is the LaTeX between the opening ``$$`` line and the labelled closing one.
* Cells tagged ``ledger-notation`` (``:tags: [ledger-notation]``) define what the names in the
  chapter's displays stand for; a tie may use only what the cells up to the last of them define.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = [
    "CHECK_FUNCTIONS",
    "KIND",
    "Check",
    "labels_in",
    "code_cells",
    "cell_tags",
    "notation_cells",
    "checks_in_code",
    "checks_in",
    "tie_calls_in_code",
    "displays_in",
]

DOLLAR_LABEL = re.compile(r"^\s*\$\$\s*\(([^)\s]+)\)\s*$", re.M)
DIRECTIVE_LABEL = re.compile(r"^```\{math\}[^\n]*\n(?::[a-z]+:[^\n]*\n)*?:label:\s*(\S+)", re.M)
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.M | re.S)
# A cell's options: ``:key: value`` lines, or a YAML block between ``---`` lines (needed for nested
# metadata such as myst-nb's ``mystnb: figure: caption``).
CELL_OPTION = re.compile(r"\A(---\n.*?^---\n|(?::[\w-]+:[^\n]*\n)*)", re.M | re.S)
NOTATION_TAG = "ledger-notation"
CHECK_CALL = re.compile(r"\bledger\.(\w+)\(\s*[\"']([^\"']+)[\"']")
#: the ``ledger`` functions that verify an equation (``summary`` and ``random_points`` do not).
CHECK_FUNCTIONS = ("check", "sym_equal", "sym_zero", "close", "tie", "tie_text", "implementation")
#: what each function checks: the mathematics, the display against the checked objects, or two
#: implementations of the same mathematics against each other.
KIND = {"check": "math", "sym_equal": "math", "sym_zero": "math", "close": "math",
        "tie": "tie", "tie_text": "tie", "implementation": "implementation"}
#: where each check function takes its ``what`` description when it is passed positionally,
#: and what it says when it is left out (mirrors the signatures in ``entmath/ledger/__init__.py``;
#: ``tests/test_ledger.py`` keeps the two in step).
WHAT_POSITION = {"check": 2, "sym_zero": 2, "sym_equal": 3, "close": None, "tie": None, "tie_text": 2,
                 "implementation": None}
WHAT_DEFAULT = {
    "check": "check",
    "sym_zero": "sympy: simplify(expr) == 0",
    "sym_equal": "sympy: simplify(lhs - rhs) == 0",
    "close": "numeric",
    "tie": "display parsed and verified",
    "tie_text": "registered text",
    "implementation": "implementation check",
}


@dataclass(frozen=True)
class Check:
    """One ``ledger.<fn>(label, ...)`` call: its function, label and one-line description."""

    fn: str
    label: str
    what: str


def labels_in(text: str) -> list:
    """The equation labels of a MyST Markdown chapter, dollar-math ones first, each in order."""
    return DOLLAR_LABEL.findall(text) + DIRECTIVE_LABEL.findall(text)


def code_cells(text: str) -> list:
    """The bodies of the ``{code-cell}`` blocks of a MyST Markdown notebook, in order (without
    their ``:option:`` lines)."""
    return [CELL_OPTION.sub("", body, count=1) for body in CODE_CELL.findall(text)]


def cell_tags(text: str) -> list:
    """The tags of each ``{code-cell}`` block, in order (``:tags: [a, b]``, or ``tags: [a, b]`` in
    a YAML block)."""
    out = []
    for body in CODE_CELL.findall(text):
        options = CELL_OPTION.match(body).group(1)
        m = re.search(r"^:?tags:?\s*\[([^\]]*)\]", options, re.M)
        out.append([t.strip().strip("'\"") for t in m.group(1).split(",")] if m else [])
    return out


def notation_cells(text: str) -> list:
    """The cells a tie may rely on: every cell up to the last one tagged ``ledger-notation``."""
    cells, tags = code_cells(text), cell_tags(text)
    last = max((k for k, t in enumerate(tags) if NOTATION_TAG in t), default=-1)
    return cells[:last + 1]


def checks_in_code(code: str) -> list:
    """The ledger checks called in one code cell, in source order.

    The cell is parsed as Python (IPython magics and shell lines are blanked first), so a call
    inside a string or a comment does not count.  A cell that is not valid Python falls back to
    the regular expression, which sees the function and label but no description.
    """
    try:
        tree = ast.parse(_blank_magics(code))
    except SyntaxError:
        return [Check(fn, label, WHAT_DEFAULT[fn]) for fn, label in CHECK_CALL.findall(code)
                if fn in CHECK_FUNCTIONS]
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Name) and target.id == "ledger"
                and node.func.attr in CHECK_FUNCTIONS and node.args):
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.append((node.lineno, node.col_offset,
                          Check(node.func.attr, first.value, _what(node))))
    return [check for _, _, check in sorted(found, key=lambda t: (t[0], t[1]))]


def tie_calls_in_code(code: str) -> list:
    """``(label, ast.Call)`` for each ``ledger.tie``/``ledger.tie_text`` call of a cell."""
    try:
        tree = ast.parse(_blank_magics(code))
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ledger"
                and node.func.attr in ("tie", "tie_text") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node))
    return out


def checks_in(text: str) -> dict:
    """``{label: [fn, ...]}`` over every code cell of a MyST Markdown chapter."""
    found: dict = {}
    for cell in code_cells(text):
        for check in checks_in_code(cell):
            found.setdefault(check.label, []).append(check.fn)
    return found


def _what(call: ast.Call) -> str:
    fn = call.func.attr
    node = next((kw.value for kw in call.keywords if kw.arg == "what"), None)
    pos = WHAT_POSITION[fn]
    if node is None and pos is not None and len(call.args) > pos:
        node = call.args[pos]
    if node is None:
        return WHAT_DEFAULT[fn]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # an f-string: keep its text, show each field as {...}
        return "".join(part.value if isinstance(part, ast.Constant) else "{" + ast.unparse(part.value) + "}"
                       for part in node.values)
    return ast.unparse(node)


def _blank_magics(code: str) -> str:
    # `%matplotlib inline`, `!pip ...`: not Python; keep the line so line numbers still match.
    return "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
                     for line in code.splitlines())


def displays_in(text: str) -> dict:
    """``{label: LaTeX}`` for the labelled dollar-math displays of a chapter (the text between the
    opening ``$$`` line and the closing ``$$ (label)`` line, indentation removed)."""
    lines = text.splitlines()
    out = {}
    for k, line in enumerate(lines):
        m = DOLLAR_LABEL.match(line)
        if not m:
            continue
        j = k - 1
        while j >= 0 and lines[j].strip() != "$$":
            j -= 1
        if j < 0:
            continue
        body = [ln.strip() for ln in lines[j + 1:k]]
        out[m.group(1)] = "\n".join(body)
    return out


def display_table(book_dir) -> dict:
    """Every labelled display of the chapters ``<book_dir>/ch*.md``: label -> LaTeX (the table
    ``entmath.ledger`` packages for notebooks run without the book's sources)."""
    from pathlib import Path

    table = {}
    for path in sorted(Path(book_dir).glob("ch*.md")):
        table.update(displays_in(path.read_text(encoding="utf-8")))
    return dict(sorted(table.items()))

