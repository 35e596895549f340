"""Triton kernels and their launchers.

These modules import ``triton`` at import time and are imported lazily, on the first call with
``backend="triton"`` (see ``entmath/_backend.py``).  Triton chooses between compiling and
interpreting when a kernel is *defined*, so ``TRITON_INTERPRET=1`` must be set before that first
call, not necessarily before ``import entmath``.

Conventions shared by every kernel:

* one program per row; the row is read in ``BLOCK``-wide chunks, ``BLOCK`` a power of two
  (``block_size``); the row kernels walk an aligned frame so that every full chunk is an
  unmasked 16-byte load and only the two end chunks are masked (``rows.py``);
* every launcher's configuration (blocks, warps, register budget, grid) comes from one config
  function (``rows.row_config``, ``attention_config``, ``noise_config``), which
  ``tests/gpu_compile_check.py`` compiles for sm_80, sm_90 and sm_100 (``make gpu-check``);
* loads are upcast to fp32 (fp64 stays fp64) and all sums accumulate in that precision;
* per-row statistics (max, log-normaliser, ...) are scalars carried across chunks with the
  online-softmax rescaling, so the forward reads each logit once from memory;
* no Python branching on tensor values: data-dependent cases are ``tl.where``;
* on a GPU, fp32 ``tl.exp``, ``/`` and ``tl.sqrt`` are approximate instructions (ex2.approx,
  div.full, sqrt.approx); the error bounds that hold with them, and how they are tested, are in
  the performance appendix ("GPU numerics") and ``tests/test_gpu_numerics.py``.
"""
import triton

MAX_BLOCK = 4096


def block_size(n: int) -> int:
    """Chunk width for rows of ``n`` logits: the whole row when it fits, else MAX_BLOCK."""
    return min(triton.next_power_of_2(max(int(n), 1)), MAX_BLOCK)


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16
