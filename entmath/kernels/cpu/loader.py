"""Building and loading the C kernels of the CPU fast paths, through a persistent per-user cache.

Every C kernel in this folder is compiled with the machine's C compiler on first use and loaded
with ctypes.  This module is the one place that does it, for every kernel (``load``).

The cache.  A build goes to ``$ENTMATH_CACHE_DIR`` if set, else the platform's per-user cache
directory (``$XDG_CACHE_HOME/entmath`` or ``~/.cache/entmath`` on Linux,
``~/Library/Caches/entmath`` on macOS, ``%LOCALAPPDATA%/entmath/Cache`` on Windows).  An entry is
named by a key that hashes everything the machine code depends on: the source file's bytes, the
compiler (its path and its ``--version``), the flag sets to try and the link flags, and the CPU
(model and feature flags: the kernels are built with ``-march=native``).  A second process finds
the entry and loads it in milliseconds; a changed source, compiler, flag or CPU makes a new key.

Concurrency.  A build is written under a temporary name in the cache directory and renamed into
place (atomic on POSIX), so no process ever sees half a library; a lock file (``fcntl.flock``)
makes concurrent processes (DataLoader workers, DDP ranks) build once: the others wait, then load
that build.  The compiler's own scratch files go to a private directory inside the cache that is
removed as soon as the compiler returns, so nothing is left in ``$TMPDIR``, even by processes
that end with ``os._exit`` (as DataLoader workers do).

Security.  The cache is a place code is loaded from, so it must not be a way in.  The directory
is created private to the user (mode 0700).  A cached library is loaded only if the directory is
owned by the user and not writable by group or others, and the library (and the record of its
build next to it) is a regular file (no symlink), owned by the user, not writable by group or
others, whose SHA-256 matches the one recorded when it was built.  A library that fails any of
these checks is rebuilt, with a warning naming the reason.  A directory that fails them is not
used: the kernel is then built in a fresh private temporary directory, loaded, and the directory
deleted at once (a loaded library needs no file on POSIX), with a warning.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["find_compiler", "cache_dir", "load", "Loaded"]

#: Bumped when the layout of an entry or the key changes, so old entries are simply not found.
FORMAT = 1
#: Scratch and temporary files older than this (seconds) are left-overs of a killed build.
STALE_AFTER = 3600.0


@dataclass
class Loaded:
    """What ``load`` returns: the ctypes library, the file it was loaded from (removed already for
    an uncached build), the flags that built it, and whether this call compiled it."""

    lib: ctypes.CDLL
    path: Path
    flags: list
    compiled: bool
    cached: bool


def build_or_warn(build, what: str):
    """``build()``'s library, or None after one RuntimeWarning naming ``what`` (the kernels' one
    fallback policy: any build failure means the op uses its eager path)."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the eager path"
        warnings.warn(f"entmath: the C kernel of {what} could not be built ({exc}); it uses its eager CPU "
                      "path (ENTMATH_COMPILE=0 skips the attempt)", RuntimeWarning, stacklevel=5)
        return None


def find_compiler() -> list:
    """The C compiler as an argument list: ``$CC`` (which may carry a wrapper or flags, e.g.
    ``ccache gcc``), else the first of ``cc``, ``gcc``, ``clang`` on the PATH.  RuntimeError if none."""
    found = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if not found:
        raise RuntimeError("no C compiler found (set CC)")
    return shlex.split(found)


