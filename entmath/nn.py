"""entmath's ops as ``torch.nn`` modules, and a logits processor for Hugging Face ``generate``.

The modules hold an op's options (and its tensors, as buffers) so that they can be written into
``nn.Sequential``, a Lightning config or a model's ``__init__``, and they compile, export and move
between devices as torch's own modules do.  Each forwards to the function of the same name, which
checks the arguments (a bad option is reported at the first call) and is documented in its chapter:

* ``CrossEntropyLoss`` - ``entmath.cross_entropy`` (Chapters 1 and 5), in place of
  ``torch.nn.CrossEntropyLoss``;
* ``Entropy`` - ``entmath.entropy`` (Chapter 1);
* ``EntropyNormalize`` - ``entmath.entropy_normalize`` (Chapter 2);
* ``LogNAttention`` - ``entmath.logn_attention`` (Chapter 3), in place of a call to
  ``torch.nn.functional.scaled_dot_product_attention`` inside an attention block;
* ``EntropyTargetLogitsProcessor`` - entropy-targeted sampling (Chapter 2) inside
  ``transformers``' ``generate``, with its logits-processor convention ``(input_ids, scores) ->
  scores``.  entmath does not import ``transformers``: the class only follows the convention.
"""
from __future__ import annotations

import math
import numbers

import torch

from .ops.cross_entropy import cross_entropy
from .ops.entropy import entropy
from .ops.entropy_normalization import _prepare_sampling, _sampling_probabilities, entropy_normalize
from .ops.logn_attention import _check_int, _check_kappa, logn_attention

__all__ = ["CrossEntropyLoss", "Entropy", "EntropyNormalize", "LogNAttention", "EntropyTargetLogitsProcessor"]


def _target_buffer(target, name: str):
    """A target entropy as a float, or as a float64-or-float tensor to register as a buffer."""
    if isinstance(target, torch.Tensor):
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got dtype {target.dtype}")
        return target if target.is_floating_point() else target.double()
    if isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(target).__name__}")
    try:
        value = float(target)
    except OverflowError:  # an int beyond float64 (10**400)
        value = math.inf if target > 0 else -math.inf
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (an entropy in nats), got {target!r}")
    return value


class CrossEntropyLoss(torch.nn.Module):
    """``entmath.cross_entropy`` as a module, in place of ``torch.nn.CrossEntropyLoss``.

    Args:
        weight: optional class weights, a 1-D float tensor with one entry per class, registered
            as a buffer (it follows ``.to(device)`` and is saved in the ``state_dict``), exactly as
            ``torch.nn.CrossEntropyLoss`` registers its ``weight``.

    The keyword arguments (``dim``, ``ignore_index``, ``reduction``, ``label_smoothing``,
    ``z_loss``, ``return_entropy``, ``inplace_backward``, ``softcap``, ``backend``) are the options
    of ``entmath.cross_entropy``, with its defaults, passed on at every call and checked there.
    ``forward(input, target)`` returns ``entmath.cross_entropy(input, target, weight, ...)``: the
    loss, or ``(loss, entropy)`` with ``return_entropy=True``.
    """

    def __init__(self, weight: torch.Tensor | None = None, *, dim: int = -1, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                 return_entropy: bool = False, inplace_backward: bool = False, softcap: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.dim, self.ignore_index, self.reduction = dim, ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.return_entropy, self.inplace_backward, self.backend = return_entropy, inplace_backward, backend

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        options = dict(dim=self.dim, ignore_index=self.ignore_index, reduction=self.reduction,
                       label_smoothing=self.label_smoothing, z_loss=self.z_loss, return_entropy=self.return_entropy,
                       inplace_backward=self.inplace_backward, backend=self.backend)
        # Options left at None are not passed: the function's own default applies.
        if self.weight is not None:
            options["weight"] = self.weight
        if self.softcap is not None:
            options["softcap"] = self.softcap
        return cross_entropy(input, target, **options)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"return_entropy={self.return_entropy}, backend={self.backend!r}")


