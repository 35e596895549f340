"""Sphinx extension that turns the entmath chapters into a book with its back matter generated.

Everything here is driven by what is on disk at build time, so a chapter, an op, a bibliography
file or a benchmark result added later shows up with no hand edits:

* **Bibliography** - every ``book/*.bib`` is registered with sphinxcontrib-bibtex, and the alpha
  labels ("Su22a") are made unique across all of them, since every chapter has its own list.
* **MathJax** - the MathJax 3 bundle of the ``django-static-mathjax`` package is copied into the
  site's ``_static/mathjax/`` (``mathjax_path`` points there), so pages render offline.
* **Verification ledger** - the ``{verification-ledger}`` directive becomes a table with one row per
  labelled equation of the book: its chapter, its label (linked to the equation), how its display
  is tied to the checks (parsed and verified, or a registered text), what "checked" means for it
  (from the records its chapter's run glued: SymPy identities, numeric comparisons with their
  points and digits, inequalities on sampled regimes ...) and the ``ledger.<fn>("<label>", ...)``
  calls (linked to the code cell that makes them).  With ``:kind: implementation`` it lists the
  implementation checks instead (Triton against torch, C against eager, chunking, counts).
  Labels and checks are read from each chapter's doctree with the parser in ``entmath/ledger/index.py``,
  the same one ``tests/test_ledger.py`` uses.  An equation with no check or no tie is a build warning.
* **API reference** - the ``{entmath-api}`` block is replaced by autodoc entries for every public
  name in ``entmath.__all__`` (and in the ``__all__`` of a submodule listed there).  Each entry says which chapter derives it (from the chapter numbers
  its module docstring names) and which pages refer to it.  In the chapters, inline code that is
  exactly a public name (```entmath.entropy```) becomes a link to its entry.
* **Performance appendix** - the ``{performance-results}`` block is replaced by one section per
  ``benchmarks/results/*.json`` file: its machine, its rows as a table, and a plot of each
  ratio-like column.  Results whose ``machine.device`` starts with ``cuda`` go to the GPU section;
  ``gpu_compile.json`` (the compile check's table, not a benchmark) becomes the section
  "GPU: compile-time analysis".
* **Notebook download** - each executed chapter is offered as ``.ipynb`` in the download menu.
"""
from __future__ import annotations

import ast
import base64
import importlib.util
import io
import inspect
import json
import re
import shutil
from collections import Counter
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from entmath.ledger import index as ledger_index

logger = logging.getLogger(__name__)

PACKAGE = "entmath"
RESULTS_DIR = "benchmarks/results"
RATIO_COLUMN = re.compile(r"ratio|speedup", re.I)
CHAPTER_REF = re.compile(r"\bChapters?\s+(\d+)")


# ------------------------------------------------------------------------------------------------
# Bibliography and MathJax


def register_bibfiles(app, config):
    """Add every ``book/*.bib`` to ``bibtex_bibfiles`` (chapters bring their own ``refs_chNN.bib``)."""
    listed = list(config.bibtex_bibfiles or [])
    known = {(Path(app.confdir) / f).resolve() for f in listed}
    for bib in sorted(Path(app.confdir).glob("book/*.bib")):
        if bib.resolve() not in known:
            listed.append(bib.relative_to(app.confdir).as_posix())
    config.bibtex_bibfiles = listed


# sphinxcontrib-bibtex needs each alpha label ("Su22") to name one entry in the whole book, but
# pybtex only tells apart the entries of one bibliography, and every chapter has its own.  Two posts
# by one author in one year, cited by different chapters, would both be "Su22".  So the suffixes
# are assigned once over every registered .bib file: "Su22a" and "Su22b" mean the same entries on
# every page.
BOOK_LABEL_STYLE = "entmath_book_alpha"
_book_labels: dict = {}


def book_wide_labels(bibfiles) -> dict:
    """``{key: label}`` with the alpha labels of all ``bibfiles``, made unique across them.

    Entries that share a base label get suffixes a, b, ... in the order of their keys, so a label
    does not depend on which chapter's bibliography the entry is printed in.
    """
    import pybtex.database
    from pybtex.style.labels.alpha import LabelStyle

    style, base = LabelStyle(), {}
    for bib in bibfiles:
        for key, entry in pybtex.database.parse_file(str(bib)).entries.items():
            base[key] = style.format_label(entry)
    shared = Counter(base.values())
    labels, seen = {}, Counter()
    for key in sorted(base):
        label = base[key]
        labels[key] = label if shared[label] == 1 else label + chr(ord("a") + seen[label])
        seen[label] += 1
    return labels


def _register_label_style():
    import pybtex.plugin
    from pybtex.style.formatting.alpha import Style as AlphaStyle
    from pybtex.style.labels.alpha import LabelStyle as AlphaLabelStyle

    class BookWideLabelStyle(AlphaLabelStyle):
        def format_labels(self, sorted_entries):
            sorted_entries = list(sorted_entries)
            fallback = super().format_labels(sorted_entries)
            for entry, label in zip(sorted_entries, fallback):
                yield _book_labels.get(entry.key, label)

    class BookStyle(AlphaStyle):
        default_label_style = BOOK_LABEL_STYLE

    pybtex.plugin.register_plugin("pybtex.style.labels", BOOK_LABEL_STYLE, BookWideLabelStyle)
    pybtex.plugin.register_plugin("pybtex.style.formatting", BOOK_LABEL_STYLE, BookStyle)


def use_book_wide_labels(app, config):
    """Make the book's default bibliography style the alpha style with book-wide labels."""
    _book_labels.clear()
    _book_labels.update(book_wide_labels(Path(app.confdir) / f for f in config.bibtex_bibfiles))
    config.bibtex_default_style = BOOK_LABEL_STYLE


def _local_mathjax(app) -> bool:
    return bool(app.config.mathjax_path) and "://" not in app.config.mathjax_path \
        and not app.config.mathjax_path.startswith("/")


def _mathjax_bundle() -> Path:
    spec = importlib.util.find_spec("mathjax")
    bundle = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5" if spec else None
    if bundle is None or not (bundle / "tex-mml-chtml.js").is_file():
        raise ExtensionError("mathjax_path is local but the MathJax bundle is missing: "
                             "pip install -r requirements.txt (django-static-mathjax)")
    return bundle


