"""entmath.cross_entropy: torch.nn.functional.cross_entropy where they overlap, mpmath, gradients."""
import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mpmath as mp

import entmath
from tests import reference as ref
from tests.paths import C_DTYPES, on_path
from tests.strategies import extreme_rows, logit_rows, round_to

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


# --- accuracy at the extremes (issue 19): the exact result for the same input values ----------
# The stated bound (docstring of entmath.cross_entropy): with r the unit roundoff of the
# accumulation dtype (2^-24 for fp32/fp16/bf16 inputs, 2^-53 for fp64), U = sum_j u_j the target
# mass and H the entropy of softmax(z),
#     |loss - exact| <= LOSS_C r (exact + U H) + r_out exact + tiny_out
# (r_out, tiny_out: rounding and smallest normal of the output dtype).  U H covers the rounding of
# z_j - m inside exp in nearly one-hot rows (exp amplifies it by |z_j - m|, which H bounds).
# The gradient, entry k: |g_k - exact| <= GRAD_C r (U p_k (1 + |log p_k| + H) + u_k) + r_out |g_k| + tiny.
LOSS_C = 8
GRAD_C = 16
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _unit(dtype):
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def _mass(n, target, eps, weight):
    """u_j as floats (the smoothed, weighted target)."""
    w = weight or [1.0] * n
    if isinstance(target, int):
        return [w[j] * (eps / n + ((1 - eps) if j == target else 0.0)) for j in range(n)]
    return [w[j] * ((1 - eps) * target[j] + eps / n) for j in range(n)]


def loss_error(row, target, eps, weight, dtype, backend, softcap=None):
    """(got, exact, allowed error) for one row; the row, target and weights are already values of
    ``dtype`` (so the exact result is that of the op's actual inputs)."""
    z = torch.tensor([row], dtype=dtype)
    tgt = torch.tensor([target]) if isinstance(target, int) else torch.tensor([target], dtype=dtype)
    w = None if weight is None else torch.tensor(weight, dtype=dtype)
    got = entmath.cross_entropy(z, tgt, w, reduction="none", label_smoothing=eps, softcap=softcap,
                                backend=backend).double().item()
    exact = ref.cross_entropy_exact(row, target, eps, weight, softcap)
    zz = ref.soft_capped(row, softcap) if softcap else row
    h = ref.entropy_exact(zz)
    mass = sum(_mass(len(row), target, eps, weight))
    fi = torch.finfo(dtype)
    u, u_out = _unit(dtype), fi.eps / 2
    cap_term = 0 if softcap is None else 4 * mass * softcap  # tanh's rounding, a few u of c per logit
    allowed = LOSS_C * u * (abs(exact) + mass * h + cap_term) + u_out * abs(exact) + fi.tiny
    return got, exact, float(allowed)


def check_loss(row, target, eps, weight, dtype, backend, softcap=None):
    got, exact, allowed = loss_error(row, target, eps, weight, dtype, backend, softcap)
    if exact == mp.inf:
        assert got == float("inf"), (row, target, got)
    elif exact + allowed >= ref.overflow_threshold(dtype):  # rounds to inf, or within the bound of it
        assert got == float("inf") or abs(got - float(exact)) <= allowed, (row, target, got, exact)
    else:  # representable, and no error within the bound rounds to inf: a finite result is due
        assert abs(got - float(exact)) <= allowed, (row, target, eps, weight, got, float(exact), allowed)
    finite = exact != mp.inf and got != float("inf") and float(exact) > 0
    return abs(got - float(exact)) / float(exact) if finite else 0.0  # the relative error, for the record


