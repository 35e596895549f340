"""How the chapters' code cells are shown (the reader edition): a reader sees the argument and
the calls that show how to use entmath; the set-up, the checks and the plotting code are folded.

* the first cell of a chapter (the set-up) is folded (``hide-input``);
* a cell that calls a ledger check, or draws a figure, is folded (``hide-input``) or its input is
  removed (``remove-input``): its output (numbers, the figure) stays on the page;
* a cell that draws a figure gives it a name, a caption and an alt text (myst-nb's ``figure``
  and ``image`` metadata), so the figure is numbered and described;
* no chapter silences every warning of a category: a filter names the module it is for.
"""
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
from entmath.ledger.index import CELL_OPTION, CODE_CELL, CHECK_FUNCTIONS  # noqa: E402

CHAPTERS = sorted((ROOT / "book").glob("ch*.md"))
CHECK = re.compile(r"\bledger\.(%s)\(" % "|".join(CHECK_FUNCTIONS))
FOLDED = {"hide-input", "remove-input", "remove-cell", "hide-cell"}


def cells(chapter: Path):
    """(options, code) of each code cell; options as a dict (``:key:`` lines or a YAML block)."""
    out = []
    for body in CODE_CELL.findall(chapter.read_text()):
        head = CELL_OPTION.match(body).group(1)
        code = body[len(head):]
        if head.startswith("---"):
            opts = yaml.safe_load(head.strip().strip("-")) or {}
        else:
            opts = {}
            for line in head.splitlines():
                key, _, value = line[1:].partition(":")
                opts[key] = yaml.safe_load(value) if value.strip() else None
        out.append((opts, code))
    return out


def test_there_are_chapters():
    assert CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_setup_checks_and_plots_are_folded(chapter):
    found = cells(chapter)
    assert found, f"{chapter.name} has no code cells"
    shown = []
    for k, (opts, code) in enumerate(found):
        tags = set(opts.get("tags") or [])
        needs_fold = k == 0 or CHECK.search(code) or "plt." in code
        if needs_fold and not tags & FOLDED:
            first = code.strip().splitlines()[0][:60]
            shown.append(f"cell {k}: {first}")
    assert not shown, f"{chapter.name}: set-up, check or plot cells shown in full: {shown}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_figure_is_named_captioned_and_described(chapter):
    bad = []
    for k, (opts, code) in enumerate(cells(chapter)):
        if "plt.show()" not in code and "plt.subplots(" not in code:
            continue
        nb = opts.get("mystnb") or {}
        fig, img = nb.get("figure") or {}, nb.get("image") or {}
        if not (fig.get("name") and fig.get("caption") and img.get("alt")):
            bad.append(k)
    assert not bad, f"{chapter.name}: figure cells without name, caption or alt text: {bad}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_warning_filters_name_their_module(chapter):
    broad = [line.strip() for _, code in cells(chapter) for line in code.splitlines()
             if re.search(r"warnings\.(filterwarnings|simplefilter)\(\s*[\"']ignore", line)
             and "triton" not in line and "module=" not in line]
    assert not broad, f"{chapter.name}: warnings silenced for every module: {broad}"
