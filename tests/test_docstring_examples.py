"""Every public routine of ``entmath`` (``entmath.__all__``) shows its use in an ``Examples:``
section of its docstring (rendered in the book's API reference), and those examples run and print
what they say."""
import doctest
import inspect

import pytest
import torch

import entmath

PUBLIC = [name for name in entmath.__all__
          if callable(getattr(entmath, name)) and not inspect.ismodule(getattr(entmath, name))]


def test_the_public_routines_are_found():
    # A test over an empty list would pass for nothing.
    assert {"entropy", "cross_entropy", "noise_softmax", "set_validation"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_examples_run(name):
    obj = getattr(entmath, name)
    doc = inspect.getdoc(obj) or ""
    assert "\nExamples:\n" in "\n" + doc, f"entmath.{name}'s docstring has no Examples: section"
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"entmath.{name}",
                                                      globs={"torch": torch, "entmath": entmath})
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 1, f"entmath.{name}'s Examples: section has no >>> lines"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    try:
        for t in tests:
            runner.run(t)
    finally:
        entmath.set_validation(True)  # an example that failed half-way must not leak its setting
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of entmath.{name}'s examples failed (see the output above)"
