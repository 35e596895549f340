"""Generalised Jensen-Shannon divergence between two softmax distributions.  Derived in Chapter 1
(book/ch01_entropy.md).

With p = softmax(a), q = softmax(b), 0 < beta < 1 and the mixture m = beta p + (1 - beta) q,

    JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m) = H(m) - beta H(p) - (1 - beta) H(q),

the entropy of the mixture minus the mixture of the entropies (Chapter 1, eq-ent-jsd).  It is
finite for any p and q (m covers both), symmetric under (p, beta) <-> (q, 1 - beta), and at most
the binary entropy h(beta) <= log 2.  As Liger-Kernel's ``jsd`` defines beta, beta = 0 gives
KL(p || q) and beta = 1 gives KL(q || p) (the limits of the formula are 0; these are the forward
and reverse KL of distillation), computed by ``entmath.kl``.

Forward: neither KL(p || m) nor the entropy form is computed as written (both cancel when
p ~ q); each is a sum of non-negative terms m_i psi(p_i / m_i - 1), psi(s) = (1 + s) log(1 + s) - s,
built from the cancellation-free log-ratio of ``_divergence`` (Chapter 1, eq-ent-jsd-stable).

Backward:  dJSD/da_k = beta p_k (log(p_k / m_k) - KL(p || m)),
           dJSD/db_k = (1 - beta) q_k (log(q_k / m_k) - KL(q || m))   (``jsd_vjp``, torch ops, so
differentiable again; the Triton path uses its backward kernel when no graph is built).

Paths: ``jsd_torch`` (the reference, plain torch) and ``torch.ops.entmath.jsd_triton``
(``entmath/kernels/triton/jsd.py``).
"""
from __future__ import annotations

import math

import torch

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, coded_lse, normalize_dim
from ._divergence import jsd_rows
from ._library import acc_dtype, register_row_vmap, triton_kernel_op
from ._rows import kernels, output_dtype, rows_2d, upcast
from ._stats import clamped, log_normaliser, nan_unless_finite
from .kl import _KL
from .kl import _on_cpu_kernel as _kl_on_cpu_kernel

__all__ = ["jsd"]

REDUCTIONS = ("none", "sum", "mean")


def jsd_torch(a, b, beta: float):
    """Reference forward along the last dim, 0 < beta < 1: (JSD, KL(p || m), KL(q || m), lse_a,
    lse_b) in the accumulation dtype, the lse coded for validation."""
    shape = a.shape[:-1]
    a, b = upcast(a).reshape(-1, a.shape[-1]), upcast(b).reshape(-1, b.shape[-1])
    ma, log_sa = log_normaliser(a)
    mb, log_sb = log_normaliser(b)
    kp, kq = jsd_rows(a, b, ma, mb, log_sa.unsqueeze(-1), log_sb.unsqueeze(-1), beta)
    ma, mb = ma.squeeze(-1), mb.squeeze(-1)
    j = beta * kp + (1.0 - beta) * kq
    return (j.view(shape), kp.view(shape), kq.view(shape), coded_lse(ma, ma + log_sa).view(shape),
            coded_lse(mb, mb + log_sb).view(shape))


def jsd_vjp(a, b, beta: float, lse_a, lse_b, g, g_lse_a, g_lse_b):
    """Vector-Jacobian product of (JSD, lse_a, lse_b) in torch ops, with t_p = log(p / m),
    t_q = log(q / m):

        dJSD/da = beta p (t_p - sum p t_p),   dJSD/db = (1 - beta) q (t_q - sum q t_q),
        dlse_a/da = p,   dlse_b/db = q.

    The two divergences to m are recomputed here (one reduction each), so that a second
    derivative sees their dependence on a and b.  Any gradient may be None.  While autograd
    records every op is out of place (differentiable again); otherwise in place on temporaries."""
    fast = not torch.is_grad_enabled()
    ac, bc = upcast(a), upcast(b)
    lp = clamped(ac - nan_unless_finite(lse_a).unsqueeze(-1))  # -inf logits: p = 0, finite log p
    lq = clamped(bc - nan_unless_finite(lse_b).unsqueeze(-1))
    p, q = lp.exp(), lq.exp()
    ga = gb = None
    if g is not None:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))  # log m, finite
        gc = g.to(ac.dtype).unsqueeze(-1)
        if fast:  # (in place only on tensors that depend on both a and b: vmap may batch just one)
            t_q = lq - lm
            t_p = lm.neg_().add_(lp)
            ga = t_p.sub_((p * t_p).sum(-1, keepdim=True)).mul_(p).mul_(gc * beta)
            gb = t_q.sub_((q * t_q).sum(-1, keepdim=True)).mul_(q).mul_(gc * (1.0 - beta))
        else:
            t_p, t_q = lp - lm, lq - lm
            ga = p * (t_p - (p * t_p).sum(-1, keepdim=True)) * (gc * beta)
            gb = q * (t_q - (q * t_q).sum(-1, keepdim=True)) * (gc * (1.0 - beta))
    if g_lse_a is not None:
        term = p * g_lse_a.to(ac.dtype).unsqueeze(-1)
        ga = term if ga is None else ga + term
    if g_lse_b is not None:
        term = q * g_lse_b.to(bc.dtype).unsqueeze(-1)
        gb = term if gb is None else gb + term
    return (None if ga is None else ga.to(a.dtype)), (None if gb is None else gb.to(b.dtype))