def cache_dir() -> Path:
    """``$ENTMATH_CACHE_DIR``, else the platform's per-user cache directory for entmath."""
    env = os.environ.get("ENTMATH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "entmath" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "entmath"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "entmath"


@functools.lru_cache(maxsize=None)
def _compiler_identity(cc: tuple) -> str:
    """The compiler's resolved path and ``--version`` output (what its machine code depends on)."""
    exe = shutil.which(cc[0]) or cc[0]
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run {shlex.join(cc)}: {exc}") from exc
    return f"{os.path.realpath(exe)}\n{' '.join(cc[1:])}\n{version}"


@functools.lru_cache(maxsize=None)
def _cpu_identity() -> str:
    """Model and feature flags of the CPU (``-march=native`` builds differ between CPUs)."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "flags", "features", "cpu implementer", "cpu part", "isa"):
                    parts.append(line.strip())
                elif not line.strip() and len(parts) > 2:
                    break  # the first processor's block is enough
    except OSError:
        if sys.platform == "darwin":
            try:
                parts.append(subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                                             "hw.optional.arm64"], capture_output=True, text=True,
                                            timeout=30).stdout)
            except (OSError, subprocess.SubprocessError):
                pass
    return "\n".join(parts)


def _key(source_bytes: bytes, cc: list, attempts: list, libs: list) -> str:
    h = hashlib.sha256()
    for part in (f"format {FORMAT}", _compiler_identity(tuple(cc)), _cpu_identity(),
                 json.dumps(attempts), json.dumps(libs)):
        h.update(part.encode())
        h.update(b"\0")
    h.update(source_bytes)
    return h.hexdigest()[:32]


def _local_headers(source: Path, text: bytes) -> bytes:
    """The bytes of the headers ``source`` includes with quotes (``#include "vecmath.h"``), beside
    it: a change to a shared header must rebuild every kernel that includes it."""
    names = re.findall(rb'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M)
    return b"".join(b"\0" + (source.parent / n.decode()).read_bytes() for n in names)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _uid():
    return os.geteuid() if hasattr(os, "geteuid") else None


def _unsafe(st, what: str, want_dir: bool) -> str | None:
    """Why a file (or the directory) with lstat result ``st`` must not be trusted, or None."""
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory"
    if not want_dir and not stat.S_ISREG(st.st_mode):
        return f"{what} is not a regular file (a symlink?)"
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if uid is not None and st.st_mode & 0o022:
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_dir(path: Path) -> str | None:
    """Create ``path`` private to the user (0700) if missing; return why it is unusable, or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _unsafe(os.lstat(path), f"the cache directory {path}", want_dir=True)
    except OSError as exc:
        return f"cannot create the cache directory {path} ({exc.strerror or exc})"


def _check_entry(lib_path: Path, meta_path: Path, key: str) -> tuple[str | None, dict | None]:
    """(None, record) if the cached library may be loaded; (reason, None) if not; ("", None) if absent."""
    try:
        st_lib = os.lstat(lib_path)
    except FileNotFoundError:
        return "", None
    for p, st in ((lib_path, st_lib), (meta_path, None)):
        try:
            st = st or os.lstat(p)
        except FileNotFoundError:
            return f"{p.name} has no record of its build", None
        why = _unsafe(st, p.name, want_dir=False)
        if why:
            return why, None
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return f"the record of {lib_path.name} is unreadable ({exc})", None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("flags"), list):
        return f"the record of {lib_path.name} does not describe this build", None
    if record.get("sha256") != _sha256(lib_path):
        return f"{lib_path.name} does not match the SHA-256 recorded when it was built", None
    return None, record


def _compile(cc: list, source: Path, attempts: list, libs: list, workdir: Path, stem: str):
    """Try the flag sets in order inside ``workdir``; (path, flags) of the first that builds."""
    errors = []
    env = dict(os.environ, TMPDIR=str(workdir), TMP=str(workdir), TEMP=str(workdir))
    for i, flags in enumerate(attempts):
        target = workdir / f"{stem}_{i}.so"
        try:
            run = subprocess.run([*cc, *flags, "-o", str(target), str(source), *libs],
                                 capture_output=True, text=True, env=env)
        except OSError as exc:  # the compiler itself is missing or not executable
            raise RuntimeError(f"cannot run {shlex.join(cc)}: {exc}") from exc
        if run.returncode == 0 and target.is_file():
            return target, flags
        errors.append((run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1])
    raise RuntimeError(f"{shlex.join(cc)} could not build {source.name}: {errors[-1] if errors else 'no flag set'}")


def _remove_stale(directory: Path) -> None:
    """Left-overs of builds that were killed mid-way (their scratch directories, temporary files)."""
    now = time.time()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith(".tmp-") or p.name.startswith(".build-"):
            try:
                if now - os.lstat(p).st_mtime > STALE_AFTER:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass


class _FileLock:
    """An exclusive ``flock`` on a file for the duration of a ``with`` (a no-op where there is no fcntl)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: the atomic rename alone keeps every load whole
            return self
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _warn(message: str) -> None:
    warnings.warn(f"entmath: {message}", RuntimeWarning, stacklevel=4)


def _load_uncached(source: Path, cc: list, attempts: list, libs: list, stem: str, why: str) -> Loaded:
    """Build in a fresh private temporary directory, load, and delete the directory at once."""
    _warn(f"not using the kernel cache: {why}; building {source.name} in a temporary directory "
          "(set ENTMATH_CACHE_DIR to a private directory)")
    workdir = Path(tempfile.mkdtemp(prefix="entmath-build-"))  # created 0700 by mkdtemp
    try:
        path, flags = _compile(cc, source, attempts, libs, workdir, stem)
        lib = ctypes.CDLL(str(path))
    finally:
        # POSIX keeps a loaded library mapped after its file is gone; elsewhere remove it at exit.
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            import atexit

            atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    return Loaded(lib, path, flags, compiled=True, cached=False)


def load(source, attempts, *, libs=("-lm",), cc=None) -> Loaded:
    """Compile ``source`` (a C file) with the first flag set of ``attempts`` that builds, or find
    that build in the cache, and load it with ctypes.  See the module docstring.

    Args:
        source: path of the C file.
        attempts: flag sets (lists of str) to try in order; the first that compiles is used and
            remembered (the cache key covers the whole list, so a failing first choice is not
            retried by every process).
        libs: link flags after the source.
        cc: the compiler as an argument list (default: ``find_compiler()``).

    Raises:
        RuntimeError: no compiler, or no flag set builds (with the compiler's last message).
    """
    source = Path(source)
    cc = list(cc) if cc is not None else find_compiler()
    attempts = [list(a) for a in attempts]
    libs = list(libs)
    source_bytes = source.read_bytes()
    key = _key(source_bytes + _local_headers(source, source_bytes), cc, attempts, libs)
    stem = source.stem
    directory = cache_dir()
    why = _private_dir(directory)
    if why:
        return _load_uncached(source, cc, attempts, libs, stem, why)
    lib_path, meta_path = directory / f"{stem}-{key}.so", directory / f"{stem}-{key}.json"
    # Fast path, no lock: a complete, trusted entry.
    reason, record = _check_entry(lib_path, meta_path, key)
    if reason is None:
        return Loaded(ctypes.CDLL(str(lib_path)), lib_path, record["flags"], compiled=False, cached=True)
    with _FileLock(directory / f"{stem}-{key}.lock"):
        reason, record = _check_entry(lib_path, meta_path, key)  # another process may have built it
        if reason is None:
            return Loaded(ctypes.CDLL(str(lib_path)), lib_path, record["flags"], compiled=False, cached=True)
        if reason:
            _warn(f"refusing the cached build {lib_path} ({reason}); rebuilding it")
        _remove_stale(directory)
        workdir = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
        try:
            built, flags = _compile(cc, source, attempts, libs, workdir, stem)
            os.chmod(built, 0o700)
            record = {"key": key, "flags": flags, "sha256": _sha256(built), "source": source.name,
                      "source_sha256": hashlib.sha256(source_bytes).hexdigest(), "compiler": shlex.join(cc),
                      "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            tmp_meta = workdir / "record.json"
            tmp_meta.write_text(json.dumps(record, indent=1) + "\n")
            os.chmod(tmp_meta, 0o600)
            # Library first, then its record: a reader that sees the new record sees the new library.
            os.replace(built, lib_path)
            os.replace(tmp_meta, meta_path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return Loaded(ctypes.CDLL(str(lib_path)), lib_path, flags, compiled=True, cached=True)
