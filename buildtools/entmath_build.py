"""The PEP 517 build backend of entmath: setuptools, run on a private copy of the sources.

setuptools builds in the source tree: ``pip install .`` and ``pip wheel .`` used to leave
``build/`` and ``entmath.egg-info/`` behind in the checkout.  Each hook here copies what a build
needs (``pyproject.toml``, ``README.md`` and the ``entmath`` package, compiled files excluded) into
a temporary directory, runs setuptools' own hook there, and deletes the copy; the artifacts land
where pip asked (its absolute paths).  Editable installs (``pip install -e .``) must point at the
checkout itself, so their hooks run in place.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from setuptools import build_meta as _setuptools

#: What the build reads: the metadata, the readme (the long description) and the package.
FILES = ("pyproject.toml", "README.md")
PACKAGE = "entmath"


@contextlib.contextmanager
def _isolated_copy():
    source = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="entmath-build-") as tmp:
        for name in FILES:
            shutil.copy2(source / name, tmp)
        shutil.copytree(source / PACKAGE, Path(tmp) / PACKAGE,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o"))
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(source)


def _in_copy(hook):
    def run(*args, **kwargs):
        with _isolated_copy():
            return hook(*args, **kwargs)

    run.__name__ = hook.__name__
    run.__doc__ = f"setuptools' {hook.__name__}, run on a temporary copy of the sources."
    return run


get_requires_for_build_wheel = _in_copy(_setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _in_copy(_setuptools.get_requires_for_build_sdist)
prepare_metadata_for_build_wheel = _in_copy(_setuptools.prepare_metadata_for_build_wheel)
build_wheel = _in_copy(_setuptools.build_wheel)
build_sdist = _in_copy(_setuptools.build_sdist)

# Editable installs map the checkout itself.
get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_editable = _setuptools.build_editable