def check_mathjax(app):
    if app.builder.format == "html" and _local_mathjax(app):
        _mathjax_bundle()  # fail at the start of a build, not after executing every chapter


def copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html" and _local_mathjax(app):
        rel = Path(app.config.mathjax_path)
        dest = Path(app.outdir) / "_static" / rel.parent
        shutil.copytree(_mathjax_bundle(), dest, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------
# Reading the chapters: equations, checks, references to the API


def _public_objects() -> dict:
    """``{"entmath.entropy": <function>, ...}`` for the routines and classes in ``entmath.__all__``,
    and those in the ``__all__`` of a submodule listed there (``entmath.distributed.entropy``)."""
    import importlib

    module = importlib.import_module(PACKAGE)
    objects = {}
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name, None)
        if inspect.isroutine(obj) or inspect.isclass(obj):
            objects[f"{PACKAGE}.{name}"] = obj
        elif inspect.ismodule(obj):
            for sub in getattr(obj, "__all__", []):
                member = getattr(obj, sub, None)
                if inspect.isroutine(member) or inspect.isclass(member):
                    objects[f"{PACKAGE}.{name}.{sub}"] = member
    return objects


def _env_data(env) -> dict:
    if not hasattr(env, "entmath_book"):
        env.entmath_book = {"ledger": {}, "backrefs": {}, "dynamic": set()}
    return env.entmath_book


def link_api_literals(doctree, public: dict):
    """Inline code that is exactly a public name (``entmath.kl`` or ``entmath.kl()``) -> its API entry."""
    for lit in list(doctree.findall(nodes.literal)):
        text = lit.astext()
        target = text[:-2] if text.endswith("()") else text
        if target not in public or _inside(lit, (nodes.reference, addnodes.pending_xref, addnodes.desc_signature)):
            continue
        xref = addnodes.pending_xref("", refdomain="py", reftype="obj", reftarget=target,
                                     refexplicit=True, refwarn=True)
        xref += nodes.literal(text, text, classes=["xref", "py", "py-obj"])
        lit.replace_self(xref)


def _inside(node, types) -> bool:
    parent = node.parent
    while parent is not None:
        if isinstance(parent, types):
            return True
        parent = parent.parent
    return False


def collect(app, doctree):
    """doctree-read: record this page's labelled equations, ledger checks and API references."""
    env, docname = app.env, app.env.docname
    data = _env_data(env)
    public = _public_objects()
    link_api_literals(doctree, public)
    for xref in doctree.findall(addnodes.pending_xref):
        if xref.get("refdomain") == "py" and xref.get("reftarget") in public:
            data["backrefs"].setdefault(xref["reftarget"], set()).add(docname)

    labels = [(m["label"], m.get("number"), (m["ids"] or [None])[0])
              for m in doctree.findall(nodes.math_block) if m.get("label")]
    checks = []
    for cell in doctree.findall(nodes.container):
        if cell.get("nb_element") != "cell_code":
            continue
        source = next((n.astext() for n in cell.findall(nodes.literal_block)
                       if n.parent.get("nb_element") == "cell_code_source"), None)
        found = ledger_index.checks_in_code(source) if source else []
        if found:
            anchor = f"ledger-cell-{cell['cell_index']}"
            cell["ids"].append(anchor)
            doctree.ids[anchor] = cell
            checks += [(c.label, c.fn, c.what, anchor) for c in found]
    # Cells whose input is hidden (remove-input) are not in the doctree: read them from the source.
    source_path = Path(env.doc2path(docname))
    if source_path.suffix == ".md":
        text = source_path.read_text(encoding="utf-8")
        in_source = Counter((c.label, c.fn, c.what) for cell in ledger_index.code_cells(text)
                            for c in ledger_index.checks_in_code(cell))
        hidden = in_source - Counter((label, fn, what) for label, fn, what, _ in checks)
        checks += [(label, fn, what, None) for (label, fn, what), n in hidden.items() for _ in range(n)]
        in_doctree = {label for label, _, _ in labels}
        for label in ledger_index.labels_in(text):
            if label not in in_doctree:
                logger.warning("equation label %s is in the source but Sphinx did not number it", label,
                               location=docname)
    if labels or checks:
        record = _run_record(app, docname)
        if labels and not record and app.config.nb_execution_mode != "off":
            logger.warning("the run of %s left no ledger record: end the chapter with ledger.summary([...])",
                           docname, location=docname)
        data["ledger"][docname] = {"labels": labels, "checks": checks, "record": record}


def _run_record(app, docname) -> dict:
    """What the chapter's run recorded about its checks and ties (``ledger.summary`` glues it with
    myst-nb; the executed notebook's glue file lies beside it)."""
    path = Path(app.outdir).parent / "jupyter_execute" / f"{docname}.glue.json"
    if not path.is_file():
        return {}
    try:
        glued = json.loads(path.read_text(encoding="utf-8")).get("entmath-ledger", {})
        text = next(iter(glued.get("data", {}).values()))
        return json.loads(ast.literal_eval(text))
    except (ValueError, StopIteration, SyntaxError, TypeError) as exc:
        logger.warning("cannot read the ledger record of %s: %s", docname, exc, location=docname)
        return {}


def purge(app, env, docname):
    data = _env_data(env)
    data["ledger"].pop(docname, None)
    data["dynamic"].discard(docname)
    for docs in data["backrefs"].values():
        docs.discard(docname)


def merge(app, env, docnames, other):
    data, theirs = _env_data(env), _env_data(other)
    for docname in docnames:
        if docname in theirs["ledger"]:
            data["ledger"][docname] = theirs["ledger"][docname]
        if docname in theirs["dynamic"]:
            data["dynamic"].add(docname)
    for target, docs in theirs["backrefs"].items():
        data["backrefs"].setdefault(target, set()).update(docs & set(docnames))


def always_rewrite(app, env, added, changed, removed):
    """Pages built from the whole book (ledger, API) are rebuilt whenever any page is."""
    return sorted(_env_data(env)["dynamic"] - set(added) - set(changed))


def _reading_order(env) -> list:
    order, stack, seen = [], [env.config.root_doc], set()
    while stack:
        doc = stack.pop(0)
        if doc in seen:
            continue
        seen.add(doc)
        order.append(doc)
        stack[:0] = env.toctree_includes.get(doc, [])
    return order + sorted(set(env.found_docs) - seen)


