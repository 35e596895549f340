"""entmath.entropy: mpmath reference, gradients, kernel path, dtypes and shapes."""
import math

import mpmath as mp
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import entmath
from tests import reference as ref
from tests.strategies import logit_rows

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@given(row=logit_rows())
def test_matches_mpmath_fp64(backend, row):
    got = entmath.entropy(torch.tensor([row], dtype=torch.float64), backend=backend).item()
    want = ref.entropy(row)
    assert abs(got - want) <= 1e-13 + 1e-12 * abs(want)


@given(row=logit_rows(lo=-20, hi=20))
def test_matches_mpmath_fp32(row):
    got = entmath.entropy(torch.tensor([row], dtype=torch.float32)).item()
    want = float(ref.entropy(row))
    assert abs(got - want) <= 2e-6 + 2e-6 * abs(want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gap", [10.0, 20.0, 40.0, 80.0])
def test_nearly_one_hot_keeps_relative_accuracy(backend, gap):
    # H ~ (1 + gap) e^{-gap}: tiny, and lost entirely by code that rounds 1 + e^{-gap} to 1.
    row = [0.0, -gap, -gap - 1.0]
    got = entmath.entropy(torch.tensor([row], dtype=torch.float32), backend=backend).item()
    want = float(ref.entropy(row))
    assert want > 0 and abs(got - want) <= 1e-5 * want


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_and_equality_cases(backend):
    n = 7
    uniform = torch.zeros(3, n)
    assert torch.allclose(entmath.entropy(uniform, backend=backend), torch.full((3,), math.log(n)))
    one_hot = torch.full((1, n), float("-inf"))
    one_hot[0, 2] = 1.5
    assert entmath.entropy(one_hot, backend=backend).item() == 0.0
    # uniform on a support of size 3 (the rest impossible): log 3, not log 7
    supp = torch.tensor([[0.0, 0.0, 0.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")]])
    assert entmath.entropy(supp, backend=backend).item() == pytest.approx(math.log(3), rel=1e-6)
    z = torch.randn(200, n) * 3
    h = entmath.entropy(z, backend=backend)
    assert bool((h > 0).all()) and bool((h < math.log(n)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    torch.manual_seed(0)
    z = torch.randn(2, 5, 3, dtype=torch.float64)
    z[0, :2, 1] = float("-inf")  # -inf entries: zero gradient, no NaN
    z.requires_grad_()
    # fast_mode checks random projections of the Jacobian: the interpreter is slow per launch
    assert torch.autograd.gradcheck(lambda t: entmath.entropy(t, dim=1, backend=backend), (z,),
                                    fast_mode=backend == "triton")


def test_gradient_formula_against_autograd_of_definition():
    torch.manual_seed(1)
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad(entmath.entropy(z).sum(), z)
    z2 = z.detach().clone().requires_grad_()
    p = torch.softmax(z2, -1)
    (g2,) = torch.autograd.grad(-(p * p.log()).sum(), z2)
    assert torch.allclose(g1, g2, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_torch(n, dtype):
    torch.manual_seed(n)
    z = (torch.randn(5, n) * 4).to(dtype)
    z[1, : n // 2] = float("-inf")
    a = entmath.entropy(z, backend="torch")
    b = entmath.entropy(z, backend="triton")
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    za = z.float().clone().requires_grad_()
    zb = z.float().clone().requires_grad_()
    entmath.entropy(za, backend="torch").sum().backward()
    entmath.entropy(zb, backend="triton").sum().backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shapes_dims_and_noncontiguous(backend):
    torch.manual_seed(2)
    z = torch.randn(2, 7, 3, 5, dtype=torch.float64)
    for dim in range(-4, 4) if backend == "torch" else (1, -1):
        got = entmath.entropy(z, dim=dim, backend=backend)
        p = torch.softmax(z, dim)
        want = -(p * p.log()).sum(dim)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    zt = z.transpose(1, 3)  # non-contiguous along the class dim
    torch.testing.assert_close(entmath.entropy(zt, backend=backend), entmath.entropy(zt.contiguous(), backend=backend))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    torch.manual_seed(3)
    z = (torch.randn(8, 5000) * 2).to(dtype)
    got = entmath.entropy(z)
    want = entmath.entropy(z.double())
    assert got.dtype == dtype
    # the only error left is the final rounding to the half type
    torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=0)


def test_neg_inf_entries_do_not_change_the_entropy():
    torch.manual_seed(4)
    z = torch.randn(6, 10, dtype=torch.float64)
    padded = torch.cat([z, torch.full((6, 5), float("-inf"), dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(entmath.entropy(padded), entmath.entropy(z), rtol=0, atol=1e-15)


@given(row=logit_rows(max_n=12), shift=st.floats(-1e3, 1e3))
def test_shift_invariance(row, shift):
    z = torch.tensor([row], dtype=torch.float64)
    assert entmath.entropy(z + shift).item() == pytest.approx(entmath.entropy(z).item(), abs=1e-9)


def test_mpmath_reference_is_not_trivial():
    # guards the reference itself: the biased-coin example (0.99, 0.01) in bits
    z = [math.log(0.99), math.log(0.01)]
    assert float(ref.entropy(z) / mp.log(2)) == pytest.approx(0.0808, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spans_beyond_the_max_in_the_shared_statistics(backend):
    """[M, -M, 0] spans 2M: x - max overflowed to -inf in softmax_stats.update_stats and
    e * d = 0 * inf gave NaN in every kernel built on it (entropy, kl, cross_entropy's entropy)."""
    M = torch.finfo(torch.float32).max
    x = torch.tensor([[M, -M, 0.0], [-M, 0.0, M], [M, M, -M]])
    want = torch.tensor([0.0, 0.0, math.log(2.0)])
    assert torch.equal(entmath.entropy(x, backend=backend), want)
    _, ent = entmath.cross_entropy(x, torch.tensor([0, 2, 1]), return_entropy=True, reduction="none",
                                   backend=backend)
    assert torch.equal(ent, want)
    # the maximum jumping by more than the max between two chunks of a long row (Triton's rescaling)
    long = torch.full((1, 5000), -M)
    long[0, 4500:] = M
    assert entmath.entropy(long, backend=backend).item() == pytest.approx(math.log(500), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keepdim(backend):
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for dim in (0, 1, -1):
        got = entmath.entropy(z, dim, keepdim=True, backend=backend)
        p = torch.softmax(z, dim)
        want = -(p * p.log()).sum(dim, keepdim=True)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    assert entmath.entropy(z, keepdim=False, backend=backend).shape == (3, 4)
    with pytest.raises(TypeError, match="keepdim must be a bool"):
        entmath.entropy(z, keepdim=1)
