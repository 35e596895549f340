"""Read a chapter's displayed equations as mathematics, so that a check can verify the display itself.

A labelled display in a chapter is LaTeX.  ``parse`` turns its text into a list of *statements*
(a chain of relations such as ``a = b \\le c``, an implication, an update ``x \\leftarrow y``, a
definition by cases ...), and ``evaluate`` computes every side of every relation in an
*environment* that says what each name of the display stands for: SymPy symbols and expressions
for a symbolic check, mpmath numbers or numpy samples for a numeric one.  ``ledger.tie`` then
verifies the relations; ``mutants`` produces the wrong displays (one sign or one number changed)
that ``tests/test_ledger.py`` feeds back to the same verification to show that it notices.

The parser is written for the notation of this book rather than for LaTeX at large: letters are
single-letter names (``xy`` is a product), ``\\operatorname{LSE}``, ``\\mathrm{KL}`` and ``\\text{bits}``
make longer names, a name followed by parentheses is a function call when the environment binds it
to a callable and a product otherwise, and ``e^{...}`` is the exponential.  Why not SymPy's own
``parse_latex``: its Lark grammar reserves ``d`` for differentials (``d_i`` does not parse), returns
an ambiguity tree for every ``f(x)``, has no sums over sets, expectations, norms, cases or
relations chains, and takes 0.1 to 0.7 s per display; the mutation test parses about a thousand.

Environment conventions (a dict from names to values):

* a name's key is its canonical text: ``p``, ``gamma``, ``s_max``, ``kappa_2``, ``H^*``, ``y^u``,
  ``p^(k)``, ``Phi^-1``, ``bar z``, ``tilde p``, ``G'``, ``I_bits``, ``D_KL``;
* a subscript that is not part of a key indexes the value (1-based; a SymPy Matrix, a ``Vec``, a
  list or a numpy array) or, for a callable, is passed to it first: ``r_j(t)`` is ``r(j)(t)``;
* two one-letter indices, ``z_{ri}``, index twice (a list of rows) or are both passed to a callable;
* a name with subscripts beside the same name without (``S`` and ``S_k``): the family is ``"S_"``;
  ``p^{(k)}`` with ``k`` bound by a sum is ``"p^()"`` indexed by ``k``; ``\\mathcal{L}`` is ``calL``;
* ``"__index__"``: the index range for sums without bounds, ``{"i": [1, 2, 3], ...}`` or a default
  list under ``"*"``; ``"__free__"``: free indices a statement must hold for (``{"i": [1, 2, 3]}``);
* ``"__mode__"``: ``"sym"`` (SymPy), ``"mp"`` (mpmath) or ``"np"`` (numpy); literals follow it;
* ``"__minimize__"``: a callable ``(f, start) -> value`` for ``\\min_z`` and ``\\inf_z`` (without it,
  ``\\max_k`` and ``\\min_k`` run over the index range of ``k``);
* ``"__case__"``: which branch of a ``cases`` applies when its condition is words
  (``\\text{class index } t`` is ``"classindex"``); ``"__skip__"``: statements (1-based) not checked here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import mpmath as mp

__all__ = ["parse", "evaluate", "check", "mutants", "tokenize", "Vec", "Fn", "DisplayError", "Statement"]


class DisplayError(Exception):
    """The display cannot be parsed, or a name in it has no value in the environment."""


# ------------------------------------------------------------------------------------------------
# Tokens

GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "pi", "rho", "sigma", "tau", "upsilon", "phi",
    "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma",
    "Upsilon", "Phi", "Psi", "Omega",
}
IGNORED = {  # spacing and sizing: no mathematical content
    ",", ";", "!", ":", " ", "left", "right", "bigl", "bigr", "Bigl", "Bigr", "big", "Big", "biggl",
    "biggr", "bigg", "Bigg", "displaystyle", "textstyle", "limits", "nolimits", "middle",
}
RELATIONS = {
    "=": "=", "\\le": "<=", "\\leq": "<=", "\\ge": ">=", "\\geq": ">=", "<": "<", ">": ">",
    "\\ne": "!=", "\\neq": "!=", "\\approx": "~", "\\to": "->", "\\leftarrow": "<-", "\\in": "in",
}
# \implies and \Rightarrow join a condition to what follows from it; \Longrightarrow, between two
# displayed claims, is "therefore" (both are claims), and \Longleftrightarrow "equivalently".
IMPLICATIONS = {"\\implies": "=>", "\\Rightarrow": "=>", "\\Longrightarrow": "therefore", "\\Longleftrightarrow": "<=>"}
TEXT_CMDS = {"text", "mathrm", "operatorname", "operatorname*", "mathit", "textrm"}


@dataclass(frozen=True)
class Tok:
    kind: str   # "cmd", "num", "letter", "char", "text" (the argument of \text and its kin)
    value: str
    pos: int    # offset in the source text (for mutations)
    end: int


_TOKEN = re.compile(r"\\([A-Za-z]+\*?)|\\(.)|(\d+(?:\.\d+)?)|([A-Za-z])|(\S)", re.S)


# A layout-only environment: a long display is set on several lines as
# \begin{gathered} a = b, \\ c = d \end{gathered}.  Its lines are statements like any others
# (``\\`` separates statements), so the wrapper is blanked to spaces (positions are kept).
# In \begin{aligned} a &= b \\ &= c \end{aligned} the alignment marks are blanked too (not those of
# a cases inside); which line breaks continue a statement is decided on the tokens (``tokenize``).
_LAYOUT_ENV = re.compile(r"\\(?:begin|end)\{(?:gathered|aligned)\}")
_ALIGNED = re.compile(r"\\begin\{aligned\}.*?\\end\{aligned\}", re.S)
_CASES = re.compile(r"(\\begin\{cases\}.*?\\end\{cases\})", re.S)


def _blank_layout(text: str) -> str:
    def marks(m):  # the alignment marks of an aligned block, not those of a cases inside it
        parts = _CASES.split(m.group(0))
        return "".join(p if k % 2 else p.replace("&", " ") for k, p in enumerate(parts))
    text = _ALIGNED.sub(marks, text)
    return _LAYOUT_ENV.sub(lambda m: " " * len(m.group(0)), text)


def tokenize(text: str) -> list:
    """LaTeX math as tokens; ``\\text{...}`` and its kin keep their argument as one token."""
    text = _blank_layout(text)
    toks, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if m is None:  # pragma: no cover - every non-space character matches
            raise DisplayError(f"cannot read {text[i:i + 20]!r}")
        if m.group(1) is not None:
            name = m.group(1)
            if name in TEXT_CMDS or name in ("mathbb", "mathbf", "mathcal"):
                j = m.end()
                while j < len(text) and text[j].isspace():
                    j += 1
                if j < len(text) and text[j] == "{":
                    depth, k = 1, j + 1
                    while depth:
                        if k >= len(text):
                            raise DisplayError("unbalanced braces in \\" + name)
                        depth += {"{": 1, "}": -1}.get(text[k], 0)
                        k += 1
                    toks.append(Tok("text", f"{name}:{text[j + 1:k - 1].strip()}", m.start(), k))
                    i = k
                    continue
            toks.append(Tok("cmd", "\\" + name, m.start(), m.end()))
        elif m.group(2) is not None:
            toks.append(Tok("cmd", "\\" + m.group(2), m.start(), m.end()))
        elif m.group(3) is not None:
            toks.append(Tok("num", m.group(3), m.start(), m.end()))
        elif m.group(4) is not None:
            toks.append(Tok("letter", m.group(4), m.start(), m.end()))
        else:
            toks.append(Tok("char", m.group(5), m.start(), m.end()))
        i = m.end()
    toks = [t for t in toks if not (t.kind == "cmd" and t.value[1:] in IGNORED)]
    # A line break inside one statement is dropped: before a relation or an implication it continues
    # the chain (a = b \\ = c); before + or - it continues the sum (a = b + c \\ + d), unless the line
    # before ended the statement with a comma, period or semicolon and the sign is not indented, or
    # the break is inside a cases (whose branches may start with a sign).  Indentation (\quad,
    # \qquad) at the start of such a line goes with the break.
    out, in_cases, k = [], 0, 0
    while k < len(toks):
        t = toks[k]
        if t.value in ("\\begin", "\\end") and "".join(x.value for x in toks[k + 1:k + 8]) == "{cases}":
            in_cases += 1 if t.value == "\\begin" else -1
        if t.value == "\\\\":
            j = k + 1
            while j < len(toks) and toks[j].value in ("\\quad", "\\qquad"):
                j += 1
            after = toks[j].value if j < len(toks) else None
            ended = bool(out) and out[-1].value in (",", ".", ";")
            if (after in RELATIONS or after in IMPLICATIONS
                    or (after in ("+", "-") and not in_cases and (j > k + 1 or not ended))):
                k = j
                continue
        out.append(t)
        k += 1
    return out


# ------------------------------------------------------------------------------------------------
# Syntax tree

@dataclass
class Node:
    op: str
    args: tuple = ()
    info: dict = field(default_factory=dict)


def N(op, *args, **info):
    return Node(op, args, info)


@dataclass
class Statement:
    """One claim of a display: ``kind`` is "chain" (``terms`` joined by ``rels``), "implies",
    "iff", "bind" (``\\text{with } x = ...``), "range" (``j = 1, \\dots, n``) or "cases"."""
    kind: str
    terms: list = field(default_factory=list)
    rels: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    tag: str | None = None            # "(normal)" after an alternative
    qualifiers: list = field(default_factory=list)  # (x \to -\infty), (j \ne t), \text{when } ...
    side: list = field(default_factory=list)        # underbrace annotations: (node, rel, node)


class Parser:
    def __init__(self, toks):
        self.toks = toks
        self.i = 0

    # -- helpers
    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def at(self, kind=None, value=None, k=0):
        t = self.peek(k)
        return t is not None and (kind is None or t.kind == kind) and (value is None or t.value == value)

    def take(self, kind=None, value=None):
        t = self.peek()
        if t is None or (kind and t.kind != kind) or (value and t.value != value):
            raise DisplayError(f"expected {value or kind}, found {t.value if t else 'the end'} "
                               f"at offset {t.pos if t else 'end'}")
        self.i += 1
        return t

    def is_char(self, c, k=0):
        return self.at("char", c, k)

    def is_cmd(self, c, k=0):
        return self.at("cmd", c, k)

    # -- statements
    def display(self):
        statements, bindings = [], []
        while self.peek() is not None:
            st = self.statement()
            if st is not None:
                statements.append(st)
            self.separators()
        return statements

    def separators(self):
        while self.peek() is not None and (self.is_cmd("\\qquad") or self.is_cmd("\\quad")
                                           or self.is_char(",") or self.is_char(";") or self.is_char(".")
                                           or self.is_cmd("\\\\") or self.is_cmd("\\ ")
                                           or self.at("text", "text:so") or self.at("text", "text:and")):
            self.i += 1

    def statement(self):
        t = self.peek()
        if t.kind == "text" and t.value.startswith("text:and with"):
            self.i += 1
            lhs = self.expr()
            self.take("char", "=")
            rhs = self.expr()
            if self.is_char(":"):
                self.i += 1
            return Statement("bind", terms=[lhs, rhs])
        if t.kind == "char" and t.value == "(" and self._paren_is_qualifier():
            raise DisplayError("a qualifier in parentheses must follow a statement")
        self._side = []
        first = self.chain()
        j = self.i
        while j < len(self.toks) and self.toks[j].kind == "cmd" and self.toks[j].value in ("\\quad", "\\qquad", "\\;"):
            j += 1
        if j < len(self.toks) and self.toks[j].kind == "cmd" and self.toks[j].value in IMPLICATIONS:
            self.i = j
            kind = {"=>": "implies", "therefore": "iff", "<=>": "iff"}[IMPLICATIONS[self.take().value]]
            while self.is_cmd("\\quad") or self.is_cmd("\\qquad"):
                self.i += 1
            second = self.chain()
            st = Statement(kind, parts=[first, second])
        else:
            st = first
        st.side = self._side
        self._side = []
        self.tail(st)
        return st

    def tail(self, st):
        """Qualifiers after a statement: (x \\to -\\infty), \\text{when } ..., \\text{(normal)}."""
        while True:
            j = self.i
            while j < len(self.toks) and self.toks[j].kind == "cmd" and self.toks[j].value in ("\\ ", "\\quad", "\\qquad"):
                j += 1
            if j > self.i and j < len(self.toks):
                save = self.i
                self.i = j
                t = self.peek()
                if not ((t.kind == "char" and t.value == "(" and self._paren_is_qualifier())
                        or (t.kind == "text" and (t.value.startswith(("text:when", "text:for")) or re.fullmatch(r"text:\((.*)\)", t.value)))):
                    self.i = save
            t = self.peek()
            if t is None:
                return
            if t.kind == "char" and t.value == "(" and self._paren_is_qualifier():
                self.take("char", "(")
                st.qualifiers.append(("paren", self.chain()))
                self.take("char", ")")
            elif t.kind == "text" and re.fullmatch(r"text:\((.*)\)", t.value):
                st.tag = re.fullmatch(r"text:\((.*)\)", t.value).group(1)
                self.i += 1
            elif t.kind == "text" and t.value.startswith("text:when"):
                self.i += 1
                st.qualifiers.append(("when", self.chain()))
            elif t.kind == "text" and t.value.startswith("text:for"):
                self.i += 1
                depth = 0  # "for y^u (torch, entmath)": a reminder of the convention, no mathematics
                while self.peek() is not None and not (depth == 0 and (self.is_char(",") or self.is_char(".")
                                                                      or self.is_cmd("\\qquad"))):
                    depth += {"(": 1, ")": -1}.get(self.peek().value, 0) if self.peek().kind == "char" else 0
                    self.i += 1
            else:
                return

    def _paren_is_qualifier(self):
        depth, j = 0, self.i
        while j < len(self.toks):
            t = self.toks[j]
            if t.kind == "char" and t.value == "(":
                depth += 1
            elif t.kind == "char" and t.value == ")":
                depth -= 1
                if depth == 0:
                    nxt = self.toks[j + 1] if j + 1 < len(self.toks) else None
                    closes = nxt is None or (nxt.kind == "char" and nxt.value in ".,") or \
                        (nxt.kind == "cmd" and nxt.value in ("\\qquad", "\\quad"))
                    return closes and has_rel
            elif depth == 1 and ((t.kind == "cmd" and (t.value in RELATIONS or t.value == "\\in"))
                                 or (t.kind == "char" and t.value in "=<>")):
                has_rel = True
            if j == self.i:
                has_rel = False
            j += 1
        return False

    def chain(self):
        terms, rels, side = [self.expr()], [], []
        while True:
            t = self.peek()
            rel = None
            if t is not None and t.kind == "char" and t.value in "=<>":
                rel = RELATIONS[t.value]
            elif t is not None and t.kind == "cmd" and t.value in RELATIONS:
                rel = RELATIONS[t.value]
            if rel is None:
                break
            self.i += 1
            terms.append(self.expr())
            rels.append(rel)
        # a range "j = 1, \dots, n"
        if rels == ["="] and self.is_char(",") and self.is_cmd("\\dots", 1):
            self.i += 2
            self.take("char", ",")
            hi = self.expr()
            return Statement("range", terms=[terms[0], terms[1], hi])
        return Statement("chain", terms=terms, rels=rels)

    # -- expressions
    def expr(self):
        if self.is_char("+") or self.is_char("-"):
            sign = self.take().value
            left = self.term()
            if sign == "-":
                left = N("neg", left)
        else:
            left = self.term()
        while self.is_char("+") or self.is_char("-"):
            op = self.take().value
            right = self.term()
            left = N("add" if op == "+" else "sub", left, right)
        return left

    def term(self):
        factors = [self.factor()]
        while True:
            t = self.peek()
            if t is None:
                break
            if t.kind == "cmd" and t.value in ("\\cdot", "\\times"):
                self.i += 1
                factors.append(N("dot", factors.pop(), self.factor()))
                continue
            if t.kind == "char" and t.value == "/":
                self.i += 1
                factors.append(N("div", N("mul", *factors), self.factor()))
                factors = [factors.pop()]
                continue
            if self.starts_factor():
                factors.append(self.factor())
                continue
            break
        return factors[0] if len(factors) == 1 else N("mul", *factors)

    def starts_factor(self):
        t = self.peek()
        if t is None:
            return False
        if t.kind in ("num", "letter"):
            if t.kind == "letter" and t.value == "d" and getattr(self, "_stop_at_d", False) and self._is_differential():
                return False
            return True
        if t.kind == "text":
            name = t.value.split(":", 1)[1]
            return t.value.startswith(("mathbb", "mathbf", "operatorname", "mathrm", "mathcal")) or \
                (t.value.startswith("text:") and re.fullmatch(r"[A-Za-z]+", name) is not None
                 and name not in ("so", "and", "when", "for", "wins"))
        if t.kind == "char":
            if t.value == "(" and self._paren_is_qualifier():
                return False
            if t.value == "|":
                return not getattr(self, "_in_abs", False)
            return t.value in "(["
        if t.kind == "cmd":
            v = t.value
            if v in RELATIONS or v in IMPLICATIONS or v in ("\\qquad", "\\quad", "\\cdot", "\\times", "\\\\", "\\ ",
                                                             "\\in", "\\sim", "\\dots", "\\mid", "\\rfloor",
                                                             "\\rvert", "\\rangle"):
                return False
            if v == "\\|":
                return not getattr(self, "_in_norm", False) and not getattr(self, "_in_args", False)
            return True
        return False

    def _is_differential(self):
        # "d x" at the end of an integrand: d, then a name (and maybe its argument), then the end
        j = self.i + 1
        if j >= len(self.toks) or self.toks[j].kind != "letter":
            return False
        j += 1
        if j < len(self.toks) and self.toks[j].kind == "char" and self.toks[j].value == "(":
            depth = 0
            while j < len(self.toks):
                depth += {"(": 1, ")": -1}.get(self.toks[j].value, 0) if self.toks[j].kind == "char" else 0
                j += 1
                if depth == 0:
                    break
        nxt = self.toks[j] if j < len(self.toks) else None
        return nxt is None or nxt.kind in ("char",) and nxt.value in ",.=)" or \
            nxt.kind == "cmd" and (nxt.value in RELATIONS or nxt.value in ("\\qquad", "\\quad"))

    def group(self):
        """A braced group, or a single token as a TeX macro argument."""
        if self.is_char("{"):
            self.take("char", "{")
            saved = self.__dict__.get("_stop_at_d", False)
            self._stop_at_d = False
            inner = self.expr_or_chain()
            self._stop_at_d = saved
            self.take("char", "}")
            return inner
        t = self.take()
        if t.kind == "num" and len(t.value) > 1 and "." not in t.value:
            # \tfrac12: one digit is the argument, the rest stays for the next one
            self.toks.insert(self.i, Tok("num", t.value[1:], t.pos + 1, t.end))
            return N("num", value=t.value[0], tok=Tok("num", t.value[0], t.pos, t.pos + 1))
        self.i -= 1
        return self.atom()

    def expr_or_chain(self):
        st = self.chain()
        if st.kind == "chain" and not st.rels:
            return st.terms[0]
        return N("relation", st)

    def factor(self):
        t = self.peek()
        if t.kind == "cmd":
            v = t.value
            if v in ("\\frac", "\\tfrac", "\\dfrac"):
                return self.postfix(self.fraction())
            if v == "\\sqrt":
                self.i += 1
                return self.postfix(N("fn", self.group(), name="sqrt"))
            if v in ("\\log", "\\ln", "\\exp", "\\tanh", "\\sinh", "\\cosh", "\\arctan", "\\sin", "\\cos"):
                return self.function(v[1:])
            if v in ("\\sum", "\\prod"):
                return self.bigop(v[1:])
            if v == "\\int":
                return self.integral()
            if v == "\\lim":
                return self.limit()
            if v in ("\\max", "\\min", "\\inf", "\\sup") and not self.is_char("(", 1):
                return self.extremum(v[1:])
            if v == "\\underbrace":
                self.i += 1
                inner = self.group()
                self.take("char", "_")
                label = self.group()
                self._side.append((inner, label))
                return N("paren", inner)
            if v == "\\nabla":
                self.i += 1
                order, wrt = 1, None
                if self.is_char("^"):
                    self.i += 1
                    order = int(self.take("num").value)
                if self.is_char("_"):
                    self.i += 1
                    wrt = self.group()
                return N("nabla", self.factor(), wrt, order=order)
            if v == "\\partial":
                # \partial L / \partial t inside a fraction
                self.i += 1
                num = self.name_with_sub()
                self.take("char", "/")
                self.take("cmd", "\\partial")
                den = self.name_with_sub()
                return N("deriv", num, order=1, wrt=[den])
            if v == "\\begin":
                return self.cases()
        return self.postfix(self.atom())

    def fraction(self):
        self.i += 1
        save = self.i
        num = self._derivative_numerator()
        if num is not None:
            den = self._derivative_denominator()
            if den is not None:
                order, fexpr = num
                if order != len(den):
                    raise DisplayError(f"a derivative of order {order} with respect to {len(den)} variable(s)")
                if fexpr is None:  # operator form: \frac{d}{dx} f
                    fexpr = self.term()
                return N("deriv", fexpr, order=order, wrt=den)
        self.i = save
        a = self.group()
        b = self.group()
        return N("div", a, b)

    def _derivative_numerator(self):
        if not self.is_char("{"):
            return None
        j = self.i + 1
        t = self.toks[j] if j < len(self.toks) else None
        if t is None or not ((t.kind == "letter" and t.value == "d") or (t.kind == "cmd" and t.value == "\\partial")):
            return None
        self.i = j + 1
        order = 1
        if self.is_char("^"):
            self.i += 1
            order = int(self.take("num").value)
        if self.is_char("}"):
            self.i += 1
            return order, None
        saved = self.__dict__.get("_stop_at_d", False)
        self._stop_at_d = False
        try:
            f = self.expr()
        except DisplayError:
            return None
        self._stop_at_d = saved
        if not self.is_char("}"):
            return None
        self.i += 1
        return order, f

    def _derivative_denominator(self):
        if not self.is_char("{"):
            return None
        self.i += 1
        wrt = []
        while not self.is_char("}"):
            t = self.take()
            if not ((t.kind == "letter" and t.value == "d") or (t.kind == "cmd" and t.value == "\\partial")):
                return None
            v = self.name_with_sub()
            power = 1
            if self.is_char("^"):
                self.i += 1
                power = int(self.take("num").value)
            wrt += [v] * power
        self.i += 1
        return wrt

    def function(self, name):
        self.i += 1
        base = None
        power = None
        if name == "log" and self.is_char("_"):
            self.i += 1
            base = self.group()
        if self.is_char("^"):
            self.i += 1
            power = self.group()
        arg = self.operand()
        node = N("fn", arg, name={"ln": "log"}.get(name, name), base=base)
        if power is not None:
            node = N("pow", node, power)
        return self.postfix(node) if self.is_char("^") else node

    def operand(self):
        """The argument of \\log and its kin: a parenthesised group, a fraction, a sum, or one
        factor with its subscripts, superscripts and call parentheses."""
        if self.is_cmd("\\sum") or self.is_cmd("\\prod"):
            return self.factor()
        if self.is_cmd("\\frac") or self.is_cmd("\\tfrac") or self.is_cmd("\\dfrac"):
            return self.fraction()
        return self.postfix(self.atom())

    def bigop(self, kind):
        self.i += 1
        var, lo, hi, over = None, None, None, None
        if self.is_char("_"):
            self.i += 1
            if self.is_char("{"):
                self.take("char", "{")
                var = self.atom(allow_power=True)
                if self.is_char("="):
                    self.i += 1
                    lo = self.expr()
                elif self.is_cmd("\\in"):
                    self.i += 1
                    over = ("in", self.expr())
                elif self.is_cmd("\\ne") or self.is_cmd("\\neq"):
                    self.i += 1
                    over = ("ne", self.expr())
                elif self.is_char(":"):  # \sum_{i:\, p_i > 0}: the indices where a condition holds
                    self.i += 1
                    over = ("where", self.chain())
                self.take("char", "}")
            else:
                var = self.atom(allow_power=False)
            if self.is_char("^"):
                self.i += 1
                hi = self.group()
        body = self.term()
        return N(kind, body, var=var, lo=lo, hi=hi, over=over)

    def integral(self):
        self.i += 1
        lo = hi = None
        for _ in range(2):
            if self.is_char("_"):
                self.i += 1
                lo = self.group()
            elif self.is_char("^"):
                self.i += 1
                hi = self.group()
        saved = self.__dict__.get("_stop_at_d", False)
        self._stop_at_d = True
        body = self.term()
        self._stop_at_d = saved
        if not self.at("letter", "d") and body.op == "div" and body.args[0].op == "mul" \
                and len(body.args[0].args) == 2 and body.args[0].args[0].op == "name" \
                and body.args[0].args[0].info.get("base") == "d" and body.args[0].args[1].op == "name":
            # \int \frac{dx}{f(x)}: the differential in the numerator
            var = body.args[0].args[1]
            return N("int", N("div", N("num", value="1"), body.args[1]), var=var, lo=lo, hi=hi)
        self.take("letter", "d")
        var = self.atom(allow_power=False)
        if self.is_char("("):  # dF(t): a Stieltjes integral
            args = self.call_args()
            var = N("call", var, *args)
        return N("int", body, var=var, lo=lo, hi=hi)

    def limit(self):
        self.i += 1
        self.take("char", "_")
        self.take("char", "{")
        var = self.atom(allow_power=False)
        self.take("cmd", "\\to")
        sign = None
        if self.is_char("+") or self.is_char("-"):
            sign = self.take().value
        point = self.atom(allow_power=False)
        direction = None
        if self.is_char("^"):
            self.i += 1
            d = self.take()
            if d.value == "{":
                d = self.take()
                self.take("char", "}")
            direction = d.value
        self.take("char", "}")
        body = self.term()
        return N("lim", body, var=var, point=point, sign=sign, dir=direction)

    def extremum(self, kind):
        self.i += 1
        self.take("char", "_")
        var = self.group()
        body = self.term()
        return N("extremum", body, var=var, kind=kind)

    def cases(self):
        self.take("cmd", "\\begin")
        env = self.take("char", "{")
        name = self.take("letter").value
        while not self.is_char("}"):
            name += self.take().value
        self.take("char", "}")
        if name != "cases":
            raise DisplayError(f"environment {name} is not supported")
        branches = []
        while True:
            value = self.expr()
            if self.is_char(","):
                self.i += 1
            self.take("char", "&")
            cond = self.chain()
            while self.is_char(",") or self.is_char("."):
                self.i += 1
            branches.append((value, cond))
            if self.is_cmd("\\\\"):
                self.i += 1
                continue
            break
        self.take("cmd", "\\end")
        self.take("char", "{")
        while not self.is_char("}"):
            self.i += 1
        self.take("char", "}")
        return N("cases", *branches)

    # -- atoms and postfix
    def atom(self, allow_power=True):
        t = self.take()
        if t.kind == "num":
            node = N("num", value=t.value, tok=t)
        elif t.kind == "letter":
            node = N("name", base=t.value)
        elif t.kind == "text":
            cmd, content = t.value.split(":", 1)
            if cmd == "mathbb" and content == "E":
                sub = None
                if self.is_char("_"):
                    self.i += 1
                    sub = self.sub_group()
                if self.is_char("[") or self.is_cmd("\\ ") is False and self.is_char("("):
                    close = "]" if self.is_char("[") else ")"
                    self.i += 1
                    body = self.expr()
                    self.take("char", close)
                else:
                    body = self.term()
                return N("expect", body, sub=sub)
            if cmd == "mathbb" and content == "R":
                return N("name", base="R_reals")
            if cmd == "mathbf" and content == "1":
                return N("ones")
            if cmd == "mathcal" and re.fullmatch(r"[A-Za-z]", content):
                node = N("name", base="cal" + content)  # \mathcal{L}: the key "calL"
                return node
            if cmd.startswith("operatorname") or cmd in ("mathrm", "text", "mathit", "textrm"):
                if content in ("argmax",):
                    raise DisplayError("argmax events are not evaluated")
                node = N("name", base=content.replace(" ", ""))
                if cmd.startswith("operatorname") and content not in ("log1p",) and \
                        not self.is_char("(") and not self.is_char("_") and self.starts_factor():
                    return N("apply", node, self.postfix(self.atom()))
                if content == "log1p":
                    arg = self.operand()
                    return N("fn", arg, name="log1p")
            else:
                raise DisplayError(f"\\{cmd}{{{content}}} is not supported")
        elif t.kind == "cmd":
            v = t.value[1:]
            if v in GREEK:
                node = N("name", base={"varepsilon": "epsilon", "varphi": "varphi"}.get(v, v))
            elif v == "infty":
                node = N("inf")
            elif v in ("hat", "tilde", "bar"):
                inner = self.group()
                if inner.op != "name":
                    raise DisplayError(f"\\{v} of an expression")
                inner.info["accent"] = v
                node = inner
            elif v == "|":
                self._in_norm = True
                inner = self.expr()
                self._in_norm = False
                self.take("cmd", "\\|")
                node = N("norm", inner)
                if self.is_char("_"):
                    self.i += 1
                    if self.take("num").value != "2":
                        raise DisplayError("only the Euclidean norm")
            elif v == "lvert":
                inner = self.expr()
                self.take("cmd", "\\rvert")
                node = N("abs", inner)
            elif v == "lfloor":
                inner = self.expr()
                self.take("cmd", "\\rfloor")
                node = N("floor", inner)
            elif v == "max" or v == "min":
                node = N("name", base=v)
            elif v == "ast":
                node = N("name", base="*")
            else:
                raise DisplayError(f"\\{v} is not supported")
        elif t.kind == "char":
            if t.value == "(":
                node = self.paren_group(")")
            elif t.value == "[":
                inner = self.expr_or_chain()
                self.take("char", "]")
                node = N("event", inner.args[0]) if inner.op == "relation" else N("paren", inner)
                if self.is_char("_"):  # [ ... ]_{t = t_k}: evaluation at a point
                    self.i += 1
                    at = self.sub_group()
                    node = N("at", inner, at)
            elif t.value == "{":
                self.i -= 1
                node = N("paren", self.group())
            elif t.value == "|":
                saved = self.__dict__.get("_in_abs", False)
                self._in_abs = True
                inner = self.expr()
                self._in_abs = saved
                self.take("char", "|")
                node = N("abs", inner)
            else:
                raise DisplayError(f"unexpected {t.value!r} at offset {t.pos}")
        else:  # pragma: no cover
            raise DisplayError(f"unexpected token {t}")
        return node

    def name_with_sub(self):
        v = self.atom(allow_power=False)
        if self.is_char("_") and v.op == "name":
            self.i += 1
            v.info["sub"] = self.two_indices() or self.sub_group()
        return v

    def two_indices(self):
        """``{ri}`` after a name (not delta): two one-letter indices, row and class, or None."""
        if not (self.is_char("{") and self.at("letter", k=1) and self.at("letter", k=2) and self.is_char("}", 3)):
            return None
        self.take("char", "{")
        sub = N("tuple", self.atom(allow_power=False), self.atom(allow_power=False))
        self.take("char", "}")
        return sub

    def paren_group(self, close):
        args = self.arg_list(close)
        self.take("char", close)
        return N("paren", args[0]) if len(args) == 1 else N("tuple", *args)

    def arg_list(self, close):
        saved = self.__dict__.get("_in_args", False)
        self._in_args = True
        saved_d = self.__dict__.get("_stop_at_d", False)
        self._stop_at_d = False
        args = [self.expr_or_chain()]
        while self.is_char(",") or self.is_char(";") or self.is_cmd("\\|"):
            self.i += 1
            args.append(self.expr_or_chain())
        self._in_args = saved
        self._stop_at_d = saved_d
        return args

    def call_args(self):
        self.take("char", "(")
        args = self.arg_list(")")
        self.take("char", ")")
        return args

    def sub_group(self):
        if self.is_char("{"):
            self.take("char", "{")
            inner = self.expr_or_chain() if not (self.is_cmd("\\max") or self.is_cmd("\\min")) else \
                N("name", base=self.take().value[1:])
            if self.is_cmd("\\sim"):
                self.i += 1
                inner = N("sim", inner, self.expr())
            elif self.is_char(",") or self.is_char(";"):
                rest = [inner]
                while self.is_char(","):
                    self.i += 1
                    rest.append(self.expr())
                inner = N("tuple", *rest)
            self.take("char", "}")
            return inner
        t = self.peek()
        if t.kind == "num" and len(t.value) > 1 and "." not in t.value:
            return self.group()
        return self.atom(allow_power=False)

    def postfix(self, node):
        while True:
            if self.is_char("_") and node.op in ("name", "call", "apply", "paren") and "sub" not in node.info:
                self.i += 1
                if node.op == "name" and node.info.get("base") == "delta" and self.is_char("{"):
                    # Kronecker delta_{ij}: two indices
                    self.take("char", "{")
                    a = self.atom(allow_power=False)
                    b = self.atom(allow_power=False)
                    self.take("char", "}")
                    node.info["sub"] = N("tuple", a, b)
                elif node.op == "name":
                    node.info["sub"] = self.two_indices() or self.sub_group()
                else:
                    node = N("index", node, self.sub_group())
                continue
            if self.is_char("^"):
                nxt = self.peek(1)
                if node.op == "name" and nxt is not None and self._is_decoration(nxt):
                    self.i += 1
                    node.info["deco"] = self._decoration()
                    continue
                if nxt is not None and nxt.kind == "cmd" and nxt.value == "\\top":
                    self.i += 2
                    node = N("transpose", node)
                    continue
                if nxt is not None and nxt.kind == "char" and nxt.value == "{" and self.at("cmd", "\\top", 2) \
                        and self.at("char", "}", 3):
                    self.i += 4
                    node = N("transpose", node)
                    continue
                self.i += 1
                exponent = self.group()
                if node.op == "name" and node.info.get("base") == "e" and "sub" not in node.info:
                    node = N("fn", exponent, name="exp")
                else:
                    node = N("pow", node, exponent)
                continue
            if self.is_char("'") and node.op == "name":
                self.i += 1
                node.info["primes"] = node.info.get("primes", 0) + 1
                continue
            # f(x)(y) is f(x) times (y): p_i (w_i - \bar w)(w_i - \bar w)^{\top} (no display curries a call)
            if self.is_char("(") and node.op == "name" and not self._paren_is_qualifier() \
                    and not (node.op == "name" and node.info.get("base") == "e" and "sub" not in node.info):
                node = N("call", node, *self.call_args())
                continue
            return node

    def _is_decoration(self, t):
        if t.kind == "char" and t.value == "*":
            return True
        if t.kind == "cmd" and t.value == "\\ast":
            return True
        if t.kind == "char" and t.value == "{":
            nxt, nxt2 = self.peek(2), self.peek(3)
            if nxt is None:
                return False
            if nxt.kind == "text":
                return True
            if nxt.kind == "char" and nxt.value == "*":
                return True
            if nxt.kind == "char" and nxt.value == "(":  # p^{(k)}
                return True
            if nxt.kind == "char" and nxt.value == "-" and nxt2 is not None and nxt2.value == "1" \
                    and self.at("char", "}", 4) and self.at("char", "(", 5):
                return True
        return False

    def _decoration(self):
        t = self.take()
        if t.kind == "char" and t.value == "*" or t.kind == "cmd":
            return "*"
        out = []
        depth = 1
        while depth:
            t = self.take()
            if t.kind == "char" and t.value == "{":
                depth += 1
            elif t.kind == "char" and t.value == "}":
                depth -= 1
                if depth == 0:
                    break
            out.append(t.value.split(":", 1)[-1] if t.kind == "text" else t.value)
        return "".join(out)


def parse(text: str) -> list:
    """The statements of a display (see :class:`Statement`)."""
    p = Parser(tokenize(text))
    p._side = []
    statements = p.display()
    return statements


# ------------------------------------------------------------------------------------------------
# Canonical names

def sub_text(node) -> str:
    if node is None:
        return ""
    if node.op == "num":
        return node.info["value"]
    if node.op == "name":
        return name_key(node)
    if node.op == "add":
        return sub_text(node.args[0]) + "+" + sub_text(node.args[1])
    if node.op == "sub":
        return sub_text(node.args[0]) + "-" + sub_text(node.args[1])
    if node.op == "mul":
        return "".join(sub_text(a) for a in node.args)
    if node.op == "tuple":
        return ",".join(sub_text(a) for a in node.args)
    if node.op == "call":
        return sub_text(node.args[0]) + "(" + ",".join(sub_text(a) for a in node.args[1:]) + ")"
    return "?"


def name_key(node, with_sub=True) -> str:
    info = node.info
    key = info["base"]
    if info.get("accent"):
        key = f"{info['accent']} {key}"
    if info.get("deco"):
        key += "^" + info["deco"]
    key += "'" * info.get("primes", 0)
    if with_sub and info.get("sub") is not None:
        key += "_" + sub_text(info["sub"])
    return key


# ------------------------------------------------------------------------------------------------
# Values

class Vec:
    """A numeric vector with 1-based indexing and elementwise arithmetic (mpmath or float entries)."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i - 1]

    def _op(self, other, f):
        if isinstance(other, Vec):
            if len(other) != len(self):
                raise DisplayError("vectors of different lengths")
            return Vec(f(a, b) for a, b in zip(self.items, other.items))
        return Vec(f(a, other) for a in self.items)

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    __radd__ = __add__

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._op(o, lambda a, b: b - a)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    __rmul__ = __mul__

    def __truediv__(self, o):
        return self._op(o, lambda a, b: a / b)

    def __rtruediv__(self, o):
        return self._op(o, lambda a, b: b / a)

    def __neg__(self):
        return Vec(-a for a in self.items)

    def __pow__(self, o):
        return self._op(o, lambda a, b: a ** b)

    def __repr__(self):
        return f"Vec({self.items!r})"


