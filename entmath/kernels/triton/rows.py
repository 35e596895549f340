"""How the row kernels walk a row: one program per row, 16-byte loads wherever the row allows them.

A row of n elements that starts at element offset r = row * stride is walked in an *aligned frame*:
frame column f holds row element f - lead, with lead = r mod VEC and VEC = 16 bytes / element size,
so frame column 0 sits on a 16-byte boundary (given a 16-byte aligned base address, which torch's
allocations have and Triton checks and specialises on).  The frame is cut into BLOCK-wide chunks.
Every chunk but the first and the last is full and aligned and is loaded without a mask, which is
what lets Triton emit 16-byte vector loads (``LDG.E.128``); only the two end chunks are masked
(lead <= f < lead + n).  So a vocabulary of 50257, whose rows start at every possible alignment,
still gets 16-byte loads for all but at most two chunks of each row, and a row that fits in one
chunk is one masked chunk.  A kernel therefore has two loops over the same body: ``range(1,
n_chunks - 1)`` unmasked, then ``end_chunks(n_chunks)`` masked.

Other row tensors of the same launch (b in kl, the gradient, the targets) are addressed in the
same frame: their chunk f is at ``frame_base(ptr, row * their stride, lead)``.  That is aligned
only if their row stride is congruent to the frame's modulo VEC (``ALIGNED``, decided by
``row_config``); otherwise the kernel is compiled without the alignment hint and those loads are
scalar (still coalesced and correct).

Where 16-byte loads cannot happen: a base address that is not 16-byte aligned (a view that starts
mid-vector), or rows shorter than about two chunks (then every load is a masked end chunk).
"""
import torch
import triton
import triton.language as tl

from . import block_size, num_warps


def row_config(n: int, *tensors: torch.Tensor, ctas_per_sm: int = 2) -> dict:
    """BLOCK, VEC, ALIGNED, num_warps and maxnreg for rows of ``n`` elements of ``tensors[0]``
    (the frame), with ``tensors[1:]`` read or written in the same frame.  The one place where a
    row kernel's launch configuration is chosen (tests/gpu_compile_check.py compiles what it says).

    ``maxnreg`` gives every thread its share of the register file with ``ctas_per_sm`` programs
    resident per SM (64 registers at 16 warps and 2 CTAs).  Left to itself, ptxas for sm_100
    (run by Triton with --regAllocOptLevel=2) settled on 40 registers and spilled 8 bytes in
    cross_entropy_fwd; with the budget stated it spills nowhere (the compile check)."""
    ref = tensors[0]
    vec = max(1, 16 // ref.element_size())
    rows = ref.shape[0] if ref.dim() else 1
    aligned = rows <= 1 or all(t.stride(0) % vec == ref.stride(0) % vec for t in tensors[1:])
    # BLOCK >= VEC > lead: the row starts in the first chunk, so the middle ones are full.
    blk = max(block_size(n), vec)
    warps = num_warps(blk)
    regs = min(255, 65536 // (32 * warps * ctas_per_sm) // 8 * 8)
    return dict(BLOCK=blk, VEC=vec, ALIGNED=aligned, num_warps=warps, maxnreg=regs)


@triton.jit
def row_frame(offset, n_cols, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """(lead, n_chunks) of a row at element ``offset`` (int64): the frame starts ``lead`` elements
    before the row and spans ``n_chunks`` BLOCK-wide chunks."""
    lead = (offset % VEC).to(tl.int32)  # < VEC: int32 keeps the masks' compares 32-bit
    return lead, tl.cdiv(lead + n_cols, BLOCK)


@triton.jit
def frame_base(ptr, offset, lead, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to frame column 0 of the row at element ``offset`` of ``ptr``'s tensor."""
    start = offset - lead
    if ALIGNED:
        start = tl.multiple_of(start, VEC)
    return ptr + start


@triton.jit
def end_chunks(n_chunks):
    """Step of ``range(0, n_chunks, step)`` over the first and the last chunk (once if they coincide)."""
    return tl.maximum(n_chunks - 1, 1)


@triton.jit
def in_row(f, lead, n_cols):
    """Mask of the frame columns ``f`` that hold row elements."""
    return (f >= lead) & (f < lead + n_cols)
