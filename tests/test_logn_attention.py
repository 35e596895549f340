"""entmath logn_scale / logn_attention (Chapter 3): calibration, exact agreement with the explicit
softmax(lambda_i q_i k^T) v formula, causal offsets, masks, gradients and bad inputs."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import mpmath as mp  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from entmath.ops.attention_entropy import attention_entropy  # noqa: E402
from entmath.ops.logn_attention import logn_attention, logn_scale, query_lengths  # noqa: E402


def explicit(q, k, v, n0, is_causal=False, offset=0, mask=None, kappa=None, clamp=False):
    """softmax(lambda(n_i) q_i k^T) v written out in the inputs' dtype, n_i counted by hand."""
    L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    n = [i + 1 + offset if is_causal else S for i in range(L)]
    n = [max(x, n0) if clamp else x for x in n]
    lam = [(kappa * math.log(x) / d) if kappa else math.log(x) / (math.log(n0) * math.sqrt(d)) for x in n]
    z = (q @ k.transpose(-1, -2)) * torch.tensor(lam, dtype=q.dtype)[:, None]
    if is_causal:
        z = z.masked_fill(torch.arange(S)[None, :] > torch.arange(L)[:, None] + offset, float("-inf"))
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask
    return torch.softmax(z, -1) @ v


def qkv(L, S, d=4, e=5, lead=(2, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, L, d, generator=g, dtype=dtype) * 2, torch.randn(*lead, S, d, generator=g, dtype=dtype),
            torch.randn(*lead, S, e, generator=g, dtype=dtype))


# ---------------------------------------------------------------------------- logn_scale
@settings(max_examples=40)
@given(n=st.integers(1, 10**6), d=st.integers(1, 512), n0=st.integers(2, 10**5))
def test_logn_scale_matches_mpmath(n, d, n0):
    got = logn_scale(n, d, n0, dtype=torch.float64).item()
    want = mp.log(n) / (mp.log(n0) * mp.sqrt(d))  # kappa = sqrt(d)/log n0, scale = kappa log n / d
    assert abs(got - want) <= 1e-15 * abs(want) + 1e-300


@pytest.mark.parametrize("d,n0", [(1, 2), (64, 512), (128, 4096), (80, 32768)])
def test_calibration_gives_standard_scale_at_train_length(d, n0):
    assert logn_scale(n0, d, n0, dtype=torch.float64).item() == pytest.approx(1 / math.sqrt(d), rel=1e-15)


def test_kappa_override_and_tensor_input():
    n = torch.tensor([[1, 2], [10, 1000]])
    got = logn_scale(n, 16, 100, kappa=2.5, dtype=torch.float64)
    assert got.shape == (2, 2)
    assert torch.allclose(got, 2.5 * torch.log(n.double()) / 16, rtol=1e-15)
    assert logn_scale([3, 4], 4, 8).dtype == torch.float32


def test_clamp_reproduces_qwen_logn_factor():
    # Qwen (modeling_qwen.py): query at 1-based position i is multiplied by log_{seq_length}(i) when
    # i > seq_length and by 1 otherwise, on top of the 1/sqrt(d) of the attention scores.
    seq_length, d = 2048, 128
    qwen = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 9000)]
    got = logn_scale(torch.arange(1, 9000), d, seq_length, clamp_min_to_train_length=True, dtype=torch.float64)
    assert torch.allclose(got * math.sqrt(d), torch.tensor(qwen, dtype=torch.float64), rtol=1e-14)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(d=0), ValueError, "d must be >= 1"),
    (dict(d=2.0), TypeError, "d must be an int"),
    (dict(train_length=1), ValueError, "train_length must be >= 2"),
    (dict(train_length=True), TypeError, "train_length must be an int"),
    (dict(kappa=-1.0), ValueError, "kappa must be finite and > 0"),
    (dict(kappa="1"), TypeError, "kappa must be a float or None"),
    (dict(n=0), ValueError, "n must be >= 1"),
    (dict(n=torch.tensor([3.0, float("nan")])), ValueError, "n must be >= 1"),
    (dict(n=torch.tensor([True])), TypeError, "n must hold integers or floats"),
    (dict(n="ten"), TypeError, "n must be an int, a sequence of ints or a tensor"),
    (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point"),
])
def test_logn_scale_bad_arguments(kwargs, exc, match):
    args = dict(n=10, d=4, train_length=8)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        logn_scale(args.pop("n"), args.pop("d"), args.pop("train_length"), **args)


