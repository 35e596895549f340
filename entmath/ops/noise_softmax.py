"""Noise-argmax distributions p_i = P[argmax_j (mu_j + eps_j) = i], eps_j i.i.d.  Derived in
Chapter 4 (book/ch04_noise_argmax.md).

With Phi, phi the noise CDF and density, F(t) = prod_j Phi(t - mu_j) (the CDF of the maximum) and
the reverse hazard r_j(t) = phi(t - mu_j) / Phi(t - mu_j), the chapter shows

    p_i = int r_i(t) / S(t) dF(t) = int_0^1 w_i(t(u)) du,     S = sum_j r_j,  w = r / S,

so one set of K nodes u_k in (0, 1) serves every class (cost O(nK), not the O(n^2 K) of
integrating each p_i on its own) and sum_i w_i = 1 at every node.

Nodes: the tanh-sinh (double-exponential) rule in u, u = (1 + tanh(pi/2 sinh s)) / 2 on an equispaced
grid in s.  The integrand has mild singularities at u -> 0 and u -> 1 (it depends on log u through
t(u)); the double-exponential map makes it decay doubly exponentially there, so the trapezoid rule
in s converges geometrically.  The node weights are normalised to sum to 1 (the trapezoid sum of
du/ds is 1 only up to the truncation at |s| = 3, ~1e-13), hence sum_i p_i = 1 to rounding, with
no renormalisation of p.

Each node t_k = F^{-1}(u_k) is found per row by a safeguarded Newton iteration on
G(t) = log(-log F(t)) = log y_k with y_k = -log u_k (G is exactly linear for Gumbel noise, nearly
so otherwise), started at the top of the bracket  mu_max + H^{-1}(y_k) <= t_k <= mu_max + H^{-1}(y_k / n),
H(x) = -log Phi(x), which holds because -log Phi(t - mu_max) <= -log F(t) <= n (-log Phi(t - mu_max));
a step that leaves the bracket, or cycles, is replaced by bisection.

Backward (implicit function theorem, Chapter 4): F(t_k; mu) = u_k gives dt_k/dmu_m = w_m(t_k), and

    dp_i/dmu_m = sum_k omega_k [ -delta_im a_i + w_i a_m + (a_i - w_i A) w_m ](t_k),
    a_j = w_j c_j,  c_j = d log r_j / dt,  A = sum_j a_j,

so the vector-Jacobian product with g is  sum_k omega_k [ a_m (G1 - g_m) + w_m (G2 - A G1) ]  with
G1 = sum_i g_i w_i, G2 = sum_i g_i a_i: two reductions and one map per node, O(nK).
"""
from __future__ import annotations

import math
import numbers

import torch

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_rows_finite, normalize_dim, value_checks_active
from ._library import register_row_vmap, triton_kernel_op
from ._rows import kernels, rows_2d, upcast

__all__ = ["noise_softmax", "NOISES", "DEFAULT_NODES", "tanh_sinh_rule", "quadrature", "seed_scheme", "monte_carlo"]

#: Supported noise families.  "gumbel" is computed exactly as softmax(mu / scale).
NOISES = ("gumbel", "normal", "logistic", "cauchy")
#: Default number of nodes K per family: the promise is max abs error <= 1e-6 (fp64) for n <= 1000
#: classes and mu in [-10, 10]; the defaults keep the worst error measured over a sweep of such
#: rows (benchmarks/bench_noise_softmax.py, Chapter 4) at least 100 times smaller.  Heavy (Cauchy)
#: tails need many more nodes: a class far behind makes a narrow feature in u = F(t).
DEFAULT_NODES = {"normal": 24, "logistic": 32, "cauchy": 256}
MAX_NODES = 4096
_NEWTON_MAX = 60  # evaluations of the safeguarded Newton iteration; 5-9 in practice
_NEWTON_FREE = 8  # Newton steps taken before the "step must halve" safeguard applies
_CHUNK = 1 << 22  # elements of one (rows, K, n) tile in the torch path
_S_MAX = 3.0  # |s| <= 3: u_k and 1 - u_k stay >= e^{-pi sinh 3} ~ 2e-14 (fp32-safe), weights ~1e-13
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_LOG_PI = math.log(math.pi)


