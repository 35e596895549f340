"""Shannon entropy of softmax(logits), in nats.  Derived in Chapter 1 (book/ch01_entropy.md).

Forward, with m = max_i z_i, d_i = z_i - m and S = sum_i e^{d_i}:

    H = lse(z) - sum_i p_i z_i = log S - (sum_i e^{d_i} d_i) / S.

The first maximal entry contributes exactly 1 to S; the rest, R = S - 1, is summed on its own so
that log S = log1p(R) keeps its relative accuracy for nearly one-hot rows.  -inf logits have
e^{d_i} = 0 and contribute 0 (the 0 log 0 = 0 convention), never 0 * (-inf) = NaN.

Backward (Chapter 1, the gradient of the entropy):  dH/dz_k = -p_k (log p_k + H).  The forward
also returns the log-normaliser lse (for validation, and because the backward is written in
terms of it); its own gradient is d lse / dz_k = p_k.  Written in torch ops, the backward is
differentiable, which gives the second derivatives (Hessian-vector products, gradient penalties).

Paths: ``entropy_torch`` (the reference, plain torch), ``torch.ops.entmath.entropy_triton``
(``entmath/kernels/triton/entropy.py``) and, for float32/bfloat16 rows on the CPU of at least
``kernels.cpu.rows.MIN_ELEMS`` logits, ``torch.ops.entmath.entropy_cpu`` (the C kernel of
``entmath/kernels/cpu/rows.c``: one read of each row from memory, forward and backward), all with
the same autograd formula ``entropy_vjp`` when a graph of the backward is recorded.
"""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, coded_lse, normalize_dim
from ..kernels.cpu import rows as cpu_rows
from ._library import acc_dtype, cpu_kernel_op, eager_call, eager_function, register_row_vmap, triton_kernel_op
from ._rows import kernels, output_dtype, rows_2d, upcast
from ._stats import chunk_summary, clamped, nan_unless_finite

__all__ = ["entropy"]


def entropy_torch(z: torch.Tensor):
    """Reference forward along the last dim.  Returns (H, lse) in the accumulation dtype; lse is
    coded for validation (``_validate.coded_lse``)."""
    zc = upcast(z)
    # (m, R, A): S = 1 + R, A = sum_i e^{d_i} d_i, with the deep tail kept (chunk_summary overwrites
    # its argument: a copy unless upcast made one)
    m, r, moment = chunk_summary(zc.clone() if zc is z else zc, masked=True)
    log_s = torch.log1p(r)
    h = log_s - moment / log_s.exp()
    return h, coded_lse(m, m + log_s)


def entropy_vjp(z, h, lse, grad_h, grad_lse):
    """dH/dz^T grad_h + dlse/dz^T grad_lse = p (grad_lse - grad_h (log p + H)), in torch ops.
    Either gradient may be None.  While autograd records (``create_graph=True``) every op is out
    of place, so the result is differentiable again; otherwise the ops work in place on the
    temporaries made here."""
    fast = not torch.is_grad_enabled()
    zc = upcast(z)
    log_p = clamped(zc - nan_unless_finite(lse).unsqueeze(-1))  # -inf logits: p = 0, finite log p
    p = log_p.exp()
    # p (log p + H) before any scaling: at a -inf logit that is 0 * (lowest + H) = 0, before a
    # factor |grad_h| > 1 could round lowest to -inf (and 0 * inf = NaN).
    lse_term = None if grad_lse is None else p * grad_lse.to(zc.dtype).unsqueeze(-1)
    if grad_h is not None:
        gh = -grad_h.to(zc.dtype).unsqueeze(-1)
        if fast:
            g = p.mul_(log_p.add_(h.unsqueeze(-1))).mul_(gh)
        else:
            g = p * (log_p + h.unsqueeze(-1)) * gh
        if lse_term is not None:
            g = g + lse_term
    else:
        g = lse_term if lse_term is not None else torch.zeros_like(zc)
    return g.to(z.dtype)


