"""CPU benchmark of the fused cross-entropy (Chapter 5) against torch, in one run.

Forward + backward of the mean loss on 4096 x 32000 fp32 logits (class-index targets):

    torch      F.cross_entropy
    entmath    entmath.cross_entropy                        (gradient computed in the forward)
    entmath    entmath.cross_entropy(inplace_backward=True) (gradient written over the logits)

Time: median of repeats in this process.  Peak memory: each variant runs once in a fresh
subprocess; "extra" is the peak resident set size minus the resident size just before the call,
in units of one logits-sized buffer (4096 * 32000 * 4 bytes = 500 MiB).
Run: .venv/bin/python benchmarks/bench_cross_entropy.py [rows] [classes]
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import entmath  # noqa: E402
from common import save, table, timeit  # noqa: E402

VARIANTS = {
    "F.cross_entropy": lambda z, t: F.cross_entropy(z, t),
    "entmath": lambda z, t: entmath.cross_entropy(z, t),
    "entmath inplace_backward": lambda z, t: entmath.cross_entropy(z, t, inplace_backward=True),
}


def _peak_child(name: str, rows: int, n: int) -> dict:
    """Runs in a subprocess: one forward+backward, peak RSS growth over the inputs."""
    torch.manual_seed(0)
    z = (torch.randn(rows, n) * 3).requires_grad_()
    t = torch.randint(0, n, (rows,))
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    VARIANTS[name](z, t).backward()
    return {"extra_bytes": _rss("VmHWM") - before, "buffer_bytes": z.numel() * z.element_size()}


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(rows: int = 4096, n: int = 32000) -> None:
    torch.manual_seed(0)
    z0 = torch.randn(rows, n) * 3
    t = torch.randint(0, n, (rows,))
    results = []
    for name, fn in VARIANTS.items():
        def run():
            z = z0.clone().requires_grad_()  # fresh leaf: inplace_backward overwrites it
            fn(z, t).backward()
        clone = timeit(lambda: z0.clone(), repeats=3, warmup=1)
        seconds = timeit(run, repeats=3, warmup=1) - clone
        out = subprocess.run([sys.executable, __file__, "--child", name, str(rows), str(n)], capture_output=True,
                             text=True, check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({"variant": name, "fwd+bwd_ms": seconds * 1e3,
                        "peak_extra_MiB": mem["extra_bytes"] / 2**20,
                        "peak_extra_buffers": mem["extra_bytes"] / mem["buffer_bytes"]})
    base = results[0]["fwd+bwd_ms"]
    for r in results:
        r["time_ratio_vs_torch"] = r["fwd+bwd_ms"] / base
    # correctness of what was timed: same loss and gradient as torch
    za, zb = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    F.cross_entropy(za, t).backward()
    entmath.cross_entropy(zb, t).backward()
    err = (za.grad - zb.grad).abs().max().item()
    print(f"shape {rows}x{n} fp32, torch threads {torch.get_num_threads()}, max |grad diff| vs torch {err:.2e}")
    print(table(results, ["variant", "fwd+bwd_ms", "time_ratio_vs_torch", "peak_extra_MiB", "peak_extra_buffers"]))
    print("saved", save("cross_entropy", results, shape=[rows, n], dtype="float32", max_grad_diff=err))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_peak_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main(*(int(a) for a in sys.argv[1:3]))