# ------------------------------------------------------------------------------------------------
# The verification ledger page


class ledger_table(nodes.General, nodes.Element):
    """Placeholder for the ledger table; filled in when every chapter has been read."""


class api_chapters(nodes.General, nodes.Element):
    """Placeholder for an API entry's 'Derived in' / 'Referred to in' fields."""


class VerificationLedger(SphinxDirective):
    has_content = False
    option_spec = {"kind": lambda arg: directives.choice(arg, ("math", "implementation"))}

    def run(self):
        _env_data(self.env)["dynamic"].add(self.env.docname)
        return [ledger_table("", kind=self.options.get("kind", "math"))]


class ApiChapters(SphinxDirective):
    required_arguments = 1
    option_spec = {"derived": directives.unchanged}

    def run(self):
        _env_data(self.env)["dynamic"].add(self.env.docname)
        derived = [d for d in self.options.get("derived", "").split() if d]
        return [api_chapters("", target=self.arguments[0], derived=derived)]


def _link(app, fromdoc, todoc, anchor, *children):
    uri = app.builder.get_relative_uri(fromdoc, todoc) + (f"#{anchor}" if anchor else "")
    return nodes.reference("", "", *children, internal=True, refuri=uri)


def _title(env, docname) -> str:
    return env.titles[docname].astext() if docname in env.titles else docname


def _title_nodes(env, docname) -> list:
    """The page title as nodes, so math in a title ($\\log n$) is typeset, not shown as TeX."""
    if docname not in env.titles:
        return [nodes.Text(docname)]
    return [child.deepcopy() for child in env.titles[docname].children]


def _eq_number(env, docname, anchor, number) -> str:
    """The number the equation shows on its page (what Sphinx's HTML writer prints)."""
    cfg = env.config
    if cfg.math_numfig and cfg.numfig and anchor:
        got = env.toc_fignumbers.get(docname, {}).get("displaymath", {}).get(anchor, ())
        eqno = ".".join(map(str, got))
        return cfg.math_numsep.join(eqno.rsplit(".", 1)) if eqno else ""
    return str(number or "")


def _short(env, docname) -> str:
    m = re.search(r"(?:^|/)ch(\d+)", docname)
    return f"Ch. {int(m.group(1))}" if m else _title(env, docname)


def _table(headers, rows, widths, classes):
    table = nodes.table(classes=classes)
    group = nodes.tgroup(cols=len(headers))
    table += group
    for w in widths:
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    group += head
    head += nodes.row("", *[nodes.entry("", nodes.paragraph("", h)) for h in headers])
    body = nodes.tbody()
    group += body
    for row_id, cells in rows:
        row = nodes.row(ids=[row_id] if row_id else [])
        for cell in cells:
            row += nodes.entry("", *cell)
        body += row
    return table


KIND_WORDS = {
    "symbolic": "SymPy identity",
    "symbolic, with assumptions": "SymPy identity, symbols with assumptions",
    "numeric": "numeric against a reference",
    "predicate": "predicate (an inequality on sampled regimes, a limit, a count)",
}
RELATION_WORDS = {
    "symbolic": "proved equal by SymPy",
    "numeric": "equal at every point",
    "numeric (differ)": "unequal, as displayed",
    "inequality": "inequality: holds at every point, strict at one at least",
    "decimal approximation": "equal to the digits shown",
    "first order": "agree to first order at the stated point",
    "asymptotic": "remainder / O-term settles along the approach",
    "limit (sampled)": "limit: within the sampling tolerance",
    "implication": "conclusion wherever the condition holds",
    "index range": "index range",
    "binding": "a binding",
    "domain": "domain",
}


def _what_checked(record) -> list:
    """Per equation, what "checked" means, from the records the chapter's run handed over."""
    if not record:
        return [nodes.paragraph("", "(no run record: the chapter was not executed in this build)")]
    out = nodes.bullet_list(classes=["simple", "ledger-kinds"])
    tie = record.get("tie")
    if tie:
        if tie.get("how") == "text":
            text = "display: registered text (prose as much as mathematics); its content is the math checks below"
        else:
            rel = ", ".join(f"{RELATION_WORDS.get(k, k)} x{v}" for k, v in sorted(tie.get("relation_kinds", tie.get("kinds", {})).items()))
            mode = "symbolically (SymPy)" if tie.get("symbolic") else "numerically"
            text = f"display: parsed and verified {mode} in {tie.get('points', '?')} environment(s): {rel}"
        out += nodes.list_item("", nodes.paragraph("", text))
    counts: dict = {}
    for r in record.get("records", []):
        if r["fn"] in ("tie", "tie_text", "implementation"):
            continue
        c = counts.setdefault(r["kind"], [0, 0, set()])
        c[0] += 1
        c[1] += r.get("points") or 0
        if r.get("digits"):
            c[2].add(r["digits"])
    for kind, (n, points, digits) in sorted(counts.items()):
        extra = ""
        if kind == "numeric":
            extra = f", {points} point(s) in all" + (f", references at {', '.join(map(str, sorted(digits)))} digits" if digits else "")
        out += nodes.list_item("", nodes.paragraph("", f"{KIND_WORDS.get(kind, kind)}: {n} check(s){extra}"))
    return [out]


def _tie_mechanism(record, static_fns) -> str:
    tie = (record or {}).get("tie")
    if tie:
        return "registered text" if tie.get("how") == "text" else \
            ("parsed, symbolic" if tie.get("symbolic") else "parsed, numeric")
    return "registered text" if "tie_text" in static_fns else "parsed" if "tie" in static_fns else "untied"


_FIELD = re.compile(r"\{[^{}]*\}")


def _filled(what: str, label: str, records: list) -> str:
    """A check's description with the values the chapter's run put in it.

    The source gives an f-string's text with each field as ``{expr}`` (``ledger_index._what``);
    the run's records of the same equation have the values filled in, followed by what the check
    function adds (``close``: ``": N point(s), max |err| = ..."``, ``sym_zero``: ``"; residual =
    ..."``).  The fields are taken from the first record that matches the template (a field
    matching anything); a template that no record matches is left as it is (the browser check
    reports it)."""
    if not _FIELD.search(what):
        return what
    parts = _FIELD.split(what)
    pattern = re.compile("(.+?)".join(map(re.escape, parts)) + r"(?:(?:: |; ).*)?", re.S)
    for r in records:
        text = r.get("what")
        if r.get("label") != label or not isinstance(text, str):
            continue
        m = pattern.fullmatch(text)
        if m:
            values = iter(m.groups())
            return _FIELD.sub(lambda _: next(values), what)
    return what


