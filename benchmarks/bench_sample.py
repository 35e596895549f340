"""Benchmark of entmath.sample (Chapter 2) on the CPU: entropy-targeted sampling against plain
sampling, torch.softmax + torch.multinomial on the same logits.

Shapes: (1, 500) float32 (one decoding step of a small model: the per-call overhead dominates) and
(64, 32000) float32 (a batch of 64 rows over a 32k vocabulary: the per-element cost dominates).
Target entropy 2 nats, one draw per row.  Timings are medians over interleaved rounds (each round
runs both methods once), so slow phases of a shared machine hit both alike.  The ratio is
entmath.sample's median over the baseline's; the targets are <= 5 at (1, 500) and <= 2 at
(64, 32000).

Run:  .venv/bin/python benchmarks/bench_sample.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

import entmath  # noqa: E402

CASES = [((1, 500), 400), ((64, 32000), 25)]  # shape, rounds
TARGET = 2.0
GOALS = {(1, 500): 5.0, (64, 32000): 2.0}


def rounds(methods: dict, n: int, warmup: int = 10) -> dict:
    """Median seconds of each method over n interleaved rounds."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times = {name: [] for name in methods}
    for _ in range(n):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    torch.manual_seed(0)
    rows = []
    for shape, n in CASES:
        z = torch.randn(*shape) * 3
        med = rounds({
            "entmath.sample": lambda: entmath.sample(z, TARGET),
            "softmax + multinomial": lambda: torch.multinomial(torch.softmax(z, -1), 1),
        }, n)
        base = med["softmax + multinomial"]
        for name, t in med.items():
            rows.append({"shape": f"{shape[0]} x {shape[1]}", "method": name, "median_us": round(t * 1e6, 1),
                         "time_ratio": round(t / base, 3), "goal": GOALS[shape] if name == "entmath.sample" else None})
    print(table(rows, ["shape", "method", "median_us", "time_ratio", "goal"]))
    path = save("sample", rows, target_entropy=TARGET)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