class _Entropy(torch.autograd.Function):
    """(H, lse) of the rows of z (classes last) as one autograd unit, on either backend; the
    backward is ``entropy_vjp`` (or the Triton backward kernel when no graph is being built)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, backend):
        return _forward(z, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.kernel = inputs[1] if inputs[1] in ("triton", "cpu") else None

    @staticmethod
    def backward(ctx, grad_h, grad_lse):
        return _backward(ctx, grad_h, grad_lse, kernel=ctx.kernel), None

    @staticmethod
    def eager_forward(z, backend, faults):
        return _forward(z, backend, direct=True, faults=faults)


_EntropyEager = eager_function(_Entropy)  # the same unit for eager calls that record a graph


def _forward(z, backend, direct=False, faults=None):
    """(H, lse) on the chosen path ("triton", "cpu": the C kernel, or "torch"); ``direct``: call
    the C kernel itself rather than its registered operator (eager calls only), which appends
    to the list ``faults`` (if given) its count of rows without a distribution."""
    if backend == "triton":
        h, lse = torch.ops.entmath.entropy_triton(rows_2d(z))
    elif backend == "cpu":
        z2d = rows_2d(z)
        if direct and cpu_rows.available():
            h, lse, bad = cpu_rows.entropy_fwd(z2d)
            if faults is not None:
                faults.append(bad)
        else:
            h, lse = torch.ops.entmath.entropy_cpu(z2d)
    else:
        return entropy_torch(z)
    if z.dim() == 2:
        return h, lse
    return h.view(z.shape[:-1]), lse.view(z.shape[:-1])


def _on_cpu_kernel(z) -> bool:
    """Whether the torch backend hands these rows to the C kernel (kernels/cpu/rows.py)."""
    return cpu_rows.takes(z)


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
@triton_kernel_op("entropy_triton")
def entropy_triton(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, lse) of the rows of z (rows, n), in the accumulation dtype."""
    return kernels("entropy").entropy_fwd(rows_2d(z))


@entropy_triton.register_fake
def _(z):
    h = z.new_empty(z.shape[:1], dtype=acc_dtype(z))
    return h, torch.empty_like(h)


@triton_kernel_op("entropy_backward_triton")
def entropy_backward_triton(z: torch.Tensor, h: torch.Tensor, lse: torch.Tensor,
                            grad_h: torch.Tensor) -> torch.Tensor:
    """dH/dz for the rows of z given dL/dH (rows,): one read of z, one write of the gradient."""
    return kernels("entropy").entropy_bwd(rows_2d(z), grad_h, h, lse)


@entropy_backward_triton.register_fake
def _(z, h, lse, grad_h):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0], *output)


def _backward(ctx, grad_h, grad_lse, kernel="triton"):
    z, h, lse = ctx.saved_tensors
    if not kernel or torch.is_grad_enabled() or grad_lse is not None or grad_h is None:
        return entropy_vjp(z, h, lse, grad_h, grad_lse)  # a graph is wanted: differentiable torch
    z2d = rows_2d(z)
    if kernel == "cpu" and getattr(ctx, "direct", False) and cpu_rows.available():
        g = cpu_rows.entropy_bwd(z2d, grad_h.reshape(-1), h.reshape(-1), lse.reshape(-1))
    else:
        op = torch.ops.entmath.entropy_backward_triton if kernel == "triton" else torch.ops.entmath.entropy_backward_cpu
        g = op(z2d, h.reshape(-1), lse.reshape(-1), grad_h.reshape(-1))
    return g.view(z.shape)


