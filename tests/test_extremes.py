"""entropy, kl, jsd, linear_cross_entropy and attention_entropy at the extremes of the
floating-point range, on both backends.

The standard (issue 19): for any finite inputs (and -inf masks) the result is within the bound
stated in the op's docstring of the exact result for those same input values (mpmath on the
rounded inputs, ``tests/reference.py``), whatever the offset, spread or mask, up to the dtype's
max; never NaN, 0 or inf where the exact value is finite and representable.  The rows come from
``tests/strategies.py`` (shifts by 1e2..1e30 and near the max, spans up to twice the max, finite
masks from -1e4 to -max mixed with -inf, subnormal spreads, fp16/bf16 near their max), plus
nearly one-hot rows (one entry raised by a gap of 20..700).

The bound shared by the three docstrings, for a result v of a row pair with n classes:

    |computed - v| <= (32 + Delta + log2 n) u |v| + 64 (1 + log2 n)^2 u^3 + 1024 n sigma
                      + u_out |v| + sigma_out / 2,

u and sigma the unit roundoff and smallest subnormal of the accumulation dtype (float32 for half
inputs), u_out and sigma_out those of the output dtype (its final rounding), Delta the largest
gap max z - z_i over entries whose e^{z_i - max z} is a normal number of the accumulation dtype.
The u^3 term is kl's: the rounding eta ~ u log n of log S_b - log S_a adds eta^2 / 2 to the sum
of its terms, which is then taken out again (to within u eta^2).
``python tests/test_extremes.py [examples]`` prints the worst errors measured, in units of u.
"""
from __future__ import annotations

import math
import sys

import mpmath as mp
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import entmath
import entmath.ops.linear_cross_entropy as lce_op
from tests import reference as ref
from tests.paths import C_DTYPES, on_path
from tests.strategies import NEG_INF, extreme_row_pairs, extreme_rows, round_to

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
C_BOUND = 32
M32 = torch.finfo(torch.float32).max


@st.composite
def rows_for(draw, dtype):
    """An extreme row, or one made nearly one-hot by raising an entry by a gap of 20..700."""
    row = draw(extreme_rows(dtype))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(row) - 1))
        if row[i] != NEG_INF:
            row[i] = round_to([row[i] + draw(st.sampled_from([20.0, 60.0, 100.0, 700.0]))], dtype)[0]
    return row


@st.composite
def pairs_for(draw, dtype, lost=True):
    a, b = draw(extreme_row_pairs(dtype, lost=lost))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(a) - 1))
        if a[i] != NEG_INF:
            gap = draw(st.sampled_from([20.0, 60.0, 100.0]))
            a[i] = round_to([a[i] + gap], dtype)[0]
            if b[i] != NEG_INF and draw(st.booleans()):
                b[i] = round_to([b[i] + gap], dtype)[0]
    return a, b


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gap(*rows, dtype):
    """Delta: the largest max z - z_i of an entry whose e^{z_i - max z} is normal (0 if none)."""
    floor = math.log(torch.finfo(_acc(dtype)).smallest_normal)
    gap = 0.0
    for row in rows:
        live = [mp.mpf(v) for v in row if v != NEG_INF]
        m = max(live)
        gap = max([gap] + [float(m - v) for v in live if -(m - v) >= floor])
    return gap


def excess(got: float, want, rows, dtype, slack=0) -> float:
    """How far |got - want| is beyond the stated bound without its relative term, in units of
    u |want| (so the bound holds when this is <= 32 + Delta + log2 n).  inf for a NaN, for an inf
    where the exact value is finite and representable, or a 0 where it is representable."""
    acc, out = torch.finfo(_acc(dtype)), torch.finfo(dtype)
    sigma, sigma_out = acc.smallest_normal * acc.eps, out.smallest_normal * out.eps
    if math.isnan(got):
        return math.inf
    if want == mp.inf or abs(want) >= ref.overflow_threshold(dtype):  # +inf exactly, or rounds to inf
        return 0.0 if got == math.inf else math.inf
    if math.isinf(got) or (got == 0 and abs(want) > mp.mpf(sigma_out) / 2):
        return math.inf
    n = len(rows[0])
    u = mp.mpf(acc.eps) / 2
    floor = 64 * (1 + math.log2(n)) ** 2 * u ** 3 + 1024 * n * mp.mpf(sigma) + mp.mpf(sigma_out) / 2
    err = abs(mp.mpf(got) - want) - out.eps / 2 * abs(want) - floor - slack
    if err <= 0:
        return 0.0
    return float(err / abs(want)) / (acc.eps / 2) if want != 0 else math.inf


