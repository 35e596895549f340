"""How the Triton kernels are launched: the aligned row frame (kernels/triton/rows.py) at every row
alignment and with mismatched strides, the cross-entropy forward/backward launchers, attention's
grid and int64 offsets.  Kernel-vs-torch implementation checks, run under TRITON_INTERPRET=1."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import entmath  # noqa: E402
from entmath.kernels.triton import attention_entropy as att  # noqa: E402
from entmath.kernels.triton import cross_entropy as ce  # noqa: E402
from entmath.kernels.triton import rows as R  # noqa: E402


def strided_rows(n_rows, n, pad, dtype, seed):
    """(n_rows, n) view with row stride n + pad (rows start at every residue modulo 16 bytes), and
    the leaf it views (gradients land there, the view keeps its strides)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n_rows, n + pad, generator=g) * 3).to(dtype)
    return base[:, :n]


def leaf_view(v):
    """A leaf with v's values and storage layout, and the (n_rows, n) view of it the op gets."""
    base = v.as_strided((v.shape[0], v.stride(0)), (v.stride(0), 1)).detach().clone().requires_grad_()
    return base, base[:, : v.shape[1]]


def z_size(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def tolerance(dtype):
    return {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=2**-6, atol=1e-3)}[dtype]


@pytest.fixture
def small_chunks(monkeypatch):
    # 16-wide chunks: a 100-element row has masked end chunks and several unmasked middle ones.
    monkeypatch.setattr(R, "block_size", lambda n: 16)


def test_row_config_frame_and_alignment():
    z = torch.empty(8, 50257, dtype=torch.bfloat16)
    cfg = R.row_config(50257, z, torch.empty_like(z))
    assert cfg["VEC"] == 8 and cfg["ALIGNED"] and cfg["BLOCK"] == 4096
    assert not R.row_config(50257, z, torch.empty(8, 50260, dtype=torch.bfloat16)[:, :50257])["ALIGNED"]
    # a stride of 50265 = 50257 + 8 is congruent modulo VEC: the same frame
    assert R.row_config(50257, z, torch.empty(8, 50265, dtype=torch.bfloat16)[:, :50257])["ALIGNED"]
    assert R.row_config(3, torch.empty(2, 3))["BLOCK"] == 4  # BLOCK >= VEC: the row starts in the first chunk
    assert R.row_config(4096, z)["maxnreg"] == 64  # 16 warps, two programs per SM


@pytest.mark.parametrize("dtype,n,pad", [(torch.float32, 1, 0), (torch.float32, 100, 3), (torch.float32, 131, 5),
                                         (torch.bfloat16, 5, 2), (torch.bfloat16, 100, 1), (torch.float64, 37, 1)])