# ---------------------------------------------------------------------------- logn_attention
cases = st.tuples(st.integers(1, 6), st.integers(1, 9), st.booleans(), st.integers(0, 10**6), st.integers(2, 64))


@settings(max_examples=40)
@given(case=cases)
def test_exact_against_explicit_formula_fp64(case):
    L, S, causal, seed, n0 = case
    L = min(L, S) if causal else L
    offset = seed % (S - L + 1) if causal else 0
    q, k, v = qkv(L, S, seed=seed)
    got = logn_attention(q, k, v, train_length=n0, is_causal=causal, offset=offset)
    want = explicit(q, k, v, n0, causal, offset)
    assert torch.allclose(got, want, rtol=0, atol=1e-14)


def test_query_lengths():
    assert query_lengths(4, 9).tolist() == [9, 9, 9, 9]
    assert query_lengths(4, 9, is_causal=True, offset=5).tolist() == [6, 7, 8, 9]
    assert query_lengths(3, 3, is_causal=True).tolist() == [1, 2, 3]


@pytest.mark.parametrize("L,S,offset", [(5, 5, 0), (5, 9, 0), (5, 9, 4), (5, 9, 2), (1, 7, 6), (1, 1, 0)])
def test_causal_offset_masks(L, S, offset):
    q, k, v = qkv(L, S, seed=L + S + offset)
    got = logn_attention(q, k, v, train_length=4, is_causal=True, offset=offset)
    assert torch.allclose(got, explicit(q, k, v, 4, True, offset), rtol=0, atol=1e-14)
    # the KV-cache reading: a query block after `offset` cached keys equals the matching rows of
    # the full causal computation over offset + L queries
    if S == offset + L:
        qf = torch.cat([torch.randn(2, 3, offset, 4, dtype=torch.float64), q], dim=-2)
        full = logn_attention(qf, k, v, train_length=4, is_causal=True)
        assert torch.allclose(got, full[..., offset:, :], rtol=0, atol=1e-14)


def test_offset_zero_with_fewer_queries_is_top_left_aligned_like_sdpa():
    q, k, v = qkv(3, 7)
    lam = logn_scale(query_lengths(3, 7, is_causal=True), 4, 16, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q * lam[:, None], k, v, is_causal=True, scale=1.0)
    assert torch.allclose(logn_attention(q, k, v, train_length=16, is_causal=True), want, atol=1e-14)


@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 3)])
@pytest.mark.parametrize("kind", ["bool", "float", "bool-broadcast"])
def test_attn_mask(causal, offset, kind):
    L, S = 4, 8
    q, k, v = qkv(L, S, seed=3)
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(2, 3, L, S, generator=g) > 0.4
    keep[..., 0] = True  # every query keeps key 0, which causal masking never hides
    if kind == "bool-broadcast":
        keep = keep[0, 0]
    mask = keep if kind != "float" else torch.where(keep, torch.rand(keep.shape, generator=g, dtype=torch.float64), -math.inf)
    got = logn_attention(q, k, v, train_length=5, is_causal=causal, offset=offset, attn_mask=mask)
    assert torch.allclose(got, explicit(q, k, v, 5, causal, offset, mask), rtol=0, atol=1e-14)


def test_fully_masked_query_gives_zero_and_leaves_other_rows_alone():
    q, k, v = qkv(4, 6)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[2] = False
    got = logn_attention(q, k, v, train_length=5, attn_mask=keep)
    assert got[..., 2, :].eq(0).all()
    want = explicit(q, k, v, 5)
    assert torch.allclose(got[..., [0, 1, 3], :], want[..., [0, 1, 3], :], atol=1e-14)