def _allowed(rows, dtype):
    return C_BOUND + _gap(*rows, dtype=dtype) + math.log2(len(rows[0]))


def _entropy(row, dtype, backend):
    got = entmath.entropy(torch.tensor([row], dtype=dtype), backend=backend).double().item()
    return got, ref.entropy_exact(row), (row,)


def _kl(pair, dtype, backend):
    a, b = pair
    got = entmath.kl(torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype), backend=backend)
    return got.double().item(), ref.kl_exact(a, b), (a, b)


def _jsd(case, dtype, backend):
    (a, b), beta = case
    got = entmath.jsd(torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype), beta, backend=backend)
    return got.double().item(), ref.jsd_exact(a, b, beta), (a, b)


BETAS = st.sampled_from([0.5, 0.5, 0.1, 0.9, 1e-3, 0.999]) | st.floats(0.01, 0.99)
CASES = {
    "entropy": (_entropy, rows_for),
    "kl": (_kl, pairs_for),
    "jsd": (_jsd, lambda dtype: st.tuples(pairs_for(dtype), BETAS)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.01, 0.3, 0.99])
def test_jsd_where_one_distribution_is_zero(backend, dtype, beta):
    """p spread over 7 classes, q on one of them: m / p = 1 - w (1 - e^{-|y|}) at q = 0 was formed
    as 1 + w E, which gives 1 - fl(1 - beta) instead of beta (8 ulps at beta = 0.01), and psi near
    q / m - 1 = -1 amplified it: KL(q || m) 282 ulps off, the JSD 48 (the property test's worst
    draw, logits near 1e30).  Now beta + w e^{-|y|}: within the stated bound."""
    a = [0.0] * 7
    b = [-1e30] * 6 + [0.0]
    for rows in ((a, b), (b, a)):
        got, want, case = _jsd((rows, beta), dtype, backend)
        assert excess(got, want, case, dtype) <= _allowed(case, dtype), (got, float(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_result_just_above_the_max_rounds_to_the_max(backend):
    """KL of [M, 0 x5] against [-M, 0 x5] is M + log 5: above the float32 max, below its overflow
    threshold max + ulp/2, so it rounds to M, which both backends return.  The bound's check once
    demanded inf for every exact value above max (and failed this correct result)."""
    a, b = [M32] + [0.0] * 5, [-M32] + [0.0] * 5
    got, want, rows = _kl((a, b), torch.float32, backend)
    assert want > M32 and got == M32
    assert excess(got, want, rows, torch.float32) == 0.0
    assert excess(math.inf, want, rows, torch.float32) == math.inf


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS + ["c"])
@pytest.mark.parametrize("op", list(CASES))
@given(data=st.data())
def test_within_the_stated_bound_of_the_exact_result(op, backend, dtype, data):
    if backend == "c" and (op == "jsd" or dtype not in C_DTYPES):
        pytest.skip("the C kernel computes entropy and kl (and cross_entropy) of float32/bfloat16 rows")
    run, strategy = CASES[op]
    case = data.draw(strategy(dtype))
    with on_path(backend) as b:
        got, want, rows = run(case, dtype, b)
    assert excess(got, want, rows, dtype) <= _allowed(rows, dtype), (got, float(want), case)


def measure(examples: int) -> None:
    """Print the worst error per op, backend and dtype, in units of u (beyond the absolute terms
    of the bound), over ``examples`` cases of the test's distribution."""
    from hypothesis import HealthCheck, settings

    for op, (run, strategy) in CASES.items():
        for backend in BACKENDS:
            for dtype in DTYPES:
                worst = [0.0, 0.0, None]  # excess, its allowance, case

                @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy(dtype))
                def one(case):
                    got, want, rows = run(case, dtype, backend)
                    e = excess(got, want, rows, dtype)
                    if e > worst[0]:
                        worst[:] = [e, _allowed(rows, dtype), case]

                one()
                print(f"{op:8} {backend:7} {str(dtype)[6:]:9} worst {worst[0]:8.3g} u  "
                      f"(allowed there {worst[1]:.0f} u)", flush=True)


