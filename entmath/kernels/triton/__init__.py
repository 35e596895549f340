"""Triton kernels and their launchers.

These modules import ``triton`` at import time and are imported lazily, on the first call with
``backend="triton"`` (see ``entmath/_backend.py``).  Triton chooses between compiling and
interpreting when a kernel is *defined*, so ``TRITON_INTERPRET=1`` must be set before that first
call, not necessarily before ``import entmath``.

Conventions shared by every kernel:

* one program per row; the row is read in ``BLOCK``-wide chunks, ``BLOCK`` a power of two
  (``block_size``), with masks for the ragged tail;
* loads are upcast to fp32 (fp64 stays fp64) and all sums accumulate in that precision;
* per-row statistics (max, log-normaliser, ...) are scalars carried across chunks with the
  online-softmax rescaling, so the forward reads each logit once from memory;
* no Python branching on tensor values: data-dependent cases are ``tl.where``.
"""
import triton

MAX_BLOCK = 4096


def block_size(n: int) -> int:
    """Chunk width for rows of ``n`` logits: the whole row when it fits, else MAX_BLOCK."""
    return min(triton.next_power_of_2(max(int(n), 1)), MAX_BLOCK)


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16
