"""Entropy of every attention row, without the L x S matrix.  Chapter 3 (book/ch03_logn_attention.md).

For queries q_i, keys k_j and per-query scales lambda_i the rows are p_i = softmax_j(z_ij) with
z_ij = lambda_i q_i . k_j, and the op returns H_i = -sum_j p_ij log p_ij for every query.

Forward (online, flash-style).  The keys are read in chunks; per query we keep, relative to the
running maximum m of the logits seen so far,

    S = sum_j e^{z_ij - m} = 1 + R   (the maximal entry contributes exactly 1),
    A = sum_j e^{z_ij - m} (z_ij - m),

so that H = log S - A / S = log1p(R) - A / (1 + R) (Chapter 1's accurate form).  Two summaries
(m1, R1, A1), (m2, R2, A2) of disjoint key sets merge exactly: with m = max(m1, m2) and
delta_t = m_t - m <= 0, each S_t is rescaled by e^{delta_t} and each A_t becomes
e^{delta_t} (A_t + delta_t S_t)  (eq-ln-rescale).  The torch path merges one key chunk at a time
and holds O(L * chunk) logits at once; the Triton kernel (entmath/kernels/triton/attention_entropy.py)
does the same per (query block x key block) tile with ``softmax_stats.update_stats``.

Backward (derived, recomputed in chunks).  Chapter 1 gives dH/dz = -p (log p + H); since
log p_ij = z_ij - lse_i and lse_i - H_i = sum_j p_ij z_ij this is g_ij = -p_ij (z_ij - zbar_i),
zbar_i = sum_j p_ij z_ij  (eq-ln-grad).  With z_ij = lambda_i q_i . k_j:

    dH_i/dq_i = lambda_i sum_j g_ij k_j,   dH_i/dk_j = g_ij lambda_i q_i,
    dH_i/dlambda_i = sum_j g_ij (q_i . k_j) = q_i . (sum_j g_ij k_j).

Only (H, lse) per query are saved; p is recomputed chunk by chunk from them, so the backward is
O(L * chunk) in memory as well.  Both backends use this torch backward.
"""
from __future__ import annotations

import math

import torch

from .._backend import resolve_backend
from .._validate import check_float_tensor, compute_dtype, value_checks_active
from ._library import register_row_vmap, triton_kernel_op
from ._rows import kernels, no_autocast, output_dtype
from ._stats import chunk_summary as _chunk_summary
from ._stats import merge_summaries as _merge
from .entropy import entropy_vjp
from .logn_attention import _check_int, _check_kappa, _scale_of, check_causal_offset, query_lengths

__all__ = ["attention_entropy"]

DEFAULT_CHUNK = 512  # keys per chunk at least; more when there are few queries (see _chunk_size)
CHUNK_LOGITS = 1 << 22  # a chunk of logits may hold this many entries (16 MiB in fp32)


