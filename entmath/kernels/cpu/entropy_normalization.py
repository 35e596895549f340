"""The fast CPU path of entropy normalization (Chapter 2): a C kernel that solves each row in cache.

The eager torch path (``entropy_normalization.py``) spends a separate sweep over the data on
every product and sum of an evaluation of H, about ten per Halley step.  The kernel in
``entropy_normalization.c`` (read it next to this file) runs the same iteration one row at a
time instead: the row is read from memory once, each evaluation of H is one vectorised loop over
it while it sits in L2, and p is written back once.  Its comments explain the three economies on
top (a start from a sketch of the row, update sweeps and a predicted normalisation).

Building.  The first call compiles the C file with the machine's C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``), for the host's instruction set (``-march=native``), and loads it
with ctypes, through the shared per-user cache of ``loader.py`` (keyed by the source, compiler,
flags and CPU): the first build on a machine takes seconds, later processes load it in
milliseconds.  The rows are split over
``torch.get_num_threads()`` threads: torch's own OpenMP threads where the build can share them
(GCC on Linux, see ``_shares_torch_openmp``), else Python threads (ctypes releases the GIL).

Which inputs.  float32, fp16 or bf16 on the CPU (the last two through a float32 copy), at least
``MIN_ELEMS`` logits (rows x classes; below that the eager path is fast enough) and fewer than 2^24
classes per row (the kernel counts the maxima in float32).  Rows the kernel declines (logits
spanning more than FLT_MAX / 4, or a root gamma outside float32's range) come back with
evaluations = -1 for the eager float64 path.  ``ENTMATH_COMPILE=0`` turns the path off; without a
working compiler the op warns once and stays on the eager path.
"""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import loader

__all__ = ["enabled", "solve", "build", "kernel_exp", "halley_steps"]

#: Smallest input (rows x classes) for the C path: 256 KiB of float32.
MIN_ELEMS = 1 << 16
#: Most classes per row (the kernel counts the maxima exactly in float32).
MAX_CLASSES = 1 << 24
SOURCE = Path(__file__).with_suffix(".c")
#: Flags common to every attempt: -fopenmp-simd lets ``#pragma omp simd`` reassociate the float
#: sums (no OpenMP runtime is linked); no errno and no trapping math let the compiler vectorise the
#: selects; a * b + c may become one FMA (a strict -std=c99 would forbid that, and cost a quarter
#: of the speed).  No -ffast-math: the kernel relies on inf and NaN behaving as IEEE says.
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
              "-ffp-contract=fast"]

_lock = threading.Lock()
_lib = None
_failed = False
_pool = None
#: Logits per thread below which another thread costs more than it saves (waking a thread is
#: tens of microseconds idle, milliseconds on a busy machine; a row costs a few passes of exp).
GRAIN = 1 << 14


def _shares_torch_openmp(cc: list) -> bool:
    """Whether an -fopenmp build would use the OpenMP runtime torch already runs on.

    Torch's Linux wheels bring their own libgomp.so.1 and load it at import; a GCC build with
    -fopenmp asks for libgomp.so.1, and the dynamic loader hands it the library of that name that
    is already loaded.  The rows then run on torch's own worker threads, which stay busy-waiting
    for a few milliseconds after every parallel torch op: threads of our own would compete with
    them for the cores instead.  Any other pairing (clang's libomp, macOS) could load a second
    runtime, so it keeps to Python threads.
    """
    if platform.system() != "Linux" or "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    # Exactly that name: a wheel that renames its copy (libgomp-<hash>.so.1) would not be shared.
    loaded = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/" in line}
    return "libgomp.so.1" in loaded and ("gcc" in version.lower() or "free software foundation" in version.lower())


