"""Accuracy of entmath.cross_entropy at the extremes, measured: the worst errors against the exact
result (mpmath) for the same input values, over the distribution of the property tests
(tests/test_cross_entropy.py: ``ce_cases``: offsets 1e2..1e30 and near the max, spans up to the
max and beyond, finite masks from -1e4 to -max mixed with -inf, subnormal spreads, fp16/bf16 near
their max, class indices and probabilities, label smoothing, class weights), per backend and
dtype, and the same for ``torch.nn.functional.cross_entropy`` where it applies.

Reported per (backend, dtype):
    loss rel   the worst relative error of the loss where the exact loss is finite and at least
               the dtype's smallest normal number
    loss/bnd   the worst error as a fraction of the bound stated in the op's docstring
    wrong inf  results that are inf/NaN where the exact loss is finite and representable
    grad rel   the worst gradient error, entry k, relative to the scale of its terms U p_k + u_k
               (cases without an inf loss)

Run: TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/accuracy_cross_entropy.py [examples]
"""
from __future__ import annotations

import inspect
import math
import sys
import warnings
from pathlib import Path

import mpmath as mp
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.append(str(Path(__file__).resolve().parents[1]))  # (PYTHONPATH first: another entmath can be measured)
import entmath  # noqa: E402
from tests import reference as ref  # noqa: E402
from tests.test_cross_entropy import DTYPES, LOSS_C, _mass, _unit, ce_cases  # noqa: E402

warnings.filterwarnings("ignore")
HAS_WEIGHT = "weight" in inspect.signature(entmath.cross_entropy).parameters


def _call(impl, row, target, eps, weight, dtype, backend, grad):
    z = torch.tensor([row], dtype=dtype, requires_grad=grad)
    tgt = torch.tensor([target]) if isinstance(target, int) else torch.tensor([target], dtype=dtype)
    w = None if weight is None else torch.tensor(weight, dtype=dtype)
    if impl == "F":
        loss = F.cross_entropy(z, tgt, w, reduction="sum", label_smoothing=eps)
    elif HAS_WEIGHT:
        loss = entmath.cross_entropy(z, tgt, w, reduction="sum", label_smoothing=eps, backend=backend)
    else:
        loss = entmath.cross_entropy(z, tgt, reduction="sum", label_smoothing=eps, backend=backend)
    if grad:
        loss.backward()
        return loss.double().item(), z.grad.double()[0].tolist()
    return loss.double().item(), None


def measure(impl, backend, dtype, examples):
    worst = {"loss rel": 0.0, "loss/bnd": 0.0, "wrong inf": 0, "grad rel": 0.0, "cases": 0}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        row, target, eps, weight = data.draw(ce_cases(dtype))
        if weight is not None and not HAS_WEIGHT and impl != "F":
            weight = None
        n = len(row)
        exact = ref.cross_entropy_exact(row, target, eps, weight)
        try:
            got, grad = _call(impl, row, target, eps, weight, dtype, backend, exact != mp.inf)
        except (RuntimeError, ValueError):
            return  # F refuses some inputs (e.g. NaN from 0 * -inf); not an error of ours
        worst["cases"] += 1
        big = torch.finfo(dtype).max
        if exact != mp.inf and float(exact) < big * (1 - 1e-3) and not math.isfinite(got):
            worst["wrong inf"] += 1
            return
        if exact == mp.inf or not math.isfinite(got):
            return
        mass = _mass(n, target, eps, weight)
        h = ref.entropy_exact(row)
        err = abs(got - float(exact))
        fi = torch.finfo(dtype)
        if float(exact) >= fi.tiny:  # (below the smallest normal number the bound is absolute)
            worst["loss rel"] = max(worst["loss rel"], err / float(exact))
        bound = LOSS_C * _unit(dtype) * (abs(exact) + sum(mass) * h) + fi.eps / 2 * abs(exact) + fi.tiny
        worst["loss/bnd"] = max(worst["loss/bnd"], err / float(bound))
        if grad is not None:
            p = ref.softmax_exact(row)
            total = sum(mass)
            for k in range(n):
                e = total * p[k] - mass[k]
                scale = float(total * p[k] + mass[k])
                if scale > fi.tiny:
                    worst["grad rel"] = max(worst["grad rel"], abs(grad[k] - float(e)) / scale)

    run()
    return worst


def main():
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"entmath from {entmath.__file__}; class weights {'on' if HAS_WEIGHT else 'not supported: left out'}; "
          f"{examples} examples each")
    print(f"{'impl':9} {'dtype':15} {'loss rel':>10} {'loss/bnd':>9} {'wrong inf':>9} {'grad rel':>10} {'cases':>6}")
    for impl, backend in (("entmath", "torch"), ("entmath", "triton"), ("F", "torch")):
        for dtype in DTYPES:
            if impl == "F" and dtype in (torch.float16, torch.bfloat16):
                continue
            w = measure(impl, backend, dtype, examples)
            name = impl if impl == "F" else f"{backend}"
            print(f"{name:9} {str(dtype):15} {w['loss rel']:10.2e} {w['loss/bnd']:9.3f} {w['wrong inf']:9d} "
                  f"{w['grad rel']:10.2e} {w['cases']:6d}", flush=True)


if __name__ == "__main__":
    main()