def build_ledger(app, fromdoc, kind="math"):
    env = app.env
    data = _env_data(env)["ledger"]
    docs = [d for d in _reading_order(env) if d in data]
    rows, per_chapter, n_checks, mechanisms = [], [], 0, Counter()
    all_labels = {label for d in docs for label, _, _ in data[d]["labels"]}
    want = ("math", "tie") if kind == "math" else ("implementation",)
    for doc in docs:
        labels, checks = data[doc]["labels"], data[doc]["checks"]
        record = data[doc].get("record") or {}
        checks = [c for c in checks if ledger_index.KIND.get(c[1], "math") in want]
        n_checks += len(checks)
        per_chapter.append((doc, len(labels), len(checks)))
        for label, _, _, _ in checks:
            if label not in {lab for lab, _, _ in labels}:
                where = "another page" if label in all_labels else "no page"
                logger.warning("ledger check of %s, which is labelled on %s", label, where, location=doc)
        for label, number, anchor in labels:
            mine = [c for c in checks if c[0] == label]
            if kind == "implementation" and not mine:
                continue
            shown = _eq_number(env, doc, anchor, number)
            eq = _link(app, fromdoc, doc, anchor, nodes.Text(f"({shown}) " if shown else ""),
                       nodes.literal(label, label))
            chapter = _link(app, fromdoc, doc, None, nodes.Text(_short(env, doc)))
            chapter["reftitle"] = _title(env, doc)
            if mine:
                items = nodes.bullet_list(classes=["simple", "ledger-checks"])
                for _, fn, what, cell in mine:
                    call = _link(app, fromdoc, doc, cell, nodes.literal(f"ledger.{fn}", f"ledger.{fn}"))
                    what = _filled(what, label, record.get("records", []))
                    items += nodes.list_item("", nodes.paragraph("", "", call, nodes.Text(f" {what}")))
                checks_cell = [items]
            else:
                logger.warning("equation %s has no ledger check", label, location=doc)
                checks_cell = [nodes.paragraph("", "", nodes.strong("", "MISSING: no check"))]
            cells = [[nodes.paragraph("", "", chapter)], [nodes.paragraph("", "", eq)]]
            if kind == "math":
                lab_record = {"tie": record.get("ties", {}).get(label),
                              "records": [r for r in record.get("records", []) if r["label"] == label]}
                mech = _tie_mechanism(lab_record if record else None, {fn for _, fn, _, _ in mine})
                mechanisms[mech] += 1
                if mech == "untied":
                    logger.warning("equation %s has no display tie", label, location=doc)
                cells += [[nodes.paragraph("", mech)], _what_checked(lab_record if record else None), checks_cell]
            else:
                cells += [checks_cell]
            rows.append((f"{'ledger' if kind == 'math' else 'impl'}-{label}", cells))
    n_eq = sum(n for _, n, _ in per_chapter)
    pages = f"{len(docs)} page" + ("s" if len(docs) != 1 else "")
    if kind == "math":
        ties = ", ".join(f"{n} {m}" for m, n in sorted(mechanisms.items()))
        summary = nodes.paragraph("", f"{n_eq} numbered equations on {pages}, verified by {n_checks} math checks "
                                      f"and display ties that ran when this book was built. Displays tied: {ties}.")
        headers = ["Chapter", "Equation", "Display tie", "What is checked", "Checks (each links to its cell)"]
        widths = [1, 2, 1, 3, 4]
    else:
        summary = nodes.paragraph("", f"{n_checks} implementation checks, for {len(rows)} of the {n_eq} equations:")
        headers, widths = ["Chapter", "Equation", "Implementation checks"], [1, 2, 5]
    chapters = nodes.bullet_list(classes=["simple"])
    for doc, n, k in per_chapter:
        chapters += nodes.list_item("", nodes.paragraph(
            "", "", _link(app, fromdoc, doc, None, *_title_nodes(env, doc)),
            nodes.Text(f": {n} equations, {k} {'math checks and ties' if kind == 'math' else 'implementation checks'}")))
    table = _table(headers, rows, widths, ["ledger-table", "colwidths-auto"])
    return [summary, chapters, table]


def build_api_chapters(app, fromdoc, node):
    env = app.env
    derived = [d for d in node["derived"] if d in env.found_docs]
    refs = sorted(_env_data(env)["backrefs"].get(node["target"], set()) - set(derived) - {fromdoc},
                  key=_reading_order(env).index)
    fields = nodes.field_list(classes=["entmath-chapters"])
    for name, docs in (("Derived in", derived), ("Also used in", refs)):
        if not docs:
            continue
        body = nodes.paragraph()
        for i, doc in enumerate(docs):
            if i:
                body += nodes.Text(", ")
            body += _link(app, fromdoc, doc, None, *_title_nodes(env, doc))
        fields += nodes.field("", nodes.field_name("", name), nodes.field_body("", body))
    return [fields] if len(fields) else []


def resolve_placeholders(app, doctree, fromdoc):
    for node in list(doctree.findall(ledger_table)):
        node.replace_self(build_ledger(app, fromdoc, node.get("kind", "math")))
    for node in list(doctree.findall(api_chapters)):
        node.replace_self(build_api_chapters(app, fromdoc, node))


# ------------------------------------------------------------------------------------------------
# Generated sources: the API reference and the performance appendix


def _placeholder(name: str):
    return re.compile(r"^(`{3,}|:{3,})\{" + re.escape(name) + r"\}[^\n]*\n\1[ \t]*$", re.M)


def generate_sources(app, docname, source):
    text = source[0]
    for name, make in (("entmath-api", api_markdown), ("performance-results", perf_markdown)):
        pattern = _placeholder(name)
        if pattern.search(text):
            generated = make(app, docname)
            text = pattern.sub(lambda _: generated, text)
    source[0] = text


