"""The C-kernel loader (entmath/kernels/cpu/loader.py): a persistent per-user cache keyed by source,
compiler, flags and CPU; atomic installs under a lock (one build for many processes); nothing left
in $TMPDIR; and a cache that is no way in: every cached library that is not the user's own,
private and unchanged since its build is refused, with a warning, and rebuilt.

Most tests build a one-function C file (a fraction of a second) with the loader itself; the
DataLoader test runs the real kernel of entropy_normalize in forked workers."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from entmath.kernels.cpu import loader

LOADER = Path(loader.__file__)
FLAGS = [["-O1", "-fPIC", "-shared"]]

try:
    loader.find_compiler()
    HAVE_CC = True
except RuntimeError:
    HAVE_CC = False
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="giving a file to another user needs root")


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A tiny C source and a private cache directory for it."""
    src = tmp_path / "answer.c"
    src.write_text("int entmath_answer(void) { return 42; }\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENTMATH_CACHE_DIR", str(cache))
    return src, cache


def _entry(cache: Path):
    libs = sorted(cache.glob("answer-*.so"))
    assert len(libs) == 1, libs
    return libs[0], libs[0].with_suffix(".json")


def _load_quietly(src):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a clean cache
        return loader.load(src, FLAGS, libs=[])


def test_first_call_builds_then_loads_from_the_cache(kernel):
    src, cache = kernel
    first = _load_quietly(src)
    assert first.compiled and first.cached and first.lib.entmath_answer() == 42
    again = _load_quietly(src)
    assert not again.compiled and again.path == first.path
    # A private directory, a private library, and a record of the build that matches it.
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    lib, meta = _entry(cache)
    assert stat.S_IMODE(os.stat(lib).st_mode) & 0o077 == 0 and stat.S_IMODE(os.stat(meta).st_mode) & 0o077 == 0
    record = json.loads(meta.read_text())
    assert record["sha256"] == loader._sha256(lib) and record["flags"] == FLAGS[0]
    # No scratch left in the cache either: the library, its record, its lock file.
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".so"]


def test_the_key_covers_source_flags_and_compiler(kernel):
    src, cache = kernel
    a = _load_quietly(src)
    b = loader.load(src, [FLAGS[0] + ["-DVARIANT=1"]], libs=[])
    src.write_text("int entmath_answer(void) { return 43; }\n")
    c = loader.load(src, FLAGS, libs=[])
    assert len({a.path, b.path, c.path}) == 3 and b.compiled and c.compiled
    assert c.lib.entmath_answer() == 43
    assert loader._key(b"x", ["cc"], FLAGS, []) != loader._key(b"x", ["cc", "-m32"], FLAGS, [])


def test_a_failing_first_flag_set_falls_back_and_is_remembered(kernel):
    src, _ = kernel
    attempts = [["-fPIC", "-shared", "-fno-such-flag-entmath"], FLAGS[0]]
    first = loader.load(src, attempts, libs=[])
    assert first.compiled and first.flags == FLAGS[0]
    again = loader.load(src, attempts, libs=[])
    assert not again.compiled and again.flags == FLAGS[0]


def test_no_flag_set_builds_is_a_clear_error(kernel):
    src, _ = kernel
    src.write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="could not build answer.c"):
        loader.load(src, FLAGS, libs=[])


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="no C compiler"):
        loader.find_compiler()


