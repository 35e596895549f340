"""KL divergence between two softmax distributions.  Derived in Chapter 1 (book/ch01_entropy.md).

    KL(p || q) = sum_i p_i (log p_i - log q_i),   p = softmax(a), q = softmax(b),

with 0 log(0 / q) = 0 and p_i log(p_i / 0) = +inf: the divergence is +inf exactly when p puts
mass where q has none (a finite, b = -inf).  Gibbs' inequality makes it >= 0.

Forward (Chapter 1, "Divergences without cancellation"): with y_i = log q_i - log p_i formed
from each row's own max and normaliser (``_divergence``, no term of the size of the logits),

    KL = sum_{p_i > 0} p_i chi(y_i) + ... ,   chi(y) = e^y - 1 - y >= 0,

a sum of non-negative terms, so it keeps its relative accuracy down to divergences far below
the rounding of the logits (the textbook sum_i p_i (log p_i - log q_i) subtracts lse-sized
numbers: 0.0 for logits at -1e38, errors of 1e-3 at an offset of 1e4).  Two reads of each row.

Backward:  dKL/da_k = p_k (log p_k - log q_k - KL),   dKL/db_k = q_k - p_k  (``kl_vjp``, in torch
ops, so differentiable again; the Triton path uses its backward kernel when no graph is built).

Paths: ``kl_torch`` (the reference, plain torch), ``torch.ops.entmath.kl_cpu`` (the C kernel of
``entmath/kernels/cpu/rows.c``, for float32/bfloat16 CPU rows of at least
``kernels.cpu.rows.MIN_ELEMS`` elements) and ``torch.ops.entmath.kl_triton``
(``entmath/kernels/triton/kl.py``).
"""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, coded_lse, normalize_dim
from ..kernels.cpu import rows as cpu_rows
from ._library import acc_dtype, cpu_kernel_op, eager_call, eager_function, register_row_vmap, triton_kernel_op
from ._rows import kernels, output_dtype, rows_2d, upcast
from ._divergence import kl_rows
from ._stats import clamped, log_normaliser, nan_unless_finite

__all__ = ["kl"]


def kl_torch(a, b):
    """Reference forward along the last dim: (KL, lse_a, lse_b) in the accumulation dtype, the
    lse coded for validation.  Two reads of each row: its max and normaliser, then the
    non-negative terms of ``_divergence.kl_rows``."""
    shape = a.shape[:-1]
    a, b = upcast(a).reshape(-1, a.shape[-1]), upcast(b).reshape(-1, b.shape[-1])
    ma, log_sa = log_normaliser(a)
    mb, log_sb = log_normaliser(b)
    kl = kl_rows(a, b, ma, mb, log_sa.unsqueeze(-1), log_sb.unsqueeze(-1))
    ma, mb = ma.squeeze(-1), mb.squeeze(-1)
    return kl.view(shape), coded_lse(ma, ma + log_sa).view(shape), coded_lse(mb, mb + log_sb).view(shape)


