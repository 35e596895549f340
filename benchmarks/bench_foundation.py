"""CPU benchmark of the Chapter 1 ops against the obvious torch baselines, in one run.

    entropy        vs  -(softmax * log_softmax).sum()   and  Categorical(logits).entropy()
    kl             vs  F.kl_div(log_softmax(q), log_softmax(p), log_target=True).sum(-1)
    cross_entropy  vs  F.cross_entropy                   (forward + backward)

Ratios are entmath time / baseline time (< 1 means entmath is faster).
Run: .venv/bin/python benchmarks/bench_foundation.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import entmath  # noqa: E402
from common import save, table, timeit  # noqa: E402


def main(rows: int = 256, n: int = 32000) -> None:
    torch.manual_seed(0)
    z = torch.randn(rows, n) * 3
    q = torch.randn(rows, n) * 3
    t = torch.randint(0, n, (rows,))
    results = []

    def naive_entropy():
        return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)

    def categorical_entropy():
        return torch.distributions.Categorical(logits=z, validate_args=False).entropy()

    ent = timeit(lambda: entmath.entropy(z))
    for name, fn in [("naive softmax*log_softmax", naive_entropy), ("Categorical.entropy", categorical_entropy)]:
        base = timeit(fn)
        results.append({"op": "entropy", "baseline": name, "entmath_ms": ent * 1e3, "baseline_ms": base * 1e3,
                        "ratio": ent / base})

    kl_time = timeit(lambda: entmath.kl(z, q))
    base = timeit(lambda: F.kl_div(F.log_softmax(q, -1), F.log_softmax(z, -1), log_target=True, reduction="none").sum(-1))
    results.append({"op": "kl", "baseline": "F.kl_div(log_softmax)", "entmath_ms": kl_time * 1e3,
                    "baseline_ms": base * 1e3, "ratio": kl_time / base})

    def fwd_bwd(fn):
        def run():
            zz = z.detach().requires_grad_()
            fn(zz).backward()
        return run

    ce = timeit(fwd_bwd(lambda zz: entmath.cross_entropy(zz, t)))
    base = timeit(fwd_bwd(lambda zz: F.cross_entropy(zz, t)))
    results.append({"op": "cross_entropy fwd+bwd", "baseline": "F.cross_entropy", "entmath_ms": ce * 1e3,
                    "baseline_ms": base * 1e3, "ratio": ce / base})

    print(f"shape {rows}x{n} fp32, torch threads {torch.get_num_threads()}")
    print(table(results, ["op", "baseline", "entmath_ms", "baseline_ms", "ratio"]))
    print("saved", save("foundation", results, shape=[rows, n], dtype="float32"))


if __name__ == "__main__":
    main()