def _chunk_size(chunk_size, rows: int) -> int:
    """Keys per chunk: the user's choice, or DEFAULT_CHUNK widened while a chunk of logits holds
    at most CHUNK_LOGITS entries.  Every chunk costs a handful of elementwise passes, each with
    fixed overhead, so few queries call for wide chunks; the peak stays O(rows * chunk)."""
    if chunk_size is not None:
        return chunk_size
    return max(DEFAULT_CHUNK, CHUNK_LOGITS // max(rows, 1))


def _chunks(L: int, S: int, is_causal: bool, offset: int, chunk: int):
    """Key chunks [start, end) and the first query row r0 that sees any key of the chunk.

    Under causal masking query i sees keys <= i + offset, so rows below start - offset skip the
    chunk entirely (about half the work), and every row that takes part sees key ``start``:
    no row of a chunk is ever all -inf.
    """
    hi = min(S, L + offset) if is_causal else S
    for start in range(0, hi, chunk):
        end = min(start + chunk, hi)
        yield start, end, (max(0, start - offset) if is_causal else 0)


def _logits(qs, k3, start, end, r0, is_causal, offset):
    z = qs[:, r0:] @ k3[:, start:end].transpose(1, 2)  # (BH, L - r0, end - start)
    if is_causal and end - 1 > r0 + offset:  # some key of the chunk lies past some row's horizon
        i = torch.arange(r0, qs.shape[1], device=z.device)[:, None]
        j = torch.arange(start, end, device=z.device)[None, :]
        z.masked_fill_(j > i + offset, float("-inf"))
    return z


def attention_entropy_torch(q3, k3, scale2, is_causal, offset, chunk):
    """Chunked reference forward.  q3 (BH, L, D), k3 (BH, S, D), scale2 (BH, L), all in the
    accumulation dtype.  Returns (H, lse), each (BH, L)."""
    L, S = q3.shape[1], k3.shape[1]
    qs = q3 * scale2[..., None]  # fold lambda_i into q_i once: O(L d)
    run = None
    for start, end, r0 in _chunks(L, S, is_causal, offset, chunk):
        z = _logits(qs, k3, start, end, r0, is_causal, offset)
        new = _chunk_summary(z, masked=is_causal and end - 1 > r0 + offset)
        del z
        if run is None:  # the first chunk starts at key 0, which every row sees
            run = new
        else:
            m, r, a = run
            m[:, r0:], r[:, r0:], a[:, r0:] = _merge((m[:, r0:], r[:, r0:], a[:, r0:]), new)
    if run is None:  # no queries (L = 0) under causal masking: no chunk was read
        empty = q3.new_empty(q3.shape[:2])
        return empty, empty
    m, r, a = run
    log_s = torch.log1p(r)
    return log_s - a / (1 + r), m + log_s


def attention_entropy_vjp(q3, k3, scale2, h, lse, grad_h, grad_lse, is_causal, offset, chunk):
    """Gradients (dq, dk, dlambda) by recomputing p chunk by chunk from (H, lse); torch ops, so
    differentiable again.  ``grad_h``/``grad_lse`` (BH, L) or None (dlse/dz = p)."""
    qs = q3 * scale2[..., None]
    G = torch.zeros_like(q3)  # sum_j g_ij k_j
    dk = torch.zeros_like(k3)
    L, S = q3.shape[1], k3.shape[1]
    for start, end, r0 in _chunks(L, S, is_causal, offset, chunk):
        z = _logits(qs, k3, start, end, r0, is_causal, offset)
        # Chapter 1's entropy backward: g = -grad_h p (log p + H) (+ grad_lse p); masked keys get 0.
        g = entropy_vjp(z, h[:, r0:], lse[:, r0:], None if grad_h is None else grad_h[:, r0:],
                        None if grad_lse is None else grad_lse[:, r0:])
        G = G.index_add(1, torch.arange(r0, L, device=G.device), g @ k3[:, start:end])
        dk = dk.index_add(1, torch.arange(start, end, device=dk.device), g.transpose(1, 2) @ qs[:, r0:])
    return scale2[..., None] * G, dk, (G * q3).sum(-1)


def _norm(x: torch.Tensor, acc) -> torch.Tensor:
    """Euclidean norms of the rows of x, scaled by each row's largest entry so that the squares
    do not overflow (a plain norm of a float32 row with an entry of 1e20 is inf, and a query whose
    logits are far inside the range was refused)."""
    x = x.to(acc)
    top = x.abs().amax(-1, keepdim=True)
    top = torch.where(top > 0, top, 1.0)
    return torch.linalg.vector_norm(x / top, dim=-1) * top.squeeze(-1)


def _check_values(q, k, scale, acc):
    """NaN/inf in q or k, or logits that could overflow, raise before any O(L S) work.

    Both passes are O((L + S) d).  Overflow is ruled out by Cauchy-Schwarz,
    |scale_i q_i . k_j| <= |scale_i| |q_i| |k_j|: the check is conservative (by at most the
    factor the inequality loses; the norms themselves are scaled, so never overflow).  A no-op unless value checks are active.
    """
    if not value_checks_active(q, k, scale):
        return
    for t, name in ((q, "q"), (k, "k")):
        if t.numel() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ValueError(f"{name} contains {what}; the attention logits are undefined")
    if q.numel() == 0 or k.numel() == 0:
        return
    big = torch.finfo(acc).max
    q_norm = (_norm(q, acc) * scale.to(acc).abs()).amax()
    k_norm = _norm(k, acc).amax()
    if not bool(q_norm * k_norm < big):
        raise ValueError(f"the logits scale * q . k may overflow {acc}: max |scale q_i| * max |k_j| = "
                         f"{(q_norm * k_norm).item():.3g} exceeds {big:.3g}; rescale q or k")


# ---- the Triton path, registered as operators (see _library.py) -----------------------------
@triton_kernel_op("attention_entropy_triton")
def attention_entropy_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, is_causal: bool,
                             offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, lse), each (BH, L), of q (BH, L, D) against k (BH, S, D) with per-query scales (BH, L)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # The interpreter pays per step, not per element: bigger tiles on CPU.
    blocks = {} if q.is_cuda else {"block_m": 256, "block_n": 256}
    return kernels("attention_entropy").attention_entropy_fwd(q, k, scale.contiguous(), is_causal, offset, **blocks)