def test_entropy_kl_every_row_alignment(small_chunks, dtype, n, pad):
    rows = 16 // z_size(dtype) + 1  # the rows start at every residue modulo 16 bytes
    z = strided_rows(rows, n, pad, dtype, n + pad)
    z[2, : n // 2] = float("-inf")
    w = strided_rows(rows, n, pad + 1, dtype, n + 7)  # another stride: b read outside the frame's alignment
    tol = tolerance(dtype)
    for a in (z,):
        (base_a, za), (base_b, zb) = leaf_view(a), leaf_view(a)
        assert zb.stride(0) == a.stride(0)
        ha, hb = entmath.entropy(za, backend="torch"), entmath.entropy(zb, backend="triton")
        torch.testing.assert_close(hb.float(), ha.float(), **tol)
        ha.float().sum().backward()
        hb.float().sum().backward()
        torch.testing.assert_close(base_b.grad.float(), base_a.grad.float(), **tol)
    for a, b in ((z, w), (z, z.clone())):
        (pa_base, pa), (pb_base, pb) = leaf_view(a), leaf_view(b)
        (qa_base, qa), (qb_base, qb) = leaf_view(a), leaf_view(b)
        ka, kb = entmath.kl(pa, pb, backend="torch"), entmath.kl(qa, qb, backend="triton")
        torch.testing.assert_close(kb.float(), ka.float(), **tol)
        finite = torch.isfinite(ka)
        (ka.float()[finite].sum()).backward()
        (kb.float()[finite].sum()).backward()
        torch.testing.assert_close(qa_base.grad.float(), pa_base.grad.float(), **tol)
        torch.testing.assert_close(qb_base.grad.float(), pb_base.grad.float(), **tol)


@pytest.mark.parametrize("dtype,n,pad", [(torch.float32, 3, 1), (torch.float32, 131, 0), (torch.bfloat16, 100, 3)])
def test_cross_entropy_every_row_alignment(small_chunks, dtype, n, pad):
    z = strided_rows(5, n, pad, dtype, n * 3 + pad)
    t = torch.arange(5) * 13 % n
    t[3] = -100
    y = torch.softmax(strided_rows(5, n, pad + 1, torch.float32, 5).float(), -1).to(dtype)
    tol = tolerance(dtype)
    for target in (t, y):
        for kw in (dict(), dict(label_smoothing=0.1, z_loss=1e-3)):
            (base_a, za), (base_b, zb) = leaf_view(z), leaf_view(z)
            la = entmath.cross_entropy(za, target, reduction="none", backend="torch", **kw)
            lb = entmath.cross_entropy(zb, target, reduction="none", backend="triton", **kw)
            torch.testing.assert_close(lb.float(), la.float(), **tol)
            w = torch.linspace(0.5, 2.0, 5)
            (la.float() * w).sum().backward()
            (lb.float() * w).sum().backward()
            torch.testing.assert_close(base_b.grad.float(), base_a.grad.float(), **tol)


@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_backward_launcher_with_a_per_row_scale(soft):
    # The shape a separate autograd backward takes: forward kernel, then the gradient from
    # (z, target, lse and its residual, per-row incoming gradients), checked against autograd of
    # the torch path.  z-loss reaches the backward kernel as g_lse = 2 z_loss lse g_loss.
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 37, generator=g, dtype=torch.float64) * 2
    t = torch.tensor([0, 36, 5, -100, 17, 2])
    y = torch.softmax(torch.randn(6, 37, generator=g, dtype=torch.float64), -1) if soft else None
    eps, z_loss = 0.1, 1e-2
    loss, lse, res, _ = ce.cross_entropy_fwd(z, None if soft else t, y, None, eps, -100, 0.0, False)
    valid = torch.ones(6, dtype=torch.bool) if soft else t != -100
    scale = torch.linspace(0.5, 3.0, 6, dtype=torch.float64)
    g_lse = torch.where(valid, 2 * z_loss * lse * scale, 0.0)
    sum_u = (y * (1 - eps) + eps / 37).sum(-1) if soft else None
    grad, grad_y = torch.empty_like(z), torch.empty_like(z) if soft else None
    ce.cross_entropy_bwd(z, None if soft else t, y, None, lse, res, None, scale, g_lse, None, sum_u, eps, -100, 0.0,
                         grad, grad_y)
    zr = z.clone().requires_grad_()
    yr = y.clone().requires_grad_() if soft else None
    ref = entmath.cross_entropy(zr, yr if soft else t, label_smoothing=eps, z_loss=z_loss, reduction="none",
                                backend="torch")
    torch.testing.assert_close(torch.where(valid, loss + z_loss * lse**2, 0.0), ref.detach(), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad((ref * scale).sum(), [zr] + ([yr] if soft else []))
    torch.testing.assert_close(grad, want[0], rtol=1e-12, atol=1e-12)
    if soft:
        torch.testing.assert_close(grad_y, want[1], rtol=1e-12, atol=1e-12)


def test_attention_grid_is_one_axis_without_the_65535_limit():
    cfg = att.attention_config(70000, 16, 16, 64, torch.bfloat16)  # B*H = 70000 > 65535
    assert cfg["grid"] == (70000 * cfg["n_mblocks"],) and cfg["n_mblocks"] == 1
    cfg = att.attention_config(32, 4096, 4096, 128, torch.bfloat16)
    assert cfg["grid"] == (32 * 4096 // cfg["BLOCK_M"],)
    with pytest.raises(ValueError, match="grid"):
        att.attention_config(2**20, 2**20, 16, 16, torch.float32)


def test_attention_many_heads_on_one_grid_axis():
    # Every (query block, batch*head) pair maps to its own program: 12 heads x 3 query blocks.
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(12, 37, 8, generator=g), torch.randn(12, 21, 8, generator=g)
    scale = torch.full((12, 37), 0.5)
    h, _ = att.attention_entropy_fwd(q, k, scale, False, 0, block_m=16, block_n=16)
    want = entmath.entropy((q @ k.transpose(-1, -2)) * 0.5)
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)


@triton.jit
def _offsets_kernel(idx_ptr, out_ptr, stride, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, att.row_offsets(tl.load(idx_ptr + i), stride))


def test_attention_offsets_are_int64():
    # idx * stride passes 2^31 here; an int32 product would wrap (numpy int32 wraps in the interpreter).
    idx = torch.tensor([0, 1, 40000, 65535, 131071, 7, 3, 2], dtype=torch.int32)
    out = torch.empty(8, dtype=torch.int64)
    _offsets_kernel[(1,)](idx, out, 40000, N=8)
    assert out.tolist() == [int(i) * 40000 for i in idx.tolist()]
    assert int(out.max()) > 2**31