# ---- the C path (CPU), registered the same way -----------------------------------------------
@cpu_kernel_op("entropy_cpu")
def entropy_cpu(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, lse) of float32/bfloat16 rows z (rows, n), float32, by the C kernel (the eager path if
    it cannot be built)."""
    if not cpu_rows.available():
        return entropy_torch(z)
    return cpu_rows.entropy_fwd(z if z.stride(-1) == 1 else z.contiguous())[:2]


@cpu_kernel_op("entropy_backward_cpu")
def entropy_backward_cpu(z: torch.Tensor, h: torch.Tensor, lse: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """dH/dz for the rows of z given dL/dH (rows,), by the C kernel: one read, one write."""
    if not cpu_rows.available():
        return entropy_vjp(z, h, lse, grad_h, None).contiguous()
    return cpu_rows.entropy_bwd(z if z.stride(-1) == 1 else z.contiguous(), grad_h, h, lse)


entropy_cpu.register_fake(lambda z: (z.new_empty(z.shape[:1], dtype=torch.float32),
                                     z.new_empty(z.shape[:1], dtype=torch.float32)))
entropy_backward_cpu.register_fake(lambda z, h, lse, grad_h: torch.empty_like(z, memory_format=torch.contiguous_format))

# Direct callers of the registered operators get the same autograd.
entropy_triton.register_autograd(_backward, setup_context=_setup)
entropy_cpu.register_autograd(lambda ctx, gh, gl: _backward(ctx, gh, gl, kernel="cpu"), setup_context=_setup)
register_row_vmap(entropy_triton, (1,))
register_row_vmap(entropy_backward_triton, (1, 0, 0, 0))
register_row_vmap(entropy_cpu, (1,))
register_row_vmap(entropy_backward_cpu, (1, 0, 0, 0))


def entropy(logits: torch.Tensor, dim: int = -1, *, keepdim: bool = False, backend: str = "auto") -> torch.Tensor:
    """Shannon entropy, in nats, of ``softmax(logits)`` along ``dim``.

    Args:
        logits: floating-point tensor (fp16, bf16, fp32 or fp64), any leading shape.  Entries may
            be ``-inf`` (impossible classes); they contribute 0 to the entropy.
        dim: the class dimension.
        keepdim: keep ``dim`` as a dimension of size 1 (as torch's reductions).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``entmath._backend``).

    Returns:
        The entropy, shape ``logits.shape`` without ``dim`` (with it, of size 1, if ``keepdim``),
        dtype of ``logits`` (float32 under ``torch.autocast``, as torch's own reductions).
        fp16/bf16 inputs are accumulated in fp32.  Differentiable, twice: the backward is
        ``dH/dz_k = -p_k (log p_k + H)``.  **Accuracy:** for any finite or ``-inf`` logits, up to
        the dtype's max (spans up to twice the max included), the result is within
        (32 + Delta + log2 n) u of the exact entropy of the given values, relatively, plus
        1024 n sigma absolutely, and the final rounding to a half dtype: u and sigma are the unit
        roundoff and smallest subnormal of the accumulation dtype, n the number of classes,
        Delta the largest gap max z - z_i of an entry whose e^{z_i - max z} is a normal number
        (the relative error of e^{d} when d is rounded; below 87 in float32).  Never NaN, or 0
        where the exact value is representable.  The property tests measure at most 14 u
        (tests/test_extremes.py).

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``dim`` is out of range or the class dimension is empty; a row contains NaN
            or +inf; a row is entirely ``-inf`` (no distribution).  The message names the rows.
            With validation off (``entmath.set_validation(False)``) such rows give NaN instead.

    Examples:
        >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, float("-inf")]])
        >>> entmath.entropy(logits)  # uniform over 4 classes: log 4; a -inf class adds nothing
        tensor([1.3863, 0.1773])
    """
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim must be a bool, got {type(keepdim).__name__}")
    backend = resolve_backend(backend, logits)
    z = logits if dim == logits.dim() - 1 else logits.movedim(dim, -1)
    if backend == "torch" and _on_cpu_kernel(z):
        backend = "cpu"  # the C kernel of the torch path (kernels/cpu/rows.py)
    mode, faults = eager_call(z), []
    if mode == "plain":
        h, lse = _forward(z, backend, direct=True, faults=faults)
    elif mode == "graph":
        h, lse = _EntropyEager.apply(z, backend, faults)
    else:
        h, lse = _Entropy.apply(z, backend)
    # The C kernel, called directly, counted the rows without a distribution (it made them NaN):
    # none, and there is nothing to read or mask.
    if faults != [0] and not check_rows_finite(lse, "logits"):  # (verified finite: nothing to mask)
        h = torch.where(torch.isfinite(lse), h, float("nan"))  # a bad row is NaN, not a stray number
    out_dtype = output_dtype(logits)
    h = h if h.dtype == out_dtype else h.to(out_dtype)
    return h.unsqueeze(dim) if keepdim else h