def kl_vjp(a, b, kl, lse_a, lse_b, g, g_lse_a, g_lse_b):
    """Vector-Jacobian product of (KL, lse_a, lse_b) in torch ops:

        dKL/da = p (log p - log q - KL),   dKL/db = q - p,   dlse_a/da = p,   dlse_b/db = q.

    Rows with KL = +inf get 0 w.r.t. a from the KL term (documented).  Any gradient may be None.
    While autograd records (``create_graph=True``) every op is out of place, so the result is
    differentiable again; otherwise the ops work in place on the temporaries made here."""
    fast = not torch.is_grad_enabled()
    ac, bc = upcast(a), upcast(b)
    log_p = clamped(ac - nan_unless_finite(lse_a).unsqueeze(-1))  # -inf logits: p = 0, finite log p
    log_q = clamped(bc - nan_unless_finite(lse_b).unsqueeze(-1))
    p, q = log_p.exp(), log_q.exp()
    ga = gb = None
    if g_lse_a is not None:
        ga = p * g_lse_a.to(ac.dtype).unsqueeze(-1)
    if g_lse_b is not None:
        gb = q * g_lse_b.to(bc.dtype).unsqueeze(-1)
    if g is not None:
        gc = g.to(ac.dtype).unsqueeze(-1)
        finite = torch.isfinite(kl).unsqueeze(-1)
        kl_f = torch.where(finite, kl.unsqueeze(-1), 0.0)
        if fast:
            # p (log p - log q - KL) first: 0 at p = 0, before scaling could overflow it
            term_a = log_p.sub_(log_q).sub_(kl_f).mul_(p).mul_(gc).masked_fill_(~finite, 0.0)
            term_b = q.sub_(p).mul_(gc)
        else:
            term_a = torch.where(finite, p * (log_p - log_q - kl_f), 0.0) * gc
            term_b = (q - p) * gc
        ga = term_a if ga is None else ga + term_a
        gb = term_b if gb is None else gb + term_b
    return (None if ga is None else ga.to(a.dtype)), (None if gb is None else gb.to(b.dtype))


class _KL(torch.autograd.Function):
    """(KL, lse_a, lse_b) of the rows of a and b (classes last) as one autograd unit, on either
    backend; backward ``kl_vjp`` (or the Triton backward kernel when no graph is being built)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, backend):
        return _forward(a, b, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.kernel = inputs[2] if inputs[2] in ("triton", "cpu") else None

    @staticmethod
    def backward(ctx, g, g_lse_a, g_lse_b):
        return (*_backward(ctx, g, g_lse_a, g_lse_b, kernel=ctx.kernel), None)

    @staticmethod
    def eager_forward(a, b, backend, faults):
        return _forward(a, b, backend, direct=True, faults=faults)


_KLEager = eager_function(_KL)  # the same unit for eager calls that record a graph


def _forward(a, b, backend, direct=False, faults=None):
    """(KL, lse_a, lse_b) on the chosen path ("triton", "cpu": the C kernel, or "torch");
    ``direct``: call the C kernel itself rather than its registered operator (eager calls),
    which appends to the list ``faults`` (if given) its count of rows without a distribution."""
    if backend == "triton":
        out = torch.ops.entmath.kl_triton(rows_2d(a), rows_2d(b))
    elif backend == "cpu":
        a2d, b2d = rows_2d(a), rows_2d(b)
        if direct and cpu_rows.available():
            *out, bad = cpu_rows.kl_fwd(a2d, b2d)
            if faults is not None:
                faults.append(bad)
        else:
            out = torch.ops.entmath.kl_cpu(a2d, b2d)
    else:
        return kl_torch(a, b)
    if a.dim() == 2:
        return tuple(out)
    return tuple(t.view(a.shape[:-1]) for t in out)


def _on_cpu_kernel(a, b) -> bool:
    """Whether the torch backend hands these rows to the C kernel (kernels/cpu/rows.py)."""
    return a.shape == b.shape and a.dtype == b.dtype and cpu_rows.takes(a) and cpu_rows.takes(b)


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
@triton_kernel_op("kl_triton")
def kl_triton(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL, lse_a, lse_b) of the rows of a and b (rows, n), in the accumulation dtype."""
    return kernels("kl").kl_fwd(rows_2d(a), rows_2d(b))


@kl_triton.register_fake
def _(a, b):
    kl = a.new_empty(a.shape[:1], dtype=acc_dtype(a))
    return kl, torch.empty_like(kl), torch.empty_like(kl)


