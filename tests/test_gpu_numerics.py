"""The Triton kernels' fp32 arithmetic under an emulation of the GPU's approximate instructions.

On NVIDIA GPUs Triton compiles fp32 ``tl.exp(x)`` to ``ex2.approx.f32`` of ``fl(x * log2 e)``
(the product rounded to fp32 first), ``/`` to ``div.full.f32`` and ``tl.sqrt`` to
``sqrt.approx.f32`` (tests/gpu_compile_check.py lists them per kernel); ``tl.log`` is libdevice's
``logf`` (1 ulp) and fp64 stays IEEE.  The PTX ISA bounds them: ex2.approx within 2 ulp of the
correctly rounded 2^t, div.full within 2 ulp, sqrt.approx within a relative 2^-23.  Triton's
interpreter, which runs every other kernel test, computes all three in numpy, correctly rounded.

``approximate_math(mode)`` swaps the interpreter's exp, division and square root for fp32 ones
that do what the GPU does, to the documented bound: the rounding of x * log2 e to fp32 exactly,
then the correctly rounded result moved by up to 2 ulp (1 ulp for sqrt) -- always up, always
down, or by a pseudo-random amount per element ("mixed").  It models the error *bounds*, not the
hardware's bits, which no CPU can reproduce; what a GPU run would add is listed in the
performance appendix ("GPU numerics").  Under it the kernels must keep the accuracy their tests
demand, and lse and H must stay within the first-order bounds derived there:

    |delta lse| <= (9 + 1.22 E_p|d| + 4 log S) u,
    |delta H|   <= (9 + 5.22 E_p|d| + 4 log S) u + (5 + 1.22 D) sigma_p(d) u

(u = 2^-24, d = z - max z, S = sum_i e^{d_i}, D = max |d| over the row's finite logits,
sigma_p(d) the standard deviation of d under p), on top of what the interpreter's own run shows.
"""
import contextlib
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel is defined

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import entmath  # noqa: E402
from entmath.ops.attention_entropy import attention_entropy  # noqa: E402
from entmath.ops.noise_softmax import noise_softmax  # noqa: E402

U = 2.0**-24
LOG2E_F32 = np.float32(math.log2(math.e))  # 0x3FB8AA3B, the constant Triton multiplies by
MODES = ["up", "down", "mixed"]


def _shift(y: np.ndarray, k: np.ndarray) -> np.ndarray:
    """y moved by k ulps (|k| <= 2); zeros and infinities stay (ex2(-inf) = +0 exactly)."""
    out = y
    with np.errstate(over="ignore"):
        out = _steps(out, k)
    return np.where((y == 0) | np.isinf(y) | np.isnan(y), y, out).astype(np.float32)


def _steps(out, k):
    for step in (1, 2):
        out = np.where(k >= step, np.nextafter(out, np.float32(np.inf)), out)
        out = np.where(k <= -step, np.nextafter(out, np.float32(-np.inf)), out)
    return out


def _ulps(x: np.ndarray, mode: str, most: int) -> np.ndarray:
    if mode == "up":
        return np.full(x.shape, most)
    if mode == "down":
        return np.full(x.shape, -most)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits * np.uint64(2654435761)) >> np.uint64(16)).astype(np.int64) % (2 * most + 1) - most


def gpu_exp(x: np.ndarray, mode: str) -> np.ndarray:
    t = x.astype(np.float32) * LOG2E_F32  # fp32 product, as mul.f32 rounds it
    with np.errstate(over="ignore", under="ignore"):
        y = np.exp2(t.astype(np.float64)).astype(np.float32)
    return _shift(y, _ulps(x, mode, 2))