def test_default_cache_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("ENTMATH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert loader.cache_dir() == tmp_path / "xdg" / "entmath"
    monkeypatch.setenv("ENTMATH_CACHE_DIR", str(tmp_path / "mine"))
    assert loader.cache_dir() == tmp_path / "mine"


# ---- refusals: each kind of untrusted entry is rebuilt, with a warning --------------------------
def _tamper_bytes(lib, meta):
    with open(lib, "ab") as f:
        f.write(b"\0")


def _writable_by_others(lib, meta):
    os.chmod(lib, 0o777)


def _writable_by_group(lib, meta):
    os.chmod(lib, 0o720)


def _symlink(lib, meta):
    real = lib.with_name("elsewhere.so")
    shutil.copy(lib, real)
    lib.unlink()
    lib.symlink_to(real)


def _no_record(lib, meta):
    meta.unlink()


def _record_of_another_build(lib, meta):
    record = json.loads(meta.read_text())
    record["sha256"] = "0" * 64
    meta.write_text(json.dumps(record))


def _record_writable_by_others(lib, meta):
    os.chmod(meta, 0o666)


def _owned_by_another_user(lib, meta):
    os.chown(lib, 65534, 65534)


REFUSALS = [
    (_tamper_bytes, "does not match the SHA-256"),
    (_writable_by_others, "writable by group or others"),
    (_writable_by_group, "writable by group or others"),
    (_symlink, "not a regular file"),
    (_no_record, "no record of its build"),
    (_record_of_another_build, "does not match the SHA-256"),
    (_record_writable_by_others, "writable by group or others"),
    pytest.param(_owned_by_another_user, "owned by uid 65534", marks=as_root),
]


@pytest.mark.parametrize("spoil,why", REFUSALS, ids=lambda x: getattr(x, "__name__", "")[1:] if callable(x) else "")
def test_an_untrusted_cached_library_is_refused_and_rebuilt(kernel, spoil, why):
    src, cache = kernel
    _load_quietly(src)
    lib, meta = _entry(cache)
    spoil(lib, meta)
    with pytest.warns(RuntimeWarning, match=f"refusing the cached build .*{why}.*rebuilding"):
        again = loader.load(src, FLAGS, libs=[])
    assert again.compiled
    # The rebuilt entry is trusted again: a regular private file matching its record.
    st = os.lstat(lib)
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o022 == 0 and st.st_uid == os.geteuid()
    assert json.loads(meta.read_text())["sha256"] == loader._sha256(lib)
    assert not _load_quietly(src).compiled


def _dir_writable_by_others(cache):
    os.chmod(cache, 0o777)


def _dir_owned_by_another_user(cache):
    os.chown(cache, 65534, 65534)


@pytest.mark.parametrize("spoil,why", [(_dir_writable_by_others, "writable by group or others"),
                                       pytest.param(_dir_owned_by_another_user, "owned by uid 65534",
                                                    marks=as_root)],
                         ids=["writable_by_others", "owned_by_another_user"])
def test_an_untrusted_cache_directory_is_not_used(kernel, spoil, why, tmp_path, monkeypatch):
    src, cache = kernel
    _load_quietly(src)
    spoil(cache)
    before = sorted(cache.iterdir())
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(loader.tempfile, "tempdir", str(tmpdir))
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache.*{why}"):
        out = loader.load(src, FLAGS, libs=[])
    assert out.compiled and not out.cached and out.lib.entmath_answer() == 42
    assert sorted(cache.iterdir()) == before  # nothing read from it or written to it
    assert list(tmpdir.iterdir()) == []  # the temporary build is gone once loaded


def test_the_new_directory_is_private_even_under_a_permissive_umask(tmp_path, monkeypatch):
    src = tmp_path / "answer.c"
    src.write_text("int entmath_answer(void) { return 42; }\n")
    cache = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("ENTMATH_CACHE_DIR", str(cache))
    old = os.umask(0)
    try:
        loader.load(src, FLAGS, libs=[])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


# ---- processes: one build for many, nothing left in $TMPDIR -------------------------------------
CHILD = textwrap.dedent("""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("entmath_loader", sys.argv[1])
    loader = sys.modules["entmath_loader"] = importlib.util.module_from_spec(spec)  # stdlib only: no torch
    spec.loader.exec_module(loader)
    out = loader.load(sys.argv[2], [["-O1", "-fPIC", "-shared"]], libs=[])
    assert out.lib.entmath_answer() == 42
    print("compiled" if out.compiled else "cached", flush=True)
    os._exit(0)  # as a DataLoader worker leaves: no atexit handler runs
""")


def _env(cache, tmpdir):
    return dict(os.environ, ENTMATH_CACHE_DIR=str(cache), TMPDIR=str(tmpdir))


def test_concurrent_processes_build_once_and_leave_nothing_in_tmpdir(kernel, tmp_path):
    src, cache = kernel
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(LOADER), str(src)], env=_env(cache, tmpdir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = sorted(o.strip() for o, _ in outs)
    assert said == ["cached", "cached", "cached", "compiled"], outs
    assert list(tmpdir.iterdir()) == []
    later = subprocess.run([sys.executable, "-c", CHILD, str(LOADER), str(src)], env=_env(cache, tmpdir),
                           capture_output=True, text=True, timeout=300)
    assert later.stdout.strip() == "cached", later.stderr


WORKERS = textwrap.dedent("""
    import os, sys, torch, entmath
    from entmath.kernels.cpu import entropy_normalization as kernel

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            z = torch.randn(1, 1 << 16, generator=torch.Generator().manual_seed(i))
            p = entmath.entropy_normalize(z, 3.0)  # the C kernel (float32, 2^16 logits)
            return torch.tensor([float(kernel._lib is not None), float(p.sum())])

    if __name__ == "__main__":
        assert kernel._lib is None  # the parent never calls it
        for epoch in range(2):
            loader = torch.utils.data.DataLoader(Rows(), batch_size=1, num_workers=2,
                                                 multiprocessing_context="fork")
            for batch in loader:
                assert batch[0, 0] == 1.0 and abs(batch[0, 1] - 1) < 1e-4, batch
        print("ok")
""")


def test_dataloader_workers_load_the_cached_kernel_and_leave_nothing_in_tmpdir(tmp_path):
    """Workers (forked, leaving by os._exit) whose parent never used the kernel, two epochs: every
    worker loads the C kernel from the cache, and $TMPDIR stays empty."""
    from entmath.kernels.cpu import entropy_normalization as kernel

    if not kernel.enabled(__import__("torch").ones(1, kernel.MIN_ELEMS)):
        pytest.skip("the C kernel is off")
    kernel.build()  # fills the (default or configured) cache, as any earlier process would have
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = tmp_path / "workers.py"
    script.write_text(WORKERS)
    # torch keeps its own compiler cache in $TMPDIR/torchinductor_<user> (created when torch._dynamo
    # is imported); it is pointed elsewhere so that $TMPDIR shows what entmath leaves.
    env = dict(os.environ, TMPDIR=str(tmpdir), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    assert "warn" not in run.stderr.lower(), run.stderr[-3000:]
    assert list(tmpdir.iterdir()) == []
