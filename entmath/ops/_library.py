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

__all__ = ["triton_kernel_op", "cpu_kernel_op", "register_row_vmap", "acc_dtype", "eager_call", "plain_eager",
           "eager_function", "eager_apply"]


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


#: Tensor types that eager calls take as they are: a Parameter is a plain tensor to dispatch.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_call(*tensors):
    """How an op's call may run: ``"plain"`` when its forward may run directly, without its
    autograd unit and registered operators (nothing compiles, exports, fakes or transforms
    (torch.func) the call, no forward-mode AD level is open, and autograd records nothing for
    these tensors); ``"graph"`` when all that holds except that autograd records: the op's
    ``eager_function`` twin then records it; None otherwise (the full layers run).

    Those layers cost tens of microseconds per call, most of a call on a small input:
    ``Function.apply`` of a Function with ``setup_context`` binds its arguments with
    ``inspect.signature`` on every call, and a custom operator dispatches in Python."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    if torch.autograd.forward_ad._current_level >= 0:
        return None
    grad = torch.is_grad_enabled()
    mode = "plain"
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSORS or t.is_meta or _functorch_wrapped(t):
            return None  # a subclass (FakeTensor, DTensor, ...), a meta tensor, or one left by a torch.func transform
        if grad and t.requires_grad:
            mode = "graph"
    return mode


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def eager_apply(function):
    """Give the old-style Function ``function`` (one called only where ``eager_call`` allowed the
    call) the C++ ``apply`` itself, without the Python layer of ``torch.autograd.Function.apply``
    (about 4 us a call: a setup_context test, a nested function, the unwrapping of tensors left
    by dead torch.func transforms).  That layer does nothing else for an old-style Function when
    no torch.func transform is active and no tensor is a torch.func wrapper, which
    ``eager_call`` has checked."""
    function.apply = super(torch.autograd.Function, function).apply
    return function


def plain_eager(*tensors) -> bool:
    """``eager_call(*tensors) == "plain"``: the forward may run without any of the layers."""
    return eager_call(*tensors) == "plain"


def eager_function(unit):
    """The autograd unit ``unit`` (a Function written with ``setup_context``, which torch.func and
    torch.compile need) as the same Function written the older way, whose ``forward`` takes
    ``ctx``, for eager calls that record a graph (``eager_call(...) == "graph"``): ``apply`` then
    skips the signature binding.  Same forward (``unit.eager_forward``: the C kernels called
    directly), same ``setup_context``, same ``backward``; ``ctx.direct`` tells the backward that
    it may call the C kernels directly too.  Its ``apply(*args, report)`` takes last where a C
    kernel called directly reports what it counted (``unit.eager_forward(*args, report)``: the
    rows without a distribution, ...), so that the caller's validation need not read the
    outputs.  (Last: ``ctx.needs_input_grad`` keeps the unit's own positions.)"""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args_report):
            *args, report = args_report
            out = unit.eager_forward(*args, report)
            unit.setup_context(ctx, args, out)
            ctx.direct = True
            return out

        @staticmethod
        def backward(ctx, *grads):
            return *unit.backward(ctx, *grads), None

    Eager.__name__ = Eager.__qualname__ = f"{unit.__name__}Eager"
    return eager_apply(Eager)