# ---- ops that form their own logits: linear_cross_entropy and attention_entropy -----------
# Their inputs are h, W, b (logits (W h + b) / T) or q, k and a scale (logits scale q . k): the
# exact result is that of the exact logits of the given input values.  The logits the op forms
# carry the rounding of the dot products, |fl(z_j) - z_j| <= delta = (d + 3) u max_j (sum_k
# |h_k W_jk| + |b_j|) / T, and the results are Lipschitz in the logits (max norm): the
# cross-entropy with constant 2 (its gradient p - u has 1-norm <= 2), the entropy relative to
# itself (|dH| <= 2 H delta: E_p|log p + H| <= 2 H for -log p >= 0), so |dH| <= H (e^{2 delta} - 1).
# The stated bounds (their docstrings) add these to the bounds of cross_entropy and entropy.

def _exact_logits(rows, cols, bias, scale, dps=80):
    """[(exact logits as mpf, their float values, delta / u)] per row: z_ij = scale_i (rows_i . cols_j
    + bias_j), with delta / u = (d + 3) max_j |scale_i| (sum_k |rows_ik cols_jk| + |bias_j|)."""
    out = []
    with mp.workdps(dps):
        for i, r in enumerate(rows):
            s = mp.mpf(scale[i])
            z = [s * (mp.fsum(mp.mpf(a) * mp.mpf(b) for a, b in zip(r, c)) + mp.mpf(bias[j]))
                 for j, c in enumerate(cols)]
            size = max(abs(s) * (mp.fsum(abs(mp.mpf(a) * mp.mpf(b)) for a, b in zip(r, c)) + abs(mp.mpf(bias[j])))
                       for j, c in enumerate(cols))
            out.append((z, [float(v) for v in z], (len(r) + 3) * size))
    return out


@st.composite
def linear_heads(draw, dtype):
    """(h (N, d), W (V, d), b (V,), T) rounded to dtype: an offset in the bias (1e2 .. 1e30 or
    near the max / 4), spreads from 1e-20 to 30 in h and W, temperatures 0.5 .. 3."""
    n, d, v = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 24))
    big = torch.finfo(dtype).max
    spread = draw(st.sampled_from([1.0, 1.0, 1e-20, 1e-3, 30.0]))
    shift = draw(st.sampled_from([c for c in (0.0, 1e2, 1e4, 1e6, 1e30) if c < big / 8] + [big / 8]))
    shift *= draw(st.sampled_from([1.0, -1.0]))
    flat = st.floats(-3, 3)
    h = [round_to(draw(st.lists(flat, min_size=d, max_size=d)), dtype) for _ in range(n)]
    w = [round_to([spread * x for x in draw(st.lists(flat, min_size=d, max_size=d))], dtype) for _ in range(v)]
    b = round_to([shift + spread * x for x in draw(st.lists(flat, min_size=v, max_size=v))], dtype)
    temp = draw(st.sampled_from([1.0, 1.0, 0.5, 3.0]))
    return h, w, b, temp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_linear_cross_entropy_within_its_stated_bound(backend, dtype, data):
    """loss within 8 u (L + H) + 2 delta, entropy within the entropy bound + H (e^{2 delta} - 1),
    of those of the exact logits of the given h, W, b (linear_cross_entropy's docstring)."""
    h, w, b, temp = data.draw(linear_heads(dtype))
    eps = data.draw(st.sampled_from([0.0, 0.1]))
    target = data.draw(st.lists(st.integers(0, len(w) - 1), min_size=len(h), max_size=len(h)))
    ht, wt, bt = (torch.tensor(x, dtype=dtype) for x in (h, w, b))
    loss, ent = entmath.linear_cross_entropy(ht, wt, torch.tensor(target), bt, label_smoothing=eps,
                                             temperature=temp, reduction="none", return_entropy=True,
                                             backend=backend)
    acc, out = torch.finfo(_acc(dtype)), torch.finfo(dtype)
    u = mp.mpf(acc.eps) / 2
    for i, (z, zf, delta_u) in enumerate(_exact_logits(h, w, b, [1 / mp.mpf(temp)] * len(h))):
        want_l = ref.cross_entropy_exact(z, target[i], eps)
        want_h = ref.entropy_exact(z)
        delta = delta_u * u
        allowed_l = 8 * u * (want_l + want_h) + 2 * delta + out.eps / 2 * want_l + out.tiny
        got_l = loss[i].double().item()
        assert abs(got_l - want_l) <= allowed_l, (i, got_l, float(want_l), float(allowed_l), h, w, b, temp)
        got_h = ent[i].double().item()
        rows = ([float(v) for v in zf],)
        slack = want_h * (mp.exp(2 * delta) - 1)
        assert excess(got_h, want_h, rows, dtype, slack) <= _allowed(rows, dtype), (i, got_h, float(want_h))


