"""The C kernel of the row ops (entmath/kernels/cpu/rows.c): entropy, kl and cross-entropy against
class indices or probability targets on float32/bfloat16 CPU rows.  Implementation checks: the C path against the eager torch
path on the same values (its twin), the registered operators, and the cases the kernel handles
apart (the deep tail, spans beyond the max, bad rows).  Its accuracy against mpmath is held by the
property tests of tests/test_extremes.py and tests/test_cross_entropy.py on the path "c"."""
import pytest
import torch
import torch.nn.functional as F

import entmath
from entmath.kernels.cpu import rows as cpu_rows
from entmath.ops import cross_entropy as ce_op
from entmath.ops import entropy as ent_op
from entmath.ops import kl as kl_op

M = torch.finfo(torch.float32).max


@pytest.fixture
def eager(monkeypatch):
    """A context in which every input takes the eager path (the C kernel's threshold above any size)."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(cpu_rows, "MIN_ELEMS", 1 << 62)
            return fn()
    return run


@pytest.fixture
def calls(monkeypatch):
    """Counts of the C kernel's forward and backward entry points."""
    counts = {}
    for name in ("entropy_fwd", "entropy_bwd", "kl_fwd", "kl_bwd", "ce_fwd", "ce_bwd", "ce_probs_fwd", "ce_probs_bwd",
                 "ce_fwd_reduced", "ce_bwd_reduced", "ce_probs_fwd_reduced", "ce_probs_bwd_reduced"):
        real = getattr(cpu_rows, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(cpu_rows, name, counted)
    return counts


def _rows(dtype, n_rows=16, n=3000, seed=0, scale=3.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, n, generator=g) * scale + offset
    z[1, 5:] = float("-inf")  # a masked row
    z[2, :] = 7.0  # a constant row: all classes at the max
    z[3, 1:] = -95.0  # the deep tail: e^d subnormal
    return z.to(dtype)


TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_entropy_c_path_matches_the_eager_path(dtype, offset, eager, calls):
    z = _rows(dtype, offset=offset)
    w = torch.linspace(-1, 2, z.shape[0])
    zc = z.clone().requires_grad_()
    h = entmath.entropy(zc)
    (h.float() * w).sum().backward()
    assert calls == {"entropy_fwd": 1, "entropy_bwd": 1}
    ze = z.clone().requires_grad_()
    he = eager(lambda: entmath.entropy(ze))
    eager(lambda: (he.float() * w).sum().backward())
    assert calls == {"entropy_fwd": 1, "entropy_bwd": 1}  # the eager run did not reach the kernel
    torch.testing.assert_close(h.float(), he.float(), **TOL[dtype])
    torch.testing.assert_close(zc.grad.float(), ze.grad.float(), **TOL[dtype])


def kw_ignore(opts):
    return opts.get("ignore_index", -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_kl_c_path_matches_the_eager_path(dtype, offset, eager, calls):
    a = _rows(dtype, offset=offset)
    b = _rows(dtype, seed=1, offset=offset)
    b[6] = a[6] + 1e-3  # a close pair: KL of order 1e-7
    b[7, 10:] = float("-inf")  # q has no mass where p has: +inf
    w = torch.linspace(0.5, 2, a.shape[0])

    def run(x, y):
        k = entmath.kl(x, y)
        (torch.where(k.isfinite(), k.float(), 0.0) * w).sum().backward()
        return k

    ac, bc = a.clone().requires_grad_(), b.clone().requires_grad_()
    k = run(ac, bc)
    assert calls == {"kl_fwd": 1, "kl_bwd": 1}
    ae, be = a.clone().requires_grad_(), b.clone().requires_grad_()
    k_e = eager(lambda: run(ae, be))
    assert k[7].item() == float("inf") == k_e[7].item()
    torch.testing.assert_close(k.float(), k_e.float(), **TOL[dtype])
    tol = TOL[dtype] if offset == 0 else dict(rtol=1e-2, atol=2e-3)  # both: p = e^{a - fl(lse)} at 1e4
    torch.testing.assert_close(ac.grad.float(), ae.grad.float(), **tol)
    torch.testing.assert_close(bc.grad.float(), be.grad.float(), **tol)


OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(weight=True),
           dict(weight=True, label_smoothing=0.2, ignore_index=4), dict(label_smoothing=1.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_c_path_matches_the_eager_path(dtype, opts, reduction, eager, calls):
    z = _rows(dtype, offset=50.0)
    n_rows, n = z.shape
    t = torch.randint(0, n, (n_rows,), generator=torch.Generator().manual_seed(1))
    t[0], t[1], t[3] = kw_ignore(opts), 2, 0
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n, generator=torch.Generator().manual_seed(2)).to(dtype)
        kw["weight"][:10] = 0.0
    t[4] = 4  # ignored where ignore_index = 4

    def run(zz):
        loss, h = entmath.cross_entropy(zz, t, reduction=reduction, return_entropy=True, **kw)
        (loss.float().sum() + 0.3 * h.float().sum()).backward()
        return loss, h

    zc = z.clone().requires_grad_()
    loss, h = run(zc)
    assert calls == {"ce_fwd": 1, "ce_bwd": 1}
    ze = z.clone().requires_grad_()
    loss_e, h_e = eager(lambda: run(ze))
    torch.testing.assert_close(loss.float(), loss_e.float(), **TOL[dtype])
    torch.testing.assert_close(h.float(), h_e.float(), **TOL[dtype])
    torch.testing.assert_close(zc.grad.float(), ze.grad.float(), **TOL[dtype])


PROBS_OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(weight=True),
                 dict(weight=True, label_smoothing=0.2, z_loss=1e-3), dict(label_smoothing=1.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", PROBS_OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_probability_targets_c_path_matches_the_eager_path(dtype, opts, reduction, eager, calls):
    z = _rows(dtype, offset=50.0)
    n_rows, n = z.shape
    g = torch.Generator().manual_seed(1)
    y = torch.rand(n_rows, n, generator=g) * (torch.rand(n_rows, n, generator=g) < 0.3)  # mostly 0
    y = y / y.sum(-1, keepdim=True)
    y[1, 5:] = 0.0  # the masked row: zero targets at its -inf logits (0, not NaN, without smoothing)
    z[8, :40] = float("-inf")
    y[8, 20] = 0.5  # a target at a -inf logit: +inf loss, dL/dy = +inf there
    y[9] *= 3.0  # rows need not sum to 1
    y = y.to(dtype)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n, generator=torch.Generator().manual_seed(2)).to(dtype)
        kw["weight"][:10] = 0.0

    def run(zz, yy):
        loss, h = entmath.cross_entropy(zz, yy, reduction=reduction, return_entropy=True, **kw)
        (loss.float().sum() + 0.3 * h.float().sum()).backward()
        return loss, h

    zc, yc = z.clone().requires_grad_(), y.clone().requires_grad_()
    loss, h = run(zc, yc)
    assert calls == {"ce_probs_fwd": 1, "ce_probs_bwd": 1}
    ze, ye = z.clone().requires_grad_(), y.clone().requires_grad_()
    loss_e, h_e = eager(lambda: run(ze, ye))
    assert calls == {"ce_probs_fwd": 1, "ce_probs_bwd": 1}  # the eager run did not reach the kernel
    if reduction == "none":  # +inf where a target (or smoothing's eps / C) meets a -inf logit
        assert loss[8].item() == float("inf")
        smoothed = bool(kw.get("label_smoothing"))
        assert (loss[1].item() == float("inf")) == smoothed and loss[0].item() < float("inf")
    if not opts:  # dL/dy = -g (1 - eps) w log p: +inf at p = 0
        assert bool(yc.grad[8, :40].eq(float("inf")).all())
    torch.testing.assert_close(loss.float(), loss_e.float(), **TOL[dtype])
    torch.testing.assert_close(h.float(), h_e.float(), **TOL[dtype])
    torch.testing.assert_close(zc.grad.float(), ze.grad.float(), **TOL[dtype])
    torch.testing.assert_close(yc.grad.float(), ye.grad.float(), **TOL[dtype], equal_nan=True)


def test_cross_entropy_probability_targets_without_grad_for_the_targets(calls):
    """dL/dy is not formed when y does not require grad; the logits' gradient is the same.  (These
    calls are common calls: ``ops.cross_entropy._common_call``.)"""
    z = _rows(torch.float32)[4:]
    y = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(5)), -1)
    za, zb, yb = z.clone().requires_grad_(), z.clone().requires_grad_(), y.clone().requires_grad_()
    entmath.cross_entropy(za, y, label_smoothing=0.1).backward()
    entmath.cross_entropy(zb, yb, label_smoothing=0.1).backward()
    assert calls == {"ce_probs_fwd_reduced": 2, "ce_probs_bwd_reduced": 2}
    assert torch.equal(za.grad, zb.grad)
    ref = z.clone().requires_grad_()
    F.cross_entropy(ref, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(za.grad, ref.grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_c_path_matches_torch_and_writes_in_place(calls):
    z = _rows(torch.float32)[4:]  # finite rows
    t = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(3))
    ref = z.clone().requires_grad_()
    F.cross_entropy(ref, t, label_smoothing=0.1).backward()
    leaf = z.clone().requires_grad_()
    entmath.cross_entropy(leaf * 1.0, t, label_smoothing=0.1, inplace_backward=True).backward()
    assert calls["ce_bwd"] == 1
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-8)