# --------------------------------------------------------------------------------------------
# Noise families, in torch.  For each: ``both(x) = (log Phi(x), log r(x))`` with
# log r = log phi - log Phi (one call: the two share their expensive part), ``dlog(x, r)`` =
# d log r / dx, and the tail inverse H^{-1}(y) = the x with -log Phi(x) = y.  ``both`` must give
# (0, -inf) at x = +inf exactly: a -inf logit has x = +inf at every node and must drop out of F and
# S without NaN.  Errors are judged in log r (r = e^{log r} is what is used): absolute 1e-14 is fine.
# --------------------------------------------------------------------------------------------
def _normal_both(x):
    log_cdf = torch.special.log_ndtr(x)
    # For x << 0 the two terms nearly cancel (log r ~ log|x|), but nodes keep x >~ -15, where
    # the absolute error is ~x^2 eps < 1e-13; erfcx would avoid it at 5x the cost on CPU.
    return log_cdf, (-0.5 * x * x - _LOG_SQRT_2PI) - log_cdf


def _normal_dlog(x, r):
    return -x - r  # d/dx [log phi - log Phi] = -x - phi/Phi


def _normal_tail_inv(y):
    # Phi(x) = e^{-y}; for small y use the upper tail 1 - Phi = -expm1(-y) to keep its digits.
    return torch.where(y < math.log(2), -torch.special.ndtri(-torch.expm1(-y)), torch.special.ndtri(torch.exp(-y)))


def _logistic_both(x):
    log_cdf = torch.nn.functional.logsigmoid(x)
    return log_cdf, log_cdf - x  # r = phi / Phi = 1 - sigmoid(x) = sigmoid(-x)


def _logistic_dlog(x, r):
    return -torch.sigmoid(x)


def _logistic_tail_inv(y):
    return -torch.log(torch.expm1(y))  # sigmoid(x) = e^{-y}


def _cauchy_both(x):
    ax = x.abs()
    big = ax > 1
    inv = 1 / torch.where(big, ax, torch.ones_like(ax))
    at = torch.atan(torch.where(big, inv, ax))
    q = torch.where(big, at, math.pi / 2 - at) / math.pi  # atan(1/|x|)/pi: the smaller tail
    # x < 0: Phi = q (accurate far left); x >= 0: log Phi = log1p(-q) keeps the tiny upper tail.
    log_cdf = torch.where(x < 0, torch.log(q), torch.log1p(-q))
    # log(1 + x^2) without overflowing x^2 (fp32 nodes reach |x| ~ 1e13)
    log1p_sq = torch.where(big, 2 * torch.log(ax) + torch.log1p(inv * inv), torch.log1p(x * x))
    return log_cdf, -_LOG_PI - log1p_sq - log_cdf


def _cauchy_dlog(x, r):
    ax = x.abs()
    inv = 1 / torch.where(ax > 1, ax, torch.ones_like(ax))
    two_x = torch.where(ax > 1, 2 * torch.sign(x) / (ax + inv), 2 * x / (1 + x * x))  # 2x / (1 + x^2)
    return -two_x - r


def _cauchy_tail_inv(y):
    cdf, upper = torch.exp(-y), -torch.expm1(-y)
    return torch.where(cdf < 0.5, -1 / torch.tan(math.pi * cdf), 1 / torch.tan(math.pi * upper))


_FAMILY = {
    "normal": (_normal_both, _normal_dlog, _normal_tail_inv),
    "logistic": (_logistic_both, _logistic_dlog, _logistic_tail_inv),
    "cauchy": (_cauchy_both, _cauchy_dlog, _cauchy_tail_inv),
}


