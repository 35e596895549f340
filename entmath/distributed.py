"""entmath's ops over a vocabulary split across the ranks of a process group.  Chapter 6.

In tensor-parallel training (Megatron-LM's vocab-parallel output layer) rank k of a group of P
ranks holds a contiguous slice of the vocabulary, classes [start_k, start_k + V_k), in rank order,
and only its own slice of the logits (or of the output weight).  The ops here take that slice and
return what the unsharded op returns on the whole row, on every rank, without gathering the
logits: each rank reduces its slice to a few numbers per row (a summary: maximum, sum and first
moment of the exponentials, the target's logit if it holds the target), and two all-reduces
combine them (eq-lh-allreduce):

* a MAX of one number per row (two for ``kl``), the row maximum;
* a SUM of four to six numbers per row: the rescaled sums and moments, the target's logit,
  for label smoothing the sum of M - z_j (each rank's sum of m_k - z_j moved to the global
  maximum M: no sum of raw logits, whose offset would cancel), a count of NaN shards.

So a row costs a few dozen bytes of communication instead of the V_k logits per rank an
all-gather would move.  The backward needs no communication at all: with the row's global
log-normaliser and entropy saved, each rank's gradient is a function of its own slice (Chapter 6).
Only ``linear_cross_entropy`` all-reduces (sums) the gradient of the hidden states, which every
rank holds whole, as Megatron's column-parallel layer does.

Every rank must call the op with the same row shape, the same targets and the same options (as
for any collective); the results and the loss are then identical on all ranks (all-reduce results
are), and so are the value errors, which are read off the reduced statistics: a NaN in one rank's
slice raises on every rank, never leaving the others waiting in a collective.

**NCCL.** Nothing here is specific to a backend: with NCCL the tensors live on each rank's current
CUDA device, the collectives run on the current stream, ``backend="auto"`` runs the Triton kernels
for the local statistics, and with ``entmath.set_validation(False)`` no op reads a value back to
the host (the two all-reduces are the only synchronisation, and they are asynchronous on the
device).  NCCL's MAX may drop a NaN; NaN rows still come out NaN because NaN shards are counted
in the SUM.  The tests run the ops with gloo on 2 and 4 CPU processes (``tests/test_distributed.py``).

The gradients are exact to first order.  The ops are differentiable once: a second derivative
would couple the ranks' slices through the shared statistics and need collectives in the double
backward, which is not implemented; a backward with ``create_graph=True`` raises RuntimeError.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ._backend import resolve_backend
from ._validate import check_float_tensor, check_rows_finite, coded_lse, normalize_dim
from .ops._rows import no_autocast, output_dtype, rows_2d, upcast
from .ops._shards import combine_kl, combine_summaries, logits_summary
from .ops.cross_entropy import CHUNK_BYTES
from .ops.entropy import entropy_vjp
from .ops.kl import _KL, kl_vjp
from .ops.linear_cross_entropy import (check_linear_head, check_options, check_targets, linear_cross_entropy_vjp,
                                       linear_summary_torch, logits_grad, loss_from_statistics, reduce_rows,
                                       row_coefficients)

__all__ = ["entropy", "cross_entropy", "kl", "linear_cross_entropy", "vocab_shard"]


def _group_size(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("entmath.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group); in a single process use the entmath op")
    return dist.get_rank(group), dist.get_world_size(group)


def vocab_shard(n_local: int, group=None, vocab_start: Optional[int] = None, vocab_size: Optional[int] = None):
    """(start, V): where this rank's slice of ``n_local`` classes begins, and the vocabulary size.

    By default the slices are equal and contiguous in rank order, as in Megatron's
    ``VocabUtility``: start = rank * n_local and V = world_size * n_local.  For unequal slices pass
    both ``vocab_start`` and ``vocab_size``."""
    rank, world = _group_size(group)
    if vocab_start is None and vocab_size is None:
        return rank * n_local, world * n_local
    if vocab_start is None or vocab_size is None:
        raise ValueError("pass vocab_start and vocab_size together (or neither, for equal slices in rank order)")
    for value, name in ((vocab_start, "vocab_start"), (vocab_size, "vocab_size")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not (0 <= vocab_start and vocab_start + n_local <= vocab_size):
        raise ValueError(f"this rank's slice [vocab_start, vocab_start + {n_local}) = [{vocab_start}, "
                         f"{vocab_start + n_local}) must lie in [0, vocab_size = {vocab_size})")
    return vocab_start, vocab_size


def _reducers(group):
    """The (reduce_max, reduce_sum) of ``_shards``: all-reduces over the group (on copies)."""

    def reduce(op):
        def run(x):
            x = x.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(x, op=op, group=group)
            return x
        return run

    return reduce(dist.ReduceOp.MAX), reduce(dist.ReduceOp.SUM)


def _first_order_only():
    """The backwards below are exact first derivatives, not differentiable again: refuse to
    record a graph of them (create_graph=True) rather than give wrong second derivatives."""
    if torch.is_grad_enabled():
        raise RuntimeError("entmath.distributed ops are differentiable once: a second derivative couples the ranks' "
                           "slices and is not implemented (backward with create_graph=True)")


def _merged(m, r, a, extra, group, gap=None):
    """The global (m, log S, entropy, summed extras) of rows whose summaries are split over ranks;
    ``gap`` = (G, n): this rank's sum_j (m - z_j) over its n logits, moved to the global maximum
    and summed last (``combine_summaries``)."""
    M, R, A, sums = combine_summaries(m, r, a, extra, *_reducers(group), gap=gap)
    log_s = torch.log1p(R)
    return M, log_s, log_s - A / (1.0 + R), sums


# ---- entropy --------------------------------------------------------------------------------
class _DistEntropy(torch.autograd.Function):
    @staticmethod
    def forward(z2d, group, backend):
        no_target = torch.full(z2d.shape[:1], -1, dtype=torch.long, device=z2d.device)
        m, r, a, _, _ = logits_summary(z2d, no_target, False, True, backend)
        M, log_s, h, _ = _merged(m, r, a, [], group)
        return h, coded_lse(M, M + log_s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], *output)

    @staticmethod
    def backward(ctx, g_h, g_lse):
        _first_order_only()
        z, h, lse = ctx.saved_tensors
        return entropy_vjp(z, h, lse, g_h, g_lse), None, None  # local: the global H and lse are saved


def entropy(logits: torch.Tensor, dim: int = -1, *, group=None, backend: str = "auto") -> torch.Tensor:
    """Entropy of ``softmax`` over the whole vocabulary, each rank holding its slice of the logits.

    Args:
        logits: this rank's slice of the logits (any slicing of the classes: the entropy does not
            depend on their order), floating point; ``-inf`` marks impossible classes, and a
            rank's slice of a row may be entirely ``-inf``.
        dim: the class dimension.
        group: the process group (default: the world).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the local statistics.

    Returns:
        The entropy of each row, identical on every rank, differentiable (once) with respect to
        the local slice.  Equal to ``entmath.entropy`` of the gathered logits.

    Raises:
        TypeError, ValueError: as ``entmath.entropy``, on every rank alike (a NaN in any rank's
            slice is reported by all of them).  RuntimeError: no initialised process group.
    """
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    _group_size(group)
    backend = resolve_backend(backend, logits)
    z = logits.movedim(dim, -1)
    h, lse = _DistEntropy.apply(rows_2d(z), group, backend)
    check_rows_finite(lse, "logits (of some rank)")
    h = torch.where(torch.isfinite(lse), h, float("nan"))
    return h.view(z.shape[:-1]).to(output_dtype(logits))


# ---- cross-entropy --------------------------------------------------------------------------
class _DistCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(z2d, t, start, n_vocab, eps, ignore_index, z_loss, want_entropy, group, backend):
        m, r, a, z_t, gap = logits_summary(z2d, t - start, eps > 0, want_entropy, backend)
        M, log_s, h, sums = _merged(m, r, a, [z_t], group, gap=(gap, z2d.shape[1]))
        loss, lse, ent = _rows(M, log_s, h, sums, t, n_vocab, eps, ignore_index, z_loss, want_entropy)
        return loss, lse, ent

    @staticmethod
    def setup_context(ctx, inputs, output):
        z2d, t, start, n_vocab, eps, ignore_index, z_loss = inputs[:7]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z2d, t, output[1], output[2])
        ctx.options = (start, n_vocab, eps, ignore_index, z_loss)

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_ent):
        _first_order_only()
        z, t, lse, ent = ctx.saved_tensors
        start, n_vocab, eps, ignore_index, z_loss = ctx.options
        g_ent = g_ent if ent.numel() else None
        c_p, c_e, c_t, c_s = row_coefficients(t, lse, n_vocab, eps, ignore_index, z_loss, 1.0, g_loss, g_lse, g_ent)
        grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        rows, n = z.shape
        step = max(1, CHUNK_BYTES // (4 * max(n, 1)))
        for r0 in range(0, rows, step):  # row chunks: temporaries stay chunk-sized
            rs = slice(r0, min(rows, r0 + step))
            grad[rs] = logits_grad(upcast(z[rs]), t[rs] - start, lse[rs], None if c_e is None else ent[rs], c_p[rs],
                                   None if c_e is None else c_e[rs], c_t[rs], None if c_s is None else c_s[rs])
        return grad, *([None] * 9)


def _rows(M, log_s, h, sums, t, n_vocab, eps, ignore_index, z_loss, want_entropy):
    """Per-row (loss, coded lse, entropy) from the merged statistics (Chapter 5's loss)."""
    loss, lse, ent = loss_from_statistics(M, log_s, h if want_entropy else None, sums[..., 0], sums[..., 1], t,
                                          n_vocab, eps, ignore_index, z_loss)
    return loss, lse, ent if want_entropy else loss.new_empty(0)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, dim: int = -1, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                  return_entropy: bool = False, *, group=None, vocab_start: Optional[int] = None,
                  vocab_size: Optional[int] = None, backend: str = "auto"):
    """Softmax cross-entropy over a vocabulary split across the ranks of ``group``.

    Each rank passes its contiguous slice of the logits (classes [start, start + V_local), by
    default start = rank * V_local: see ``vocab_shard``) and the same class-index targets, global
    indices in [0, V).  Returns, on every rank, what ``entmath.cross_entropy`` returns for the
    gathered logits, with the same options and documented values; the gradient reaches each
    rank's slice.

    Args:
        logits: this rank's slice of the logits (floating point), classes along ``dim``.
        target: class indices into the whole vocabulary (integer dtype, the shape of ``logits``
            without ``dim``), the same on every rank.  Probability targets are not supported.
        dim, label_smoothing, ignore_index, reduction, z_loss, return_entropy: as in
            ``entmath.cross_entropy``.
        group: the process group (default: the world).
        vocab_start, vocab_size: this rank's first class and the whole vocabulary's size, for
            slices of unequal sizes (give both, or neither).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the local statistics.

    Returns:
        The loss, or ``(loss, entropy)``; identical on every rank; differentiable once.

    Raises:
        TypeError, ValueError: as ``entmath.cross_entropy``, on every rank alike; also a slice
            that does not fit in [0, vocab_size).  RuntimeError: no initialised process group.
    """
    check_float_tensor(logits, "logits")
    dim = normalize_dim(logits, dim, "logits")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                          torch.uint8):
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    z = logits.movedim(dim, -1)
    lead = z.shape[:-1]
    if target.shape != lead:
        raise ValueError(f"target holds class indices, so its shape must be logits' shape without dim={dim}, "
                         f"{tuple(lead)}; got {tuple(target.shape)}")
    eps, z_loss, _ = check_options(label_smoothing, z_loss, 1.0, reduction, ignore_index)
    start, n_vocab = vocab_shard(z.shape[-1], group, vocab_start, vocab_size)
    t1d = target.reshape(-1).long()
    check_targets(t1d, n_vocab, ignore_index)
    backend = resolve_backend(backend, logits)
    loss, lse, ent = _DistCrossEntropy.apply(rows_2d(z), t1d, start, n_vocab, eps, ignore_index, z_loss,
                                             bool(return_entropy), group, backend)
    check_rows_finite(lse, "logits (of some rank)", rows=t1d != ignore_index)
    return reduce_rows(loss, ent, lse, t1d, lead, ignore_index, reduction, output_dtype(logits), bool(return_entropy))


