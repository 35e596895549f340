"""The book's Sphinx extension (book/_ext/entmath_book.py): the parts that run without a build.

The generated pages themselves are checked by `make book` (-W -n) and `make browser`; these tests
pin down the behaviour that a new chapter, op or benchmark result relies on.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "book"), str(ROOT / "book" / "_ext")]
pytest.importorskip("sphinx")
import entmath_book as ext  # noqa: E402


def fake_app(root: Path):
    return SimpleNamespace(srcdir=str(root), confdir=str(root),
                           env=SimpleNamespace(note_dependency=lambda path: None))


def write_result(root: Path, name: str, data: dict) -> Path:
    path = root / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_every_bib_file_is_registered(tmp_path):
    (tmp_path / "book").mkdir()
    for name in ("references.bib", "refs_ch02.bib", "refs_ch07.bib"):
        (tmp_path / "book" / name).write_text("")
    config = SimpleNamespace(bibtex_bibfiles=["book/references.bib"])
    ext.register_bibfiles(fake_app(tmp_path), config)
    assert config.bibtex_bibfiles == ["book/references.bib", "book/refs_ch02.bib", "book/refs_ch07.bib"]


def test_a_result_with_rows_gets_a_table_and_a_plot_of_its_ratio_columns(tmp_path):
    data = {"machine": {"device": "cpu", "date": "2026-01-01", "cpu": "x"},
            "rows": [{"op": "a*b", "n": 3, "fast_ms": 1.0, "ratio_vs_x": 0.5, "speedup": 2.0},
                     {"op": "c|d", "n": 5, "fast_ms": 2.0, "ratio_vs_x": 1.5, "speedup": 0.7}],
            "dtype": "float32", "shape": [4, 8]}
    text = "\n".join(ext._result_section(fake_app(tmp_path), write_result(tmp_path, "toy", data), data, "###"))
    assert "| op | n | fast ms | ratio vs x | speedup |" in text  # headers wrap between words
    assert "a\\*b" in text and "c\\|d" in text  # Markdown punctuation escaped inside cells
    assert "```{figure} data:image/png;base64," in text
    assert "ratio\\_vs\\_x, speedup of `toy`" in text and "2026\\-01\\-01" in text
    assert "dtype = float32" in text


def test_a_result_with_many_rows_gets_a_table_and_a_chart_per_group_of_at_most_twelve(tmp_path):
    rows = [{"op": op, "shape": f"{n}x8", "mode": m, "ratio": 0.5 + n / 10}
            for op in ("a", "b", "c") for n in range(4) for m in ("fwd", "bwd")]  # 8 rows per op
    data = {"machine": {"device": "cpu", "date": "d"}, "rows": rows}
    text = "\n".join(ext._result_section(fake_app(tmp_path), write_result(tmp_path, "many", data), data, "###"))
    assert text.count("```{figure}") == 3 and text.count("| shape | mode | ratio |") == 3
    assert "**op = a**" in text and "**op = c**" in text and ":name: fig-perf-many-3" in text
    # three times as many rows: no one column splits them small enough, so op, then shape
    groups = ext._split_rows(rows * 3, list(rows[0]))
    assert len(groups) == 12 and all(len(g) <= ext.MAX_BARS for _, g in groups)
    assert [c for c, _ in groups[0][0]] == ["op", "shape"]


def test_a_result_without_rows_keeps_its_mappings_and_nested_data(tmp_path):
    data = {"machine": {"date": "d"}, "shape": {"n": 4096, "d": 64},
            "time_s": {"ours": 1.5, "theirs": 2.0}, "ratio_vs_theirs": {"ours": 0.75, "theirs": 1.0},
            "raw": {"ours": [1.4, 1.5, 1.6]}}
    text = "\n".join(ext._result_section(fake_app(tmp_path), write_result(tmp_path, "odd", data), data, "###"))
    assert "shape = n 4096, d 64" in text
    assert "**time\\_s**" in text and "**ratio\\_vs\\_theirs**" in text
    assert text.count("```{figure}") == 1  # only the ratio mapping is plotted
    assert ":class: dropdown" in text and '"raw"' in text
    assert "no device recorded" in text


def test_gpu_results_get_their_own_section(tmp_path):
    app = fake_app(tmp_path)
    row = {"rows": [{"op": "x", "ratio": 1.2}]}
    write_result(tmp_path, "cpu_run", {"machine": {"device": "cpu", "date": "d1"}, **row})
    assert "No GPU results yet" in ext.perf_markdown(app, "appendix")
    write_result(tmp_path, "gpu_run", {"machine": {"device": "cuda:NVIDIA H100", "date": "d2"}, **row})
    text = ext.perf_markdown(app, "appendix")
    cpu, gpu = text.split("## GPU results")
    assert "`cpu_run`" in cpu and "`gpu_run`" in gpu and "No GPU results yet" not in text
    assert "cuda\\:NVIDIA H100" in gpu


def test_the_compile_check_table_gets_the_compile_time_section(tmp_path):
    app = fake_app(tmp_path)
    write_result(tmp_path, "cpu_run", {"machine": {"device": "cpu", "date": "d1"}, "rows": [{"op": "x", "ratio": 1.2}]})
    target = {"regs": 40, "stack": 0, "local": 0, "local_ops": 0, "shared": 64, "mma": [], "approx": {},
              "loops": [{"insts": 300, "ld": {"128": 2}, "st": {}, "mma": 0, "insts_per_element": 40.0}]}
    kernel = {"op": "entropy", "shape": "4096x128256 float32", "production": True, "kernel": "entropy_fwd_kernel",
              "config": "BLOCK=4096 w16", "grid": [4096], "rows": 4096, "reads": {"z_ptr": 1}, "writes": {},
              "bytes_per_row": [513024.0, 513024.0], "instructions_per_row": [5.1e6, 5.1e6],
              "targets": {t: target for t in ("sm_80", "sm_90", "sm_100")}}
    write_result(tmp_path, "gpu_compile", {"triton": "3.7.1", "kernels": [kernel, dict(kernel, production=False)]})
    text = ext.perf_markdown(app, "appendix")
    cpu, gpu = text.split("## GPU results")
    assert "`gpu_compile`" not in text  # not rendered as a benchmark result
    section = gpu.split("## GPU: compile-time analysis")[1]
    assert "not a measurement" in section and "### `entropy`" in section
    assert "| 4096x128256 float32 | entropy\\_fwd | 40\\/40\\/40 | 0\\/0\\/0 | 64\\/64\\/64 | ld 2×16 B |" in section
    assert "627 µs \\/ 1\\.03 ms" in section  # 4096 rows x 513 kB at 3.35 and 2.04 TB/s
    assert "1 launches at the shapes the tests use" in section


def test_a_colon_in_the_first_returns_line_is_not_taken_for_a_type():
    lines = ["Returns:", "    Shape of x, its dtype.  **Documented value:** +inf where q lacks p's support.",
             "", "Raises:", "    ValueError: bad input."]
    ext.keep_returns_prose(None, "function", "f", None, {}, lines)
    assert lines[1:3] == ["    Shape of x, its dtype.", "    **Documented value:** +inf where q lacks p's support."]
    typed = ["Returns:", "    torch.Tensor: the entropy."]
    ext.keep_returns_prose(None, "function", "f", None, {}, typed)
    assert typed == ["Returns:", "    torch.Tensor: the entropy."]


def test_the_api_page_lists_every_public_routine_with_its_chapter():
    import entmath

    text = ext.api_markdown(fake_app(ROOT), "book/api")
    for name in entmath.__all__:
        obj = getattr(entmath, name)
        if callable(obj):
            assert f".. autofunction:: entmath.{name}" in text or f".. autoclass:: entmath.{name}" in text
    assert ":derived: book/ch01_entropy" in text
    for name in entmath.distributed.__all__:  # a submodule in __all__: its public routines too
        assert f".. autofunction:: entmath.distributed.{name}" in text
    assert ":derived: book/ch06_without_logits" in text


def test_alpha_labels_are_unique_across_the_chapters_bibliographies(tmp_path):
    # Two posts by one author in one year, in two chapters' .bib files: pybtex would call both
    # "Su22", and sphinxcontrib-bibtex fails the build on a label shared by two keys.
    post = "@misc{{{key},\n  author = {{Su, Jianlin}},\n  title = {{{title}}},\n  year = {{2022}}\n}}\n"
    (tmp_path / "a.bib").write_text(post.format(key="ch3-su2022quick", title="Quick")
                                    + "@book{ch3-knuth1984, author = {Knuth, Donald}, title = {T}, year = {1984}}\n")
    (tmp_path / "b.bib").write_text(post.format(key="ch4-su2022reparam", title="Reparam"))
    labels = ext.book_wide_labels([tmp_path / "a.bib", tmp_path / "b.bib"])
    assert labels == {"ch3-su2022quick": "Su22a", "ch4-su2022reparam": "Su22b", "ch3-knuth1984": "Knu84"}
    assert labels == ext.book_wide_labels([tmp_path / "b.bib", tmp_path / "a.bib"])  # file order is irrelevant


def test_every_bib_file_of_the_book_gets_distinct_labels():
    config = SimpleNamespace(bibtex_bibfiles=["book/references.bib"])
    ext.register_bibfiles(fake_app(ROOT), config)
    labels = ext.book_wide_labels(ROOT / f for f in config.bibtex_bibfiles)
    assert len(labels) > 10 and len(set(labels.values())) == len(labels)


def test_the_ledger_page_says_what_was_checked():
    record = {"tie": {"how": "parsed", "symbolic": False, "points": 40, "relation_kinds": {"inequality": 40}},
              "records": [{"label": "eq-x", "fn": "close", "kind": "numeric", "points": 200, "digits": 50},
                          {"label": "eq-x", "fn": "sym_equal", "kind": "symbolic, with assumptions", "points": None,
                           "digits": None},
                          {"label": "eq-x", "fn": "implementation", "kind": "implementation", "points": 8, "digits": None}]}
    text = "\n".join(n.astext() for n in ext._what_checked(record))
    assert "parsed and verified numerically in 40 environment(s)" in text and "strict at one at least" in text
    assert "numeric against a reference: 1 check(s), 200 point(s) in all, references at 50 digits" in text
    assert "symbols with assumptions" in text and "implementation" not in text
    assert ext._tie_mechanism(record, set()) == "parsed, numeric"
    assert ext._tie_mechanism({"tie": {"how": "text"}}, set()) == "registered text"
    assert ext._tie_mechanism(None, {"close"}) == "untied"
    assert "not executed" in ext._what_checked(None)[0].astext()


def test_the_run_record_is_read_from_the_glue_file(tmp_path):
    out = tmp_path / "html"
    glue_dir = tmp_path / "jupyter_execute" / "book"
    glue_dir.mkdir(parents=True)
    payload = json.dumps({"ties": {"eq-x": {"how": "text"}}, "records": []})
    (glue_dir / "ch09_x.glue.json").write_text(json.dumps(
        {"entmath-ledger": {"data": {"application/papermill.record/text/plain": repr(payload)}}}))
    app = SimpleNamespace(outdir=str(out))
    assert ext._run_record(app, "book/ch09_x") == {"ties": {"eq-x": {"how": "text"}}, "records": []}
    assert ext._run_record(app, "book/ch10_missing") == {}


def test_the_ledger_page_shows_an_f_string_description_as_the_run_filled_it():
    records = [{"label": "eq-a", "what": "H > 0 on all 17 random rows (50 digits)"},
               {"label": "eq-b", "what": "H > 0 on all 99 random rows (50 digits)"}]
    template = "H > 0 on all {len(others)} random rows ({digits} digits)"
    assert ext._filled(template, "eq-a", records) == "H > 0 on all 17 random rows (50 digits)"
    assert ext._filled(template, "eq-b", records) == "H > 0 on all 99 random rows (50 digits)"
    # No record of that equation matches: the template stays (and the browser check reports it).
    assert ext._filled(template, "eq-c", records) == template
    assert ext._filled("H > 0 on every row", "eq-a", records) == "H > 0 on every row"


def test_chinese_terms_are_searchable_by_character():
    assert sorted(ext.cjk_terms("entropy normalization (熵归一化) and 熵")) == sorted(
        ["熵", "归", "一", "化", "熵归", "归一", "一化"])
    assert ext.cjk_terms("no Chinese here") == []
    splitter = ext._english_with_cjk()({})
    words = splitter.split("the entropy (熵) of softmax, 熵归一化")
    assert "熵" in words and "熵归一化" in words and "归一" in words and "entropy" in words


def test_a_description_keeps_its_own_text_when_the_check_appended_to_it():
    # close() appends ": N point(s), max |err| = ..." and sym_zero "; residual = ..." to the text
    records = [{"label": "eq-a", "what": "50 digits, 300 random rows: 300 point(s), max |err| = 1e-40"},
               {"label": "eq-b", "what": "sympy: dH/dz_1 == -p_1 (log p_1 + H); residual = 0"}]
    assert ext._filled("50 digits, {len(rows)} random rows", "eq-a", records) == "50 digits, 300 random rows"
    assert ext._filled("sympy: dH/dz_{k + 1} == -p_{k + 1} (log p_{k + 1} + H)", "eq-b", records) == \
        "sympy: dH/dz_1 == -p_1 (log p_1 + H)"


def test_benchmark_method_names_are_shown_in_the_books_words():
    assert "seed" not in ext._md("seed scheme") and "post" in ext._md("seed scheme")
    assert ext._md("Monte Carlo") == "Monte Carlo"
    assert ext._row_label({"method": "seed scheme", "ms": 1.0}, skip=()) == "source post's scheme"