def _attempts(cc: list):
    """Flag sets to try in order: OpenMP (if shared with torch) and the host's full vector width
    first, then plainer builds."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        # GCC tunes some x86 CPUs (AMD Zen 1) to 128-bit vectors; the kernel is faster at 256.
        natives = [["-march=native", "-mprefer-vector-width=256"], ["-march=native"], []]
    else:
        natives = [["-march=native"], ["-mcpu=native"], []]
    threads = [["-fopenmp"], []] if _shares_torch_openmp(cc) else [[]]
    return [BASE_FLAGS + t + v for t in threads for v in natives]


def build():
    """Compile and load the kernel, or load it from the per-user cache (once per process; see
    ``loader``); returns the ctypes library.

    Raises RuntimeError with the compiler's message if no flag set builds.
    """
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        cc = loader.find_compiler()
        lib = loader.load(SOURCE, _attempts(cc), libs=["-lm"], cc=cc).lib
        lib.entmath_entropy_normalize_rows.restype = None
        lib.entmath_entropy_normalize_rows.argtypes = (
            [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
            + [ctypes.c_int64, ctypes.c_double, ctypes.c_int64])
        lib.entmath_openmp.restype = ctypes.c_int
        lib.entmath_exp_kernels.restype = None
        lib.entmath_exp_kernels.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
        lib.entmath_halley_steps.restype = None
        lib.entmath_halley_steps.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64]
        _lib = lib
        return lib


def enabled(z2d: torch.Tensor, min_elems: int | None = None) -> bool:
    """True if ``z2d`` (rows, n) takes the C path: see the module docstring."""
    min_elems = MIN_ELEMS if min_elems is None else min_elems
    return (not _failed and z2d.device.type == "cpu" and z2d.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and z2d.numel() >= max(min_elems, 1) and 0 < z2d.shape[1] < MAX_CLASSES
            and os.environ.get("ENTMATH_COMPILE", "1") != "0")


def _kernel():
    """The loaded kernel, or None (after one warning) if it cannot be built."""
    global _failed
    lib = loader.build_or_warn(build, "entropy_normalize")
    _failed = lib is None
    return lib


def solve(z2d: torch.Tensor, t: torch.Tensor, max_evals: int, ftol_ulps: float):
    """The forward on (rows, n) float32 (or fp16 / bf16) logits and float64 targets (rows,).

    Returns (p in float32, gamma, E_p[z] - max z, evaluations, max z), the last four float64
    (rows,); max z is NaN / +inf / -inf on a row without a distribution (NaN, +inf, no finite
    logit), whose p is left unwritten; evaluations is -1 on a row the kernel declined (its p is
    not final).  Returns None if the kernel cannot be built.
    """
    global _pool
    lib = _kernel()
    if lib is None:
        return None
    fn = lib.entmath_entropy_normalize_rows
    z = z2d.detach().to(torch.float32).contiguous()
    tt = t.detach().to(torch.float64).contiguous()
    rows, n = z.shape
    p = torch.empty_like(z)
    out = torch.empty(4, rows, dtype=torch.float64)
    args = (z.data_ptr(), p.data_ptr(), rows, n)
    tail = (tt.data_ptr(), out.data_ptr(), int(max_evals), float(ftol_ulps))
    # Contiguous ranges of rows, one per thread; ctypes releases the GIL during each call.
    cpus = os.cpu_count() or 1
    workers = max(1, min(torch.get_num_threads(), rows, cpus, rows * n // GRAIN))
    if workers == 1 or lib.entmath_openmp():  # the kernel splits the rows over OpenMP threads
        fn(*args, 0, rows, *tail, workers)
    else:
        bounds = [rows * k // workers for k in range(workers + 1)]
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="entmath")
        jobs = [_pool.submit(fn, *args, bounds[k], bounds[k + 1], *tail, 1) for k in range(workers)]
        for job in jobs:
            job.result()
    return p, out[0], out[1], out[2], out[3]


def kernel_exp(x: torch.Tensor, kind: str, degree: int = 6) -> torch.Tensor:
    """The kernel's own exponentials on float32 ``x``, for checking them: ``kind="nonpos"`` (the
    full one, for x <= 0) or ``"small"`` (an update's Taylor polynomial of ``degree`` 9, 6, 3 or
    2, for |x| up to 0.5, 0.25, 0.025 or 0.0045)."""
    if kind == "small" and degree not in (2, 3, 6, 9):
        raise ValueError(f"degree must be 2, 3, 6 or 9, got {degree!r}")
    xs = x.detach().to(torch.float32).contiguous()
    out = torch.empty_like(xs)
    build().entmath_exp_kernels(xs.data_ptr(), out.data_ptr(), xs.numel(), {"nonpos": 0, "small": degree}[kind])
    return out


def halley_steps(args: torch.Tensor) -> torch.Tensor:
    """The kernel's safeguarded step (``halley_step`` in the C file) on rows of float64 inputs
    ``args`` (k, 9) = (gamma, lo, hi, f, r, q, K2, K3, f_prev); returns (k, 3) = (next gamma, lo,
    hi).  For the test that holds it to its twins in Python and Triton."""
    a = args.detach().to(torch.float64).contiguous()
    out = torch.empty(a.shape[0], 3, dtype=torch.float64)
    build().entmath_halley_steps(a.data_ptr(), out.data_ptr(), a.shape[0])
    return out
