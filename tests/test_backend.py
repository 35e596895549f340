"""Backend selection, and `import entmath` without triton."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import entmath


def _run(code: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_and_auto_backend_without_triton():
    # A meta-path hook makes `import triton` fail, as on a machine without it.
    code = """
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("no triton here")
        sys.meta_path.insert(0, NoTriton())
        import torch, entmath
        assert not entmath.triton_available()
        z = torch.randn(3, 5, requires_grad=True)
        h = entmath.entropy(z)                      # auto -> torch
        h.sum().backward()
        entmath.cross_entropy(z, torch.tensor([0, 1, 2]))
        entmath.kl(z, z)
        try:
            entmath.entropy(z, backend="triton")
        except RuntimeError as e:
            assert "needs the triton package" in str(e), e
        else:
            raise AssertionError("backend='triton' without triton must raise")
        assert "triton" not in sys.modules
        print("ok")
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    out = _run("""
        import torch, entmath
        try:
            entmath.entropy(torch.randn(2, 3), backend="triton")
        except RuntimeError as e:
            print(e)
    """)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_auto_is_torch_on_cpu():
    from entmath._backend import resolve_backend

    assert resolve_backend("auto", torch.zeros(1)) == "torch"
    assert resolve_backend("triton", torch.zeros(1)) == "triton"  # the interpreter is on in tests


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_is_triton_on_cuda():
    from entmath._backend import resolve_backend

    assert resolve_backend("auto", torch.zeros(1, device="cuda")) == "triton"


def test_version():
    assert entmath.__version__.count(".") == 2
