"""Eager calls of the row ops skip the layers they do not need (``ops._library.eager_call``).

A call that records a graph, in plain eager mode, runs the old-style twin of the op's autograd
unit (``eager_function``), which calls the C kernels directly; a plain call without a graph calls
them directly too.  Implementation checks: the twin gives the same values, gradients and second
derivatives as the unit itself (which torch.compile, torch.func and fake tensors still use), and
validation sees the same bad rows, whether the C kernel's own count or the outputs tell it.
"""
import inspect

import pytest
import torch

import entmath
from entmath.ops import cross_entropy as ce_op
from entmath.ops import entropy as ent_op
from entmath.ops import kl as kl_op

MODULES = {"entropy": ent_op, "kl": kl_op, "cross_entropy": ce_op}


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 300, generator=g, dtype=torch.float64).mul_(4).to(dtype)
    b = torch.randn(6, 300, generator=g, dtype=torch.float64).mul_(4).to(dtype)
    z[1, 7:] = float("-inf")  # a masked row
    t = torch.randint(0, 300, (6,), generator=g)
    t[1] = 3  # (a class of the masked row that is not masked)
    t[4] = -100  # an ignored row
    return z, b, t


CALLS = {
    "entropy": lambda z, b, t: entmath.entropy(z),
    "kl": lambda z, b, t: entmath.kl(z, b),
    "cross_entropy": lambda z, b, t: entmath.cross_entropy(z, t, reduction="none", label_smoothing=0.1,
                                                           z_loss=1e-3, return_entropy=True)[0],
}


def _run(op, dtype, second_order):
    """Value, gradient (and a Hessian-vector product) of ``op`` on fixed inputs."""
    z, b, t = _inputs(dtype)
    zl, bl = z.clone().requires_grad_(), b.clone().requires_grad_()
    out = CALLS[op](zl, bl, t)
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
    leaves = [zl, bl] if op == "kl" else [zl]
    grads = torch.autograd.grad((out * w).sum(), leaves, create_graph=second_order)
    if not second_order:
        return out.detach(), [g.detach() for g in grads]
    v = torch.cos(torch.arange(z.numel(), dtype=z.dtype)).view(z.shape)
    hvp = torch.autograd.grad((grads[0] * v).sum(), zl)[0]
    return out.detach(), [g.detach() for g in grads] + [hvp]


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("dtype,second_order", [(torch.float32, False), (torch.float64, True)], ids=["f32", "f64"])
def test_the_eager_twin_matches_the_autograd_unit(op, dtype, second_order, monkeypatch):
    """float32: the C kernels, forward and backward; float64: the torch path, with double backward."""
    twin = _run(op, dtype, second_order)
    with monkeypatch.context() as m:
        m.setattr(MODULES[op], "eager_call", lambda *tensors: None)  # every call through the unit
        unit = _run(op, dtype, second_order)
    torch.testing.assert_close(twin[0], unit[0], rtol=0, atol=0, equal_nan=True)
    for a, b in zip(twin[1], unit[1]):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", list(CALLS))
def test_eager_calls_do_not_bind_signatures(op, monkeypatch):
    """``Function.apply`` of a setup_context-style unit binds its arguments with inspect.signature
    on every call (a third of a small call's time): the eager twin does not."""
    real, count = inspect.signature, []

    def counted(*a, **k):
        count.append(1)
        return real(*a, **k)

    z, b, t = _inputs(torch.float32)
    zl = torch.nn.Parameter(z)  # (a parameter is a plain tensor here too)
    monkeypatch.setattr(inspect, "signature", counted)
    CALLS[op](zl, b, t).sum().backward()
    assert count == []
    monkeypatch.setattr(MODULES[op], "eager_call", lambda *tensors: None)
    CALLS[op](zl, b, t).sum().backward()
    assert count  # (the unit itself does: the check above can fail)


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "graph"])
def test_bad_rows_are_seen_on_every_eager_path(op, grad):
    z, b, t = _inputs(torch.float32)
    z[3, 11] = float("nan")
    z[5, :] = float("-inf")  # no distribution
    zl = z.requires_grad_(grad)
    with pytest.raises(ValueError, match="logits"):
        CALLS[op](zl, b, t)
    with entmath.validation(False):
        out = CALLS[op](zl, b, t)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[[3, 5]] = True
    assert bool(out[bad].isnan().all())
    # The other rows are what they are alone (cross_entropy's masked row is +inf: smoothing puts
    # mass on its -inf classes).
    good = CALLS[op](zl.detach()[~bad], b[~bad], t[~bad])
    torch.testing.assert_close(out[~bad].detach(), good, rtol=0, atol=0)
