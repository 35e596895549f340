"""Shape plumbing shared by the ops: classes along the last dimension, rows everywhere else."""
from __future__ import annotations

import contextlib

import torch


def rows_2d(z: torch.Tensor) -> torch.Tensor:
    """View ``z`` (classes last) as (rows, n) with unit column stride, copying only if needed."""
    if z.dim() == 2 and z.stride(-1) == 1 and (z.shape[0] <= 1 or z.stride(0) >= z.shape[1]):
        return z  # already rows (the common case: no reshape to pay for)
    z2d = z.reshape(-1, z.shape[-1])
    if z2d.stride(-1) != 1 or (z2d.shape[0] > 1 and z2d.stride(0) < z2d.shape[1]):
        z2d = z2d.contiguous()
    return z2d


def upcast(z: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits are computed in fp32; fp32 and fp64 stay as they are."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def kernels(name: str):
    """Import ``entmath.kernels.triton.<name>`` on first use (Triton is optional)."""
    import importlib

    return importlib.import_module(f"entmath.kernels.triton.{name}")


def autocast_on(x: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is active for x's device (never for meta and other devices)."""
    return x.device.type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(x.device.type)


def no_autocast(x: torch.Tensor):
    """A context that turns autocast off for x's device (our internal matmuls stay in the
    accumulation dtype), or does nothing when it is not on."""
    return torch.autocast(x.device.type, enabled=False) if autocast_on(x) else contextlib.nullcontext()


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op returns for input ``x``: x's own, except that under ``torch.autocast``
    half-precision inputs give float32 results, as torch's losses and reductions do there."""
    if x.dtype in (torch.float16, torch.bfloat16) and autocast_on(x):
        return torch.float32
    return x.dtype
