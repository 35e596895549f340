"""Tests for entmath.entropy_normalize / solve_gamma / sample (Chapter 2)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import math  # noqa: E402
import warnings  # noqa: E402

import mpmath as mp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from entmath._backend import triton_available  # noqa: E402
from tests import reference as ref  # noqa: E402
from entmath.ops.entropy_normalization import (  # noqa: E402
    entropy_normalize, entropy_normalize_torch, sample, solve_gamma)

INF = float("inf")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def h64(p: torch.Tensor) -> torch.Tensor:
    """Entropy of probability rows, accumulated in float64 (0 log 0 = 0)."""
    p = p.double()
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


def mp_entropy_at(z, gamma):
    return ref.entropy([mp.mpf(gamma) * mp.mpf(v) if v != -INF else -INF for v in z])


def mp_gamma(z, t):
    """The root of H(softmax(gamma z)) = t at 50 digits, by bisection in log(gamma) then secant."""
    t = mp.mpf(t)
    f = lambda g: mp_entropy_at(z, g) - t  # noqa: E731
    lo, hi = mp.mpf(1e-30), mp.mpf(1)
    while f(hi) > 0:
        hi *= 4
    for _ in range(200):  # geometric bisection to ~1e-40 relative
        mid = mp.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        if hi / lo - 1 < mp.mpf(10) ** -40:
            break
    return mp.sqrt(lo * hi)


def seed_loop(p: np.ndarray, target: float, iters: int = 10) -> np.ndarray:
    """The source post's loop, re-implemented from its update rule: starting from p (gamma = 1),
    H <- -sum p log p;  gamma <- 1 + (H* - H) / (H^2 - sum p log^2 p);  p <- p^gamma / sum p^gamma."""
    for _ in range(iters):
        lp = np.log(p)  # rows that left the simplex become NaN: the caller keeps converged rows
        h = -(p * lp).sum(-1, keepdims=True)
        g = 1 + (target - h) / (h * h - (p * lp * lp).sum(-1, keepdims=True))
        p = p ** g
        p = p / p.sum(-1, keepdims=True)
    return p


# ---------------------------------------------------------------------------------------------
# Properties against 50-digit references
# ---------------------------------------------------------------------------------------------

logit = st.one_of(st.floats(-30, 30), st.just(-INF), st.sampled_from([0.0, 1.0, 2.5]))


@st.composite
def rows_and_target(draw):
    n = draw(st.integers(1, 12))
    z = draw(st.lists(logit, min_size=n, max_size=n))
    if all(v == -INF for v in z):
        z[draw(st.integers(0, n - 1))] = draw(st.floats(-5, 5))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    z = [v * scale if v != -INF else v for v in z]
    n_live = sum(v != -INF for v in z)
    t = draw(st.one_of(st.floats(0, math.log(n_live) + 0.5), st.just(0.0), st.just(math.log(n_live))))
    return z, t


@given(rows_and_target())
@settings(max_examples=40, deadline=None)
def test_matches_mpmath(case):
    z, t = case
    zt = torch.tensor([z], dtype=torch.float64)
    p = entropy_normalize(zt, t)[0]
    g = solve_gamma(zt, t)[0].item()
    live = [v != -INF for v in z]
    zmax = max(v for v in z if v != -INF)
    n_live, n_max = sum(live), sum(v == zmax for v in z)
    assert abs(p.sum().item() - 1) < 1e-14
    assert all(p[i].item() == 0 for i in range(len(z)) if not live[i])  # -inf stays impossible
    if t >= math.log(n_live):  # the supremum: uniform on the support, gamma = 0
        assert g == 0
        assert torch.allclose(p[torch.tensor(live)], torch.full((n_live,), 1 / n_live, dtype=torch.float64))
    elif t <= math.log(n_max):  # the infimum: uniform on the arg-max set, gamma = inf
        assert g == INF
        at_max = torch.tensor([v == zmax for v in z])
        assert torch.allclose(p[at_max], torch.full((n_max,), 1 / n_max, dtype=torch.float64))
        assert bool((p[~at_max] == 0).all())
    else:
        h = ref.entropy([math.log(x) if x > 0 else -INF for x in p.tolist()])
        assert abs(h - t) <= 1e-12 * max(1, t), (h, t)
        g_ref = mp_gamma(z, t)
        assert abs(g - g_ref) <= 1e-9 * g_ref, (g, g_ref)
        # order preserving: p is non-decreasing in z
        order = sorted(range(len(z)), key=lambda i: z[i])
        assert all(p[order[i]] <= p[order[i + 1]] for i in range(len(z) - 1))


@given(st.integers(2, 60), st.floats(0.05, 0.95), st.sampled_from([1e-3, 1.0, 30.0]), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_float32_accuracy_and_gamma_formula(n, frac, scale, seed):
    """fp32 rows hit the target to ~1e-6 nats and p equals softmax(gamma z) with the returned gamma."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(8, n, generator=gen) * scale
    t = frac * math.log(n)
    p = entropy_normalize(z, t)
    g = solve_gamma(z, t, keepdim=True)
    interior = torch.isfinite(g).squeeze(-1) & (g.squeeze(-1) > 0)
    assert (h64(p) - t)[interior].abs().max().item() <= 2e-6 * max(1.0, t) if interior.any() else True
    q = torch.softmax(g.double() * z.double(), -1)
    assert torch.allclose(p.double()[interior], q[interior], rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_paths_agree_on_edges_and_dtypes(dtype):
    """fp16, bf16 and float32 rows on both CPU paths: the eager one (float64 inside) and the C
    kernel (float32 sweeps; fp16 and bf16 through a float32 copy), edges included."""
    gen = torch.Generator().manual_seed(4)
    z = (torch.randn(8, 300, generator=gen) * 3).to(dtype)
    z[0, :100] = -INF
    z[1, :3] = z[1].max() + 1
    z[2] = 0.5
    z[3, 1] = 40
    t = torch.rand(8, generator=gen, dtype=torch.float64) * math.log(300)
    t[4], t[5], t[6] = 0.0, 100.0, 1e-10
    t[7] = math.log(200)  # above log|S| of row 0 when copied there below
    z[7] = z[0]
    pe, ge, _, _ = entropy_normalize_torch(z, t, fused_min_elems=1 << 62)
    paths = [pe]
    if fused_cpu.enabled(z, min_elems=0):
        pc, gc, _, _ = entropy_normalize_torch(z, t, fused_min_elems=0)
        assert torch.equal(torch.isinf(ge), torch.isinf(gc)) and torch.equal(ge == 0, gc == 0)
        paths.append(pc)
    for p in paths:
        assert p.dtype == dtype
        assert torch.allclose(pe.double(), p.double(), atol=1e-6 if dtype == torch.float32 else 4e-3, rtol=0)
        assert bool((p[0, :100] == 0).all()) and bool((p[7, :100] == 0).all())
        assert torch.allclose(p[7, 100:].double(), torch.full((200,), 1 / 200, dtype=torch.float64), atol=1e-3)


def test_block_path_with_torch_scalars(monkeypatch):
    """On a GPU the per-row scalars of the block path are torch tensors; run that code on the CPU."""
    import entmath.ops.entropy_normalization as en

    z, t = _kernel_case(200, torch.float64, seed=3)
    t = t.double()
    want = entropy_normalize_torch(z, t)
    monkeypatch.setattr(en, "_scalar_ns", lambda device: torch)
    got = entropy_normalize_torch(z, t)
    assert torch.allclose(got[0], want[0], atol=1e-14, rtol=0)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    fin = torch.isfinite(want[1])
    assert torch.allclose(got[1][fin], want[1][fin], rtol=1e-12) and torch.equal(got[3], want[3])


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    entropy_normalize(torch.randn(3, 20000), 2.0)
    entropy_normalize(torch.randn(30, 50), 2.0)
    assert torch.get_num_threads() == before


def test_long_rows_validation():
    z = torch.randn(3, 20000)
    z[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits contains NaN \(row\(s\) 1\)"):
        entropy_normalize(z, 1.0)
    z[1, 7] = 0.0
    z[2] = -INF
    with pytest.raises(ValueError, match=r"every logit is -inf.*\(row\(s\) 2\)"):
        solve_gamma(z, 1.0)


def test_benchmark_shape_accuracy_float32():
    """The benchmark's case at a reduced size: standard normal x 3 logits, target log 30."""
    z = torch.randn(16, 32000, generator=torch.Generator().manual_seed(0)) * 3
    p = entropy_normalize(z, math.log(30))
    assert (h64(p) - math.log(30)).abs().max().item() <= 1e-5
    assert (p.double().sum(-1) - 1).abs().max().item() <= 1e-6


def test_near_one_hot_targets_are_relatively_accurate():
    """Tiny targets (nearly one-hot rows) are met to relative, not absolute, accuracy."""
    z = torch.randn(16, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    for t in (1e-3, 1e-8, 1e-14):
        p = entropy_normalize(z, t)
        h = torch.tensor([float(ref.entropy([math.log(x) if x > 0 else -INF for x in row])) for row in p.tolist()])
        assert ((h - t).abs() / t).max().item() < 1e-9


def test_monotone_in_target_and_gamma_limits():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, -INF]], dtype=torch.float64)
    ts = torch.linspace(0.01, math.log(4) - 1e-3, 50, dtype=torch.float64)
    g = solve_gamma(z.expand(50, 5), ts)
    assert bool((g[1:] < g[:-1]).all())  # a higher entropy needs a smaller exponent
    assert solve_gamma(z, math.log(4)).item() == 0.0
    assert solve_gamma(z, 0.0).item() == INF


