#!/usr/bin/env python3
"""Compile every Triton kernel for real NVIDIA GPUs, on a machine without one, and fail on what the
interpreter cannot see.

    env -u TRITON_INTERPRET python tests/gpu_compile_check.py [--json benchmarks/results/gpu_compile.json]

(``make gpu-check``, part of ``make test``.)  Under ``TRITON_INTERPRET=1`` the kernels run as numpy:
that says nothing about whether they compile, how many registers they need, whether they spill,
whether a dot product reaches the tensor cores or how wide the loads are.  Triton compiles ahead
of time for a named target without a GPU (``ptxas`` and ``cuobjdump`` ship in its wheel), so this
script does, for sm_80 (A100), sm_90 (H100) and sm_100 (B200):

1. **What the launchers choose.**  Every case calls a real launcher (``entropy_fwd``,
   ``attention_entropy_fwd``, ...) on *meta* tensors of the production shape (4096 x 128256 rows,
   vocabularies 50257 and 32000, attention at B*H = 32, L = S = 4096, D = 128) or of a test shape.
   The launch itself is intercepted (``JITFunction.run``), so the block sizes, warps, grid and
   the integer/alignment specialisation are exactly what the launcher would send to a GPU; nothing
   here restates them.
2. **Compile** with Triton's own specialisation for that target (``create_function_from_signature``,
   as ``JITFunction.run`` does) and ``triton.compiler.compile``.
3. **Read the binary**: ``cuobjdump --dump-resource-usage`` (registers, stack and local memory,
   i.e. spills, shared memory) and the SASS (``cuobjdump -sass``): its loops, the global loads and
   stores in each with their widths (``LDG.E.128`` is a 16-byte vector load), local-memory
   instructions (``LDL``/``STL``: spills), tensor-core instructions (``HMMA``/``HGMMA``/``UTC*MMA``)
   and the instruction count per element of the main loop.  The PTX gives the approximate
   instructions the kernel relies on (``ex2.approx``, ``div.full``, ``sqrt.approx``, ...).

It prints one table and exits non-zero on a compile error, on any spill (stack or local memory, or
a local-memory instruction) on any target, or when a check below on the SASS fails (tensor cores for
fp16/bf16 attention, 16-byte loads where the row allows them).  ``--json`` stores the table, with
the HBM traffic model of every kernel, for the book's performance appendix (so that building the
book needs no compiler).  Compiled kernels are cached in ``_build/triton-cache`` (``TRITON_CACHE_DIR``
overrides): warm, the check takes well under a minute; cold, a few minutes on two cores.

This is compile-time analysis, not a measurement: the traffic model counts the bytes each kernel
must move per row, and the times derived from it in the book are what that traffic takes at peak
bandwidth.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("gpu_compile_check: run without TRITON_INTERPRET (env -u TRITON_INTERPRET ...): the interpreter "
             "replaces every kernel by numpy and there would be nothing to compile")
os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "_build" / "triton-cache"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402
from torch._library.triton import set_wrap_triton_enabled  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
ANALYSIS_CACHE = Path(os.environ["TRITON_CACHE_DIR"]) / "gpu-check"
# Spills this check reports but does not fail on, with the most bytes per thread they may reach:
# none today (entropy_normalize's, listed here while its kernels were reworked, are gone).
KNOWN_SPILLS: dict = {}
NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


# ------------------------------------------------------------------------------------------------
# The cases: launcher calls on meta tensors
# ------------------------------------------------------------------------------------------------
def meta(*shape, dtype=F32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def K(name):
    import importlib

    return importlib.import_module(f"entmath.kernels.triton.{name}")


def entropy_case(rows, n, dtype):
    z = meta(rows, n, dtype=dtype)
    h, lse = K("entropy").entropy_fwd(z)
    K("entropy").entropy_bwd(z, meta(rows, dtype=dtype), h, lse)


def kl_case(rows, n, dtype):
    a, b = meta(rows, n, dtype=dtype), meta(rows, n, dtype=dtype)
    kl, la, lb = K("kl").kl_fwd(a, b)
    K("kl").kl_bwd(a, b, meta(rows, dtype=dtype), kl, la, lb)


def cross_entropy_case(rows, n, dtype, soft=False, eps=0.0, z_loss=0.0, entropy=False, weight=False, softcap=0.0):
    z = meta(rows, n, dtype=dtype)
    acc = F64 if dtype == F64 else F32
    t = None if soft else meta(rows, dtype=torch.int64)
    y = meta(rows, n, dtype=dtype) if soft else None
    w = meta(n, dtype=acc) if weight else None
    mod = K("cross_entropy")
    loss, lse, res, ent = mod.cross_entropy_fwd(z, t, y, w, eps, -100, softcap, entropy)
    g = meta(rows, dtype=acc)
    mod.cross_entropy_bwd(z, t, y, w, lse, res, ent if entropy else None, g, g if z_loss else None,
                          g if entropy else None, g if (soft or weight) else None, eps, -100, softcap,
                          meta(rows, n, dtype=dtype), meta(rows, n, dtype=dtype) if soft else None)


def jsd_case(rows, n, dtype):
    a, b = meta(rows, n, dtype=dtype), meta(rows, n, dtype=dtype)
    j, kp, kq, la, lb = K("jsd").jsd_fwd(a, b, 0.5)
    K("jsd").jsd_bwd(a, b, meta(rows, dtype=j.dtype), kp, kq, la, lb, 0.5)


def linear_cross_entropy_case(N, V, D, dtype):
    mod = K("linear_cross_entropy")
    acc = F64 if dtype == F64 else F32
    h, w, b, t = meta(N, D, dtype=dtype), meta(V, D, dtype=dtype), meta(V, dtype=dtype), meta(N, dtype=torch.int64)
    mod.linear_summary_fwd(h, w, b, t, 1.0, True)
    v = meta(N, dtype=acc)
    mod.linear_grad_logits(h, w, b, t, v, v, v, v, v, v, 1.0, meta(N, V, dtype=dtype))


def entropy_normalize_case(rows, n, dtype):
    mod = K("entropy_normalization")
    z = meta(rows, n, dtype=dtype)
    p, gamma, zbar = mod.entropy_normalize_fwd(z, meta(rows, dtype=F32 if dtype != F64 else F64))
    mod.entropy_normalize_bwd(z, p, gamma, zbar, meta(rows, n, dtype=dtype), meta(rows, dtype=gamma.dtype))


def noise_softmax_case(rows, n, noise, K_nodes, dtype=F32):
    mod = K("noise_softmax")
    z = meta(rows, n, dtype=dtype)
    y, w, lo, hi = (meta(K_nodes, dtype=dtype) for _ in range(4))
    p, t, log_s = mod.noise_softmax_fwd(z, meta(rows, 1, dtype=dtype), y, w, lo, hi, noise, 60, 8, 1e-7, 1e-5)
    mod.noise_softmax_bwd(z, meta(rows, n, dtype=dtype), t, log_s, w, noise)


def attention_case(bh, L, S, D, dtype, causal):
    acc = F64 if dtype == F64 else F32
    K("attention_entropy").attention_entropy_fwd(meta(bh, L, D, dtype=dtype), meta(bh, S, D, dtype=dtype),
                                                 meta(bh, L, dtype=acc), causal, S - L)


@dataclasses.dataclass
class Case:
    op: str
    shape: str  # what the table prints
    run: object  # calls the launcher(s) on meta tensors
    production: bool = True  # a production shape (the book's appendix), or a test shape
    rows: int = 4096  # rows (or B*H query rows) of the shape, for the traffic model


ROWS = 4096
VOCABS = (128256, 50257, 32000)


def cases() -> list[Case]:
    out = []
    for n in VOCABS:
        for dt in (F32, BF16):
            tag = f"{ROWS}x{n} {str(dt)[6:]}"
            out += [Case("entropy", tag, lambda n=n, dt=dt: entropy_case(ROWS, n, dt)),
                    Case("kl", tag, lambda n=n, dt=dt: kl_case(ROWS, n, dt)),
                    Case("jsd", tag, lambda n=n, dt=dt: jsd_case(ROWS, n, dt)),
                    Case("cross_entropy", tag, lambda n=n, dt=dt: cross_entropy_case(ROWS, n, dt)),
                    Case("entropy_normalize", tag, lambda n=n, dt=dt: entropy_normalize_case(ROWS, n, dt))]
    out += [
        Case("cross_entropy", f"{ROWS}x128256 bf16 smoothing+z-loss+entropy",
             lambda: cross_entropy_case(ROWS, 128256, BF16, eps=0.1, z_loss=1e-4, entropy=True)),
        Case("cross_entropy", f"{ROWS}x128256 bf16 soft targets",
             lambda: cross_entropy_case(ROWS, 128256, BF16, soft=True)),
        Case("cross_entropy", f"{ROWS}x128256 bf16 class weights+softcap",
             lambda: cross_entropy_case(ROWS, 128256, BF16, weight=True, softcap=30.0)),
        Case("linear_cross_entropy", "N=4096 V=128256 d=4096 bf16",
             lambda: linear_cross_entropy_case(4096, 128256, 4096, BF16)),
        Case("linear_cross_entropy", "N=4096 V=128256 d=4096 float32",
             lambda: linear_cross_entropy_case(4096, 128256, 4096, F32)),
        Case("distributed", f"{ROWS}x16032 bf16 (a vocabulary slice)",
             lambda: K("linear_cross_entropy").logits_summary_fwd(meta(ROWS, 16032, dtype=BF16),
                                                                 meta(ROWS, dtype=torch.int64), True)),
        Case("entropy_normalize", f"{ROWS}x16384 bf16 (one tile)", lambda: entropy_normalize_case(ROWS, 16384, BF16)),
        Case("entropy_normalize", f"{ROWS}x16384 float32 (one tile)", lambda: entropy_normalize_case(ROWS, 16384, F32)),
    ]
    for noise, k in (("normal", 24), ("logistic", 32), ("cauchy", 256)):
        out.append(Case("noise_softmax", f"{ROWS}x128256 float32 {noise} K={k}",
                        lambda noise=noise, k=k: noise_softmax_case(ROWS, 128256, noise, k)))
    for dt in (BF16, F16, F32):
        for causal in (False, True):
            out.append(Case("attention_entropy", f"BH=32 L=S=4096 D=128 {str(dt)[6:]}{' causal' if causal else ''}",
                            lambda dt=dt, causal=causal: attention_case(32, 4096, 4096, 128, dt, causal),
                            rows=32 * 4096))
    # Test shapes (tests/test_<op>.py): short and ragged rows, fp64 for gradcheck.
    for n, dt in ((3, F64), (1000, F32), (4097, BF16)):
        tag = f"8x{n} {str(dt)[6:]}"
        out += [Case("entropy", tag, lambda n=n, dt=dt: entropy_case(8, n, dt), False, 8),
                Case("kl", tag, lambda n=n, dt=dt: kl_case(8, n, dt), False, 8),
                Case("jsd", tag, lambda n=n, dt=dt: jsd_case(8, n, dt), False, 8),
                Case("cross_entropy", tag, lambda n=n, dt=dt: cross_entropy_case(8, n, dt, eps=0.1), False, 8),
                Case("entropy_normalize", tag, lambda n=n, dt=dt: entropy_normalize_case(8, n, dt), False, 8)]
    out += [Case("cross_entropy", "8x1000 float64 soft targets",
                 lambda: cross_entropy_case(8, 1000, F64, soft=True), False, 8),
            Case("noise_softmax", "8x9 float64 normal K=8",
                 lambda: noise_softmax_case(8, 9, "normal", 8, F64), False, 8),
            Case("noise_softmax", "8x9 float64 cauchy K=8",
                 lambda: noise_softmax_case(8, 9, "cauchy", 8, F64), False, 8),
            Case("noise_softmax", "8x1000 float32 logistic K=32",
                 lambda: noise_softmax_case(8, 1000, "logistic", 32), False, 8),
            Case("attention_entropy", "BH=2 L=5 S=12 D=6 float64 causal",
                 lambda: attention_case(2, 5, 12, 6, F64, True), False, 10),
            Case("attention_entropy", "BH=2 L=S=37 D=16 float32",
                 lambda: attention_case(2, 37, 37, 16, F32, False), False, 74)]
    return out


# ------------------------------------------------------------------------------------------------
# Capture the launches, compile them for a target
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self):
        return self.fn.fn.__name__

    def bound(self) -> dict:
        """Argument name -> value (tensors, ints and constexprs) as the kernel sees them."""
        names = [p.name for p in self.fn.params]
        vals = dict(zip(names, self.args))
        vals.update({k: v for k, v in self.kwargs.items() if k in names})
        return vals


def capture(run) -> list[Launch]:
    launches = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, tuple(grid) if not callable(grid) else grid))

    real = JITFunction.run
    JITFunction.run = fake_run
    try:
        # The launchers launch through torch.library.wrap_triton, which outside a triton_op hands
        # the launch to a higher-order operator (that does nothing on meta tensors): switch it off
        # here, as triton_op does when it runs a launcher, so that the launch reaches run().
        with set_wrap_triton_enabled(False):
            run()
    finally:
        JITFunction.run = real
    return launches


def specialise(launch: Launch, capability: int):
    """What ``JITFunction.run`` would compile on a GPU of this capability: (source with its
    signature, constexprs and integer/alignment attributes; target; options)."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, launch.kwargs, bound_args,
                                                                  specialization, options)
    return ASTSource(launch.fn, signature, constexprs, attrs), target, backend.parse_options(options.__dict__)


