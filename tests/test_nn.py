"""entmath.nn: the modules against the functions and against torch's modules, buffers and devices,
and the logits processor inside transformers' generate (a tiny GPT-2 built from a config, no
download)."""
from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F

import entmath
from entmath import nn as enn

f64 = torch.float64
CE_PARAMS = inspect.signature(entmath.cross_entropy).parameters
# cross_entropy's class weights and soft-capping, and entropy's keepdim, arrive with their own
# changes; these tests run as soon as the functions take them.
needs_weight = pytest.mark.skipif("weight" not in CE_PARAMS, reason="cross_entropy has no weight yet")
needs_softcap = pytest.mark.skipif("softcap" not in CE_PARAMS, reason="cross_entropy has no softcap yet")
needs_keepdim = pytest.mark.skipif("keepdim" not in inspect.signature(entmath.entropy).parameters,
                                   reason="entropy has no keepdim yet")


def _g(*shape, seed=0, dtype=f64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _entropy(logp):
    return -(logp.exp() * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)


# ---------------------------------------------------------------------------------------------
# CrossEntropyLoss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.2},
                                {"ignore_index": 2}, {"ignore_index": 2, "label_smoothing": 0.1, "reduction": "sum"}])
def test_cross_entropy_loss_is_torchs_for_class_targets(kw):
    z, t = _g(6, 5).requires_grad_(), torch.tensor([0, 2, 4, 2, 1, 3])
    got = enn.CrossEntropyLoss(**kw)(z, t)
    want = torch.nn.CrossEntropyLoss(**kw)(z, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(want.sum(), z)[0])


def test_cross_entropy_loss_soft_targets_dim_and_the_extra_options():
    z = _g(2, 5, 3)  # classes along dim 1, as torch's modules expect for 3-D input
    y = torch.softmax(_g(2, 5, 3, seed=1), 1)
    torch.testing.assert_close(enn.CrossEntropyLoss(dim=1)(z, y), torch.nn.CrossEntropyLoss()(z, y))
    zz, tt = _g(4, 6), torch.tensor([1, 0, 5, 3])
    loss, ent = enn.CrossEntropyLoss(z_loss=0.01, return_entropy=True, reduction="none")(zz, tt)
    want = entmath.cross_entropy(zz, tt, z_loss=0.01, return_entropy=True, reduction="none")
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(ent, want[1])
    x = _g(4, 6).requires_grad_()
    enn.CrossEntropyLoss(inplace_backward=True)(x * 2.0, tt).backward()
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr * 2.0, tt).backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_cross_entropy_loss_bad_options_are_the_functions_errors():
    z, t = _g(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction"):
        enn.CrossEntropyLoss(reduction="avg")(z, t)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or None"):
        enn.CrossEntropyLoss([1.0, 2.0, 3.0])


def test_cross_entropy_loss_weight_is_a_buffer_like_torchs():
    w = torch.tensor([1.0, 2.0, 0.5])
    mine, theirs = enn.CrossEntropyLoss(w), torch.nn.CrossEntropyLoss(w)
    assert set(mine.state_dict()) == set(theirs.state_dict()) == {"weight"}
    assert [n for n, _ in mine.named_buffers()] == ["weight"] and list(mine.parameters()) == []
    assert mine.double().weight.dtype == f64  # follows .to() / .double() as a buffer does
    fresh = enn.CrossEntropyLoss(torch.ones(3))
    fresh.load_state_dict(mine.state_dict())
    torch.testing.assert_close(fresh.weight, w)  # load_state_dict copies into the existing buffer
    assert enn.CrossEntropyLoss().weight is None and "weight" not in enn.CrossEntropyLoss().state_dict()


@needs_weight
@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.2},
                                {"ignore_index": 1, "label_smoothing": 0.1}])
def test_cross_entropy_loss_with_class_weights_is_torchs(kw):
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=f64)
    z, t = _g(6, 5).requires_grad_(), torch.tensor([0, 2, 4, 2, 1, 3])
    got, want = enn.CrossEntropyLoss(w, **kw)(z, t), torch.nn.CrossEntropyLoss(w, **kw)(z, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(want.sum(), z)[0])