# ---------------------------------------------------------------------------------------------
# Edge rules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_edges(dtype):
    z = torch.tensor([
        [1.0, 1.0, 1.0, 1.0],           # constant row
        [3.0, 3.0, 0.0, -INF],          # tied maximum and a -inf logit
        [0.0, -INF, -INF, -INF],        # a single live class
        [2.0, 1.0, 0.0, -1.0],
    ], dtype=dtype)
    for t in (0.0, 0.3, math.log(2), 1.0, math.log(3), math.log(4), 50.0, INF):
        p = entropy_normalize(z, t).double()
        g = solve_gamma(z, t)
        assert p.dtype == torch.float64 and g.dtype == dtype
        assert torch.allclose(p[0], torch.full((4,), 0.25, dtype=torch.float64), atol=1e-3)
        assert g[0].item() == (0.0 if t >= math.log(4) else INF)
        assert torch.allclose(p[2], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
        assert p[1, 3].item() == 0.0
        if t <= math.log(2):
            assert torch.allclose(p[1], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64), atol=1e-3)
            assert g[1].item() == INF
        if t >= math.log(3):
            assert torch.allclose(p[1, :3], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)
            assert g[1].item() == 0.0
        tol = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 2e-2
        want = min(max(t, 0.0), math.log(4))
        assert abs(h64(p[3:]).item() - want) <= tol


def test_target_tensor_broadcast_and_dim():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 7, 3, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)  # broadcasts over the rows (2, 3) along dim=1
    p = entropy_normalize(z, t, dim=1)
    assert p.shape == z.shape
    h = h64(p.movedim(1, -1))
    assert torch.allclose(h, t.expand(2, 3), atol=1e-12)
    g = solve_gamma(z, t, dim=1, keepdim=True)
    assert g.shape == (2, 1, 3)
    assert torch.allclose(torch.softmax(g * z, dim=1), p, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Gradients (implicit function theorem)
# ---------------------------------------------------------------------------------------------

def _grad_inputs(seed=0, rows=4, n=6):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, n, dtype=torch.float64, generator=gen) * 2
    z[0, :2] = -INF
    t = torch.tensor([0.4, 1.0, 1.3, 0.7], dtype=torch.float64)[:rows]
    return z.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradcheck(backend):
    z, t = _grad_inputs()
    # Under the interpreter every kernel call is slow: the Triton path is checked along random
    # directions (fast_mode), the torch path entry by entry.
    kw = dict(eps=1e-6, atol=1e-7, fast_mode=backend == "triton")
    assert torch.autograd.gradcheck(lambda a, b: entropy_normalize(a, b, backend=backend), (z, t), **kw)
    assert torch.autograd.gradcheck(lambda a, b: solve_gamma(a, b, backend=backend), (z, t), **kw)


def test_gradient_formulas_closed_form():
    """dgamma/dz_k = -gamma p_k (z_k - zbar) / Var_p(z) and dgamma/dt = -1 / (gamma Var_p(z))."""
    z, t = _grad_inputs(seed=1)
    g = solve_gamma(z, t)
    gz, gt = torch.autograd.grad(g.sum(), (z, t))
    with torch.no_grad():
        p = torch.softmax(g.unsqueeze(-1) * z, -1)
        zc = torch.where(p > 0, z - (p * torch.where(p > 0, z, 0)).sum(-1, keepdim=True), 0)
        var = (p * zc * zc).sum(-1)
        want_z = -g.unsqueeze(-1) * p * zc / var.unsqueeze(-1)
        want_t = -1 / (g * var)
    assert torch.allclose(gz, want_z, atol=1e-12) and torch.allclose(gt, want_t, rtol=1e-10)
    assert torch.allclose(gz.sum(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)  # shift invariance


def test_edge_rows_have_zero_gradient():
    z = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [2.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 5.0, 0.5], dtype=torch.float64, requires_grad=True)  # inf edge, 0 edge, interior
    p = entropy_normalize(z, t)
    (p * torch.arange(9.0, dtype=torch.float64).view(3, 3)).sum().backward()
    assert bool((z.grad[:2] == 0).all()) and bool((t.grad[:2] == 0).all())
    assert bool((z.grad[2] != 0).any()) and t.grad[2].item() != 0


def test_target_broadcast_gradient_is_summed():
    z = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    g = solve_gamma(z, t)
    (gt,) = torch.autograd.grad(g.sum(), t)
    t_rows = torch.full((5,), 0.8, dtype=torch.float64, requires_grad=True)
    (gt_rows,) = torch.autograd.grad(solve_gamma(z, t_rows).sum(), t_rows)
    assert torch.allclose(gt, gt_rows.sum())


# ---------------------------------------------------------------------------------------------
# Triton kernel vs torch path (interpreter)
# ---------------------------------------------------------------------------------------------

