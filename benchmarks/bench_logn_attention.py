"""Benchmark for Chapter 3: entmath.attention_entropy and entmath.logn_attention on the CPU.

    .venv/bin/python benchmarks/bench_logn_attention.py

1. attention_entropy (chunked torch path, the CPU backend) against the explicit n x n computation
   (softmax and log_softmax of the full logit matrix; and entmath.entropy of that matrix) at
   n = 4096, d = 64, 8 heads: median time, and peak memory.  Peak memory is also measured at
   several n to show its growth: O(n d) for attention_entropy, O(n^2) for the explicit baseline.
2. logn_attention against plain scaled_dot_product_attention at the same shape (target: <= 1.2x).

In the JSON, ``rows`` holds every measurement; ``time_ratio`` is relative to the row's baseline
(the explicit computation, or SDPA, with the same masking) and ``peak_memory_ratio`` to the
explicit softmax/log_softmax computation at the same n.

Timings: all methods in this one process, repeats interleaved (ABAB...) so that load from other
processes on a shared machine hits every method alike; the median is reported.
Peak memory: the kernel's peak resident set size (VmHWM, reset through /proc/self/clear_refs)
minus the resident size just before the call, each measurement in a fresh interpreter started by
this script, so no method inherits heap pages another one left resident.  Linux only.
Results go to benchmarks/results/logn_attention.json.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import entmath  # noqa: E402
from entmath.ops.attention_entropy import _chunk_size, attention_entropy  # noqa: E402
from entmath.ops.logn_attention import logn_attention  # noqa: E402

HEADS, D, N = 8, 64, 4096
TRAIN_LENGTH = 2048
MEM_N_CHUNKED = [1024, 2048, 4096, 8192, 16384]
MEM_N_EXPLICIT = [1024, 2048, 4096]  # 8192 would need ~8 GiB for the n x n temporaries
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "logn_attention.json")


def explicit_entropy(q, k, scale, is_causal=False):
    """The textbook computation: the full (heads, n, n) logits, softmax and log-softmax."""
    z = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        n = z.shape[-1]
        z = z.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(z, -1)
    return -(p * torch.log_softmax(z, -1).clamp_min(torch.finfo(z.dtype).min)).sum(-1)


def explicit_entmath(q, k, scale):
    """entmath.entropy on the materialised (heads, n, n) logits."""
    return entmath.entropy((q @ k.transpose(-1, -2)) * scale)


ENTROPY_METHODS = {
    "attention_entropy": lambda q, k, s: attention_entropy(q, k, scale=s, backend="torch"),
    "explicit softmax/log_softmax": explicit_entropy,
    "explicit entmath.entropy(n x n)": explicit_entmath,
}


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, HEADS, n, D, generator=g) for _ in range(3)]


def machine():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": "cpu", "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def interleaved_medians(fns: dict, repeats: int):
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


# ---------------------------------------------------------------------------- peak memory (child)
def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, n: int):
    q, k, _ = inputs(n)
    scale = 1 / math.sqrt(D)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    base = _vm("VmRSS")
    with torch.no_grad():
        ENTROPY_METHODS[method](q, k, scale)
    print(json.dumps({"peak_bytes": _vm("VmHWM") - base}))


def peak_bytes(method: str, n: int) -> int:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def analytic_bytes(method: str, n: int) -> int:
    """Bytes of the temporaries each method must hold at once (fp32)."""
    if method == "attention_entropy":  # one chunk of logits + its exp, plus q*scale
        return 4 * HEADS * n * (2 * min(_chunk_size(None, HEADS * n), n) + D)
    if method == "explicit softmax/log_softmax":
        return 4 * HEADS * n * n * 4  # logits, softmax, log_softmax, their product
    return 4 * HEADS * n * n * 3  # logits, and softmax_stats' z - m and exp(z - m)


# ---------------------------------------------------------------------------- main
def main():
    torch.manual_seed(0)
    report = {"machine": machine(), "shape": {"batch": 1, "heads": HEADS, "n": N, "d": D},
              "chunk_size": _chunk_size(None, HEADS * N), "train_length": TRAIN_LENGTH, "rows": []}
    rows = report["rows"]
    print(f"machine: {report['machine']}")

    # 1. attention_entropy: time at n = 4096
    q, k, v = inputs(N)
    scale = 1 / math.sqrt(D)
    with torch.no_grad():
        ref = explicit_entropy(q, k, scale)
        err = (attention_entropy(q, k, scale=scale) - ref).abs().max().item()
        fns = {name: (lambda f=f: f(q, k, scale)) for name, f in ENTROPY_METHODS.items()}
        fns["attention_entropy (causal)"] = lambda: attention_entropy(q, k, scale=scale, is_causal=True)
        fns["explicit (causal)"] = lambda: explicit_entropy(q, k, scale, is_causal=True)
        med, raw = interleaved_medians(fns, repeats=5)
    base = med["explicit softmax/log_softmax"]
    print(f"\n1. attention entropy, heads={HEADS}, n={N}, d={D}, fp32 "
          f"(max |attention_entropy - explicit| = {err:.2e} nats)")
    print(f"{'method':<34}{'median s':>10}{'x explicit':>12}")
    for name, t in med.items():
        ref_t = med["explicit (causal)"] if "causal" in name else base
        print(f"{name:<34}{t:>10.3f}{t / ref_t:>12.2f}")
        rows.append({"benchmark": "entropy time", "method": name, "n": N, "median_s": round(t, 4),
                     "time_ratio": round(t / ref_t, 3)})
    report["entropy_time_raw_s"] = raw
    report["entropy_max_abs_err_vs_explicit"] = err

    # 1b. peak memory against n
    print("\n   peak memory (MiB): measured peak RSS increase / analytic temporaries")
    mem = {}
    print(f"{'n':>7}" + "".join(f"{m[:31]:>34}" for m in ENTROPY_METHODS))
    for n in MEM_N_CHUNKED:
        row = {}
        for method in ENTROPY_METHODS:
            if method != "attention_entropy" and n not in MEM_N_EXPLICIT:
                row[method] = None
                continue
            row[method] = {"measured": peak_bytes(method, n), "analytic": analytic_bytes(method, n)}
        mem[n] = row
        cells = ["-" if r is None else f"{r['measured'] / 2**20:.0f} / {r['analytic'] / 2**20:.0f}" for r in row.values()]
        print(f"{n:>7}" + "".join(f"{c:>34}" for c in cells))
    for n, row in mem.items():
        ex_n = row["explicit softmax/log_softmax"]
        for method, r in row.items():
            if r is not None:
                rows.append({"benchmark": "entropy peak memory", "method": method, "n": n,
                             "peak_MiB": round(r["measured"] / 2**20, 1), "analytic_MiB": round(r["analytic"] / 2**20, 1),
                             "peak_memory_ratio": None if ex_n is None else round(r["measured"] / ex_n["measured"], 3)})
    ae = [mem[n]["attention_entropy"]["measured"] for n in MEM_N_CHUNKED]
    growth = [b / a for a, b in zip(ae, ae[1:])]
    ex = [mem[n]["explicit softmax/log_softmax"]["measured"] for n in MEM_N_EXPLICIT]
    ex_growth = [b / a for a, b in zip(ex, ex[1:])]
    print(f"   growth per doubling of n: attention_entropy {', '.join(f'{g:.2f}' for g in growth)} "
          f"(O(n): 2);  explicit {', '.join(f'{g:.2f}' for g in ex_growth)} (O(n^2): 4)")
    at_n = mem[N]
    print(f"   at n={N}: explicit / attention_entropy peak = "
          f"{at_n['explicit softmax/log_softmax']['measured'] / at_n['attention_entropy']['measured']:.1f}x")
    report["entropy_peak_growth_per_doubling"] = {"attention_entropy": growth, "explicit": ex_growth}

    # 2. logn_attention against SDPA
    with torch.no_grad():
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "logn_attention": lambda: logn_attention(q, k, v, train_length=TRAIN_LENGTH),
            "sdpa (causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "logn_attention (causal)": lambda: logn_attention(q, k, v, train_length=TRAIN_LENGTH, is_causal=True),
        }
        med2, raw2 = interleaved_medians(fns, repeats=7)
    print(f"\n2. logn_attention vs scaled_dot_product_attention, heads={HEADS}, n={N}, d={D}, fp32")
    print(f"{'method':<26}{'median s':>10}{'x sdpa':>10}")
    ratios = {}
    for name, t in med2.items():
        r = t / (med2["sdpa (causal)"] if "causal" in name else med2["sdpa"])
        ratios[name] = r
        print(f"{name:<26}{t:>10.3f}{r:>10.3f}")
        rows.append({"benchmark": "attention time", "method": name, "n": N, "median_s": round(t, 4),
                     "time_ratio": round(r, 3)})
    ok = all(r <= 1.2 for r in ratios.values())
    print(f"   target logn_attention <= 1.2x SDPA: {'met' if ok else 'MISSED'}")
    report["attention_time_raw_s"] = raw2
    report["target_logn_attention_at_most_1.2x_sdpa"] = "met" if ok else "missed"

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"\nwrote {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
