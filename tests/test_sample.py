"""entmath.sample (Chapter 2): draws follow entropy_normalize's distribution on every path (the
direct C-kernel path of eager float32 calls, the operator path, rows the kernel declines), beyond
torch.multinomial's 2^24 classes, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import entmath
from entmath.kernels.cpu import entropy_normalization as fused_cpu
from entmath.ops import entropy_normalization as en

F32_MAX = torch.finfo(torch.float32).max


def _entropy(p):
    p = p.double()
    return -torch.where(p > 0, p * p.log(), 0.0).sum(-1)


def _frequencies(idx, n):
    return torch.bincount(idx.flatten(), minlength=n).double() / idx.numel()


def test_help_has_an_args_section():
    doc = entmath.sample.__doc__
    assert "Args:" in doc and "target_entropy:" in doc and "num_samples:" in doc and "generator:" in doc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_draws_follow_the_entropy_normalized_distribution(dtype):
    """40000 draws from each of 3 rows (float32 takes the direct C-kernel path): every class's
    frequency within 5 standard deviations of entropy_normalize's p."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 7, generator=gen) * 2).to(dtype)
    z[1, 2] = -math.inf
    t = torch.tensor([0.5, 1.2, 1.8])
    p = entmath.entropy_normalize(z, t).double()
    idx = entmath.sample(z, t, num_samples=40000, generator=gen)
    assert idx.shape == (3, 40000) and idx.dtype == torch.int64
    for r in range(3):
        f = _frequencies(idx[r], 7)
        sd = (p[r] * (1 - p[r]) / 40000).sqrt()
        assert torch.all((f - p[r]).abs() <= 5 * sd + 1e-12), (r, f, p[r])
    assert not bool((idx[1] == 2).any())


def test_the_direct_path_is_entropy_normalize():
    """Eager float32 CPU rows go straight to the C kernel (any size); its p is entropy_normalize's
    and meets the target."""
    if not fused_cpu.enabled(torch.ones(1, 10), min_elems=1):
        pytest.skip("the C kernel is off")
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 50, generator=gen) * 3
    t = torch.tensor([[0.3, 1.0, 2.0], [2.5, 3.0, 3.5]])
    zz, tt, _, backend = en._prepare_sampling(z, t, -1, "auto")
    p, valid = en._sampling_probabilities(zz, tt, backend)
    assert valid
    torch.testing.assert_close(p, entmath.entropy_normalize(z, t), atol=2e-6, rtol=0)
    assert torch.all((_entropy(p) - t.double()).abs() <= 4e-6 * t.double())


def test_same_generator_same_draws_and_dim():
    z = torch.randn(4, 9, generator=torch.Generator().manual_seed(2))
    a = entmath.sample(z, 1.0, num_samples=5, generator=torch.Generator().manual_seed(7))
    b = entmath.sample(z, 1.0, num_samples=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = entmath.sample(z.T, 1.0, num_samples=5, dim=0, generator=torch.Generator().manual_seed(7))
    assert c.shape == (5, 4) and torch.equal(c.T, a)


def test_rows_the_kernel_declines_or_that_are_bad_take_the_full_path():
    """A row spanning beyond float32 (max and -max) is declined by the C kernel and solved in
    float64; a NaN row raises the op's error, naming the row."""
    z = torch.tensor([[F32_MAX, -F32_MAX, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    p = entmath.entropy_normalize(z, 0.5).double()  # row 0: (0.84, 0.003, 0.08, 0.08), gamma ~ 1e-38
    assert p[0, 1] > 1e-3  # -max is a live class at this entropy
    idx = entmath.sample(z, 0.5, num_samples=40000, generator=torch.Generator().manual_seed(3))
    for r in range(2):
        f = _frequencies(idx[r], 4)
        assert torch.all((f - p[r]).abs() <= 5 * (p[r] * (1 - p[r]) / 40000).sqrt() + 1e-12), (r, f, p[r])
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits contains NaN \(row\(s\) 1\)"):
        entmath.sample(bad, 1.0)


@pytest.mark.parametrize("target", [1.0, 10**400, float("inf")])
def test_number_targets_checked_in_python(target):
    z = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    idx = entmath.sample(z, target, num_samples=3)
    assert idx.shape == (2, 3)
    with pytest.raises(ValueError, match="target_entropy must be >= 0"):
        entmath.sample(z, -0.5)
    with pytest.raises(ValueError, match="target_entropy contains NaN"):
        entmath.sample(z, float("nan"))
    with pytest.raises(TypeError, match="target_entropy must be a real number"):
        entmath.sample(z, "1.0")


def test_without_replacement():
    z = torch.tensor([[0.0, 1.0, -math.inf, 2.0]])
    idx = entmath.sample(z, 1.0, num_samples=3, replacement=False)
    assert sorted(idx[0].tolist()) == [0, 1, 3]
    with pytest.raises(ValueError, match="exceeds the support"):
        entmath.sample(z, 1.0, num_samples=4, replacement=False)
    with pytest.raises(TypeError, match="replacement must be a bool"):
        entmath.sample(z, 1.0, replacement=1)


def test_more_classes_than_torch_multinomial_takes():
    """torch.multinomial refuses more than 2^24 classes ("number of categories cannot exceed
    2^24"); sample inverts the CDF instead.  Three live classes, two of them past index 2^24, so
    that an index truncated to float32 or int32 would show.  (Without replacement it runs the
    exponential race, tested on small rows below.)"""
    n = (1 << 24) + 8
    live = torch.tensor([5, (1 << 24) + 3, (1 << 24) + 7])
    z = torch.full((1, n), -math.inf)
    z[0, live] = torch.tensor([0.0, 1.0, 2.0])
    with pytest.raises(RuntimeError):
        torch.multinomial(torch.ones(1, n), 1)
    gen = torch.Generator().manual_seed(5)
    idx = entmath.sample(z, 0.8, num_samples=20000, generator=gen)
    assert idx.shape == (1, 20000)
    assert bool(torch.isin(idx, live).all())
    p = entmath.entropy_normalize(z[:, live], 0.8)[0].double()
    f = torch.stack([(idx == j).double().mean() for j in live])
    assert torch.all((f - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt()), (f, p)


def test_inverse_cdf_draws_never_pick_a_zero_class():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    idx = en._inverse_cdf_draws(p, 5000, True, torch.Generator().manual_seed(6))
    assert set(idx[0].tolist()) == {1, 4} and set(idx[1].tolist()) == {0}
    assert abs((idx[0] == 1).double().mean().item() - 0.5) < 0.05
    top = en._inverse_cdf_draws(p, 2, False, torch.Generator().manual_seed(6))
    assert sorted(top[0].tolist()) == [1, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_draw_per_row_is_torch_multinomials_draw(dtype):
    """One draw per row runs torch.multinomial's own exponential race without its checks: the
    same index for the same generator state."""
    gen_z = torch.Generator().manual_seed(8)
    z = (torch.randn(16, 300, generator=gen_z) * 2).to(dtype)
    zz, tt, _, backend = en._prepare_sampling(z, 1.5, -1, "auto")
    p, valid = en._sampling_probabilities(zz, tt, backend)
    assert valid
    for seed in range(5):
        got = entmath.sample(z, 1.5, generator=torch.Generator().manual_seed(seed))
        want = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)


def test_validation_off_bad_rows_still_refused_by_multinomial():
    """Without value checks a NaN row is not known to be a distribution: the draw goes through
    torch.multinomial, which refuses it, rather than returning an index for it."""
    z = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    with entmath.validation(False):
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            entmath.sample(z, 0.5)