class Fn:
    """A function that also stands for its value at one point: ``H`` and ``H(\\gamma)`` in one
    display.  Called, it is the function; used as a value, it is ``f(point)``; its primes are
    derivatives, with values at the same point."""

    def __init__(self, f, point, order=0):
        self.f, self.point, self.order = f, point, order

    def __call__(self, *args):
        return self.f(*args)

    @property
    def at(self):
        if not hasattr(self, "_at"):
            self._at = self.f(*self.point) if isinstance(self.point, tuple) else self.f(self.point)
        return self._at


def _sympy():
    import sympy
    return sympy


def _is_sym(x):
    sp = _sympy()
    return isinstance(x, (sp.Basic, sp.MatrixBase))


def _is_np(x):
    import numpy as np
    return isinstance(x, np.ndarray)


def _is_vector(x):
    if isinstance(x, Vec):
        return True
    sp = _sympy()
    return isinstance(x, sp.MatrixBase) and 1 in x.shape


def _index(value, i):
    sp = _sympy()
    if isinstance(value, Fn):
        value = value.at
    if isinstance(i, (sp.Integer,)):
        i = int(i)
    if isinstance(value, dict):
        return value[i]
    if isinstance(i, tuple) and not isinstance(value, sp.MatrixBase):
        # two indices: a row, then an entry of it (or a function of both)
        if callable(value) and not isinstance(value, (Vec, list, tuple)):
            return value(*i)
        for k in i:
            value = _index(value, k)
        return value
    if isinstance(value, Vec):
        return value[i]
    if isinstance(value, sp.MatrixBase):
        if isinstance(i, tuple):
            return value[i[0] - 1, i[1] - 1]
        return value[i - 1]
    if _is_np(value):
        import numpy as np
        if isinstance(i, np.ndarray):
            return value[..., i - 1] if value.ndim > 1 else value[i - 1]
        return value[i - 1]
    if isinstance(value, (list, tuple)):
        return value[i - 1]
    if callable(value):
        return value(i)
    raise DisplayError(f"cannot index {type(value).__name__}")


