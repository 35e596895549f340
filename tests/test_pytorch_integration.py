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
    cw = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], dtype=f64)  # class weights

    def ent_ref(z):
        return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)

    def kl_ref(a, c):
        return (torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(c, -1))).sum(-1)

    def jsd_ref(a, c, beta=0.3):
        lp, lq = torch.log_softmax(a, -1), torch.log_softmax(c, -1)
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        return (beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)).sum(-1)

    rows_kept = torch.tensor([1, -100, 4])
    def lin_ref(z):
        return (F.cross_entropy(z, idx, label_smoothing=0.1, reduction="none") + 0.01 * torch.logsumexp(z, -1) ** 2
                + ent_ref(z))

    def att_ref(q, k, s):
        z = (q * s[..., None]) @ k.transpose(-1, -2)
        return ent_ref(z)

    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[:, 0] = True

    def logn_ref(q, k, v):  # 5 keys, n0 = 3: scale log(5) / (log(3) sqrt(4)); heads 0-1 share kv head 0
        z = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * (math.log(5) / (math.log(3) * 2.0))
        return torch.softmax(z.masked_fill(~keep, float("-inf")), -1) @ v.repeat_interleave(2, dim=1)

    return {
        "entropy": (lambda z: entmath.entropy(z, **b), [_g(3, 5)], ent_ref),
        "kl": (lambda x, y: entmath.kl(x, y, **b), [_g(3, 5), _g(3, 5, seed=1)], kl_ref),
        "kl_batchmean": (lambda x, y: entmath.kl(x, y, 0, reduction="batchmean", **b), [_g(5, 3), _g(5, 3, seed=1)],
                         lambda x, y: kl_ref(x.T, y.T).sum() / 5),
        "entropy_keepdim": (lambda z: entmath.entropy(z, 0, keepdim=True, **b), [_g(5, 3)],
                            lambda z: ent_ref(z.T).unsqueeze(0)),
        "jsd": (lambda x, y: entmath.jsd(x, y, 0.3, **b), [_g(3, 5), _g(3, 5, seed=1)], jsd_ref),
        "jsd_labels": (lambda x, y: entmath.jsd(x, y, 0.3, labels=rows_kept, reduction="mean", **b),
                       [_g(3, 5), _g(3, 5, seed=1)], lambda x, y: jsd_ref(x[[0, 2]], y[[0, 2]]).mean()),
        "cross_entropy": (lambda z: entmath.cross_entropy(z, idx, label_smoothing=0.1, z_loss=0.01, **b),
                          [_g(3, 5)],
                          lambda z: F.cross_entropy(z, idx, label_smoothing=0.1)
                          + 0.01 * torch.logsumexp(z, -1).square().mean()),
        "cross_entropy_soft": (lambda z, y: entmath.cross_entropy(z, y, reduction="sum", **b),
                               [_g(3, 5), probs], lambda z, y: F.cross_entropy(z, y, reduction="sum")),
        "cross_entropy_entropy": (lambda z: sum(entmath.cross_entropy(z, idx, return_entropy=True,
                                                                       reduction="none", **b)),
                                  [_g(3, 5)], lambda z: F.cross_entropy(z, idx, reduction="none") + ent_ref(z)),
        "cross_entropy_weight": (lambda z: entmath.cross_entropy(z, idx, cw, label_smoothing=0.1, z_loss=0.01, **b),
                                 [_g(3, 5)],
                                 lambda z: F.cross_entropy(z, idx, cw, label_smoothing=0.1)
                                 + 0.01 * torch.logsumexp(z, -1).square().mean()),
        "cross_entropy_soft_weight": (lambda z, y: entmath.cross_entropy(z, y, cw, label_smoothing=0.2, **b),
                                      [_g(3, 5), probs], lambda z, y: F.cross_entropy(z, y, cw, label_smoothing=0.2)),
        # (in float32, as the compile and fake-tensor tests run them, the probability targets take the C kernel)
        "cross_entropy_soft_entropy": (lambda z, y: sum(entmath.cross_entropy(z, y, label_smoothing=0.1, z_loss=0.01,
                                                                           return_entropy=True, reduction="none",
                                                                           **b)),
                                       [_g(3, 5), probs],
                                       lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1, reduction="none")
                                       + 0.01 * torch.logsumexp(z, -1).square() + ent_ref(z)),
        "cross_entropy_softcap": (lambda z: entmath.cross_entropy(z, idx, softcap=1.5, label_smoothing=0.1,
                                                                  reduction="sum", **b),
                                  [_g(3, 5, scale=2.0)],
                                  lambda z: F.cross_entropy(1.5 * torch.tanh(z / 1.5), idx, label_smoothing=0.1,
                                                            reduction="sum")),
        "cross_entropy_softcap_entropy": (lambda z: sum(entmath.cross_entropy(z, idx, softcap=2.0, return_entropy=True,
                                                                               reduction="none", **b)),
                                          [_g(3, 5, scale=2.0)],
                                          lambda z: F.cross_entropy(2.0 * torch.tanh(z / 2.0), idx, reduction="none")
                                          + ent_ref(2.0 * torch.tanh(z / 2.0))),
        "entropy_normalize": (lambda z, t: entmath.entropy_normalize(z, t, **b),
                              [_g(3, 5), torch.tensor([0.5, 0.9, 1.2], dtype=f64)], None),
        "solve_gamma": (lambda z, t: entmath.solve_gamma(z, t, **b),
                        [_g(3, 5), torch.tensor([0.5, 0.9, 1.2], dtype=f64)], None),
        "noise_softmax": (lambda z: entmath.noise_softmax(z, "normal", nodes=8, **b), [_g(3, 5)], None),
        "attention_entropy": (lambda q, k, s: entmath.attention_entropy(q, k, scale=s, **b),
                              [_g(2, 3, 4), _g(2, 5, 4, seed=1), torch.rand(2, 3, dtype=f64) + 0.3], att_ref),
        "attention_entropy_causal": (lambda q, k: entmath.attention_entropy(q, k, is_causal=True, **b),
                                     [_g(2, 4, 4), _g(2, 4, 4, seed=1)], None),
        "attention_entropy_logn": (lambda q, k: entmath.attention_entropy(q, k, train_length=3, is_causal=True,
                                                                          offset=1, **b),
                                   [_g(2, 4, 4), _g(2, 5, 4, seed=1)], None),
        # logn_attention has no kernel (SDPA does the work): the same on both "backends"
        "logn_attention_gqa_masked": (lambda q, k, v: entmath.logn_attention(q, k, v, keep, enable_gqa=True,
                                                                             train_length=3),
                                      [_g(1, 4, 3, 4), _g(1, 2, 5, 4, seed=1), _g(1, 2, 5, 3, seed=2)], logn_ref),
        "linear_cross_entropy": (lambda h, w, bias: sum(entmath.linear_cross_entropy(
                                     h, w, idx, bias, label_smoothing=0.1, z_loss=0.01, temperature=0.8,
                                     reduction="none", return_entropy=True, **b)),
                                 [_g(3, 4), _g(5, 4, seed=1), _g(5, seed=2)],
                                 lambda h, w, bias: lin_ref(F.linear(h, w, bias) / 0.8)),
        "linear_cross_entropy_mean": (lambda h, w: entmath.linear_cross_entropy(h, w, idx, **b),
                                      [_g(3, 4), _g(5, 4, seed=1)], lambda h, w: F.cross_entropy(F.linear(h, w), idx)),
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