class Entropy(torch.nn.Module):
    """``entmath.entropy`` as a module: ``forward(logits)`` is the entropy in nats of
    ``softmax(logits)`` along ``dim`` (kept with size 1 if ``keepdim``)."""

    def __init__(self, dim: int = -1, keepdim: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.dim, self.keepdim, self.backend = dim, keepdim, backend

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.keepdim:
            return entropy(logits, self.dim, keepdim=True, backend=self.backend)
        return entropy(logits, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}, backend={self.backend!r}"


class EntropyNormalize(torch.nn.Module):
    """``entmath.entropy_normalize`` as a module: ``forward(logits)`` is ``softmax(gamma * logits)``
    along ``dim`` with the entropy ``target`` (nats) in every row.

    Args:
        target: a number >= 0, or a tensor that broadcasts to the rows (registered as a buffer;
            a ``torch.nn.Parameter`` stays a parameter and is learned through the op's gradient).
        dim, backend: as for ``entmath.entropy_normalize``.
    """

    def __init__(self, target, dim: int = -1, *, backend: str = "auto"):
        super().__init__()
        target = _target_buffer(target, "target")
        if isinstance(target, torch.nn.Parameter):
            self.target = target
        elif isinstance(target, torch.Tensor):
            self.register_buffer("target", target)
        else:
            self.target = target
        self.dim, self.backend = dim, backend

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return entropy_normalize(logits, self.target, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        target = f"{self.target}" if not isinstance(self.target, torch.Tensor) else f"tensor{tuple(self.target.shape)}"
        return f"target={target}, dim={self.dim}, backend={self.backend!r}"


class LogNAttention(torch.nn.Module):
    """``entmath.logn_attention`` as a module: a drop-in for the call to
    ``torch.nn.functional.scaled_dot_product_attention`` inside an attention block.

    ``forward(query, key, value, attn_mask=None, dropout_p=None, is_causal=False, *, scale=None,
    enable_gqa=False, offset=0)`` takes SDPA's arguments (and a KV-cache ``offset``); a
    ``dropout_p`` of None means the module's ``dropout`` while training and 0 in evaluation, as
    ``torch.nn.MultiheadAttention`` does.

    Args:
        train_length: the calibration length n0 >= 2: a query over n0 keys gets SDPA's scale.
        kappa, clamp_min_to_train_length: as for ``entmath.logn_attention``.
        dropout: the attention dropout probability used while training, in [0, 1].
    """

    def __init__(self, train_length: int, *, kappa: float | None = None, clamp_min_to_train_length: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.train_length = _check_int(train_length, "train_length", 2)
        self.kappa = _check_kappa(kappa)
        if not isinstance(clamp_min_to_train_length, bool):
            raise TypeError("clamp_min_to_train_length must be a bool, got "
                            f"{type(clamp_min_to_train_length).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.clamp_min_to_train_length, self.dropout = clamp_min_to_train_length, float(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float | None = None, is_causal: bool = False, *,
                scale: float | None = None, enable_gqa: bool = False, offset: int = 0) -> torch.Tensor:
        if dropout_p is None:
            dropout_p = self.dropout if self.training else 0.0
        return logn_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
                              train_length=self.train_length, offset=offset, kappa=self.kappa,
                              clamp_min_to_train_length=self.clamp_min_to_train_length)

    def extra_repr(self) -> str:
        return (f"train_length={self.train_length}, kappa={self.kappa}, "
                f"clamp_min_to_train_length={self.clamp_min_to_train_length}, dropout={self.dropout}")


def _log(p: torch.Tensor) -> torch.Tensor:
    """log p, -inf where p = 0 with a zero gradient there (log's own would be 0 * inf = NaN)."""
    live = p > 0
    return torch.where(live, torch.where(live, p, 1.0).log(), float("-inf"))


class EntropyTargetLogitsProcessor:
    """Entropy-targeted sampling inside ``transformers``' ``generate`` (Chapter 2).

    A logits processor: ``processor(input_ids, scores)`` returns log-probabilities whose softmax
    has the entropy ``target_entropy`` (nats) in every row, ``log entropy_normalize(scores,
    target_entropy, dim)``: each row's distribution is sharpened or flattened by a power, keeping
    the order of the tokens, until its entropy is the target.  Pass it as
    ``model.generate(..., do_sample=True, logits_processor=LogitsProcessorList([processor]))``
    (keep other warpers, such as ``top_k`` or ``temperature``, off, or the entropy changes after
    this processor).  entmath does not import ``transformers``; the class follows the convention
    of its ``LogitsProcessor``.

    Args:
        target_entropy: a number >= 0, or a tensor that broadcasts to the rows of ``scores``
            (one target per sequence of the batch).  Rows whose support is too small for the
            target become uniform on it (see ``entmath.entropy_normalize``).
        dim: the vocabulary dimension of ``scores``.
        backend: as for ``entmath.entropy_normalize``.
    """

    def __init__(self, target_entropy, dim: int = -1, *, backend: str = "auto"):
        self.target_entropy = _target_buffer(target_entropy, "target_entropy")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.dim, self.backend = dim, backend

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        target = self.target_entropy
        if isinstance(target, torch.Tensor):
            target = target.to(scores.device)
        if torch.is_grad_enabled() and scores.requires_grad:  # (generate never differentiates)
            return _log(entropy_normalize(scores, target, self.dim, backend=self.backend))
        # sample's path: one row per sequence, once per token, where the operator and autograd
        # layers and the eager solver's Python steps would cost more than the solve.
        z, t, dim, backend = _prepare_sampling(scores, target, self.dim, self.backend)
        p, _ = _sampling_probabilities(z, t, backend)
        return _log(p).movedim(-1, dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_entropy={self.target_entropy}, dim={self.dim})"