def _chapter_docs(app, obj) -> list:
    """The chapter pages that the docstrings of ``obj`` and of its module name ("Chapter 1")."""
    module = inspect.getmodule(obj)
    text = ((module.__doc__ or "") if module else "") + "\n" + (obj.__doc__ or "")
    docs = []
    for number in dict.fromkeys(int(n) for n in CHAPTER_REF.findall(text)):
        for path in sorted(Path(app.srcdir).glob(f"book/ch{number:02d}_*")):
            if path.suffix in (".md", ".ipynb"):
                docs.append(path.relative_to(app.srcdir).with_suffix("").as_posix())
    return docs


def api_markdown(app, docname) -> str:
    public = _public_objects()
    names = "\n".join(f"   {qual.split('.', 1)[1]}" for qual in public)
    out = ["```{eval-rst}", f".. currentmodule:: {PACKAGE}", "", ".. autosummary::", "   :nosignatures:", "",
           names, "```", ""]
    for qual, obj in public.items():
        kind = "autoclass" if inspect.isclass(obj) else "autofunction"
        derived = " ".join(_chapter_docs(app, obj))
        out += ["```{eval-rst}", f".. {kind}:: {qual}", ""]
        if inspect.isclass(obj):
            out += ["   :members:", ""]
        out += [f"   .. entmath-chapters:: {qual}"] + ([f"      :derived: {derived}"] if derived else [])
        out += ["```", ""]
    return "\n".join(out)


# Names the benchmark scripts store, as the book calls them ("seed" is the source post).
DISPLAY_NAMES = {"seed scheme": "source post's scheme",
                 "seed numpy loop (10 it.)": "source post's numpy loop (10 it.)"}


