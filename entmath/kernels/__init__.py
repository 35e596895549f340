"""The kernel paths of the ops, side by side by backend.

* ``triton/`` - Triton kernels and their launchers, one module per op (imported lazily: Triton
  is optional).  They compile for NVIDIA GPUs and run on CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1``).
* ``cpu/`` - C kernels for the CPU, compiled on first use with the machine's C compiler, and
  the one loader that builds them.

Each op's public function, torch reference path and operator registration live in
``entmath/ops/<op>.py``; nothing here is imported by ``import entmath``.
"""