@triton_kernel_op("kl_backward_triton")
def kl_backward_triton(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, lse_a: torch.Tensor,
                       lse_b: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dKL/da, dKL/db) for the rows given dL/dKL (rows,): one read of a and b, one write of each."""
    return kernels("kl").kl_bwd(rows_2d(a), rows_2d(b), g, kl, lse_a, lse_b)


@kl_backward_triton.register_fake
def _(a, b, kl, lse_a, lse_b, g):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0], inputs[1], *output)


def _backward(ctx, g, g_lse_a, g_lse_b, kernel="triton"):
    a, b, kl, lse_a, lse_b = ctx.saved_tensors
    if not kernel or torch.is_grad_enabled() or g is None or g_lse_a is not None or g_lse_b is not None:
        return kl_vjp(a, b, kl, lse_a, lse_b, g, g_lse_a, g_lse_b)  # differentiable torch
    a2d, b2d = rows_2d(a), rows_2d(b)
    if kernel == "cpu" and getattr(ctx, "direct", False) and cpu_rows.available():
        ga, gb = cpu_rows.kl_bwd(a2d, b2d, g.reshape(-1), kl.reshape(-1), lse_a.reshape(-1), lse_b.reshape(-1))
    else:
        op = torch.ops.entmath.kl_backward_triton if kernel == "triton" else torch.ops.entmath.kl_backward_cpu
        ga, gb = op(a2d, b2d, kl.reshape(-1), lse_a.reshape(-1), lse_b.reshape(-1), g.reshape(-1))
    return ga.view(a.shape), gb.view(b.shape)


# ---- the C path (CPU), registered the same way -----------------------------------------------
@cpu_kernel_op("kl_cpu")
def kl_cpu(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL, lse_a, lse_b), float32, of float32/bfloat16 row pairs (rows, n) by the C kernel (the
    eager path if it cannot be built): two reads of each row, the second from cache."""
    if not cpu_rows.available():
        return kl_torch(a, b)
    return cpu_rows.kl_fwd(a if a.stride(-1) == 1 else a.contiguous(), b if b.stride(-1) == 1 else b.contiguous())[:3]