# --------------------------------------------------------------------------------------------
# The node rule
# --------------------------------------------------------------------------------------------
def tanh_sinh_rule(K: int, dtype=torch.float64, device=None):
    """The K-node rule used by ``noise_softmax``: ``(y, omega)`` with u_k = exp(-y_k) the nodes in
    (0, 1) and omega_k > 0 the weights, normalised so that sum_k omega_k = 1.

    Computed in float64 on ``device`` with a handful of K-sized torch ops on every call (no
    cache): a tracer (fake tensors, ``torch.compile``) then sees ordinary ops, not tensors made
    outside it."""
    K = int(K)
    if K == 1:
        y = torch.full((1,), math.log(2), dtype=torch.float64, device=device)
        return y.to(dtype), torch.ones(1, dtype=dtype, device=device)
    N = K / 2
    # Step of the double-exponential rule for ~2N nodes (Takahasi and Mori): it balances the
    # discretisation error exp(-2 pi d / h) against the truncation at |s| = (K - 1) h / 2.
    h = math.log(2 * math.pi * N / math.log(2 * math.pi * N)) / N if K > 2 else 1.0
    # ... but stop the grid at |s| = 3, where u_k (or 1 - u_k) ~ 2e-14 and the weights ~1e-13:
    # beyond, the nodes add nothing at the 1e-6 level and would strain fp32.  For heavy tails the
    # finer h this gives at large K matters more than the outermost nodes (Chapter 4).
    h = min(h, 2 * _S_MAX / (K - 1))
    s = (torch.arange(K, dtype=torch.float64, device=device) - (K - 1) / 2) * h
    a = math.pi * torch.sinh(s)
    y = torch.nn.functional.softplus(-a)  # -log u with u = 1 / (1 + e^{-a}), exact for u -> 1
    log_w = torch.log(torch.cosh(s)) - torch.nn.functional.softplus(-a) - torch.nn.functional.softplus(a)
    w = torch.exp(log_w - log_w.max())
    return y.to(dtype), (w / w.sum()).to(dtype)


def brackets(noise: str, n: int, y: torch.Tensor):
    """Per node, t_k - max mu lies in [H^{-1}(y_k), H^{-1}(y_k / n)] with H = -log Phi, because
    -log Phi(t - max mu) <= -log F(t) <= n (-log Phi(t - max mu)) (Chapter 4)."""
    inv = _FAMILY[noise][2]
    return inv(y), inv(y / n)


def node_brackets(noise: str, n: int, K: int, dtype, device):
    """(y, omega, x_lo, x_hi): the K-node rule and the per-node brackets, in dtype on device."""
    y, w = tanh_sinh_rule(K, device=device)
    return tuple(v.to(dtype=dtype) for v in (y, w, *brackets(noise, n, y)))


# --------------------------------------------------------------------------------------------
# Torch reference path
# --------------------------------------------------------------------------------------------
def _evaluate(noise, z, t):
    """At nodes t (rows, K) for logits z (rows, n): -log F, log S and log r (rows, K, n)."""
    log_cdf, lr = _FAMILY[noise][0](t.unsqueeze(-1) - z.unsqueeze(-2))
    return -log_cdf.sum(-1), torch.logsumexp(lr, -1), lr