def _kernel_case(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(6, n, generator=gen) * 3).to(dtype)
    if n >= 5:
        z[0, : n // 2] = -INF
        z[1, :3] = z[1].max() + 1
        z[2] = 0.5
        z[3, 1] = 40.0
    t = torch.rand(6, generator=gen) * math.log(max(n, 2))
    t[4], t[5] = 0.0, 100.0
    return z, t


@needs_triton
@pytest.mark.parametrize("n", [1, 3, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_torch(n, dtype):
    from entmath.kernels.triton.entropy_normalization import entropy_normalize_fwd

    z, t = _kernel_case(n, dtype, seed=n)
    p_k, g_k, zb_k = entropy_normalize_fwd(z, t)
    p_t, g_t, zb_t, _ = entropy_normalize_torch(z, t.double())
    assert torch.allclose(p_k.float(), p_t.float(), atol=2e-6 if dtype == torch.float32 else 1e-3, rtol=0)
    assert bool((torch.isinf(g_k) == torch.isinf(g_t)).all())
    fin = torch.isfinite(g_t)
    assert torch.allclose(g_k[fin], g_t[fin], rtol=2e-5, atol=0)
    assert torch.allclose(zb_k, zb_t, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_tiled_fallback_and_backward():
    """Force the tiled path (row longer than the tile) and compare forward and backward."""
    from entmath.kernels.triton.entropy_normalization import entropy_normalize_bwd, entropy_normalize_fwd
    from entmath.ops.entropy_normalization import entropy_normalize_vjp

    z, t = _kernel_case(1000, torch.float64, seed=7)
    p_k, g_k, zb_k = entropy_normalize_fwd(z, t, one_tile_max=0, block=256)
    p_t, g_t, zb_t, _ = entropy_normalize_torch(z, t.double())
    assert torch.allclose(p_k, p_t, atol=1e-14, rtol=0)
    assert torch.equal(torch.isinf(g_k), torch.isinf(g_t))
    gen = torch.Generator().manual_seed(8)
    gp, gg = torch.randn(6, 1000, dtype=torch.float64, generator=gen), torch.randn(6, dtype=torch.float64, generator=gen)
    gz_k, gt_k = entropy_normalize_bwd(z, p_k, g_k, zb_k, gp, gg, block=256)
    gz_t, gt_t = entropy_normalize_vjp(z, p_t, g_t, gp, gg, zbar=zb_t)
    assert torch.allclose(gz_k, gz_t, atol=1e-12) and torch.allclose(gt_k, gt_t, rtol=1e-10, atol=1e-14)


@needs_triton
def test_triton_public_api_and_errors():
    z, t = _kernel_case(37, torch.float32, seed=1)
    assert torch.allclose(entropy_normalize(z, t, backend="triton"), entropy_normalize(z, t, backend="torch"), atol=2e-6)
    bad = z.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"logits contains NaN \(row\(s\) 2\)"):
        entropy_normalize(bad, t, backend="triton")


# ---------------------------------------------------------------------------------------------
# The seed's loop
# ---------------------------------------------------------------------------------------------

def test_agrees_with_seed_loop_where_it_converges():
    gen = torch.Generator().manual_seed(11)
    p0 = torch.rand(200, 100, generator=gen, dtype=torch.float64)  # the post's setting: uniform weights
    p0 /= p0.sum(-1, keepdim=True)
    targets = torch.linspace(0.5, math.log(100) - 0.05, 200, dtype=torch.float64)
    with np.errstate(all="ignore"):
        p_seed = torch.from_numpy(seed_loop(p0.numpy(), targets.numpy()[:, None]))
    converged = (h64(p_seed) - targets).abs() < 1e-12
    assert converged.sum() > 150  # it converges on most rows here
    p = entropy_normalize(p0.log(), targets)
    assert torch.allclose(p[converged], p_seed[converged], atol=1e-12, rtol=0)


def test_seed_loop_can_overshoot():
    """From gamma = 1 the seed's update can take the cumulative exponent below 0 (the flat region near
    the uniform distribution), after which its iterates order the classes backwards."""
    z = torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    p0 = torch.softmax(z, -1).numpy()
    t = math.log(8) - 1e-3
    lp = np.log(p0)
    h = -(p0 * lp).sum()
    gamma1 = 1 + (t - h) / (h * h - (p0 * lp * lp).sum())
    assert gamma1 < 0  # the first Newton step overshoots past gamma = 0
    p = entropy_normalize(z, t)
    assert p[0, 0] > p[0, 1] and abs(h64(p).item() - t) < 1e-12


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def test_sample_shapes_support_and_reproducibility():
    z = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    z[:, 7:] = -INF
    idx = sample(z, 1.0, num_samples=500, generator=torch.Generator().manual_seed(1))
    assert idx.shape == (3, 500) and idx.dtype == torch.int64
    assert int(idx.max()) < 7  # -inf classes are never drawn
    again = sample(z, 1.0, num_samples=500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx, again)
    # t = 0 with a unique maximum: always the arg-max
    assert torch.equal(sample(z, 0.0, num_samples=20), z.argmax(-1, keepdim=True).expand(3, 20))
    # dim handling: classes along dim 0
    idx0 = sample(z.T.contiguous(), 1.0, num_samples=4, dim=0)
    assert idx0.shape == (4, 3)


def test_sample_frequencies_match_probabilities():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = entropy_normalize(z, 1.0)[0]
    idx = sample(z, 1.0, num_samples=40000, generator=torch.Generator().manual_seed(4))[0]
    freq = torch.bincount(idx, minlength=4).double() / idx.numel()
    assert torch.allclose(freq, p.double(), atol=0.01)


def test_sample_without_replacement():
    z = torch.tensor([[1.0, 0.5, 0.0, -INF]])
    idx = sample(z, 0.9, num_samples=3, replacement=False, generator=torch.Generator().manual_seed(0))
    assert sorted(idx[0].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_samples"):
        sample(z, 0.9, num_samples=4, replacement=False)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [entropy_normalize, solve_gamma])
def test_bad_inputs(fn):
    z = torch.randn(3, 5)
    with pytest.raises(TypeError, match="logits"):
        fn([1.0, 2.0], 1.0)
    with pytest.raises(TypeError, match="logits"):
        fn(torch.arange(5), 1.0)
    with pytest.raises(ValueError, match="target contains NaN"):
        fn(z, float("nan"))
    with pytest.raises(ValueError, match="target must be >= 0"):
        fn(z, -0.1)
    with pytest.raises(ValueError, match="target must be >= 0"):
        fn(z, torch.tensor([0.5, -1.0, 0.2]))
    with pytest.raises(ValueError, match="target contains NaN"):
        fn(z, torch.tensor([0.5, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="target of shape"):
        fn(z, torch.ones(5))
    with pytest.raises(TypeError, match="target"):
        fn(z, "1.0")
    with pytest.raises(TypeError, match="target"):
        fn(z, True)
    with pytest.raises(TypeError, match="target"):
        fn(z, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="dim"):
        fn(z, 1.0, dim=2)
    with pytest.raises(ValueError, match="backend"):
        fn(z, 1.0, backend="cuda")
    zb = z.clone()
    zb[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits contains NaN \(row\(s\) 1\)"):
        fn(zb, 1.0)
    zb = z.clone()
    zb[2, 0] = INF
    with pytest.raises(ValueError, match=r"logits contains \+inf"):
        fn(zb, 1.0)
    zb = z.clone()
    zb[0] = -INF
    with pytest.raises(ValueError, match="every logit is -inf"):
        fn(zb, 1.0)


def test_sample_bad_arguments():
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="num_samples"):
        sample(z, 1.0, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        sample(z, 1.0, num_samples=2.5)
    with pytest.raises(TypeError, match="num_samples"):
        sample(z, 1.0, num_samples=True)
    with pytest.raises(TypeError, match="generator"):
        sample(z, 1.0, generator=0)
    with pytest.raises(ValueError, match="target_entropy"):
        sample(z, -1.0)


def test_integer_target_and_empty_rows():
    z = torch.randn(4, 6)
    assert torch.allclose(entropy_normalize(z, 1), entropy_normalize(z, 1.0))
    assert torch.allclose(entropy_normalize(z, torch.tensor(1)), entropy_normalize(z, 1.0))
    empty = torch.empty(0, 6)
    assert entropy_normalize(empty, 1.0).shape == (0, 6)
    assert solve_gamma(empty, 1.0).shape == (0,)


# ----------------------------------------------------------------------------------------------
# The fused CPU path (entmath/kernels/cpu/entropy_normalization.py): compiled sweeps, the same iteration
# ----------------------------------------------------------------------------------------------

from entmath.kernels.cpu import entropy_normalization as fused_cpu  # noqa: E402

needs_fused = pytest.mark.skipif(not fused_cpu.enabled(torch.ones(2, fused_cpu.MIN_ELEMS)),
                                 reason="the C kernel is off (ENTMATH_COMPILE=0)")


def _fused_vs_eager(z, t, atol_p=2e-6):
    """Both CPU paths on float32 rows; the C kernel forced by a zero size threshold."""
    pf, gf, zf, ef = entropy_normalize_torch(z, t, fused_min_elems=0)
    pe, ge, ze, ee = entropy_normalize_torch(z, t, fused_min_elems=1 << 62)
    assert pf.dtype == torch.float32 and pf.shape == z.shape
    assert torch.allclose(pf, pe, atol=atol_p, rtol=0)
    assert torch.equal(torch.isinf(gf), torch.isinf(ge)) and torch.equal(gf == 0, ge == 0)
    # The target fixes gamma only as far as H is steep in log gamma: each path stops within 8 ulp
    # of the target, so the two gammas may differ by 2 * 8 ulp(t) / |dH/dlog gamma| (relative),
    # |dH/dlog gamma| = gamma^2 Var_p(z), besides float32 rounding.  Near the edges H is flat and
    # many gammas meet the target.
    zz = torch.where(torch.isfinite(z), z, 0.0).double()
    var = (pe.double() * zz * zz).sum(-1) - (pe.double() * zz).sum(-1) ** 2
    slope = ge.double() ** 2 * var
    tol_h = 2 * 8 * 2.0**-23 * torch.as_tensor(t, dtype=torch.float64).expand(slope.shape)
    interior = torch.isfinite(ge) & (ge > 0) & (slope > 1e-2)
    rel = (gf.double() - ge.double()).abs() / ge.double()
    assert torch.all(rel[interior] <= 2e-5 + tol_h[interior] / slope[interior])
    assert torch.equal(torch.isfinite(zf), torch.isfinite(ze))
    return pf, gf, zf, ef, ee


@needs_fused
@given(rows_and_target(), rows_and_target())
@settings(max_examples=25, deadline=None)
def test_fused_path_matches_the_eager_path(a, b):
    """Two rows of different lengths, padded with -inf to one width: edges, ties and -inf included."""
    (za, ta), (zb, tb) = a, b
    n = max(len(za), len(zb), 2)
    z = torch.full((2, n), -INF)
    z[0, : len(za)], z[1, : len(zb)] = torch.tensor(za), torch.tensor(zb)
    t = torch.tensor([ta, tb], dtype=torch.float64)
    pf, gf, _, _, _ = _fused_vs_eager(z, t)
    assert torch.allclose(pf.double().sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool((pf[z == -INF] == 0).all())
    # Interior rows: the entropy of the returned p is the target (float32 accuracy).
    interior = torch.isfinite(gf) & (gf > 0)
    assert torch.all((h64(pf) - t).abs()[interior] <= 4e-6 * t[interior].clamp_min(1.0))


@needs_fused
def test_fused_path_edges_slow_rows_and_errors():
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(8, 3000, generator=gen) * 3
    z[0, :1000] = -INF
    z[1, :3] = z[1].max() + 1  # three maxima: infimum log 3
    z[2] = 0.5  # constant row
    t = torch.full((8,), math.log(30), dtype=torch.float64)
    t[1] = math.log(3) + 1e-6  # just above the infimum
    t[3], t[4], t[6] = 0.0, 100.0, math.log(3000) - 1e-7
    t[5] = 1e-10  # nearly one-hot: the slowest row, iterating alone at the end
    pf, gf, zf, ef, ee = _fused_vs_eager(z, t)
    # The same iteration (float32 sweeps with float64 sums, against float32 torch sums): the
    # counts agree to one evaluation.  The edges count none.
    assert bool(((ef - ee).abs() <= 1).all()) and ef[[2, 3, 4]].sum() == 0
    assert ef[5] > ef[[0, 1, 6, 7]].max()
    interior = torch.isfinite(gf) & (gf > 0)
    assert torch.all((h64(pf) - t).abs()[interior] <= 4e-6 * t[interior].clamp_min(1.0))
    assert gf[3] == INF and gf[4] == 0 and gf[2] in (0, INF)
    assert torch.allclose(pf[1, :3].double(), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-5)
    # The public op takes the fused path for large float32 inputs, and reports bad rows by index.
    big = torch.randn(fused_cpu.MIN_ELEMS // 1000 + 1, 1000, generator=gen)
    big[2, 5], big[4] = float("nan"), -INF
    with pytest.raises(ValueError, match=r"logits contains NaN \(row\(s\) 2\)"):
        entropy_normalize(big, 1.0)
    big[2, 5] = 0.0
    with pytest.raises(ValueError, match=r"every logit is -inf.*\(row\(s\) 4\)"):
        entropy_normalize(big, 1.0)


@needs_fused
def test_fused_path_gradient_matches_the_eager_path():
    """The backward is shared; it must see the same (p, gamma, zbar) from both forwards."""
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(4, 500, generator=gen) * 2
    t = torch.tensor([0.5, 1.5, 3.0, 5.0])
    w = torch.randn(4, 500, generator=gen)
    grads = []
    for min_elems in (0, 1 << 62):
        zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
        old = fused_cpu.MIN_ELEMS
        fused_cpu.MIN_ELEMS = min_elems
        try:
            (entropy_normalize(zz, tt) * w).sum().backward()
        finally:
            fused_cpu.MIN_ELEMS = old
        grads.append((zz.grad, tt.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-3)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-3)


@needs_fused
def test_fused_path_on_long_rows_uses_its_shortcuts_correctly():
    """Rows like the benchmark's: their last sweeps are update sweeps that write p normalised by a
    predicted S.  Whatever the shortcut, p must be softmax(gamma z) at the reported gamma, sum to
    1 and meet the target; -inf logits stay exactly 0; threads do not change a bit."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(12, 32000, generator=gen) * 3
    z[3, ::7] = -INF
    z[5] *= 20.0  # wide row: reach * step too large for updates
    t = torch.full((12,), math.log(30), dtype=torch.float64)
    t[7], t[8] = 0.05, math.log(32000) - 0.01  # near both edges
    pf, gf, zf, ef, ee = _fused_vs_eager(z, t, atol_p=3e-6)
    assert torch.all((h64(pf) - t).abs() <= 4e-6 * t.clamp_min(1.0))
    assert torch.allclose(pf.double().sum(-1), torch.ones(12, dtype=torch.float64), atol=4e-7, rtol=0)
    ref = torch.softmax(gf.double().unsqueeze(-1) * z.double(), -1)
    assert torch.allclose(pf.double(), ref, atol=1e-7, rtol=1e-5)
    assert bool((pf[3, ::7] == 0).all())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1 = entropy_normalize_torch(z, t, fused_min_elems=0)[0]
        torch.set_num_threads(2)
        p2 = entropy_normalize_torch(z, t, fused_min_elems=0)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(p1, pf) and torch.equal(p2, pf)


@needs_fused
def test_fused_path_sketch_start_on_long_rows_of_many_shapes():
    """Rows of 2^14 or more logits start from the sketch (a tail plus a sample, solved first).
    Whatever the row's shape (Gaussian, heavy-tailed, sorted Zipf, uniform, ties at the top that
    overflow the tail, -inf and finite masks, a short tail of huge logits), p must match the eager
    path and meet the target; on Gaussian rows the sketch must land close enough that the row
    takes one exponential sweep and one or two updates (three evaluations at most, where the
    Taylor start alone takes three or four)."""
    gen = torch.Generator().manual_seed(21)
    n = 1 << 14
    rows = [torch.randn(n, generator=gen) * 3 for _ in range(6)]                 # 0-5 Gaussian
    rows.append(torch.distributions.StudentT(3.0).sample((n,)) * 2)             # 6 heavy tail
    rows.append(-1.1 * torch.arange(1, n + 1, dtype=torch.float32).log())       # 7 sorted Zipf
    rows.append(torch.rand(n, generator=gen) * 10 - 5)                          # 8 uniform
    ties = torch.randn(n, generator=gen)
    ties[: n // 4] = ties.max() + 1.0                                           # 9 a quarter tied
    rows.append(ties)
    neg = torch.randn(n, generator=gen) * 2
    neg[1::3] = -INF                                                             # 10 -inf mask
    rows.append(neg)
    spike = torch.randn(n, generator=gen)
    spike[::997] += 40.0                                                         # 11 17 outliers
    rows.append(spike)
    z = torch.stack(rows).float()
    t = torch.tensor([math.log(30), 1.0, 3.0, 6.0, 9.0, math.log(n) - 0.05,
                      math.log(30), math.log(50), math.log(100), 8.5, 4.0, 1.5],
                     dtype=torch.float64)
    pf, gf, _, ef, _ = _fused_vs_eager(z, t, atol_p=3e-6)
    assert torch.all((h64(pf) - t).abs() <= 4e-6 * t.clamp_min(1.0))
    assert torch.allclose(pf.double().sum(-1), torch.ones(len(t), dtype=torch.float64), atol=4e-7)
    assert bool((pf[10, 1::3] == 0).all())
    assert int(ef[:5].max()) <= 3, ef[:5]

@needs_fused
def test_fused_path_near_the_top_keeps_gamma():
    """Within 1/2 nat of log|S| H is so flat in gamma that a start off by a percent still passes the
    entropy test; the kernel must start from the Taylor root there (not from the sketch), so that
    gamma, on which the gradient rests, agrees with the float64 path."""
    gen = torch.Generator().manual_seed(29)
    z = torch.randn(6, 8192, generator=gen)
    gaps = torch.tensor([1e-7, 1e-5, 1e-3, 0.1, 0.49, 0.6], dtype=torch.float64)
    t = math.log(8192) - gaps
    _, g, _, _ = entropy_normalize_torch(z, t, fused_min_elems=0)
    _, g64, _, _ = entropy_normalize_torch(z.double(), t, fused_min_elems=1 << 62)
    rel = (g.double() / g64 - 1).abs()
    assert torch.all(rel <= 2e-3), rel

@pytest.mark.parametrize("mask", [-3e38, float(torch.finfo(torch.float32).min), -1e30])
def test_targets_that_need_the_masked_logits_converge_without_warning(mask):
    """Six live logits and 8186 masked at a huge finite value, target 2 > log 6: the root is where
    the mask's weights wake up (gamma ~ 1e-38 .. 1e-30), below a long flat stretch at log 6 on
    which Halley's steps crawl by a percent.  Once the bracket is closed and a step fails to halve
    |H - t|, the solver bisects: every path must meet the target without the capped-evaluations
    warning (which it used to raise after 60 evaluations, missing by up to 1.3 nats)."""
    gen = torch.Generator().manual_seed(31)
    z = torch.full((4, 8192), mask)
    z[:, :6] = torch.randn(4, 6, generator=gen)
    t = torch.full((4,), 2.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for zz, fused_min in ((z, 0), (z, 1 << 62), (z.double(), None)):
            p, _, _, ev = entropy_normalize_torch(zz, t, fused_min_elems=fused_min)
            assert torch.all((h64(p) - t).abs() <= 1e-5), (zz.dtype, fused_min, h64(p) - t)
            assert int(ev.max()) <= 30, (zz.dtype, fused_min, ev)

@needs_fused
def test_finite_masks_take_few_evaluations_on_every_cpu_path():
    """Two thirds of each row masked with -1e30 (a finite mask): once gamma has silenced the mask,
    H sits on the flat top of the unmasked logits, where Halley's step only triples a tiny gamma;
    the quadratic model's root (eq-en-quad) jumps to the right decade.  Each path (C kernel,
    float32 and float64 eager) must meet the targets within 8 evaluations, and the kernel's
    moments must not turn the masked logits' zero weights into NaN (0 * (-1e30)^2)."""
    gen = torch.Generator().manual_seed(23)
    n = 1 << 14
    masked = torch.randn(3, n, generator=gen) * 2
    masked[:, n // 3:] = -1e30
    tm = torch.tensor([2.0, 5.0, math.log(n / 3) - 0.01], dtype=torch.float64)
    ref, _, _, e64 = entropy_normalize_torch(masked.double(), tm)
    for fused_min in (0, 1 << 62):
        pm, _, _, em = entropy_normalize_torch(masked, tm, fused_min_elems=fused_min)
        assert torch.allclose(pm.double(), ref, atol=3e-6, rtol=0), fused_min
        assert torch.all((h64(pm) - tm).abs() <= 4e-6 * tm) and bool((pm[:, n // 3:] == 0).all())
        assert int(em.max()) <= 8, (fused_min, em)
    assert int(e64.max()) <= 8, e64


@needs_fused
def test_fused_path_python_threads_match_the_openmp_build(monkeypatch):
    """The build without OpenMP splits the rows over Python threads: same bits."""
    gen = torch.Generator().manual_seed(15)
    z = torch.randn(9, 3000, generator=gen) * 2
    t = torch.linspace(0.5, 6.0, 9, dtype=torch.float64)
    p_default = fused_cpu.solve(z, t, 60, 8.0)[0]
    monkeypatch.setattr(fused_cpu, "_lib", None)
    monkeypatch.setattr(fused_cpu, "_shares_torch_openmp", lambda cc: False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fused_cpu.build().entmath_openmp() == 0
        p_threads = fused_cpu.solve(z, t, 60, 8.0)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(p_threads, p_default)


@needs_fused
def test_fused_path_row_that_stops_early_is_still_a_distribution():
    """With the evaluation budget cut, p is normalised at the last gamma (not at a prediction)."""
    gen = torch.Generator().manual_seed(14)
    z = torch.randn(3, 5000, generator=gen) * 2
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for budget in (1, 2):
        p, gamma, mu, evals, m = fused_cpu.solve(z, t, budget, 8.0)
        assert bool((evals == budget).all())
        ref = torch.softmax(gamma.unsqueeze(-1) * z.double(), -1)
        assert torch.allclose(p.double(), ref, atol=1e-7, rtol=1e-5)
        assert torch.allclose(mu + m, (ref * z.double()).sum(-1), atol=1e-5, rtol=0)


def test_fused_path_switch_and_compiler_failure(monkeypatch):
    z = torch.randn(2, fused_cpu.MIN_ELEMS // 2)
    monkeypatch.setenv("ENTMATH_COMPILE", "0")
    assert not fused_cpu.enabled(z)
    monkeypatch.delenv("ENTMATH_COMPILE")
    assert fused_cpu.enabled(z) or fused_cpu._failed
    assert not fused_cpu.enabled(z.double()) and not fused_cpu.enabled(z[:, :10])
    assert not fused_cpu.enabled(torch.empty(0, 5), min_elems=0)

    monkeypatch.setattr(fused_cpu, "_lib", None)
    monkeypatch.setattr(fused_cpu, "_failed", False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    zs, t = torch.randn(3, 400), torch.full((3,), 2.0, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="eager CPU path"):
        p, *_ = entropy_normalize_torch(zs, t, fused_min_elems=0)
    assert fused_cpu._failed and not fused_cpu.enabled(z)  # warned once, then off for the process
    assert torch.allclose(h64(p), t, atol=1e-5)


@needs_fused
@given(st.lists(st.floats(-120.0, 0.0, width=32), min_size=1, max_size=50),
       st.lists(st.floats(-0.25, 0.25, width=32), min_size=1, max_size=50))
@settings(max_examples=40, deadline=None)
def test_kernel_exponentials_against_mpmath(xs, us):
    """exp_nonpos: within 2 ulp of exp(x) where the result is a normal float, exactly 0 below
    -87.68 (and at -inf); exp_small within 2 ulp on the reach of each degree the updates use
    (9: |x| <= 0.5, 6: |x| <= 0.25, 3: |x| <= 0.025, 2: |x| <= 0.0045)."""
    x = torch.tensor(xs + [0.0, -87.0, -87.5, -88.0, -1000.0, -INF], dtype=torch.float32)
    e = fused_cpu.kernel_exp(x, "nonpos").double()
    ref = torch.tensor([float(mp.exp(mp.mpf(float(v)))) for v in x], dtype=torch.float64)
    normal = ref >= torch.finfo(torch.float32).tiny
    assert torch.all((e - ref).abs()[normal] <= 2 * 2.0**-23 * ref[normal])
    assert torch.all(e[x < -87.7] == 0) and torch.all(e[x == 0] == 1.0)
    assert torch.all(e[~normal] <= torch.finfo(torch.float32).tiny)
    for degree, reach in ((9, 0.5), (6, 0.25), (3, 0.025), (2, 0.0045)):
        u = torch.tensor(us + [-0.25, 0.25], dtype=torch.float32) * (reach / 0.25)
        es = fused_cpu.kernel_exp(u, "small", degree).double()
        ref = torch.tensor([float(mp.exp(mp.mpf(float(v)))) for v in u], dtype=torch.float64)
        assert torch.all((es - ref).abs() <= 2 * 2.0**-23 * ref), degree


@needs_fused
def test_fused_path_declines_rows_spanning_the_float_range():
    """Logits spanning ~1e38 would overflow d = z - max in float32: the kernel declines such rows,
    which are solved in float64 (as the float32 eager path solves them too), and the other rows
    are not affected."""
    gen = torch.Generator().manual_seed(16)
    z = torch.randn(4, 2000, generator=gen)
    z[1, 0], z[1, 1] = 3e38, -3e38
    z[2, :5] = -INF
    t = torch.tensor([1.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    p, gamma, mu, evals, m = fused_cpu.solve(z, t, 60, 8.0)
    assert evals[1] == -1 and bool((evals[[0, 2, 3]] > 0).all())
    pf, gf, zf, ef = entropy_normalize_torch(z, t, fused_min_elems=0)
    pe, ge, ze, ee = entropy_normalize_torch(z, t, fused_min_elems=1 << 62)
    assert torch.equal(pf[1], pe[1]) and gf[1] == ge[1] and ef[1] == ee[1]
    assert torch.equal(pf[[0, 2, 3]], p[[0, 2, 3]])
    p64, g64, z64, _ = entropy_normalize_torch(z[1:2].double(), t[1:2])  # to float64's tolerance
    assert torch.allclose(pf[1].double(), p64[0], atol=1e-7) and torch.allclose(gf[1].double(), g64[0], rtol=1e-5)
    assert torch.allclose(zf[1].double(), z64[0], rtol=1e-6) and torch.isfinite(ze).all() and torch.isfinite(zf).all()
    assert torch.allclose(h64(pf), t, atol=1e-5)
    assert torch.allclose(entropy_normalize(z, t.float()), pf)  # the public op: no false error


def _solve_in_child(queue):
    torch.set_num_threads(1)  # as DataLoader workers do
    z = torch.randn(4, 20000, generator=torch.Generator().manual_seed(17))
    p = entropy_normalize_torch(z, torch.full((4,), 2.0, dtype=torch.float64), fused_min_elems=0)[0]
    queue.put(float(h64(p).sub(2.0).abs().max()))


@needs_fused
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fused_path_works_in_a_forked_child_after_threads_in_the_parent():
    """A forked child (a DataLoader worker) runs the kernel single-threaded, without touching the
    parent's OpenMP thread pool, which does not survive a fork."""
    import multiprocessing

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        entropy_normalize_torch(torch.randn(8, 20000), torch.full((8,), 2.0, dtype=torch.float64),
                                fused_min_elems=0)
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_solve_in_child, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=5) < 1e-5


@needs_fused
def test_fused_path_on_rows_found_by_review():
    """Rows an adversarial review broke: each must give a distribution with the target entropy.

    * a large finite mask (-1e13): the float32 moments overflow, so the predicted normalisation
      must not be trusted (it came out 0 or inf, and p NaN);
    * a mask at -1e30: an ordinary row for float32 (no overflow of d), not one to decline, whose
      root lies 30 decades below the start when the target exceeds the unmasked entries' log
      count (the bracket's floor, eq-en-floor, makes that a few bisections; both paths);
    * a row whose gamma would pass float32's range (the step beyond it must stay finite);
    * a tiny target, where float32 gamma stops moving before |H - t| meets the tolerance: the
      kernel must stop there, not spend the evaluation budget."""
    gen = torch.Generator().manual_seed(18)
    z = torch.randn(64, 1024, generator=gen)
    z[:, 512:] = -1e13
    t = torch.linspace(0.5, math.log(1024) - 1e-3, 64, dtype=torch.float64)
    p = entropy_normalize_torch(z, t, fused_min_elems=0)[0]
    assert torch.isfinite(p).all() and torch.allclose(h64(p), t, atol=1e-5)
    z[:, 512:] = -1e30
    for min_elems in (0, 1 << 62):
        p, _, _, evals = entropy_normalize_torch(z, t, fused_min_elems=min_elems)
        assert bool((evals > 0).all()) and bool((evals <= 30).all())
        assert torch.allclose(h64(p), t, atol=1e-5)
    # (entropy 0.5 < log 2 needs the subnormal gap between the top two resolved: gamma ~ 1e40,
    # past float32's range, so the row is solved in float64 and its gamma reported)
    z = torch.tensor([[0.0, -1e-40] + [-1e-3] * 6]).repeat(4, 1)
    with pytest.warns(RuntimeWarning, match="exceeds torch.float32's range"):
        p = entropy_normalize_torch(z, torch.full((4,), 0.5, dtype=torch.float64), fused_min_elems=0)[0]
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(4))
    assert torch.allclose(h64(p), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-6)
    z = torch.randn(16, 32000, generator=gen)
    t = torch.full((16,), 1e-10, dtype=torch.float64)
    pf, gf, _, ef = entropy_normalize_torch(z, t, fused_min_elems=0)
    pe, ge, _, ee = entropy_normalize_torch(z, t, fused_min_elems=1 << 62)
    assert ef.max() <= ee.max() + 1 and torch.allclose(gf, ge, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", ["eager", "c", pytest.param("triton", marks=needs_triton),
                                  pytest.param("triton-tiled", marks=needs_triton)])
def test_masked_rows_with_a_large_finite_mask_value(path):
    """Half the logits masked at -1e30 (finite, as some code masks): for targets above the log
    count of the unmasked half the root lies near 1e-31, 30 decades below the start.  The floor of
    the bracket (eq-en-floor) turns the search into a few geometric bisections on every path."""
    gen = torch.Generator().manual_seed(19)
    z = torch.randn(8, 1024, generator=gen)
    z[:, 512:] = -1e30
    t = torch.tensor([0.5, 3.0, 6.0, 6.2, 6.3, 6.5, 6.8, math.log(1024) - 1e-3], dtype=torch.float64)
    if path.startswith("triton"):
        from entmath.kernels.triton.entropy_normalization import entropy_normalize_fwd

        kw = dict(one_tile_max=0, block=256) if path == "triton-tiled" else {}
        p, gamma, _ = entropy_normalize_fwd(z, t.float(), **kw)
    else:
        if path == "c" and not fused_cpu.enabled(z, min_elems=0):
            pytest.skip("the C kernel is off")
        p, gamma, _, evals = entropy_normalize_torch(z, t, fused_min_elems=0 if path == "c" else 1 << 62)
        assert bool((evals <= 30).all())
    assert torch.allclose(h64(p), t, atol=1e-5, rtol=0)
    assert bool((gamma[4:] < 1e-29).all()) and bool((gamma[:3] > 0.1).all())


def _flat_rows(n, mask, live=None):
    """Rows for the two safeguards of Chapter 2: two thirds masked at ``mask`` with targets on
    the flat top (eq-en-quad), or six live logits and a target above log 6 (the stall rule)."""
    gen = torch.Generator().manual_seed(37)
    z = torch.randn(3, n, generator=gen, dtype=torch.float64)
    if live is None:
        z[:, n // 3:] = mask
        t = torch.tensor([2.0, 4.0, math.log(n // 3) - 0.01], dtype=torch.float64)
    else:
        z[:, live:] = mask
        t = torch.full((3,), 2.0, dtype=torch.float64)
    return z * 2 if live is None else z, t


@pytest.mark.parametrize("case", ["flat-top", "stall"])
@pytest.mark.parametrize("path", ["eager", "c", pytest.param("triton", marks=needs_triton),
                                  pytest.param("triton-tiled", marks=needs_triton)])
def test_flat_top_and_stall_rules_on_every_path(path, case, monkeypatch):
    """Each twin of the safeguarded step must carry both rules (a check that only one path ran
    would let the others lose them).  Flat top: a mask at -1e12, where the start sits on the top
    and Halley only triples gamma; without eq-en-quad the torch paths and the kernel take 23-31
    evaluations and Triton misses.  Stall: six live logits under a deep mask, target 2 > log 6;
    without the rule Halley crawls down a flat stretch (float64, -3e37: all 60 evaluations; the
    float32 kernel, -1e20: 14 where the rule needs 11 at most).  The raw evaluation counts are read from each path itself (the float32 entry
    point re-solves unfinished rows in float64, which would hide a lost rule)."""
    if case == "flat-top":
        mask, n, bound = -1e12, 1536 if path.startswith("triton") else 16384, 12
    else:  # the kernel (float32 only): a mask whose moments stay finite, so Halley's steps stay valid
        mask, n, bound = (-1e20, 8192, 12) if path == "c" else (-3e37, 8192, 30)
    z, t = _flat_rows(n, mask, live=None if case == "flat-top" else 6)
    if path.startswith("triton"):
        import entmath.kernels.triton.entropy_normalization as K

        monkeypatch.setattr(K, "MAX_EVALS", bound)  # a lost rule shows as a miss
        kw = dict(one_tile_max=0, block=256) if path == "triton-tiled" else {}
        zk = z.float() if case == "flat-top" else z  # the stall case in float64, as on the torch paths
        p = K.entropy_normalize_fwd(zk, t.to(zk.dtype), **kw)[0]
    elif path == "c":
        if not fused_cpu.enabled(z.float(), min_elems=0):
            pytest.skip("the C kernel is off")
        p, _, _, evals, _ = fused_cpu.solve(z.float(), t, 60, 8.0)
        assert int(evals.min()) > 0 and int(evals.max()) <= bound, evals  # solved, not declined
    else:  # the eager path, float64
        p, _, _, evals = entropy_normalize_torch(z, t, fused_min_elems=1 << 62)
        assert int(evals.max()) <= bound, evals
    assert torch.all((h64(p) - t).abs() <= 1e-5), h64(p) - t


# ---------------------------------------------------------------------------------------------
# The twins of the safeguarded step: Python (vectors of rows), C and Triton
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _halley_steps_kernel(a_ptr, o_ptr, n, BLOCK: tl.constexpr):
        """The Triton twin, _halley_update, on rows of inputs (gamma, lo, hi, f, r, q, K2, K3, f_prev)."""
        from entmath.kernels.triton.entropy_normalization import _halley_update

        i = tl.arange(0, BLOCK)
        mask = i < n
        a = a_ptr + i * 9
        new, lo, hi = _halley_update(tl.load(a, mask=mask), tl.load(a + 1, mask=mask), tl.load(a + 2, mask=mask),
                                     tl.load(a + 3, mask=mask), tl.load(a + 4, mask=mask), tl.load(a + 5, mask=mask),
                                     tl.load(a + 6, mask=mask), tl.load(a + 7, mask=mask), tl.load(a + 8, mask=mask))
        tl.store(o_ptr + i * 3, new, mask=mask)
        tl.store(o_ptr + i * 3 + 1, lo, mask=mask)
        tl.store(o_ptr + i * 3 + 2, hi, mask=mask)


def _step_inputs(monkeypatch):
    """The inputs of every safeguarded step the eager path takes on rows that exercise its rules
    (the flat top under a mask at -1e12, the stall under six live logits and a mask at -3e37,
    masks at -1e30 with targets on both sides of the unmasked log count, nearly one-hot targets,
    plain Gaussian rows), and random inputs that reach the rest (Newton's step when Halley's
    denominator is not positive, a lost K2, NaN and inf).  Returns (k, 9) float64 rows of
    (gamma, lo, hi, f, r, q, K2, K3, f_prev)."""
    import entmath.ops.entropy_normalization as en

    calls = []
    real = en.halley_update

    def spy(xp, *args):
        calls.append(np.stack(np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in args]), -1))
        return real(xp, *args)

    monkeypatch.setattr(en, "halley_update", spy)
    gen = torch.Generator().manual_seed(41)
    cases = [_flat_rows(4096, -1e12), _flat_rows(8192, -3e37, live=6)]
    zm = torch.randn(6, 1024, generator=gen, dtype=torch.float64)
    zm[:, 512:] = -1e30
    cases.append((zm, torch.tensor([0.5, 3.0, 6.0, 6.3, 6.5, 6.9], dtype=torch.float64)))
    zh = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 2
    zh[3, 0] = 40.0
    cases.append((zh, torch.tensor([1e-3, 1e-8, 1e-14, 1e-6], dtype=torch.float64)))
    zg = torch.randn(8, 300, generator=gen, dtype=torch.float64) * 3
    cases.append((zg, torch.linspace(0.2, math.log(300) - 0.01, 8, dtype=torch.float64)))
    for z, t in cases:
        entropy_normalize_torch(z, t)
    rng = np.random.default_rng(42)
    k = 400
    g = np.exp(rng.uniform(-80, 80, k))
    lo = np.where(rng.random(k) < 0.5, 0.0, g * rng.uniform(0.1, 1, k))
    hi = np.where(rng.random(k) < 0.5, np.inf, g * rng.uniform(1, 10, k))
    f = rng.normal(size=k) * np.exp(rng.uniform(-20, 2, k))
    q = np.exp(rng.uniform(-10, 2, k))
    r = np.maximum(q + f, 0.0) * np.where(rng.random(k) < 0.05, -1.0, 1.0)
    K2 = np.exp(rng.uniform(-60, 3, k)) * np.where(rng.random(k) < 0.1, -1.0, 1.0)
    K3 = rng.normal(size=k) * np.exp(rng.uniform(-10, 10, k))  # large |K3|: Halley's denominator < 0
    f_prev = np.where(rng.random(k) < 0.3, np.inf, f * rng.uniform(0.1, 4, k))
    # Inputs at the rules' thresholds: K2 near f / 4 (the flat top's), |f| near |f_prev| / 2 (the
    # stall's), so that a twin with another constant fails.
    edge = slice(0, k // 4)
    f[edge], hi[edge] = abs(f[edge]), np.inf
    K2[edge] = f[edge] * rng.uniform(0.2, 0.3, k // 4)
    stall_edge = slice(k // 4, k // 2)
    hi[stall_edge] = g[stall_edge] * 2
    lo[stall_edge] = g[stall_edge] / 2
    f_prev[stall_edge] = f[stall_edge] / rng.uniform(0.4, 0.6, k // 4)
    r = np.where(np.arange(k) < k // 2, np.maximum(q + f, 1e-300), r)
    synthetic = np.stack([g, lo, hi, f, r, q, K2, K3, f_prev], -1)
    synthetic[-4:, 6] = [np.nan, np.inf, 0.0, -0.0]
    synthetic[-6:-4, 3] = [np.nan, 0.0]
    return np.concatenate(calls + [synthetic])


def test_step_twins_take_the_same_iterates(monkeypatch):
    """The safeguarded step is written three times, once per backend that needs it: halley_update
    (numpy or torch vectors: the eager path), halley_step in the C kernel, _halley_update in the
    Triton kernel.  Fed the inputs of every step the eager path takes on rows that exercise its
    rules (and random ones for the rest), the three must return the same (gamma, lo, hi) to
    rounding; the test also checks that the inputs reach every rule (a rule no input reaches
    could differ unseen)."""
    from entmath.ops.entropy_normalization import halley_update

    X = _step_inputs(monkeypatch)
    gamma, lo, hi, f, r, q, K2, K3, f_prev = X.T
    with np.errstate(all="ignore"):
        want = np.stack(halley_update(np, gamma, lo, hi, f, r, q, K2, K3, f_prev), -1)
        # Which rule set each step (from the rules' own conditions, as halley_update states them).
        g0, g1 = np.log(r / q), -K2 / r
        den = 2 * g1 * g1 - g0 * (-(K2 + K3) / r - g1 * g1)
        top = (f > 0) & np.isinf(hi) & (K2 > 0) & (K2 < 0.25 * f)
        quad = gamma * np.sqrt(1 + 2 * f / np.where(K2 > 0, K2, 1.0))
        stall = (want[:, 1] > 0) & np.isfinite(want[:, 2]) & (abs(f) > 0.5 * abs(f_prev))
    rules = {"flat top (eq-en-quad)": top & (want[:, 0] == quad),
             "stall: bisection": stall & (want[:, 0] == np.sqrt(want[:, 1]) * np.sqrt(want[:, 2])),
             "Newton (den <= 0)": (den <= 0) & (K2 > 0) & (r > 0) & ~stall & ~top,
             "expansion by 4": np.isinf(want[:, 2]) & (want[:, 0] == 4 * gamma),
             "halving (lo = 0)": (want[:, 1] == 0) & (want[:, 0] == 0.5 * want[:, 2]),
             "Halley": (den > 0) & ~top & ~stall & (want[:, 0] != 4 * gamma)}
    assert all(rule.any() for rule in rules.values()), {k: int(v.sum()) for k, v in rules.items()}
    twins = {}
    if fused_cpu.enabled(torch.ones(2, fused_cpu.MIN_ELEMS)):
        twins["C"] = fused_cpu.halley_steps(torch.from_numpy(X)).numpy()
    if triton_available():
        a = torch.from_numpy(np.ascontiguousarray(X))
        out = torch.empty(len(X), 3, dtype=torch.float64)
        _halley_steps_kernel[(1,)](a, out, len(X), BLOCK=triton.next_power_of_2(len(X)))
        twins["Triton"] = out.numpy()
    assert twins, "no twin to compare (C kernel off and Triton missing)"
    for name, got in twins.items():
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf (equal, caught above)
            same = (got == want) | (np.isnan(got) & np.isnan(want)) | (abs(got - want) <= 1e-13 * abs(want))
        assert same.all(), (name, X[~same.all(-1)][:3], got[~same.all(-1)][:3], want[~same.all(-1)][:3])


@needs_fused
@pytest.mark.skipif(__import__("shutil").which("gcc") is None, reason="needs gcc")
def test_fused_path_compiler_with_arguments(monkeypatch):
    """$CC may carry arguments (a wrapper or flags), as make and setuptools allow."""
    monkeypatch.setattr(fused_cpu, "_lib", None)
    monkeypatch.setenv("CC", "gcc -DENTMATH_UNUSED=1")
    z = torch.randn(3, 500)
    t = torch.full((3,), 2.0, dtype=torch.float64)
    p = fused_cpu.solve(z, t, 60, 8.0)[0]
    assert torch.allclose(h64(p), t, atol=1e-5)


@pytest.mark.parametrize("min_elems", [0, 1 << 62])
def test_a_row_that_exhausts_the_evaluations_warns(monkeypatch, min_elems):
    """No known row needs all MAX_EVALS evaluations; if one does, the op says so (naming the rows)
    instead of returning a p that may miss the target silently.  Forced here by a cap of 1."""
    import entmath.ops.entropy_normalization as en

    if min_elems == 0 and not fused_cpu.enabled(torch.ones(2, 500), min_elems=0):
        pytest.skip("the C kernel is off")
    monkeypatch.setattr(en, "MAX_EVALS", 1)
    monkeypatch.setattr(fused_cpu, "MIN_ELEMS", min_elems)
    z = torch.randn(3, 500, generator=torch.Generator().manual_seed(20)) * 3
    with pytest.warns(RuntimeWarning, match=r"row\(s\) 0, 1, 2 used all 1 evaluations"):
        entropy_normalize(z, 1.0)
    monkeypatch.setattr(en, "MAX_EVALS", 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entropy_normalize(z, 1.0)
