"""The fused `svd_mlp` op against a float64 reference and against the per-linear path."""
import pytest
import torch
import torch.nn.functional as F

from vllm_neuronmlp import ops
from vllm_neuronmlp.linear_method import factored_linear

H, I, RG, RU, RD = 96, 200, 64, 32, 96


def _factors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)
    x = mk(7, H, scale=1.0)
    gate_up_u = mk(H, RG + RU, scale=H ** -0.5)
    gate_up_v = mk(RG + RU, I, scale=RG ** -0.5)
    down_u = mk(I, RD, scale=I ** -0.5)
    down_v = mk(RD, H, scale=RD ** -0.5)
    return [t.to(dtype) for t in (x, gate_up_u, gate_up_v, down_u, down_v)]


def _reference(x, gate_up_u, gate_up_v, down_u, down_v):
    x, guu, guv, du, dv = (t.double() for t in (x, gate_up_u, gate_up_v, down_u, down_v))
    gate = x @ guu[:, :RG] @ guv[:RG]
    up = x @ guu[:, RG:] @ guv[RG:]
    return (F.silu(gate) * up) @ du @ dv


# tolerance relative to the output's scale: bf16 keeps 8 bits of mantissa, fp16 11, fp32 24
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_svd_mlp_matches_float64_reference(dtype, tol):
    args = _factors(dtype)
    y = ops.svd_mlp(*args, gate_rank=RG, backend="torch")
    assert y.dtype == dtype and y.shape == (7, H)
    ref = _reference(*args)
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < tol, f"relative error {err:.2e} for {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_per_linear_path(dtype):
    x, guu, guv, du, dv = _factors(dtype, seed=1)
    fused = ops.svd_mlp(x, guu, guv, du, dv, gate_rank=RG, backend="torch")
    gate_up = factored_linear(x, guu, guv, [0, RG, RG + RU])  # the merged linear's [gate | up] output
    h = F.silu(gate_up[:, :I]) * gate_up[:, I:]
    per_linear = factored_linear(h, du, dv, [0, RD])
    torch.testing.assert_close(fused, per_linear, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)


def test_svd_mlp_keeps_leading_dims_and_compiles_as_one_op():
    x, guu, guv, du, dv = _factors(torch.float32)
    x3 = x.reshape(1, 7, H)
    y = ops.svd_mlp(x3, guu, guv, du, dv, gate_rank=RG, backend="torch")
    assert y.shape == (1, 7, H)
    compiled = torch.compile(lambda a: ops.svd_mlp(a, guu, guv, du, dv, RG, "torch"), fullgraph=True)
    torch.testing.assert_close(compiled(x), y[0])


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    assert ops.select_backend(cpu) == "torch"
    monkeypatch.setenv(ops.BACKEND_ENV, "nki-sim")
    assert ops.select_backend(cpu) == "nki-sim"
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda-magic")
    with pytest.raises(ops.BackendError, match=r"VLLM_NEURONMLP_BACKEND='cuda-magic' is not a backend"):
        ops.select_backend(cpu)


@pytest.mark.skipif(ops.nki_available(), reason="the Neuron SDK is installed here")
def test_nki_backend_without_sdk_says_so():
    with pytest.raises(ops.BackendError, match=r"needs the Neuron SDK .* use nki-sim"):
        ops.select_backend(torch.device("cpu"), "nki")


def test_nki_available_is_not_fooled_by_the_pypi_placeholder(tmp_path):
    """PyPI's `nki` is an empty placeholder: importable by name, no nki.jit. The backend
    check must look for what the SDK provides, not for the name."""
    import subprocess
    import sys

    (tmp_path / "nki").mkdir()
    (tmp_path / "nki" / "__init__.py").write_text("# placeholder, like the PyPI package\n")
    code = ("import importlib.util; from vllm_neuronmlp import ops;"
            "print(importlib.util.find_spec('nki') is not None, ops.nki_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_nki_backend_goes_through_the_launcher_and_falls_back(caplog):
    """The op's `nki` backend is kernels/launch.py; where the kernels cannot run (here: no
    SDK, CPU tensors) it runs the torch backend and says so once."""
    from vllm_neuronmlp.kernels import launch

    args = _factors(torch.float32, seed=2)
    launch._fallbacks_logged.clear()
    with caplog.at_level("WARNING", logger=launch.__name__):
        y = ops.svd_mlp(*args, gate_rank=RG, backend="nki")
        ops.svd_mlp(*args, gate_rank=RG, backend="nki")
    torch.testing.assert_close(y, ops.svd_mlp(*args, gate_rank=RG, backend="torch"), rtol=0, atol=0)
    assert sum("torch fallback" in r.getMessage() for r in caplog.records) == 1
