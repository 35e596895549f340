"""entmath attention_entropy (Chapter 3): mpmath reference, explicit n x n computation, chunking,
causal/offset masking, per-query scales, gradients, the Triton kernel and bad inputs."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel is defined

import math  # noqa: E402

import mpmath as mp  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import entmath  # noqa: E402
from entmath.ops.attention_entropy import attention_entropy  # noqa: E402
from entmath.ops.logn_attention import logn_scale, query_lengths  # noqa: E402
from tests import reference as ref  # noqa: E402

BACKENDS = ["torch", "triton"]


def explicit(q, k, scale, is_causal=False, offset=0):
    """The n x n definition in the inputs' dtype: logits, masking, softmax, -sum p log p."""
    scale = torch.as_tensor(scale, dtype=q.dtype)
    z = (q @ k.transpose(-1, -2)) * scale.expand(q.shape[:-1])[..., None]
    if is_causal:
        L, S = z.shape[-2:]
        z = z.masked_fill(torch.arange(S)[None, :] > torch.arange(L)[:, None] + offset, float("-inf"))
    # log p replaced by 0 where p = 0 *before* the product: 0 log 0 = 0 and its gradient is 0, not NaN
    p = torch.softmax(z, -1)
    return -(p * torch.where(p > 0, torch.log_softmax(z, -1), 0.0)).sum(-1)


def mp_entropies(q, k, scale, is_causal=False, offset=0):
    """50-digit entropies of every row of a (L, d) x (S, d) problem; float64 inputs are exact."""
    out = []
    for i, qi in enumerate(q.tolist()):
        sc = mp.mpf(scale[i] if isinstance(scale, list) else scale)
        row = []
        for j, kj in enumerate(k.tolist()):
            if is_causal and j > i + offset:
                row.append(ref.NEG_INF)
            else:
                row.append(sc * mp.fsum(mp.mpf(a) * mp.mpf(b) for a, b in zip(qi, kj)))
        out.append(ref.entropy(row))
    return out


problems = st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(1, 5), st.booleans(),
                     st.integers(0, 10**6), st.sampled_from([0.1, 0.5, 1.0, 3.0]))


@settings(max_examples=30)
@given(problem=problems)
def test_matches_mpmath_fp64(problem):
    L, S, d, causal, seed, spread = problem
    g = torch.Generator().manual_seed(seed)
    L = min(L, S) if causal else L
    offset = (seed % (S - L + 1)) if causal else 0
    q = torch.randn(L, d, generator=g, dtype=torch.float64) * spread * 3
    k = torch.randn(S, d, generator=g, dtype=torch.float64)
    scale = (torch.rand(L, generator=g, dtype=torch.float64) * 2).tolist()
    got = attention_entropy(q, k, scale=torch.tensor(scale, dtype=torch.float64), is_causal=causal, offset=offset,
                            chunk_size=1 + seed % 4).tolist()
    want = mp_entropies(q, k, scale, causal, offset)
    for gv, wv in zip(got, want):
        assert abs(gv - wv) <= 1e-13 + 1e-12 * abs(wv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [(4, 4, False, 0), (3, 11, False, 0), (5, 5, True, 0), (5, 12, True, 7), (4, 9, True, 2)])
def test_triton_and_torch_match_mpmath(backend, case):
    L, S, causal, offset = case
    g = torch.Generator().manual_seed(L * 100 + S)
    q, k = torch.randn(L, 6, generator=g, dtype=torch.float64) * 2, torch.randn(S, 6, generator=g, dtype=torch.float64)
    got = attention_entropy(q, k, scale=0.7, is_causal=causal, offset=offset, backend=backend).tolist()
    want = mp_entropies(q, k, 0.7, causal, offset)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-13


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 13)])
def test_chunking_does_not_change_the_result(chunk, causal, offset):
    g = torch.Generator().manual_seed(chunk)
    q, k = torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 53, 8, generator=g, dtype=torch.float64)
    got = attention_entropy(q, k, is_causal=causal, offset=offset, chunk_size=chunk)
    want = explicit(q, k, 1 / math.sqrt(8), causal, offset)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("L,S,d", [(1, 1, 3), (3, 3, 5), (1000, 1000, 16), (5, 4097, 8), (4097, 3, 4)])
