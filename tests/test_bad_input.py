"""Bad input: a ValueError/TypeError naming the argument, or a documented value; never a silent
NaN, never an internal IndexError, and other rows unaffected."""
import pytest
import torch

import entmath

BACKENDS = ["torch", "triton"]
NAN, INF = float("nan"), float("inf")


def _ops(backend):
    """Each op as f(logits) on a (rows, n) batch, plus the name it gives the logits argument."""
    def ce(z):
        return entmath.cross_entropy(z, torch.zeros(z.shape[:-1], dtype=torch.long), reduction="none", backend=backend)

    def kl_p(z):
        return entmath.kl(z, torch.zeros_like(z), backend=backend)

    def kl_q(z):
        return entmath.kl(torch.zeros_like(z), z, backend=backend)

    return [
        (lambda z: entmath.entropy(z, backend=backend), "logits"),
        (ce, "logits"),
        (kl_p, "p_logits"),
        (kl_q, "q_logits"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,message", [(NAN, "contains NaN"), (INF, r"contains \+inf")])
def test_nan_and_pos_inf_logits(backend, bad, message):
    z = torch.randn(4, 6)
    z[2, 3] = bad
    for op, name in _ops(backend):
        with pytest.raises(ValueError, match=f"{name} {message}.*row"):
            op(z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_neg_inf_row(backend):
    z = torch.randn(3, 5)
    z[1] = -INF
    for op, name in _ops(backend):
        with pytest.raises(ValueError, match=f"{name} has row.*every logit is -inf"):
            op(z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_class_dim(backend):
    z = torch.randn(3, 0)
    for op, name in _ops(backend):
        name = "p_logits" if name == "q_logits" else name  # same shape: p is checked first
        with pytest.raises(ValueError, match=f"{name} has an empty class dimension"):
            op(z)


def test_empty_batch_is_fine():
    z = torch.randn(0, 5)
    assert entmath.entropy(z).shape == (0,)
    assert entmath.kl(z, z).shape == (0,)
    assert entmath.cross_entropy(z, torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_logits(dtype):
    z = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match="logits must have a floating-point dtype"):
        entmath.entropy(z)
    with pytest.raises(TypeError, match="logits must have a floating-point dtype"):
        entmath.cross_entropy(z, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="p_logits must have a floating-point dtype"):
        entmath.kl(z, z.float())
    with pytest.raises(TypeError, match="q_logits must have a floating-point dtype"):
        entmath.kl(z.float(), z)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        entmath.entropy([[0.0, 1.0]])
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        entmath.cross_entropy(torch.zeros(2, 3), [0, 1])


def test_scalar_and_bad_dim():
    with pytest.raises(ValueError, match="logits must have at least one dimension"):
        entmath.entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match="dim=2 is out of range for logits"):
        entmath.entropy(torch.zeros(2, 3), dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        entmath.entropy(torch.zeros(2, 3), dim=1.0)


def test_mismatched_shapes():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="p_logits and q_logits must have the same shape"):
        entmath.kl(z, torch.randn(4, 6))
    # Mixed float dtypes are promoted, as F.kl_div promotes them (autocast produces such pairs).
    assert entmath.kl(z, z.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="target holds class indices, so its shape must be"):
        entmath.cross_entropy(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds probabilities, so its shape must equal"):
        entmath.cross_entropy(z, torch.rand(4, 6))
    with pytest.raises(TypeError, match="target must hold class indices"):
        entmath.cross_entropy(z, torch.zeros(4, dtype=torch.complex64))


@pytest.mark.parametrize("bad", [5, 17, -1, -101])
def test_target_index_out_of_range(bad):
    t = torch.tensor([0, bad, 2, 3])
    with pytest.raises(ValueError, match=rf"target has class indices outside \[0, 5\): \[{bad}\]"):
        entmath.cross_entropy(torch.randn(4, 5), t)


@pytest.mark.parametrize("eps", [-0.1, 1.5, NAN])
def test_label_smoothing_out_of_range(eps):
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        entmath.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing=eps)


def test_bad_options():
    z, t = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction must be one of"):
        entmath.cross_entropy(z, t, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        entmath.cross_entropy(z, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        entmath.entropy(z, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_values_leave_other_rows_alone(backend):
    torch.manual_seed(0)
    z = torch.randn(4, 6)
    q = torch.randn(4, 6)
    # row 1: -inf entries (impossible classes) and q lacking mass that p has -> KL = +inf
    z[1, :3] = -INF
    q[1, 4] = -INF
    h = entmath.entropy(z, backend=backend)
    d = entmath.kl(z, q, backend=backend)
    assert torch.isfinite(h).all()
    assert d[1].item() == INF and torch.isfinite(d[[0, 2, 3]]).all()
    for i in (0, 2, 3):
        assert torch.equal(h[i], entmath.entropy(z[i:i + 1], backend=backend)[0])
        assert torch.equal(d[i], entmath.kl(z[i:i + 1], q[i:i + 1], backend=backend)[0])


def test_ignored_all_neg_inf_row_is_not_an_error():
    z = torch.randn(3, 4)
    z[1] = -INF
    t = torch.tensor([1, -100, 2])
    loss = entmath.cross_entropy(z, t, reduction="none")
    assert loss[1].item() == 0.0
    assert torch.equal(loss[[0, 2]], entmath.cross_entropy(z[[0, 2]], t[[0, 2]], reduction="none"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_input_errors_name_the_argument(backend):
    # a 1-D input is a single row: its lse is 0-dim (this once raised an internal IndexError)
    for op, name in _ops(backend):
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            op(torch.tensor([NAN, 0.0]))
        with pytest.raises(ValueError, match=f"{name} has row.*every logit is -inf"):
            op(torch.tensor([-INF, -INF]))
