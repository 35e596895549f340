"""The common call of ``entmath.cross_entropy`` (``ops.cross_entropy._common_call``).

Implementation checks (the common call against the general path, which the mpmath property tests
of tests/test_cross_entropy.py hold to the exact values): an eager call with CPU float32/bfloat16
logits against int64 class indices or probability targets of their dtype, with no option but
``ignore_index``, ``reduction`` and ``label_smoothing``, runs one C kernel call forward (the
reduction included) and one backward.
It must give the general path's values, gradients and Hessian-vector products, see the same bad
input, and leave every other call to the general path.
"""
import threading

import pytest
import torch

import entmath
from entmath.kernels.cpu import rows as cpu_rows
from entmath.ops import cross_entropy as ce_op

pytestmark = pytest.mark.skipif(not cpu_rows.available(), reason="the C kernel could not be built")


def _inputs(dtype=torch.float32, rows=6, n=300, seed=0, ignored=(4,)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, n, generator=g, dtype=torch.float64).mul_(4).to(dtype)
    t = torch.randint(0, n, (rows,), generator=g)
    if rows > 1:
        z[1, 7:] = float("-inf")  # a masked row
        t[1] = 3  # (a class of the masked row that is not masked)
    for r in ignored:
        t[r] = -100
    return z, t


@pytest.fixture
def general(monkeypatch):
    """Run a call on the general path (the common call declines everything)."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(ce_op, "_common_call", lambda *a, **k: None)
            return fn(*args, **kwargs)

    return run


@pytest.fixture
def calls(monkeypatch):
    """Count the common call's kernel calls."""
    count = []
    for name in ("ce_fwd_reduced", "ce_probs_fwd_reduced"):
        def counted(*args, real=getattr(cpu_rows, name), **kwargs):
            count.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_rows, name, counted)
    return count


