"""CPU benchmark of the linear head without its logits (Chapter 6), in one interleaved run.

Forward + backward of ``ce - 0.01 * H.mean()`` (cross-entropy and mean entropy of
softmax(hidden @ weight.T)) at N = 4096 tokens, d = 256, V = 32000, fp32 (one logits buffer is
N * V * 4 bytes = 500 MiB):

    materialised torch    F.linear, F.cross_entropy, and H = -(p * log p).sum(-1) from log_softmax
    materialised entmath  F.linear, then entmath.cross_entropy(return_entropy=True) on the logits
    fused entmath         entmath.linear_cross_entropy(return_entropy=True): no logits

Time: the three variants run in turn, round after round (interleaved, so that a change in the
machine's load hits all of them), and each one's median is reported; ratios are to the
materialised torch computation at the same thread count (target: fused <= 1.3x).  Each round
runs every variant with torch's default threads and with one thread: on a shared machine a
multi-threaded op waits at OpenMP barriers whenever another process holds a core, which costs the
fused op (a few hundred tile-sized ops) far more than the materialised one (a few dozen large ops).
Peak memory: each variant runs once in a fresh subprocess whose C library returns freed blocks at
once (after a small warm-up run that pages in the libraries' code); "extra" is the peak resident set size minus the resident size just before the call (inputs
allocated), in units of one logits buffer
(target: fused <= 0.10).  It includes the gradients of hidden and weight (37 MiB, 0.07 buffers),
which every variant allocates; "working" is extra minus those.

On paper for the GPU path (no GPU here): FLOPs and HBM traffic of the three computations at
N = 16384, d = 4096, V = 152064 in bf16 against the matmul floor (GEMMs at peak FLOP/s, the
elementwise kernels' bytes at peak bandwidth, one after another), and the resources of the
Triton kernels compiled for sm_80 and sm_90 at the tile sizes their launchers choose there
(registers, spills, shared memory, tensor-core instructions), from ``ptxas``/``cuobjdump``.
Run: .venv/bin/python benchmarks/bench_linear_head.py [N d V] [--no-compile]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import entmath  # noqa: E402
from common import save, table  # noqa: E402

BETA = 0.01


def materialised_torch(h, w, t):
    z = F.linear(h, w)
    ce = F.cross_entropy(z, t)
    log_p = z.log_softmax(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    return ce - BETA * ent.mean()


def materialised_entmath(h, w, t):
    ce, ent = entmath.cross_entropy(F.linear(h, w), t, return_entropy=True)
    return ce - BETA * ent.mean()


def fused(h, w, t):
    ce, ent = entmath.linear_cross_entropy(h, w, t, return_entropy=True)
    return ce - BETA * ent.mean()


VARIANTS = {"materialised torch": materialised_torch, "materialised entmath": materialised_entmath,
            "fused entmath": fused}


def _inputs(n, d, v):
    torch.manual_seed(0)
    h = torch.randn(n, d)
    w = torch.randn(v, d) * (2.0 / d) ** 0.5  # logits of order 1-3, as a trained head's
    t = torch.randint(0, v, (n,))
    return h, w, t


def _step(fn, h, w, t):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    fn(hh, ww, t).backward()
    return hh.grad, ww.grad


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(name: str, n: int, d: int, v: int) -> dict:
    """In a fresh process: one forward + backward, peak RSS growth over the inputs.  The C library
    is told to map every block of 64 KiB or more on its own and to return it when freed, so that
    the resident set follows the live tensors (by default glibc keeps freed blocks of up to 32 MiB
    in its heap, and the peak then counts memory that is free)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD
    hs, ws, ts = _inputs(64, d, 512)  # a small run first: libraries' code and workspaces are paged in
    VARIANTS[name](hs.requires_grad_(), ws.requires_grad_(), ts).backward()
    h, w, t = _inputs(n, d, v)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    VARIANTS[name](hh, ww, t).backward()
    return {"extra_bytes": _rss("VmHWM") - before, "grad_bytes": 4 * (h.numel() + w.numel())}


# ---- the GPU on paper -----------------------------------------------------------------------
H100 = {"name": "H100 SXM", "bf16_tflops": 989.0, "hbm_tb_s": 3.35, "l2_mb": 50}