def _length(value):
    sp = _sympy()
    if isinstance(value, sp.MatrixBase):
        return value.shape[0] * value.shape[1]
    return len(value)


@dataclass
class Event:
    """``P[M \\le t]``: the relation, and the context to evaluate it in (for a sampler)."""
    statement: Statement
    ctx: "Ctx"

    def holds(self, **values):
        return holds_all(self.statement, self.ctx.bind(**values))

    def mean(self):
        """The fraction of samples (numpy arrays in the context) for which the relation holds."""
        import numpy as np
        vals = [evaluate(t, self.ctx) for t in self.statement.terms]
        ok = True
        for rel, x, y in zip(self.statement.rels, vals, vals[1:]):
            ok = ok & {"<=": np.less_equal, ">=": np.greater_equal, "<": np.less, ">": np.greater}[rel](x, y)
        return float(np.mean(ok))


class Ctx:
    def __init__(self, env):
        self.env = env
        self.mode = env.get("__mode__", "sym")

    def bind(self, **kw):
        c = Ctx({**self.env, **kw})
        return c

    def num(self, text):
        if self.mode == "sym":
            return _sympy().Rational(text) if "." in text else _sympy().Integer(int(text))
        if self.mode == "np":
            return float(text)
        return mp.mpf(text)

    def indices(self, var):
        idx = self.env.get("__index__", {})
        if var in idx:
            return idx[var]
        if "*" in idx:
            return idx["*"]
        raise DisplayError(f"no index range for {var}")


