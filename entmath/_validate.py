"""Argument checks shared by the ops, and the switch that turns the value checks off.

Two kinds of check:

* **Structural** checks (types, shapes, ``dim``, options) look only at Python values and tensor
  metadata.  They always run, in eager mode and while ``torch.compile`` or ``torch.export``
  traces, and cost nothing on the device.
* **Value** checks (NaN, +inf, rows with no finite logit, class indices out of range) must look
  at the data, which on a GPU is a device-to-host synchronisation.  They are read off the
  per-row log-normaliser that every op computes anyway, so they cost a rows-sized reduction,
  not another pass over the logits.  They run only when ``value_checks_active()``: validation
  is enabled (the default; ``set_validation`` / ``validation``), and no compiler, exporter,
  ``torch.func`` transform or fake tensor is involved (none of them can read a value).

With value checks off nothing is read back from the device, and bad rows propagate as they do
through torch's own ops: NaN results (and NaN gradients) for the rows concerned, other rows
unaffected.  That is what ``torch.amp.GradScaler`` needs to notice an overflow and skip a step.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch

__all__ = ["check_float_tensor", "normalize_dim", "check_rows_finite", "coded_lse", "compute_dtype", "lowest",
           "set_validation", "validation", "is_validation_enabled", "value_checks_active"]

_state = threading.local()


def is_validation_enabled() -> bool:
    """Whether entmath's value checks are on in this thread (the default).

    Examples:
        >>> entmath.is_validation_enabled()
        True
    """
    return getattr(_state, "enabled", True)


def set_validation(enabled: bool) -> None:
    """Turn entmath's value checks on or off for this thread.

    Off: no op reads a value back from the device (no ``.item()``, no ``bool(tensor)``), so no
    op synchronises with the GPU; NaN, +inf and rows without a finite logit give NaN for those
    rows, as in torch, instead of a ``ValueError``.  Structural errors (types, shapes, options)
    are raised either way.

    Examples:
        >>> entmath.set_validation(False)
        >>> entmath.entropy(torch.tensor([[float("nan"), 0.0]]))  # no error: NaN for that row
        tensor([nan])
        >>> entmath.set_validation(True)
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _state.enabled = enabled


@contextlib.contextmanager
def validation(enabled: bool):
    """Context manager: ``with entmath.validation(False): ...`` runs the block without value
    checks and restores the previous setting afterwards (see ``set_validation``).

    Examples:
        >>> with entmath.validation(False):
        ...     h = entmath.entropy(torch.tensor([[float("nan"), 0.0]]))
        >>> h, entmath.is_validation_enabled()  # the setting is restored after the block
        (tensor([nan]), True)
    """
    previous = is_validation_enabled()
    set_validation(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def value_checks_active(*tensors: torch.Tensor) -> bool:
    """True if the data-dependent checks should run for these tensors: validation is on, and
    nothing is tracing (torch.compile, torch.export, a torch.func transform) or fake."""
    if not is_validation_enabled() or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside vmap / grad / jacrev
        return False
    for t in tensors:
        if t is not None and (t.is_meta or isinstance(t, torch._subclasses.FakeTensor)):
            return False
    return True


def check_float_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")


def normalize_dim(x: torch.Tensor, dim, name: str) -> int:
    """Return ``dim`` as a non-negative index; the class dimension must exist and be non-empty."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the class dimension), got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} with {x.dim()} dimension(s)")
    dim %= x.dim()
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has an empty class dimension (size 0 along dim={dim}); softmax needs at least one class")
    return dim


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 stays fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lowest(dtype: torch.dtype) -> float:
    """Most negative finite value: clamping -inf to it turns 0 * (-inf) = NaN into 0 * finite = 0."""
    return torch.finfo(dtype).min


def check_rows_finite(lse: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> bool:
    """Raise if some row's log-normaliser is not finite, naming ``name``, the cause and the rows.

    Every op returns its per-row lse *coded*: NaN if the row holds a NaN, +inf if it holds +inf,
    -inf if every logit is -inf (see ``coded_lse``).  So the cause is read off a rows-sized tensor,
    without another look at the logits (which an in-place op may already have overwritten).
    ``rows`` optionally restricts the check to a boolean mask of rows that matter.  A no-op
    unless ``value_checks_active``.  Returns True when it has verified that every lse is finite
    (the caller may then skip its masking of bad rows), False otherwise.
    """
    if not value_checks_active(lse):
        return False
    # The common case in one reduction and one host read: the sum of the lse is finite iff each
    # one is (short of overflowing the sum, which only sends the check down the full path).
    if lse.numel() and math.isfinite(lse.sum().item()):
        return True
    bad = ~torch.isfinite(lse.reshape(lse.shape or (1,)))  # a 1-D input has a 0-dim lse: one row
    if rows is not None:
        bad &= rows.reshape(bad.shape)
    if not bool(bad.any()):
        return rows is None
    for test, what in ((torch.isnan, f"{name} contains NaN"),
                       (torch.isposinf, f"{name} contains +inf (softmax is undefined there)"),
                       (torch.isneginf, f"{name} has row(s) where every logit is -inf: the distribution has no support")):
        hit = bad & test(lse.reshape(bad.shape))
        if bool(hit.any()):
            idx = hit.nonzero()[:5].tolist()
            where = ", ".join(str(tuple(i)) if len(i) > 1 else str(i[0]) for i in idx)
            raise ValueError(f"{what} (row(s) {where})")


def coded_lse(m: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """lse where the row max m is finite, else m itself: NaN (a NaN in the row; torch's max
    propagates it), +inf (a +inf in the row) or -inf (no finite logit)."""
    return torch.where(torch.isfinite(m), lse, m)