# ---------------------------------------------------------------------------------------------
# Registered operators
# ---------------------------------------------------------------------------------------------
def _opcheck_cases():
    z = _g(3, 6, dtype=torch.float32)
    zp = _g(6, 3, dtype=torch.float32).t()  # dense but permuted (column-major)
    t = torch.tensor([0, 5, 2])
    y = torch.softmax(_g(3, 6, seed=2, dtype=torch.float32), -1)
    tt = torch.tensor([0.5, 1.0, 1.5], dtype=f64)
    q, k = _g(2, 3, 4, dtype=torch.float32), _g(2, 5, 4, seed=1, dtype=torch.float32)
    sc = torch.rand(2, 3) + 0.2
    cw = torch.linspace(0.5, 2.0, 6)  # class weights
    wt, bias = _g(6, 7, seed=3, dtype=torch.float32).t(), _g(7, seed=4, dtype=torch.float32)  # (V, d) column-major
    return [
        ("entropy_triton", (z,)), ("entropy_triton", (zp,)),
        ("kl_triton", (z, zp)),
        ("jsd_triton", (z, zp, 0.3)), ("jsd_triton", (zp, z, 0.9)),
        ("cross_entropy_triton", (z, t, None, None, 0.1, -100, 0.0, True)),
        ("cross_entropy_triton", (zp, None, y, None, 0.0, -100, 0.0, False)),
        ("cross_entropy_triton", (z, t, None, cw, 0.1, -100, 2.5, True)),
        ("cross_entropy_triton", (zp, None, y, cw, 0.2, -100, 4.0, False)),
        ("cross_entropy_probs_cpu", (z, y, None, 0.0, True)), ("cross_entropy_probs_cpu", (zp, y.t().contiguous().t(),
                                                                                          cw, 0.2, False)),
        ("entropy_normalize_triton", (z, tt.float())), ("entropy_normalize_triton", (zp, tt.float())),
        ("entropy_normalize_solve", (z, tt)), ("entropy_normalize_solve", (zp, tt)),
        ("noise_softmax_triton", (z, "normal", 8)), ("noise_softmax_solve", (zp, "logistic", 8)),
        ("attention_entropy_triton", (q, k, sc, False, 0)), ("attention_entropy_triton", (q, k[:, :3], sc, True, 0)),
        ("linear_cross_entropy_triton", (z, wt, None, t, 0.0, -100, 0.0, 1.0, False)),
        ("linear_cross_entropy_triton", (zp, wt.contiguous(), bias, t, 0.1, 0, 0.01, 0.8, True)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(name, args, grad):
    op = getattr(torch.ops.entmath, name)
    if grad:  # float64 inputs that require grad: also checks the registered autograd
        args = tuple(a.double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    torch.library.opcheck(op, args)


def test_backward_operators_opcheck():
    z = _g(3, 6, dtype=torch.float32)
    h, lse = torch.ops.entmath.entropy_triton(z)
    torch.library.opcheck(torch.ops.entmath.entropy_backward_triton, (z, h, lse, torch.ones(3)))
    w = _g(3, 6, seed=1, dtype=torch.float32)
    kl, la, lb = torch.ops.entmath.kl_triton(z, w)
    torch.library.opcheck(torch.ops.entmath.kl_backward_triton, (z, w, kl, la, lb, torch.ones(3)))
    _, kp, kq, la, lb = torch.ops.entmath.jsd_triton(z, w, 0.3)
    torch.library.opcheck(torch.ops.entmath.jsd_backward_triton, (z, w, kp, kq, la, lb, torch.ones(3), 0.3))
    t = torch.tensor([0, 5, 2])
    loss, lse, res, ent = torch.ops.entmath.cross_entropy_triton(z, t, None, None, 0.1, -100, 0.0, True)
    torch.library.opcheck(torch.ops.entmath.cross_entropy_backward_triton,
                          (torch.empty_like(z), z, t, None, None, lse, res, ent, torch.ones(3), None, torch.ones(3),
                           0.1, -100, 0.0, False))
    y, cw = torch.softmax(w, -1), torch.linspace(0.5, 2.0, 6)
    loss, lse, res, ent = torch.ops.entmath.cross_entropy_triton(z, None, y, cw, 0.2, -100, 3.0, False)
    torch.library.opcheck(torch.ops.entmath.cross_entropy_backward_triton,
                          (torch.empty_like(z), z, None, y, cw, lse, res, ent, torch.ones(3), torch.rand(3), None,
                           0.2, -100, 3.0, True))
    loss, lse, res, ent = torch.ops.entmath.cross_entropy_triton(z, t, None, cw, 0.0, 2, 0.0, False)
    torch.library.opcheck(torch.ops.entmath.cross_entropy_backward_triton,
                          (torch.empty_like(z), z, t, None, cw, lse, res, ent, torch.ones(3), torch.rand(3), None,
                           0.0, 2, 0.0, False))
    for args in [(z, y, None, 0.0, True), (z, y, cw, 0.2, False)]:  # the C kernel against probability targets
        loss, lse, res, ent = torch.ops.entmath.cross_entropy_probs_cpu(*args)
        g_ent = torch.rand(3) if args[-1] else None
        for want_gy in (False, True):
            torch.library.opcheck(torch.ops.entmath.cross_entropy_probs_backward_cpu,
                                  (torch.empty_like(z), z, y, args[2], lse, res, ent, torch.ones(3), torch.rand(3),
                                   g_ent, args[3], want_gy))
    tt = torch.tensor([0.5, 1.0, 1.5])
    p, gamma, zbar = torch.ops.entmath.entropy_normalize_triton(z, tt)
    torch.library.opcheck(torch.ops.entmath.entropy_normalize_backward_triton,
                          (z, p, gamma, zbar, torch.ones_like(z), torch.ones(3)))
    h, w, bias = z, _g(7, 6, seed=3, dtype=torch.float32), _g(7, seed=4, dtype=torch.float32)
    loss, lse, ent = torch.ops.entmath.linear_cross_entropy_triton(h, w, bias, t, 0.1, -100, 0.01, 0.8, True)
    coefs = (torch.ones(3), torch.ones(3), torch.ones(3), torch.full((3,), 0.01))
    torch.library.opcheck(torch.ops.entmath.linear_cross_entropy_backward_triton,
                          (h, w, bias, t, lse, ent, *coefs, 0.8, True, True, True))
    torch.library.opcheck(torch.ops.entmath.linear_cross_entropy_backward_triton,
                          (h, w, None, t, lse, ent, coefs[0], None, coefs[2], None, 1.0, True, False, False))
    torch.library.opcheck(torch.ops.entmath.linear_softmax_summary_triton, (h, w, bias, t, 0.8, True))
    torch.library.opcheck(torch.ops.entmath.logits_summary_triton, (z, t, False))
    torch.library.opcheck(torch.ops.entmath.logits_summary_triton, (_g(6, 3, dtype=torch.float32).t(), t - 2, True))
    p, nodes, log_s = torch.ops.entmath.noise_softmax_triton(z, "normal", 8)
    torch.library.opcheck(torch.ops.entmath.noise_softmax_backward_triton, (z, torch.ones_like(z), nodes, log_s,
                                                                            "normal"))


# ---------------------------------------------------------------------------------------------
# torch.compile, torch.export, meta and fake tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_forward_and_backward(op, backend):
    torch._dynamo.reset()
    fn, args, _ = _ops(backend)[op]
    args = [a.float() for a in args]

    explanation = torch._dynamo.explain(fn)(*_inputs(args))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # The backward is compiled too (AOTAutograd), when the compiled forward's output is
    # differentiated.  aot_eager runs dynamo and AOTAutograd without inductor's code generation
    # (slow on CPU); the transformer test below goes through inductor.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xs_c, xs_e = _inputs(args), _inputs(args)
    got, want = compiled(*xs_c), fn(*xs_e)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = torch.linspace(0.5, 1.5, got.numel()).view(got.shape)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for a, b in zip(xs_c, xs_e):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


class _TinyLM(torch.nn.Module):
    """A one-block causal language model using entmath's CE, entropy and log-n attention."""

    def __init__(self, vocab=50, d=16, heads=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.head = torch.nn.Linear(d, vocab)
        self.heads = heads

    def forward(self, idx, targets):
        x = self.emb(idx)
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = entmath.logn_attention(q, k, v, train_length=8, is_causal=True)
        x = x + a.transpose(1, 2).reshape(B, L, d)
        x = x + self.mlp(x)
        logits = self.head(x)
        loss, ent = entmath.cross_entropy(logits, targets, return_entropy=True, reduction="none")
        return loss.mean() - 0.01 * entmath.entropy(logits).mean() + 0.0 * ent.mean()


def test_small_transformer_compiles_to_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyLM()
    idx = torch.randint(0, 50, (2, 12))
    tgt = torch.randint(0, 50, (2, 12))
    explanation = torch._dynamo.explain(model)(idx, tgt)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(idx, tgt)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(idx, tgt)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


class _ModulesLM(torch.nn.Module):
    """A one-block causal LM written with entmath.nn modules only: grouped-query log-n attention,
    an entropy bonus, an entropy-normalised auxiliary distribution and the loss module."""

    def __init__(self, vocab=40, d=16, heads=4, kv_heads=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * d * kv_heads // heads)
        self.attn = entmath.nn.LogNAttention(8, dropout=0.0)
        self.head = torch.nn.Linear(d, vocab)
        self.loss = entmath.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
        self.entropy = entmath.nn.Entropy()
        self.flat = entmath.nn.EntropyNormalize(torch.tensor(2.0))
        self.heads, self.kv_heads = heads, kv_heads

    def forward(self, idx, targets):
        x = self.emb(idx)
        B, L, d = x.shape
        q = self.q(x).view(B, L, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.attn(q, k, v, None, None, True, enable_gqa=True).transpose(1, 2).reshape(B, L, d)
        logits = self.head(x)
        aux = (self.flat(logits.detach()) * logits).sum(-1).mean()
        return self.loss(logits.view(-1, logits.shape[-1]), targets.view(-1)) - 0.01 * self.entropy(logits).mean() \
            - 1e-3 * aux


def test_a_model_of_entmath_nn_modules_compiles_to_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _ModulesLM()
    idx, tgt = torch.randint(0, 40, (2, 10)), torch.randint(0, 40, (2, 10))
    explanation = torch._dynamo.explain(model)(idx, tgt)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(idx, tgt)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(idx, tgt)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_export_a_module_using_entropy_kl_and_cross_entropy():
    class M(torch.nn.Module):
        def forward(self, a, b, t):
            return entmath.entropy(a) + entmath.kl(a, b) + entmath.cross_entropy(a, t, reduction="none")

    a, b, t = _g(4, 7, dtype=torch.float32), _g(4, 7, seed=1, dtype=torch.float32), torch.tensor([0, 6, 3, 1])
    ep = torch.export.export(M(), (a, b, t))
    torch.testing.assert_close(ep.module()(a, b, t), M()(a, b, t))
    a2, b2 = _g(4, 7, seed=5, dtype=torch.float32), _g(4, 7, seed=6, dtype=torch.float32)
    torch.testing.assert_close(ep.module()(a2, b2, t), M()(a2, b2, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_meta_and_fake_tensors_give_shapes_and_dtypes(op, backend):
    from torch._subclasses import FakeTensorMode

    fn, args, _ = _ops(backend)[op]
    real = [a.float() for a in args]
    want = fn(*real)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the targets in the closures stay real
        fake = fn(*[mode.from_tensor(a) for a in real])
    assert fake.shape == want.shape and fake.dtype == want.dtype
    captured = (op.startswith("cross_entropy") and op != "cross_entropy_soft") or op in (
        "jsd_labels", "logn_attention_gqa_masked", "linear_cross_entropy",
        "linear_cross_entropy_mean")  # (targets, weights, labels, masks are captured)
    if backend == "torch" and not captured:
        meta = fn(*[a.float().to("meta") for a in args])
        assert meta.shape == want.shape and meta.dtype == want.dtype and meta.is_meta


# ---------------------------------------------------------------------------------------------
# torch.func
# ---------------------------------------------------------------------------------------------
FUNC_OPS = ["entropy", "kl", "jsd", "cross_entropy", "cross_entropy_weight", "cross_entropy_softcap",
            "entropy_normalize", "noise_softmax", "linear_cross_entropy"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", FUNC_OPS)
def test_torch_func_vmap_grad_jacrev_and_per_sample_gradients(op, backend):
    fn, args, _ = _ops(backend)[op]
    x0, rest = args[0], args[1:]
    batch = torch.stack([x0, x0.flip(0), 2 * x0])

    def f(x):
        return fn(x, *rest)

    # vmap agrees with a loop
    torch.testing.assert_close(torch.func.vmap(f)(batch), torch.stack([f(b) for b in batch]))
    # grad and jacrev agree with autograd
    g = torch.func.grad(lambda x: f(x).sum())(x0)
    xr = x0.clone().requires_grad_()
    (want,) = torch.autograd.grad(f(xr).sum(), xr)
    torch.testing.assert_close(g, want)
    jac = torch.func.jacrev(f)(x0)
    assert jac.shape == f(x0).shape + x0.shape
    torch.testing.assert_close(jac.sum(tuple(range(f(x0).dim()))) if f(x0).dim() else jac, want)
    # per-sample gradients: vmap(grad)
    ps = torch.func.vmap(torch.func.grad(lambda x: f(x).sum()))(batch)
    for i, b in enumerate(batch):
        br = b.clone().requires_grad_()
        (w,) = torch.autograd.grad(f(br).sum(), br)
        torch.testing.assert_close(ps[i], w)


# ---------------------------------------------------------------------------------------------
# Autocast and AMP
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_outputs_are_fp32_like_torch(backend):
    x = _g(4, 8, dtype=torch.float32)
    lin = torch.nn.Linear(8, 10)
    t = torch.tensor([1, 2, 3, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        want = F.cross_entropy(logits, t)
        got = entmath.cross_entropy(logits, t, backend=backend)
        assert got.dtype == want.dtype == torch.float32
        assert entmath.entropy(logits, backend=backend).dtype == torch.float32
        assert entmath.kl(logits, x[:, :1].expand(4, 10), backend=backend).dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_accepted_where_torch_accepts_them():
    a, b = _g(3, 6, dtype=torch.bfloat16), _g(3, 6, seed=1, dtype=torch.float32)
    got = entmath.kl(a, b)
    want = F.kl_div(torch.log_softmax(b, -1), torch.log_softmax(a.float(), -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    q = _g(1, 2, 5, 4, dtype=torch.float32)
    k = _g(1, 2, 5, 4, seed=1, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = entmath.logn_attention(q, k, k, train_length=5)
        ref = F.scaled_dot_product_attention(q, k, k)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_grad_scaler_skips_the_step_with_an_inf_logit_and_trains_on():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, t = torch.randn(8, 6), torch.randint(0, 5, (8,))
    with entmath.validation(False):
        for step in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            if step == 1:
                logits = logits.clone()
                logits[3, 2] = float("inf")  # an overflow, as fp16 training meets them
            loss = entmath.cross_entropy(logits.float(), t)
            before = model.weight.detach().clone()
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if step == 1:
                assert not torch.isfinite(loss)
                assert torch.equal(model.weight.detach(), before)  # skipped
                assert scaler.get_scale() < scale
            else:
                assert torch.isfinite(loss) and not torch.equal(model.weight.detach(), before)


# ---------------------------------------------------------------------------------------------
# The validation switch
# ---------------------------------------------------------------------------------------------
def test_validation_switch_and_context_manager():
    bad = torch.tensor([[0.0, float("nan")], [1.0, 2.0]])
    with pytest.raises(ValueError, match="contains NaN"):
        entmath.entropy(bad)
    assert entmath.is_validation_enabled()
    with entmath.validation(False):
        assert not entmath.is_validation_enabled()
        h = entmath.entropy(bad)
        assert torch.isnan(h[0]) and torch.isfinite(h[1])  # the bad row is NaN, the other unaffected
    assert entmath.is_validation_enabled()
    entmath.set_validation(False)
    try:
        assert torch.isnan(entmath.cross_entropy(bad, torch.tensor([0, 1]), reduction="none")[0])
    finally:
        entmath.set_validation(True)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        entmath.set_validation("no")


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_off_reads_nothing_back_from_the_device(backend, monkeypatch):
    """With value checks off, no op reads a tensor's value on the host (on a GPU each such read
    is a synchronisation).  The CPU solvers of entropy_normalize and noise_softmax work on the
    host by design and are left out of the count for the torch backend."""
    calls = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=original, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    host_solvers = ("entropy_normalize", "solve_gamma", "noise_softmax")
    # _stats.restore_tail branches on the host for CPU tensors only (free there); on a GPU it runs
    # branch-free.  These tensors are on the CPU, so make it take its device path, the one under test.
    from entmath.ops import _stats
    monkeypatch.setattr(_stats, "_may_branch", lambda t: False)
    with entmath.validation(False):
        for op, (fn, args, _) in _ops(backend).items():
            if backend == "torch" and op.startswith(host_solvers):
                continue
            calls.clear()
            xs = _inputs(args)
            out = fn(*xs)
            torch.autograd.grad(out.sum(), xs, allow_unused=True)
            assert calls == [], (op, calls)
        q = _g(1, 2, 4, 4)
        calls.clear()
        entmath.logn_attention(q, q, q, train_length=4, is_causal=True)
        assert calls == []