def test_triton_kernel_matches_torch_on_odd_sizes(L, S, d):
    g = torch.Generator().manual_seed(L + S)
    q, k = torch.randn(1, L, d, generator=g) * 2, torch.randn(1, S, d, generator=g)
    a = attention_entropy(q, k, backend="triton")
    b = attention_entropy(q, k, backend="torch")
    assert torch.allclose(a, b, rtol=1e-5, atol=2e-5)
    if L <= S:
        off = S - L
        a = attention_entropy(q, k, is_causal=True, offset=off, backend="triton")
        b = attention_entropy(q, k, is_causal=True, offset=off, backend="torch")
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_and_single_precision(backend, dtype, tol):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 37, 16, generator=g), torch.randn(2, 70, 16, generator=g)
    got = attention_entropy(q.to(dtype), k.to(dtype), backend=backend)
    assert got.dtype == dtype
    want = explicit(q.to(dtype).double(), k.to(dtype).double(), 0.25)  # same rounded inputs, exact math
    assert torch.allclose(got.double(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gap", [10.0, 20.0, 40.0, 80.0])
def test_nearly_one_hot_rows_keep_relative_accuracy(backend, gap):
    # logits (0, -gap, -gap - 1): H ~ (1 + gap) e^{-gap}, lost by code that rounds 1 + e^{-gap} to 1
    q = torch.ones(1, 1)
    k = torch.tensor([[0.0], [-gap], [-gap - 1.0]])
    got = attention_entropy(q, k, scale=1.0, backend=backend).item()
    want = float(ref.entropy([0.0, -gap, -gap - 1.0]))
    assert want > 0 and abs(got - want) <= 1e-5 * want


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_uniform_and_single_key(backend):
    q = torch.zeros(2, 5, 4)  # all logits 0: uniform over the keys a query sees
    k = torch.randn(2, 9, 4)
    h = attention_entropy(q, k, backend=backend)
    assert torch.allclose(h, torch.full_like(h, math.log(9)))
    h = attention_entropy(q, k, is_causal=True, offset=4, backend=backend)
    assert torch.allclose(h, torch.log(torch.arange(5, 10.0)).expand(2, 5))
    assert attention_entropy(torch.randn(3, 1, 2), torch.randn(3, 1, 2), backend=backend).eq(0).all()
    h = attention_entropy(torch.randn(4, 30, 8) * 3, torch.randn(4, 50, 8), backend=backend)
    assert bool((h >= 0).all()) and bool((h <= math.log(50) + 1e-6).all())


def test_per_query_scale_broadcasts_and_matches_logn_scale():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64)
    for scale in [0.3, torch.tensor(0.3, dtype=torch.float64), torch.rand(6, dtype=torch.float64),
                  torch.rand(3, 1, dtype=torch.float64), torch.rand(2, 3, 6, dtype=torch.float64)]:
        full = torch.as_tensor(scale, dtype=torch.float64).expand(2, 3, 6)
        assert torch.allclose(attention_entropy(q, k, scale=scale), explicit(q, k, full), atol=1e-13)
    n = query_lengths(6, 10, is_causal=True, offset=4)
    lam = logn_scale(n, 4, 8, dtype=torch.float64)
    assert torch.allclose(attention_entropy(q, k, scale=lam, is_causal=True, offset=4),
                          explicit(q, k, lam, True, 4), atol=1e-13)


def test_agrees_with_entmath_entropy_of_the_explicit_logits():
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(3, 33, 8, generator=g), torch.randn(3, 45, 8, generator=g)
    want = entmath.entropy((q @ k.transpose(-1, -2)) * 0.9)
    assert torch.allclose(attention_entropy(q, k, scale=0.9), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 3)])