@needs_softcap
def test_cross_entropy_loss_softcap():
    z, t = _g(4, 7) * 30, torch.tensor([0, 6, 3, 1])
    got = enn.CrossEntropyLoss(softcap=20.0)(z, t)
    torch.testing.assert_close(got, F.cross_entropy(20.0 * torch.tanh(z / 20.0), t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Entropy, EntropyNormalize
# ---------------------------------------------------------------------------------------------
def test_entropy_module_in_a_sequential():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), enn.Entropy())
    x = _g(3, 4, dtype=torch.float32)
    logits = model[0](x)
    torch.testing.assert_close(model(x), entmath.entropy(logits))
    assert enn.Entropy(dim=0)(logits).shape == (6,)


@needs_keepdim
def test_entropy_module_keepdim():
    z = _g(3, 4, 5)
    torch.testing.assert_close(enn.Entropy(dim=1, keepdim=True)(z), entmath.entropy(z, 1).unsqueeze(1))


def test_entropy_normalize_module_targets_buffers_and_parameters():
    z = _g(3, 6)
    out = enn.EntropyNormalize(1.2)(z)
    torch.testing.assert_close(out, entmath.entropy_normalize(z, 1.2))
    torch.testing.assert_close(_entropy(out.log()), torch.full((3,), 1.2, dtype=f64), rtol=1e-10, atol=1e-10)
    per_row = torch.tensor([0.5, 1.0, 1.5], dtype=f64)
    m = enn.EntropyNormalize(per_row)
    assert [n for n, _ in m.named_buffers()] == ["target"] and "target" in m.state_dict()
    torch.testing.assert_close(_entropy(m(z).log()), per_row, rtol=1e-10, atol=1e-10)
    learned = enn.EntropyNormalize(torch.nn.Parameter(torch.tensor(1.0, dtype=f64)))
    assert [n for n, _ in learned.named_parameters()] == ["target"]
    (learned(z)[:, 0]).sum().backward()
    assert learned.target.grad is not None and torch.isfinite(learned.target.grad)
    with pytest.raises(ValueError, match="target must be a number >= 0"):
        enn.EntropyNormalize(-1.0)
    with pytest.raises(TypeError, match="target must be a real number"):
        enn.EntropyNormalize("1")


