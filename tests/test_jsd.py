"""entmath.jsd: mpmath reference, beta's limits, the entropy form, Liger-Kernel's definition, labels."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import entmath
from tests import reference as ref
from tests.strategies import DEEP_TAIL, logit_row_pairs

BACKENDS = ["torch", "triton"]
f64 = torch.float64


def _g(*shape, seed=0, dtype=f64, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def jsd_by_definition(a, b, beta, dim=-1):
    """beta KL(p || m) + (1 - beta) KL(q || m) in plain torch (finite logits)."""
    lp, lq = F.log_softmax(a, dim), F.log_softmax(b, dim)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return (beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)).sum(dim)


@pytest.mark.parametrize("backend", BACKENDS)
@given(pair=logit_row_pairs(), beta=st.sampled_from([0.5, 0.1, 0.9]) | st.floats(0.001, 0.999))
def test_matches_mpmath(backend, pair, beta):
    a, b = pair
    got = entmath.jsd(torch.tensor([a], dtype=f64), torch.tensor([b], dtype=f64), beta, backend=backend).item()
    want = float(ref.jsd_exact(a, b, beta))
    assert 0 <= got <= -beta * math.log(beta) - (1 - beta) * math.log1p(-beta) + 1e-15  # <= h(beta)
    assert abs(got - want) <= 1e-300 + 1e-13 * want


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_and_one_are_the_two_kls_as_liger_defines_beta(backend):
    a, b = _g(4, 7), _g(4, 7, seed=1)
    b[1, 3] = float("-inf")  # KL(p || q) = +inf in row 1; KL(q || p) finite
    torch.testing.assert_close(entmath.jsd(a, b, 0.0, backend=backend), entmath.kl(a, b, backend=backend))
    torch.testing.assert_close(entmath.jsd(a, b, 1, backend=backend), entmath.kl(b, a, backend=backend))
    assert math.isinf(entmath.jsd(a, b, 0.0, backend=backend)[1].item())
    # inside (0, 1) it is finite whatever the supports, and tends to 0 at both ends
    inner = entmath.jsd(a, b, 1e-6, backend=backend)
    assert bool(torch.isfinite(inner).all()) and inner.max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_the_mixture_form_and_symmetry(backend):
    """JSD = H(m) - beta H(p) - (1 - beta) H(q) (Chapter 1, eq-ent-jsd), and
    JSD_beta(p || q) = JSD_{1 - beta}(q || p)."""
    a, b = _g(5, 9, scale=2.0), _g(5, 9, seed=1, scale=2.0)
    for beta in (0.2, 0.5, 0.7):
        p, q = torch.softmax(a, -1), torch.softmax(b, -1)
        m = beta * p + (1 - beta) * q
        want = entmath.entropy(m.log()) - beta * entmath.entropy(a) - (1 - beta) * entmath.entropy(b)
        got = entmath.jsd(a, b, beta, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got, entmath.jsd(b, a, 1 - beta, backend=backend), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(got, jsd_by_definition(a, b, beta), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_divergences_keep_relative_accuracy(backend):
    """Rows that differ by eps: the divergence is about beta (1 - beta) Var(eps) / 2, a sum of terms
    of size eps that the entropy form and the definition both lose to cancellation."""
    a = _g(3, 50, dtype=torch.float32, scale=3.0)
    for eps in (1e-2, 1e-4, 1e-5):
        b = a + eps * _g(3, 50, seed=2, dtype=torch.float32)
        got = entmath.jsd(a, b, 0.3, backend=backend).double()
        want = torch.tensor([float(ref.jsd_exact(x, y, 0.3)) for x, y in zip(a.tolist(), b.tolist())], dtype=f64)
        assert bool((want > 0).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        naive = jsd_by_definition(a, b, 0.3).double()
        if eps <= 1e-4:
            assert ((naive - want).abs() / want).max() > 1e-2  # what the straightforward form loses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", DEEP_TAIL)
def test_deep_tail_matches_mpmath(backend, rows):
    """The Triton and torch paths against the exact value (mpmath) where p and q agree to 1e-40 and
    better: within the bound of test_matches_mpmath, both ways round, never 0."""
    a, b = rows
    for x, y, beta in ((a, b, 0.1), (b, a, 0.1), (a, b, 0.5), (a, b, 0.9), (a, b, 0.37)):
        got = entmath.jsd(torch.tensor([x], dtype=f64), torch.tensor([y], dtype=f64), beta, backend=backend).item()
        want = float(ref.jsd_exact(x, y, beta))
        assert 0 < want < 1e-100
        assert abs(got - want) <= 1e-300 + 1e-13 * want, (x, y, beta, got, want)


def test_deep_tail_reference_has_enough_digits():
    """(Of the reference.)  p = (1/2, 1/2), q = softmax(0, d): JSD_1/2 = d^2 / 32 + O(d^4); at a fixed
    120 digits the reference gave twice that for d = 1e-89."""
    assert float(ref.jsd_exact([0.0, 0.0], [0.0, 1e-89], 0.5)) == pytest.approx(1e-178 / 32, rel=1e-14)


def liger_jsd_loss(student_logits, teacher_logits, beta, labels=None, ignore_index=-100):
    """Liger-Kernel's jsd loss as its documentation defines it, written from that definition:
    inputs are log-probabilities X = log Q (student) and Y = log P (teacher), the loss of a row is
    sum_i beta P_i Y_i + (1 - beta) Q_i X_i - M_i log M_i with M = beta P + (1 - beta) Q (forward KL
    KL(P || Q) at beta = 0, reverse KL(Q || P) at beta = 1), rows whose label is ignore_index add 0,
    and the total is divided by the number of rows not ignored."""
    X, Y = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    P, Q = Y.exp(), X.exp()
    if beta == 0:
        rows = (P * (Y - X)).sum(-1)
    elif beta == 1:
        rows = (Q * (X - Y)).sum(-1)
    else:
        M = beta * P + (1 - beta) * Q
        rows = (beta * P * Y + (1 - beta) * Q * X - M * M.log()).sum(-1)
    if labels is None:
        return rows.sum() / rows.numel()
    keep = labels != ignore_index
    return torch.where(keep, rows, 0.0).sum() / keep.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_distillation_loss_matches_liger_definition(beta, backend):
    student, teacher = _g(6, 11).requires_grad_(), _g(6, 11, seed=1)
    labels = torch.tensor([3, -100, 0, 7, -100, 2])
    got = entmath.jsd(teacher, student, beta, labels=labels, reduction="mean", backend=backend)
    s2 = student.detach().clone().requires_grad_()
    want = liger_jsd_loss(s2, teacher, beta, labels)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, student)
    (w,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(g, w)
    assert torch.equal(g[[1, 4]], torch.zeros(2, 11))
    torch.testing.assert_close(entmath.jsd(teacher, student.detach(), beta, reduction="mean", backend=backend),
                               liger_jsd_loss(student.detach(), teacher, beta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero_and_zero_gradient_whatever_they_hold(backend):
    a = _g(4, 5).requires_grad_()
    b = _g(4, 5, seed=1)
    bad = a.detach().clone()
    bad[1, 2] = float("nan")
    bad[3] = float("-inf")
    bad.requires_grad_()
    labels = torch.tensor([0, -1, 1, -1])
    got = entmath.jsd(bad, b, 0.4, labels=labels, ignore_index=-1, backend=backend)
    assert got[1].item() == 0.0 and got[3].item() == 0.0
    want = entmath.jsd(a.detach()[[0, 2]], b[[0, 2]], 0.4, backend=backend)
    torch.testing.assert_close(got[[0, 2]], want)
    (g,) = torch.autograd.grad(got.sum(), bad)
    assert torch.equal(g[[1, 3]], torch.zeros(2, 5))
    assert entmath.jsd(bad, b, 0.4, labels=torch.full((4,), -1), ignore_index=-1, reduction="mean",
                       backend=backend).item() == 0.0  # mean over no rows (documented)
    s = entmath.jsd(a, b, 0.4, labels=labels, ignore_index=-1, reduction="sum", backend=backend)
    torch.testing.assert_close(s, got[[0, 2]].sum())


@pytest.mark.parametrize("n", [1, 3, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch(n, dtype):
    a = _g(4, n, seed=n, dtype=torch.float32, scale=3.0).to(dtype)
    b = _g(4, n, seed=n + 1, dtype=torch.float32, scale=3.0).to(dtype)
    a[2, : n // 2] = float("-inf")
    b[3, : n // 3] = float("-inf")
    aa, ab = a.clone().requires_grad_(), a.clone().requires_grad_()
    ba, bb = b.clone().requires_grad_(), b.clone().requires_grad_()
    x = entmath.jsd(aa, ba, 0.3, backend="torch")
    y = entmath.jsd(ab, bb, 0.3, backend="triton")
    assert x.dtype == y.dtype == dtype
    torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6)
    x.float().sum().backward()
    y.float().sum().backward()
    torch.testing.assert_close(aa.grad.float(), ab.grad.float(), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(ba.grad.float(), bb.grad.float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_autograd_of_the_definition(backend):
    a, b = _g(3, 6).requires_grad_(), _g(3, 6, seed=1).requires_grad_()
    w = _g(3, seed=2)
    ga = torch.autograd.grad((entmath.jsd(a, b, 0.35, backend=backend) * w).sum(), (a, b))
    gw = torch.autograd.grad((jsd_by_definition(a, b, 0.35) * w).sum(), (a, b))
    for x, y in zip(ga, gw):
        torch.testing.assert_close(x, y)


def test_bad_input():
    z = torch.zeros(2, 3)
    for beta, err in ((-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), (True, TypeError),
                      ("0.5", TypeError), (torch.tensor(0.5), TypeError)):
        with pytest.raises(err, match="beta"):
            entmath.jsd(z, z, beta)
    with pytest.raises(ValueError, match="same shape"):
        entmath.jsd(z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        entmath.jsd(z, z, reduction="batchmean")
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        entmath.jsd(z, z, labels=torch.zeros(2))
    with pytest.raises(ValueError, match="labels must have the shape"):
        entmath.jsd(z, z, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        entmath.jsd(z, z, labels=torch.zeros(2, dtype=torch.long), ignore_index=1.0)
    with pytest.raises(TypeError, match="p_logits must have a floating-point dtype"):
        entmath.jsd(torch.zeros(2, 3, dtype=torch.long), z)
    nan = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"q_logits contains NaN \(row\(s\) 1\)"):
        entmath.jsd(z, nan)
    with pytest.raises(ValueError, match="p_logits has row"):
        entmath.jsd(torch.tensor([[0.0, 0, 0], [-math.inf] * 3]), z)
    with entmath.validation(False):
        out = entmath.jsd(z, nan)
    assert torch.equal(out[0], entmath.jsd(z[:1], nan[:1])[0]) and math.isnan(out[1].item())  # other rows unaffected
