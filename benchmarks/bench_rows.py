"""CPU benchmark of the row ops against torch's fastest equivalents, interleaved, at 1 and 2 threads.

    entropy        vs  l = F.log_softmax(z); -(l.exp() * l).sum(-1)
    kl             vs  F.kl_div(F.log_softmax(b), F.log_softmax(a), log_target=True, reduction="none").sum(-1)
    cross_entropy  vs  F.cross_entropy(z, t, reduction="none")       (class indices t)
    cross_entropy_probs  vs  F.cross_entropy(z, y, reduction="none")  (probabilities y, softmax of
                           random logits; the gradient flows to z only)

each forward only (no autograd graph) and forward + backward (of the sum), float32, at the shapes
256 x 32000, 32 x 128256, 4096 x 512 and 8 x 500.  Timings alternate between entmath and the
baseline, repeat after repeat, so that a change of load on a shared machine hits both; each is the
median of its repeats.  The ratio is entmath time / baseline time (< 1: entmath is faster).  The
per-call overhead (an op on a 1 x 2 input, where the arithmetic is nothing) is printed apart: on
small inputs it is most of the time.

Run: .venv/bin/python benchmarks/bench_rows.py [--repeats 15] [--threads 1 2] [--ops kl ...]
(``--ops`` times only the ops named and prints without saving: results/rows.json keeps every op.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import entmath  # noqa: E402
from common import save, table  # noqa: E402

SHAPES = [(256, 32000), (32, 128256), (4096, 512), (8, 500)]


def interleaved(fns, repeats: int, warmup: int = 2) -> list:
    """Median time of each function in ``fns``, timed in turn within every repeat."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


OPS = ("entropy", "kl", "cross_entropy", "cross_entropy_probs")


def cases(rows: int, n: int, only=OPS):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, n, generator=g) * 3
    b = torch.randn(rows, n, generator=g) * 3
    t = torch.randint(0, n, (rows,), generator=g)
    y = torch.softmax(torch.randn(rows, n, generator=g), -1)

    def ent_ref(x):
        lp = F.log_softmax(x, -1)
        return -(lp.exp() * lp).sum(-1)

    def kl_ref(x, y):
        return F.kl_div(F.log_softmax(y, -1), F.log_softmax(x, -1), log_target=True, reduction="none").sum(-1)

    ops = {
        "entropy": (lambda x: entmath.entropy(x), ent_ref, [z]),
        "kl": (lambda x, y: entmath.kl(x, y), kl_ref, [z, b]),
        "cross_entropy": (lambda x: entmath.cross_entropy(x, t, reduction="none"),
                          lambda x: F.cross_entropy(x, t, reduction="none"), [z]),
        "cross_entropy_probs": (lambda x: entmath.cross_entropy(x, y, reduction="none"),
                                lambda x: F.cross_entropy(x, y, reduction="none"), [z]),
    }
    for op, (ours, ref, args) in ops.items():
        if op not in only:
            continue

        def fwd(fn, args=args):
            def run():
                with torch.no_grad():
                    fn(*args)
            return run

        def fwd_bwd(fn, args=args):
            leaves = [a.detach().requires_grad_() for a in args]

            def run():
                fn(*leaves).sum().backward()
                for a in leaves:
                    a.grad = None
            return run

        yield op, "forward", fwd(ours), fwd(ref)
        yield op, "forward + backward", fwd_bwd(ours), fwd_bwd(ref)


def overhead(repeats: int) -> list:
    """Per-call time of each op on a 1 x 2 input (no arithmetic to speak of), entmath and torch."""
    z, b, t = torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, dtype=torch.long)
    def ent_ref():
        lp = F.log_softmax(z, -1)
        return -(lp.exp() * lp).sum(-1)

    pairs = {"entropy": (lambda: entmath.entropy(z), ent_ref),
             "kl": (lambda: entmath.kl(z, b), lambda: F.kl_div(z, b, log_target=True, reduction="none").sum(-1)),
             "cross_entropy": (lambda: entmath.cross_entropy(z, t, reduction="none"),
                               lambda: F.cross_entropy(z, t, reduction="none"))}
    out = []
    with torch.no_grad():
        for op, (ours, ref) in pairs.items():
            a, r = interleaved([ours, ref], repeats * 20)
            out.append({"op": op, "entmath_us": a * 1e6, "torch_us": r * 1e6})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                    help="time only these ops (the results are printed, not saved)")
    args = ap.parse_args(argv)
    every_op = set(args.ops) == set(OPS)
    rows = {}  # (op, mode, shape) -> the row of the table: times and ratio per thread count
    before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for r, n in SHAPES:
                for op, mode, ours, ref in cases(r, n, args.ops):
                    a, b = interleaved([ours, ref], args.repeats)
                    row = rows.setdefault((op, mode, f"{r}x{n}"), {"op": op, "mode": mode, "shape": f"{r}x{n}"})
                    row[f"entmath ms ({threads} thr)"] = a * 1e3
                    row[f"torch ms ({threads} thr)"] = b * 1e3
                    row[f"ratio ({threads} thr)"] = a / b
                    print(f"{op:20s} {mode:19s} {r}x{n:<7d} {threads} thr  entmath {a * 1e3:9.3f} ms  "
                          f"torch {b * 1e3:9.3f} ms  ratio {a / b:.2f}", flush=True)
        torch.set_num_threads(1)
        calls = overhead(args.repeats) if every_op else []
    finally:
        torch.set_num_threads(before)
    results = list(rows.values())
    cols = ["op", "mode", "shape"] + [f"ratio ({t} thr)" for t in args.threads]
    print(table(results, cols))
    if every_op:
        print("per-call overhead (1 x 2 input, one thread):")
        print(table(calls, ["op", "entmath_us", "torch_us"]))
        print("saved", save("rows", results, overhead=calls, dtype="float32"))
    else:
        print("not saved (--ops names only some ops)")


if __name__ == "__main__":
    main()