def test_kappa_and_clamp_options():
    q, k, v = qkv(5, 9)
    assert torch.allclose(logn_attention(q, k, v, train_length=4, kappa=0.7, is_causal=True, offset=4),
                          explicit(q, k, v, 4, True, 4, kappa=0.7), atol=1e-14)
    assert torch.allclose(logn_attention(q, k, v, train_length=7, is_causal=True, offset=4, clamp_min_to_train_length=True),
                          explicit(q, k, v, 7, True, 4, clamp=True), atol=1e-14)
    # within the training length the clamped op is exactly standard SDPA
    q, k, v = qkv(6, 6)
    assert torch.allclose(logn_attention(q, k, v, train_length=64, is_causal=True, clamp_min_to_train_length=True),
                          F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-14)


def test_at_train_length_it_is_standard_attention():
    q, k, v = qkv(10, 10)
    assert torch.allclose(logn_attention(q, k, v, train_length=10), F.scaled_dot_product_attention(q, k, v), atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_lower_precisions(dtype, tol):
    q, k, v = qkv(16, 24, d=8, e=8, seed=6)
    got = logn_attention(q.to(dtype), k.to(dtype), v.to(dtype), train_length=12, is_causal=True, offset=8)
    assert got.dtype == dtype
    want = explicit(q, k, v, 12, True, 8)
    assert torch.allclose(got.double(), want, atol=tol)


def test_gradients_match_the_explicit_formula():
    q, k, v = (t.requires_grad_() for t in qkv(4, 7, seed=9))
    assert torch.autograd.gradcheck(lambda a, b, c: logn_attention(a, b, c, train_length=3, is_causal=True, offset=3),
                                    (q, k, v))
    w = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    g1 = torch.autograd.grad((logn_attention(q, k, v, train_length=3) * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((explicit(q, k, v, 3) * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-13)


def test_entropy_of_logn_rows_is_attention_entropy_with_logn_scale():
    q, k, _ = qkv(6, 11, seed=2)
    lam = logn_scale(query_lengths(6, 11, is_causal=True, offset=5), 4, 8, dtype=torch.float64)
    z = (q @ k.transpose(-1, -2)) * lam[:, None]
    z = z.masked_fill(torch.arange(11)[None, :] > torch.arange(6)[:, None] + 5, float("-inf"))
    p = torch.softmax(z, -1)
    want = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)
    got = attention_entropy(q, k, scale=lam, is_causal=True, offset=5)
    assert torch.allclose(got, want, atol=1e-13)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=torch.ones(2, 3, dtype=torch.int32)), TypeError, "q must have a floating-point dtype"),
    (dict(v=[[1.0]]), TypeError, "v must be a torch.Tensor"),
    (dict(k=torch.ones(4, 3, dtype=torch.float64)), TypeError, "q, k and v must share a dtype"),
    (dict(q=torch.ones(3)), ValueError, r"q must have shape \(\.\.\., length, features\)"),
    (dict(k=torch.ones(4, 2)), ValueError, "k must have the feature size of q"),
    (dict(v=torch.ones(5, 2)), ValueError, "v must have as many rows as k"),
    (dict(q=torch.ones(1, 2, 3)), ValueError, "must share their leading"),
    (dict(q=torch.ones(2, 0), k=torch.ones(4, 0)), ValueError, "empty feature dimension"),
    (dict(k=torch.ones(0, 3), v=torch.ones(0, 2)), ValueError, "k has no keys"),
    (dict(train_length=1), ValueError, "train_length must be >= 2"),
    (dict(offset=2), ValueError, "offset=2 only applies with is_causal=True"),
    (dict(is_causal=True, offset=3), ValueError, "needs at least offset \\+ L = 5 keys"),
    (dict(is_causal="yes"), TypeError, "is_causal must be a bool"),
    (dict(is_causal=True, offset=1.0), TypeError, "offset must be an int"),
    (dict(attn_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "attn_mask of shape .* does not broadcast"),
    (dict(attn_mask=torch.ones(2, 4, dtype=torch.int64)), TypeError, "attn_mask must be boolean or floating point"),
    (dict(attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor or None"),
    (dict(kappa=0.0), ValueError, "kappa must be finite and > 0"),
    # SDPA's arguments
    (dict(scale=0.0), ValueError, "scale must be finite and > 0"),
    (dict(scale=float("nan")), ValueError, "scale must be finite and > 0"),
    (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a float or None"),
    (dict(scale=0.5, kappa=1.0), ValueError, "give scale or kappa, not both"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\]"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(enable_gqa=1), TypeError, "enable_gqa must be a bool"),
    (dict(clamp_min_to_train_length=1), TypeError, "clamp_min_to_train_length must be a bool"),
    # a mask that broadcasts *with* the weights (2, 3, 4) but not *to* them: SDPA fails inside
    (dict(q=torch.ones(2, 3, 3), k=torch.ones(2, 4, 3), v=torch.ones(2, 4, 2),
          attn_mask=torch.ones(5, 1, 3, 4, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(5, 1, 3, 4\) does not broadcast to the attention weights \(2, 3, 4\)"),
    (dict(q=torch.ones(2, 3, 3), k=torch.ones(2, 4, 3), v=torch.ones(2, 4, 2),
          attn_mask=torch.ones(4, 3, 4, dtype=torch.bool)), ValueError, "does not broadcast to the attention weights"),
    # grouped-query heads
    (dict(q=torch.ones(1, 4, 3, 3), k=torch.ones(1, 2, 4, 3), v=torch.ones(1, 2, 4, 2)), ValueError,
     "pass enable_gqa=True"),
    (dict(q=torch.ones(1, 3, 3, 3), k=torch.ones(1, 2, 4, 3), v=torch.ones(1, 2, 4, 2), enable_gqa=True), ValueError,
     r"number of query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
    (dict(q=torch.ones(2, 4, 3, 3), k=torch.ones(1, 2, 4, 3), v=torch.ones(1, 2, 4, 2), enable_gqa=True), ValueError,
     "must share the dimensions before the heads"),
    (dict(q=torch.ones(1, 4, 3, 3), k=torch.ones(1, 2, 4, 3), v=torch.ones(1, 4, 4, 2), enable_gqa=True), ValueError,
     "k and v must share their leading"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    args = dict(q=torch.ones(2, 3), k=torch.ones(4, 3), v=torch.ones(4, 2), train_length=8)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        logn_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# ---------------------------------------------------------------------------- SDPA's arguments
def test_positional_arguments_are_sdpas():
    """logn_attention(q, k, v, attn_mask, dropout_p, is_causal, *, scale, enable_gqa): the
    signature of F.scaled_dot_product_attention, so a call can be swapped for the other (plus
    train_length)."""
    q, k, v = qkv(5, 5, seed=11)
    keep = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[:, 0] = True
    for args, kw in [((), {}), ((keep,), {}), ((None, 0.0, True), {}), ((None, 0.0, False), {"scale": 0.3}),
                     ((keep, 0.0), {"is_causal": False, "scale": 0.3, "enable_gqa": False})]:
        want = F.scaled_dot_product_attention(q, k, v, *args, **kw)
        # (clamped: every query, causal ones too, then has the training length's scale, SDPA's)
        got = logn_attention(q, k, v, *args, **kw, train_length=5, clamp_min_to_train_length=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 4)])
def test_scale_is_sdpas_scale_at_the_training_length(causal, offset):
    """scale replaces 1/sqrt(d): lambda(n) = scale * log(n) / log(n0), equal to scale at n0."""
    q, k, v = qkv(5, 9, seed=12)
    s = 0.37
    kappa = s * q.shape[-1] / math.log(6)  # the same calibration written through kappa
    got = logn_attention(q, k, v, None, 0.0, causal, scale=s, train_length=6, offset=offset)
    torch.testing.assert_close(got, explicit(q, k, v, 6, causal, offset, kappa=kappa), rtol=0, atol=1e-14)
    q, k, v = qkv(6, 6, seed=13)
    torch.testing.assert_close(logn_attention(q, k, v, scale=s, train_length=6),
                               F.scaled_dot_product_attention(q, k, v, scale=s), rtol=0, atol=1e-14)


@pytest.mark.parametrize("causal,offset,masked", [(False, 0, False), (True, 0, False), (True, 2, False),
                                                  (False, 0, True), (True, 2, True)])
def test_grouped_query_heads_equal_expanded_keys(causal, offset, masked):
    """enable_gqa: 6 query heads over 2 key/value heads give what the keys repeated per group give."""
    g = torch.Generator().manual_seed(14)
    q = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 4, 7, generator=g) > 0.3) if masked else None
    if masked:
        mask[..., 0] = True
    got = logn_attention(q, k, v, mask, is_causal=causal, enable_gqa=True, train_length=5, offset=offset)
    ke, ve = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    torch.testing.assert_close(got, explicit(q, ke, ve, 5, causal, offset, mask), rtol=0, atol=1e-14)
    # gradients reach the shared heads
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    logn_attention(q, kk, vv, enable_gqa=True, train_length=5).sum().backward()
    ke2, ve2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    explicit(q, ke2.repeat_interleave(3, dim=1), ve2.repeat_interleave(3, dim=1), 5).sum().backward()
    torch.testing.assert_close(kk.grad, ke2.grad, rtol=0, atol=1e-13)
    torch.testing.assert_close(vv.grad, ve2.grad, rtol=0, atol=1e-13)


def test_dropout_is_sdpas():
    """dropout_p reaches SDPA: with the same RNG state the op equals SDPA on the scaled queries;
    at 1.0 every weight is dropped; 0 is deterministic."""
    q, k, v = qkv(6, 6, seed=15)
    torch.manual_seed(3)
    got = logn_attention(q, k, v, dropout_p=0.4, train_length=6)
    torch.manual_seed(3)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert not torch.allclose(got, logn_attention(q, k, v, train_length=6))
    assert logn_attention(q, k, v, dropout_p=1.0, train_length=6).eq(0).all()


@pytest.mark.parametrize("shape", [(3, 4, 7), (1, 3, 1, 7), (3, 1, 1), (1, 7), (7,), (), (2, 3, 4, 7)])
def test_masks_that_broadcast_to_the_weights_are_accepted(shape):
    q, k, v = qkv(4, 7, seed=16)  # weights (2, 3, 4, 7)
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.3
    if keep.dim():
        keep[..., 0] = True
    else:
        keep = torch.tensor(True)
    got = logn_attention(q, k, v, keep, train_length=5)
    torch.testing.assert_close(got, explicit(q, k, v, 5, mask=keep.expand(2, 3, 4, 7)), rtol=0, atol=1e-14)


def test_larger_batch_mask_is_a_clear_error_not_a_torch_failure():
    """The reproducer: a mask with a larger batch broadcast *with* the weights, passed the check,
    and failed inside SDPA with a RuntimeError."""
    q, k, v = qkv(4, 7, seed=17)  # weights (2, 3, 4, 7)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 3, 4, 7, dtype=torch.bool))
    for causal in (False, True):
        with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 3, 4, 7\) does not broadcast to the "
                                             r"attention weights \(2, 3, 4, 7\)"):
            logn_attention(q, k, v, torch.ones(4, 3, 4, 7, dtype=torch.bool), is_causal=causal, train_length=5)


def test_query_lengths_checks_its_arguments():
    with pytest.raises(ValueError, match="offset=1 only applies"):
        query_lengths(2, 5, offset=1)
    with pytest.raises(ValueError, match="needs at least offset"):
        query_lengths(4, 5, is_causal=True, offset=2)
    with pytest.raises(TypeError, match="L must be an int"):
        query_lengths(2.0, 5)
    with pytest.raises(ValueError, match="S must be >= 1"):
        query_lengths(2, 0)