@cpu_kernel_op("kl_backward_cpu")
def kl_backward_cpu(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor,
                    g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dKL/da, dKL/db) times dL/dKL (rows,) by the C kernel: one read of a and b, one write of each."""
    if not cpu_rows.available():
        ga, gb = kl_vjp(a, b, kl, lse_a, lse_b, g, None, None)
        return ga.contiguous(), gb.contiguous()
    return cpu_rows.kl_bwd(a if a.stride(-1) == 1 else a.contiguous(), b if b.stride(-1) == 1 else b.contiguous(),
                           g, kl, lse_a, lse_b)


kl_cpu.register_fake(lambda a, b: tuple(a.new_empty(a.shape[:1], dtype=torch.float32) for _ in range(3)))
kl_backward_cpu.register_fake(lambda a, b, kl, lse_a, lse_b, g: (
    torch.empty_like(a, memory_format=torch.contiguous_format),
    torch.empty_like(b, memory_format=torch.contiguous_format)))

# Direct callers of the registered operators get the same autograd.
kl_triton.register_autograd(_backward, setup_context=_setup)
kl_cpu.register_autograd(lambda ctx, g, ga, gb: _backward(ctx, g, ga, gb, kernel="cpu"), setup_context=_setup)
register_row_vmap(kl_triton, (1, 1))
register_row_vmap(kl_backward_triton, (1, 1, 0, 0, 0, 0))
register_row_vmap(kl_cpu, (1, 1))
register_row_vmap(kl_backward_cpu, (1, 1, 0, 0, 0, 0))


REDUCTIONS = ("none", "sum", "mean", "batchmean")


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, dim: int = -1, *, reduction: str = "none",
       backend: str = "auto") -> torch.Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) along ``dim``, in nats.

    With ``reduction`` it equals ``F.kl_div(log_softmax(q_logits, dim), log_softmax(p_logits,
    dim), reduction=reduction, log_target=True)`` (note the order: ``F.kl_div`` takes the model
    q first and the target p second).

    Args:
        p_logits, q_logits: floating-point tensors of the same shape and dtype; ``-inf`` marks
            impossible classes.
        dim: the class dimension.
        reduction: as ``F.kl_div`` defines it: ``"none"`` (per row, the default), ``"sum"``,
            ``"batchmean"`` (the sum divided by ``p_logits.shape[0]``) or ``"mean"`` (the sum
            divided by ``p_logits.numel()``, classes included; ``F.kl_div`` warns that this is
            not the mean divergence, which ``"batchmean"`` is for 2-D inputs).  Reduced in the
            accumulation dtype.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Shape of the inputs without ``dim`` (a scalar if reduced), their dtype.  **Documented value:** ``+inf`` in rows
        where p has mass that q lacks; the gradient w.r.t. ``p_logits`` of such a row is 0 and
        w.r.t. ``q_logits`` is q - p.  **Accuracy:** for any finite or ``-inf`` logits, up to the
        dtype's max (spans up to twice the max included), the result is within
        (32 + Delta + log2 n) u of the exact divergence of the given values, relatively, plus
        64 (1 + log2 n)^2 u^3 + 1024 n sigma absolutely, and the final rounding to a half dtype:
        u and sigma are the unit roundoff and smallest subnormal of the accumulation dtype
        (float32 for half inputs), n the number of classes, Delta the largest gap max z - z_i of
        an entry of either row whose e^{z_i - max z} is a normal number (below 87 in float32).
        Never NaN, 0 or +inf where the exact value is finite and representable.  The property
        tests measure at most 6 u in float32, 13 u in float64 (tests/test_extremes.py).

    Raises:
        TypeError: non-float inputs.  (Different float dtypes are promoted, as in ``F.kl_div``.)
        ValueError: shape mismatch, bad ``dim``, empty class dimension, unknown ``reduction``;
            NaN, +inf or all ``-inf`` rows (naming ``p_logits`` or ``q_logits``).  With validation off
            (``entmath.set_validation(False)``) such rows give NaN instead.

    Examples:
        >>> p, q = torch.tensor([[1.0, 0.0, -1.0]]), torch.zeros(1, 3)
        >>> entmath.kl(p, q)  # KL(softmax(p) || uniform) = log 3 - H(softmax(p))
        tensor([0.2662])
        >>> torch.log(torch.tensor(3.0)) - entmath.entropy(p)
        tensor([0.2662])
    """
    check_float_tensor(p_logits, "p_logits")
    check_float_tensor(q_logits, "q_logits")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits and q_logits must have the same shape, got {tuple(p_logits.shape)} "
                         f"and {tuple(q_logits.shape)}")
    dim = normalize_dim(p_logits, dim, "p_logits")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    backend = resolve_backend(backend, p_logits, q_logits)
    a, b = p_logits, q_logits
    if a.dtype != b.dtype:  # mixed dtypes (e.g. from autocast): promote, as F.kl_div does
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    if dim != a.dim() - 1:
        a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    if backend == "torch" and _on_cpu_kernel(a, b):
        backend = "cpu"  # the C kernel of the torch path (kernels/cpu/rows.py)
    mode, faults = eager_call(a, b), []
    if mode == "plain":
        kl, lse_a, lse_b = _forward(a, b, backend, direct=True, faults=faults)
    elif mode == "graph":
        kl, lse_a, lse_b = _KLEager.apply(a, b, backend, faults)
    else:
        kl, lse_a, lse_b = _KL.apply(a, b, backend)
    # The C kernel, called directly, counted the rows without a distribution (it made them NaN):
    # none, and there is nothing to read or mask.
    if faults != [0] and not (check_rows_finite(lse_a, "p_logits") & check_rows_finite(lse_b, "q_logits")):
        kl = torch.where(torch.isfinite(lse_a) & torch.isfinite(lse_b), kl, float("nan"))  # bad rows: NaN
    if reduction != "none":
        kl = kl.sum()
        if reduction == "batchmean":
            kl = kl / p_logits.shape[0]
        elif reduction == "mean":
            kl = kl / p_logits.numel()
    out_dtype = output_dtype(a)
    return kl if kl.dtype == out_dtype else kl.to(out_dtype)
