"""Entropy-invariant ("log n") attention.  Derived in Chapter 3 (book/ch03_logn_attention.md).

A query that attends over n keys uses the logit scale

    lambda(n) = kappa * log(n) / d,   kappa = sqrt(d) / log(n0)   (the default calibration),

so that lambda(n0) = 1/sqrt(d) (or SDPA's ``scale`` when one is given: kappa = scale d / log(n0)):
at the training length n0 the op *is* standard scaled dot-product attention, and at other lengths the scale grows like log n, which keeps the attention entropy from
growing with n when a few keys stand out (Chapter 3 says when that holds and when it does not).

Each query has its own n.  Without causal masking n is the number of keys S.  With causal masking
query i (0-based) sees keys 0 .. i + offset, so n_i = i + 1 + offset, where ``offset`` is the
number of keys already in a KV cache before the first query.

The op multiplies query i by lambda(n_i) and calls ``torch.nn.functional.scaled_dot_product_attention``
with ``scale=1.0``:  softmax(lambda_i q_i . k_j) = softmax((lambda_i q_i) . k_j), so the whole cost
over SDPA is one (L x d) elementwise multiply, and SDPA keeps its fused kernels (flash,
memory-efficient) and their backward.  The only new operation is a per-row scaling, whose backward
(dq_i = lambda_i * d(lambda_i q_i)) autograd applies exactly; there is no new math to derive for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validate import check_float_tensor, value_checks_active
from ._rows import autocast_on

__all__ = ["logn_scale", "logn_attention", "query_lengths"]


def _check_int(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def _check_kappa(kappa) -> float | None:
    if kappa is None:
        return None
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise TypeError(f"kappa must be a float or None, got {type(kappa).__name__}")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be finite and > 0, got {kappa}")
    return float(kappa)


def logn_scale(n, d: int, train_length: int, *, kappa: float | None = None,
               clamp_min_to_train_length: bool = False, dtype: torch.dtype = torch.float32,
               device=None) -> torch.Tensor:
    """The entropy-invariant logit scale ``kappa * log(n) / d`` (Chapter 3, eq-ln-calib).

    Args:
        n: number of keys a query attends over: an int, a sequence of ints or an integer/float
            tensor, every entry >= 1.
        d: the query/key dimension (head size), >= 1.
        train_length: the calibration length n0 >= 2.  With the default ``kappa`` the scale is
            ``log(n) / (log(n0) * sqrt(d))``, equal to ``1/sqrt(d)`` at ``n = n0``.
        kappa: overrides the calibration ``kappa = sqrt(d) / log(n0)``; must be finite and > 0.
        clamp_min_to_train_length: use ``max(n, train_length)`` in place of ``n``, so that queries
            with at most ``train_length`` keys keep the standard ``1/sqrt(d)`` (with the default
            kappa) and only longer contexts are sharpened.  This is what Qwen's ``use_logn_attn``
            does (Chapter 3, "What deployed models do").
        dtype, device: of the returned tensor (a float dtype).

    Returns:
        A tensor of the shape of ``n`` (0-dimensional for an int).

    Raises:
        TypeError: ``d``/``train_length`` not ints, ``kappa`` not a number, ``n`` not numeric, or
            ``dtype`` not a floating-point dtype.
        ValueError: ``d < 1``, ``train_length < 2``, ``kappa`` not finite and positive, or some
            ``n < 1`` (or NaN).

    Examples:
        >>> entmath.logn_scale(512, d=64, train_length=512)  # 1/sqrt(d) at the training length
        tensor(0.1250)
        >>> entmath.logn_scale([512, 4096], d=64, train_length=512)  # grows with log n beyond it
        tensor([0.1250, 0.1667])
    """
    _check_int(d, "d", 1)
    _check_int(train_length, "train_length", 2)  # log(1) = 0 cannot calibrate anything
    kappa = _check_kappa(kappa)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    if isinstance(n, torch.Tensor):
        if n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"n must hold integers or floats, got {n.dtype}")
        check = value_checks_active(n)  # a device tensor: its values are read only when checks are on
        nt = n.to(device=device if device is not None else n.device, dtype=torch.float64)
    else:
        try:
            nt = torch.as_tensor(n, dtype=torch.float64)  # checked on the host, then moved
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"n must be an int, a sequence of ints or a tensor, got {type(n).__name__}") from err
        check = True
    if check and nt.numel() and not bool((nt >= 1).all()):  # also catches NaN
        raise ValueError(f"n must be >= 1 everywhere (a query attends over at least one key), got min {nt.min().item()}")
    return _scale_of(nt.to(device) if device is not None else nt, d, train_length, kappa, clamp_min_to_train_length,
                     dtype)


def _scale_of(nt, d, train_length, kappa, clamp_min_to_train_length, dtype, base=None):
    """kappa log(n) / d for key counts nt (float64) that are known to be >= 1: no checks.
    ``base`` (SDPA's ``scale``) replaces 1/sqrt(d) as the scale at n = train_length."""
    if clamp_min_to_train_length:
        nt = nt.clamp_min(train_length)
    if kappa is None:
        # kappa log(n0) / d = base  =>  scale = base log(n) / log(n0) = base log_{n0}(n),
        # with SDPA's default base = 1/sqrt(d).
        out = torch.log(nt) * ((1 / math.sqrt(d) if base is None else base) / math.log(train_length))
    else:
        out = kappa * torch.log(nt) / d
    return out.to(dtype)


def check_base_scale(scale, kappa) -> float | None:
    """SDPA's ``scale`` argument (a finite number > 0, or None); exclusive with ``kappa``."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if kappa is not None:
        raise ValueError("give scale or kappa, not both: each fixes the scale at the training length "
                         "(scale = kappa log(train_length) / d)")
    return float(scale)


def query_lengths(L: int, S: int, *, is_causal: bool = False, offset: int = 0, device=None) -> torch.Tensor:
    """How many keys each of ``L`` queries attends over (int64 tensor of shape (L,)), Chapter 3.

    Without causal masking every query sees all ``S`` keys.  With causal masking query i sees
    keys 0 .. i + offset, i.e. ``i + 1 + offset`` of them (``offset`` = length of a KV cache).
    ``logn_scale(query_lengths(L, S, ...), d, train_length)`` is the per-query scale that
    ``logn_attention`` uses (``attention_entropy(..., train_length=...)`` builds it itself).

    Raises:
        TypeError: ``L``, ``S`` or ``offset`` not ints, ``is_causal`` not a bool.
        ValueError: ``L < 0``, ``S < 1``, ``offset < 0``, ``offset`` without ``is_causal``, or
            ``offset + L > S``.

    Examples:
        >>> entmath.query_lengths(4, 4, is_causal=True)
        tensor([1, 2, 3, 4])
        >>> entmath.query_lengths(2, 6, is_causal=True, offset=4)  # two new queries, 4 cached keys
        tensor([5, 6])
    """
    _check_int(L, "L", 0)
    _check_int(S, "S", 1)
    check_causal_offset(L, S, is_causal, offset)
    if is_causal:
        return torch.arange(1 + offset, L + 1 + offset, device=device)
    return torch.full((L,), S, device=device, dtype=torch.int64)


def _check_qkv(q, k, v, enable_gqa=False):
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_float_tensor(t, name)
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, features), got {tuple(t.shape)}")
    if (k.dtype != q.dtype or v.dtype != q.dtype) and not autocast_on(q):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the feature size of q ({q.shape[-1]}), got {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("q has an empty feature dimension: the head size d must be >= 1")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k ({k.shape[-2]} keys), got {v.shape[-2]}")
    if v.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"k and v must share their leading (batch, head) shape, got "
                         f"{tuple(k.shape[:-2])}, {tuple(v.shape[:-2])}")
    if enable_gqa and q.shape[:-2] != k.shape[:-2]:
        # Grouped-query attention, as SDPA defines it: (..., Hq, L, d) queries over (..., Hkv, S, d)
        # keys, Hq a multiple of Hkv, each key head shared by Hq / Hkv consecutive query heads.
        if q.dim() < 3 or k.dim() != q.dim() or q.shape[:-3] != k.shape[:-3]:
            raise ValueError(f"with enable_gqa, q (..., Hq, L, d) and k, v (..., Hkv, S, d) must share the "
                             f"dimensions before the heads, got {tuple(q.shape)} and {tuple(k.shape)}")
        if k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
            raise ValueError(f"with enable_gqa the number of query heads ({q.shape[-3]}) must be a multiple of "
                             f"the number of key/value heads ({k.shape[-3]})")
    elif k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"q, k and v must share their leading (batch, head) shape, got "
                         f"{tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, {tuple(v.shape[:-2])}"
                         + (" (grouped-query heads: pass enable_gqa=True)" if q.dim() >= 3 and k.dim() == q.dim()
                            and q.shape[:-3] == k.shape[:-3] else ""))
    if k.shape[-2] == 0:
        raise ValueError("k has no keys (length 0): attention needs at least one key")


def check_causal_offset(L: int, S: int, is_causal, offset) -> int:
    """Validate ``is_causal``/``offset`` for L queries over S keys (shared with attention_entropy)."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    _check_int(offset, "offset", 0)
    if not is_causal and offset != 0:
        raise ValueError(f"offset={offset} only applies with is_causal=True (it is the KV-cache length)")
    if is_causal and offset + L > S:
        raise ValueError(f"offset={offset} with {L} queries needs at least offset + L = {offset + L} keys, "
                         f"got {S}: query i sees keys 0 .. i + offset")
    return offset


# SDPA shares key/value heads among query heads itself from torch 2.5 (enable_gqa).
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:  # also refuses NaN
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def check_attn_mask(attn_mask, q: torch.Tensor, L: int, S: int):
    """SDPA's rules for ``attn_mask``: boolean (True = attend) or floating point (added to the
    logits, cast to q's dtype), and broadcastable *to* the attention weights (..., L, S): it may
    have fewer or size-1 dimensions, but no dimension larger than the weights' (a mask for a
    larger batch broadcasts *with* the weights but not to them, and fails inside SDPA)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be boolean or floating point, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on the device of q ({q.device}), got {attn_mask.device}")
    weights = tuple(q.shape[:-2]) + (L, S)
    try:
        fits = torch.broadcast_shapes(attn_mask.shape, weights) == weights
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention "
                         f"weights {weights} (..., L, S)")
    if attn_mask.dim() < 2:  # SDPA indexes the mask's last two dims: (S,) -> (1, S), () -> (1, 1)
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))
    return attn_mask.to(q.dtype) if attn_mask.is_floating_point() else attn_mask


def logn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                   enable_gqa: bool = False, train_length: int, offset: int = 0, kappa: float | None = None,
                   clamp_min_to_train_length: bool = False) -> torch.Tensor:
    """Entropy-invariant attention: ``softmax(lambda(n_i) q_i k^T) v`` row by row (Chapter 3).

    A drop-in for ``torch.nn.functional.scaled_dot_product_attention``: the same arguments, in
    the same places (``scale`` and ``enable_gqa`` keyword-only, as there) with the same meaning,
    plus the calibration length ``train_length``.  Query i,
    which sees ``n_i`` keys, gets the logit scale ``lambda(n_i) = scale * log(n_i) / log(train_length)``
    (``scale`` defaults to SDPA's ``1/sqrt(d)``, ``d = q.shape[-1]``), so a query over
    ``train_length`` keys gets exactly SDPA's scale, and at ``n_i = train_length`` everywhere the
    op *is* SDPA.  ``n_i`` is the number of keys query i sees: ``S`` without ``is_causal``;
    ``i + 1 + offset`` with it.

    Args:
        q: (..., L, d) queries; k: (..., S, d) keys; v: (..., S, e) values; one float dtype (or
            the mixed dtypes of autocast), one device, equal leading shapes (or grouped-query
            heads with ``enable_gqa``).
        attn_mask: optional boolean (True = attend) or additive float mask that broadcasts to
            the attention weights (..., L, S), as in SDPA; combined with the causal mask when
            both are given (SDPA refuses that pair; here both apply).  It does not change
            ``n_i``: n counts the keys the position structure allows, not the mask.  A query
            whose keys are all masked gets the output SDPA gives such rows (zeros in torch >=
            2.5); the other rows are unaffected.
        dropout_p: dropout probability on the attention weights, in [0, 1], as in SDPA: applied
            whenever it is > 0 (pass 0 in evaluation; ``entmath.nn.LogNAttention`` does).
        is_causal: query i sees keys ``0 .. i + offset`` only.  With ``offset = 0`` this is SDPA's
            own (top-left) causal mask; with ``offset = S - L`` it is the usual KV-cache
            (bottom-right) alignment, built as an L x (offset + L) boolean mask.  Keys after
            ``offset + L - 1`` are seen by no query and are not read.
        scale: SDPA's scale, here the scale at ``n = train_length``: a finite float > 0 or None
            (``1/sqrt(d)``).  Exclusive with ``kappa``.
        enable_gqa: grouped-query attention as in SDPA: q (..., Hq, L, d) over k, v
            (..., Hkv, S, d) with Hq a multiple of Hkv; query head h uses key/value head
            ``h // (Hq / Hkv)``.  k and v are not expanded in memory where SDPA supports it
            (torch >= 2.5).
        train_length: the calibration length n0 >= 2 (see ``logn_scale``).
        offset: KV-cache length, >= 0, only with ``is_causal``; ``offset + L <= S``.
        kappa, clamp_min_to_train_length: see ``logn_scale`` (``kappa`` fixes
            ``lambda(n) = kappa log(n) / d``).

    Returns:
        (..., L, e) tensor in the dtype of ``q``.  Differentiable in q, k and v through SDPA.
        Values are not inspected (that would cost a device sync per call): NaN or inf in q, k
        or v propagate to the output exactly as they do through SDPA.

    Raises:
        TypeError: non-float or mismatched dtypes, non-bool ``is_causal``/``enable_gqa``, non-int
            ``offset``/``train_length``, non-number ``scale``/``dropout_p``/``kappa``, a mask
            that is neither boolean nor floating point.
        ValueError: shape mismatches (including query heads that are not a multiple of the
            key/value heads), no keys, empty head dimension, ``offset`` without ``is_causal`` or
            ``offset + L > S``, a mask that does not broadcast to the attention weights (...,
            L, S) (for instance one with a larger batch) or sits on another device,
            ``dropout_p`` outside [0, 1], ``scale`` not finite and > 0 or given with ``kappa``,
            bad ``train_length``/``kappa``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))  # (B, heads, L, d)
        >>> out = entmath.logn_attention(q, k, v, is_causal=True, train_length=8)
        >>> out.shape
        torch.Size([1, 2, 16, 8])
    """
    _check_qkv(q, k, v, enable_gqa)
    L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    offset = check_causal_offset(L, S, is_causal, offset)
    _check_int(train_length, "train_length", 2)
    kappa = _check_kappa(kappa)
    base = check_base_scale(scale, kappa)
    dropout_p = _check_dropout(dropout_p)
    attn_mask = check_attn_mask(attn_mask, q, L, S)
    if not isinstance(clamp_min_to_train_length, bool):
        raise TypeError(f"clamp_min_to_train_length must be a bool, got {type(clamp_min_to_train_length).__name__}")
    # The key counts are built here (>= 1 by construction): no value check, no device sync.
    lengths = query_lengths(L, S, is_causal=is_causal, offset=offset, device=q.device).to(torch.float64)
    lam = _scale_of(lengths, d, train_length, kappa, clamp_min_to_train_length,
                    torch.float64 if q.dtype == torch.float64 else torch.float32, base)
    # The one extra operation: fold each query's own scale into the query (fp32 for half types).
    qs = (q.to(lam.dtype) * lam[:, None]).to(q.dtype)
    gqa = {}
    if q.shape[:-2] != k.shape[:-2]:  # grouped-query heads (checked above)
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            group = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)

    def sdpa(kk, vv, mask=None, causal=False):
        return F.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                              scale=1.0, **gqa)

    if not is_causal:
        return sdpa(k, v, attn_mask)
    # Keys after offset + L - 1 are seen by no query: drop them, then the causal horizon
    # j <= i + offset is the bottom-right alignment for S' = offset + L keys.
    s_used = offset + L
    k, v = k[..., :s_used, :], v[..., :s_used, :]
    if attn_mask is None and offset == 0:  # top-left == bottom-right when S' = L: SDPA's fused path
        return sdpa(k, v, causal=True)
    # Otherwise an L x S' boolean mask (one byte per pair; for decoding, L is 1).
    causal = torch.ones(L, s_used, dtype=torch.bool, device=q.device).tril(offset)  # j <= i + offset
    if attn_mask is None:
        return sdpa(k, v, causal)
    mask = attn_mask[..., :s_used] if attn_mask.shape[-1] != 1 else attn_mask
    if mask.dtype == torch.bool:
        mask = mask & causal
    else:
        mask = mask.masked_fill(~causal, float("-inf"))
    return sdpa(k, v, mask)
