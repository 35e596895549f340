"""Every op on every memory layout of every tensor argument, on both backends.

A kernel that assumes a dense argument reads the wrong memory when handed a strided, expanded
(stride 0) or transposed view: wrong numbers at best, a crash of the process at worst.  Each case
below runs an op with one tensor argument replaced by such a view and compares the result (and
the gradients) with the same op on a dense copy of the same values.
"""
from __future__ import annotations

import pytest
import torch

import entmath

BACKENDS = ["torch", "triton"]


def _strided(x):
    """The values of x in a non-contiguous view (every other element of a wider tensor)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def _expanded(x):
    """x's first slice along dim 0 broadcast to x's shape: stride 0 along dim 0."""
    return x[:1].expand_as(x)


def _transposed(x):
    """x's values stored column-major (for >= 2 dims): the last two dims swapped in memory."""
    if x.dim() < 2:
        return x.flip(0).flip(0)
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


LAYOUTS = {"strided": _strided, "expanded": _expanded, "transposed": _transposed}


def _g(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cases(backend):
    b = {"backend": backend}
    z = _g(4, 6)
    probs = torch.softmax(_g(4, 6, seed=1), -1)
    idx = torch.tensor([1, 0, 5, 2])
    cw = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0, 1.5], dtype=torch.float64)
    q, k, v = _g(2, 4, 3, seed=2), _g(2, 5, 3, seed=3), _g(2, 5, 3, seed=4)
    return {
        "entropy": (lambda x: entmath.entropy(x, **b), [z]),
        "kl": (lambda x, y: entmath.kl(x, y, **b), [z, _g(4, 6, seed=5)]),
        "jsd": (lambda x, y, t: entmath.jsd(x, y, 0.3, labels=t, ignore_index=5, **b), [z, _g(4, 6, seed=5), idx]),
        "cross_entropy-index": (lambda x, t: entmath.cross_entropy(x, t, reduction="none", **b), [z, idx]),
        "cross_entropy-probs": (lambda x, y: entmath.cross_entropy(x, y, reduction="none", label_smoothing=0.1,
                                                                   **b), [z, probs]),
        # (class weights are not differentiable: detached inside, in the layout they were given)
        "cross_entropy-index-weight": (lambda x, t, w: entmath.cross_entropy(x, t, w.detach(), reduction="none",
                                                                             label_smoothing=0.1, softcap=3.0, **b),
                                       [z, idx, cw]),
        "cross_entropy-probs-weight": (lambda x, y, w: entmath.cross_entropy(x, y, w.detach(), label_smoothing=0.1,
                                                                             **b), [z, probs, cw]),
        # (float32: the torch backend's C kernel against probability targets)
        "cross_entropy-probs-float32": (lambda x, y, w: entmath.cross_entropy(x, y, w.detach(), label_smoothing=0.1,
                                                                              reduction="none", **b),
                                        [z.float(), probs.float(), cw.float()]),
        "entropy_normalize": (lambda x, t: entmath.entropy_normalize(x, t, **b), [z, torch.full((4,), 0.7)]),
        "solve_gamma": (lambda x, t: entmath.solve_gamma(x, t, **b), [z, torch.tensor([0.3, 0.7, 1.0, 1.5])]),
        # (draws from one seeded generator: equal draws for equal probabilities; float32 takes the
        # C kernel's direct path, float64 the operator's)
        "sample": (lambda x, t: entmath.sample(x, t, 3, torch.Generator().manual_seed(0), **b),
                   [z, torch.tensor([0.3, 0.7, 1.0, 1.5])]),
        "sample-float32": (lambda x, t: entmath.sample(x, t, 3, torch.Generator().manual_seed(0), **b),
                           [z.float(), torch.tensor([0.3, 0.7, 1.0, 1.5])]),
        "noise_softmax": (lambda x, s: entmath.noise_softmax(x, "normal", nodes=8, scale=s, **b),
                          [z, torch.rand(4, 1, dtype=torch.float64) + 0.5]),
        "attention_entropy": (lambda qq, kk, s: entmath.attention_entropy(qq, kk, scale=s, **b),
                              [q, k, torch.rand(2, 4, dtype=torch.float64) + 0.2]),
        "logn_attention": (lambda qq, kk, vv: entmath.logn_attention(qq, kk, vv, train_length=4), [q, k, v]),
        "logn_attention-gqa-mask": (lambda qq, kk, vv, m: entmath.logn_attention(qq, kk, vv, m, enable_gqa=True,
                                                                                 train_length=4),
                                    [_g(1, 4, 3, 3, seed=6), _g(1, 2, 5, 3, seed=7), _g(1, 2, 5, 3, seed=8),
                                     torch.rand(1, 4, 3, 5, generator=torch.Generator().manual_seed(9)) > 0.2]),
        "attention_entropy-logn": (lambda qq, kk: entmath.attention_entropy(qq, kk, train_length=3, is_causal=True,
                                                                            offset=1, **b), [q, k]),
        "linear_cross_entropy": (lambda hh, ww, bb, tt: entmath.linear_cross_entropy(
                                     hh, ww, tt, bb, reduction="none", label_smoothing=0.1, **b),
                                 [_g(4, 3, seed=6), _g(6, 3, seed=7), _g(6, seed=8), idx]),
    }


def _run(fn, args):
    args = [a.detach().clone().requires_grad_(True) if a.is_floating_point() else a for a in args]
    out = fn(*args)
    if not out.requires_grad:
        return out.detach(), []
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)
    floats = [a for a in args if a.is_floating_point()]
    grads = torch.autograd.grad((out * weights).sum(), floats, allow_unused=True)
    return out.detach(), [g for g in grads if g is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(_cases("torch")))
def test_every_tensor_argument_in_every_layout(case, layout, backend):
    fn, args = _cases(backend)[case]
    for i, a in enumerate(args):
        if layout == "expanded" and a.dim() == 0:
            continue
        view = LAYOUTS[layout](a)
        assert torch.equal(view, LAYOUTS[layout](a).contiguous())
        varied = list(args)
        varied[i] = view
        dense = list(args)
        dense[i] = view.contiguous()
        got, got_g = _run(fn, varied)
        want, want_g = _run(fn, dense)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{case}: argument {i} {layout}")
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"{case}: gradient, argument {i} {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_class_targets(backend):
    """The reproducers of a crash: targets that are a column of a wider tensor, or one index
    expanded to every row (stride 0), read as if they were dense."""
    z = _g(4, 5, dtype=torch.float32)
    t = torch.tensor([[1, 99], [2, 99], [3, 99], [4, 99]])[:, 0]
    want = torch.nn.functional.cross_entropy(z, t.contiguous(), reduction="none")
    torch.testing.assert_close(entmath.cross_entropy(z, t, reduction="none", backend=backend), want)
    t2 = torch.tensor(2).expand(4)
    torch.testing.assert_close(entmath.cross_entropy(z, t2, backend=backend),
                               torch.nn.functional.cross_entropy(z, t2.contiguous()))
