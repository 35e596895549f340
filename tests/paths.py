"""The execution paths the property tests run an op on.

``"torch"`` and ``"triton"`` are the public ``backend=`` values.  ``"c"`` is the torch backend with
every CPU input handed to the C kernel of the row ops (``entmath/kernels/cpu/rows.c``), however
small: in normal use only inputs of at least ``kernels.cpu.rows.MIN_ELEMS`` elements take it, and
the tests' rows are short.  It applies to float32 and bfloat16 (``C_DTYPES``); other dtypes run
the eager path whatever the size.
"""
import contextlib

import torch

from entmath.kernels.cpu import rows as cpu_rows

C_DTYPES = (torch.float32, torch.bfloat16)


@contextlib.contextmanager
def on_path(path: str):
    """Yield the ``backend=`` argument for ``path``; for ``"c"``, with the C kernel's size
    threshold lowered to one element while the block runs."""
    if path != "c":
        yield path
        return
    assert cpu_rows.available()  # a missing compiler must fail the test, not pass it vacuously
    old, cpu_rows.MIN_ELEMS = cpu_rows.MIN_ELEMS, 1
    try:
        yield "torch"
    finally:
        cpu_rows.MIN_ELEMS = old
