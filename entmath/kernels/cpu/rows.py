"""The CPU kernels of the row ops (``rows.c``): entropy, KL and cross-entropy against class
indices or probability targets, each forward and backward.

Built like the entropy-normalization kernel (the same flag sets and per-user cache, ``loader``)
and sharing its vectorised exponential (``vecmath.h``); loaded with ctypes on first use.  Rows
are split over ``torch.get_num_threads()`` threads: torch's own OpenMP threads where the build
shares torch's runtime, else Python threads (ctypes releases the GIL during each call).

Which inputs (``enabled``): float32 or bfloat16 tensors on the CPU whose class dimension is
contiguous (any row stride), at least ``MIN_ELEMS`` elements (below that the eager path's cost is
its Python overhead either way).  The ops call these through registered operators
(``torch.ops.entmath.entropy_cpu`` ...; ``entmath/ops/entropy.py``, ``cross_entropy.py``), whose
reference is the eager torch path, held to it by tests/test_cpu_rows.py.  ``ENTMATH_COMPILE=0``
turns the path off; without a working compiler the ops warn once and keep to their eager paths.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import entropy_normalization as _en
from . import loader

__all__ = ["enabled", "available", "entropy_fwd", "entropy_bwd", "kl_fwd", "kl_bwd", "ce_fwd", "ce_bwd",
           "ce_fwd_reduced", "ce_bwd_reduced", "ce_probs_fwd", "ce_probs_bwd", "ce_probs_fwd_reduced",
           "ce_probs_bwd_reduced", "MIN_ELEMS"]

SOURCE = Path(__file__).with_name("rows.c")
#: Smallest input (rows x classes) for the C path: every size (on a small input the eager path's
#: dozens of torch calls cost far more than one kernel call).  Tests raise it to reach the eager path.
MIN_ELEMS = 1

_DTYPES = (torch.float32, torch.bfloat16)
_CPUS = os.cpu_count() or 1
_lock = threading.Lock()
_lib = None
_failed = False
_executor = None

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
#: The entry points that return their count of rows without a distribution.
_COUNTS_FAULTS = ("entmath_entropy_fwd", "entmath_kl_fwd", "entmath_ce_probs_fwd")
_SIGNATURES = {
    # (z, bf16, n, stride, r0, r1, h, lse, threads)
    "entmath_entropy_fwd": [_P, _I, _I, _I, _I, _I, _P, _P, _I],  # -> rows without a distribution
    # (z, gz, bf16, n, stride, gstride, r0, r1, g, h, lse, threads)
    "entmath_entropy_bwd": [_P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _I],
    # (a, b, bf16, n, sa, sb, r0, r1, kl, lse_a, lse_b, threads)
    "entmath_kl_fwd": [_P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _I],
    # (a, b, ga, gb, bf16, n, sa, sb, r0, r1, g, kl, lse_a, lse_b, threads)
    "entmath_kl_bwd": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I],
    # (z, t, w, bf16, n, stride, r0, r1, eps, ignore_index, loss, lse, res, h, counts, threads)
    "entmath_ce_fwd": [_P, _P, _P, _I, _I, _I, _I, _I, _F, _I, _P, _P, _P, _P, _P, _I],
    # (z, t, w, gz, bf16, n, stride, gstride, r0, r1, eps, ignore_index, lse, res, h, g_loss, g_lse,
    #  g_h, sum_u, g_stride, g_div, threads)
    "entmath_ce_bwd": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _I, _P, _P, _P, _P, _P, _P, _P, _I, _F, _I],
    # (packed integer arguments, eps), (packed, eps, g_div): see rows.c
    "entmath_ce_fwd_reduced": [_P, _F],
    "entmath_ce_bwd_reduced": [_P, _F, _F],
    # (z, y, w, bf16, n, stride, ystride, r0, r1, keep, spread, loss, lse, res, h, bad_y, threads)
    "entmath_ce_probs_fwd": [_P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _F, _P, _P, _P, _P, _P, _I],
    # (z, y, w, gz, gy, bf16, n, stride, ystride, gstride, gystride, r0, r1, keep, spread, lse, res, h,
    #  g_loss, g_lse, g_h, threads)
    "entmath_ce_probs_bwd": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _F, _F, _P, _P, _P, _P, _P, _P,
                             _I, _F, _I],
    # (packed integer arguments, keep, spread), (packed, keep, spread, g_div): see rows.c
    "entmath_ce_probs_fwd_reduced": [_P, _F, _F],
    "entmath_ce_probs_bwd_reduced": [_P, _F, _F, _F],
}


def build():
    """Compile and load rows.c, or load it from the per-user cache (once per process)."""
    global _lib
    if _lib is not None:  # (no lock on the hot path: set once, never unset)
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        cc = loader.find_compiler()
        lib = loader.load(SOURCE, _en._attempts(cc), libs=["-lm"], cc=cc).lib
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = (ctypes.c_int64 if name in _COUNTS_FAULTS else None), args
        lib.entmath_rows_openmp.restype = ctypes.c_int
        _lib = lib
        return lib


def _kernel():
    """The loaded kernel, or None (after one warning) if it cannot be built."""
    global _failed
    lib = loader.build_or_warn(build, "entropy, kl and cross_entropy")
    _failed = lib is None
    return lib


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether these (rows, n) tensors (the logits first) take the C path.  Decided from shapes,
    dtypes and flags alone (it is traced by torch.compile); the kernel is built by the first call
    that uses it, and ``available`` says whether that worked."""
    if not on():
        return False
    z = tensors[0]
    if z.dim() != 2 or z.numel() < max(MIN_ELEMS, 1) or z.dtype not in _DTYPES:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != z.dtype or t.shape != z.shape or t.stride(-1) != 1:
            return False
    return True