def compile_key(launch: Launch, capability: int) -> tuple:
    """Two launches with the same key compile to the same binary (Triton's own cache key: the
    kernel's source and specialisation, the target, the options), e.g. rows of 128256 and 32000
    logits, both multiples of 16, at the same block sizes."""
    src, target, options = specialise(launch, capability)
    return src.hash(), options.hash(), str(target)


def compile_for(launch: Launch, capability: int):
    """Compile as ``JITFunction.run`` would on a GPU of this capability (same specialisation)."""
    src, target, options = specialise(launch, capability)
    return triton_compile(src, target=target, options=options.__dict__)


# ------------------------------------------------------------------------------------------------
# Reading the binary
# ------------------------------------------------------------------------------------------------
def cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(NV_BIN / "cuobjdump"), *flags, f.name], check=True, capture_output=True,
                              text=True).stdout


def resources(cubin: bytes) -> dict:
    text = cuobjdump(cubin, "--dump-resource-usage")
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return {k.lower(): int(v) for k, v in usage.items()}


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
MMA_OPS = ("HMMA", "HGMMA", "DMMA", "IMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA")


def sass_instructions(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every SASS instruction."""
    return [(int(a, 16), op, rest) for a, _, op, rest in SASS_LINE.findall(cuobjdump(cubin, "-sass"))]


def loops(insts) -> list[dict]:
    """Loops of the SASS (a branch back to an earlier address), innermost first in each nest,
    with the global loads and stores that belong to each (not to a loop nested inside it)."""
    spans = []
    for addr, op, rest in insts:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) <= addr:
                spans.append((int(m.group(1), 16), addr))
    spans = sorted(set(spans), key=lambda s: (s[1] - s[0]))

    def innermost(addr):
        for i, (a, b) in enumerate(spans):
            if a <= addr <= b:
                return i
        return None

    out = [{"span": s, "insts": 0, "ld": collections.Counter(), "st": collections.Counter(), "mma": 0}
           for s in spans]
    for addr, op, _ in insts:
        i = innermost(addr)
        if i is None:
            continue
        out[i]["insts"] += 1
        if op.startswith("LDG"):
            out[i]["ld"][access_bits(op)] += 1
        elif op.startswith("STG"):
            out[i]["st"][access_bits(op)] += 1
        elif op.split(".")[0] in MMA_OPS:
            out[i]["mma"] += 1
    out.sort(key=lambda lp: lp["span"][0])
    return [lp for lp in out if lp["ld"] or lp["st"] or lp["mma"]]


def access_bits(op: str) -> int:
    """Width in bits of an LDG/STG: .128/.64 vector, .U16/.S16/.U8 narrow, else 32."""
    for width in ("128", "64", "16", "8"):
        if re.search(rf"\.[US]?{width}\b", op):
            return int(width)
    return 32


APPROX = ("ex2.approx", "lg2.approx", "div.full", "div.approx", "rcp.approx", "sqrt.approx", "rsqrt.approx",
          "sin.approx", "cos.approx", "tanh.approx")


def approx_ops(ptx: str) -> dict:
    found = collections.Counter()
    for op in re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M):
        for a in APPROX:
            if op.startswith(a) and op.endswith(".f32"):
                found[a] += 1
    return dict(found)


# ------------------------------------------------------------------------------------------------
# The HBM traffic model: what each kernel must read and write per row (its docstring, as numbers)
# ------------------------------------------------------------------------------------------------
def traffic(launch: Launch) -> dict:
    """Passes over the row-sized tensors of one launch: {argument: passes}; a pass count may be a
    range (lo, hi) where it depends on the data (iterations of a solver)."""
    a, name = launch.bound(), launch.name
    if name in HBM_MODEL:
        return HBM_MODEL[name](a)
    return {}


# Newton evaluations per group of 8 nodes, measured with the torch twin (ops.noise_softmax.newton_nodes)
# on rows of 128256 fp32 logits N(0, s^2), s = 0.1, 1, 4: normal 4-6, logistic 2-4, Cauchy 1-3.
NEWTON_EVALS = {0: (4, 6), 1: (2, 4), 2: (1, 3)}


def groups(a) -> int:
    return -(-a["K"] // a["NB"])


HBM_MODEL = {
    "entropy_fwd_kernel": lambda a: {"z_ptr": 1},
    "entropy_bwd_kernel": lambda a: {"z_ptr": 1, "gz_ptr": 1},
    # kl: statistics, then the cancellation-free terms (two reads); jsd: statistics, kl's pass, its own
    "kl_fwd_kernel": lambda a: {"a_ptr": 2, "b_ptr": 2},
    "kl_bwd_kernel": lambda a: {"a_ptr": 1, "b_ptr": 1, "ga_ptr": 1, "gb_ptr": 1},
    "jsd_fwd_kernel": lambda a: {"a_ptr": 3, "b_ptr": 3},
    "jsd_bwd_kernel": lambda a: {"a_ptr": 1, "b_ptr": 1, "ga_ptr": 1, "gb_ptr": 1},
    "cross_entropy_fwd_kernel": lambda a: {"z_ptr": 1, "y_ptr": 1 if a["SOFT"] else 0},
    "cross_entropy_bwd_kernel": lambda a: {"z_ptr": 1, "y_ptr": 1 if a["SOFT"] else 0,
                                           "grad_ptr": 1, "grad_y_ptr": 1 if a["GRAD_Y"] else 0},
    # one tile: one read, one write; tiled: max, moments, E evaluations (3-5), the write pass
    "entropy_normalize_fwd_kernel": lambda a: {"z_ptr": 1 if a["ONE_TILE"] else (3 + 3, 3 + 5), "p_ptr": 1},
    "entropy_normalize_bwd_kernel": lambda a: {"z_ptr": 2, "p_ptr": 2, "gp_ptr": 2, "gz_ptr": 1},
    # E Newton evaluations per node group, then the pass that writes p; backward: one pass per
    # group, then the pass that writes the gradient
    "noise_softmax_fwd_kernel": lambda a: {"z_ptr": tuple(groups(a) * e + 1 for e in NEWTON_EVALS[a["FAMILY"]]),
                                           "p_ptr": 1},
    "noise_softmax_bwd_kernel": lambda a: {"z_ptr": groups(a) + 1, "g_ptr": groups(a) + 1, "gz_ptr": 1},
    # q once per query block; k once per query block: from HBM once, the re-reads hit L2 (see appendix)
    "attention_entropy_fwd_kernel": lambda a: {"q_ptr": 1, "k_ptr": 1},
}


# Elements one iteration of a kernel's inner loops works on (logits, (node, logit) pairs, or
# (query, key) logits), for "instructions per element" on paper.
ELEMENTS_PER_ITERATION = {
    "noise_softmax_fwd_kernel": lambda a: a["NB"] * a["BLOCK"],
    "noise_softmax_bwd_kernel": lambda a: a["NB"] * a["BLOCK"],
    "attention_entropy_fwd_kernel": lambda a: a["BLOCK_M"] * a["BLOCK_N"],
    "linear_summary_kernel": lambda a: a["BLOCK_M"] * a["BLOCK_N"],
    "linear_grad_logits_kernel": lambda a: a["BLOCK_M"] * a["BLOCK_N"],
}


def elements_per_iteration(launch: Launch) -> int:
    a = launch.bound()
    return ELEMENTS_PER_ITERATION.get(launch.name, lambda a: a["BLOCK"])(a)


# Arguments a kernel writes (everything else in the model is read).
OUTPUTS = {"gz_ptr", "ga_ptr", "gb_ptr", "grad_ptr", "grad_y_ptr", "p_ptr"}


# Instructions per row on paper: instructions per element of the kernel's loops (from the SASS,
# in their order in the binary) times how many elements each loop sees per row.  None where the
# kernel is not modelled (entropy_normalize: its evaluation count depends on the row).
def compute_per_row(launch: Launch, ipe: list):
    a, name = launch.bound(), launch.name
    try:
        if name.startswith(("entropy_fwd", "entropy_bwd", "kl_", "jsd_", "cross_entropy")):
            return (a["n_cols"] * ipe[0],) * 2  # the unmasked middle loop covers the row
        if name == "attention_entropy_fwd_kernel":
            keys = a["S"] / 2 if a["CAUSAL"] else a["S"]
            return (keys * ipe[0],) * 2
        if name == "noise_softmax_fwd_kernel":  # loops: group, Newton pass, chunk, group in the p pass
            e_lo, e_hi = NEWTON_EVALS[a["FAMILY"]]
            pairs = a["K"] * a["n_cols"]
            return pairs * (e_lo * ipe[1] + ipe[3]), pairs * (e_hi * ipe[1] + ipe[3])
        if name == "noise_softmax_bwd_kernel":  # loops: group, reduction pass, chunk, group in the write
            pairs = a["K"] * a["n_cols"]
            return (pairs * (ipe[1] + ipe[3]),) * 2
    except IndexError:  # the loop structure changed: say so in the table rather than guess
        return None
    return None


def row_bytes(launch: Launch, passes: dict) -> tuple[float, float]:
    """(lo, hi) bytes per row moved through HBM under the model."""
    a = launch.bound()
    n = a.get("n_cols") or a.get("D")
    lo = hi = 0.0
    for arg, k in passes.items():
        size = a[arg].element_size() * n
        k_lo, k_hi = k if isinstance(k, tuple) else (k, k)
        lo, hi = lo + k_lo * size, hi + k_hi * size
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def describe(launch: Launch) -> str:
    consts = {p.name: launch.bound()[p.name] for p in launch.fn.params if p.is_constexpr}
    keep = {k: v for k, v in consts.items() if isinstance(v, (int, bool)) and k.isupper() and k not in ("MAX_EVALS",)}
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in keep.items() if not isinstance(v, bool) or v]
    regs = f" maxnreg={launch.kwargs['maxnreg']}" if launch.kwargs.get("maxnreg") else ""
    return " ".join(parts) + f" w{launch.kwargs.get('num_warps', 4)}" + regs


def analyse(launch: Launch, cap_name: str, capability: int) -> dict:
    """Compile for one target and read the binary; the reading (cuobjdump -sass takes about a
    second per kernel) is cached next to Triton's cache, keyed by the cubin and by this script."""
    k = compile_for(launch, capability)
    key = hashlib.sha256(k.asm["cubin"] + reader_version()).hexdigest()[:32]
    cached = ANALYSIS_CACHE / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    result = read_binary(k, cap_name, launch)
    ANALYSIS_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(cached)
    return result


@functools.cache
def reader_version() -> bytes:
    """Hash of the code that reads a binary: a change to it invalidates the cached readings."""
    parts = [read_binary, resources, sass_instructions, loops, access_bits, approx_ops, elements_per_iteration]
    text = "".join(inspect.getsource(f) for f in parts) + repr(sorted(ELEMENTS_PER_ITERATION))
    return hashlib.sha256(text.encode()).digest()


def read_binary(k, cap_name: str, launch: Launch) -> dict:
    res = resources(k.asm["cubin"])
    insts = sass_instructions(k.asm["cubin"])
    local_ops = sum(op.startswith(("LDL", "STL")) for _, op, _ in insts)
    mma = sorted({op.split(".")[0] for _, op, _ in insts if op.split(".")[0] in MMA_OPS})
    return {"target": cap_name, "regs": res.get("reg", 0), "stack": res.get("stack", 0), "local": res.get("local", 0),
            "local_ops": local_ops, "shared": int(k.metadata.shared), "mma": mma,
            "loops": [{"insts": lp["insts"], "ld": dict(lp["ld"]), "st": dict(lp["st"]), "mma": lp["mma"],
                       "insts_per_element": round(lp["insts"] * 32 * launch.kwargs.get("num_warps", 4)
                                                  / elements_per_iteration(launch), 1)}
                      for lp in loops(insts)],
            "approx": approx_ops(k.asm["ptx"])}


def loop_summary(lps) -> str:
    def acc(c):
        return "+".join(f"{v}x{b}b" for b, v in sorted(c.items(), key=lambda kv: -int(kv[0])))
    parts = []
    for lp in lps:
        bits = []
        if lp["ld"]:
            bits.append("ld " + acc(lp["ld"]))
        if lp["st"]:
            bits.append("st " + acc(lp["st"]))
        if lp["mma"]:
            bits.append(f"mma {lp['mma']}")
        bits.append(f"{lp['insts_per_element']:g}/el")
        parts.append(" ".join(bits))
    return " | ".join(parts) or "-"


# The distinct compiles, set before the worker processes fork (they inherit it: a JITFunction does
# not pickle, an index does).
JOBS: list = []


def analyse_job(i: int):
    launch, cap_name, cap = JOBS[i]
    try:
        return analyse(launch, cap_name, cap)
    except Exception as e:  # returned as text: a compiler's exception need not pickle
        return RuntimeError(str(e) or type(e).__name__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the table here (for the book's appendix)")
    ap.add_argument("--only", help="only cases of this op (e.g. entropy, attention_entropy)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in flight (processes)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    rows, failures, known, jobs = [], [], [], {}
    # 1. Every launch of every case (fast: the launchers run on meta tensors).
    for case in cases():
        if args.only and args.only != case.op:
            continue
        try:
            launches = capture(case.run)
        except Exception as e:  # a launcher that cannot even choose its configuration
            failures.append(f"{case.op} {case.shape}: launcher raised {type(e).__name__}: {e}")
            continue
        if not launches:
            failures.append(f"{case.op} {case.shape}: the launcher launched nothing (no kernel to compile)")
        for launch in launches:
            passes = {k: v for k, v in traffic(launch).items() if v}
            rows.append({"op": case.op, "shape": case.shape, "production": case.production, "kernel": launch.name,
                         "config": describe(launch), "grid": list(launch.grid), "rows": case.rows,
                         "reads": {k: v for k, v in passes.items() if k not in OUTPUTS},
                         "writes": {k: v for k, v in passes.items() if k in OUTPUTS},
                         "bytes_per_row": row_bytes(launch, passes), "targets": {}, "_compiles": {}, "_launch": launch})
            for cap_name, cap in TARGETS.items():
                ckey = compile_key(launch, cap)
                rows[-1]["_compiles"][cap_name] = ckey
                jobs.setdefault(ckey, (launch, cap_name, cap))
    # 2. Compile and read each distinct specialisation once per target (launches that differ only
    #    in values Triton does not specialise on share one compile), in worker processes: Triton's
    #    MLIR passes hold the GIL, so threads would use one core for them (ptxas and cuobjdump run
    #    as subprocesses either way).
    JOBS[:] = list(jobs.values())
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        outcomes = list(pool.map(analyse_job, range(len(JOBS)), chunksize=1))
    results = dict(zip(jobs, outcomes))
    # 3. The table, the failures.
    for row in rows:
        compiles, launch = row.pop("_compiles"), row.pop("_launch")
        for cap_name in TARGETS:
            r = results[compiles[cap_name]]
            where = f"{row['op']} {row['shape']} {row['kernel']} {cap_name}"
            if isinstance(r, Exception):
                msg = str(r).strip().splitlines()
                failures.append(f"{where}: compile error: {msg[-1] if msg else type(r).__name__}")
                continue
            row["targets"][cap_name] = r
            if cap_name == "sm_90":
                row["instructions_per_row"] = compute_per_row(launch, [lp["insts_per_element"] for lp in r["loops"]])
            if r["stack"] or r["local"] or r["local_ops"]:
                msg = f"{where}: spills (stack {r['stack']} B, local {r['local']} B, {r['local_ops']} LDL/STL)"
                if r["stack"] + r["local"] <= KNOWN_SPILLS.get(row["kernel"], -1) and msg not in known:
                    known.append(msg)
                elif msg not in failures and msg not in known:
                    failures.append(msg)
    print_table(rows)
    elapsed = time.perf_counter() - t_start
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"triton": triton.__version__, "targets": list(TARGETS), "kernels": rows,
                   "note": "compile-time analysis (tests/gpu_compile_check.py), not a measurement"}
        # One line per launch: the file diffs launch by launch when a kernel changes.
        kernels = ",\n  ".join(json.dumps(r) for r in payload.pop("kernels"))
        head = json.dumps(payload)[:-1]
        args.json.write_text(f'{head}, "kernels": [\n  {kernels}\n]}}\n')
        print(f"wrote {args.json}")
    print(f"gpu_compile_check: {len(rows)} launches on {len(TARGETS)} targets, {len(jobs)} distinct compiles "
          f"in {elapsed:.0f} s")
    for k in known:
        print("known (KNOWN_SPILLS)", k)
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def print_table(rows):
    head = ("op", "shape", "kernel", "config", "regs 80/90/100", "spill B", "smem 80/90/100", "mma", "loops (sm_90)",
            "approx")
    lines = [head]
    for r in rows:
        t = r["targets"]
        per = lambda f: "/".join(str(t[c][f]) if c in t else "ERR" for c in TARGETS)  # noqa: E731
        spill = max((t[c]["stack"] + t[c]["local"] for c in t), default=0)
        sm90 = t.get("sm_90", {})
        lines.append((r["op"], r["shape"], r["kernel"].replace("_kernel", ""), r["config"], per("regs"), str(spill),
                      per("shared"), ",".join(sm90.get("mma", [])) or "-", loop_summary(sm90.get("loops", [])),
                      " ".join(f"{k.split('.')[0]}:{v}" for k, v in sorted(sm90.get("approx", {}).items()))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