@attention_entropy_triton.register_fake
def _(q, k, scale, is_causal, offset):
    h = q.new_empty(q.shape[:2], dtype=scale.dtype)
    return h, torch.empty_like(h)


def _setup(ctx, inputs, output):
    q, k, scale, is_causal, offset = inputs[:5]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, scale, *output)
    ctx.cfg = (is_causal, offset, inputs[5] if len(inputs) > 5 else DEFAULT_CHUNK)


def _backward(ctx, grad_h, grad_lse):
    """The one backward of both backends (Chapter 3, eq-ln-grad), in the accumulation dtype."""
    q, k, scale, h, lse = ctx.saved_tensors
    with no_autocast(q):
        acc = h.dtype
        dq, dk, dscale = attention_entropy_vjp(q.to(acc), k.to(acc), scale.to(acc), h, lse,
                                               None if grad_h is None else grad_h.to(acc),
                                               None if grad_lse is None else grad_lse.to(acc), *ctx.cfg)
    return dq.to(q.dtype), dk.to(k.dtype), dscale.to(scale.dtype)


attention_entropy_triton.register_autograd(lambda ctx, gh, gl: (*_backward(ctx, gh, gl), None, None),
                                           setup_context=_setup)
register_row_vmap(attention_entropy_triton, (2, 2, 1, None, None))