def newton_nodes(noise, z, m, y, x_lo, x_hi, max_iter=_NEWTON_MAX, stats: dict | None = None):
    """Solve -log F(t_k) = y_k per row by safeguarded Newton on log(-log F).  Returns the nodes t,
    log S(t) and log r(t) at the returned nodes (the last evaluation is reused, not repeated).
    If ``stats`` is a dict, ``stats["evaluations"]`` receives the number of O(nK) passes."""
    lo, hi = m + x_lo, m + x_hi
    t = hi.clone()
    log_y = torch.log(y)
    tol_step, tol_stall = newton_tolerances(z.dtype)
    prev = torch.full_like(t, math.inf)
    dx_old = hi - lo
    for it in range(max_iter):
        y_cur, log_s, lr = _evaluate(noise, z, t)
        right = y_cur <= y  # F(t) >= u: the root is at or left of t
        hi = torch.where(right, t, hi)
        lo = torch.where(right, lo, t)
        # Newton on G(t) = log(-log F):  G' = -S / (-log F), so dt = (log y_cur - log y) y_cur / S.
        step = (torch.log(y_cur) - log_y) * y_cur * torch.exp(-log_s)
        # Bisect instead when Newton leaves the bracket or, after _NEWTON_FREE free steps and
        # unless the step is at rounding level, does not halve the previous step (as in rtsafe):
        # G need not be convex for heavy tails, and Newton can then cycle.
        shrinks = (it < _NEWTON_FREE) | (step.abs() <= 0.5 * dx_old) | (step.abs() <= tol_stall * (1 + t.abs()))
        ok = torch.isfinite(step) & (t + step >= lo) & (t + step <= hi) & shrinks
        t_new = torch.where(ok, t + step, 0.5 * (lo + hi))
        dx_old = (t_new - t).abs()
        # Converged: a step at rounding level, or (Newton being quadratic) a small step that no
        # longer halves, i.e. the residual is rounding noise in the sum -log F.
        rel = dx_old / (1 + t.abs())
        done = (rel <= tol_step) | ((rel <= tol_stall) & (rel >= 0.5 * prev))
        if bool(done.all()) or it == max_iter - 1:
            if stats is not None:
                stats["evaluations"] = it + 1
            return t, log_s, lr
        t, prev = t_new, rel


def newton_tolerances(dtype):
    """(tol_step, tol_stall) of the Newton stopping rule, relative to 1 + |t|."""
    eps = torch.finfo(dtype).eps
    return 8 * eps, eps ** (2 / 3)