def test_gradcheck(backend, causal, offset):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lam = (torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    fn = lambda a, b, c: attention_entropy(a, b, scale=c, is_causal=causal, offset=offset, chunk_size=3,  # noqa: E731
                                           backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, lam), fast_mode=backend == "triton")


def test_gradient_matches_autograd_of_the_definition():
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(7, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(2, 7, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad((attention_entropy(q, k, scale=lam, is_causal=True, offset=4, chunk_size=2) * w).sum(),
                             (q, k, lam))
    g2 = torch.autograd.grad((explicit(q, k, lam, True, 4) * w).sum(), (q, k, lam))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)


def test_float_scale_gets_no_gradient_and_half_inputs_backprop():
    q = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    attention_entropy(q, k, scale=0.5).sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.dtype == torch.bfloat16
    assert bool(torch.isfinite(q.grad.float()).all())


def test_empty_inputs():
    k = torch.randn(3, 4, 2)
    assert attention_entropy(torch.randn(3, 0, 2), k).shape == (3, 0)
    assert attention_entropy(torch.randn(3, 0, 2), k, is_causal=True).shape == (3, 0)
    assert attention_entropy(torch.randn(0, 5, 2), torch.randn(0, 4, 2)).shape == (0, 5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.ones(2, 3, dtype=torch.int64)), TypeError, "q must have a floating-point dtype"),
    (dict(k=torch.ones(4, 3, dtype=torch.float64)), TypeError, "k must have the dtype of q"),
    (dict(q=torch.ones(3)), ValueError, r"q must have shape \(\.\.\., length, d\)"),
    (dict(k=torch.ones(2, 4, 3)), ValueError, "k must have the leading shape of q"),
    (dict(k=torch.ones(4, 2)), ValueError, "k must have the feature size of q"),
    (dict(q=torch.ones(2, 0), k=torch.ones(4, 0)), ValueError, "empty feature dimension"),
    (dict(k=torch.ones(0, 3)), ValueError, "k has no keys"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="big"), TypeError, "scale must be None, a float or a tensor"),
    (dict(scale=torch.ones(5)), ValueError, "scale of shape .* does not broadcast"),
    (dict(scale=torch.ones(3, 2)), ValueError, "scale of shape .* has more dimensions"),
    (dict(scale=torch.tensor([1.0, float("inf")])), ValueError, "scale contains NaN or inf"),
    (dict(scale=torch.ones(2, dtype=torch.int64)), TypeError, "scale must be a float tensor"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be an int or None"),
    (dict(offset=1), ValueError, "offset=1 only applies with is_causal=True"),
    (dict(is_causal=True, offset=3), ValueError, "needs at least offset \\+ L = 5 keys"),
    (dict(is_causal=True, offset=-1), ValueError, "offset must be >= 0"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(train_length=1), ValueError, "train_length must be >= 2"),
    (dict(train_length=8.0), TypeError, "train_length must be an int"),
    (dict(kappa=1.0), ValueError, "give train_length too"),
    (dict(clamp_min_to_train_length=True), ValueError, "give train_length too"),
    (dict(train_length=8, kappa=1.0, scale=0.5), ValueError, "give scale or kappa, not both"),
    (dict(train_length=8, kappa=-1.0), ValueError, "kappa must be finite and > 0"),
    (dict(train_length=8, clamp_min_to_train_length=1), TypeError, "clamp_min_to_train_length must be a bool"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    args = dict(q=torch.ones(2, 3), k=torch.ones(4, 3))
    args.update(kwargs)
    q, k = args.pop("q"), args.pop("k")
    with pytest.raises(exc, match=match):
        attention_entropy(q, k, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_raise_and_name_the_input(backend):
    g = torch.Generator().manual_seed(13)
    q, k = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    bad = q.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        attention_entropy(bad, k, backend=backend)
    bad = k.clone()
    bad[0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="k contains inf"):
        attention_entropy(q, bad, backend=backend)
    bad = k.clone()
    bad[1, 0, 0] = -float("inf")  # would give -inf logits, which must not pass for masked keys
    with pytest.raises(ValueError, match="k contains inf"):
        attention_entropy(q, bad, backend=backend)
    with pytest.raises(ValueError, match="may overflow"):
        attention_entropy(q * 1e20, k * 1e20, backend=backend)
    with pytest.raises(ValueError, match="may overflow"):
        attention_entropy(q, k, scale=1e38, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_entries_whose_logits_fit_are_accepted(backend):
    """q with entries of 1e20 against keys of 1e-19: logits of order 10, far inside float32.  The
    overflow check formed norm(q) from squares (1e40: inf in float32) and refused it; the norms
    are now scaled by each row's largest entry."""
    g = torch.Generator().manual_seed(14)
    q, k = torch.randn(1, 3, 4, generator=g) * 1e20, torch.randn(1, 5, 4, generator=g) * 1e-19
    got = attention_entropy(q, k, scale=1.0, backend=backend)
    want = entmath.entropy((q.double() @ k.double().transpose(-1, -2)), dim=-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="may overflow"):  # 1e20 x 1e19 x 4 = 4e39: the check still trips
        attention_entropy(q, k * 1e38, scale=1.0, backend=backend)


# ---------------------------------------------------------------------------- log-n attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,offset,kw", [(False, 0, {}), (True, 0, {}), (True, 5, {}),
                                              (True, 5, {"scale": 0.4}), (True, 5, {"kappa": 0.9}),
                                              (True, 5, {"clamp_min_to_train_length": True}),
                                              (False, 0, {"scale": "tensor"})])
def test_train_length_gives_the_entropy_of_logn_attention(backend, causal, offset, kw):
    """attention_entropy(q, k, train_length=n0, ...) is the entropy of the rows logn_attention
    attends with (same scale, causal offset, kappa, clamp): checked against the rows themselves,
    recovered from logn_attention with v = identity (each output row is then p_i)."""
    g = torch.Generator().manual_seed(21)
    L, S, d = 6, 11, 4
    q, k = torch.randn(2, L, d, generator=g, dtype=torch.float64) * 2, torch.randn(2, S, d, generator=g, dtype=torch.float64)
    kw = dict(kw)
    if kw.get("scale") == "tensor":
        kw["scale"] = torch.rand(2, L, generator=g, dtype=torch.float64) + 0.2
        # a per-query base scale: the rows of logn_attention with each query scaled by scale_i
        probs = torch.stack([entmath.logn_attention(q[b:b + 1] * kw["scale"][b, :, None], k[b:b + 1],
                                                    torch.eye(S, dtype=torch.float64)[None], train_length=8,
                                                    scale=1.0)[0] for b in range(2)])
    else:
        probs = entmath.logn_attention(q, k, torch.eye(S, dtype=torch.float64).expand(2, S, S), train_length=8,
                                       is_causal=causal, offset=offset, **kw)
    want = -torch.where(probs > 0, probs * probs.log(), 0.0).sum(-1)
    got = attention_entropy(q, k, train_length=8, is_causal=causal, offset=offset, backend=backend, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if "scale" not in kw and "kappa" not in kw:  # the same as the scales built by hand
        lam = logn_scale(query_lengths(L, S, is_causal=causal, offset=offset), d, 8, dtype=torch.float64,
                         clamp_min_to_train_length=kw.get("clamp_min_to_train_length", False))
        torch.testing.assert_close(got, attention_entropy(q, k, scale=lam, is_causal=causal, offset=offset,
                                                          backend=backend), rtol=1e-14, atol=1e-14)


def test_train_length_scale_gets_gradients():
    g = torch.Generator().manual_seed(22)
    q = torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(1, 4, generator=g, dtype=torch.float64).add(0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: attention_entropy(a, b, scale=c, train_length=5, is_causal=True,
                                                                      offset=2), (q, k, s))