# ENTMATH_COMPILE read where os.environ keeps it (a dict lookup: os.environ.get costs about a
# microsecond, a tenth of a small cross-entropy call); os.environ.get where that store is not found.
_ENVIRON = getattr(os.environ, "_data", None)
if isinstance(_ENVIRON, dict) and hasattr(os.environ, "encodekey") and hasattr(os.environ, "encodevalue"):
    _OFF = (os.environ.encodekey("ENTMATH_COMPILE"), os.environ.encodevalue("0"))

    def on() -> bool:
        """Whether the C path may be used at all: not turned off (``ENTMATH_COMPILE=0``), not failed."""
        return not _failed and _ENVIRON.get(_OFF[0]) != _OFF[1]
else:  # pragma: no cover - another os.environ
    def on() -> bool:
        """Whether the C path may be used at all: not turned off (``ENTMATH_COMPILE=0``), not failed."""
        return not _failed and os.environ.get("ENTMATH_COMPILE", "1") != "0"


def takes(z: torch.Tensor) -> bool:
    """``enabled`` for one tensor of any number of dimensions, classes last (the ops' quick test)."""
    return (z.dtype in _DTYPES and z.is_cpu and z.dim() >= 1 and z.numel() >= max(MIN_ELEMS, 1)
            and z.stride(-1) == 1 and on())


def available() -> bool:
    """Build (or load) the kernel if needed; False, after one warning, if it cannot be built.  The
    registered operators call it and fall back to the eager path on False."""
    return _kernel() is not None


def _pool():
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_CPUS, thread_name_prefix="entmath-rows")
    return _executor


#: Elements per thread below which more threads cost more than they save (waking a thread
#: pool is tens of microseconds idle, milliseconds on a busy machine).
GRAIN = 1 << 15


