"""entmath: entropy, softmax and their relatives, as verified PyTorch ops with Triton kernels.

Every op works along ``dim`` for any leading shape, accumulates in fp32 (fp64 stays fp64),
returns the input's dtype, and takes ``backend="auto" | "torch" | "triton"``.  The book derives
each op; each module's docstring names its chapter.
"""
from ._backend import triton_available
from ._validate import is_validation_enabled, set_validation, validation
from .ops.attention_entropy import attention_entropy
from .ops.cross_entropy import cross_entropy
from .ops.entropy import entropy
from .ops.entropy_normalization import entropy_normalize, sample, solve_gamma
from .ops.jsd import jsd
from .ops.kl import kl
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.logn_attention import logn_attention, logn_scale, query_lengths
from .ops.noise_softmax import noise_softmax
from . import nn  # the modules: entmath.nn.CrossEntropyLoss, ...  (import entmath.nn also works)
from . import distributed  # noqa: E402  (the ops over a vocabulary split across ranks; Chapter 6)

__version__ = "0.1.0"
__all__ = [
    # Chapter 1: entropy, cross-entropy, KL, Jensen-Shannon (cross_entropy's fused gradient: Chapter 5)
    "entropy", "cross_entropy", "kl", "jsd",
    # Chapter 6: cross-entropy and entropy of a linear head without its logits; entmath.distributed
    # (the same over a vocabulary split across ranks) is a submodule
    "linear_cross_entropy", "distributed",
    # Chapter 2: entropy normalization (softmax(gamma z) with a prescribed entropy)
    "entropy_normalize", "solve_gamma", "sample",
    # Chapter 3: entropy-invariant (log n) attention
    "logn_scale", "query_lengths", "logn_attention", "attention_entropy",
    # Chapter 4: noise-argmax distributions (Gumbel gives softmax; normal, logistic, Cauchy by quadrature)
    "noise_softmax",
    # Value checks on or off (off: no device-to-host sync; bad rows give NaN, as in torch)
    "set_validation", "validation", "is_validation_enabled",
    "triton_available", "__version__",
]
