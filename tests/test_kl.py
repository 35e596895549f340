"""entmath.kl: mpmath reference, the +inf case, gradients, kernel path."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import entmath
from tests import reference as ref
from tests.strategies import DEEP_TAIL, logit_row_pairs

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
@pytest.mark.parametrize("rows", DEEP_TAIL)
def test_deep_tail_matches_mpmath(backend, rows):
    """The Triton and torch paths against the exact value (mpmath) where p and q agree to 1e-40 and
    better (strategies.DEEP_TAIL): the Triton kernel returned 0.0 for the first (exact 1.7e-155), the
    torch path 8.2e-48 for the second (exact 6.8e-115); with log S_b - log S_a as the shift, its
    rounding swamped the log-ratios."""
    for x, y in (rows, rows[::-1]):
        got = entmath.kl(torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64),
                         backend=backend).item()
        want = float(ref.kl_exact(x, y))
        assert 0 < want < 1e-100
        assert abs(got - want) <= 1e-300 + 1e-13 * want, (x, y, got, want)
    assert float(ref.kl_exact([0.0, 0.0], [0.0, 1e-89])) == pytest.approx(1e-178 / 8, rel=1e-14)  # d^2 / 8


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


# ---- Issue 19: numerics at the extremes ----------------------------------------------------------
M32 = torch.finfo(torch.float32).max


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_cancellation_of_lse_sized_terms(backend):
    """The one-pass kernel computed E_p[a - b] - lse_a + lse_b: 0.0 for logits at -1e38 (exact
    0.111) and errors of 1e-3 at an offset of 1e4."""
    a, b = [0.5, -0.25, 1.0], [-1e38] * 3
    got = entmath.kl(torch.tensor([a]), torch.tensor([b]), backend=backend).item()
    want = float(ref.kl_exact(torch.tensor(a).tolist(), torch.tensor(b).tolist()))
    assert abs(got - want) <= 1e-6 * want
    gen = torch.Generator().manual_seed(3)
    for offset in (1e4, 1e6):
        x = torch.randn(6, 40, generator=gen) * 3 + offset
        y = torch.randn(6, 40, generator=gen) * 3 + offset
        y[:3] = x[:3] + 1e-2 * torch.randn(3, 40, generator=gen) * offset ** 0.5  # near p: small KL
        got = entmath.kl(x, y, backend=backend).double()
        want = torch.tensor([float(ref.kl_exact(r, s)) for r, s in zip(x.tolist(), y.tolist())], dtype=torch.float64)
        assert bool((want > 0).all())
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spans_beyond_the_max_stay_finite(backend):
    """kl(zeros, [M, -M]): q covers every class, so the divergence is finite (M - log 2 rounds to
    M), not +inf; rows spanning 2M give no NaN."""
    got = entmath.kl(torch.zeros(1, 2), torch.tensor([[M32, -M32]]), backend=backend)
    assert got.item() == M32
    x = torch.tensor([[M32, -M32, 0.0], [0.0, M32, -M32]])
    # row 0: log q_0 = -M, KL = M; row 1: log q_1 = -2M, KL = 2M rounds to +inf (correctly)
    assert entmath.kl(x, x.flip(0), backend=backend).tolist() == [M32, float("inf")]
    assert entmath.kl(x, x, backend=backend).tolist() == [0.0, 0.0]
    half = torch.tensor([[0.0, 0.0, 0.0]])
    want = float(ref.kl_exact([0.0, 0.0, 0.0], [M32, -M32, M32]))  # (1/3) 2M + ...: finite
    got = entmath.kl(half, torch.tensor([[M32, -M32, M32]]), backend=backend).item()
    assert abs(got - want) <= 1e-6 * want


@pytest.mark.parametrize("n,backend", [(10**6, "torch"), (2**17, "triton")])
def test_long_rows_keep_relative_accuracy(n, backend):
    """Row sums in blocks (torch) and in chunks (Triton): 1e6 classes lost 6e-5 relative on the
    torch path (a long float32 accumulation inside log_softmax)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, n, generator=gen) * 2
    b = a + 0.3 * torch.randn(2, n, generator=gen)
    b[1] = torch.randn(n, generator=gen) * 2
    got = entmath.kl(a, b, backend=backend).double()
    want = entmath.kl(a.double(), b.double(), backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ---- Issue 20: reductions as F.kl_div defines them -----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions_match_f_kl_div(reduction, backend):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    for dim in (-1, 1, 0):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        got = entmath.kl(aa, bb, dim, reduction=reduction, backend=backend)
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        want = F.kl_div(F.log_softmax(b2, dim), F.log_softmax(a2, dim), reduction=reduction, log_target=True)
        if reduction == "none":
            want = want.sum(dim)
        torch.testing.assert_close(got, want)
        weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).view(got.shape)
        ga = torch.autograd.grad((got * weights).sum(), (aa, bb))
        gw = torch.autograd.grad((want * weights).sum(), (a2, b2))
        for g, w in zip(ga, gw):
            torch.testing.assert_close(g, w)


def test_reduction_is_checked_and_empty_inputs_follow_f_kl_div():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        entmath.kl(z, z, reduction="avg")
    e = torch.zeros(0, 3)
    for r in ("mean", "batchmean"):  # 0 / 0, as F.kl_div
        assert torch.isnan(entmath.kl(e, e, reduction=r)) and torch.isnan(F.kl_div(e, e, reduction=r, log_target=True))
    assert entmath.kl(e, e, reduction="sum").item() == 0.0