class _JSD(torch.autograd.Function):
    """(JSD, KL(p || m), KL(q || m), lse_a, lse_b) of the rows of a and b (classes last) as one
    autograd unit, on either backend.  The two divergences to m are auxiliary outputs for the
    Triton backward kernel and are not differentiable; backward ``jsd_vjp`` (or the kernel when no
    graph is being built)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, beta, backend):
        if backend == "triton":
            out = torch.ops.entmath.jsd_triton(rows_2d(a), rows_2d(b), beta)
            return tuple(t.view(a.shape[:-1]) for t in out)
        return jsd_torch(a, b, beta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.backend = inputs[3]

    @staticmethod
    def backward(ctx, g, g_kp, g_kq, g_lse_a, g_lse_b):
        return (*_backward(ctx, g, g_kp, g_kq, g_lse_a, g_lse_b, kernel=ctx.backend == "triton"), None, None)


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
@triton_kernel_op("jsd_triton")
def jsd_triton(a: torch.Tensor, b: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor]:
    """(JSD, KL(p || m), KL(q || m), lse_a, lse_b) of the rows of a and b (rows, n), 0 < beta < 1,
    in the accumulation dtype."""
    return kernels("jsd").jsd_fwd(rows_2d(a), rows_2d(b), beta)


@jsd_triton.register_fake
def _(a, b, beta):
    j = a.new_empty(a.shape[:1], dtype=acc_dtype(a))
    return j, torch.empty_like(j), torch.empty_like(j), torch.empty_like(j), torch.empty_like(j)


@triton_kernel_op("jsd_backward_triton")
def jsd_backward_triton(a: torch.Tensor, b: torch.Tensor, kp: torch.Tensor, kq: torch.Tensor, lse_a: torch.Tensor,
                        lse_b: torch.Tensor, g: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dJSD/da, dJSD/db) for the rows given dL/dJSD (rows,): one read of a and b, one write of each."""
    return kernels("jsd").jsd_bwd(rows_2d(a), rows_2d(b), g, kp, kq, lse_a, lse_b, beta)


@jsd_backward_triton.register_fake
def _(a, b, kp, kq, lse_a, lse_b, g, beta):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.beta = inputs[2]
    ctx.save_for_backward(inputs[0], inputs[1], *output[1:])


def _backward(ctx, g, g_kp, g_kq, g_lse_a, g_lse_b, kernel=True):
    a, b, kp, kq, lse_a, lse_b = ctx.saved_tensors
    if not kernel or torch.is_grad_enabled() or g is None or g_lse_a is not None or g_lse_b is not None:
        return jsd_vjp(a, b, ctx.beta, lse_a, lse_b, g, g_lse_a, g_lse_b)  # differentiable torch
    a2d, b2d = rows_2d(a), rows_2d(b)
    ga, gb = torch.ops.entmath.jsd_backward_triton(a2d, b2d, kp.reshape(-1), kq.reshape(-1), lse_a.reshape(-1),
                                                   lse_b.reshape(-1), g.reshape(-1), ctx.beta)
    return ga.view(a.shape), gb.view(b.shape)


def _op_backward(ctx, g, g_kp, g_kq, g_lse_a, g_lse_b):
    return (*_backward(ctx, g, g_kp, g_kq, g_lse_a, g_lse_b), None)


# Direct callers of torch.ops.entmath.jsd_triton get the same autograd.
jsd_triton.register_autograd(_op_backward, setup_context=_setup)
register_row_vmap(jsd_triton, (1, 1, None))
register_row_vmap(jsd_backward_triton, (1, 1, 0, 0, 0, 0, 0, None))