def _fn(name, x, mode):
    """An elementary function on SymPy, mpmath, float or numpy values (elementwise on vectors)."""
    sp = _sympy()
    if isinstance(x, Vec):
        return Vec(_fn(name, a, mode) for a in x)
    if isinstance(x, sp.MatrixBase):
        return x.applyfunc(lambda a: _fn(name, a, mode))
    if _is_np(x) or mode == "np" and isinstance(x, float):
        import numpy as np
        return {"log": np.log, "exp": np.exp, "sqrt": np.sqrt, "tanh": np.tanh, "sinh": np.sinh,
                "cosh": np.cosh, "arctan": np.arctan, "log1p": np.log1p, "sin": np.sin, "cos": np.cos,
                "floor": np.floor, "abs": np.abs}[name](x)
    if _is_sym(x):
        return {"log": sp.log, "exp": sp.exp, "sqrt": sp.sqrt, "tanh": sp.tanh, "sinh": sp.sinh,
                "cosh": sp.cosh, "arctan": sp.atan, "log1p": lambda v: sp.log(1 + v), "sin": sp.sin,
                "cos": sp.cos, "floor": sp.floor, "abs": sp.Abs}[name](x)
    if mode == "sym":
        return _fn(name, _sympy().sympify(x), mode)
    x = mp.mpf(x) if not isinstance(x, (mp.mpf, mp.mpc)) else x
    if name == "log" and x == 0:
        return mp.ninf
    if name == "exp" and isinstance(x, mp.mpf) and abs(x) > mp.mpf(10) ** 30:
        # quadrature nodes far out (e^{-C e^{-e}} at e = -1e10) would have mpmath reduce arguments of
        # 10^10 digits; beyond e^{+-1e30} take the limits, 0 and +inf (no display needs more)
        return mp.mpf(0) if x < 0 else mp.inf
    return {"log": mp.log, "exp": mp.exp, "sqrt": mp.sqrt, "tanh": mp.tanh, "sinh": mp.sinh,
            "cosh": mp.cosh, "arctan": mp.atan, "log1p": mp.log1p, "sin": mp.sin, "cos": mp.cos,
            "floor": mp.floor, "abs": abs}[name](x)


def _is_zero(x):
    try:
        return not _is_np(x) and not isinstance(x, (Vec,)) and not (_is_sym(x) and not x.is_number) and x == 0
    except Exception:
        return False


def _mul(a, b):
    """Product with the book's convention 0 * log 0 = 0 (a scalar 0 times anything is 0)."""
    sp = _sympy()
    if _is_zero(a) and not isinstance(b, (Vec, sp.MatrixBase)) and not _is_np(b):
        return a
    if _is_zero(b) and not isinstance(a, (Vec, sp.MatrixBase)) and not _is_np(a):
        return b
    if isinstance(a, sp.MatrixBase) and isinstance(b, sp.MatrixBase):
        if a.shape[1] == b.shape[0]:
            r = a * b
            return r[0, 0] if r.shape == (1, 1) else r
        raise DisplayError(f"cannot multiply {a.shape} by {b.shape}")
    return a * b


def _dot(a, b):
    sp = _sympy()
    if _is_vector(a) and _is_vector(b):
        if isinstance(a, sp.MatrixBase):
            return (a.T * b)[0, 0] if a.shape[1] == 1 else (a * b)[0, 0]
        return sum(x * y for x, y in zip(a, b))
    return _mul(a, b)


