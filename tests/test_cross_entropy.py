"""entmath.cross_entropy: torch.nn.functional.cross_entropy where they overlap, mpmath, gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import entmath
from tests import reference as ref
from tests.strategies import logit_rows

BACKENDS = ["torch", "triton"]


def _case(seed, shape=(6, 4, 5), dtype=torch.float64):
    """Logits (N, C, d) in torch's layout, class targets with some ignored, probability targets."""
    g = torch.Generator().manual_seed(seed)
    n, c, d = shape
    z = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (n, d), generator=g)
    y = torch.softmax(torch.randn(shape, generator=g), dim=1).to(dtype)
    return z, t, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,eps,ignore", list(itertools.product(["none", "mean", "sum"], [0.0, 0.1, 1.0], [-100, 2])))
def test_matches_torch_class_targets(backend, reduction, eps, ignore):
    z, t, _ = _case(0)
    t[0, 0] = t[2, 1] = ignore  # an in-range ignore_index (2) is a real use too
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    want = F.cross_entropy(z1, t, reduction=reduction, label_smoothing=eps, ignore_index=ignore)
    got = entmath.cross_entropy(z2, t, dim=1, reduction=reduction,
                                label_smoothing=eps, ignore_index=ignore, backend=backend)
    torch.testing.assert_close(got, want)
    gout = torch.rand_like(want)
    want.backward(gout)
    got.backward(gout)
    torch.testing.assert_close(z2.grad, z1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,eps", list(itertools.product(["none", "mean", "sum"], [0.0, 0.25])))
def test_matches_torch_probability_targets(backend, reduction, eps):
    z, _, y = _case(1)
    y = y * 1.3  # unnormalised targets are allowed by both
    z1, y1 = z.clone().requires_grad_(), y.clone().requires_grad_()
    z2, y2 = z.clone().requires_grad_(), y.clone().requires_grad_()
    want = F.cross_entropy(z1, y1, reduction=reduction, label_smoothing=eps)
    got = entmath.cross_entropy(z2, y2, dim=1, reduction=reduction, label_smoothing=eps, backend=backend)
    torch.testing.assert_close(got, want)
    gout = torch.rand_like(want)
    want.backward(gout)
    got.backward(gout)
    torch.testing.assert_close(z2.grad, z1.grad)
    torch.testing.assert_close(y2.grad, y1.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_accumulates_in_fp32(dtype, backend):
    z, t, _ = _case(2, shape=(16, 3000, 1), dtype=torch.float32)
    z, t = z.squeeze(-1), t.squeeze(-1).clamp_min(0)
    got = entmath.cross_entropy(z.to(dtype), t, reduction="none", backend=backend)
    want = F.cross_entropy(z.to(dtype).double(), t, reduction="none")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@given(row=logit_rows(max_n=16), data=st.data(), eps=st.sampled_from([0.0, 0.05, 0.5]))
def test_class_target_matches_mpmath(row, data, eps):
    finite = [i for i, v in enumerate(row) if v != float("-inf")]
    t = data.draw(st.sampled_from(finite))
    got = entmath.cross_entropy(torch.tensor([row], dtype=torch.float64), torch.tensor([t]),
                                label_smoothing=eps, reduction="none").item()
    want = ref.cross_entropy_index(row, t, eps)
    assert got == pytest.approx(float(want), rel=1e-12, abs=1e-12)


@given(row=logit_rows(max_n=16, allow_neg_inf=False), data=st.data())
def test_probability_target_matches_mpmath(row, data):
    y = data.draw(st.lists(st.floats(0, 1), min_size=len(row), max_size=len(row)))
    got = entmath.cross_entropy(torch.tensor([row], dtype=torch.float64), torch.tensor([y], dtype=torch.float64),
                                reduction="none").item()
    want = ref.cross_entropy_probs(row, y)
    assert got == pytest.approx(float(want), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_target_mass_on_impossible_class_is_zero_not_nan(backend):
    z = torch.tensor([[0.0, float("-inf"), 1.0]])
    y = torch.tensor([[0.5, 0.0, 0.5]])
    got = entmath.cross_entropy(z, y, reduction="none", backend=backend)
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(float(ref.cross_entropy_probs([0.0, float("-inf"), 1.0], [0.5, 0.0, 0.5])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_correct_prediction_keeps_relative_accuracy(backend):
    z = torch.tensor([[30.0, 0.0, -5.0]])
    got = entmath.cross_entropy(z, torch.tensor([0]), reduction="none", backend=backend).item()
    want = float(ref.cross_entropy_index([30.0, 0.0, -5.0], 0))  # ~ e^{-30} ~ 9e-14
    assert abs(got - want) <= 1e-5 * want


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_mean_is_documented_zero(backend):
    z = torch.randn(3, 5, requires_grad=True)
    t = torch.full((3,), -100)
    loss = entmath.cross_entropy(z, t, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_zero_gradient_and_may_be_garbage(backend):
    z = torch.randn(4, 6)
    z[1] = float("-inf")  # an all -inf row is fine when it is ignored
    z.requires_grad_()
    t = torch.tensor([2, -100, 0, 5])
    loss = entmath.cross_entropy(z, t, reduction="sum", backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(z.grad[1], torch.zeros(6))
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    torch.manual_seed(5)
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([4, -100, 0])
    fast = backend == "triton"
    for eps in (0.0, 0.3):
        assert torch.autograd.gradcheck(
            lambda a: entmath.cross_entropy(a, t, label_smoothing=eps, backend=backend), (z,), fast_mode=fast)
        assert torch.autograd.gradcheck(
            lambda a, b: entmath.cross_entropy(a, b, label_smoothing=eps, reduction="sum", backend=backend),
            (z, y), fast_mode=fast)


@pytest.mark.parametrize("n", [1, 3, 1000, 4097])
def test_triton_matches_torch(n):
    torch.manual_seed(n)
    z = torch.randn(5, n) * 4
    z[3, : n // 2] = float("-inf")
    t = torch.randint(0, n, (5,))
    t[3] = n - 1
    t[1] = -100
    y = torch.softmax(torch.randn(5, n), -1)
    for target in (t, y):
        for eps in (0.0, 0.1):
            za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
            a = entmath.cross_entropy(za, target, label_smoothing=eps, reduction="none", backend="torch")
            b = entmath.cross_entropy(zb, target, label_smoothing=eps, reduction="none", backend="triton")
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            a.sum().backward()
            b.sum().backward()
            torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_is_entropy_plus_kl():
    # H(p, q) = H(p) + KL(p || q), across three independent ops
    torch.manual_seed(6)
    a = torch.randn(7, 11, dtype=torch.float64)
    b = torch.randn(7, 11, dtype=torch.float64)
    ce = entmath.cross_entropy(b, torch.softmax(a, -1), reduction="none")
    torch.testing.assert_close(ce, entmath.entropy(a) + entmath.kl(a, b))


# --- the fused op: z-loss, entropy from the same pass, in-place backward (Chapter 5) ---------


def _manual(z, t, eps, ignore, z_loss, reduction):
    """z-loss by its formula on top of torch's cross-entropy: sum_rows valid * z_loss * lse^2."""
    ce = F.cross_entropy(z, t, label_smoothing=eps, ignore_index=ignore, reduction="none")
    valid = t != ignore
    rows = torch.where(valid, ce + z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_z_loss_against_manual_formula(backend, reduction, eps):
    torch.manual_seed(7)
    z = torch.randn(6, 9, dtype=torch.float64) * 3
    t = torch.tensor([0, 8, -100, 3, 3, 1])
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    want = _manual(z1, t, eps, -100, 1e-2, reduction)
    got = entmath.cross_entropy(z2, t, label_smoothing=eps, reduction=reduction, z_loss=1e-2, backend=backend)
    torch.testing.assert_close(got, want)
    g = torch.rand_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(z2.grad, z1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_gradcheck(backend):
    torch.manual_seed(8)
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 4])
    fast = backend == "triton"
    assert torch.autograd.gradcheck(
        lambda a: entmath.cross_entropy(a, t, z_loss=0.1, label_smoothing=0.1, backend=backend), (z,), fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda a, b: entmath.cross_entropy(a, b, z_loss=0.1, reduction="none", backend=backend), (z, y), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True])
def test_entropy_from_the_same_pass(backend, soft):
    torch.manual_seed(9)
    z = torch.randn(2, 7, 300) * 4
    z[1, 2, :100] = float("-inf")
    t = torch.randint(0, 300, (2, 7))
    t[0, 3] = -100
    target = torch.softmax(torch.randn(2, 7, 300), -1) if soft else t
    loss, ent = entmath.cross_entropy(z, target, reduction="none", return_entropy=True, backend=backend)
    want = entmath.entropy(z, backend=backend)
    if not soft:
        want = torch.where(t != -100, want, 0.0)  # documented: ignored rows report 0
    assert ent.shape == want.shape == (2, 7)
    torch.testing.assert_close(ent, want, rtol=1e-5, atol=1e-6)
    assert not ent.requires_grad
    torch.testing.assert_close(loss, entmath.cross_entropy(z, target, reduction="none", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient_in_the_logits_buffer(backend, reduction, dtype):
    torch.manual_seed(10)
    w = torch.randn(16, 40, dtype=dtype, requires_grad=True)
    x = torch.randn(5, 16, dtype=dtype)
    t = torch.tensor([0, 39, -100, 7, 7])

    def run(inplace):
        w.grad = None
        logits = x @ w  # the usual lm-head: matmul saves x and w, not its output
        loss = entmath.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                     inplace_backward=inplace, backend=backend)
        loss.backward(torch.full_like(loss, 0.5))
        return loss.detach(), w.grad.clone(), logits

    l1, g1, logits1 = run(False)
    l2, g2, logits2 = run(True)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    assert not torch.equal(logits1, logits2)  # the in-place run overwrote its logits with the gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_probability_target_gradient_when_the_logits_need_none(backend, eps):
    # Only the targets require grad: their gradient must still be computed (it was left
    # uninitialised when the logits' gradient was not asked for).
    g = torch.Generator().manual_seed(21)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64)
    y = torch.softmax(torch.randn(4, 9, generator=g, dtype=torch.float64), -1).requires_grad_()
    got, = torch.autograd.grad(entmath.cross_entropy(z, y, label_smoothing=eps, backend=backend), y)
    yr = y.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.cross_entropy(z, yr, label_smoothing=eps), yr)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_inplace_backward_refuses_a_second_backward():
    z = torch.randn(4, 6, requires_grad=True)
    logits = z * 1.0
    loss = entmath.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_default_mode_can_backpropagate_twice():
    z = torch.randn(4, 6, requires_grad=True)
    loss = entmath.cross_entropy(z * 1.0, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    g = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True])
def test_half_precision_every_option_against_fp64_torch(dtype, backend, soft):
    torch.manual_seed(11)
    z = (torch.randn(8, 257) * 3).to(dtype)
    t = torch.randint(0, 257, (8,))
    t[2] = -100
    y = torch.softmax(torch.randn(8, 257), -1)
    target = y if soft else t
    z1 = z.double().requires_grad_()
    z2 = z.clone().requires_grad_()
    want = F.cross_entropy(z1, y.double() if soft else t, label_smoothing=0.1)
    got = entmath.cross_entropy(z2, y.to(dtype) if soft else target, label_smoothing=0.1, backend=backend)
    assert got.dtype == dtype
    tol = 4 * torch.finfo(dtype).eps
    # fp32 accumulation: the only errors are the rounding of the inputs (y) and of the outputs
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol if soft else 1e-6)
    want.backward()
    got.backward()
    assert z2.grad.dtype == dtype
    torch.testing.assert_close(z2.grad.double(), z1.grad, rtol=tol, atol=tol / 100)


def test_bad_z_loss():
    z, t = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
            entmath.cross_entropy(z, t, z_loss=bad)
    with pytest.raises(TypeError, match="z_loss must be a float"):
        entmath.cross_entropy(z, t, z_loss="0.1")
