"""Installing entmath: building leaves the source tree as it was (no build/, no *.egg-info), the
wheel carries the C kernel's source, and it installs into a fresh virtual environment, next to an
existing torch that it does not replace, and imports from there.

Fast and offline: the build uses this environment's setuptools (--no-build-isolation), and the
fresh environment sees this environment's torch through a .pth file instead of installing its
own (the dependency torch>=2.1 is then met, and --no-index would fail on any download)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "buildtools", "entmath")


def _pip(*args, cwd=None):
    run = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                         capture_output=True, text=True, timeout=600, cwd=cwd)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _tree(path: Path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A clean copy of what a checkout builds from."""
    src = tmp_path_factory.mktemp("checkout")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory):
    before = _tree(source)
    out = tmp_path_factory.mktemp("wheels")
    _pip("wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out), "-q")
    assert _tree(source) == before  # `pip wheel .` left nothing behind: no build/, no *.egg-info
    (whl,) = out.glob("entmath-*.whl")
    return whl


def test_pip_wheel_and_pip_install_leave_the_source_tree_as_it_was(source, wheel, tmp_path):
    before = _tree(source)
    _pip("install", str(source), "--no-deps", "--no-build-isolation", "--target", str(tmp_path / "target"), "-q")
    assert _tree(source) == before
    assert not (source / "build").exists() and not list(source.glob("*.egg-info"))
    assert (tmp_path / "target" / "entmath" / "kernels" / "cpu" / "loader.py").is_file()


def test_the_wheel_carries_the_package_and_the_c_kernel_source(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("entmath/__init__.py", "entmath/nn.py", "entmath/kernels/cpu/loader.py",
                 "entmath/kernels/cpu/entropy_normalization.c", "entmath/kernels/triton/entropy.py",
                 "entmath/ledger/__init__.py", "entmath/ledger/book_displays.json"):
        assert want in names, want
    assert not any(n.startswith(("tests/", "book/", "buildtools/")) or n.endswith(".so") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch>=2.1" in meta
    assert 'Requires-Dist: triton<3.8,>=3.7; extra == "triton"' in meta
    assert 'Requires-Dist: numpy>=1.26; extra == "triton"' in meta
    assert 'Requires-Dist: sympy>=1.12; extra == "book"' in meta


def test_the_wheel_installs_into_a_fresh_venv_and_imports(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This environment's torch, seen by the fresh one (a stand-in for "install the torch build first").
    Path(site, "outer_torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    # With its dependencies and no index: torch>=2.1 must be met by the torch already there.
    _pip("--python", str(python), "install", "--no-index", str(wheel), "-q")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = ("import entmath, entmath.nn, torch, pathlib; "
            "print(pathlib.Path(entmath.__file__).resolve()); "
            "print(float(entmath.entropy(torch.zeros(1, 4))))")
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    path, value = run.stdout.split()
    assert Path(path).is_relative_to(venv.resolve()), path  # the installed copy, not the checkout
    assert abs(float(value) - 1.3862943611198906) < 1e-6  # log 4

    # A chapter's checks away from the book's sources (a downloaded notebook): entmath.ledger reads
    # the packaged table of displays; a tie of the true display passes, of a wrong one raises.
    script = tmp_path / "notebook_cell.py"
    script.write_text(textwrap.dedent(r"""
        from entmath import ledger
        assert ledger.BOOK is None, ledger.BOOK
        assert ledger.display("eq-ent-log-ineq") == r"\log x \le x - 1,"
        points = [{"__mode__": "mp", "x": v} for v in (0.5, 1.0, 3.0)]
        ledger.tie("eq-ent-log-ineq", points)
        ledger.OVERRIDE["eq-ent-log-ineq"] = r"\log x \ge x - 1,"
        try:
            ledger.tie("eq-ent-log-ineq", points)
        except Exception:
            print("wrong display caught")
    """))
    run = subprocess.run([str(python), str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrong display caught" in run.stdout
