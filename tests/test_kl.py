"""entmath.kl: mpmath reference, the +inf case, gradients, kernel path."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import entmath
from tests import reference as ref
from tests.strategies import logit_row_pairs

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@given(pair=logit_row_pairs())
def test_matches_mpmath(backend, pair):
    a, b = pair
    got = entmath.kl(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64), backend=backend).item()
    want = float(ref.kl(a, b))
    assert got >= 0
    assert abs(got - want) <= 1e-12 + 1e-10 * abs(want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_exactly_when_p_has_mass_q_lacks(backend):
    a = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, float("-inf")], [0.0, -200.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 0.0, float("-inf")], [0.0, float("-inf"), 0.0]])
    got = entmath.kl(a, b, backend=backend)
    assert got[0].item() == math.inf  # p_3 > 0, q_3 = 0
    assert math.isfinite(got[1].item())  # both lack class 3: fine
    assert got[2].item() == math.inf  # p_2 = e^{-200} underflows in fp32, but is not 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_iff_equal(backend):
    torch.manual_seed(0)
    a = torch.randn(4, 9)
    assert torch.equal(entmath.kl(a, a, backend=backend), torch.zeros(4))
    assert entmath.kl(a, a + 3.0, backend=backend).abs().max() < 1e-6  # shift-invariant (a + 3 rounds)
    assert bool((entmath.kl(a, torch.randn(4, 9), backend=backend) > 0).all())


def test_matches_torch_kl_div():
    torch.manual_seed(1)
    a, b = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    want = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True, reduction="none").sum(1)
    torch.testing.assert_close(entmath.kl(a, b, dim=1), want)


def test_asymmetry():
    a = torch.tensor([[0.0, 0.0, -3.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    assert abs(entmath.kl(a, b).item() - entmath.kl(b, a).item()) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    torch.manual_seed(2)
    a = torch.randn(3, 6, dtype=torch.float64)
    b = torch.randn(3, 6, dtype=torch.float64)
    a[1, 2] = float("-inf")
    b[1, 2] = float("-inf")
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: entmath.kl(x, y, backend=backend), (a, b), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_row_has_documented_gradient_and_leaves_others_alone(backend):
    a = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.1, -1.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 0.3, 0.2]], requires_grad=True)
    entmath.kl(a, b, backend=backend).sum().backward()
    assert torch.equal(a.grad[0], torch.zeros(3))
    p, q = torch.softmax(a.detach(), -1), torch.softmax(b.detach(), -1)
    torch.testing.assert_close(b.grad[0], q[0] - p[0])
    a2 = a.detach()[1:].clone().requires_grad_()
    b2 = b.detach()[1:].clone().requires_grad_()
    entmath.kl(a2, b2, backend=backend).sum().backward()
    torch.testing.assert_close(a.grad[1:], a2.grad)
    torch.testing.assert_close(b.grad[1:], b2.grad)


@pytest.mark.parametrize("n", [1, 3, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch(n, dtype):
    torch.manual_seed(n)
    a = (torch.randn(4, n) * 3).to(dtype)
    b = (torch.randn(4, n) * 3).to(dtype)
    a[2, : n // 2] = float("-inf")
    b[2, : n // 2] = float("-inf")
    aa, ab = a.clone().requires_grad_(), a.clone().requires_grad_()
    ba, bb = b.clone().requires_grad_(), b.clone().requires_grad_()
    x = entmath.kl(aa, ba, backend="torch")
    y = entmath.kl(ab, bb, backend="triton")
    assert x.dtype == y.dtype == dtype
    torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)
    x.float().sum().backward()
    y.float().sum().backward()
    torch.testing.assert_close(aa.grad.float(), ab.grad.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ba.grad.float(), bb.grad.float(), rtol=1e-2, atol=1e-3)