def test_the_threshold_and_the_paths_it_leaves_alone(monkeypatch):
    small = torch.randn(2, 100)
    big = torch.randn(64, 1000)
    assert ent_op._on_cpu_kernel(small) and ent_op._on_cpu_kernel(big)  # every size by default
    monkeypatch.setattr(cpu_rows, "MIN_ELEMS", 1000)
    assert not ent_op._on_cpu_kernel(small) and ent_op._on_cpu_kernel(big)
    monkeypatch.setenv("ENTMATH_COMPILE", "0")
    assert not ent_op._on_cpu_kernel(big)
    monkeypatch.delenv("ENTMATH_COMPILE")
    assert not ent_op._on_cpu_kernel(big.double()) and not ent_op._on_cpu_kernel(big.half())
    assert kl_op._on_cpu_kernel(big, big) and not kl_op._on_cpu_kernel(big, big.bfloat16())
    t = torch.zeros(64, dtype=torch.long)
    assert ce_op._on_cpu_kernel(big, t, None)
    assert ce_op._on_cpu_kernel(big, None, None, big)  # probability targets of the logits' dtype
    assert not ce_op._on_cpu_kernel(big, None, None, big.double())  # of another dtype: the eager path
    assert not ce_op._on_cpu_kernel(big, None, None)  # no target
    assert not ce_op._on_cpu_kernel(big, t, 30.0)  # soft-capping: the eager path
    assert not ce_op._on_cpu_kernel(big, None, 30.0, big)