def _run(call, rows: int, n: int):
    """``call(r0, r1, threads)`` over all rows [0, rows) of length n: ``torch.get_num_threads()``
    threads at most, one per GRAIN elements.  An OpenMP build splits the rows itself (one call);
    otherwise each Python thread of the pool takes one range (ctypes releases the GIL).  Returns
    what the calls return (their sum: the entry points that count rows return the count)."""
    workers = max(1, min(torch.get_num_threads(), rows, _CPUS, rows * n // GRAIN))
    if workers == 1 or _openmp():
        return call(0, rows, workers)
    bounds = [rows * k // workers for k in range(workers + 1)]
    done = [job.result() for job in [_pool().submit(call, bounds[k], bounds[k + 1], 1) for k in range(workers)]]
    return None if done[0] is None else sum(done)


_OPENMP = []


def _openmp() -> bool:
    """Whether the loaded build splits rows over OpenMP threads (asked once)."""
    if not _OPENMP:
        _OPENMP.append(bool(build().entmath_rows_openmp()))
    return _OPENMP[0]


def _ptr(t):
    return None if t is None else t.data_ptr()


def _f32(t):
    """t as a contiguous float32 tensor (itself when it is one: the per-row vectors usually are)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.detach().to(torch.float32).contiguous()


def entropy_fwd(z: torch.Tensor):
    """(H, coded lse, faults): H and lse float32 (rows,) of the rows of z (rows, n); faults the
    number of rows without a distribution (a NaN, a +inf, or no finite logit: lse not finite)."""
    rows, n = z.shape
    h, lse = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
    zp, bf16, stride, hp, lp, fn = z.data_ptr(), int(z.dtype == torch.bfloat16), z.stride(0), h.data_ptr(), \
        lse.data_ptr(), build().entmath_entropy_fwd
    faults = _run(lambda r0, r1, threads: fn(zp, bf16, n, stride, r0, r1, hp, lp, threads), rows, n) if rows else 0
    return h, lse, faults


def entropy_bwd(z: torch.Tensor, g: torch.Tensor, h: torch.Tensor, lse: torch.Tensor):
    """dL/dz = -g p (log p + H) for the rows of z, given dL/dH (rows,)."""
    rows, n = z.shape
    gz = torch.empty((rows, n), dtype=z.dtype)
    g, h, lse = _f32(g), _f32(h), _f32(lse)  # (bound to names: they outlive the kernel call)
    if rows:
        args = (z.data_ptr(), gz.data_ptr(), int(z.dtype == torch.bfloat16), n, z.stride(0), n)
        fn, tail = build().entmath_entropy_bwd, (g.data_ptr(), h.data_ptr(), lse.data_ptr())
        _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
    return gz


def kl_fwd(a: torch.Tensor, b: torch.Tensor):
    """(KL, coded lse_a, coded lse_b, faults): float32 (rows,) of the row pairs of a and b
    (rows, n), and the number of rows in which a or b has no distribution."""
    rows, n = a.shape
    kl, lse_a, lse_b = (torch.empty(rows, dtype=torch.float32) for _ in range(3))
    faults = 0
    if rows:
        args = (a.data_ptr(), b.data_ptr(), int(a.dtype == torch.bfloat16), n, a.stride(0), b.stride(0))
        fn, tail = build().entmath_kl_fwd, (kl.data_ptr(), lse_a.data_ptr(), lse_b.data_ptr())
        faults = _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
    return kl, lse_a, lse_b, faults


def kl_bwd(a, b, g, kl, lse_a, lse_b):
    """(dKL/da, dKL/db) times dL/dKL (rows,), contiguous, in the inputs' dtype."""
    rows, n = a.shape
    ga, gb = torch.empty((rows, n), dtype=a.dtype), torch.empty((rows, n), dtype=b.dtype)
    g, kl, lse_a, lse_b = map(_f32, (g, kl, lse_a, lse_b))
    if rows:
        args = (a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr(), int(a.dtype == torch.bfloat16), n,
                a.stride(0), b.stride(0))
        fn, tail = build().entmath_kl_bwd, (g.data_ptr(), kl.data_ptr(), lse_a.data_ptr(), lse_b.data_ptr())
        _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
    return ga, gb


def ce_fwd(z, t, w, eps: float, ignore_index: int, want_entropy: bool, counts=None):
    """Per-row (loss, coded lse, lse residual, entropy or empty), float32, of (rows, n) logits
    against int64 class indices t (rows,), class weights w (n,) float32 or None: the contract of
    ``ops.cross_entropy.cross_entropy_rows_torch`` for class targets without soft-capping.
    ``counts``: None, or a zeroed ctypes int64 array of 3 that receives the numbers of class
    indices out of range, of counted rows without a distribution, and of ignored rows."""
    rows, n = z.shape
    loss, lse, res = (torch.empty(rows, dtype=torch.float32) for _ in range(3))
    h = torch.empty(rows if want_entropy else 0, dtype=torch.float32)
    t, w = t.to(torch.int64).contiguous(), _f32(w)  # (kept referenced while the kernel runs)
    if rows:
        cp = None if counts is None else ctypes.addressof(counts)
        args = (z.data_ptr(), t.data_ptr(), _ptr(w), int(z.dtype == torch.bfloat16), n, z.stride(0))
        fn = build().entmath_ce_fwd
        tail = (float(eps), int(ignore_index), loss.data_ptr(), lse.data_ptr(), res.data_ptr(),
                h.data_ptr() if want_entropy else None, cp)
        _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
    return loss, lse, res, h


#: The reductions of ``ce_fwd_reduced``, as the C entry point numbers them.
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def threads_of_one_call(rows: int, n: int) -> int:
    """The threads of ``ce_fwd_reduced`` for (rows, n) logits, or 0 if one call cannot take them
    (more than one thread's rows, without OpenMP: Python threads would split them, ``_run``)."""
    threads = torch.get_num_threads()
    if threads > 1 and rows * n >= 2 * GRAIN:
        threads = min(threads, rows, _CPUS, rows * n // GRAIN)
        return threads if _openmp() else 0
    return 1


_local = threading.local()


def _packed():
    """This thread's array for the packed integer arguments of the common call's entry points
    (one per thread: ctypes releases the GIL during a call, so another thread may pack its own)."""
    try:
        return _local.args
    except AttributeError:
        _local.args = (ctypes.c_int64 * 13)()
        return _local.args


def ce_fwd_reduced(z, t, eps: float, ignore_index: int, reduction: int, counts, threads: int, keep: bool = False):
    """Cross-entropy of (rows, n) logits, classes contiguous, against int64 class indices t
    (rows,), contiguous, without class weights, entropy, z-loss or soft-capping, reduced
    (``REDUCTION_CODES``), in one call of the kernel on ``threads`` threads
    (``threads_of_one_call``): ``(out, scratch)``, out the float32 result (the rows' losses for
    "none", else a 0-dim sum or mean over the rows not ignored), scratch (3 rows,) float32 the
    rows' losses, coded lse and lse residuals if ``keep`` (what the backward and validation
    read: ``scratch[rows:]``), else None (they stay inside the call).  counts: a zeroed ctypes
    int64 array of 3, filled as ``ce_fwd`` fills it."""
    rows, n = z.shape
    out = torch.empty(() if reduction else rows, dtype=torch.float32)
    scratch = torch.empty(3 * rows, dtype=torch.float32) if keep else None
    args = _packed()
    args[:12] = (z.data_ptr(), t.data_ptr(), z.dtype is torch.bfloat16, n, z.stride(0), rows, ignore_index,
               scratch.data_ptr() if keep else 0, ctypes.addressof(counts), reduction, out.data_ptr(), threads)
    build().entmath_ce_fwd_reduced(args, eps)
    return out, scratch


def ce_bwd_reduced(z, t, eps: float, ignore_index: int, scratch, g, g_div: float, threads: int):
    """dL/dz (a new tensor like z, contiguous) of ``ce_fwd_reduced``'s result, given its gradient
    g: a 0-dim tensor, or (rows,) for "none" (any stride: an expanded gradient is read as it is);
    g_div: what the mean divided by (1 otherwise); threads: the forward's."""
    rows, n = z.shape
    grad = torch.empty((rows, n), dtype=z.dtype)
    g = g if g.dtype is torch.float32 else g.to(torch.float32)  # (bound to a name: read by the kernel)
    args = _packed()
    args[:12] = (z.data_ptr(), t.data_ptr(), grad.data_ptr(), z.dtype is torch.bfloat16, n, z.stride(0), rows,
               ignore_index, scratch.data_ptr(), g.data_ptr(), g.stride(0) if g.dim() else 0, threads)
    build().entmath_ce_bwd_reduced(args, eps, g_div)
    return grad


def ce_probs_fwd_reduced(z, y, eps: float, reduction: int, counts, threads: int, keep: bool = False):
    """``ce_fwd_reduced`` against probability targets y (rows, n) of z's dtype, classes contiguous
    (any row stride), without class weights: "mean" is over all rows.  counts[0] receives the
    number of rows with a NaN or +-inf target, counts[1] that of rows without a distribution."""
    rows, n = z.shape
    out = torch.empty(() if reduction else rows, dtype=torch.float32)
    scratch = torch.empty(3 * rows, dtype=torch.float32) if keep else None
    args = _packed()
    args[:12] = (z.data_ptr(), y.data_ptr(), z.dtype is torch.bfloat16, n, z.stride(0), y.stride(0), rows,
               scratch.data_ptr() if keep else 0, ctypes.addressof(counts), reduction, out.data_ptr(), threads)
    build().entmath_ce_probs_fwd_reduced(args, 1.0 - eps, eps / n)  # (keep and spread rounded from double)
    return out, scratch


def ce_probs_bwd_reduced(z, y, eps: float, scratch, g, g_div: float, threads: int, want_grad_y: bool):
    """``ce_bwd_reduced`` of ``ce_probs_fwd_reduced``: (dL/dz, dL/dy or None), new contiguous
    tensors of z's and y's dtype."""
    rows, n = z.shape
    grad = torch.empty((rows, n), dtype=z.dtype)
    grad_y = torch.empty((rows, n), dtype=y.dtype) if want_grad_y else None
    g = g if g.dtype is torch.float32 else g.to(torch.float32)  # (bound to a name: read by the kernel)
    args = _packed()
    args[:13] = (z.data_ptr(), y.data_ptr(), grad.data_ptr(), grad_y.data_ptr() if want_grad_y else 0,
                 z.dtype is torch.bfloat16, n, z.stride(0), y.stride(0), rows, scratch.data_ptr(), g.data_ptr(),
                 g.stride(0) if g.dim() else 0, threads)
    build().entmath_ce_probs_bwd_reduced(args, 1.0 - eps, eps / n, g_div)
    return grad, grad_y


def ce_bwd(grad, z, t, w, eps: float, ignore_index: int, lse, res, h, g_loss, g_lse, g_ent, sum_u):
    """Write dL/dz into ``grad`` (rows, n; may be z itself: each row is read before it is
    written).  g_loss (rows,); g_lse, g_ent (rows,) or None; sum_u (rows,) the target mass sums,
    None for unweighted class targets (1)."""
    rows, n = z.shape
    # Every float32 copy is bound to a name: it must outlive the kernel call that reads it.
    t = t.to(torch.int64).contiguous()
    w, lse, res, g_loss, g_lse, g_ent, sum_u = map(_f32, (w, lse, res, g_loss, g_lse, g_ent, sum_u))
    h = _f32(h) if g_ent is not None else None
    if rows:
        args = (z.data_ptr(), t.data_ptr(), _ptr(w), grad.data_ptr(), int(z.dtype == torch.bfloat16), n,
                z.stride(0), grad.stride(0))
        fn = build().entmath_ce_bwd
        tail = (float(eps), int(ignore_index), lse.data_ptr(), res.data_ptr(), _ptr(h), g_loss.data_ptr(),
                _ptr(g_lse), _ptr(g_ent), _ptr(sum_u), 1, 1.0)
        _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
    return grad


def ce_probs_fwd(z, y, w, eps: float, want_entropy: bool, counts=None):
    """Per-row (loss, coded lse, lse residual, entropy or empty), float32, and the number of rows
    without a distribution, of (rows, n) logits against probability targets y of the same shape
    and dtype (unit column stride, any row stride), class weights w (n,) float32 or None: the
    contract of ``ops.cross_entropy.cross_entropy_rows_torch`` for probability targets without
    soft-capping.  ``counts``: None, or a zeroed ctypes int64 array of 3 that receives the numbers
    of rows with a NaN or +-inf target and of rows without a distribution (as ``ce_fwd``'s)."""
    rows, n = z.shape
    loss, lse, res = (torch.empty(rows, dtype=torch.float32) for _ in range(3))
    h = torch.empty(rows if want_entropy else 0, dtype=torch.float32)
    w = _f32(w)  # (kept referenced while the kernel runs)
    faults = 0
    if rows:
        args = (z.data_ptr(), y.data_ptr(), _ptr(w), int(z.dtype == torch.bfloat16), n, z.stride(0), y.stride(0))
        fn = build().entmath_ce_probs_fwd
        # keep and spread rounded from double, as the eager path's scalars are
        tail = (1.0 - eps, eps / n, loss.data_ptr(), lse.data_ptr(), res.data_ptr(),
                h.data_ptr() if want_entropy else None, None if counts is None else ctypes.addressof(counts))
        faults = _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
        if counts is not None:
            counts[1] = faults
    return loss, lse, res, h, faults


def ce_probs_bwd(grad, z, y, w, eps: float, lse, res, h, g_loss, g_lse, g_ent, want_grad_y: bool):
    """Write dL/dz into ``grad`` (rows, n; may be z itself: each row is read before it is
    written) and return dL/dy (a new contiguous tensor of y's dtype) if ``want_grad_y``, else
    None.  g_loss (rows,); g_lse, g_ent (rows,) or None."""
    rows, n = z.shape
    grad_y = torch.empty((rows, n), dtype=y.dtype) if want_grad_y else None
    # Every float32 copy is bound to a name: it must outlive the kernel call that reads it.
    w, lse, res, g_loss, g_lse, g_ent = map(_f32, (w, lse, res, g_loss, g_lse, g_ent))
    h = _f32(h) if g_ent is not None else None
    if rows:
        args = (z.data_ptr(), y.data_ptr(), _ptr(w), grad.data_ptr(), _ptr(grad_y), int(z.dtype == torch.bfloat16),
                n, z.stride(0), y.stride(0), grad.stride(0), n)
        fn = build().entmath_ce_probs_bwd
        tail = (1.0 - eps, eps / n, lse.data_ptr(), res.data_ptr(), _ptr(h), g_loss.data_ptr(), _ptr(g_lse),
                _ptr(g_ent), 1, 1.0)
        _run(lambda r0, r1, threads: fn(*args, r0, r1, *tail, threads), rows, n)
    return grad_y
