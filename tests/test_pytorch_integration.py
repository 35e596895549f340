"""entmath's ops inside other people's PyTorch programs.

Autograd semantics (double backward, retain_graph, hooks, no aliasing of saved buffers,
``inplace_backward`` guards), registered operators (``opcheck``), ``torch.compile`` with
``fullgraph=True`` and zero graph breaks, ``torch.export``, meta and fake tensors, ``torch.func``
transforms, autocast and AMP, and the validation switch.  Each test compares with a plain-torch
reference where one exists.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import entmath

BACKENDS = ["torch", "triton"]
f64 = torch.float64


def _g(*shape, seed=0, dtype=f64, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# Every differentiable op as f(*float tensors) -> tensor, with inputs and a plain-torch reference
# (None where the op has no closed form in torch: the solvers and the quadrature).
def _ops(backend):
    b = {"backend": backend}
    idx = torch.tensor([2, 0, 4])
    probs = torch.softmax(_g(3, 5, seed=9), -1)

    def ent_ref(z):
        return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)

    def kl_ref(a, c):
        return (torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(c, -1))).sum(-1)

    def att_ref(q, k, s):
        z = (q * s[..., None]) @ k.transpose(-1, -2)
        return ent_ref(z)

    return {
        "entropy": (lambda z: entmath.entropy(z, **b), [_g(3, 5)], ent_ref),
        "kl": (lambda x, y: entmath.kl(x, y, **b), [_g(3, 5), _g(3, 5, seed=1)], kl_ref),
        "cross_entropy": (lambda z: entmath.cross_entropy(z, idx, label_smoothing=0.1, z_loss=0.01, **b),
                          [_g(3, 5)],
                          lambda z: F.cross_entropy(z, idx, label_smoothing=0.1)
                          + 0.01 * torch.logsumexp(z, -1).square().mean()),
        "cross_entropy_soft": (lambda z, y: entmath.cross_entropy(z, y, reduction="sum", **b),
                               [_g(3, 5), probs], lambda z, y: F.cross_entropy(z, y, reduction="sum")),
        "cross_entropy_entropy": (lambda z: sum(entmath.cross_entropy(z, idx, return_entropy=True,
                                                                       reduction="none", **b)),
                                  [_g(3, 5)], lambda z: F.cross_entropy(z, idx, reduction="none") + ent_ref(z)),
        "entropy_normalize": (lambda z, t: entmath.entropy_normalize(z, t, **b),
                              [_g(3, 5), torch.tensor([0.5, 0.9, 1.2], dtype=f64)], None),
        "solve_gamma": (lambda z, t: entmath.solve_gamma(z, t, **b),
                        [_g(3, 5), torch.tensor([0.5, 0.9, 1.2], dtype=f64)], None),
        "noise_softmax": (lambda z: entmath.noise_softmax(z, "normal", nodes=8, **b), [_g(3, 5)], None),
        "attention_entropy": (lambda q, k, s: entmath.attention_entropy(q, k, scale=s, **b),
                              [_g(2, 3, 4), _g(2, 5, 4, seed=1), torch.rand(2, 3, dtype=f64) + 0.3], att_ref),
        "attention_entropy_causal": (lambda q, k: entmath.attention_entropy(q, k, is_causal=True, **b),
                                     [_g(2, 4, 4), _g(2, 4, 4, seed=1)], None),
    }


OPS = list(_ops("torch"))


def _inputs(args, grad=True):
    return [a.detach().clone().requires_grad_(grad) for a in args]


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_and_gradgradcheck(op, backend):
    fn, args, _ = _ops(backend)[op]
    xs = _inputs(args)
    fast = backend == "triton" or op.startswith(("noise", "entropy_norm", "solve"))
    assert torch.autograd.gradcheck(fn, xs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, xs, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [o for o in OPS if _ops("torch")[o][2] is not None])
def test_second_order_matches_plain_torch(op, backend):
    """Hessian-vector products against autograd of the plain-torch definition."""
    fn, args, ref = _ops(backend)[op]
    xs = _inputs(args)
    vs = [_g(*a.shape, seed=7 + i) for i, a in enumerate(args)]
    got = torch.autograd.functional.hvp(lambda *x: fn(*x).sum(), tuple(a.detach() for a in xs), tuple(vs))[1]
    want = torch.autograd.functional.hvp(lambda *x: ref(*x).sum(), tuple(a.detach() for a in xs), tuple(vs))[1]
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-3  # the reference Hessian is not trivially zero
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_through_cross_entropy(backend):
    """loss + 10 ||d loss / d x||^2 through a linear layer: the weight gradient needs the CE
    Hessian (it was silently wrong when the backward was once-differentiable)."""
    x = _g(6, 4)
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    grads = []
    for ce in (lambda z: entmath.cross_entropy(z, y, backend=backend), lambda z: F.cross_entropy(z, y)):
        w = _g(3, 4, seed=3).requires_grad_()
        xi = x.clone().requires_grad_()
        loss = ce(xi @ w.T)
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        (loss + 10 * gx.square().sum()).backward()
        grads.append(w.grad)
    assert grads[1].abs().max() > 0.1
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_retain_graph_accumulates_and_hooks_do_not_corrupt(op, backend):
    fn, args, _ = _ops(backend)[op]
    xs = _inputs(args)
    out = fn(*xs).sum()
    (first,) = torch.autograd.grad(out, xs[0], retain_graph=True)
    for _ in range(3):
        out.backward(retain_graph=True)
    torch.testing.assert_close(xs[0].grad, 3 * first)
    # An in-place hook on the gradient must not change what a later backward computes.
    xs2 = _inputs(args)
    out2 = fn(*xs2).sum()
    handle = xs2[0].register_hook(lambda g: g.mul_(0.5))
    out2.backward(retain_graph=True)
    handle.remove()
    xs2[0].grad = None
    out2.backward()
    torch.testing.assert_close(xs2[0].grad, first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_returned_gradient_aliases_a_saved_tensor(backend):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for op, (fn, args, _) in _ops(backend).items():
        saved.clear()
        xs = _inputs(args)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*xs).sum()
        grads = torch.autograd.grad(out, xs, allow_unused=True)
        for g in grads:
            if g is None:
                continue
            for s in saved:
                assert g.untyped_storage().data_ptr() != s.untyped_storage().data_ptr() or s.numel() == 0, op


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_saves_through_saved_tensors_hooks(backend):
    """Offloading hooks see every tensor the backward needs: packing to a copy and unpacking it
    gives the same gradient, and nothing logits-sized is kept outside the hooks."""
    z = _g(4, 7).requires_grad_()
    y = torch.tensor([1, 2, 3, 0])
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t.clone()  # "offload"

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = entmath.cross_entropy(z, y, backend=backend)
    (g,) = torch.autograd.grad(loss, z)
    zz = z.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(zz, y), zz)
    torch.testing.assert_close(g, want)
    assert 28 in sizes  # the logits themselves went through the hook


# ---------------------------------------------------------------------------------------------
# inplace_backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_leaves_and_their_views(backend):
    y = torch.tensor([0, 1])
    w = torch.nn.Parameter(_g(2, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        entmath.cross_entropy(w, y, inplace_backward=True, backend=backend)
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        entmath.cross_entropy(w[:, :4], y, inplace_backward=True, backend=backend)
    before = w.detach().clone()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", ["exp", "sigmoid", "relu", "entropy"])
def test_inplace_backward_never_corrupts_a_tensor_another_node_saved(backend, other):
    """Logits that another node saved for its backward: overwriting them with the gradient would
    silently corrupt that node's gradient; autograd's version counter makes it an error instead,
    or the gradient is right."""
    x = _g(3, 6, dtype=torch.float32).requires_grad_()
    y = torch.tensor([1, 0, 5])
    extra = {"exp": torch.exp, "sigmoid": torch.sigmoid, "relu": torch.relu,
             "entropy": lambda t: entmath.entropy(t, backend=backend)}[other]

    def run(inplace):
        xx = x.detach().clone().requires_grad_()
        z = xx * 2.0
        loss = entmath.cross_entropy(z, y, inplace_backward=inplace, backend=backend) + extra(z).sum()
        loss.backward()
        return xx.grad

    want = run(False)
    try:
        got = run(True)
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
    else:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_gives_the_gradient_and_refuses_a_second_backward(backend):
    x = _g(3, 6, dtype=torch.float32).requires_grad_()
    y = torch.tensor([1, 0, 5])
    z = x * 1.0
    loss = entmath.cross_entropy(z, y, inplace_backward=True, backend=backend)
    loss.backward(retain_graph=True)
    xx = x.detach().clone().requires_grad_()
    F.cross_entropy(xx, y).backward()
    torch.testing.assert_close(x.grad, xx.grad)
    with pytest.raises(RuntimeError):
        loss.backward()