# Per-logit traffic of the elementwise kernels (bytes per logit, forward + backward) and the
# activations kept for the backward, bf16 logits under autocast; the GEMMs are counted in units of
# one N x V x d product and taken at peak FLOP/s (they are compute-bound at this shape).
GPU_VARIANTS = {
    # F.linear writes bf16 z; F.cross_entropy upcasts (r2 w4) and log_softmax (r4 w4); the entropy's
    # log_softmax (r4 w4), exp (r4 w4), product (r8 w4), sum (r4); backward: the product's two
    # gradients (r4 w4 each), exp (r8 w4), their sum (r8 w4), two log_softmax backwards (r8 w4
    # each), the sum of the two logit gradients (r8 w4), the cast to bf16 for the GEMMs (r4 w2).
    "materialised torch": {"gemms": 3, "bytes_per_logit": 14 + 32 + 82, "kept_bytes_per_logit": 2 + 4 + 4 + 4},
    # F.linear, then entmath.cross_entropy(return_entropy=True): one read forward, one read and one
    # write (the bf16 gradient) backward.
    "materialised entmath": {"gemms": 3, "bytes_per_logit": 2 + 2 + 2, "kept_bytes_per_logit": 2},
    # linear_cross_entropy: no logits; the backward writes the bf16 gradient of a sixteenth of the
    # rows at a time (2 bytes per logit in all), which the two GEMMs read as their operand.
    "fused entmath": {"gemms": 4, "bytes_per_logit": 2, "kept_bytes_per_logit": 2 / 16},
}


def gpu_paper(n=16384, d=4096, v=152064) -> dict:
    """Time on paper of forward + backward on an H100: the GEMMs at peak bf16 FLOP/s plus the
    elementwise kernels' traffic at peak HBM bandwidth (kernels run one after another), and the
    memory the logits-sized tensors take.  A model, not a measurement."""
    nv = n * v
    gemm_ms = 1e3 * 2 * n * v * d / (H100["bf16_tflops"] * 1e12)
    out = {"shape": f"N={n} d={d} V={v} bf16", "device": H100["name"], "logits_fp32_GB": 4 * nv / 1e9,
           "one_gemm_ms": gemm_ms, "matmul_floor_ms": 3 * gemm_ms}
    for name, m in GPU_VARIANTS.items():
        ew_ms = 1e3 * m["bytes_per_logit"] * nv / (H100["hbm_tb_s"] * 1e12)
        out[name] = {"gemms": m["gemms"], "TFLOP": m["gemms"] * 2 * n * v * d / 1e12, "gemm_ms": m["gemms"] * gemm_ms,
                     "elementwise_GB": m["bytes_per_logit"] * nv / 1e9, "elementwise_ms": ew_ms,
                     "total_ms": m["gemms"] * gemm_ms + ew_ms, "kept_GB": m["kept_bytes_per_logit"] * nv / 1e9}
        out[name]["over_floor"] = out[name]["total_ms"] / out["matmul_floor_ms"]
    return out