def jsd(p_logits: torch.Tensor, q_logits: torch.Tensor, beta: float = 0.5, dim: int = -1, *,
        labels: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "none",
        backend: str = "auto") -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of ``softmax(p_logits)`` and ``softmax(q_logits)``
    along ``dim``, in nats:  beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q.

    As in Liger-Kernel's ``jsd``: ``beta = 0`` gives KL(p || q) and ``beta = 1`` gives KL(q || p)
    (``entmath.kl``), and rows whose ``labels`` entry equals ``ignore_index`` are left out (for
    distillation over token rows).  Liger's ``jsd(input, target, shift_labels, beta,
    ignore_index)`` takes log-probabilities with the student first; it equals
    ``entmath.jsd(teacher_logits, student_logits, beta, labels=shift_labels, reduction="mean")``.

    Args:
        p_logits, q_logits: floating-point tensors of the same shape; ``-inf`` marks impossible
            classes (mixed float dtypes are promoted, as in ``kl``).
        beta: the weight of p in the mixture, a number in [0, 1].
        dim: the class dimension.
        labels: optional integer tensor of the shape of ``p_logits`` without ``dim`` (one entry
            per row); rows whose entry equals ``ignore_index`` give 0 and a zero gradient, and
            their logits are not checked.  Only the comparison with ``ignore_index`` is used.
        ignore_index: see ``labels``.
        reduction: ``"none"`` (per row), ``"sum"``, or ``"mean"`` (over the rows that are not
            ignored, as Liger's loss).  **Documented value:** ``"mean"`` over zero rows is 0.0.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The divergence, dtype of the inputs (float32 under ``torch.autocast``).  Finite for every
        pair of rows with a finite logit each (at beta = 0 or 1: ``+inf`` where ``kl`` is).
        Differentiable twice.  **Accuracy** (0 < beta < 1): for any finite or ``-inf`` logits, up
        to the dtype's max, the result is within (32 + Delta + log2 n) u of the exact divergence
        of the given values, relatively, plus 1024 n sigma absolutely (u the unit roundoff and
        sigma the smallest subnormal of the accumulation dtype, float32 for half inputs; Delta
        the largest gap max z - z_i of an entry whose e^{z_i - max z} is a normal number; plus the
        rounding to a half dtype).  The property tests measure at most 15 u (tests/test_extremes.py).

    Raises:
        TypeError: non-float logits, non-integer ``labels``, a ``beta`` or ``ignore_index`` that
            is not a number / an int.
        ValueError: shape mismatch (logits, or ``labels`` against the rows), bad ``dim``, empty
            class dimension, ``beta`` outside [0, 1], unknown ``reduction``; NaN, +inf or all
            ``-inf`` logits in a row that is not ignored (naming ``p_logits`` or ``q_logits``).
            With validation off (``entmath.set_validation(False)``) such rows give NaN instead.

    Examples:
        >>> p, q = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
        >>> entmath.jsd(p, q), entmath.jsd(q, p)  # symmetric at beta = 0.5, and below log 2
        (tensor([0.4795]), tensor([0.4795]))
    """
    check_float_tensor(p_logits, "p_logits")
    check_float_tensor(q_logits, "q_logits")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits and q_logits must have the same shape, got {tuple(p_logits.shape)} "
                         f"and {tuple(q_logits.shape)}")
    dim = normalize_dim(p_logits, dim, "p_logits")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    row_shape = p_logits.shape[:dim] + p_logits.shape[dim + 1:]
    valid = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.shape != row_shape:
            raise ValueError(f"labels must have the shape of p_logits without dim={dim}, {tuple(row_shape)}; "
                             f"got {tuple(labels.shape)}")
        valid = labels != ignore_index
    backend = resolve_backend(backend, p_logits, q_logits)
    a, b = p_logits, q_logits
    if a.dtype != b.dtype:  # mixed dtypes (e.g. from autocast): promote, as F.kl_div does
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    if valid is not None:
        # Ignored rows are replaced by zeros before the op: they give exactly 0, and autograd
        # routes them a zero gradient whatever they held (as cross_entropy's ignore_index).
        keep = valid.unsqueeze(-1)
        a, b = torch.where(keep, a, 0.0), torch.where(keep, b, 0.0)
    # beta = 0 and 1 are kl itself, on kl's path (its C kernel on float32/bfloat16 CPU rows)
    kl_backend = "cpu" if backend == "torch" and _kl_on_cpu_kernel(a, b) else backend
    if beta == 0.0:
        out, lse_a, lse_b = _KL.apply(a, b, kl_backend)
    elif beta == 1.0:
        out, lse_b, lse_a = _KL.apply(b, a, kl_backend)
    else:
        out, _, _, lse_a, lse_b = _JSD.apply(a, b, beta, backend)
    check_rows_finite(lse_a, "p_logits", rows=valid)
    check_rows_finite(lse_b, "q_logits", rows=valid)
    out = torch.where(torch.isfinite(lse_a) & torch.isfinite(lse_b), out, float("nan"))  # bad rows: NaN
    out_dtype = output_dtype(a)
    if reduction == "none":
        return out.to(out_dtype)
    total = out.sum()
    if reduction == "mean":
        count = valid.sum().clamp_min(1) if valid is not None else max(out.numel(), 1)
        total = total / count
    return total.to(out_dtype)