# Regression (deterministic): rows whose entropy is a subnormal number.  Every entry but the
# maximum lies 104..109 below it (float32; 745..752 in float64), where e^d rounds to 0 but the
# moment's terms e^d d (the whole entropy) do not.  "drawn" is the row the property test above
# drew (15 examples, float32): the Triton kernel returned 0.0 for an exact 1.6e-45, and so did the
# torch path (its per-tile sums, _stats.chunk_summary, until _stats.restore_tail); "pair" is a
# two-class row where the torch path returned 0.0 for an exact 2.3e-45.  The others put
# the maximum after the target's tile, so that the deep tail arrives through a rescaling: in a
# later tile of the same split (the kernel's running summary, update_stats; the torch path's
# merge_summaries) or in the other split (combine_summaries).
def _deep_tail_head(dtype, case):
    gap = {torch.float32: 107.8125, torch.float64: 748.0}[dtype]
    if case == "drawn":  # logits 152.8 (class 9), 45 (class 8), 0 elsewhere
        return [[2.5]], [[0.0]] * 9 + [[73.125]] + [[0.0]] * 4, [0.0] * 8 + [45.0, -30.0] + [0.0] * 4
    if case == "pair":  # two classes, logits 107.46 and -0.36: one entry 107.8 below the maximum
        return [[-2.21875, 0.0, 0.5, -1.0]], [[60.0, 0.0, 90.0, -56.25], [-71.25, 0.0, 30.0, 15.0]], [82.5, 0.0]
    v = 300  # on the CPU the Triton kernel cuts it into splits 0..255, 256..299 of 128-column tiles
    b = [0.0] + [-1.0e4] * (v - 1)
    b[{"tile": 200, "split": 299}[case]] = gap
    return [[1.0]], [[0.0]] * v, b