def test_span_beyond_the_max_and_the_deep_tail():
    # [M, -M]: z - lse overflows to -inf; the weight of -M is 0 and so is its gradient (was NaN).
    z = torch.tensor([[M, -M]]).repeat(4096, 1).requires_grad_()
    loss = entmath.cross_entropy(z, torch.zeros(4096, dtype=torch.long), reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and bool((z.grad == 0).all())
    h = entmath.entropy(torch.tensor([[M, -M, 0.0]]).repeat(2000, 1))
    assert bool((h == 0).all())
    # every other logit 95 below the max: e^d = 5.5e-42 is subnormal, H = 4999 e^d (95 + ...) != 0
    z = torch.full((2, 5000), -95.0)
    z[:, 0] = 0.0
    want = entmath.entropy(z.double())
    got = entmath.entropy(z)
    assert bool((got > 0).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)


def test_a_constant_row_far_from_zero_keeps_its_gradient():
    # lse = 1e30 + log 8 rounds to 1e30: the residual carries log 8 (p = 1/8, not 1)
    z = torch.full((4096, 8), 1e30, requires_grad=True)
    entmath.cross_entropy(z, torch.zeros(4096, dtype=torch.long), reduction="sum").backward()
    want = torch.full((8,), 0.125)
    want[0] = -0.875
    torch.testing.assert_close(z.grad[0], want)


def test_bad_rows_raise_or_give_nan_and_leave_other_rows_alone():
    z = torch.randn(8, 1000)
    z[2, 3] = float("nan")
    z[5, :] = float("-inf")
    with pytest.raises(ValueError, match="logits"):
        entmath.entropy(z)
    t = torch.zeros(8, dtype=torch.long)
    t[6] = 5000  # out of range
    with entmath.validation(False):
        h = entmath.entropy(z)
        zz = z.clone().requires_grad_()
        loss = entmath.cross_entropy(zz, t, reduction="none")
        loss.sum().backward()
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[2, 5]] = True
    assert bool(h[bad].isnan().all()) and bool(h[~bad].isfinite().all())
    bad[6] = True
    assert bool(loss[bad].isnan().all()) and bool(loss[~bad].isfinite().all())
    assert bool(zz.grad[bad].isnan().all()) and bool(zz.grad[~bad].isfinite().all())
    torch.testing.assert_close(h[~bad], entmath.entropy(z[~bad].double()).float()[:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "graph"])