def _md(value) -> str:
    """Text for a Markdown table cell: numbers at 4 significant digits, punctuation escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = "" if value is None else DISPLAY_NAMES.get(str(value), str(value))
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", text)


def _fence(text: str) -> str:
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}{{code-block}} text\n:class: entmath-docstring\n\n{text}\n{ticks}"


def _describe(machine: dict) -> str:
    keys = ["device", "cpu", "cpu_count", "torch_threads", "torch", "python", "platform"]
    parts = [f"{k} {machine[k]}" for k in keys if k in machine]
    parts += [f"{k} {v}" for k, v in machine.items() if k not in keys and k != "date"]
    return "; ".join(parts)


def _row_label(row: dict, skip) -> str:
    parts = []
    for key, value in row.items():
        if key in skip or isinstance(value, float):
            continue
        parts.append(DISPLAY_NAMES.get(value, value) if isinstance(value, str) else f"{key}={value}")
    return " | ".join(parts) or "row"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# A chart panel shows at most MAX_BARS bars: a result with more rows is split by its label
# columns (op, shape, ...) into groups of at most that many, each with its own table and chart.
MAX_BARS = 12
# Figures are FIG_WIDTH inches wide and shown at the column's width, about 7.2 in (688 CSS px at
# 1280 px), so text set at FONT pt is read at about FONT pt; saved at 2x for dense screens.
FIG_WIDTH, FONT, FIG_DPI = 7.0, 9, 200


def _plot(title: str, series: list) -> str:
    """Bar charts of ``series`` = [(xlabel, labels, values)], one panel each, stacked, as a PNG
    data URI (embedded in the page: no file to go stale, nothing to copy)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [0.9 + 0.34 * len(labels) for _, labels, _ in series]
    fig, axes = plt.subplots(len(series), 1, squeeze=False, figsize=(FIG_WIDTH, 0.5 + sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, (xlabel, labels, values) in zip(axes[:, 0], series):
        values = [float(v) if _is_number(v) else float("nan") for v in values]
        ys = range(len(values))
        bars = ax.barh(ys, values, color="#4c72b0")
        ax.axvline(1.0, color="#c44e52", lw=1.2, ls="--", label="1 (parity)")
        ax.bar_label(bars, fmt="%.3g", padding=3, fontsize=FONT)
        ax.set_yticks(list(ys), [textwrap.shorten(label, 48, placeholder="...") for label in labels],
                      fontsize=FONT)
        ax.tick_params(axis="x", labelsize=FONT)
        ax.invert_yaxis()
        finite = [v for v in values if v == v and v > 0] + [1.0]
        if max(finite) / min(finite) > 30:  # room on the right for the value labels
            ax.set_xscale("log")
            ax.set_xlim(min(finite) / 3, max(finite) * 400)
        else:
            ax.set_xlim(0, max(finite) * 1.25)
        ax.set_xlabel(str(xlabel).replace("_", " "), fontsize=FONT)
        ax.legend(fontsize=FONT, loc="best")
    fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _by_schema(rows: list, columns: list) -> list:
    """``rows`` as [(fixed, group)] by the columns they fill (rows of different comparisons in
    one result often record different columns); ``fixed`` names a group by a text column that
    is constant within it and differs between groups."""
    schemas: dict = {}
    for r in rows:
        schemas.setdefault(frozenset(c for c in columns if r.get(c) is not None), []).append(r)
    if len(schemas) == 1:
        return [((), rows)]
    out = []
    for group in schemas.values():
        name = next((c for c in columns if isinstance(group[0].get(c), str)
                     and len({r.get(c) for r in group}) == 1 and len({r.get(c) for r in rows}) > 1), None)
        out.append((((name, group[0][name]),) if name else (), group))
    return out


def _split_rows(rows: list, columns: list, fixed: tuple = ()) -> list:
    """``rows`` as [(fixed, group)], groups of at most MAX_BARS rows: split by the label columns
    (text or integer values), the first one (in column order) whose groups are small enough, or
    else the first one and again within each group; ``fixed`` holds a group's (column, value)."""
    if len(rows) <= MAX_BARS:
        return [(fixed, rows)]
    used = {c for c, _ in fixed}
    keys = [c for c in columns if c not in used and len({str(r.get(c)) for r in rows}) > 1
            and all(isinstance(r.get(c), (str, int)) and not isinstance(r.get(c), bool) for r in rows)]

    def by(col):
        groups: dict = {}
        for r in rows:
            groups.setdefault(r.get(col), []).append(r)
        return list(groups.items())

    for col in keys:
        if max(len(g) for _, g in by(col)) <= MAX_BARS:
            return [(fixed + ((col, v),), g) for v, g in by(col)]
    if keys:
        return [s for v, g in by(keys[0]) for s in _split_rows(g, columns, fixed + ((keys[0], v),))]
    return [(fixed, rows[i:i + MAX_BARS]) for i in range(0, len(rows), MAX_BARS)]


# A table is split into column groups when its estimated width (characters of its widest word or
# cell per column, at CHAR_PX each, plus padding) would exceed the column, about 688 CSS px.
CHAR_PX, CELL_PAD_PX, COLUMN_PX = 7.5, 18, 660


def _fitting_tables(header: list, rows: list) -> list:
    """One table, or several sharing the text columns (the rows' names), each narrow enough."""
    def width(c):
        words = str(header[c]).replace("_", " ").split() or [""]
        cells = [len(_md(r[c]).replace("\\", "")) for r in rows]
        return max([len(w) for w in words] + cells) * CHAR_PX + CELL_PAD_PX
    if sum(width(c) for c in range(len(header))) <= COLUMN_PX:
        return _md_table(header, rows)
    keep = [c for c in range(len(header)) if all(isinstance(r[c], str) for r in rows)][:2]
    rest = [c for c in range(len(header)) if c not in keep]
    parts, part = [], []
    for c in rest:
        if part and sum(width(k) for k in keep + part + [c]) > COLUMN_PX:
            parts.append(part)
            part = []
        part.append(c)
    parts.append(part)
    out = []
    for cols in parts:
        out += _md_table([header[c] for c in keep + cols], [[r[c] for c in keep + cols] for r in rows])
    return out


def _md_table(header: list, rows: list) -> list:
    """A Markdown table; underscores in the headers become spaces, so that a narrow column wraps
    a header between words rather than letter by letter."""
    return (["| " + " | ".join(_md(str(h).replace("_", " ")) for h in header) + " |",
             "|" + "---|" * len(header)]
            + ["| " + " | ".join(_md(v) for v in row) + " |" for row in rows] + [""])


def _result_section(app, path: Path, data: dict, level: str) -> list:
    """One result file: provenance, machine, parameters, tables, a figure of its ratios.

    The scripts do not share one schema beyond ``machine``, so this reads what is there:
    ``rows`` (a list of records) is a table whose ratio-like columns are plotted; a top-level
    mapping of names to floats is a two-column table, plotted too if its key is ratio-like;
    scalars and small integer mappings (shapes) are parameters; anything more nested is kept,
    complete, in a collapsed "recorded data" block.
    """
    name = path.stem
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    script = Path(app.srcdir) / "benchmarks" / f"bench_{name.split('.')[0]}.py"
    out = [f"(perf-{slug})=", f"{level} `{name}`", ""]
    if script.is_file():
        out += [f"From `benchmarks/{script.name}`, saved in `{RESULTS_DIR}/{path.name}`.", ""]
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
        if doc:
            out += [_fence(doc), ""]
    else:
        out += [f"Saved in `{RESULTS_DIR}/{path.name}`.", ""]
    device = "" if "device" in machine else " (no device recorded: a CPU run)"
    out += [f"**Machine** ({_md(machine.get('date', 'undated'))}): "
            f"{_md(_describe(machine)) or 'not recorded'}{device}.", ""]

    params, tables, nested, series = [], [], {}, []
    where = (f"Device: {_md(machine.get('device', 'not recorded'))}; {_md(machine.get('cpu', ''))}; "
             f"date: {_md(machine.get('date', 'not recorded'))}.")
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        ratios = [c for c in columns if RATIO_COLUMN.search(c) and any(_is_number(r.get(c)) for r in rows)]
        groups = [s for fixed, part in _by_schema(rows, columns) for s in _split_rows(part, columns, fixed)]
        for k, (fixed, group) in enumerate(groups):
            shown = [c for c in columns if c not in dict(fixed) and any(r.get(c) is not None for r in group)]
            heading = "; ".join(f"{_md(c)} = {_md(v)}" for c, v in fixed)
            tables += ([f"**{heading}**", ""] if heading else []) + _fitting_tables(
                shown, [[r.get(c) for c in shown] for r in group])
            plotted = [c for c in ratios if any(_is_number(r.get(c)) for r in group)]
            if not plotted:
                continue
            labels = [_row_label(r, set(ratios) | set(dict(fixed))) for r in group]
            plain = "; ".join(f"{c} = {DISPLAY_NAMES.get(str(v), v)}" for c, v in fixed)
            title = f"{name}: {plain}" if plain else name
            caption = (f"{', '.join(_md(c) for c in plotted)} of `{name}`"
                       + (f", {heading}" if heading else "") + f" (dashed line: 1). {where}")
            suffix = f"-{k + 1}" if len(groups) > 1 else ""
            tables += [f"```{{figure}} {_plot(title, [(c, labels, [r.get(c) for r in group]) for c in plotted])}",
                       f":name: fig-perf-{slug}{suffix}",
                       f":alt: bar chart of {', '.join(plotted)} in {name}"
                       + (f" for {plain}" if plain else ""),
                       ":width: 100%", "", caption, "```", ""]
    elif rows is not None:
        nested["rows"] = rows
    for key, value in data.items():
        if key in ("machine", "rows"):
            continue
        if isinstance(value, (str, bool)) or _is_number(value) or value is None:
            params.append(f"{_md(key)} = {_md(value)}")
        elif isinstance(value, list) and len(value) <= 8 and all(_is_number(v) or isinstance(v, str) for v in value):
            params.append(f"{_md(key)} = {_md(value)}")
        elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
            if all(isinstance(v, int) for v in value.values()):  # a shape or a size: a parameter
                params.append(f"{_md(key)} = " + ", ".join(f"{_md(k)} {_md(v)}" for k, v in value.items()))
            else:
                tables += [f"**{_md(key)}**", ""] + _md_table(["", key], list(value.items()))
                if RATIO_COLUMN.search(key):
                    series.append((key, list(value), list(value.values())))
        else:
            nested[key] = value
    if params:
        out += ["**Parameters:** " + "; ".join(params) + ".", ""]
    out += tables
    if series:
        caption = f"{', '.join(_md(title) for title, _, _ in series)} of `{name}` (dashed line: 1). {where}"
        named = any(line.startswith(f":name: fig-perf-{slug}") for line in out)
        out += [f"```{{figure}} {_plot(name, series)}", f":name: fig-perf-{slug}" + ("-summary" if named else ""),
                f":alt: bar chart of the ratios in {name}", ":width: 100%", "", caption, "```", ""]
    elif not any(line.startswith("```{figure}") for line in out):
        out += ["This result has no ratio to plot.", ""]
    if nested:
        out += ["````{admonition} Everything else this result recorded", ":class: dropdown", "",
                "```json", json.dumps(nested, indent=1), "```", "````", ""]
    return out


# The compile check's table (tests/gpu_compile_check.py, ``make gpu-check``): not a benchmark.
GPU_COMPILE_RESULT = "gpu_compile.json"
# Peak HBM bandwidth and FP32 instruction issue rate (SMs x FP32 lanes x boost clock) of the GPUs
# the traffic and instruction counts are converted at.
GPU_PEAKS = [("H100 SXM", 3.35e12, 132 * 128 * 1.98e9), ("A100 SXM", 2.039e12, 108 * 64 * 1.41e9)]
GPU_TARGETS = ("sm_80", "sm_90", "sm_100")


def _seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} µs"


def _span(lo: float, hi: float, fmt) -> str:
    return fmt(lo) if abs(hi - lo) <= 1e-9 * max(abs(hi), 1.0) else f"{fmt(lo)}–{fmt(hi)}"


def _passes(counts: dict) -> str:
    def n(v):
        return f"{v[0]}–{v[1]}" if isinstance(v, list) else str(v)
    return ", ".join(f"{k.removesuffix('_ptr')} ×{n(v)}" for k, v in counts.items()) or "–"


def _accesses(loops: list) -> str:
    for lp in loops:
        if lp.get("ld") or lp.get("st"):
            parts = [f"{kind} " + " + ".join(f"{c}×{int(bits) // 8} B" for bits, c in
                                            sorted(lp[kind].items(), key=lambda kv: -int(kv[0])))
                     for kind in ("ld", "st") if lp.get(kind)]
            return "; ".join(parts)
    return "–"


def gpu_compile_markdown(data: dict) -> list:
    """The GPU section built from the compile check's JSON: per production launch, what the
    compiler did (registers, spills, shared memory, load widths) and what its HBM traffic and
    instruction count cost on paper at H100 and A100 peaks."""
    kernels = [k for k in data.get("kernels", []) if k.get("production")]
    (h_name, h_bw, h_ips), (a_name, a_bw, a_ips) = GPU_PEAKS
    out = ["(perf-gpu-compile)=", "## GPU: compile-time analysis", "",
           "```{admonition} Compile-time analysis, not a measurement",
           ":class: note", "",
           f"Every figure in this section comes from compiling the Triton kernels for {', '.join(GPU_TARGETS)} "
           f"on a machine without a GPU (`make gpu-check`, `tests/gpu_compile_check.py`, Triton "
           f"{data.get('triton', '?')}) and reading the binaries; none was timed. *Traffic* is the HBM "
           f"bytes the kernel must move for all rows of the shape (its docstring's passes, as numbers) at "
           f"peak bandwidth ({h_name} {h_bw / 1e12:.2f} TB/s, {a_name} {a_bw / 1e12:.2f} TB/s); *issue* is the "
           f"SASS instructions of its loops per element, times the elements, at one FP32 instruction per lane "
           f"per clock ({h_name} {h_ips / 1e12:.1f}, {a_name} {a_ips / 1e12:.2f} T/s). The larger of the two is "
           "a lower bound on the time, not an estimate of it. Measured GPU figures replace these as soon as "
           "a GPU runs the benchmarks.",
           "```", "",
           "Each launch is compiled as its launcher configures it (blocks, warps, register budget: "
           f"the `config` of each entry in `{RESULTS_DIR}/{GPU_COMPILE_RESULT}`). "
           "Registers and shared memory are per thread and per program, for sm_80 / sm_90 / sm_100; a "
           "spill is stack or local memory (the check fails on any, except the listed ones of "
           "`entropy_normalize`, whose kernel is being reworked elsewhere). *Loads* are the global "
           "loads and stores of the kernel's first loop on sm_90, by width: 16 B is a vector load. "
           "Passes count reads (r) and writes (w) of row-sized tensors; a range depends on the data "
           "(solver iterations).", ""]
    ops = list(dict.fromkeys(k["op"] for k in kernels))
    for op in ops:
        out += [f"### `{op}`", ""]
        compiled, costs = [], []
        for k in (k for k in kernels if k["op"] == op):
            t = k.get("targets", {})
            name = k["kernel"].removesuffix("_kernel")
            regs = "/".join(str(t[c]["regs"]) if c in t else "?" for c in GPU_TARGETS)
            spills = "/".join(str(t[c]["stack"] + t[c]["local"]) if c in t else "?" for c in GPU_TARGETS)
            shared = "/".join(str(t[c]["shared"]) if c in t else "?" for c in GPU_TARGETS)
            compiled.append([k["shape"], name, regs, spills, shared, _accesses(t.get("sm_90", {}).get("loops", []))])
            lo, hi = k["bytes_per_row"]
            rows = k["rows"]
            inst = k.get("instructions_per_row")
            passes = "; ".join(f"{rw} {_passes(k[key])}" for rw, key in (("r", "reads"), ("w", "writes")) if k[key])
            traffic = (_span(rows * lo / h_bw, rows * hi / h_bw, _seconds) + " / "
                       + _span(rows * lo / a_bw, rows * hi / a_bw, _seconds))
            issue = (_span(rows * inst[0] / h_ips, rows * inst[1] / h_ips, _seconds) + " / "
                     + _span(rows * inst[0] / a_ips, rows * inst[1] / a_ips, _seconds)) if inst else "not modelled"
            costs.append([k["shape"], name, passes, _span(lo, hi, lambda b: f"{b / 1e3:.4g} kB"), traffic, issue])
        out += ["What the compiler made of each launch (sm_80/sm_90/sm_100; loads on sm_90):", ""]
        out += _md_table(["shape", "kernel", "registers", "spills (B)", "shared (B)", "loads"], compiled)
        out += ["What it costs on paper, for all rows of the shape:", ""]
        out += _md_table(["shape", "kernel", "HBM passes", "bytes / row", "traffic H100 / A100",
                          "issue H100 / A100"], costs)
    tests = len([k for k in data.get("kernels", []) if not k.get("production")])
    out += [f"The check also compiles {tests} launches at the shapes the tests use (short and ragged rows, "
            f"fp64); they are in `{RESULTS_DIR}/{GPU_COMPILE_RESULT}` with the rest.", ""]
    return out


def perf_markdown(app, docname) -> str:
    results = sorted((Path(app.srcdir) / RESULTS_DIR).glob("*.json"))
    cpu, gpu, compiled = [], [], None
    for path in results:
        app.env.note_dependency(str(path))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read benchmark result %s: %s", path, exc, location=docname)
            continue
        if path.name == GPU_COMPILE_RESULT:
            compiled = data
            continue
        device = str((data.get("machine") or {}).get("device", "cpu"))
        (gpu if device.startswith("cuda") else cpu).append((path, data))
    out = ["## CPU results", ""]
    if not cpu:
        out += ["No CPU results have been saved yet.", ""]
    for path, data in cpu:
        out += _result_section(app, path, data, "###")
    out += ["(perf-gpu)=", "## GPU results", ""]
    if not gpu:
        out += ["**No GPU results yet.** Every result above was measured on a CPU, with the torch paths "
                "(Triton kernels need a GPU, or run in the interpreter, which is not a speed test). "
                "When a benchmark script is run on a CUDA machine its JSON records a `cuda:` device "
                "and appears in this section, with its device and date in each figure.", ""]
    for path, data in gpu:
        out += _result_section(app, path, data, "###")
    if compiled is not None:
        out += gpu_compile_markdown(compiled)
    return "\n".join(out)


TYPE_LIKE = re.compile(r"^[\w.]+(\[[\w., |\[\]]*\])?(\s*\|\s*[\w.]+(\[[\w., |\[\]]*\])?)*$")


def keep_returns_prose(app, what, name, obj, options, lines):
    """Napoleon reads ``type: description`` on the first line of a Google ``Returns:`` section, so a
    sentence with a colon there (``... their dtype.  **Documented value:** +inf ...``) would become
    a bogus return type.  When the text before the colon is no type, start that sentence on a line of
    its own.  Runs before napoleon (priority 400 < 500)."""
    for i, line in enumerate(lines[:-1]):
        if line.strip() not in ("Returns:", "Yields:"):
            continue
        first = lines[i + 1]
        body = first.strip()
        masked = re.sub(r"``.+?``|:[\w:+.-]+:`.+?`", lambda m: "x" * len(m.group()), body)
        colon = re.search(r"(?<!:):(?!:)", masked)
        if colon and not TYPE_LIKE.match(body[: colon.start()].strip()):
            cut = body.rfind(". ", 0, colon.start())
            if cut > 0:
                indent = first[: len(first) - len(first.lstrip())]
                lines[i + 1 : i + 2] = [indent + body[: cut + 1], indent + body[cut + 1 :].strip()]


# ------------------------------------------------------------------------------------------------
# The executed notebook in the download menu


def offer_notebook(app, pagename, templatename, context, doctree):
    """Put the executed notebook next to the page's source so the theme offers a .ipynb download."""
    if app.builder.format != "html" or doctree is None:
        return
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.is_file():
        return
    nb = json.loads(executed.read_text(encoding="utf-8"))
    nb.get("metadata", {}).pop("source_map", None)  # myst-nb's bookkeeping, not the reader's
    dest = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    context["ipynb_source"] = f"{pagename}.ipynb"


def dedupe_scripts(app, pagename, templatename, context, doctree):
    """Drop repeated <script> entries.  sphinx-thebe adds its inline config once with filename None
    and Sphinx re-adds it as '', so every page declared ``const THEBE_JS_URL`` twice: a JS error."""
    files = context.get("script_files")
    if not files:
        return
    seen, unique = set(), []
    for js in files:
        key = (str(getattr(js, "filename", js) or ""),
               json.dumps(getattr(js, "attributes", {}), sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    files[:] = unique


# ------------------------------------------------------------------------------------------------
# Search: the chapters quote Chinese terms (熵, 熵归一化); English word splitting keeps a run of
# CJK characters as one word, so a search for 熵 found nothing.

CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def cjk_terms(text: str) -> list:
    """Each run of CJK characters in ``text`` as its characters and its two-character pieces (the
    run itself is already a word), so that a query of one or two characters finds it."""
    out = []
    for run in CJK_RUN.findall(text):
        if len(run) > 1:
            out += list(run) + [run[i:i + 2] for i in range(len(run) - 1) if len(run) > 2]
    return out


def _english_with_cjk():
    from sphinx.search.en import SearchEnglish

    class SearchEnglishCJK(SearchEnglish):
        """English search, with Chinese terms indexed by character and by character pair."""

        def split(self, input: str) -> list:
            return super().split(input) + cjk_terms(input)

    return SearchEnglishCJK


def add_static(app):
    app.config.html_static_path.append(str(Path(__file__).parent / "static"))


def setup(app):
    for ext in ("sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon", "sphinxcontrib.bibtex"):
        app.setup_extension(ext)
    _register_label_style()
    app.connect("config-inited", register_bibfiles)
    app.connect("config-inited", use_book_wide_labels, priority=600)  # after register_bibfiles
    app.connect("builder-inited", check_mathjax)
    app.connect("builder-inited", add_static)
    # MathJax on every page: a chapter title with math ($\log n$) is in every page's navigation.
    app.set_html_assets_policy("always")
    app.add_css_file("entmath_book.css")
    app.add_search_language(_english_with_cjk())
    app.connect("source-read", generate_sources)
    app.connect("doctree-read", collect)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    app.connect("env-get-outdated", always_rewrite)
    app.connect("doctree-resolved", resolve_placeholders)
    app.connect("autodoc-process-docstring", keep_returns_prose, priority=400)
    app.connect("html-page-context", offer_notebook, priority=400)  # before the theme's buttons (501)
    app.connect("html-page-context", dedupe_scripts, priority=450)  # emit_firstresult: run early
    app.connect("build-finished", copy_mathjax)
    app.add_node(ledger_table)
    app.add_node(api_chapters)
    app.add_directive("verification-ledger", VerificationLedger)
    app.add_directive("entmath-chapters", ApiChapters)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
