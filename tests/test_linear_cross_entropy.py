"""entmath.linear_cross_entropy: against the materialised computation, mpmath, the tiles, bad input.

(gradcheck and gradgradcheck in float64, compile, fake tensors, torch.func and the host-read count
are in tests/test_pytorch_integration.py; layouts in tests/test_layouts.py; the sharded version in
tests/test_distributed.py.)
"""
from __future__ import annotations

import itertools
import math

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import entmath
import entmath.ops.linear_cross_entropy as lce
from entmath.ops._shards import combine_summaries, stacked
from entmath.ops._stats import merge_summaries
from tests import reference as ref

BACKENDS = ["torch", "triton"]
F64 = torch.float64


def _g(*shape, seed=0, dtype=F64, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _head(N=6, d=5, V=37, seed=0, dtype=F64):
    h, W, b = _g(N, d, seed=seed, dtype=dtype), _g(V, d, seed=seed + 1, dtype=dtype), _g(V, seed=seed + 2, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 3))
    return h, W, b, t


def _materialised(h, W, t, b, eps=0.0, z_loss=0.0, T=1.0, reduction="mean", ignore_index=-100):
    z = F.linear(h, W, b) / T
    return entmath.cross_entropy(z, t, label_smoothing=eps, z_loss=z_loss, reduction=reduction,
                                 ignore_index=ignore_index, return_entropy=True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 2 rows x 5 columns on the torch path: many tiles, ragged in both directions."""
    monkeypatch.setattr(lce, "TILE_LOGITS", 10)
    monkeypatch.setattr(lce, "VOCAB_BLOCK", 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,eps,z_loss,T,bias", [
    ("mean", 0.0, 0.0, 1.0, True), ("none", 0.1, 0.0, 1.0, False), ("sum", 0.0, 0.01, 0.5, True),
    ("mean", 1.0, 0.0, 2.0, False), ("none", 0.2, 0.05, 1.7, True)])
def test_equals_cross_entropy_of_the_materialised_logits(backend, reduction, eps, z_loss, T, bias, small_tiles):
    h, W, b, t = _head()
    t[1] = t[4] = -100
    b = b if bias else None
    xs = [x.clone().requires_grad_() for x in (h, W) + ((b,) if bias else ())]
    ys = [x.clone().requires_grad_() for x in (h, W) + ((b,) if bias else ())]
    loss, ent = entmath.linear_cross_entropy(xs[0], xs[1], t, xs[2] if bias else None, label_smoothing=eps,
                                             z_loss=z_loss, temperature=T, reduction=reduction, return_entropy=True,
                                             backend=backend)
    want, want_ent = _materialised(ys[0], ys[1], t, ys[2] if bias else None, eps, z_loss, T, reduction)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ent, want_ent, rtol=1e-12, atol=1e-13)
    assert bool((ent[[1, 4]] == 0).all())  # ignored rows: entropy 0, as cross_entropy
    gw = torch.linspace(0.5, 1.5, loss.numel(), dtype=F64).view(loss.shape)
    got = torch.autograd.grad((loss * gw).sum() - 0.3 * (ent * torch.arange(6.0, dtype=F64)).sum(), xs)
    exp = torch.autograd.grad((want * gw).sum() - 0.3 * (want_ent * torch.arange(6.0, dtype=F64)).sum(), ys)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13)


def test_matches_torch_linear_and_cross_entropy_in_float32():
    h, W, b, t = _head(N=33, d=16, V=300, dtype=torch.float32)
    hs = [h.clone().requires_grad_(), h.clone().requires_grad_()]
    Ws = [W.clone().requires_grad_(), W.clone().requires_grad_()]
    got = entmath.linear_cross_entropy(hs[0], Ws[0], t, b, label_smoothing=0.1)
    want = F.cross_entropy(F.linear(hs[1], Ws[1], b), t, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(hs[0].grad, hs[1].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Ws[0].grad, Ws[1].grad, rtol=1e-4, atol=1e-6)


def test_leading_dimensions_and_reduction_none():
    h, W, b, t = _head(N=12)
    loss, ent = entmath.linear_cross_entropy(h.view(3, 4, 5), W, t.view(3, 4), reduction="none", return_entropy=True)
    assert loss.shape == ent.shape == (3, 4)
    want, want_ent = _materialised(h, W, t, None, reduction="none")
    torch.testing.assert_close(loss.flatten(), want)
    torch.testing.assert_close(ent.flatten(), want_ent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearly_one_hot_rows_keep_relative_accuracy(backend):
    """The target holds the maximum and the rest of the row is e^-gap below it: the loss is about
    (V - 1) e^-gap and the entropy (V - 1)(1 + gap) e^-gap, both tiny, and both lost by code that
    forms lse - z_t or rounds 1 + e^-gap to 1.  fp32 inputs, mpmath reference."""
    for gap in (12.0, 25.0, 60.0):
        V, d = 20, 4
        W = torch.zeros(V, d)
        W[:, 0] = -gap / 8
        W[3, 0] = 0.0
        h = torch.tensor([[8.0, 1.0, -2.0, 0.5]])  # logits: 0 at class 3, -gap elsewhere (+ the bias)
        b = torch.zeros(V)
        b[7] = -1.0
        loss, ent = entmath.linear_cross_entropy(h, W, torch.tensor([3]), b, return_entropy=True, backend=backend)
        row = (h.double() @ W.double().T + b.double())[0].tolist()
        want_loss, want_ent = ref.logsumexp(row) - mp.mpf(row[3]), ref.entropy(row)
        assert abs(loss.item() - want_loss) <= 1e-5 * want_loss
        assert abs(ent.item() - want_ent) <= 1e-5 * want_ent


@given(n=st.integers(1, 5), v=st.integers(1, 40), d=st.integers(1, 6), scale=st.floats(0.1, 20.0),
       seed=st.integers(0, 10**6), eps=st.sampled_from([0.0, 0.3]), T=st.sampled_from([0.5, 1.0, 3.0]))
def test_float32_within_a_stated_bound_of_float64(n, v, d, scale, seed, eps, T):
    """float32 inputs: loss and entropy within 1e-5 relative (+1e-6) of the exact values for those
    inputs (the float64 computation of the same numbers, itself checked against mpmath)."""
    h, W, b, t = _head(n, d, v, seed=seed, dtype=torch.float32)
    h = h * scale
    loss, ent = entmath.linear_cross_entropy(h, W, t, b, label_smoothing=eps, temperature=T, reduction="none",
                                             return_entropy=True)
    want, want_ent = _materialised(h.double(), W.double(), t, b.double(), eps=eps, T=T, reduction="none")
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item() * 0.1))
    assert torch.allclose(ent.double(), want_ent, rtol=1e-5, atol=1e-6)


# ---- the tiles, the splits and the kernels --------------------------------------------------
def test_tiled_summary_equals_one_tile(small_tiles):
    h, W, b, t = _head(N=7, V=23)
    tiled = lce.linear_summary_torch(h, W, b, t, 0.8, True)
    z = (h @ W.T + b) * 0.8
    whole = lce.chunk_summary(z.clone(), masked=True)
    torch.testing.assert_close(tiled[0], whole[0], rtol=1e-15, atol=0)  # the maximum (to the matmul's rounding)
    torch.testing.assert_close(tiled[1], whole[1], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(tiled[2], whole[2], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(tiled[3], z.gather(1, t[:, None]).squeeze(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(tiled[4], (tiled[0][:, None] - z).sum(-1), rtol=1e-14, atol=1e-14)  # sum (m - z_j)


def test_pairwise_merges_and_the_p_way_merge_agree():
    """merge_summaries folded over the shards (the torch path) and combine_summaries in one step
    (the kernel's splits, the ranks) are the same merge, including ties at the maximum."""
    z = _g(5, 12, seed=4, scale=3.0)
    z[2, 3] = z[2, 9] = z[2].max() + 1.0  # a tie across two shards
    shards = [z[:, i:i + 4].clone() for i in (0, 4, 8)]
    parts = [lce.chunk_summary(s.clone(), masked=True) for s in shards]
    run = parts[0]
    for p in parts[1:]:
        run = merge_summaries(run, p)
    M, R, A, _ = combine_summaries(*(torch.stack(x) for x in zip(*parts)), [], *stacked(0))
    whole = lce.chunk_summary(z.clone(), masked=True)
    for a, b in ((run, whole), ((M, R, A), whole)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(a[2], b[2], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_kernel_summary_with_splits_equals_the_torch_tiles(splits):
    """Implementation check (Triton under the interpreter vs torch): V spans several 32-wide
    column blocks, so the splits each hold some of them and the merge runs."""
    h, W, b, t = _head(N=20, d=7, V=70, seed=5)
    t[3] = 69
    want = lce.linear_summary_torch(h, W, b, t, 1.3, True)
    got = lce.triton_summary(h, W, b, t, 1.3, True, splits=splits)
    torch.testing.assert_close(got[0], want[0], rtol=1e-14, atol=0)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


def test_kernel_gradient_tile_equals_the_torch_formula():
    """Implementation check: linear_grad_logits_kernel against logits_grad (eq-lh-grad-z)."""
    from entmath.ops._rows import kernels

    h, W, b, t = _head(N=9, d=6, V=45, seed=6)
    t[2] = -100
    loss, lse, ent = lce.linear_cross_entropy_torch(h, W, b, t, 0.1, -100, 0.02, 0.7, True)
    coefs = lce.row_coefficients(t, lse, 45, 0.1, -100, 0.02, 0.7, _g(9, seed=7), None, _g(9, seed=8))
    z = (h @ W.T + b) * 0.7
    want = lce.logits_grad(z, t, lse, ent, *coefs)
    out = torch.empty(9, 45, dtype=F64)
    kernels("linear_cross_entropy").linear_grad_logits(h, W, b, t, lse, ent, *coefs[:3], coefs[3], 0.7, out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
    assert bool((out[2] == 0).all())  # the ignored row


def test_logits_are_never_materialised(monkeypatch):
    """Every tensor the forward and backward create is at most one tile (or an input-sized
    gradient): a TorchDispatchMode records the largest output of every op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(lce, "TILE_LOGITS", 64)
    monkeypatch.setattr(lce, "VOCAB_BLOCK", 16)
    N, d, V = 40, 3, 200
    h, W, b, t = _head(N, d, V, seed=9)
    largest = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    largest.append((o.numel(), str(func)))
            return out

    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    with Record():
        loss, ent = entmath.linear_cross_entropy(hh, WW, t, b, return_entropy=True, label_smoothing=0.1)
        (loss - 0.1 * ent.mean()).backward()
    biggest = max(largest)
    assert biggest[0] <= max(64, V * d), biggest  # a tile, or the weight's gradient; N x V = 8000


# ---- options, dtypes, documented values -----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_gives_zero_loss_and_gradient(backend):
    h, W, b, t = _head()
    t[:] = -100
    hh = h.clone().requires_grad_()
    loss = entmath.linear_cross_entropy(hh, W, t, b, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and bool((hh.grad == 0).all())


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    h, W, b, t = _head()
    hh = h.clone().requires_grad_()
    entmath.linear_cross_entropy(hh, W, t, b).backward()
    hr = h.clone().requires_grad_()
    F.cross_entropy(F.linear(hr, W, b), t).backward()
    torch.testing.assert_close(hh.grad, hr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs_accumulate_in_float32(backend):
    h, W, b, t = _head(N=8, d=16, V=50, dtype=torch.bfloat16)
    loss, ent = entmath.linear_cross_entropy(h, W, t, b, return_entropy=True, reduction="none", backend=backend)
    assert loss.dtype == ent.dtype == torch.bfloat16
    want, want_ent = _materialised(h.double(), W.double(), t, b.double(), reduction="none")
    # exact for the bf16 inputs up to fp32 accumulation, then one rounding to bf16
    torch.testing.assert_close(loss.double(), want, rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(ent.double(), want_ent, rtol=8e-3, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entmath.linear_cross_entropy(h, W, t, b, backend=backend).dtype == torch.float32


def test_mixed_dtypes_are_promoted():
    h, W, b, t = _head(dtype=torch.float32)
    got = entmath.linear_cross_entropy(h.bfloat16(), W, t, b)
    want = F.cross_entropy(F.linear(h.bfloat16().float(), W, b), t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_raise_or_give_nan_rows(backend):
    h, W, b, t = _head()
    for x, name in ((h, "hidden"), (W, "weight"), (b, "bias")):
        bad = x.clone()
        bad.view(-1)[3] = float("nan")
        args = {"hidden": h, "weight": W, "bias": b, name: bad}
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            entmath.linear_cross_entropy(args["hidden"], args["weight"], t, args["bias"], backend=backend)
    with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
        entmath.linear_cross_entropy(h, W, torch.tensor([0, 1, 2, 37, 4, 5]), backend=backend)
    big = h.clone()
    big[2] = 1e308  # finite inputs, logits that overflow float64
    with pytest.raises(ValueError, match="logits"):
        entmath.linear_cross_entropy(big, W, t, backend=backend)
    bad = h.clone()
    bad[2, 0] = float("nan")
    tt = t.clone()
    tt[4] = 99
    with entmath.validation(False):
        loss, ent = entmath.linear_cross_entropy(bad, W, tt, b, reduction="none", return_entropy=True, backend=backend)
    assert torch.isnan(loss[2]) and torch.isnan(loss[4]) and torch.isnan(ent[2])
    keep = [0, 1, 3, 5]
    want, want_ent = _materialised(h[keep], W, t[keep], b, reduction="none")
    torch.testing.assert_close(loss[keep], want)
    torch.testing.assert_close(ent[keep], want_ent)


def test_structural_errors_name_the_argument():
    h, W, b, t = _head()
    cases = [
        (dict(hidden=h.long()), TypeError, "hidden"), (dict(weight=W.long()), TypeError, "weight"),
        (dict(bias=b.long()), TypeError, "bias"), (dict(target=t.double()), TypeError, "class indices"),
        (dict(target=[1, 2]), TypeError, "target"), (dict(weight=W[:, :4]), ValueError, "weight"),
        (dict(weight=W[0]), ValueError, "weight"), (dict(weight=W[:0], bias=None), ValueError, "vocabulary"),
        (dict(bias=b[:5]), ValueError, "bias"), (dict(target=t[:4]), ValueError, "target"),
        (dict(hidden=h[0, 0]), ValueError, "hidden"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"), (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(temperature=0.0), ValueError, "temperature"), (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"), (dict(reduction="avg"), ValueError, "reduction"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"), (dict(backend="cuda"), ValueError, "backend"),
    ]
    for change, err, name in cases:
        args = dict(hidden=h, weight=W, target=t, bias=b)
        args.update(change)
        kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "target", "bias")}
        with pytest.raises(err, match=name):
            entmath.linear_cross_entropy(args["hidden"], args["weight"], args["target"], args["bias"], **kw)


def test_temperature_scales_the_logits():
    """linear_cross_entropy at temperature T is cross-entropy of z / T, for every option."""
    h, W, b, t = _head()
    for T, eps in itertools.product([0.25, 4.0], [0.0, 0.5]):
        got = entmath.linear_cross_entropy(h, W, t, b, temperature=T, label_smoothing=eps, z_loss=0.1)
        want = entmath.cross_entropy((h @ W.T + b) / T, t, label_smoothing=eps, z_loss=0.1)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch(backend):
    h, W, b, _ = _head()
    hh = h[:0].clone().requires_grad_()
    loss, ent = entmath.linear_cross_entropy(hh, W, torch.zeros(0, dtype=torch.long), b, return_entropy=True,
                                             backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and ent.shape == (0,) and hh.grad.shape == (0, 5)


# ---- issue 19, item 6 on the linear head: label smoothing at an offset -----------------------
def _exact_logits_at(offset: float, n_rows: int = 6, n_vocab: int = 300, seed: int = 11):
    """h (N, 1), W = 1 (V, 1) and b (V,) in float32 whose logits h_r + b_j are exact float32
    numbers near ``offset`` (integers h, b on the grid of 4 ulps of the offset): the op's error
    is then its own, not the matmul's."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (n_rows, 1), generator=g).float()
    ulp = 2.0 ** (math.frexp(offset)[1] - 24) if offset else 2.0 ** -20
    b = (offset + torch.round(torch.randn(n_vocab, generator=g, dtype=F64) * 3 / (4 * ulp)) * 4 * ulp).float()
    t = torch.randint(0, n_vocab, (n_rows,), generator=g)
    z64 = h.double() + b.double()
    assert torch.equal((h + b).double(), z64)
    return h, torch.ones(n_vocab, 1), b, t, z64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_label_smoothing_keeps_its_digits_at_an_offset(backend, offset, small_tiles):
    """lse - mean z is formed as log S + sum_j (m - z_j) / V, the gaps moved to each new maximum
    across tiles and kernel splits (terms >= 0).  The sum of the logits it replaced carried the
    offset's rounding: 9e-6 relative at 1e4 and 1e-4 at 1e5 (F.cross_entropy: 1e-7)."""
    h, W, b, t, z64 = _exact_logits_at(offset)
    want = F.cross_entropy(z64, t, label_smoothing=0.1, reduction="none")
    for splits in ((None,) if backend == "torch" else (1, 3)):
        if splits is None:
            got = entmath.linear_cross_entropy(h, W, t, b, label_smoothing=0.1, reduction="none", backend=backend)
        else:
            m, r, a, z_t, gap = lce.triton_summary(h, W, b, t, 1.0, True, splits=splits)
            got = lce.summary_to_rows(m, r, a, z_t, gap, t, W.shape[0], 0.1, -100, 0.0, False)[0]
        assert ((got.double() - want).abs() <= 4e-7 * want).all(), (splits, ((got.double() - want) / want).tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_label_smoothing_at_an_offset(backend):
    """entmath.distributed's path without the process group: logits_summary per shard, the gaps
    moved to the global maximum in combine_summaries (stacked shards for the all-reduce), then the
    loss; one shard's row entirely -inf (a class of mass eps / V at -inf: the loss is +inf)."""
    from entmath.ops._shards import logits_summary

    h, W, b, t, z64 = _exact_logits_at(1e4, n_vocab=30)
    z = (h + b).contiguous()
    z[5, 20:] = -math.inf
    cuts = [(0, 10), (10, 20), (20, 30)]
    parts = [logits_summary(z[:, lo:hi].contiguous(), t - lo, True, False, backend) for lo, hi in cuts]
    m, r, a, z_t, gap = (torch.stack(x) for x in zip(*parts))
    counts = torch.tensor([[float(hi - lo)] for lo, hi in cuts], dtype=m.dtype)
    M, R, A, sums = combine_summaries(m, r, a, [z_t], *stacked(0), gap=(gap, counts))
    loss = lce.loss_from_statistics(M, torch.log1p(R), None, sums[..., 0], sums[..., 1], t, 30, 0.1, -100, 0.0)[0]
    want = F.cross_entropy(z64, t, label_smoothing=0.1, reduction="none")
    assert ((loss[:5].double() - want[:5]).abs() <= 4e-7 * want[:5]).all(), ((loss[:5].double() - want[:5]) / want[:5])
    assert loss[5].item() == math.inf
