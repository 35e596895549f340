"""How the kernel paths become PyTorch operators, ``torch.ops.entmath.*``.

Every kernel path (a Triton kernel, a C kernel) is registered with ``torch.library`` so that it
behaves like one of torch's own ops inside someone else's program:

* a **fake** implementation gives the shapes and dtypes of the outputs without running
  anything, for meta tensors, ``FakeTensorMode``, ``torch.compile`` and ``torch.export``;
* **autograd** is registered on the forward op (``register_autograd``); the backward is the
  derived formula (one more kernel op when no graph is being built, differentiable torch code
  when one is, so that double backward works);
* a **vmap** rule folds the vmapped dimension into the rows (every kernel works on rows), so
  ``torch.func.vmap``, ``jacrev`` and per-sample gradients see an ordinary batched op.

The torch reference paths are plain torch code and need none of this: the compiler traces them.

Triton kernels are registered with ``torch.library.triton_op``, whose launches go through
``wrap_triton``: ``torch.compile`` then sees the kernels themselves and schedules around them.
Under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run kernels on a CPU) an
interpreted kernel cannot be traced, so there the op is an opaque ``custom_op`` with the same
semantics.  C kernels are always ``custom_op``.
"""
from __future__ import annotations

import torch

from .._backend import interpreter_enabled

__all__ = ["triton_kernel_op", "cpu_kernel_op", "register_row_vmap", "acc_dtype"]


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of a kernel: float64 stays float64, everything else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triton_kernel_op(name: str, *, mutates_args=()):
    """Decorator: register a Triton launcher as the operator ``torch.ops.entmath.<name>``."""
    qualname = f"entmath::{name}"
    if interpreter_enabled():
        return torch.library.custom_op(qualname, mutates_args=mutates_args)
    return torch.library.triton_op(qualname, mutates_args=mutates_args)


def cpu_kernel_op(name: str, *, mutates_args=()):
    """Decorator: register a CPU (C kernel) implementation as ``torch.ops.entmath.<name>``."""
    return torch.library.custom_op(f"entmath::{name}", mutates_args=mutates_args, device_types="cpu")


def register_row_vmap(op, arg_ranks):
    """A vmap rule for an op on rows: fold the vmapped dimension into the rows.

    ``arg_ranks[i]`` is the number of dimensions of tensor argument i after its leading rows
    dimension (1 for a (rows, n) tensor, 0 for a per-row (rows,) vector), or None for an argument
    that is not per-row (a number, a string, a tensor shared by all rows, which must not be
    vmapped).  Per-row outputs come back batched at dim 0.
    """

    def rule(info, in_dims, *args):
        B = info.batch_size
        rows = None
        flat = []
        for a, d, r in zip(args, in_dims, arg_ranks):
            if r is None or a is None:
                if d is not None:
                    raise NotImplementedError(f"{op}: vmap over an argument shared by all rows is not supported")
                flat.append(a)
                continue
            a = a.unsqueeze(0).expand(B, *a.shape) if d is None else a.movedim(d, 0)
            rows = a.shape[1]
            flat.append(a.reshape(B * rows, *a.shape[2:]))
        out = op(*flat)
        outs = out if isinstance(out, tuple) else (out,)
        # An output that is not per-row (an empty placeholder, e.g. an entropy nobody asked for)
        # comes back unbatched.
        dims = tuple(0 if o.shape[:1] == (B * rows,) else None for o in outs)
        outs = tuple(o.reshape(B, rows, *o.shape[1:]) if d == 0 else o for o, d in zip(outs, dims))
        if isinstance(out, tuple):
            return outs, dims
        return outs[0], dims[0]

    torch.library.register_vmap(op, rule)


def plain_eager(*tensors) -> bool:
    """True when an op's forward may run directly, without its autograd.Function and registered
    operators: nothing compiles, exports, fakes or transforms (torch.func) the call, no forward-mode
    AD level is open, and autograd records nothing for these tensors.  Those layers cost tens of
    microseconds per call (``Function.apply`` binds its arguments with ``inspect.signature``;
    a custom operator dispatches in Python), which is most of a call on a small input; with any
    of the conditions false, the layers run as usual."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.is_meta or (grad and t.requires_grad):
            return False  # a subclass (FakeTensor, DTensor, ...), a meta tensor, or one autograd tracks
    return True

