"""Choosing between an op's torch reference path and its Triton kernel path.

Every public op takes ``backend="auto" | "torch" | "triton"``:

* ``"torch"``  - the reference implementation, any device, any float dtype.
* ``"triton"`` - the Triton kernel.  On CUDA tensors it compiles for the GPU.  On CPU tensors it
  runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first kernel is
  used), which is how the tests and the book check kernels on machines without a GPU.
* ``"auto"``   - Triton for CUDA tensors when Triton is importable, torch otherwise.

Triton is imported lazily, so ``import entmath`` works without it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# Looked up once, at import: ``torch.compile`` traces ``resolve_backend`` and must find a constant.
_TRITON = _find_triton()


def triton_available() -> bool:
    """True if the ``triton`` package can be imported (checked at import, without importing it).

    Examples:
        >>> entmath.triton_available() in (True, False)
        True
    """
    return _TRITON


def interpreter_enabled() -> bool:
    """True if Triton kernels are (to be) run by Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for these tensors, or raise a clear error."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "torch":
        return "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before the first kernel call, or move the tensors to a CUDA device"
        )
    return "triton"