# ---- KL divergence --------------------------------------------------------------------------
class _DistKL(torch.autograd.Function):
    @staticmethod
    def forward(a, b, group, backend):
        kl_k, lse_a_k, lse_b_k = _KL.forward(a, b, backend)  # each slice renormalised on its own
        return combine_kl(kl_k, lse_a_k, lse_b_k, *_reducers(group))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], inputs[1], *output)

    @staticmethod
    def backward(ctx, g, g_lse_a, g_lse_b):
        _first_order_only()
        a, b, kl, lse_a, lse_b = ctx.saved_tensors
        ga, gb = kl_vjp(a, b, kl, lse_a, lse_b, g, g_lse_a, g_lse_b)  # local, with the global KL and lse's
        return ga, gb, None, None


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, dim: int = -1, *, group=None,
       backend: str = "auto") -> torch.Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) over a vocabulary split across ranks.

    Each rank passes its slices of both logits (the same classes for p and q).  Per rank, the
    local op gives the divergence of the two slices renormalised on their own; the grouping rule
    of relative entropy (eq-lh-kl-group) combines them with the slices' masses.

    Returns:
        As ``entmath.kl`` of the gathered logits (``+inf`` where p has mass that q lacks),
        identical on every rank, differentiable once.

    Raises:
        TypeError, ValueError: as ``entmath.kl``, on every rank alike.  RuntimeError: no
            initialised process group.
    """
    check_float_tensor(p_logits, "p_logits")
    check_float_tensor(q_logits, "q_logits")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits and q_logits must have the same shape, got {tuple(p_logits.shape)} "
                         f"and {tuple(q_logits.shape)}")
    dim = normalize_dim(p_logits, dim, "p_logits")
    _group_size(group)
    backend = resolve_backend(backend, p_logits, q_logits)
    a, b = p_logits, q_logits
    if a.dtype != b.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    kl_, lse_a, lse_b = _DistKL.apply(rows_2d(a), rows_2d(b), group, backend)
    check_rows_finite(lse_a, "p_logits (of some rank)")
    check_rows_finite(lse_b, "q_logits (of some rank)")
    kl_ = torch.where(torch.isfinite(lse_a) & torch.isfinite(lse_b), kl_, float("nan"))
    return kl_.view(a.shape[:-1]).to(output_dtype(a))


# ---- the linear head ------------------------------------------------------------------------
class _DistLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(h2d, w, b, t, start, n_vocab, eps, ignore_index, z_loss, inv_t, want_entropy, group, backend):
        t_rel = t - start
        if backend == "triton":
            m, r, a, z_t, gap = torch.ops.entmath.linear_softmax_summary_triton(h2d, w, b, t_rel, inv_t, eps > 0)
        else:
            m, r, a, z_t, gap = linear_summary_torch(h2d, w, b, t_rel, inv_t, eps > 0, want_entropy)
        M, log_s, h, sums = _merged(m, r, a, [z_t], group, gap=(gap, w.shape[0]))
        return _rows(M, log_s, h, sums, t, n_vocab, eps, ignore_index, z_loss, want_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h2d, w, b, t, start, n_vocab, eps, ignore_index, z_loss, inv_t, want_entropy, group, backend = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h2d, w, b, t, output[1], output[2])
        ctx.options = (start, n_vocab, eps, ignore_index, z_loss, inv_t, group, backend)

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_ent):
        _first_order_only()
        h2d, w, b, t, lse, ent = ctx.saved_tensors
        start, n_vocab, eps, ignore_index, z_loss, inv_t, group, backend = ctx.options
        g_ent = g_ent if ent.numel() else None
        need = tuple(ctx.needs_input_grad[:3])
        coefs = row_coefficients(t, lse, n_vocab, eps, ignore_index, z_loss, inv_t, g_loss, g_lse, g_ent)
        with no_autocast(h2d):
            if backend == "triton":
                dh, dw, db = torch.ops.entmath.linear_cross_entropy_backward_triton(
                    h2d, w, b, t - start, lse, ent, *coefs, inv_t, *need)
                dh, dw, db = (g if n else None for g, n in zip((dh, dw, db), need))
            else:
                dh, dw, db = linear_cross_entropy_vjp(h2d, w, b, t - start, lse, ent, inv_t, coefs, need)
        if dh is not None:  # every rank holds h whole; its gradient is the sum of the ranks' parts
            dh = dh.contiguous()
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        return (None if dh is None else dh.to(h2d.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None or b is None else db.to(b.dtype), *([None] * 10))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, temperature: float = 1.0,
                         return_entropy: bool = False, group=None, vocab_start: Optional[int] = None,
                         vocab_size: Optional[int] = None, backend: str = "auto"):
    """``entmath.linear_cross_entropy`` with the output layer split by vocabulary across ranks.

    Every rank holds the hidden states whole and the same targets, and its own rows of the output
    weight (and of the bias): the classes [start, start + V_local), by default
    start = rank * V_local (``vocab_shard``), as Megatron's column-parallel output layer.  No rank
    forms its logits either: the local statistics come tile by tile as in the single-device op.

    Returns, on every rank, the loss (and entropy) of the whole vocabulary.  Backward: each rank
    gets the gradient of its weight and bias slices, and the gradient of ``hidden`` summed over
    the ranks (one all-reduce of N x d numbers, the only communication of the backward).

    Args and Raises: as ``entmath.linear_cross_entropy``, plus ``group``, ``vocab_start`` and
    ``vocab_size`` as in ``cross_entropy`` above; NaN or inf in any rank's inputs is reported by
    every rank (through the reduced statistics, after the collectives).
    """
    t1d = check_linear_head(hidden, weight, bias, target)
    eps, z_loss, inv_t = check_options(label_smoothing, z_loss, temperature, reduction, ignore_index)
    start, n_vocab = vocab_shard(weight.shape[0], group, vocab_start, vocab_size)
    check_targets(t1d, n_vocab, ignore_index)
    backend = resolve_backend(backend, hidden, weight)
    lead = hidden.shape[:-1]
    with no_autocast(hidden):
        h2d = hidden.reshape(math.prod(lead), hidden.shape[-1])
        loss, lse, ent = _DistLinearCrossEntropy.apply(h2d, weight, bias, t1d, start, n_vocab, eps, ignore_index,
                                                       z_loss, inv_t, bool(return_entropy), group, backend)
    check_rows_finite(lse, "the logits (hidden @ weight.T + bias) / temperature (of some rank)",
                      rows=t1d != ignore_index)
    out_dtype = output_dtype(hidden.new_empty(0, dtype=torch.promote_types(hidden.dtype, weight.dtype)))
    return reduce_rows(loss, ent, lse, t1d, lead, ignore_index, reduction, out_dtype, bool(return_entropy))