@st.composite
def ce_cases(draw, dtype, allow_inf=True):
    """(row, target, eps, weight) at the extremes: rows from ``extreme_rows``; a class index
    (mostly a finite logit) or probabilities (mostly 0 where the logit is -inf), label smoothing
    0 or 0.1, class weights or none; all rounded to ``dtype``."""
    row = draw(extreme_rows(dtype))
    n = len(row)
    finite = [i for i, v in enumerate(row) if v != float("-inf")]
    eps = draw(st.sampled_from([0.0, 0.0, 0.1] if allow_inf or len(finite) == n else [0.0]))
    weight = None
    if draw(st.booleans()):
        weight = round_to(draw(st.lists(st.floats(0.0, 4.0), min_size=n, max_size=n)), dtype)
    if draw(st.booleans()):
        target = draw(st.sampled_from(finite if not allow_inf or draw(st.integers(0, 4)) else list(range(n))))
    else:
        y = draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
        if not allow_inf or draw(st.integers(0, 4)):
            y = [v if i in finite else 0.0 for i, v in enumerate(y)]
        target = round_to(y, dtype)
    return row, target, eps, weight


@pytest.mark.parametrize("backend", BACKENDS + ["c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_loss_is_exact_for_the_given_values_at_any_offset_span_or_mask(backend, dtype, data):
    if backend == "c" and dtype not in C_DTYPES:
        pytest.skip("the C kernel takes float32/bfloat16 logits")
    row, target, eps, weight = data.draw(ce_cases(dtype))
    with on_path(backend) as b:
        check_loss(row, target, eps, weight, dtype, b)


def grad_error(row, target, eps, weight, dtype, backend, softcap=None):
    """(got, exact, allowed) gradients of one row's loss with respect to the logits."""
    z = torch.tensor([row], dtype=dtype, requires_grad=True)
    tgt = torch.tensor([target]) if isinstance(target, int) else torch.tensor([target], dtype=dtype)
    w = None if weight is None else torch.tensor(weight, dtype=dtype)
    entmath.cross_entropy(z, tgt, w, reduction="sum", label_smoothing=eps, softcap=softcap,
                          backend=backend).backward()
    got = z.grad.double()[0].tolist()
    n = len(row)
    mass = _mass(n, target, eps, weight)
    total = sum(mass)
    p = ref.softmax_exact(row, softcap)
    zz = ref.soft_capped(row, softcap) if softcap else row
    h = ref.entropy_exact(zz)
    fi = torch.finfo(dtype)
    u, u_out = _unit(dtype), fi.eps / 2
    if backend == "triton" and dtype == torch.bfloat16:
        u_out = fi.eps  # Triton's interpreter truncates fp32 -> bf16 stores (the GPU rounds to nearest)
    exact, allowed = [], []
    for k in range(n):
        slope = 1 if softcap is None else 1 - mp.tanh(mp.mpf(row[k]) / softcap) ** 2
        g = (total * p[k] - mass[k]) * slope
        log_p = abs(mp.log(p[k])) if p[k] > 0 else 0
        # soft-capping: tanh's rounding (a few r of c per logit), and sech^2(z / c) = 4e/(1 + e)^2 with
        # e = exp(-2|z / c|) amplifies the rounding of z / c by 2|z / c|
        cap_term = 0 if softcap is None else 4 * total * p[k] * softcap + (abs(g) * 2 * abs(row[k]) / softcap
                                                                          if g else 0)  # (g = 0 at z = +-inf)
        exact.append(g)
        allowed.append(float(GRAD_C * u * ((total * p[k] * (1 + log_p + h) + mass[k]) * slope + cap_term)
                             + u_out * abs(g) + fi.tiny))
    return got, exact, allowed


@pytest.mark.parametrize("backend", BACKENDS + ["c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_gradient_is_exact_for_the_given_values_at_any_offset_span_or_mask(backend, dtype, data):
    if backend == "c" and dtype not in C_DTYPES:
        pytest.skip("the C kernel takes float32/bfloat16 logits")
    row, target, eps, weight = data.draw(ce_cases(dtype, allow_inf=False))
    with on_path(backend) as b:
        got, exact, allowed = grad_error(row, target, eps, weight, dtype, b)
    for g, e, a in zip(got, exact, allowed):
        assert abs(g - float(e)) <= a, (row, target, eps, weight, got, [float(x) for x in exact])


# --- class weights: torch.nn.functional.cross_entropy's definition, every option ---------------
CLASS_WEIGHTS = torch.tensor([0.3, 2.0, 0.0, 1.5], dtype=torch.float64)  # C = 4, one weight 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction,eps,ignore",
                         list(itertools.product(["none", "mean", "sum"], [0.0, 0.1, 1.0], [-100, 1])))
def test_class_weights_match_torch(backend, soft, reduction, eps, ignore):
    if soft and ignore >= 0:
        pytest.skip("probability targets refuse ignore_index >= 0 (test_probability_targets_refuse_...)")
    z, t, y = _case(3)  # (N, C, d) = (6, 4, 5), classes at dim 1
    t[0, 0] = t[2, 1] = ignore
    t[1, 2] = 2  # a target class of weight 0
    target = y * 1.3 if soft else t
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    y1, y2 = (target.clone().requires_grad_(), target.clone().requires_grad_()) if soft else (t, t)
    want = F.cross_entropy(z1, y1, CLASS_WEIGHTS, reduction=reduction, label_smoothing=eps, ignore_index=ignore)
    got = entmath.cross_entropy(z2, y2, CLASS_WEIGHTS, dim=1, reduction=reduction, label_smoothing=eps,
                                ignore_index=ignore, backend=backend)
    torch.testing.assert_close(got, want)
    gout = torch.rand_like(want)
    want.backward(gout)
    got.backward(gout)
    torch.testing.assert_close(z2.grad, z1.grad)
    if soft:
        torch.testing.assert_close(y2.grad, y1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_z_loss_with_class_weights_is_torch_plus_the_mean_z_loss(backend, reduction):
    """F.cross_entropy(weight) + z_loss * (lse^2 summed or averaged over the non-ignored rows):
    z-loss is not scaled by the class weights (as in Liger-Kernel)."""
    z, _, _ = _case(4, shape=(7, 5, 1))
    z = z.squeeze(-1)
    t = torch.tensor([0, 4, -100, 3, 3, 1, 2])
    w = torch.tensor([0.5, 1.0, 2.0, 0.25, 4.0], dtype=torch.float64)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    valid = t != -100
    zl = torch.where(valid, 0.01 * torch.logsumexp(z1, -1) ** 2, 0.0)
    zl = zl if reduction == "none" else zl.sum() / (valid.sum() if reduction == "mean" else 1)
    want = F.cross_entropy(z1, t, w, reduction=reduction, label_smoothing=0.2) + zl
    got = entmath.cross_entropy(z2, t, w, reduction=reduction, label_smoothing=0.2, z_loss=0.01, backend=backend)
    torch.testing.assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(z2.grad, z1.grad)


def test_weight_is_the_third_positional_argument_and_dim_is_keyword_only():
    z, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(entmath.cross_entropy(z, t, w), F.cross_entropy(z, t, w))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        entmath.cross_entropy(z, t, -1)  # the old positional dim
    with pytest.raises(TypeError):
        entmath.cross_entropy(z, t, None, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_class_weights(backend):
    z, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    with pytest.raises(ValueError, match="weight must be a 1-D tensor with one weight per class"):
        entmath.cross_entropy(z, t, torch.ones(4), backend=backend)
    with pytest.raises(ValueError, match="weight must be a 1-D tensor"):
        entmath.cross_entropy(z, t, torch.ones(1, 3), backend=backend)
    with pytest.raises(TypeError, match="weight must have a floating-point dtype"):
        entmath.cross_entropy(z, t, torch.ones(3, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="weight requires grad"):
        entmath.cross_entropy(z, t, torch.ones(3, requires_grad=True), backend=backend)
    with torch.no_grad():  # nothing is differentiated: fine
        entmath.cross_entropy(z, t, torch.ones(3, requires_grad=True), backend=backend)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight contains NaN or"):
            entmath.cross_entropy(z, t, torch.tensor([1.0, bad, 1.0]), backend=backend)
        with entmath.validation(False):  # no check: the rows whose loss uses it are not finite
            loss = entmath.cross_entropy(z, t, torch.tensor([1.0, 1.0, bad]), reduction="none", backend=backend)
            assert not torch.isfinite(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="weight is on meta"):
        entmath.cross_entropy(z, t, torch.ones(3, device="meta"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_mean_with_every_row_ignored_is_the_documented_zero(backend):
    z = torch.randn(3, 4, requires_grad=True)
    loss = entmath.cross_entropy(z, torch.full((3,), -100), torch.rand(4) + 0.5, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# --- logit soft-capping (Gemma 2, Liger-Kernel): c tanh(z / c) before the softmax -------------
def _capped(z, c):
    return c * torch.tanh(z / c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.1, False), (0.1, True)])
def test_softcap_matches_torch_on_the_capped_logits(backend, soft, eps, weighted):
    z, t, y = _case(5)
    z = z * 10  # logits of tens: the cap (5) bends them
    t[0, 0] = -100
    w = CLASS_WEIGHTS if weighted else None
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    target = y if soft else t
    want = F.cross_entropy(_capped(z1, 5.0), target, w, label_smoothing=eps, reduction="none")
    got, ent = entmath.cross_entropy(z2, target, w, dim=1, softcap=5.0, label_smoothing=eps, reduction="none",
                                     return_entropy=True, backend=backend)
    torch.testing.assert_close(got, want)
    want_ent = entmath.entropy(_capped(z, 5.0), dim=1)
    torch.testing.assert_close(ent, want_ent if soft else torch.where(t != -100, want_ent, 0.0))
    g = torch.rand_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(z2.grad, z1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_gradcheck_and_gradgradcheck(backend):
    torch.manual_seed(12)
    z = (torch.randn(3, 5, dtype=torch.float64) * 4).requires_grad_()
    y = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([4, -100, 0])
    fast = backend == "triton"
    for fn, args in ((lambda a: entmath.cross_entropy(a, t, softcap=3.0, label_smoothing=0.1, z_loss=0.01,
                                                      backend=backend), (z,)),
                     (lambda a, b: entmath.cross_entropy(a, b, softcap=2.0, reduction="sum", backend=backend), (z, y))):
        assert torch.autograd.gradcheck(fn, args, fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, args, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_maps_infinite_logits_to_the_cap(backend):
    """c tanh(+-inf / c) = +-c: with soft-capping a -inf logit is a class of logit -c and +inf is no error."""
    z = torch.tensor([[0.5, float("-inf"), 2.0, float("inf")]], requires_grad=True)
    got = entmath.cross_entropy(z, torch.tensor([2]), softcap=3.0, reduction="none", backend=backend)
    capped = _capped(torch.tensor([[0.5, -1e9, 2.0, 1e9]]), 3.0)
    assert capped[0, 1] == -3.0 and capped[0, 3] == 3.0
    torch.testing.assert_close(got, F.cross_entropy(capped, torch.tensor([2]), reduction="none"))
    got.sum().backward()
    assert z.grad[0, 1] == 0 and z.grad[0, 3] == 0  # sech^2(+-inf) = 0
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_softcap_is_exact_for_the_given_values(backend, dtype, data):
    row, target, eps, weight = data.draw(ce_cases(dtype))
    check_loss(row, target, eps, weight, dtype, backend, softcap=data.draw(st.sampled_from([0.5, 30.0, 1e4])))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_softcap_gradient_is_exact_for_the_given_values(backend, data):
    row, target, eps, weight = data.draw(ce_cases(torch.float32, allow_inf=False))
    got, exact, allowed = grad_error(row, target, eps, weight, torch.float32, backend,
                                     softcap=data.draw(st.sampled_from([0.5, 30.0, 1e4])))
    for g, e, a in zip(got, exact, allowed):
        assert abs(g - float(e)) <= a, (row, target, eps, weight, got, [float(x) for x in exact])


def test_bad_softcap():
    z, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            entmath.cross_entropy(z, t, softcap=bad)
    with pytest.raises(TypeError, match="softcap must be a float"):
        entmath.cross_entropy(z, t, softcap="30")


# --- issue 19: the reproducers, one test each ----------------------------------------------------
M32 = torch.finfo(torch.float32).max


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4, 1e6])
def test_probability_targets_and_label_smoothing_keep_their_digits_at_an_offset(backend, offset):
    """sum_j y'_j (lse - z_j) computed as (sum y') log S + sum_j y'_j (m - z_j): no lse-sized
    cancellation (was 1e-3 relative at 1e4, 2e-6 for smoothing at 1e3; F.cross_entropy: ~1e-7)."""
    g = torch.Generator().manual_seed(13)
    z = torch.randn(6, 40, generator=g) + offset
    y = torch.softmax(torch.randn(6, 40, generator=g), -1)
    t = torch.randint(0, 40, (6,), generator=g)
    soft = entmath.cross_entropy(z, y, reduction="none", backend=backend)
    smooth = entmath.cross_entropy(z, t, label_smoothing=0.1, reduction="none", backend=backend)
    for i in range(6):
        row = z[i].tolist()
        assert soft[i].item() == pytest.approx(float(ref.cross_entropy_exact(row, y[i].tolist())), rel=1e-6)
        assert smooth[i].item() == pytest.approx(float(ref.cross_entropy_exact(row, int(t[i]), 0.1)), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_logits_at_minus_1e38(backend):
    got = entmath.cross_entropy(torch.full((1, 4), -1e38), torch.full((1, 4), 0.4), reduction="none", backend=backend)
    assert got.item() == pytest.approx(1.6 * math.log(4), rel=1e-6)  # was 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_with_logits_near_the_max(backend):
    z = torch.tensor([[M32, 0.99 * M32, 0.5 * M32]])
    got = entmath.cross_entropy(z, torch.tensor([0]), label_smoothing=0.1, reduction="none", backend=backend)
    want = ref.cross_entropy_exact(z[0].tolist(), 0, 0.1)  # 5.8e36; was -inf
    assert got.item() == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_mean_of_losses_near_the_max_does_not_overflow(backend, soft):
    z = torch.tensor([[0.0, -0.75 * M32]] * 3, requires_grad=True)  # each loss 0.75 max: the sum overflows
    target = torch.tensor([[0.0, 1.0]] * 3) if soft else torch.tensor([1, 1, 1])
    loss = entmath.cross_entropy(z, target, backend=backend)
    assert loss.item() == pytest.approx(0.75 * M32, rel=1e-6)  # was inf
    loss.backward()
    torch.testing.assert_close(z.grad, torch.tensor([[1 / 3, -1 / 3]] * 3))
    w = torch.tensor([1.0, 0.5])  # weighted: the sum over rows divided by the sum of target weights
    assert entmath.cross_entropy(z, target, w, backend=backend).item() == pytest.approx(
        (0.375 if soft else 0.75) * M32, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_span_beyond_the_max_overflows_only_where_the_loss_does(backend):
    z = torch.tensor([[M32, -M32, 0.0]])
    ce = functools.partial(entmath.cross_entropy, reduction="none", backend=backend)
    assert ce(z, torch.tensor([[0.3, 0.2, 0.5]])).item() == pytest.approx(0.9 * M32, rel=1e-6)  # 0.2 (2M) + 0.5 M
    assert ce(z, torch.tensor([0])).item() == 0.0
    assert ce(z, torch.tensor([1])).item() == float("inf")  # 2M: not representable
    assert ce(z, torch.tensor([2]), label_smoothing=0.3).item() == pytest.approx(0.7 * M32 + 0.3 * M32, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_from_the_same_pass_across_a_span_beyond_the_max(backend):
    z = torch.tensor([[M32, -M32, 0.0]])
    loss, ent = entmath.cross_entropy(z, torch.tensor([0]), return_entropy=True, reduction="none", backend=backend)
    assert loss.item() == 0.0 and ent.item() == 0.0  # p = (1, 0, e^-max): H = 0 (was NaN on Triton)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
def test_gradient_keeps_its_digits_at_an_offset(backend, offset):
    """p = exp((z - lse) - residual), lse's rounding error carried separately (was 2e-2 relative
    at 1e6: fl(lse) had lost log S)."""
    g = torch.Generator().manual_seed(14)
    z = torch.randn(4, 30, generator=g) + offset
    y = torch.softmax(torch.randn(4, 30, generator=g), -1)
    t = torch.tensor([3, 0, 29, 7])
    for target in (t, y):
        za = z.clone().requires_grad_()
        entmath.cross_entropy(za, target, label_smoothing=0.1, reduction="sum", backend=backend).backward()
        zd = z.double().requires_grad_()  # the same values, in float64
        F.cross_entropy(zd, target.double() if target.is_floating_point() else target, label_smoothing=0.1,
                        reduction="sum").backward()
        # entry k of p - u within 1e-6 of the size of its terms, p_k + u_k (u: the smoothed target)
        u = 0.9 * (target if target.is_floating_point() else F.one_hot(target, 30)).double() + 0.1 / 30
        scale = torch.softmax(z.double(), -1) + u
        assert ((za.grad.double() - zd.grad).abs() <= 1e-6 * scale).all(), (za.grad.double() - zd.grad) / scale


# --- issue 19, item 7: clear errors ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_targets_refuse_a_nonnegative_ignore_index(backend):
    z, y = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1)
    for ii in (0, 2, 100):
        with pytest.raises(ValueError, match="ignore_index is not supported for probability targets"):
            entmath.cross_entropy(z, y, ignore_index=ii, backend=backend)
    entmath.cross_entropy(z, y, ignore_index=-1, backend=backend)  # negative: accepted, as in torch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_probability_targets_are_a_value_error(backend, bad):
    z, y = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1)
    y[1, 2] = bad
    with pytest.raises(ValueError, match=r"target contains NaN or \+-inf probabilities \(row\(s\) \[1\]"):
        entmath.cross_entropy(z, y, backend=backend)
    with entmath.validation(False):  # no check: that row's loss is not finite, the others are right
        loss = entmath.cross_entropy(z, y, reduction="none", backend=backend)
    assert not torch.isfinite(loss[1])
    torch.testing.assert_close(loss[[0, 2]], F.cross_entropy(z[[0, 2]], y[[0, 2]], reduction="none"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16,
                                   torch.int32], ids=str)
def test_every_integer_dtype_holds_class_indices(backend, dtype):
    z = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 4, 2, 1])
    got = entmath.cross_entropy(z, t.to(dtype), backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(z, t))
    with pytest.raises(ValueError, match=r"target has class indices outside \[0, 5\): \[7\]"):
        entmath.cross_entropy(z, torch.tensor([0, 7, 2, 1]).to(dtype), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint64_indices_beyond_int64_are_out_of_range_never_ignored(backend):
    z = torch.randn(2, 3)
    t = torch.tensor([2 ** 64 - 100, 1], dtype=torch.uint64)  # reads as -100 in int64
    with pytest.raises(ValueError, match="target has class indices outside"):
        entmath.cross_entropy(z, t, backend=backend)
    with entmath.validation(False):
        loss = entmath.cross_entropy(z, t, reduction="none", backend=backend)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


def test_ignore_index_must_fit_in_int64():
    z, t = torch.randn(2, 3), torch.tensor([0, 1])
    for bad in (2 ** 70, -(2 ** 63) - 1, 2 ** 63):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            entmath.cross_entropy(z, t, ignore_index=bad)
    entmath.cross_entropy(z, t, ignore_index=2 ** 63 - 1)
    entmath.cross_entropy(z, t, ignore_index=-(2 ** 63))