# ---------------------------------------------------------------------------------------------
# LogNAttention
# ---------------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    """A causal self-attention block written against SDPA's call, with the attention call as a
    swappable attribute: F.scaled_dot_product_attention or entmath.nn.LogNAttention."""

    def __init__(self, attention, d=16, heads=4, kv_heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * d * kv_heads // heads)
        self.out = torch.nn.Linear(d, d)
        self.attention, self.heads, self.kv_heads = attention, heads, kv_heads

    def forward(self, x):
        B, L, d = x.shape
        q = self.q(x).view(B, L, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        a = self.attention(q, k, v, None, 0.0, True, enable_gqa=True)
        return self.out(a.transpose(1, 2).reshape(B, L, d))


def test_lognattention_is_a_drop_in_for_sdpa_in_a_block():
    """Clamped at a training length no shorter than the sequence, the module gives SDPA's block
    exactly; unclamped, it gives the log-n scales (the function's result)."""
    x = _g(2, 6, 16, dtype=torch.float32)
    sdpa = _Block(F.scaled_dot_product_attention)
    same = _Block(enn.LogNAttention(8, clamp_min_to_train_length=True))
    torch.testing.assert_close(same(x), sdpa(x), rtol=1e-6, atol=1e-6)
    logn = enn.LogNAttention(8)
    q, k, v = _g(1, 4, 6, 8), _g(1, 2, 6, 8, seed=1), _g(1, 2, 6, 8, seed=2)
    torch.testing.assert_close(logn(q, k, v, is_causal=True, enable_gqa=True),
                               entmath.logn_attention(q, k, v, is_causal=True, enable_gqa=True, train_length=8))


def test_lognattention_dropout_only_while_training():
    m = enn.LogNAttention(6, dropout=0.5)
    q, k, v = _g(1, 2, 6, 8), _g(1, 2, 6, 8, seed=1), _g(1, 2, 6, 8, seed=2)
    plain = entmath.logn_attention(q, k, v, train_length=6)
    torch.manual_seed(1)
    trained = m(q, k, v)
    torch.manual_seed(1)
    torch.testing.assert_close(trained, entmath.logn_attention(q, k, v, dropout_p=0.5, train_length=6))
    assert not torch.allclose(trained, plain)
    m.eval()
    torch.testing.assert_close(m(q, k, v), plain)
    torch.testing.assert_close(m(q, k, v, dropout_p=0.0), plain)
    with pytest.raises(ValueError, match="train_length must be >= 2"):
        enn.LogNAttention(1)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        enn.LogNAttention(8, dropout=1.5)
    with pytest.raises(ValueError, match="kappa must be finite"):
        enn.LogNAttention(8, kappa=-1.0)


# ---------------------------------------------------------------------------------------------
# The logits processor
# ---------------------------------------------------------------------------------------------
def test_logits_processor_gives_log_probabilities_of_the_target_entropy():
    scores = _g(4, 50, dtype=torch.float32) * 3
    scores[1, :10] = -math.inf
    proc = enn.EntropyTargetLogitsProcessor(1.5)
    out = proc(torch.zeros(4, 3, dtype=torch.long), scores)
    assert out.shape == scores.shape and out.dtype == scores.dtype
    torch.testing.assert_close(torch.logsumexp(out.double(), -1), torch.zeros(4, dtype=f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(_entropy(out.double()), torch.full((4,), 1.5, dtype=f64), atol=1e-5, rtol=0)
    assert bool((out[1, :10] == -math.inf).all())
    # the order of the tokens is kept
    order = scores[0].argsort(descending=True)
    assert bool((out[0, order][1:] <= out[0, order][:-1]).all())
    per_row = torch.tensor([0.2, 1.0, 2.0, 3.0])
    out = enn.EntropyTargetLogitsProcessor(per_row)(None, scores)
    torch.testing.assert_close(_entropy(out.double()), per_row.double(), atol=1e-5, rtol=0)
    # a target above log |support| gives the uniform distribution on the support
    out = enn.EntropyTargetLogitsProcessor(10.0)(None, scores)
    torch.testing.assert_close(out[1, 10:].double(), torch.full((40,), -math.log(40), dtype=f64), atol=1e-6, rtol=0)
    # the same values on the differentiable path (scores that require grad), and a gradient
    leaf = scores.detach().clone().requires_grad_()
    graded = enn.EntropyTargetLogitsProcessor(1.5)(None, leaf)
    torch.testing.assert_close(graded.detach(), proc(None, scores), atol=2e-6, rtol=0)
    graded[0, :5].sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    small = _g(2, 5) * 2
    small[1, 3] = -math.inf
    finite = torch.isfinite(small)
    assert torch.autograd.gradcheck(lambda x: enn.EntropyTargetLogitsProcessor(0.9)(None, x)[finite],
                                    (small.requires_grad_(),))
    with pytest.raises(ValueError, match="target_entropy must be a number >= 0"):
        enn.EntropyTargetLogitsProcessor(-0.1)
    with pytest.raises(ValueError, match="target_entropy must be a number >= 0"):
        enn.EntropyTargetLogitsProcessor(float("nan"))
    with pytest.raises(TypeError, match="dim must be an int"):
        enn.EntropyTargetLogitsProcessor(1.0, dim=None)


def test_entmath_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, entmath, entmath.nn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("target", [1.0, "per-row"])
def test_generate_with_the_processor_samples_at_the_target_entropy(target, monkeypatch):
    """transformers' generate(do_sample=True) on a tiny randomly initialised GPT-2 built from a
    config (nothing downloaded): the distribution of every sampling step, as generate reports
    it after all processors, has the target entropy in every row, is the entropy-normalised
    distribution of the model's own logits at that step, and every sampled token is in it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=63, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompt = torch.randint(1, 63, (3, 4), generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0.5, 1.5, 3.0]) if target == "per-row" else torch.full((3,), float(target))
    proc = enn.EntropyTargetLogitsProcessor(targets if target == "per-row" else target)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=6,
                         min_new_tokens=6, top_k=0, top_p=1.0, temperature=1.0,
                         logits_processor=transformers.LogitsProcessorList([proc]),
                         output_scores=True, output_logits=True, return_dict_in_generate=True)
    assert len(out.scores) == 6 and out.sequences.shape == (3, 10)
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        h = _entropy(torch.log_softmax(scores.double(), -1))
        torch.testing.assert_close(h, targets.double(), atol=2e-5, rtol=0, msg=f"step {step}")
        # generate's own min_new_tokens processor ran first: end-of-sequence cannot be drawn yet
        allowed = logits.double().index_fill(1, torch.tensor([config.eos_token_id]), -math.inf)
        torch.testing.assert_close(torch.softmax(scores.double(), -1),
                                   entmath.entropy_normalize(allowed, targets.double()), atol=1e-5, rtol=0)
        token = out.sequences[:, 4 + step]
        assert bool(torch.isfinite(scores.gather(1, token[:, None])).all())