def _probabilities(z, seed=1):
    """Probability targets of z's dtype, one row of them with zeros where z is -inf (row 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.softmax(torch.randn(z.shape, generator=g, dtype=torch.float64) * 2, -1)
    if z.shape[0] > 1:
        y[1, 7:] = 0.0
    return y.to(z.dtype)


def test_the_common_call_takes_the_common_call_and_nothing_else(calls):
    z, t = _inputs()
    entmath.cross_entropy(z, t)
    t7 = torch.where(t == -100, 7, t)
    entmath.cross_entropy(z.requires_grad_(), t7, reduction="none", label_smoothing=0.1, ignore_index=7).sum().backward()
    assert len(calls) == 2
    for kwargs in [dict(weight=torch.ones(300)), dict(z_loss=1e-3), dict(softcap=30.0), dict(return_entropy=True),
                   dict(inplace_backward=True)]:
        entmath.cross_entropy(z.detach() * 1, t, **kwargs)
    entmath.cross_entropy(z.detach().double(), t)  # float64: the torch path
    y = _probabilities(z)
    entmath.cross_entropy(z.detach(), y, label_smoothing=0.2)
    assert len(calls) == 3
    entmath.cross_entropy(z.detach(), y.double())  # targets of another dtype
    entmath.cross_entropy(z.detach(), y.t().contiguous().t())  # targets' classes not contiguous
    entmath.cross_entropy(z.detach(), y, weight=torch.ones(300))
    entmath.cross_entropy(z.detach().t().contiguous().t(), t)  # classes not contiguous
    entmath.cross_entropy(z.detach(), t.int())  # int32 indices
    entmath.cross_entropy(z.detach().unsqueeze(0), t.unsqueeze(0), dim=-1)  # three dimensions
    entmath.cross_entropy(z.detach().t(), t, dim=0)  # another class dimension
    torch.func.grad(lambda x: entmath.cross_entropy(x, t))(z.detach())
    assert len(calls) == 3


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ignored", [(), (4,), (0, 1, 2, 3, 4, 5)], ids=["none-ignored", "one-ignored", "all-ignored"])
def test_values_and_gradients_are_the_general_paths(reduction, eps, dtype, ignored, general, calls):
    z, t = _inputs(dtype, ignored=ignored)
    w = torch.linspace(-1.0, 2.0, 6)

    def run():
        zl = z.clone().requires_grad_()
        out = entmath.cross_entropy(zl, t, reduction=reduction, label_smoothing=eps)
        (out * w).sum().backward() if reduction == "none" else (3.0 * out).backward()
        with torch.no_grad():
            plain = entmath.cross_entropy(z, t, reduction=reduction, label_smoothing=eps)
        return out.detach(), plain, zl.grad

    common = run()
    assert len(calls) == 2
    ref = general(run)
    assert len(calls) == 2
    assert common[0].dtype == ref[0].dtype == dtype and common[0].shape == ref[0].shape
    # "sum" and "mean": summed in double by the kernel, in float32 after dividing by the general
    # path, a rounding or two apart; the rows' losses and every gradient are the same numbers.
    tol = dict(rtol=0, atol=0) if reduction == "none" or dtype == torch.bfloat16 else dict(rtol=4e-7, atol=0)
    for a, b in zip(common[:2], ref[:2]):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
    torch.testing.assert_close(common[2], ref[2], rtol=0, atol=0)
    if len(ignored) == 6 and reduction == "mean":  # documented: 0, with zero gradient
        assert common[0].item() == 0.0 and not common[2].any()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("wrt", ["z", "y", "both"])
def test_probability_targets_give_the_general_paths_values_and_gradients(reduction, eps, dtype, wrt, general,
                                                                         calls):
    z, _ = _inputs(dtype)
    y = _probabilities(z)
    w = torch.linspace(-1.0, 2.0, 6)

    def run():
        zl, yl = z.clone().requires_grad_(wrt != "y"), y.clone().requires_grad_(wrt != "z")
        out = entmath.cross_entropy(zl, yl, reduction=reduction, label_smoothing=eps)
        (out * w).sum().backward() if reduction == "none" else (3.0 * out).backward()
        with torch.no_grad():
            plain = entmath.cross_entropy(z, y, reduction=reduction, label_smoothing=eps)
        return out.detach(), plain, zl.grad, yl.grad

    common = run()
    assert len(calls) == 2
    ref = general(run)
    assert len(calls) == 2
    tol = dict(rtol=0, atol=0) if reduction == "none" or dtype == torch.bfloat16 else dict(rtol=4e-7, atol=0)
    for a, b in zip(common[:2], ref[:2]):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(common[2:], ref[2:]):  # (None where not wanted, on both paths)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("target", ["class", "probs"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_hessian_vector_products_are_the_general_paths(target, reduction, general):
    """create_graph=True: the common call's backward builds its graph through the unit."""
    z, t = _inputs()
    y = _probabilities(z)
    v = torch.cos(torch.arange(z.numel(), dtype=z.dtype)).view(z.shape)

    def run():
        zl, yl = z.clone().requires_grad_(), y.clone().requires_grad_()
        out = entmath.cross_entropy(zl, t if target == "class" else yl, reduction=reduction, label_smoothing=0.1)
        g = torch.autograd.grad(out.sum(), zl, create_graph=True)[0]
        wrt = [zl] if target == "class" else [zl, yl]  # (y's part: the mixed second derivative)
        return (g.detach(), *torch.autograd.grad((g * v).sum(), wrt))

    for a, b in zip(run(), general(run)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_gradients_of_any_stride_accumulate_like_the_general_paths(general):
    """The rows' gradient is read at its stride (an expanded one from .sum(), a strided view),
    accumulates into .grad, and passes hooks and retain_graph."""
    z, t = _inputs()
    g_strided = torch.randn(12, generator=torch.Generator().manual_seed(1))[::2]

    def run():
        zl = z.clone().requires_grad_()
        seen = []
        zl.register_hook(lambda g: seen.append(g.clone()))
        out = entmath.cross_entropy(zl, t, reduction="none")
        out.sum().backward(retain_graph=True)
        out.backward(g_strided)
        return zl.grad, seen[0], seen[1]

    for a, b in zip(run(), general(run)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_threads_of_the_kernel_give_what_one_gives():
    """A large input spreads its rows over two threads inside the one kernel call (OpenMP)."""
    z, t = _inputs(rows=128, n=1024)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            zl = z.clone().requires_grad_()
            out = entmath.cross_entropy(zl, t, reduction="none")
            out.sum().backward()
            results.append((out.detach(), zl.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_python_threads_calling_at_once_get_their_own_results():
    """The packed arguments of the kernel calls are per thread (ctypes releases the GIL)."""
    inputs = [_inputs(seed=s, rows=16, n=200 + s) for s in range(4)]
    expected = [entmath.cross_entropy(z, t, reduction="none") for z, t in inputs]
    failures = []

    def work(k):
        z, t = inputs[k]
        for _ in range(200):
            got = entmath.cross_entropy(z, t, reduction="none")
            if not torch.equal(got, expected[k]):
                failures.append(k)
                return

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "graph"])
def test_bad_input_is_seen_as_on_the_general_path(grad, general):
    z, t = _inputs()
    t_bad = t.clone()
    t_bad[2] = 300
    with pytest.raises(ValueError, match=r"class indices outside \[0, 300\): \[300\]"):
        entmath.cross_entropy(z.requires_grad_(grad), t_bad)
    for fill, what in [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (float("-inf"), "every logit is -inf")]:
        zb = z.detach().clone()
        zb[3, :] = float("-inf")
        zb[3, 5] = fill if fill != float("-inf") else float("-inf")
        zb[4, 0] = float("nan")  # an ignored row: not checked
        with pytest.raises(ValueError, match=what):
            entmath.cross_entropy(zb.requires_grad_(grad), t)
        with entmath.validation(False):
            out = entmath.cross_entropy(zb, t, reduction="none")
            ref = general(entmath.cross_entropy, zb, t, reduction="none")
            mean = entmath.cross_entropy(zb, t)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert out[3].isnan() and not out[[0, 1, 2, 4, 5]].isnan().any() and mean.isnan()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "graph"])
def test_bad_probability_targets_and_rows_are_seen_as_on_the_general_path(grad, general):
    z, _ = _inputs()
    y = _probabilities(z)
    y_bad = y.clone()
    y_bad[2, 9] = float("nan")
    with pytest.raises(ValueError, match=r"target contains NaN or \+-inf probabilities \(row\(s\) \[2\]"):
        entmath.cross_entropy(z.requires_grad_(grad), y_bad)
    zb = z.detach().clone()
    zb[3, 5] = float("nan")
    with pytest.raises(ValueError, match="logits contains NaN"):
        entmath.cross_entropy(zb.requires_grad_(grad), y)
    with entmath.validation(False):
        out = entmath.cross_entropy(zb, y_bad, reduction="none")
        ref = general(entmath.cross_entropy, zb, y_bad, reduction="none")
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert out[[2, 3]].isnan().all() and not out[[0, 1, 4, 5]].isnan().any()