def noise_softmax_torch(z2d, m, y, w, x_lo, x_hi, noise):
    """Reference forward on rows (rows, n), row maxima m (rows, 1) and the K nodes: returns p
    (rows, n), the nodes t and log S (rows, K)."""
    rows, n = z2d.shape
    K = y.numel()
    p = torch.empty_like(z2d)
    t = z2d.new_empty(rows, K)
    log_s = z2d.new_empty(rows, K)
    step = max(1, _CHUNK // (K * n))
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        tt, ls, lr = newton_nodes(noise, z2d[sl], m[sl], y, x_lo, x_hi)
        # p_i = sum_k omega_k w_i(t_k), w = r / S: sum_i w_i = 1 at every node.
        p[sl] = torch.einsum("k,bkn->bn", w, torch.exp(lr - ls.unsqueeze(-1)))
        t[sl], log_s[sl] = tt, ls
    return p, t, log_s


def noise_softmax_vjp(z2d, t, w_k, noise, grad_p, grad_t, log_s=None):
    """Vector-Jacobian product of (p, t) w.r.t. the logits, in torch ops (differentiable again).

    From the nodes t (rows, K) and the weights w_k: the derived backward of the module docstring
    for p, plus the nodes' own derivative dt_k/dmu_m = w_m(t_k) for ``grad_t``.  ``log_s`` is
    recomputed from (z, t) unless given (it depends on both: a second derivative needs that).
    O(nK) per row, in row chunks of about ``_CHUNK`` (rows, K, n) entries.
    """
    K = w_k.numel()
    rows, n = z2d.shape
    both, dlog_rh, _ = _FAMILY[noise]
    live = (z2d > float("-inf")).unsqueeze(-2)
    step = max(1, _CHUNK // (K * max(n, 1)))
    out = []
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        # -inf logits: x = +inf, r = 0, weight 0; x is set to 0 there so that no product in this
        # graph (or its derivative) meets an infinity.
        x = torch.where(live[sl], t[sl].unsqueeze(-1) - torch.where(live[sl], z2d[sl].unsqueeze(-2), 0.0), 0.0)
        lr = torch.where(live[sl], both(x)[1], float("-inf"))
        ls = torch.logsumexp(lr, -1) if log_s is None else log_s[sl]
        w = torch.exp(lr - ls.unsqueeze(-1))
        gz = torch.zeros_like(z2d[sl])
        if grad_p is not None:
            # a = w c with c = d log r / dx; classes with w = 0 (mu = -inf) contribute 0, not 0 * inf.
            a = torch.where(live[sl], w * dlog_rh(x, torch.exp(lr)), 0.0)
            gs = grad_p[sl].to(z2d.dtype).unsqueeze(-2)
            g1 = (gs * w).sum(-1, keepdim=True)
            g2 = (gs * a).sum(-1, keepdim=True)
            big_a = a.sum(-1, keepdim=True)
            gz = gz + torch.einsum("k,bkn->bn", w_k, a * (g1 - gs) + w * (g2 - big_a * g1))
        if grad_t is not None:
            gz = gz + torch.einsum("bk,bkn->bn", grad_t[sl].to(z2d.dtype), w)
        out.append(gz)
    return torch.cat(out) if len(out) != 1 else out[0]


def quadrature(mu: torch.Tensor, noise: str, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """p along the last dim of ``mu`` (no -inf rows, no autograd) for ANY node rule on (0, 1):
    nodes u_k = exp(-y_k), weights w_k.  ``noise_softmax`` uses the tanh-sinh rule; Chapter 4
    compares it with others (Gauss-Legendre in u) through this function."""
    z2d = rows_2d(upcast(mu))
    y, w = y.to(z2d), w.to(z2d)
    x_lo, x_hi = brackets(noise, z2d.shape[1], y)
    p, _, _ = noise_softmax_torch(z2d, z2d.amax(-1, keepdim=True), y, w, x_lo, x_hi, noise)
    return p.view(mu.shape)


# ---- the solvers, registered as operators (see _library.py) ---------------------------------
# The nodes are found by an iteration that runs until every node converges, which no compiler can
# trace: on both backends the forward is an opaque operator; the backward is torch code.
@torch.library.custom_op("entmath::noise_softmax_solve", mutates_args=())
def noise_softmax_solve(z: torch.Tensor, noise: str, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, nodes t, log S at the nodes) of the rows of z (rows, n); t and log S are (rows, K)."""
    z = rows_2d(z)
    y, w, x_lo, x_hi = node_brackets(noise, z.shape[1], K, z.dtype, z.device)
    return noise_softmax_torch(z, z.amax(-1, keepdim=True), y, w, x_lo, x_hi, noise)


@triton_kernel_op("noise_softmax_triton")
def noise_softmax_triton(z: torch.Tensor, noise: str, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same by the Triton kernel."""
    z2d = rows_2d(z)
    y, w, x_lo, x_hi = node_brackets(noise, z2d.shape[1], K, z2d.dtype, z2d.device)
    p, t, log_s = kernels("noise_softmax").noise_softmax_fwd(
        z2d, z2d.amax(-1, keepdim=True), y, w, x_lo, x_hi, noise, _NEWTON_MAX, _NEWTON_FREE,
        *newton_tolerances(z2d.dtype))
    return p, t, log_s


@triton_kernel_op("noise_softmax_backward_triton")
def noise_softmax_backward_triton(z: torch.Tensor, grad_p: torch.Tensor, t: torch.Tensor, log_s: torch.Tensor,
                                  noise: str) -> torch.Tensor:
    """dL/dmu from dL/dp and the forward's nodes (rows, K), by the Triton kernel (two passes)."""
    z2d, K = rows_2d(z), t.shape[-1]
    _, w = tanh_sinh_rule(K, dtype=z2d.dtype, device=z2d.device)
    return kernels("noise_softmax").noise_softmax_bwd(z2d, rows_2d(grad_p), t.contiguous(), log_s.contiguous(),
                                                      w, noise)


def _fake_solve(z, noise, K):
    t = z.new_empty(z.shape[0], K)
    return torch.empty_like(z, memory_format=torch.contiguous_format), t, torch.empty_like(t)


noise_softmax_solve.register_fake(_fake_solve)
noise_softmax_triton.register_fake(_fake_solve)
noise_softmax_backward_triton.register_fake(lambda z, grad_p, t, log_s, noise: torch.empty_like(
    z, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])  # log S: a by-product, recomputed when differentiated
    ctx.save_for_backward(inputs[0], output[1], output[2])
    ctx.noise, ctx.K = inputs[1], inputs[2]


def _backward(ctx, grad_p, grad_t, _grad_log_s, kernel=False):
    z, t, log_s = ctx.saved_tensors
    if kernel and grad_t is None and grad_p is not None and not torch.is_grad_enabled():
        return torch.ops.entmath.noise_softmax_backward_triton(z, grad_p, t, log_s, ctx.noise), None, None
    _, w = tanh_sinh_rule(ctx.K, dtype=z.dtype, device=z.device)
    graph = torch.is_grad_enabled()
    return noise_softmax_vjp(z, t, w, ctx.noise, grad_p, grad_t, log_s=None if graph else log_s), None, None


noise_softmax_solve.register_autograd(_backward, setup_context=_setup)
noise_softmax_triton.register_autograd(_backward, setup_context=_setup)
register_row_vmap(noise_softmax_solve, (1, None, None))
register_row_vmap(noise_softmax_triton, (1, None, None))


class _NoiseSoftmax(torch.autograd.Function):
    """(p, t, log S) for the rows of z2d (rows, n): p_i = P[argmax(z + eps) = i] by the shared-node
    quadrature, the nodes t (differentiable: dt_k/dz_m = w_m(t_k)) and log S (not)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z2d, noise, K, backend):
        if backend == "triton":
            return torch.ops.entmath.noise_softmax_triton(z2d, noise, K)
        return torch.ops.entmath.noise_softmax_solve(z2d, noise, K)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.backend = inputs[3]

    @staticmethod
    def backward(ctx, grad_p, grad_t, grad_log_s):
        return (*_backward(ctx, grad_p, grad_t, grad_log_s, kernel=ctx.backend == "triton"), None)


def _check_scale(scale, mu: torch.Tensor, dim: int):
    """Structural checks of ``scale`` (always) and its values (when value checks are active)."""
    if isinstance(scale, torch.Tensor):
        check_float_tensor(scale, "scale")
        if scale.device != mu.device and scale.dim() > 0:
            raise ValueError(f"scale must be on the device of mu ({mu.device}), got {scale.device}")
        try:
            shape = torch.broadcast_shapes(scale.shape, mu.shape)
        except RuntimeError:
            shape = None
        if shape != mu.shape:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to the shape of mu "
                             f"{tuple(mu.shape)} (the result has mu's shape)")
        if scale.dim() >= mu.dim() - dim and scale.shape[dim - mu.dim()] != 1:
            raise ValueError(f"scale must have size 1 along dim={dim} (one noise scale per row), got shape "
                             f"{tuple(scale.shape)}: with a scale per class, argmax(mu + scale * eps) is not "
                             "the distribution of mu / scale")
        if not value_checks_active(scale):
            return
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bool(bad.any()):
            raise ValueError("scale must be positive and finite everywhere (the noise scale)")
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive real number or a float tensor, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite (the noise scale), got {scale!r}")


def _centred(mu: torch.Tensor, scale, dim: int, centre: bool = True) -> torch.Tensor:
    """(mu - max mu) / scale with the class dim last, in the accumulation dtype (without the
    shift if not ``centre``: Gumbel noise is torch's softmax, which centres on its own).

    p is invariant to a shift of mu, and only differences mu_j - mu_max enter it: subtracting the
    row max first keeps every later quantity (the nodes t, the arguments t - mu_j) of the size of
    the spread of the row, not of its offset, so the result is that of the rounded inputs
    whatever the offset.  The max is a constant to autograd (p does not depend on it).  On a row
    without a distribution (NaN, +inf, no finite entry) the max is not finite and the whole row
    becomes NaN.  -inf entries stay -inf, and a tensor scale meets them only through a where(),
    so that d/dscale of (-inf) / scale (an infinite derivative times a zero gradient) never
    makes a NaN."""
    z = upcast(mu).movedim(dim, -1)
    d = z - z.detach().amax(-1, keepdim=True) if centre else z
    if isinstance(scale, torch.Tensor):
        s = scale.expand(mu.shape).movedim(dim, -1).to(d.dtype)
        dead = z == float("-inf")
        return torch.where(dead, float("-inf"), torch.where(dead, 0.0, d) / s)
    return d / scale if scale != 1 else d


def noise_softmax(mu: torch.Tensor, noise: str = "normal", dim: int = -1, nodes: int | None = None,
                  scale=1.0, *, backend: str = "auto") -> torch.Tensor:
    """The noise-argmax distribution p_i = P[argmax_j (mu_j + scale * eps_j) = i], along ``dim``.

    The eps_j are i.i.d. draws of the standard ``noise`` family (Chapter 4):

    * ``"gumbel"``   - standard Gumbel: p = softmax(mu / scale), exactly (Gumbel-max trick);
    * ``"normal"``   - standard normal (the multinomial probit);
    * ``"logistic"`` - standard logistic;
    * ``"cauchy"``   - standard Cauchy (heavy tails: far-behind classes keep polynomially small mass).

    Args:
        mu: floating-point tensor of locations (logits), any leading shape.  ``-inf`` entries are
            classes that can never win: they get p = 0 and drop out of the rest of the row.
        noise: the noise family, one of ``NOISES``.
        dim: the class dimension.
        nodes: the number K of quadrature nodes (tanh-sinh in u = F(t)); None chooses
            ``DEFAULT_NODES[noise]`` (24 normal, 32 logistic, 256 Cauchy): max abs error <= 1e-6
            in fp64 for n <= 1000 classes and mu in [-10, 10] (measured: below 1e-8).
            Ignored for ``"gumbel"``.
        scale: the noise scale (> 0): a number, or a float tensor that broadcasts to the shape
            of ``mu`` with size 1 along ``dim`` (one temperature per row; gradients flow to it).
            Equivalent to using mu / scale.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``entmath._backend``); Gumbel noise
            always takes torch's softmax.

    Returns:
        p, the shape and dtype of ``mu``; fp16/bf16 are computed in fp32.  Each row sums to 1 up
        to rounding (the node weights sum to 1 and sum_i w_i(t) = 1 at every node; p is not
        renormalised).  Cost O(n K) per row.  Differentiable (backward by the implicit function
        theorem, also O(n K)).

        Accuracy: p depends only on the differences mu_i - max mu, which are formed first, so the
        result is that of the given (rounded) values whatever their offset (1e4, 1e30, up to the
        dtype's max).  Against the exact distribution of those values, the error is the
        quadrature's (above) plus rounding: at most 2e-6 absolute per entry in fp32 with the
        default nodes, for n <= 1000 classes whose finite spread is at most 20 / scale (the
        property tests, both backends; a far-behind class, -1e30 or -inf, only lowers it).

    Raises:
        TypeError: ``mu`` is not a floating-point tensor; ``noise`` is not a string; ``nodes`` is
            not an int; ``scale`` is not a real number or float tensor.
        ValueError: unknown ``noise``; ``nodes`` outside [1, MAX_NODES]; ``scale`` <= 0, NaN or
            infinite, on another device, not broadcasting to ``mu``'s shape or varying along
            ``dim``; ``dim`` out of range or empty class dimension; a row of ``mu`` contains NaN
            or +inf, or is entirely ``-inf``.  The message names the argument (and the rows).

    Examples:
        >>> mu = torch.tensor([[1.0, 0.0, -1.0]])
        >>> entmath.noise_softmax(mu, "gumbel")  # the Gumbel-max trick: softmax(mu)
        tensor([[0.6652, 0.2447, 0.0900]])
        >>> entmath.noise_softmax(mu, "normal")  # Gaussian noise (multinomial probit), by quadrature
        tensor([[0.7288, 0.2241, 0.0472]])
    """
    check_float_tensor(mu, "mu")
    if not isinstance(noise, str):
        raise TypeError(f"noise must be a string, one of {NOISES}, got {type(noise).__name__}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if nodes is None:
        K = DEFAULT_NODES.get(noise, 0)  # 0: gumbel, which needs no nodes
    elif isinstance(nodes, bool) or not isinstance(nodes, numbers.Integral):
        raise TypeError(f"nodes must be an int or None, got {type(nodes).__name__}")
    elif not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be in [1, {MAX_NODES}], got {nodes}")
    else:
        K = int(nodes)
    dim = normalize_dim(mu, dim, "mu")
    _check_scale(scale, mu, dim)
    backend = resolve_backend(backend, mu)
    # The row max is already "coded" for validation: NaN (torch's max propagates it), +inf, or -inf
    # for a row with no finite entry; finite otherwise.  One cheap reduction, no second look at mu.
    check_rows_finite(mu.detach().movedim(dim, -1).amax(-1), "mu")
    z = _centred(mu, scale, dim, centre=noise != "gumbel")
    if noise == "gumbel":
        p = torch.softmax(z, -1)  # exact: the Gumbel-max trick (Chapter 4)
    else:
        z2d = rows_2d(z)
        p = _NoiseSoftmax.apply(z2d, noise, K, backend)[0].view(z.shape)
    return p.movedim(-1, dim).to(mu.dtype)


# --------------------------------------------------------------------------------------------
# Baselines (Chapter 4 and benchmarks/bench_noise_softmax.py)
# --------------------------------------------------------------------------------------------
def quantile(noise: str, v: torch.Tensor) -> torch.Tensor:
    """Phi^{-1}(v) of the standard noise family, 0 < v < 1 (for sampling: accurate to rounding of v)."""
    if noise == "gumbel":
        return -torch.log(-torch.log(v))
    if noise == "normal":
        return torch.special.ndtri(v)
    if noise == "logistic":
        return torch.log(v) - torch.log1p(-v)
    return torch.tan(math.pi * (v - 0.5))


def _log_cdf(noise: str, x: torch.Tensor) -> torch.Tensor:
    return -torch.exp(-x) if noise == "gumbel" else _FAMILY[noise][0](x)[0]


def seed_scheme(mu: torch.Tensor, noise: str, K: int, chunk: int = 1 << 22) -> torch.Tensor:
    """The source post's scheme, O(n^2 K) per row: with v = Phi(eps),
    p_i ~ (1/K) sum_{k=1..K} prod_{j != i} Phi(mu_i - mu_j + Phi^{-1}(k / (K + 1))).
    mu: (n,) finite.  Products are summed in log space (they underflow for large n)."""
    n = mu.numel()
    e = quantile(noise, torch.arange(1, K + 1, dtype=mu.dtype, device=mu.device) / (K + 1))
    self_term = _log_cdf(noise, e)  # the j = i factor Phi(e_k), taken back out of the full product
    out = torch.empty_like(mu)
    step = max(1, chunk // (n * K))
    for i0 in range(0, n, step):
        d = mu[i0:i0 + step, None, None] - mu[None, :, None] + e  # (i, j, k)
        log_prod = _log_cdf(noise, d).sum(1) - self_term
        out[i0:i0 + step] = log_prod.exp().mean(-1)
    return out


def monte_carlo(mu: torch.Tensor, noise: str, samples: int, generator=None, chunk: int = 1 << 22) -> torch.Tensor:
    """Frequencies of argmax_j (mu_j + eps_j) over ``samples`` draws, O(n) per draw; mu: (n,)."""
    n = mu.numel()
    counts = torch.zeros(n, dtype=torch.float64, device=mu.device)
    step = max(1, chunk // n)
    for s0 in range(0, samples, step):
        m = min(step, samples - s0)
        v = torch.rand(m, n, generator=generator, dtype=mu.dtype, device=mu.device).clamp_min_(1e-300)
        win = (mu + quantile(noise, v)).argmax(-1)
        counts += torch.bincount(win, minlength=n).to(counts)
    return (counts / samples).to(mu.dtype)