def test_probability_targets_bad_values_raise_or_give_nan(grad, calls):
    """The kernel counts rows with a NaN or +-inf target (validation reads the count); bad
    targets and bad logits rows raise naming the rows, or with validation off give NaN rows."""
    z = torch.randn(8, 1000)
    y = torch.softmax(torch.randn(8, 1000), -1)
    bad_y, bad_z = y.clone(), z.clone()
    bad_y[3, 7] = float("nan")
    bad_y[5, 0] = float("inf")
    bad_z[2, 3] = float("nan")
    bad_z[6, :] = float("-inf")
    zz = z.clone().requires_grad_(grad)
    with pytest.raises(ValueError, match=r"target contains NaN or \+-inf probabilities \(row\(s\) \[3, 5\]"):
        entmath.cross_entropy(zz, bad_y)
    with pytest.raises(ValueError, match="logits"):
        entmath.cross_entropy(bad_z.requires_grad_(grad), y)
    both_y = bad_y.clone()
    both_y[2, 0] = float("nan")  # a target row whose logits have no distribution is still checked
    with pytest.raises(ValueError, match=r"row\(s\) \[2, 3, 5\]"):
        entmath.cross_entropy(bad_z, both_y)
    assert calls["ce_probs_fwd_reduced"] >= 3  # (the common call's kernel counted them)
    with entmath.validation(False):
        loss = entmath.cross_entropy(bad_z, bad_y, reduction="none")
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[2, 3, 5, 6]] = True
    assert bool(loss[[2, 3, 6]].isnan().all()) and loss[5].item() == float("inf")  # (a +inf target: +inf, as eager)
    torch.testing.assert_close(loss[~bad], F.cross_entropy(z[~bad], y[~bad], reduction="none"))


def test_threads_do_not_change_the_result():
    z = _rows(torch.float32, n_rows=64)
    threads = torch.get_num_threads()
    try:
        y = torch.softmax(z.flip(0), -1)
        y[5, 9] = float("nan")  # counted by whichever thread takes row 5
        runs = []
        for k in (1, 2):
            torch.set_num_threads(k)
            zz, yy = z.clone().requires_grad_(), y.clone().requires_grad_()
            loss = entmath.cross_entropy(zz, torch.nan_to_num(yy), reduction="none", label_smoothing=0.1)
            loss.sum().backward()
            with pytest.raises(ValueError, match=r"row\(s\) \[5\]"):
                entmath.cross_entropy(z, y)
            runs.append((entmath.entropy(z), loss, zz.grad, yy.grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


def test_registered_operators():
    z = _rows(torch.float32, n_rows=8, n=1200)[[0, 4, 5, 6]]
    t = torch.tensor([0, 5, 2, 1199])
    w = torch.linspace(0.5, 2.0, 1200)
    for args in [(z, t, None, 0.0, -100, False), (z, t, w, 0.1, 5, True)]:
        torch.library.opcheck(torch.ops.entmath.cross_entropy_cpu, args)
    torch.library.opcheck(torch.ops.entmath.entropy_cpu, (z,))
    b = z.flip(-1).contiguous()
    torch.library.opcheck(torch.ops.entmath.kl_cpu, (z, b))
    kl, la, lb = torch.ops.entmath.kl_cpu(z, b)
    torch.library.opcheck(torch.ops.entmath.kl_backward_cpu, (z, b, kl, la, lb, torch.ones(4)))
    h, lse = torch.ops.entmath.entropy_cpu(z)
    torch.library.opcheck(torch.ops.entmath.entropy_backward_cpu, (z, h, lse, torch.ones(4)))
    loss, lse, res, ent = torch.ops.entmath.cross_entropy_cpu(z, t, w, 0.1, -100, True)
    torch.library.opcheck(torch.ops.entmath.cross_entropy_backward_cpu,
                          (torch.empty_like(z), z, t, w, lse, res, ent, torch.ones(4), None, torch.ones(4), 0.1, -100))
    y = torch.softmax(z.flip(-1), -1)
    for args in [(z, y, None, 0.0, False), (z, y, w, 0.1, True)]:
        torch.library.opcheck(torch.ops.entmath.cross_entropy_probs_cpu, args)
    loss, lse, res, ent = torch.ops.entmath.cross_entropy_probs_cpu(z, y, w, 0.1, True)
    for want_gy in (False, True):
        torch.library.opcheck(torch.ops.entmath.cross_entropy_probs_backward_cpu,
                              (torch.empty_like(z), z, y, w, lse, res, ent, torch.ones(4), torch.rand(4), torch.ones(4),
                               0.1, want_gy))


def test_compiles_to_one_graph_with_the_kernel_inside():
    z = torch.randn(64, 1000, requires_grad=True)
    t = torch.randint(0, 1000, (64,))

    def loss_fn(z):
        loss, h = entmath.cross_entropy(z, t, return_entropy=True)
        return loss - 0.01 * h.mean() + entmath.entropy(z).mean() + entmath.kl(z, z.flip(0)).mean()

    explain = torch._dynamo.explain(loss_fn)(z)
    assert explain.graph_break_count == 0
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(z)
    (g,) = torch.autograd.grad(got, z)
    want = loss_fn(z)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_want)