def evaluate(node, ctx: Ctx):
    """The value of an expression node in an environment."""
    op = node.op
    a = node.args
    if op == "num":
        return ctx.num(node.info["value"])
    if op == "inf":
        return _sympy().oo if ctx.mode == "sym" else (float("inf") if ctx.mode == "np" else mp.inf)
    if op == "name":
        value = lookup(node, ctx)
        return value.at if isinstance(value, Fn) else value
    if op == "paren":
        return evaluate(a[0], ctx)
    if op == "tuple":
        return tuple(evaluate(x, ctx) for x in a)
    if op == "neg":
        return -evaluate(a[0], ctx)
    if op == "add":
        return evaluate(a[0], ctx) + evaluate(a[1], ctx)
    if op == "sub":
        return evaluate(a[0], ctx) - evaluate(a[1], ctx)
    if op == "mul":
        value = evaluate(a[0], ctx)
        pending = None
        if isinstance(value, _PowerOf):
            pending, value = value, None
        for x in a[1:]:
            if pending is not None:  # f^2 x, f^2(x): the power of f at the next factor
                arg = evaluate(x, ctx)
                arg = pending(*arg) if isinstance(arg, tuple) else pending(arg)
                value, pending = (arg if value is None else _mul(value, arg)), None
                continue
            if x.op == "pow" and x.args[0].op == "name" and x is not a[-1]:
                power = evaluate(x, ctx)
                if isinstance(power, _PowerOf):
                    pending = power
                    continue
            if x.op == "event" and callable(value):
                value = value(Event(x.args[0], ctx))
                continue
            if x.op in ("paren", "tuple") and callable(value) and not _is_sym(value):
                value = value(*(evaluate(x, ctx) if x.op != "tuple" else evaluate(x, ctx)))
                continue
            value = _mul(value, evaluate(x, ctx))
        return value
    if op == "dot":
        return _dot(evaluate(a[0], ctx), evaluate(a[1], ctx))
    if op == "div":
        num, den = evaluate(a[0], ctx), evaluate(a[1], ctx)
        if ctx.mode == "sym" and isinstance(num, int) and isinstance(den, int):
            return _sympy().Rational(num, den)
        return num / den
    if op == "pow":
        if a[0].op == "call" and len(a[0].args) == 2 and a[0].args[0].op == "name":
            head = lookup(a[0].args[0], ctx)
            if not callable(head) or (_is_sym(head) and not isinstance(head, _sympy().Lambda)):
                # lambda (LSE + c)^2: a product, whose last factor is squared
                head = head.at if isinstance(head, Fn) else head
                return _mul(head, evaluate(N("pow", a[0].args[1], a[1]), ctx))
        base, exponent = evaluate(a[0], ctx), evaluate(a[1], ctx)
        sp = _sympy()
        if a[0].op == "name" and callable(base) and not _is_sym(base) and not isinstance(base, (Vec, Fn)):
            return _PowerOf(base, exponent)  # sech^2: the function squared, waiting for its argument
        if isinstance(base, sp.MatrixBase) and 1 in base.shape:  # elementwise on a vector
            return base.applyfunc(lambda e: e ** exponent)
        return base ** exponent
    if op == "fn":
        name = node.info["name"]
        x = evaluate(a[0], ctx)
        if name == "log" and node.info.get("base") is not None:
            return _fn("log", x, ctx.mode) / _fn("log", evaluate(node.info["base"], ctx), ctx.mode)
        return _fn(name, x, ctx.mode)
    if op == "abs":
        x = evaluate(a[0], ctx)
        if isinstance(x, (list, tuple, set, frozenset)):
            return len(x)
        return _fn("abs", x, ctx.mode)
    if op == "floor":
        return _fn("floor", evaluate(a[0], ctx), ctx.mode)
    if op == "norm":
        x = evaluate(a[0], ctx)
        entries = list(x)
        s = sum(e * e for e in entries)
        return _fn("sqrt", s, ctx.mode)
    if op == "ones":
        n = ctx.env.get("__dim__")
        if n is None:
            raise DisplayError("\\mathbf{1} needs __dim__")
        if ctx.mode == "sym":
            return _sympy().ones(n, 1)
        return Vec([ctx.num("1")] * n)
    if op == "transpose":
        x = evaluate(a[0], ctx)
        return x.T
    if op == "call":
        f = lookup(a[0], ctx) if a[0].op == "name" else evaluate(a[0], ctx)
        args = [evaluate(x, ctx) for x in a[1:]]
        if not callable(f) or _is_sym(f) and not isinstance(f, _sympy().Lambda):
            if len(args) == 1:
                return _mul(f, args[0])
            raise DisplayError(f"{sub_text(a[0])} is not a function")
        return f(*args)
    if op == "apply":
        f = evaluate(a[0], ctx)
        return f(evaluate(a[1], ctx))
    if op == "index":
        return _index(evaluate(a[0], ctx), _as_index(evaluate(a[1], ctx)))
    if op in ("sum", "prod"):
        return _bigop(node, ctx)
    if op == "expect":
        return _expect(node, ctx)
    if op == "deriv":
        return _derivative(node, ctx)
    if op == "nabla":
        return _nabla(node, ctx)
    if op == "int":
        return _integral(node, ctx)
    if op == "lim":
        return _limit(node, ctx)
    if op == "extremum" and node.info["kind"] in ("max", "min") and node.info["var"].op == "name" \
            and "__minimize__" not in ctx.env:
        # \max_k m_k: over the index range of k
        name = name_key(node.info["var"])
        values = [evaluate(a[0], ctx.bind(**{name: k})) for k in ctx.indices(name)]
        return max(values) if node.info["kind"] == "max" else min(values)
    if op == "extremum":
        f = ctx.env.get("__minimize__")
        if f is None or node.info["kind"] not in ("min", "inf"):
            raise DisplayError(f"\\{node.info['kind']} needs __minimize__")
        var = node.info["var"]
        return f(lambda value: evaluate(a[0], ctx.bind(**{name_key(var): value})), name_key(var))
    if op == "cases":
        for value, cond in a:
            if not cond.rels:
                # a case named in words (\text{class index } t): it applies where the environment
                # says so, "__case__": "classindex"
                word = _case_word(cond.terms[0])
                if word is None:
                    raise DisplayError("a case with neither a relation nor a name")
                if ctx.env.get("__case__") == word:
                    return evaluate(value, ctx)
                continue
            if holds_all(cond, ctx):
                return evaluate(value, ctx)
        raise DisplayError("no case applies")
    if op == "at":
        rel = a[1]
        if rel.op != "relation" or rel.info.get("st") is None:
            st = rel.args[0] if rel.op == "relation" else None
        st = rel.args[0]
        var = st.terms[0]
        value = evaluate(st.terms[1], ctx)
        over = {name_key(var): value}
        if "__at__" in ctx.env:  # names whose values depend on the point (w_i, a_i at t = t_k)
            over.update(ctx.env["__at__"](value))
        return evaluate(a[0], ctx.bind(**over))
    if op == "event":  # outside P[...]: the Iverson bracket
        return ctx.num("1") if holds_all(a[0], ctx) else ctx.num("0")
    if op == "relation":
        raise DisplayError("a relation where a value was expected")
    if op == "sim":
        raise DisplayError("~ outside an expectation")
    raise DisplayError(f"cannot evaluate {op}")


def _case_word(node):
    """The name that starts a condition in words: ``classindex`` for ``\\text{class index } t``."""
    while node.op == "mul":
        node = node.args[0]
    return node.info["base"] if node.op == "name" else None


