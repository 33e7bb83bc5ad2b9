"""The fused MLP with Gemma's gate activation, GELU with the tanh approximation, on every
backend: the emulator's NKI `up_gate` kernel, and `ops.svd_mlp` on torch and nki-sim,
against float64 references written here (the tanh formula, independent of torch's)."""
import numpy as np
import pytest
import torch

from vllm_neuronmlp import mlp_families, ops
from vllm_neuronmlp.kernels import blocking, launch, mlp, sim
from vllm_neuronmlp.linear_method import factored_linear

from test_kernels_mlp import BF16, TOL, d, factors, rel_err


def gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


def test_the_kernel_computes_every_family_activation():
    assert set(mlp.ACTIVATIONS) == set(mlp_families.ACTIVATIONS)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("S,H,rg,ru,I", [(7, 200, 96, 64, 300), (130, 129, 64, 160, 513)])
def test_up_gate_kernel_gelu_tanh(S, H, rg, ru, I, dtype):
    x, ug, vg, uu, vu, _, _ = factors(S, H, rg, ru, I, 32, dtype)
    h_ref = gelu_tanh(d(x) @ d(ug) @ d(vg)) * (d(x) @ d(uu) @ d(vu))
    h_t, _ = sim.run(blocking.up_gate, x, ug, vg, uu, vu, activation="gelu_tanh")
    rel, worst = rel_err(h_t, h_ref.T)
    assert rel <= TOL[dtype][0] and worst <= TOL[dtype][1], (rel, worst)
    # and it is not the SiLU result: the two activations differ by far more than the tolerance
    silu_t, _ = sim.run(blocking.up_gate, x, ug, vg, uu, vu)
    assert rel_err(silu_t, h_ref.T)[0] > 10 * TOL[dtype][0]


def test_up_gate_kernel_refuses_an_unknown_activation():
    x, ug, vg, uu, vu, _, _ = factors(7, 64, 32, 32, 96, 32, np.float32)
    with pytest.raises(ValueError, match=r"up_gate: activation 'relu' is not one of \('silu', 'gelu_tanh'\)"):
        sim.run(blocking.up_gate, x, ug, vg, uu, vu, activation="relu")


H, I, RG, RU, RD = 96, 200, 64, 32, 96


def _factors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale: torch.randn(*s, generator=g, dtype=torch.float64) * scale   # noqa: E731
    ts = (mk(7, H, scale=1.0), mk(H, RG + RU, scale=H ** -0.5), mk(RG + RU, I, scale=RG ** -0.5),
          mk(I, RD, scale=I ** -0.5), mk(RD, H, scale=RD ** -0.5))
    return [t.to(dtype) for t in ts]


def _reference(x, guu, guv, du, dv):
    x, guu, guv, du, dv = (t.double().numpy() for t in (x, guu, guv, du, dv))
    return (gelu_tanh(x @ guu[:, :RG] @ guv[:RG]) * (x @ guu[:, RG:] @ guv[RG:])) @ du @ dv


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float32, 1e-5), ("torch", torch.bfloat16, 3e-2),
                                               ("nki-sim", torch.float32, 1e-5), ("nki-sim", torch.bfloat16, 5e-2)])
def test_svd_mlp_gelu_tanh_on_every_cpu_backend(backend, dtype, tol):
    args = _factors(dtype)
    y = ops.svd_mlp(*args, gate_rank=RG, backend=backend, activation=mlp_families.GELU_TANH)
    assert y.dtype == dtype and y.shape == (7, H)
    ref = _reference(*args)
    err = np.abs(y.double().numpy() - ref).max() / np.abs(ref).max()
    assert err < tol, f"{backend} {dtype}: relative error {err:.2e}"


def test_svd_mlp_gelu_tanh_equals_the_per_linear_path_eager_and_compiled():
    x, guu, guv, du, dv = _factors(torch.float32, seed=1)
    gate_up = factored_linear(x, guu, guv, [0, RG, RG + RU])
    per_linear = factored_linear(torch.nn.functional.gelu(gate_up[:, :I], approximate="tanh") * gate_up[:, I:],
                                 du, dv, [0, RD])
    fused = ops.svd_mlp(x, guu, guv, du, dv, RG, "torch", mlp_families.GELU_TANH)
    torch.testing.assert_close(fused, per_linear, rtol=0, atol=1e-6)
    compiled = torch.compile(lambda a: ops.svd_mlp(a, guu, guv, du, dv, RG, "torch", mlp_families.GELU_TANH),
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), fused, rtol=0, atol=1e-6)


def test_svd_mlp_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match=r"svd_mlp: activation 'gelu' is not one of \('silu', 'gelu_tanh'\)"):
        ops.svd_mlp(*_factors(torch.float32), gate_rank=RG, backend="torch", activation="gelu")


def test_launch_passes_the_activation_to_the_emulated_kernel():
    x, ug, vg, uu, vu, ud, vd = factors(9, 64, 32, 32, 96, 32, np.float32, seed=4)
    ref = (gelu_tanh(d(x) @ d(ug) @ d(vg)) * (d(x) @ d(uu) @ d(vu))) @ d(ud) @ d(vd)
    y = launch.svd_mlp_sim(x, ug, vg, uu, vu, ud, vd, activation="gelu_tanh")
    assert rel_err(y, ref)[1] < 1e-5