class _AttentionEntropy(torch.autograd.Function):
    """(H, lse) per query of q3 (BH, L, D), k3 (BH, S, D), scales (BH, L), all in the
    accumulation dtype; the backward recomputes p in chunks (eq-ln-grad)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q3, k3, scale2, is_causal, offset, chunk, backend):
        if backend == "triton":
            return torch.ops.entmath.attention_entropy_triton(q3, k3, scale2, is_causal, offset)
        acc = scale2.dtype
        return attention_entropy_torch(q3.to(acc), k3.to(acc), scale2, is_causal, offset, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_h, grad_lse):
        return (*_backward(ctx, grad_h, grad_lse), None, None, None, None)


def _check_scale(scale, q: torch.Tensor) -> torch.Tensor:
    acc = compute_dtype(q)
    if scale is None:
        return torch.tensor(1.0 / math.sqrt(q.shape[-1]), dtype=acc, device=q.device)
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a float tensor, got {scale.dtype}")
        if scale.device != q.device:
            raise ValueError(f"scale must be on the device of q ({q.device}), got {scale.device}")
        try:
            torch.broadcast_shapes(scale.shape, q.shape[:-1])
        except RuntimeError as err:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to the query shape "
                             f"{tuple(q.shape[:-1])}") from err
        if len(torch.broadcast_shapes(scale.shape, q.shape[:-1])) != q.dim() - 1:
            raise ValueError(f"scale of shape {tuple(scale.shape)} has more dimensions than the queries "
                             f"{tuple(q.shape[:-1])}")
        if value_checks_active(scale) and not bool(torch.isfinite(scale).all()):
            raise ValueError("scale contains NaN or inf")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None, a float or a tensor, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return torch.tensor(float(scale), dtype=acc, device=q.device)


def _logn_scales(scale, scale_t, q, S, is_causal, offset, train_length, kappa, clamp):
    """Per-query scales of log-n attention, (L,) or broadcast with a tensor ``scale``: the base
    scale (SDPA's, at n = train_length) times log(n_i) / log(train_length), or kappa log(n_i) / d."""
    _check_int(train_length, "train_length", 2)
    kappa = _check_kappa(kappa)
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp_min_to_train_length must be a bool, got {type(clamp).__name__}")
    if kappa is not None and scale is not None:
        raise ValueError("give scale or kappa, not both: each fixes the scale at the training length "
                         "(scale = kappa log(train_length) / d)")
    L, d = q.shape[-2], q.shape[-1]
    lengths = query_lengths(L, S, is_causal=is_causal, offset=offset, device=q.device).to(torch.float64)
    if kappa is not None:
        return _scale_of(lengths, d, train_length, kappa, clamp, scale_t.dtype)
    # log_{n0}(n_i) times the base scale (1/sqrt(d) by default, as _check_scale returned it)
    return scale_t * _scale_of(lengths, d, train_length, None, clamp, scale_t.dtype, base=1.0)


def attention_entropy(q: torch.Tensor, k: torch.Tensor, *, scale=None, is_causal: bool = False, offset: int = 0,
                      train_length: int | None = None, kappa: float | None = None,
                      clamp_min_to_train_length: bool = False, chunk_size: int | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Entropy, in nats, of every attention row ``softmax_j(scale_i * dot(q_i, k_j))`` (Chapter 3).

    With ``train_length`` it is the entropy of the rows of ``entmath.logn_attention`` called with
    the same ``scale``, ``is_causal``, ``offset``, ``train_length``, ``kappa`` and
    ``clamp_min_to_train_length``: query i gets ``scale_i * log(n_i) / log(train_length)``, n_i
    the number of keys it sees.

    Never materialises the L x S attention matrix: the torch path reads the keys in chunks of
    ``chunk_size`` and keeps O(L * chunk_size) logits at a time (at most
    max(2**22, 512 * L * batch) entries with the default); the Triton path tiles
    (query block x key block) with ``tl.dot`` and keeps the tile on chip.  Both accumulate in
    fp32 (fp64 stays fp64) with the online max / sum / first-moment statistics of Chapter 1.

    Args:
        q: (..., L, d) queries; k: (..., S, d) keys (same dtype, device and leading shape).
        scale: ``None`` (``1/sqrt(d)``), a finite float, or a finite float tensor broadcastable
            to ``q.shape[:-1]`` giving each query its own scale.  A tensor scale that requires
            grad receives a gradient.  With ``train_length`` it is the scale at
            ``n = train_length`` (SDPA's scale, as for ``logn_attention``).
        is_causal: query i sees keys ``0 .. i + offset`` only.  Other masks are not supported
            (masking is by index, so no L x S mask is ever read); for an arbitrary mask, form the
            logits and call ``entmath.entropy``.
        offset: KV-cache length (>= 0, only with ``is_causal``; ``offset + L <= S``).
        train_length: ``None``, or the calibration length n0 >= 2 of log-n attention: the scales
            become ``scale * log(n_i) / log(n0)`` (see ``logn_attention``).
        kappa, clamp_min_to_train_length: as for ``logn_attention``, only with ``train_length``
            (``kappa`` is exclusive with ``scale``).
        chunk_size: keys per chunk of the torch path (>= 1).  ``None``: at least 512, widened
            while one chunk of logits (all queries x chunk keys) stays within 2**22 entries.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``entmath._backend``).

    Accuracy (tests/test_extremes.py, both backends, fp32/fp64/bf16, against mpmath on the
    exact logits of the given q, k and scale, with query offsets up to 1e30 and the dtype's max
    / 64, spreads from 1e-20 to 30): each query's entropy is within the bound of
    ``entmath.entropy`` on its logits, plus H (e^{2 delta} - 1) for the rounding of the logits,
    delta = (d + 3) u abs(scale_i) max_j sum_k abs(q_ik k_jk) (u the unit roundoff of the accumulation
    dtype): the entropy moves by at most 2 H max_j abs(dz_j) when its logits move by dz.  Never NaN
    for finite inputs.

    Returns:
        (..., L) tensor in the dtype of ``q``.  Differentiable in q, k and a tensor ``scale``:
        the backward (shared by both backends) recomputes p in chunks from the saved
        per-query (H, log-normaliser), so it needs O(L * chunk_size) memory too.

    Raises:
        TypeError: q or k not a float tensor, dtype mismatch, bad ``scale``/``is_causal``/
            ``offset``/``chunk_size`` types.
        ValueError: shape or device mismatch, no keys, empty head dimension, ``offset`` without
            ``is_causal`` or ``offset + L > S``, non-finite ``scale``, ``train_length < 2``,
            ``kappa`` or ``clamp_min_to_train_length`` without ``train_length``, ``kappa`` with
            ``scale``, NaN/inf in q or k, or
            inputs whose logits could overflow the accumulation dtype (checked conservatively
            with ``abs(scale_i) * norm(q_i) * norm(k_j)`` >= the dtype's max).

    Examples:
        >>> q, k = torch.zeros(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
        >>> entmath.attention_entropy(q, k, is_causal=True)  # equal scores: log(i + 1) for query i
        tensor([[[0.0000, 0.6931, 1.0986, 1.3863]]])
    """
    for t, name in ((q, "q"), (k, "k")):
        check_float_tensor(t, name)
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, d), got {tuple(t.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on the device of q ({q.device}), got {k.device}")
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k must have the leading shape of q {tuple(q.shape[:-2])}, got {tuple(k.shape[:-2])}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the feature size of q ({q.shape[-1]}), got {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("q has an empty feature dimension: d must be >= 1")
    if k.shape[-2] == 0:
        raise ValueError("k has no keys (length 0): a softmax needs at least one key")
    offset = check_causal_offset(q.shape[-2], k.shape[-2], is_causal, offset)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale_t = _check_scale(scale, q)
    if train_length is not None:
        scale_t = _logn_scales(scale, scale_t, q, k.shape[-2], is_causal, offset, train_length, kappa,
                               clamp_min_to_train_length)
    elif kappa is not None or clamp_min_to_train_length is not False:
        raise ValueError("kappa and clamp_min_to_train_length apply to log-n attention: give train_length too")
    backend = resolve_backend(backend, q, k)
    acc = compute_dtype(q)
    _check_values(q, k, scale_t, acc)
    chunk = _chunk_size(chunk_size, math.prod(q.shape[:-1]))
    lead, (L, D), S = q.shape[:-2], q.shape[-2:], k.shape[-2]
    bh = math.prod(lead)  # not reshape(-1, ...): that is ambiguous for an empty batch
    # The kernel takes q and k in their own dtype: fp16/bf16 tiles go to the tensor cores as they
    # are (no upcast copy), with accumulation in acc.  The torch path works in acc.
    own = backend == "triton" and q.dtype == k.dtype
    with no_autocast(q):  # the logits stay in the accumulation dtype
        q3 = (q if own else q.to(acc)).reshape(bh, L, D)
        k3 = (k if own else k.to(acc)).reshape(bh, S, D)
        scale2 = scale_t.to(acc).expand(q.shape[:-1]).reshape(bh, L)
        h, lse = _AttentionEntropy.apply(q3, k3, scale2, is_causal, offset, chunk, backend)
    if value_checks_active(h) and h.numel() and not bool(torch.isfinite(h).all()):  # unreachable after _check_values
        raise ValueError("attention_entropy produced a non-finite entropy; please report the input")
    return h.reshape(lead + (L,)).to(output_dtype(q))
