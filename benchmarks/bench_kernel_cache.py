"""What the C kernel of entropy_normalize costs a process before its first use: a build into an empty
cache (the first process on a machine, or after the source, compiler, flags or CPU changed), and
a load of that build from the cache (every later process, DataLoader workers included).

Each measurement is a fresh Python process timing ``entmath.kernels.cpu.entropy_normalization.build()``
(torch imported first, as any user has); the cache is a new temporary directory
(``ENTMATH_CACHE_DIR``), removed at the end.  The cached load is the median of several processes.

Run:  .venv/bin/python benchmarks/bench_kernel_cache.py
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

CHILD = """
import time, torch
from entmath.kernels.cpu import entropy_normalization as kernel
t0 = time.perf_counter()
kernel.build()
print(time.perf_counter() - t0)
"""
CACHED_RUNS = 7


def one_process(cache: str) -> float:
    env = dict(os.environ, ENTMATH_CACHE_DIR=cache)
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def main():
    with tempfile.TemporaryDirectory(prefix="entmath-cache-bench-") as tmp:
        cache = os.path.join(tmp, "cache")
        first = one_process(cache)
        cached = [one_process(cache) for _ in range(CACHED_RUNS)]
    rows = [{"call": "first process (builds into an empty cache)", "seconds": round(first, 4)},
            {"call": f"later process (loads the cached build), median of {CACHED_RUNS}",
             "seconds": round(statistics.median(cached), 4)},
            {"call": "later process, slowest", "seconds": round(max(cached), 4)}]
    print(table(rows, ["call", "seconds"]))
    print(f"saved {save('kernel_cache', rows)}")


if __name__ == "__main__":
    main()