class _PowerOf:
    """``f^n`` written before its argument (``\\operatorname{sech}^2 x``): ``f(x)^n`` once applied."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def __call__(self, *args):
        return self.f(*args) ** self.n


def _as_index(v):
    sp = _sympy()
    if isinstance(v, sp.Integer):
        return int(v)
    if isinstance(v, (mp.mpf,)) and v == int(v):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, tuple):
        return tuple(_as_index(x) for x in v)
    return v


def lookup(node, ctx):
    env = ctx.env
    key = name_key(node)
    if key in env:
        return env[key]
    info = node.info
    sub = info.get("sub")
    base_key = name_key(node, with_sub=False)
    if info["base"] == "delta" and sub is not None and sub.op == "tuple":
        i, j = (_as_index(evaluate(x, ctx)) for x in sub.args)
        one, zero = ctx.num("1"), ctx.num("0")
        if _is_sym(i) or _is_sym(j):
            return _sympy().KroneckerDelta(i, j)
        return one if i == j else zero
    if sub is not None and base_key + "_" in env:  # S_k beside S: the family is "S_"
        return _index(env[base_key + "_"], _as_index(evaluate(sub, ctx)))
    deco = re.fullmatch(r"\((\w)\)", info.get("deco") or "")
    if deco and deco.group(1) in env and f"{info['base']}^()" in env:  # p^{(k)}, k bound by a sum
        value = _index(env[f"{info['base']}^()"], _as_index(env[deco.group(1)]))
        return value if sub is None else _index(value, _as_index(evaluate(sub, ctx)))
    if base_key in env:
        value = env[base_key]
        if sub is None:
            return value
        return _index(value, _as_index(evaluate(sub, ctx)))
    primes = info.get("primes", 0)
    if primes:
        plain = dict(info)
        plain["primes"] = 0
        base = lookup(Node("name", (), plain), ctx)
        if isinstance(base, Fn):
            return Fn(_derivative_function(base.f, primes, ctx), base.point)
        if callable(base):
            return _derivative_function(base, primes, ctx)
    if info["base"] in ("max", "min") and sub is None:
        return lambda *xs: (_sympy().Max if ctx.mode == "sym" else max)(*xs) if info["base"] == "max" \
            else (_sympy().Min if ctx.mode == "sym" else min)(*xs)
    if info["base"] == "pi" and sub is None:
        return _sympy().pi if ctx.mode == "sym" else (math.pi if ctx.mode == "np" else mp.pi)
    if info["base"] == "e" and sub is None and "e" not in env:
        return _sympy().E if ctx.mode == "sym" else (math.e if ctx.mode == "np" else mp.e)
    if info["base"] == "diag" and sub is None:
        return lambda v: _sympy().diag(*list(v))
    raise DisplayError(f"no value for {key}")


def _derivative_function(f, order, ctx):
    if ctx.mode == "sym":
        sp = _sympy()
        x = sp.Dummy("x", real=True)
        expr = sp.diff(f(x), x, order)
        return lambda v: expr.subs(x, v)
    return lambda v: mp.diff(f, v, order)


def _index_values(node, ctx):
    """(variable name, list of index values) of a sum or product."""
    var = node.info["var"]
    if var is None:
        raise DisplayError("a sum needs an index")
    name = name_key(var)
    lo, hi, over = node.info["lo"], node.info["hi"], node.info["over"]
    if lo is not None:
        lo_v = int(_as_index(evaluate(lo, ctx)))
        hi_v = int(_as_index(evaluate(hi, ctx)))
        return name, list(range(lo_v, hi_v + 1))
    full = list(ctx.indices(name))
    if over is None:
        return name, full
    kind, what = over
    if kind == "where":
        return name, [i for i in full if holds_all(what, ctx.bind(**{name: i}))]
    value = evaluate(what, ctx)
    if kind == "in":
        return name, [int(_as_index(v)) for v in value]
    value = _as_index(value)
    return name, [i for i in full if i != value]


def _bigop(node, ctx):
    name, values = _index_values(node, ctx)
    body = node.args[0]
    if ctx.mode == "np" and ctx.env.get("__vectorize__", {}).get(name):
        import numpy as np
        idx = np.array(values)
        v = evaluate(body, ctx.bind(**{name: idx}))
        return v.sum(axis=-1) if node.op == "sum" else v.prod(axis=-1)
    terms = [evaluate(body, ctx.bind(**{name: i})) for i in values]
    if node.op == "sum":
        total = terms[0] if terms else ctx.num("0")
        for t in terms[1:]:
            total = total + t
        return total
    total = ctx.num("1")
    for t in terms:
        total = total * t
    return total


def _expect(node, ctx):
    sub = node.info["sub"]
    body = node.args[0]
    if sub is not None and sub.op == "sim":
        var, dist = sub.args
        p = evaluate(dist, ctx)
        name = name_key(var)
        total = ctx.num("0")
        for i in ctx.indices(name):
            total = total + _mul(_index(p, i), evaluate(body, ctx.bind(**{name: i})))
        return total
    if sub is not None:
        p = evaluate(sub, ctx)
        x = evaluate(body, ctx)
        if not _is_vector(x):
            raise DisplayError("E_p[...] of a scalar")
        total = ctx.num("0")
        for pi, xi in zip(list(p), list(x)):
            total = total + _mul(pi, xi)
        return total
    f = ctx.env.get("__expect__")
    if f is None:
        raise DisplayError("an expectation without a distribution needs __expect__")
    return f(lambda env: evaluate(body, ctx.bind(**env)))


def _wrt_symbol(node, ctx):
    value = evaluate(node, ctx)
    return value


def _derivative(node, ctx):
    wrt = node.info["wrt"]
    f_node = node.args[0]
    key = "d(" + sub_text(f_node) + ")/d(" + ",".join(sub_text(w) for w in wrt) + ")"
    if key in ctx.env:  # a derivative the environment computed (implicit functions)
        return ctx.env[key]
    pre = ctx.env.get("__derivatives__")
    if pre is not None:
        def sub_value(w):
            if w.op == "name" and w.info.get("sub") is not None:
                return _as_index(evaluate(w.info["sub"], ctx))
            return None
        f_text = name_key(f_node, with_sub=False) if f_node.op == "name" else sub_text(f_node)
        wrt_vals = tuple(sub_value(w) for w in wrt)
        wrt_names = tuple(name_key(w, with_sub=False) for w in wrt)
        if (f_text, wrt_names, wrt_vals) in pre:
            return pre[f_text, wrt_names, wrt_vals]
        k = (f_text, sub_value(f_node), wrt_names, wrt_vals)
        if k in pre:
            return pre[k]
    if ctx.mode == "mp" and len(wrt) == 1 and wrt[0].op == "name" and isinstance(ctx.env.get(name_key(wrt[0])), mp.mpf):
        # vary one number of the environment (nothing else in it may depend on that number)
        name = name_key(wrt[0])
        x0 = ctx.env[name]
        def f(x):
            v = lookup(f_node, ctx.bind(**{name: x})) if f_node.op == "name" else evaluate(f_node, ctx.bind(**{name: x}))
            return v.f(x) if isinstance(v, Fn) else v(x) if callable(v) else v
        return mp.diff(f, x0, node.info["order"])
    if ctx.mode != "sym":
        raise DisplayError(f"derivative {key} needs a symbolic environment or __derivatives__")
    sp = _sympy()
    value = lookup(f_node, ctx) if f_node.op == "name" else evaluate(f_node, ctx)
    if isinstance(value, Fn):  # H for H(gamma), L for L(z; y): differentiate the value
        value = value.at
    syms = [_wrt_symbol(w, ctx) for w in wrt]
    if callable(value) and not _is_sym(value):
        if len(set(syms)) != 1:
            raise DisplayError("derivative of a function by several variables")
        value = value(syms[0])
    for s in syms:
        if not isinstance(s, sp.Symbol):
            raise DisplayError(f"cannot differentiate with respect to {s}")
        value = sp.diff(value, s)
    return value


def _nabla(node, ctx):
    sp = _sympy()
    pre = ctx.env.get("__gradients__")
    if pre is not None and node.args[1] is not None:  # gradients the environment computed numerically
        f_node, wrt = node.args
        sub = wrt.info.get("sub") if wrt.op == "name" else None
        key = (sub_text(f_node), name_key(wrt, with_sub=False) if wrt.op == "name" else sub_text(wrt),
               _as_index(evaluate(sub, ctx)) if sub is not None else None)
        if key in pre:
            return pre[key]
    if ctx.mode != "sym":
        raise DisplayError("gradients need a symbolic environment or __gradients__")
    f = evaluate(node.args[0], ctx)
    wrt = node.args[1]
    order = node.info["order"]
    if wrt is None:
        x = ctx.env.get("__nabla__")
        if x is None:
            raise DisplayError("\\nabla without a subscript needs __nabla__")
    else:
        x = evaluate(wrt, ctx)
    xs = list(x)
    if order == 1:
        return sp.Matrix([sp.diff(f, v) for v in xs])
    if order == 2:
        return sp.hessian(f, xs)
    raise DisplayError("\\nabla of order > 2")


def _integral(node, ctx):
    var = node.info["var"]
    body = node.args[0]
    lo = evaluate(node.info["lo"], ctx) if node.info["lo"] is not None else None
    hi = evaluate(node.info["hi"], ctx) if node.info["hi"] is not None else None
    if var.op == "call":  # d F(t): int g dF = int g F'(t) dt
        f_node, t_node = var.args[0], var.args[1]
        name = name_key(t_node)
        F = evaluate(f_node, ctx)
        prime = ctx.env.get(name_key(f_node) + "'") if f_node.op == "name" else None
        dF = prime if prime is not None else _derivative_function(F, 1, ctx)
        integrand = lambda t: _mul(evaluate(body, ctx.bind(**{name: t})), dF(t))  # noqa: E731
    else:
        name = name_key(var)
        integrand = lambda t: evaluate(body, ctx.bind(**{name: t}))  # noqa: E731
    if ctx.mode == "sym":
        sp = _sympy()
        t = sp.Symbol(name + "_int", real=True)
        expr = integrand(t)
        if any(s.is_Float for s in expr.atoms(sp.Number)) or not expr.free_symbols - {t}:
            return sp.Float(mp.quad(sp.lambdify(t, expr, "mpmath"), _split(lo, hi)), mp.mp.dps)
        return sp.integrate(expr, (t, lo, hi))
    with mp.workdps(ctx.env.get("__quad_dps__", mp.mp.dps)):
        for end, far in ((lo, -10**6), (hi, 10**6)):  # an integrand that does not vanish at an infinite end
            if end in (mp.inf, mp.ninf) and not abs(integrand(mp.mpf(far))) < mp.mpf(10) ** -8:
                raise DisplayError("the integral diverges")
        return mp.quad(integrand, _split(lo, hi, ctx.env.get("__breaks__", ())))


def _split(lo, hi, breaks=()):
    pts = [lo] + sorted(b for b in breaks if lo < b < hi) + [hi]
    if lo == -mp.inf and hi == mp.inf and not breaks:
        pts = [lo, 0, hi]
    return [mp.mpf(p) if not (p == mp.inf or p == -mp.inf) else p for p in pts]


def _limit(node, ctx):
    sp = _sympy()
    if ctx.mode != "sym":
        raise DisplayError("limits need a symbolic environment")
    var = evaluate(node.info["var"], ctx)
    point = evaluate(node.info["point"], ctx)
    if node.info["sign"] == "-":
        point = -point
    direction = node.info["dir"] or "+-"
    if direction == "-" and getattr(var, "is_positive", None) and point == 0:
        raise DisplayError("a limit from the left at 0 of a positive variable")
    if direction == "+" and getattr(var, "is_negative", None) and point == 0:
        raise DisplayError("a limit from the right at 0 of a negative variable")
    body = evaluate(node.args[0], ctx)
    if direction == "+-":
        return sp.limit(body, var, point)
    return sp.limit(body, var, point, direction)


# ------------------------------------------------------------------------------------------------
# Relations

def holds_all(st, ctx) -> bool:
    """Whether a condition (a chain such as ``j = t`` or ``j \\ne t``) holds in ``ctx``."""
    vals = [evaluate(t, ctx) for t in st.terms]
    for rel, x, y in zip(st.rels, vals, vals[1:]):
        x, y = _as_index(x), _as_index(y)
        ok = {"=": x == y, "!=": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}.get(rel)
        if ok is None:
            raise DisplayError(f"condition with {rel}")
        if not bool(ok):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Mutations

def mutants(text: str) -> list:
    """Every display that differs from ``text`` in one sign or one number.

    Signs: each ``+`` and ``-`` (binary or unary) is swapped for the other, and each inequality
    is reversed.  Numbers: each numeral is increased by one in its last digit (``1`` -> ``2``,
    ``0.511`` -> ``0.512``).  Numerals inside ``\\text``, ``\\mathrm``, ``\\operatorname`` and
    ``\\mathbf`` are names, not numbers, and are left alone.  Returns ``(description, text)``.
    """
    out = []
    for t in tokenize(text):
        if t.kind == "char" and t.value in "+-":
            new = "-" if t.value == "+" else "+"
            out.append((f"sign at {t.pos}: {t.value} -> {new}", text[:t.pos] + new + text[t.end:]))
        elif t.kind == "char" and t.value in "<>":
            new = "<" if t.value == ">" else ">"
            out.append((f"sign at {t.pos}: {t.value} -> {new}", text[:t.pos] + new + text[t.end:]))
        elif t.kind == "cmd" and t.value in ("\\le", "\\leq", "\\ge", "\\geq"):
            new = {"\\le": "\\ge", "\\leq": "\\geq", "\\ge": "\\le", "\\geq": "\\leq"}[t.value]
            out.append((f"sign at {t.pos}: {t.value} -> {new}", text[:t.pos] + new + text[t.end:]))
        elif t.kind == "num":
            new = _bump(t.value)
            out.append((f"number at {t.pos}: {t.value} -> {new}", text[:t.pos] + new + text[t.end:]))
    return out


def _bump(numeral: str) -> str:
    if "." not in numeral:
        # \tfrac12 is two arguments: bump the last digit only, like a decimal
        if len(numeral) > 1:
            return numeral[:-1] + str((int(numeral[-1]) + 1) % 10) if numeral[-1] != "9" else numeral[:-1] + "8"
        return str(int(numeral) + 1)
    whole, frac = numeral.split(".")
    digits = list(frac)
    last = int(digits[-1])
    digits[-1] = str(last + 1) if last < 9 else "8"
    return whole + "." + "".join(digits)


# ------------------------------------------------------------------------------------------------
# Verification: does every relation of the display hold in the given environments?

class DisplayCheckFailed(AssertionError):
    """A relation of the display does not hold (the message says which, and where)."""


@dataclass
class Report:
    relations: set = field(default_factory=set)   # (statement, relation) pairs checked
    kinds: dict = field(default_factory=dict)      # kind -> number of relation checks
    points: int = 0

    def add(self, key, kind):
        self.relations.add(key)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def describe(self) -> str:
        parts = [f"{k} x{v}" for k, v in sorted(self.kinds.items())]
        return f"{len(self.relations)} relation(s) in {self.points} environment(s): " + ", ".join(parts)


def _names(node, acc):
    if isinstance(node, Node):
        if node.op == "name":
            acc.add(node.info["base"])
            _names(node.info.get("sub"), acc)
        for a in node.args:
            _names(a, acc)
        for k in ("lo", "hi", "var", "base", "point"):
            _names(node.info.get(k), acc)
        if node.info.get("over"):
            _names(node.info["over"][1], acc)
    elif isinstance(node, Statement):
        for t in node.terms:
            _names(t, acc)
        for part in node.parts:
            _names(part, acc)
        for _, q in node.qualifiers:
            _names(q, acc)
    elif isinstance(node, (tuple, list)):
        for a in node:
            _names(a, acc)
    return acc


def _bound(node, acc):
    """Names bound by sums, products, expectations, integrals and limits inside ``node``."""
    if isinstance(node, Node):
        if node.op in ("sum", "prod", "int", "lim", "extremum") and isinstance(node.info.get("var"), Node) \
                and node.info["var"].op == "name":
            acc.add(node.info["var"].info["base"])
        if node.op == "expect" and node.info.get("sub") is not None and node.info["sub"].op == "sim":
            acc.add(node.info["sub"].args[0].info.get("base"))
        for a in node.args:
            _bound(a, acc)
    elif isinstance(node, Statement):
        for t in node.terms + node.parts:
            _bound(t, acc)
    elif isinstance(node, (tuple, list)):
        for a in node:
            _bound(a, acc)
    return acc


def _assignments(st, env):
    import itertools
    free = env.get("__free__", {})
    names = _names(st, set()) - _bound(st, set())
    used = [k for k in free if k in names]
    if not used:
        yield {}
        return
    for combo in itertools.product(*(free[k] for k in used)):
        yield dict(zip(used, combo))


def _split_O(node):
    """(main, g) for ``main + O(g)``, or (node, None)."""
    if node.op == "add" and node.args[1].op == "call" and node.args[1].args[0].op == "name" \
            and node.args[1].args[0].info["base"] == "O":
        return node.args[0], node.args[1].args[1]
    return node, None


def _decimal_literal(node):
    if isinstance(node, Node):
        if node.op == "num" and "." in node.info["value"]:
            return node.info["value"]
        for a in node.args:
            found = _decimal_literal(a)
            if found:
                return found
    return None


def _to_numbers(x, env):
    """The numeric values of ``x`` (one per substitution in ``__values__`` for SymPy values)."""
    sp = _sympy()
    dps = env.get("__dps__", mp.mp.dps)
    if isinstance(x, sp.MatrixBase):
        cols = [_to_numbers(e, env) for e in x]
        return [Vec(c[k] for c in cols) for k in range(len(cols[0]))]
    if isinstance(x, Vec):
        cols = [_to_numbers(e, env) for e in x]
        return [Vec(c[k] for c in cols) for k in range(len(cols[0]))]
    if isinstance(x, (tuple, list)):
        cols = [_to_numbers(e, env) for e in x]
        return [Vec(c[k] for c in cols) for k in range(len(cols[0]))]
    if _is_sym(x):
        values = env.get("__values__") or [{}]
        out = []
        for v in values:
            # exact numbers put in place (a tree walk), then one evaluation at dps digits: much
            # cheaper than compiling the expression, which lambdify does by printing it
            y = x.xreplace(_exact(v)).evalf(dps) if v else x.evalf(dps)
            if y.free_symbols:
                raise DisplayError(f"no values for {sorted(map(str, y.free_symbols))}")
            if y in (sp.oo, -sp.oo, sp.zoo, sp.nan):
                out.append({sp.oo: mp.inf, -sp.oo: mp.ninf}.get(y, mp.nan))
                continue
            try:
                out.append(mp.mpf(y))
            except TypeError:
                out.append(mp.mpc(complex(y)))
        return out
    if _is_np(x):
        return [x]
    return [x if isinstance(x, (mp.mpf, mp.mpc)) else mp.mpf(x) if not isinstance(x, bool) else x]


def _mp_function(x):
    """(symbols, mpmath function) for a SymPy expression, or None if it cannot be compiled."""
    sp = _sympy()
    syms = sorted(x.free_symbols, key=str)
    try:
        return syms, sp.lambdify(syms, x, "mpmath")
    except Exception:  # noqa: BLE001 - evalf is the fallback
        return None


def _close(a, b, rtol, atol):
    import numpy as np
    if isinstance(a, Vec) or isinstance(b, Vec):
        a = a if isinstance(a, Vec) else Vec([a] * len(b))
        b = b if isinstance(b, Vec) else Vec([b] * len(a))
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    if _is_np(a) or _is_np(b):
        return bool(np.all(np.abs(np.asarray(a, float) - np.asarray(b, float)) <= atol + rtol * np.abs(np.asarray(b, float))))
    if isinstance(a, mp.mpc) or isinstance(b, mp.mpc):
        if abs(mp.im(a)) > atol or abs(mp.im(b)) > atol:
            return False
        a, b = mp.re(a), mp.re(b)
    if mp.isnan(a) or mp.isnan(b):
        return False
    if mp.isinf(a) or mp.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def _sym_zero(r) -> bool:
    sp = _sympy()
    if isinstance(r, sp.MatrixBase):
        return all(_sym_zero(e) for e in r)
    if r == 0:
        return True
    for f in (lambda e: sp.cancel(sp.expand_log(e, force=True)), sp.cancel,
              lambda e: sp.cancel(sp.expand_log(sp.expand(e), force=True)),
              lambda e: sp.simplify(sp.expand_log(e, force=True)), sp.simplify,
              lambda e: sp.simplify(sp.powsimp(sp.expand(e), force=True).rewrite(sp.exp))):
        try:
            if f(r) == 0:
                return True
        except Exception:  # noqa: BLE001 - a simplification that cannot run proves nothing
            continue
    return False


def _exact(values):
    """Substitution values as exact SymPy numbers (a float is the binary number it is)."""
    sp = _sympy()
    out = {}
    for k, v in values.items():
        if isinstance(v, float):
            v = sp.Rational(v)
        elif isinstance(v, mp.mpf):
            v = sp.Float(v, mp.mp.dps)
        out[k] = v
    return out


def _probe(r, env, seed):
    """A cheap numeric look at a SymPy residual: True if clearly non-zero somewhere."""
    sp = _sympy()
    import random
    rng = random.Random(seed)
    exprs = list(r) if isinstance(r, sp.MatrixBase) else [r]
    syms = sorted(set().union(*(e.free_symbols for e in exprs if _is_sym(e))), key=str)
    trials = list(env.get("__values__") or [])
    if not trials:
        for _ in range(2):
            trials.append({s: (rng.uniform(0.2, 0.9) if s.is_positive else -rng.uniform(0.2, 0.9) if s.is_negative
                               else rng.uniform(-1.5, 1.5)) for s in syms})
    for e in exprs:
        if not _is_sym(e):
            if abs(complex(e)) > 1e-20:
                return True
            continue
        syms = sorted(e.free_symbols, key=str)
        undefined = {f.func for f in e.atoms(sp.Function) if isinstance(f, sp.core.function.AppliedUndef)}
        if undefined:
            # an identity claimed for every function fails for some: try a concrete one, and its derivatives
            x_ = sp.Dummy("x")
            e = e.subs({f: sp.Lambda(x_, 3 + x_**2 / 5 + sp.exp(x_ / 3)) for f in undefined}).doit()
            syms = sorted(e.free_symbols, key=str)
        fast = _mp_function(e)
        trials = [t_ if all(s_ in t_ for s_ in syms) else {**t_, **{s_: rng.uniform(0.2, 0.9) for s_ in syms if s_ not in t_}}
                  for t_ in trials]
        for v in trials:
            try:
                with mp.workdps(30):
                    val = complex(fast[1](*(mp.mpf(v[s_]) for s_ in fast[0]))) if fast else complex(e.evalf(30, subs=_exact(v)))
            except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError, NameError):
                continue
            if val == val and abs(val) > 1e-18 * (1 + max((abs(complex(x)) for x in v.values()), default=1)):
                return True
    return False


def _holds(rel, a, b, env, tol):
    """Numeric truth of ``a rel b`` (False on any non-real value)."""
    for x, y in zip(_to_numbers(a, env), _to_numbers(b, env)) if not (_is_np(a) or _is_np(b)) else [(a, b)]:
        if rel == "=":
            if not _close(x, y, tol, tol):
                return False
            continue
        try:
            ok = {"<=": x <= y + tol, ">=": x >= y - tol, "<": x < y, ">": x > y, "!=": not _close(x, y, tol, tol)}[rel]
        except TypeError:
            return False
        if not ok:
            return False
    return True


def check(text: str, envs, *, symbolic=False, rtol=None, atol=None, tight=None, seed=0, fast_fail=False) -> Report:
    """Verify every relation of the display ``text`` in each environment of ``envs``.

    * ``=`` and ``\\leftarrow``: with ``symbolic`` the residual must simplify to 0 (SymPy);
      otherwise the two sides must agree to ``atol + rtol * |side|`` at every point (SymPy
      values are evaluated at each substitution in ``__values__``).
    * ``\\le``, ``<`` ...: must hold at every point; a non-strict one must be strict at one point
      at least (else a reversed relation would pass too).
    * ``\\approx``: to half a unit in the last digit of the decimal on one side, or, with no
      decimal, to first order at ``__approx__ = (symbol, point)``.
    * ``a = b + O(g)``: ``|a - b| / |g|`` must not grow along ``__approach__ = (symbol, points)``
      (or the points of a qualifier ``(x \\to -\\infty)``).
    * ``\\to``: agreement to ``__to_atol__``; ``\\ne``: disagreement.
    * ``A \\implies B``: B wherever A holds, and A somewhere; ``\\iff``: both sides hold.
    * ``tight``: a tolerance; every non-strict inequality must also come within it of equality at
      one point at least (the equality case is sampled, so a weakened bound fails); as a dict
      ``{(statement, relation): tol}`` it names the relations, and a strict one named there must
      be approached (a supremum).
    """
    statements = parse(text)
    global _FAST_FAIL
    _FAST_FAIL = fast_fail
    _gaps.clear()
    _strict_gaps.clear()
    rtol = mp.mpf(10) ** (-(mp.mp.dps - 10)) if rtol is None else rtol
    atol = mp.mpf(10) ** (-(mp.mp.dps - 10)) if atol is None else atol
    rep = Report()
    strict_needed = {}
    premise_seen = {}
    cond_seen = {}
    checked = set()
    base_rtol, base_atol = rtol, atol
    for env in envs:
        rep.points += 1
        ctx = Ctx(env)
        prev = None
        rtol, atol = env.get("__rtol__", base_rtol), env.get("__atol__", base_atol)
        skip_st = set(env.get("__skip__", ()))
        for si, st in enumerate(statements):
            if st.kind == "chain" and st.rels:
                prev = st
            if si + 1 in skip_st:
                continue
            checked.add(si)
            if st.kind == "bind":
                ctx = ctx.bind(**{name_key(st.terms[0]): evaluate(st.terms[1], ctx)})
                rep.add((si, 0), "binding")
                continue
            sctx = ctx
            if st.tag is not None:
                tags = env.get("__tags__", {})
                if st.tag not in tags:
                    raise DisplayCheckFailed(f"no environment for the alternative ({st.tag})")
                sctx = ctx.bind(**tags[st.tag])
            eff = st
            if st.kind == "chain" and not st.rels:
                if prev is None:
                    raise DisplayCheckFailed("an expression that is not a relation")
                eff = Statement("chain", terms=prev.terms[:-1] + st.terms, rels=prev.rels)
            elif st.kind == "chain":
                prev = st
            if st.kind == "range":
                var = name_key(st.terms[0])
                lo, hi = (int(_as_index(evaluate(t, sctx))) for t in st.terms[1:])
                want = list(env.get("__free__", {}).get(var) or sctx.indices(var))
                if list(range(lo, hi + 1)) != list(want):
                    raise DisplayCheckFailed(f"statement {si + 1}: {var} = {lo}, ..., {hi} is not the index range {want}")
                rep.add((si, 0), "index range")
                continue
            approach = env.get("__approach__")
            conds = []
            for kind, q in st.qualifiers:
                if kind == "paren" and q.rels == ["->"]:
                    target = evaluate(q.terms[1], sctx)
                    if "__approach_env__" in env:
                        approach = ("target", target)
                        continue
                    var = evaluate(q.terms[0], sctx)
                    approach = (var, env.get("__approach_points__", {}).get(str(target)) or
                                _default_approach(target))
                elif kind == "paren" and q.rels == ["in"]:
                    value = evaluate(q.terms[0], sctx)
                    for x in _to_numbers(value, env):
                        if not isinstance(x, mp.mpf) or not mp.isfinite(x):
                            raise DisplayCheckFailed(f"statement {si + 1}: {x} is not a real number")
                else:
                    conds.append((kind, q))
            any_assignment = False
            for assign in _assignments(st, env):
                actx = sctx.bind(**assign) if assign else sctx
                skip = False
                for kind, q in conds:
                    ok = holds_all_numeric(q, actx, env)
                    if kind == "when" and not ok:
                        raise DisplayCheckFailed(f"statement {si + 1}: the condition does not hold where the display is checked")
                    if not ok:
                        skip = True
                    cond_seen[(si, kind)] = cond_seen.get((si, kind), False) or ok
                if skip:
                    continue
                any_assignment = True
                _check_statement(si, eff, actx, env, symbolic, rtol, atol, rep, strict_needed, premise_seen, approach, seed)
                for inner, label in st.side:
                    lst = label.args[0] if label.op == "relation" else None
                    if lst is None or len(lst.rels) != 1:
                        continue
                    _check_relation((si, "side", id(inner)), lst.rels[0], evaluate(inner, actx),
                                    evaluate(lst.terms[1], actx), None, None, actx, env, False, rtol, atol, rep,
                                    strict_needed, None, seed)
            if not any_assignment:
                raise DisplayCheckFailed(f"statement {si + 1}: its condition holds for no index")
    unchecked = [si + 1 for si in range(len(statements)) if si not in checked]
    if unchecked:
        raise DisplayCheckFailed(f"statement(s) {unchecked} are skipped in every environment")
    if tight is not None:
        strict = _strict_gaps.items() if isinstance(tight, dict) else ()
        for key, gap in list(_gaps.items()) + [(k, g) for k, g in strict if isinstance(k[1], int) and (k[0] + 1, k[1] + 1) in tight]:
            tol = tight.get((key[0] + 1, key[1] + 1), tight.get(key[0] + 1)) if isinstance(tight, dict) else tight
            if tol is None:
                continue
            if not gap <= tol:
                raise DisplayCheckFailed(f"relation {key} never comes within {tol} of equality: the bound is "
                                         f"stated as attained, but the smallest gap sampled is {mp.nstr(gap, 3)}")
    _gaps.clear()
    _strict_gaps.clear()
    for key, strict in strict_needed.items():
        if not strict:
            raise DisplayCheckFailed(f"relation {key} is never strict at the sampled points: a reversed relation "
                                     "would pass too (sample the regime where it is strict)")
    for key, seen in premise_seen.items():
        if not seen:
            raise DisplayCheckFailed(f"statement {key[0] + 1}: the premise holds at no sampled point")
    return rep


def _default_approach(target):
    sp = _sympy()
    if target in (-sp.oo, mp.ninf) or (isinstance(target, float) and target == -math.inf):
        return [-30, -300, -3000]
    if target in (sp.oo, mp.inf):
        return [30, 300, 3000]
    return [target + sp.Rational(1, 100), target + sp.Rational(1, 1000), target + sp.Rational(1, 10000)]


def holds_all_numeric(st, ctx, env):
    vals = [evaluate(t, ctx) for t in st.terms]
    for rel, x, y in zip(st.rels, vals, vals[1:]):
        x, y = _as_index(x), _as_index(y)
        if isinstance(x, int) and isinstance(y, int):
            ok = {"=": x == y, "!=": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}.get(rel)
        else:
            ok = _holds(rel, x, y, env, max(mp.mpf(10) ** -20, mp.mpf(env.get("__atol__", 0))))
        if not ok:
            return False
    return True


def _check_statement(si, st, ctx, env, symbolic, rtol, atol, rep, strict_needed, premise_seen, approach, seed):
    if st.kind in ("implies", "iff"):
        premise, conclusion = st.parts
        if st.kind == "iff":
            _check_statement(si, premise, ctx, env, symbolic, rtol, atol, rep, strict_needed, premise_seen, approach, seed)
            _check_statement(si, conclusion, ctx, env, symbolic, rtol, atol, rep, strict_needed, premise_seen, approach, seed)
            return
        if premise.kind == "chain" and not any(r in ("<", ">", "<=", ">=", "!=") for r in premise.rels):
            # a premise that is an equation (a definition, lambda* = ...): it must hold, and so must
            # what it implies
            _check_statement(si, premise, ctx, env, symbolic, rtol, atol, rep, strict_needed, {}, approach, seed)
            _check_statement(si, conclusion, ctx, env, symbolic, rtol, atol, rep, strict_needed, {}, approach, seed)
            rep.add((si, "=>"), "implication")
            return
        ok = holds_all_numeric(premise, ctx, env) if premise.kind == "chain" else True
        premise_seen[(si,)] = premise_seen.get((si,), False) or ok
        if ok:
            _check_statement(si, conclusion, ctx, env, symbolic, rtol, atol, rep, strict_needed, {}, approach, seed)
        rep.add((si, "=>"), "implication")
        return
    if st.kind != "chain":
        raise DisplayCheckFailed(f"cannot check a {st.kind}")
    values = []
    for k, t in enumerate(st.terms):
        main, g = _split_O(t)
        values.append((main, g))
    after = env.get("__after__")
    for k, rel in enumerate(st.rels):
        (ln, lg), (rn, rg) = values[k], values[k + 1]
        lctx = ctx.bind(**after) if rel == "<-" and after else ctx
        if rel == "<-" and not after:
            raise DisplayCheckFailed("an update needs __after__ (the values after it)")
        if (lg is not None or rg is not None) and "__approach_env__" in env:
            _check_O_rebuilt((si, k), ln, rn, lg if lg is not None else rg, env, rep,
                             approach[1] if isinstance(approach, tuple) and approach[0] == "target" else None)
            continue
        a = evaluate(ln, lctx)
        b = evaluate(rn, ctx)
        g = lg if lg is not None else rg
        gval = evaluate(g, ctx) if g is not None else None
        _check_relation((si, k), "=" if rel == "<-" else rel, a, b, (ln, rn), gval, ctx, env, symbolic, rtol, atol,
                        rep, strict_needed, approach, seed)


def _sharp_order(where, ratios):
    """``|residual| / |O-term|`` along the approach must settle: grow by less than 3 and shrink by
    less than 3 per point (the points are a decade or more apart), or be 0 throughout (an exact
    expansion).  Growing means a lower-order term is wrong; shrinking, that the O-term claims less
    than the expansion achieves, as a weaker true statement would."""
    tiny = mp.mpf(10) ** -30
    if all(r <= tiny for r in ratios):
        return
    for r0, r1 in zip(ratios, ratios[1:]):
        if not (mp.isfinite(r1) and r1 <= 3 * r0 + tiny and r1 >= r0 / 3):
            raise DisplayCheckFailed(f"{where}: |residual| / |O-term| does not settle along the approach: "
                                     f"{[mp.nstr(x, 3) for x in ratios]}")


def _check_O_rebuilt(key, ln, rn, g, env, rep, target=None):
    """``a = b + O(g)`` with ``__approach_env__ = (points, builder)``: the environment is rebuilt
    at each point of the approach (an mpmath one), and ``|a - b| / |g|`` must not grow.  With a
    qualifier ``(x \\to a)``, the points must approach ``a``."""
    points, builder = env["__approach_env__"]
    if target is not None:
        going = "-inf" if points[-1] < points[0] < 0 else "+inf" if points[-1] > points[0] > 0 else "0"
        want = "-inf" if target in (mp.ninf, -math.inf) or str(target) == "-oo" else \
            "+inf" if target in (mp.inf, math.inf) or str(target) == "oo" else "0" if target == 0 else str(target)
        if going != want:
            raise DisplayCheckFailed(f"relation {key[1] + 1} of statement {key[0] + 1}: the display says the "
                                     f"expansion holds as the variable tends to {want}; it is checked at {points}")
    ratios = []
    for pt in points:
        c = Ctx(builder(pt))
        r = evaluate(ln, c) - evaluate(rn, c)
        ratios.append(abs(r) / abs(evaluate(g, c)))
    _sharp_order(f"relation {key[1] + 1} of statement {key[0] + 1}", ratios)
    rep.add(key, "asymptotic")


def _check_relation(key, rel, a, b, nodes, gval, ctx, env, symbolic, rtol, atol, rep, strict_needed, approach, seed):
    sp = _sympy()
    where = f"relation {key[1] + 1 if isinstance(key[1], int) else key[1]} of statement {key[0] + 1}"
    if gval is not None:  # a = b + O(g)
        if approach is None:
            free = sorted(gval.free_symbols, key=str) if _is_sym(gval) else []
            if len(free) != 1:
                raise DisplayCheckFailed(f"{where}: O() needs __approach__")
            approach = (free[0], _default_approach(0))
        var, pts = approach
        ratios = []
        for pt in pts:
            sub_env = dict(env)
            vals = [{**v, var: pt} for v in (env.get("__values__") or [{}])]
            sub_env["__values__"] = vals
            rs = _to_numbers(a - b, sub_env)
            gs = _to_numbers(gval, sub_env)
            ratios.append(max(abs(r) / abs(g_) for r, g_ in zip(rs, gs)))
        _sharp_order(where, ratios)
        rep.add(key, "asymptotic")
        return
    if rel == "in":
        rep.add(key, "domain")
        return
    if rel == "~":
        lit = _decimal_literal(nodes[0]) or _decimal_literal(nodes[1]) if nodes else None
        if lit is None:
            spec = env.get("__approx__")
            if spec is None:
                raise DisplayCheckFailed(f"{where}: an approximation with no decimal needs __approx__")
            s, pt = spec
            r = a - b
            r0, r1 = r.subs(s, pt), sp.diff(r, s).subs(s, pt)
            if symbolic:
                ok = not _probe(r0, env, seed) and not _probe(r1, env, seed) and _sym_zero(r0) and _sym_zero(r1)
            else:
                ok = all(_close(v, 0, 0, atol) for v in _to_numbers(r0, env) + _to_numbers(r1, env))
            if not ok:
                raise DisplayCheckFailed(f"{where}: the two sides do not agree to first order at {s} = {pt}")
            rep.add(key, "first order")
            return
        decimals = len(lit.split(".")[1])
        lit_val = mp.mpf(lit)
        for x, y in zip(_to_numbers(a, env), _to_numbers(b, env)):
            side = y if _decimal_literal(nodes[1]) else x
            tol = mp.mpf(5) * mp.mpf(10) ** (-decimals - 1) * abs(side / lit_val) * (1 + mp.mpf(10) ** -12)
            if not abs(x - y) <= tol:
                raise DisplayCheckFailed(f"{where}: {mp.nstr(x, 12)} is not {mp.nstr(y, 12)} to the digits shown")
        rep.add(key, "decimal approximation")
        return
    if rel == "=" and symbolic and (_is_sym(a) or _is_sym(b)):
        r = a - b
        if (_FAST_FAIL and _probe(r, env, seed)) or not _sym_zero(r):
            raise DisplayCheckFailed(f"{where}: the residual does not simplify to 0: {str(r)[:300]}")
        rep.add(key, "symbolic")
        return
    if rel == "->":
        tol = env.get("__to_atol__")
        if tol is None:
            raise DisplayCheckFailed(f"{where}: a limit needs __to_atol__")
        for x, y in zip(_to_numbers(a, env), _to_numbers(b, env)):
            if not _close(x, y, 0, tol):
                raise DisplayCheckFailed(f"{where}: {x} is not within {tol} of its limit {y}")
        rep.add(key, "limit (sampled)")
        return
    xs, ys = (_to_numbers(a, env), _to_numbers(b, env)) if not (_is_np(a) or _is_np(b)) else ([a], [b])
    if len(xs) != len(ys):
        xs, ys = (xs * len(ys), ys) if len(xs) == 1 else (xs, ys * len(xs))
    for x, y in zip(xs, ys):
        if rel == "=":
            if not _close(x, y, rtol, atol):
                raise DisplayCheckFailed(f"{where}: {_show(x)} != {_show(y)}")
            continue
        if rel == "!=":
            if _close(x, y, rtol, atol):
                raise DisplayCheckFailed(f"{where}: {_show(x)} == {_show(y)}, but the display says they differ")
            continue
        ineq_tol = env.get("__ineq_tol__", atol)
        pairs = list(zip(x, y)) if isinstance(x, Vec) else [(x, y)]
        for u, v in pairs:
            if isinstance(u, mp.mpc) or isinstance(v, mp.mpc):
                raise DisplayCheckFailed(f"{where}: a complex value in an inequality")
            ok = {"<=": u <= v + ineq_tol, ">=": u >= v - ineq_tol, "<": u < v, ">": u > v}[rel]
            if not ok:
                raise DisplayCheckFailed(f"{where}: {_show(u)} {rel} {_show(v)} is false")
            gap = abs(v - u) / max(1, abs(u), abs(v))
            if rel in ("<=", ">="):
                strict = u < v - ineq_tol if rel == "<=" else u > v + ineq_tol
                strict_needed[key] = strict_needed.get(key, False) or bool(strict)
                _gaps[key] = min(_gaps.get(key, mp.inf), gap)
            else:  # a strict bound can be a supremum: tight={(statement, relation): tol} asks it be approached
                _strict_gaps[key] = min(_strict_gaps.get(key, mp.inf), gap)
    rep.add(key, {"=": "numeric", "!=": "numeric (differ)"}.get(rel, "inequality"))


_gaps: dict = {}
_strict_gaps: dict = {}
_FAST_FAIL = False  # mutants: look at a few numbers before trying to simplify


def _show(x):
    if isinstance(x, Vec):
        return "(" + ", ".join(_show(v) for v in x) + ")"
    try:
        return mp.nstr(x, 15)
    except Exception:  # noqa: BLE001
        return str(x)