@pytest.mark.parametrize("dtype,case", [(torch.float32, "drawn"), (torch.float32, "pair"), (torch.float32, "tile"),
                                        (torch.float32, "split"), (torch.float64, "tile"), (torch.float64, "split")],
                         ids=["f32-drawn", "f32-pair", "f32-tile", "f32-split", "f64-tile", "f64-split"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_keeps_a_subnormal_entropy(backend, dtype, case, monkeypatch):
    monkeypatch.setattr(lce_op, "VOCAB_BLOCK", 27)  # torch path: 12 tiles
    h, w, b = _deep_tail_head(dtype, case)
    (z, zf, delta_u), = _exact_logits(h, w, b, [1])
    want_h, want_l = ref.entropy_exact(z), ref.cross_entropy_exact(z, 0)
    assert 0 < want_h < torch.finfo(dtype).smallest_normal  # the case: a representable subnormal entropy
    loss, ent = entmath.linear_cross_entropy(*(torch.tensor(x, dtype=dtype) for x in (h, w)), torch.tensor([0]),
                                             torch.tensor(b, dtype=dtype), reduction="none", return_entropy=True,
                                             backend=backend)
    got = ent[0].double().item()
    assert got > 0, (got, float(want_h))
    rows = ([float(v) for v in zf],)
    u = mp.mpf(torch.finfo(dtype).eps) / 2
    slack = want_h * (mp.exp(2 * delta_u * u) - 1)
    assert excess(got, want_h, rows, dtype, slack) <= _allowed(rows, dtype), (got, float(want_h))
    allowed_l = 8 * u * (want_l + want_h) + 2 * delta_u * u + torch.finfo(dtype).tiny  # the docstring's
    assert abs(loss[0].double().item() - want_l) <= allowed_l, (loss[0].item(), float(want_l))


# The same deep tail through the entropy op's reference path (``entropy_torch``, which shares
# _stats.chunk_summary): rows of few logits (below the C kernel's size), each with every entry but
# the maximum 104..109 below it (float32) or 745..752 (float64); a masked entry or a repeated
# maximum must not disturb it.
@pytest.mark.parametrize("dtype,row", [
    (torch.float32, [152.8125, 45.0, 0.0, 0.0]),
    (torch.float32, [0.0, -104.5, -106.0, -108.5]),
    (torch.float32, [3.0, NEG_INF, 3.0 - 105.25]),
    (torch.float32, [7.0, 7.0, 7.0 - 107.0]),
    (torch.float64, [0.0, -746.0, -748.5, NEG_INF]),
], ids=["f32-drawn", "f32-spread", "f32-masked", "f32-two-maxima", "f64-spread"])
def test_entropy_torch_keeps_a_deep_tail(dtype, row):
    from entmath.ops.entropy import entropy_torch  # itself: the torch backend hands float32 rows to C

    want, rows = ref.entropy_exact(row), (row,)
    assert want > 0  # a subnormal; with two maxima, log 2 (the restored R must stay exactly 1)
    # a batch of one row, and the row alone (a 1-D input: 0-dim summaries)
    for got in (entropy_torch(torch.tensor([row], dtype=dtype))[0], entropy_torch(torch.tensor(row, dtype=dtype))[0]):
        got = got.double().item()
        assert excess(got, want, rows, dtype) <= _allowed(rows, dtype), (got, float(want))


def test_restore_tail_branch_free_matches_the_branch(monkeypatch):
    """Implementation check: ``restore_tail`` recomputes the flagged rows on the CPU by a data-dependent
    branch and elsewhere (CUDA, compiled, transformed) branch-free for every row; both must give the
    same summaries, and ordinary rows must keep their plain sums bit for bit."""
    from entmath.ops import _stats

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64).float() * 4
    z[1, 0], z[1, 1:] = 0.0, -106.0 + torch.rand(39, generator=g)  # deep tail: the whole entropy is subnormal
    z[3, 1:] = NEG_INF  # one live entry: A = 0 exactly
    z[4, 2:] = -300.0
    z[4, 1] = z[4, 0]  # two maxima, the rest beyond any tail
    plain = _stats.chunk_summary(z.clone(), masked=True)
    monkeypatch.setattr(_stats, "restore_tail", lambda d, r, a: (r, a))
    raw = _stats.chunk_summary(z.clone(), masked=True)
    monkeypatch.undo()
    monkeypatch.setattr(_stats, "_may_branch", lambda t: False)
    free = _stats.chunk_summary(z.clone(), masked=True)
    for x, y in zip(plain, free):
        assert torch.equal(x, y)
    for i in (0, 2, 5):  # ordinary rows: untouched
        assert all(torch.equal(x[i], y[i]) for x, y in zip(plain, raw))
    assert raw[2][1] == 0 and plain[2][1] < 0  # the deep row's moment, lost plainly, kept


@st.composite
def attention_problems(draw, dtype):
    """(q (L, d), k (S, d), per-query scales) rounded to dtype: each query's logits offset by c_i
    through an extra feature (q_i,d = c_i, k_j,d = 1), spreads from 1e-20 to 30, scales 0.1 .. 4."""
    n_q, n_k, d = draw(st.integers(1, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 4))
    big = torch.finfo(dtype).max
    spread = draw(st.sampled_from([1.0, 1.0, 1e-20, 1e-3, 30.0]))
    flat = st.floats(-3, 3)
    shifts = [c for c in (0.0, 1e2, 1e4, 1e6, 1e30) if c < big / 64] + [big / 64]
    q = [round_to([spread * x for x in draw(st.lists(flat, min_size=d, max_size=d))]
                  + [draw(st.sampled_from(shifts)) * draw(st.sampled_from([1.0, -1.0]))], dtype) for _ in range(n_q)]
    k = [round_to(draw(st.lists(flat, min_size=d, max_size=d)) + [1.0], dtype) for _ in range(n_k)]
    scale = round_to([draw(st.sampled_from([1.0, 0.1, 0.5, 4.0])) for _ in range(n_q)], dtype)
    return q, k, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_attention_entropy_within_its_stated_bound(backend, dtype, data):
    """Each query's entropy within the entropy bound + H (e^{2 delta} - 1) of the entropy of the
    exact logits scale_i q_i . k_j (attention_entropy's docstring)."""
    q, k, scale = data.draw(attention_problems(dtype))
    got = entmath.attention_entropy(torch.tensor([q], dtype=dtype), torch.tensor([k], dtype=dtype),
                                    scale=torch.tensor([scale], dtype=dtype), backend=backend)[0]
    u = mp.mpf(torch.finfo(_acc(dtype)).eps) / 2
    for i, (z, zf, delta_u) in enumerate(_exact_logits(q, k, [0.0] * len(k), scale)):
        want = ref.entropy_exact(z)
        slack = want * (mp.exp(2 * delta_u * u) - 1)
        rows = ([float(v) for v in zf],)
        assert excess(got[i].double().item(), want, rows, dtype, slack) <= _allowed(rows, dtype), (
            i, got[i].item(), float(want), q, k, scale)


if __name__ == "__main__":
    import os
    import warnings

    os.environ.setdefault("TRITON_INTERPRET", "1")
    warnings.filterwarnings("ignore")
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
