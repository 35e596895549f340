"""CPU benchmark of entmath.noise_softmax (Chapter 4), in one run: the source post's O(n^2 K)
scheme, the shared-grid quadrature of entmath and Monte Carlo, on one row of n = 200, 1000 and
4000 normal-noise classes with scores mu ~ N(0, 2^2), float64.

* Matched accuracy: for each target max-abs error, the cheapest setting of each method that
  reaches it (nodes K for the quadratures, samples S for Monte Carlo; Monte Carlo errors are of
  one seeded run), its median time, and the time ratio to entmath.  Settings that would take too
  long here are extrapolated from measured ones (error ~ 1/K for the post's scheme, ~ S^-1/2 for
  Monte Carlo; time linear in K or S) and marked "extrapolated".
* Defaults: the post's K = 64, Monte Carlo with 10^4 samples, entmath's default K; errors,
  |sum p - 1|, and error and time ratios to entmath.
* References: n = 200 and 1000, the definition p_i = int phi(t - mu_i) prod_{j != i} Phi(t - mu_j) dt
  in mpmath (20 digits, composite 20-point Gauss-Legendre in t, all classes on one set of t nodes;
  its own error is estimated by halving the panels).  n = 4000: mpmath is too slow, so the
  reference is entmath's shared grid at K = 128 in float64 (its distance to K = 96 is reported).
* Error curve around the default nodes: max abs error against mpmath (quad of the definition on
  rows of 3 to 1000 classes placed at a few levels, closed forms for n = 2), per noise family and
  K, with mu in [-10, 10].

Time: median of repeats (fewer for slow settings), torch default threads.
Run: .venv/bin/python benchmarks/bench_noise_softmax.py
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import mpmath as mp
import numpy as np
import torch
from scipy import special as sc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table, timeit  # noqa: E402

from entmath.ops.noise_softmax import DEFAULT_NODES, monte_carlo, noise_softmax, seed_scheme  # noqa: E402

TARGETS = [1e-2, 3e-3, 1e-6]
SEED_K = [8, 16, 32, 64, 128, 256, 512]
GRID_K = [2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24]
MC_S = [10**3, 3 * 10**3, 10**4, 3 * 10**4, 10**5, 3 * 10**5]
SLOW_S = 45.0  # a single run longer than this is not attempted; its row is extrapolated


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
def mp_reference(mu: np.ndarray, dps: int = 20, panel: float = 0.5, points: int = 20) -> np.ndarray:
    """The definition in mpmath, normal noise: p_i = int phi(t - mu_i) F(t) / Phi(t - mu_i) dt with
    F = prod_j Phi(t - mu_j), on [a, b] with F(a) < 1e-22 (the mass left of a is at most F(a)) and
    b = max mu + 10 (1 - Phi(10) < 1e-23), by composite Gauss-Legendre shared by all classes."""
    mu = np.asarray(mu, dtype=np.float64)
    lo, hi = mu.max() - 40, mu.max()
    for _ in range(60):  # bisection for log F(a) = log 1e-22, in float64 (it only places a)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sc.log_ndtr(mid - mu).sum() < math.log(1e-22) else (lo, mid)
    a, b = lo, mu.max() + 10
    xg, wg = np.polynomial.legendre.leggauss(points)
    edges = np.arange(a, b + panel, panel)
    with mp.workdps(dps):
        mus = [mp.mpf(float(v)) for v in mu]
        acc = [mp.mpf(0)] * len(mus)
        root2 = mp.sqrt(2)
        for left, right in zip(edges[:-1], edges[1:]):
            for xk, wk in zip(xg, wg):
                t = mp.mpf(float(0.5 * (left + right) + 0.5 * (right - left) * xk))
                cdf = [mp.erfc((m - t) / root2) / 2 for m in mus]
                F = mp.fprod(cdf)
                wt = mp.mpf(float(0.5 * (right - left) * wk)) * F
                for i, (m, c) in enumerate(zip(mus, cdf)):
                    acc[i] += wt * mp.npdf(t - m) / c
        return np.array([float(v) for v in acc])


def mp_grouped(levels, counts, noise, dps=15):
    """Exact p of one class at each level for n = sum(counts) classes at a few levels (mpmath quad)."""
    with mp.workdps(dps):
        if noise == "normal":
            cdf, pdf = (lambda x: mp.erfc(-x / mp.sqrt(2)) / 2), mp.npdf
        elif noise == "logistic":
            cdf = lambda x: 1 / (1 + mp.exp(-x))  # noqa: E731
            pdf = lambda x: cdf(x) * (1 - cdf(x))  # noqa: E731
        else:
            cdf = lambda x: mp.mpf(1) / 2 + mp.atan(x) / mp.pi  # noqa: E731
            pdf = lambda x: 1 / (mp.pi * (1 + x * x))  # noqa: E731
        out = []
        for a, ca in zip(levels, counts):
            def f(t, a=a, ca=ca):
                return pdf(t - a) * cdf(t - a) ** (ca - 1) * mp.fprod(
                    cdf(t - b) ** cb for b, cb in zip(levels, counts) if b != a)
            out.append(float(mp.quad(f, [-mp.inf] + sorted(levels) + [mp.inf])))
        return out


def two_class(noise, d):
    if noise == "normal":
        return 0.5 * math.erfc(-d / 2)
    if noise == "logistic":
        q = math.expm1(d)
        return (q + 1) * (q - d) / (q * q)
    return 0.5 + math.atan(d / 2) / math.pi


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def run_method(method: str, mu: torch.Tensor, param: int) -> torch.Tensor:
    if method == "seed scheme":
        return seed_scheme(mu, "normal", param)
    if method == "entmath shared grid":
        return noise_softmax(mu[None], "normal", nodes=param, backend="torch")[0]
    return monte_carlo(mu, "normal", param, torch.Generator().manual_seed(param))


def measure(method, mu, param, ref):
    t0 = time.perf_counter()
    p = run_method(method, mu, param)
    once = time.perf_counter() - t0
    err = (p - ref).abs().max().item()
    return err, abs(p.sum().item() - 1), once


def timed(method, mu, param, once):
    if once > 10:
        return once, 1  # one run is the measurement
    reps = 3 if once > 1 else 7
    return timeit(lambda: run_method(method, mu, param), repeats=reps, warmup=1), reps


def compare(n: int, mu: torch.Tensor, ref: torch.Tensor) -> list:
    """Error/time of each method over its parameter grid (increasing cost, stopping once every
    target is met or a run would exceed SLOW_S)."""
    grids = {"seed scheme": SEED_K, "entmath shared grid": GRID_K, "Monte Carlo": MC_S}
    scans = {}
    for method, grid in grids.items():
        scans[method] = []
        last_time = 0.0
        for prev, param in zip([None] + grid, grid):
            if prev is not None and last_time * param / prev > SLOW_S:
                break
            err, sum_err, once = measure(method, mu, param, ref)
            scans[method].append({"param": param, "err": err, "sum_err": sum_err, "once": once})
            last_time = once
            if err <= min(TARGETS):
                break
        print(f"  n={n} {method}: " + ", ".join(f"{s['param']}:{s['err']:.1e}" for s in scans[method]), flush=True)

    rows = []
    for target in TARGETS:
        best = {}
        for method, scan in scans.items():
            hit = next((s for s in scan if s["err"] <= target), None)
            if hit is not None:
                t, reps = timed(method, mu, hit["param"], hit["once"])
                best[method] = dict(param=hit["param"], err=hit["err"], time=t, reps=reps, extrapolated=False)
            else:  # extrapolate from the most accurate measured setting
                s = min(scan, key=lambda v: v["err"])
                power = 1.0 if method == "seed scheme" else 2.0  # error ~ K^-1, ~ S^-1/2
                factor = (s["err"] / target) ** power
                best[method] = dict(param=int(math.ceil(s["param"] * factor)), err=target,
                                    time=s["once"] * factor, reps=0, extrapolated=True)
        base = best["entmath shared grid"]["time"]
        for method, b in best.items():
            rows.append({"comparison": "matched accuracy", "n": n, "target_err": target, "method": method,
                         "setting": ("S=" if method == "Monte Carlo" else "K=") + str(b["param"]),
                         "max_err": b["err"], "time_ms": 1e3 * b["time"], "repeats": b["reps"],
                         "extrapolated": b["extrapolated"], "time_ratio_vs_entmath": b["time"] / base})
    return rows, scans


def defaults(n, mu, ref) -> list:
    settings = {"seed scheme": 64, "Monte Carlo": 10**4, "entmath shared grid": DEFAULT_NODES["normal"]}
    out = {}
    for method, param in settings.items():
        err, sum_err, once = measure(method, mu, param, ref)
        t, reps = timed(method, mu, param, once)
        out[method] = dict(param=param, err=err, sum_err=sum_err, time=t, reps=reps)
    base = out["entmath shared grid"]
    rows = []
    for method, o in out.items():
        rows.append({"comparison": "defaults", "n": n, "method": method,
                     "setting": ("S=" if method == "Monte Carlo" else "K=") + str(o["param"]),
                     "max_err": o["err"], "sum_p_minus_1": o["sum_err"], "time_ms": 1e3 * o["time"],
                     "repeats": o["reps"], "error_ratio_vs_entmath": o["err"] / max(base["err"], 1e-17),
                     "time_ratio_vs_entmath": o["time"] / base["time"]})
    return rows


def error_curve() -> dict:
    """Max abs error of noise_softmax (fp64) against mpmath, per family and K, over rows with
    n <= 1000 and mu in [-10, 10]: grouped rows (mpmath quad), n = 2 closed forms at gaps up to 20."""
    grouped = [([10.0, 9.3, 4.0, -2.5, -10.0], [1, 3, 96, 400, 500]),
               ([10.0, 9.99, 0.0, -10.0], [10, 90, 400, 500]),
               ([3.0, 0.0, -3.0], [300, 300, 400]),
               ([10.0, -10.0], [1, 999]),
               ([-10.0, 10.0, 5.0], [2, 1, 7]),
               ([1.0, 0.0], [1, 2])]
    ks = {"normal": [8, 12, 16, 24, 32], "logistic": [8, 16, 24, 32, 48], "cauchy": [64, 128, 192, 256, 384]}
    curve = {}
    for noise in ("normal", "logistic", "cauchy"):
        cases = []
        for levels, counts in grouped:
            exact = mp_grouped(levels, counts, noise)
            mu = torch.tensor(sum(([v] * c for v, c in zip(levels, counts)), []), dtype=torch.float64)
            want = torch.cat([torch.full((c,), e, dtype=torch.float64) for e, c in zip(exact, counts)])
            cases.append((mu, want))
        for d in (0.5, 2.0, 5.0, 10.0, 15.0, 20.0):
            cases.append((torch.tensor([d, 0.0], dtype=torch.float64),
                          torch.tensor([two_class(noise, d), 1 - two_class(noise, d)], dtype=torch.float64)))
        curve[noise] = {}
        for K in ks[noise]:
            curve[noise][str(K)] = max((noise_softmax(mu[None], noise, nodes=K)[0] - want).abs().max().item()
                                       for mu, want in cases)
        print(f"  error curve {noise}: " + ", ".join(f"K={k}: {v:.1e}" for k, v in curve[noise].items()), flush=True)
    return curve


def main() -> None:
    torch.manual_seed(0)
    rows, refs, scans_all = [], {}, {}
    for n in (200, 1000, 4000):
        mu = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 2
        t0 = time.perf_counter()
        if n <= 1000:
            ref = torch.tensor(mp_reference(mu.numpy()))
            coarse = torch.tensor(mp_reference(mu.numpy(), panel=1.0))
            refs[n] = {"kind": "mpmath, 20 digits, composite Gauss-Legendre (panel 0.5, 20 points)",
                       "self_check_max_diff_vs_panel_1.0": (ref - coarse).abs().max().item(),
                       "sum_minus_1": ref.sum().item() - 1, "seconds": time.perf_counter() - t0}
        else:
            ref = noise_softmax(mu[None], "normal", nodes=128)[0]
            k96 = noise_softmax(mu[None], "normal", nodes=96)[0]
            refs[n] = {"kind": "entmath shared grid, K = 128, float64 (mpmath too slow at n = 4000)",
                       "self_check_max_diff_vs_K96": (ref - k96).abs().max().item(),
                       "sum_minus_1": ref.sum().item() - 1, "seconds": time.perf_counter() - t0}
        print(f"n={n}: reference {refs[n]}", flush=True)
        r, scans = compare(n, mu, ref)
        rows += r + defaults(n, mu, ref)
        scans_all[str(n)] = {m: [{k: v for k, v in s.items()} for s in scan] for m, scan in scans.items()}
    curve = error_curve()
    cols = ["comparison", "n", "target_err", "method", "setting", "max_err", "sum_p_minus_1", "time_ms",
            "extrapolated", "time_ratio_vs_entmath", "error_ratio_vs_entmath"]
    print(table(rows, cols))
    path = save("noise_softmax", rows, noise="normal", dtype="float64", mu="N(0, 2^2) per row, seeded by n",
                references={str(k): v for k, v in refs.items()}, scans=scans_all,
                default_nodes=DEFAULT_NODES, error_curve_vs_mpmath=curve)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