def compile_check() -> list:
    """In a process without TRITON_INTERPRET: the launchers on meta tensors of the production
    shape, the launches captured and compiled for sm_80 and sm_90, the binaries read."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env.setdefault("TRITON_CACHE_DIR", str(root / "_build" / "triton-cache"))
    out = subprocess.run([sys.executable, __file__, "--compile-child"], capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr[-3000:])
        return [{"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compile_child() -> list:
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from entmath.kernels.triton import linear_cross_entropy as K

    nv_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    launches = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    n, d, v = 16384, 4096, 152064
    real = JITFunction.run
    JITFunction.run = fake_run
    direct = torch._library.triton.set_wrap_triton_enabled(False)  # launch directly, not through the HOP
    direct.__enter__()
    try:
        for dt in (torch.bfloat16, torch.float32):
            acc = torch.float32
            h, w, b, t = meta(n, d, dtype=dt), meta(v, d, dtype=dt), meta(v, dtype=dt), meta(n, dtype=torch.int64)
            K.linear_summary_fwd(h, w, b, t, 1.0, True, splits=1)
            rows = n // 16
            vec = [meta(rows, dtype=acc) for _ in range(6)]
            K.linear_grad_logits(h[:rows], w, b, t[:rows], *vec, 1.0, meta(rows, v, dtype=dt))
        K.logits_summary_fwd(meta(n, v // 8), meta(n, dtype=torch.int64), True)
    finally:
        JITFunction.run = real
        direct.__exit__(None, None, None)

    rows_out = []
    for fn, args, kwargs in launches:
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
        for cap in (80, 90):
            target = GPUTarget("cuda", cap, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
            t0 = time.perf_counter()
            k = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                res = subprocess.run([str(nv_bin / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                     text=True, check=True).stdout
                sass = subprocess.run([str(nv_bin / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                      check=True).stdout
            usage = {a.lower(): int(b) for a, b in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res.split("Function", 1)[1])}
            mma = len(re.findall(r"\b(HMMA|HGMMA|DMMA)\b", sass))
            rows_out.append({"kernel": fn.fn.__name__, "dtype": str(dtype).replace("torch.", ""), "target": f"sm_{cap}",
                             "BLOCK_M/N/K": "/".join(str(kwargs[x]) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                                                     if x in kwargs) or str(kwargs.get("BLOCK")),
                             "warps": kwargs.get("num_warps"), "stages": kwargs.get("num_stages"),
                             "registers": usage.get("reg"), "spill_bytes": usage.get("local", 0) + usage.get("stack", 0),
                             "shared_bytes": usage.get("shared", 0) + k.metadata.shared,
                             "tensor_core_instructions": mma, "compile_s": round(time.perf_counter() - t0, 1)})
    return rows_out


def main(n: int = 4096, d: int = 256, v: int = 32000, compile_kernels: bool = True) -> None:
    h, w, t = _inputs(n, d, v)
    # correctness of what is timed: the fused gradients equal the materialised ones
    ref = _step(materialised_torch, h, w, t)
    got = _step(fused, h, w, t)
    err = max((a - b).abs().max().item() for a, b in zip(ref, got))
    del ref, got
    threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    times = {(k, name): [] for k in threads for name in VARIANTS}
    for name, fn in VARIANTS.items():  # warm-up
        _step(fn, h, w, t)
    for _ in range(5):  # interleaved rounds: every variant at every thread count in each round
        for k in threads:
            torch.set_num_threads(k)
            for name, fn in VARIANTS.items():
                t0 = time.perf_counter()
                _step(fn, h, w, t)
                times[k, name].append(time.perf_counter() - t0)
    torch.set_num_threads(threads[0])
    buffer = 4 * n * v
    mem = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", name, str(n), str(d), str(v)], capture_output=True,
                             text=True, check=True)
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])
    results = []
    for k in threads:
        base = statistics.median(times[k, "materialised torch"])
        for name in VARIANTS:
            med = statistics.median(times[k, name])
            results.append({"variant": name, "threads": k, "fwd+bwd_ms": 1e3 * med,
                            "fastest_ms": 1e3 * min(times[k, name]), "time_ratio_vs_materialised_torch": med / base,
                            "peak_extra_MiB": mem[name]["extra_bytes"] / 2**20,
                            "peak_extra_logits_buffers": mem[name]["extra_bytes"] / buffer,
                            "working_logits_buffers": (mem[name]["extra_bytes"] - mem[name]["grad_bytes"]) / buffer})
    print(f"N={n} d={d} V={v} fp32, torch threads {torch.get_num_threads()}, one logits buffer {buffer / 2**20:.0f} MiB, "
          f"max |grad diff| fused vs materialised {err:.2e}")
    print(table(results, ["variant", "threads", "fwd+bwd_ms", "fastest_ms", "time_ratio_vs_materialised_torch",
                          "peak_extra_MiB", "peak_extra_logits_buffers", "working_logits_buffers"]))
    paper = gpu_paper()
    print(json.dumps(paper, indent=1))
    kernels = compile_check() if compile_kernels else []
    if kernels:
        cols = list(kernels[0])
        print(table(kernels, cols))
    print("saved", save("linear_head", results, shape={"N": n, "d": d, "V": v}, dtype="float32", beta=BETA,
                        max_grad_diff=err, gpu_on_paper=paper, gpu_compile=kernels))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(_peak_child(sys.argv[2], *(int(a) for a in sys.argv[3:6]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--compile-child":
        print(json.dumps(_compile_child()))
    else:
        flags = [a for a in sys.argv[1:] if a.startswith("--")]
        main(*(int(a) for a in sys.argv[1:] if not a.startswith("--")), compile_kernels="--no-compile" not in flags)
