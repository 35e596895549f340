"""What each process of tests/test_distributed.py runs: entmath.distributed against the unsharded ops.

One spawn of 4 gloo processes serves every test: the world group (4 ranks) and two groups of 2
ranks ({0, 1} and {2, 3}) each run every case.  Every rank builds the same full inputs from a fixed
seed, takes its slice of the vocabulary, calls the distributed op, and compares value and
gradient with the unsharded entmath op on the full inputs (the gradient of its slice against the
matching slice of the full gradient).  Each rank saves ``{(group size, case): result}`` to
``rank<r>.pt``: the largest differences, or the error message a case was meant to raise.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale


def _diff(got, want):
    """Largest |got - want|, with inf == inf and NaN == NaN counted as agreement."""
    got, want = got.detach().to(F64), want.detach().to(F64)
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    d = torch.where(same, 0.0, (got - want).abs())
    return float(d.max()) if d.numel() else 0.0


def _rel(got, want):
    got, want = got.detach().to(F64), want.detach().to(F64)
    return float(((got - want).abs() / want.abs()).max())


def _grads(out, inputs, weights):
    return torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)


def _slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def case_entropy(rank, P, group, backend):
    import entmath

    n_local = 5
    V = P * n_local
    z = _rand(6, V, seed=1, scale=3.0)
    z[1, :n_local] = float("-inf")  # rank 0's slice of row 1 is empty
    z[2, 3:7] = float("-inf")
    z[3] = -40.0
    z[3, V - 1] = 0.0  # nearly one-hot, the maximum on the last rank
    mine = slice(rank * n_local, (rank + 1) * n_local)
    zl = z[:, mine].clone().requires_grad_()
    zf = z.clone().requires_grad_()
    h = entmath.distributed.entropy(zl, group=group, backend=backend)
    want = entmath.entropy(zf)
    w = torch.linspace(0.5, 1.5, 6, dtype=F64)
    (gl,), (gf,) = _grads(h, [zl], w), _grads(want, [zf], w)
    return {"value": _diff(h, want), "grad": _diff(gl, gf[:, mine]), "one_hot_rel": _rel(h[3], want[3])}


def case_cross_entropy(rank, P, group, backend, sizes=None):
    import entmath

    sizes = sizes or [4] * P
    V = sum(sizes)
    mine = _slices(sizes)[rank]
    z = _rand(7, V, seed=2, scale=2.0)
    t = torch.randint(0, V, (7,), generator=_gen(3))
    t[4] = -100  # ignored
    z[5] = -30.0
    z[5, V - 2] = 10.0
    t[5] = V - 2  # the target holds the maximum of a nearly one-hot row: no cancellation
    z[6, _slices(sizes)[0]] = float("-inf")  # row 6 has no mass in rank 0's slice
    t[6] = V - 1
    kw = dict(label_smoothing=0.1, z_loss=0.01, return_entropy=True, reduction="none")
    if sizes != [4] * P:
        kw.update(vocab_start=mine.start, vocab_size=V)
    zl = z[:, mine].clone().requires_grad_()
    zf = z.clone().requires_grad_()
    loss, ent = entmath.distributed.cross_entropy(zl, t, group=group, backend=backend, **kw)
    kw.pop("vocab_start", None), kw.pop("vocab_size", None)
    want, want_ent = entmath.cross_entropy(zf, t, **kw)
    w = torch.linspace(0.5, 1.5, 7, dtype=F64)
    (gl,) = torch.autograd.grad((loss * w).sum() - 0.3 * (ent * w).sum(), zl)
    (gf,) = torch.autograd.grad((want * w).sum() - 0.3 * (want_ent * w).sum(), zf)
    # the mean reduction, without smoothing, against torch
    zm = z[:, mine].clone().requires_grad_()
    mean = entmath.distributed.cross_entropy(zm, t, group=group, backend=backend,
                                             **({} if sizes == [4] * P else dict(vocab_start=mine.start, vocab_size=V)))
    zt = z.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(zt, t)
    (gm,), (gt,) = torch.autograd.grad(mean, zm), torch.autograd.grad(ref, zt)
    return {"value": _diff(loss, want), "entropy": _diff(ent, want_ent), "grad": _diff(gl, gf[:, mine]),
            "one_hot_rel": _rel(loss[5], want[5]), "mean_vs_torch": _diff(mean, ref), "mean_grad": _diff(gm, gt[:, mine])}


def case_kl(rank, P, group, backend):
    import entmath

    n_local = 3
    V = P * n_local
    a, b = _rand(5, V, seed=4, scale=2.0), _rand(5, V, seed=5, scale=2.0)
    a[1, :n_local] = float("-inf")  # p has no mass in rank 0's slice of row 1
    b[2, V - 1] = float("-inf")  # q lacks mass that p has: KL = +inf
    b[3, :n_local] = float("-inf")
    a[3, :n_local] = float("-inf")  # neither has mass there: finite
    mine = slice(rank * n_local, (rank + 1) * n_local)
    al, bl = a[:, mine].clone().requires_grad_(), b[:, mine].clone().requires_grad_()
    af, bf = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = entmath.distributed.kl(al, bl, group=group, backend=backend)
    want = entmath.kl(af, bf)
    w = torch.linspace(0.5, 1.5, 5, dtype=F64)
    ga, gb = _grads(got, [al, bl], w)
    fa, fb = _grads(want, [af, bf], w)
    return {"value": _diff(got, want), "inf_row": float(got[2].detach()), "grad_p": _diff(ga, fa[:, mine]),
            "grad_q": _diff(gb, fb[:, mine])}


def case_linear(rank, P, group, backend, sizes=None):
    import entmath

    sizes = sizes or [6] * P
    V = sum(sizes)
    mine = _slices(sizes)[rank]
    d = 5
    h = _rand(2, 4, d, seed=6)
    W, bias = _rand(V, d, seed=7), _rand(V, seed=8)
    t = torch.randint(0, V, (2, 4), generator=_gen(9))
    t[1, 2] = -100
    kw = dict(label_smoothing=0.05, z_loss=0.02, temperature=0.8, return_entropy=True)
    extra = {} if sizes == [6] * P else dict(vocab_start=mine.start, vocab_size=V)
    hl, Wl, bl = h.clone().requires_grad_(), W[mine].clone().requires_grad_(), bias[mine].clone().requires_grad_()
    hf, Wf, bf = h.clone().requires_grad_(), W.clone().requires_grad_(), bias.clone().requires_grad_()
    loss, ent = entmath.distributed.linear_cross_entropy(hl, Wl, t, bl, group=group, backend=backend, **kw, **extra)
    want, want_ent = entmath.linear_cross_entropy(hf, Wf, t, bf, **kw)
    gl = torch.autograd.grad(loss - 0.01 * ent.mean(), (hl, Wl, bl))
    gf = torch.autograd.grad(want - 0.01 * want_ent.mean(), (hf, Wf, bf))
    return {"value": _diff(loss, want), "entropy": _diff(ent, want_ent), "grad_hidden": _diff(gl[0], gf[0]),
            "grad_weight": _diff(gl[1], gf[1][mine]), "grad_bias": _diff(gl[2], gf[2][mine])}


def case_errors(rank, P, group, backend):
    """Value errors are raised on every rank alike (never one rank left in a collective)."""
    import entmath

    out = {}
    z = _rand(3, 4 * P, seed=10)
    z[1, 2 + 4 * (P - 1)] = float("nan")  # in the last rank's slice only
    zl = z[:, 4 * rank: 4 * rank + 4]
    for name, call in (("nan_entropy", lambda: entmath.distributed.entropy(zl, group=group, backend=backend)),
                       ("nan_ce", lambda: entmath.distributed.cross_entropy(zl, torch.tensor([0, 1, 2]), group=group,
                                                                            backend=backend)),
                       ("bad_target", lambda: entmath.distributed.cross_entropy(
                           zl.nan_to_num(), torch.tensor([0, 4 * P, 1]), group=group, backend=backend))):
        try:
            call()
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    with entmath.validation(False):
        h = entmath.distributed.entropy(zl, group=group, backend=backend)
    out["validation_off"] = [bool(torch.isnan(h[1])), bool(torch.isfinite(h[[0, 2]]).all())]
    return out


CASES = {
    "entropy": case_entropy,
    "cross_entropy": case_cross_entropy,
    "cross_entropy_uneven": lambda r, P, g, b: case_cross_entropy(r, P, g, b, sizes=[2 + 3 * i for i in range(P)]),
    "kl": case_kl,
    "linear_cross_entropy": case_linear,
    "linear_cross_entropy_uneven": lambda r, P, g, b: case_linear(r, P, g, b, sizes=[3 + 2 * i for i in range(P)]),
    "errors": case_errors,
}


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    results = {}
    for P, group in ((world, None), (2, pairs[rank // 2])):
        group_rank = dist.get_rank(group)
        for backend in ("torch", "triton"):
            for name, case in CASES.items():
                try:
                    results[P, backend, name] = case(group_rank, P, group, backend)
                except Exception:  # recorded, so that the test names the failing case
                    results[P, backend, name] = {"exception": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