def gpu_div(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        q = np.divide(a, b).astype(np.float32)
    return _shift(q, _ulps(np.broadcast_to(a, q.shape) + np.broadcast_to(b, q.shape), mode, 2))


def gpu_sqrt(a: np.ndarray, mode: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return _shift(np.sqrt(a).astype(np.float32), _ulps(a, mode, 1))


@contextlib.contextmanager
def approximate_math(mode: str):
    """Run Triton's interpreter with GPU-like fp32 exp, division and sqrt (fp64 untouched)."""
    B = interpreter.InterpreterBuilder
    saved = B.create_exp, B.create_fdiv, B.create_sqrt

    def exp(self, arg):
        if arg.data.dtype != np.float32:
            return saved[0](self, arg)
        return interpreter.TensorHandle(gpu_exp(arg.data, mode), arg.dtype.scalar)

    def fdiv(self, lhs, rhs):
        if lhs.data.dtype != np.float32:
            return saved[1](self, lhs, rhs)
        return interpreter.TensorHandle(gpu_div(lhs.data, rhs.data, mode), lhs.dtype.scalar)

    def sqrt(self, arg):
        if arg.data.dtype != np.float32:
            return saved[2](self, arg)
        return interpreter.TensorHandle(gpu_sqrt(arg.data, mode), arg.dtype.scalar)

    B.create_exp, B.create_fdiv, B.create_sqrt = exp, fdiv, sqrt
    try:
        yield
    finally:
        B.create_exp, B.create_fdiv, B.create_sqrt = saved


def rows(n, seed):
    """fp32 rows in the regimes that stress exp: spread 0.5 to 30, nearly one-hot, masked."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, n, generator=g)
    z[0] *= 0.5
    z[1] *= 3.0
    z[2] *= 30.0
    z[3] = z[3] * 0.1 - torch.arange(n) * (60.0 / n)  # a steep ramp: d down to -60
    z[4, 0] = 25.0  # nearly one-hot
    z[5, : n // 2] = float("-inf")
    return z


# ---------------------------------------------------------------------------------------------
# The emulation itself
# ---------------------------------------------------------------------------------------------
def test_the_emulated_exp_is_within_its_bound_and_not_numpy_exp():
    x = np.linspace(-87.0, 30.0, 20001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    for mode in MODES:
        got = gpu_exp(x, mode).astype(np.float64)
        rel = np.abs(got / exact - 1)
        assert np.all(rel <= 5 * U + 1.22 * U * np.abs(x.astype(np.float64))), mode
    assert np.any(gpu_exp(x, "mixed") != np.exp(x)) and np.any(gpu_exp(x, "up") > np.exp(x))
    assert gpu_exp(np.array([-np.inf], np.float32), "up")[0] == 0.0


def test_the_patch_reaches_the_kernels():
    z = rows(257, 0)
    base = entmath.entropy(z, backend="triton")
    with approximate_math("up"):
        up = entmath.entropy(z, backend="triton")
    assert not torch.equal(base, up)  # the kernels' exp went through the emulation
    assert torch.equal(entmath.entropy(z, backend="triton"), base)  # and it is undone


# ---------------------------------------------------------------------------------------------
# The stated bounds for lse and H, and the ops' tolerances
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_entropy_and_lse_within_the_first_order_bounds(mode):
    from entmath.kernels.triton.entropy import entropy_fwd

    z = rows(4097, 1)
    h0, lse0 = entropy_fwd(z)
    with approximate_math(mode):
        h1, lse1 = entropy_fwd(z)
    z64 = z.double()
    m = z64.max(-1, keepdim=True).values
    d = torch.where(torch.isfinite(z64), z64 - m, torch.zeros_like(z64))
    p = torch.softmax(z64, -1)
    mean_abs_d = (p * d.abs()).sum(-1)
    sigma = ((p * d * d).sum(-1) - (p * d).sum(-1) ** 2).clamp_min(0).sqrt()
    reach = torch.where(torch.isfinite(z64), -d, torch.zeros_like(d)).max(-1).values
    log_s = torch.logsumexp(z64, -1) - m.squeeze(-1)
    slack = 1.1  # second-order terms
    rounding = 2 * U  # the final rounding of lse (or H) in fp32, which the two runs may take apart
    bound_lse = slack * (9 + 1.22 * mean_abs_d + 4 * log_s) * U + rounding * lse0.double().abs()
    bound_h = (slack * ((9 + 5.22 * mean_abs_d + 4 * log_s) * U + (5 + 1.22 * reach) * sigma * U)
               + rounding * h0.double().abs())
    assert bool(((lse1 - lse0).double().abs() <= bound_lse).all()), (lse1 - lse0, bound_lse)
    assert bool(((h1 - h0).double().abs() <= bound_h).all()), (h1 - h0, bound_h)


@pytest.mark.parametrize("mode", MODES)
def test_row_ops_keep_their_accuracy(mode):
    z = rows(1000, 2)
    w = rows(1000, 3)
    w[5] = torch.randn(1000)  # b with full support where a has it
    t = torch.tensor([3, 999, 0, 500, 0, 700])
    y = torch.softmax(torch.randn(6, 1000, generator=torch.Generator().manual_seed(4)), -1)
    with approximate_math(mode):
        za = z.clone().requires_grad_()
        h = entmath.entropy(za, backend="triton")
        h.sum().backward()
        wa = w.clone().requires_grad_()
        kl = entmath.kl(wa, z, backend="triton")
        kl.sum().backward()
        zc = z.clone().requires_grad_()
        ce = entmath.cross_entropy(zc, t, label_smoothing=0.1, z_loss=1e-4, reduction="none", backend="triton")
        ce.sum().backward()
        zs = z[:5].clone().requires_grad_()
        ce_soft = entmath.cross_entropy(zs, y[:5], reduction="none", backend="triton")
        ce_soft.sum().backward()
    # References: the torch path in fp32 on the same inputs, at the tolerances tests/test_<op>.py
    # hold the interpreted kernels to (fp32 inputs bound the gradients' accuracy: log p = z - lse
    # carries ulp(z) for |z| ~ 100, the same in every fp32 path).
    zr = z.clone().requires_grad_()
    h_ref = entmath.entropy(zr, backend="torch")
    h_ref.sum().backward()
    wr = w.clone().requires_grad_()
    kl_ref = entmath.kl(wr, z, backend="torch")
    kl_ref.sum().backward()
    zcr = z.clone().requires_grad_()
    ce_ref = entmath.cross_entropy(zcr, t, label_smoothing=0.1, z_loss=1e-4, reduction="none", backend="torch")
    ce_ref.sum().backward()
    zsr = z[:5].clone().requires_grad_()
    ce_soft_ref = entmath.cross_entropy(zsr, y[:5], reduction="none", backend="torch")
    ce_soft_ref.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, **tol)
    grads_close(za.grad, zr.grad, z)
    torch.testing.assert_close(kl, kl_ref, **tol)
    grads_close(wa.grad, wr.grad, w, z)
    torch.testing.assert_close(ce, ce_ref, **tol)
    grads_close(zc.grad, zcr.grad, z)
    torch.testing.assert_close(ce_soft, ce_soft_ref, **tol)
    grads_close(zs.grad, zsr.grad, z[:5])


def grads_close(got, want, *logits):
    """|got - want| <= 1e-6 + 1e-5 |want| + 16 u max|z| p: every gradient here is p times a
    difference of logit-sized terms (log p = z - lse, ...), which fp32 resolves to ulp(max |z|)."""
    scale = sum(torch.where(torch.isfinite(z), z, 0.0).abs().amax(-1, keepdim=True) for z in logits)
    p = sum(torch.softmax(z, -1) for z in logits)
    bound = 1e-6 + 1e-5 * want.abs() + 16 * U * scale * p
    assert bool(((got - want).abs() <= bound).all()), ((got - want).abs() / bound).max()


@pytest.mark.parametrize("gap", [10.0, 40.0, 80.0])
def test_nearly_one_hot_rows_keep_relative_accuracy(gap):
    # H ~ (1 + gap) e^{-gap}: the argument rounding of ex2 costs a relative 1.22 gap u here.
    z = torch.tensor([[0.0, -gap, -gap - 1.0]])
    want = entmath.entropy(z.double(), backend="torch").item()
    for mode in MODES:
        with approximate_math(mode):
            got = entmath.entropy(z, backend="triton").item()
        assert abs(got - want) <= 1e-5 * want, (mode, got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_entropy_keeps_its_accuracy(mode, dtype):
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 37, 16, generator=g) * 2).to(dtype), torch.randn(2, 70, 16, generator=g).to(dtype)
    with approximate_math(mode):
        got = attention_entropy(q, k, is_causal=True, offset=33, backend="triton")
    want = attention_entropy(q.double(), k.double(), is_causal=True, offset=33, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=2e-5)


@pytest.mark.parametrize("noise,mode", [("normal", "up"), ("normal", "down"), ("logistic", "mixed")])
def test_noise_softmax_keeps_its_accuracy(mode, noise):
    # The Newton stopping rule (a rounding-level step, or a small one that stops halving) must
    # still stop, at nodes as good, when -log F carries the approximate exp and divisions.
    z = (torch.rand(2, 100, generator=torch.Generator().manual_seed(6)) * 20 - 10)
    gp = torch.randn(2, 100, generator=torch.Generator().manual_seed(7))
    with approximate_math(mode):
        za = z.clone().requires_grad_()
        p = noise_softmax(za, noise, backend="triton")
        (g,) = torch.autograd.grad(p, za, gp)
    zr = z.double().requires_grad_()
    p_ref = noise_softmax(zr, noise, backend="torch")
    (g_ref,) = torch.autograd.grad(p_ref, zr, gp.double())
    torch.testing.assert_close(p.double(), p_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode,tiled", [("up", False), ("down", False), ("mixed", True)])
def test_entropy_normalize_converges_to_the_same_gamma(mode, tiled):
    # entropy_normalization.py stops at |H - t| <= 8 ulp(t) (FTOL_ULPS) or an exhausted bracket;
    # with GPU-like exp, divisions and square roots it must still stop at a gamma as good.
    from entmath.kernels.triton.entropy_normalization import entropy_normalize_fwd

    kw = dict(one_tile_max=0, block=128) if tiled else {}
    z = rows(500, 8)
    t = torch.full((6,), 0.5 * math.log(500))
    p0, g0, _ = entropy_normalize_fwd(z, t, **kw)
    with approximate_math(mode):
        p1, g1, _ = entropy_normalize_fwd(z, t, **kw)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=0)
    torch.testing.assert_close(p1.double().sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-5)
    h1 = -(p1.double() * torch.log(p1.double()).nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(h1, t.double(), rtol=0, atol=1e-5)
