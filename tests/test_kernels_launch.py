"""kernels.launch: the host-side helpers the plugin calls, and the kernels package's
dependency promise (numpy + ml_dtypes only, no torch)."""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import launch, nki_compat

BF16 = ml_dtypes.bfloat16


def d(a):
    return np.asarray(a).astype(np.float64)


def mlp_factors(H, rg, ru, I, rd, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype)   # noqa: E731
    return f(H, rg), f(rg, I), f(H, ru), f(ru, I), f(I, rd), f(rd, H)


def mlp_reference(x, ug, vg, uu, vu, ud, vd):
    g = d(x) @ d(ug) @ d(vg)
    return (g / (1 + np.exp(-g)) * (d(x) @ d(uu) @ d(vu))) @ d(ud) @ d(vd)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (BF16, 2e-2)], ids=["fp32", "bf16"])
def test_svd_mlp_sim_matches_float64(dtype, tol):
    H, rg, ru, I, rd = 96, 32, 64, 160, 32           # a tiny model's ranks
    fs = mlp_factors(H, rg, ru, I, rd, dtype)
    x = np.random.default_rng(1).standard_normal((2, 5, H)).astype(dtype)
    y, (st_up, st_down) = launch.svd_mlp_sim(x, *fs, return_stats=True)
    assert y.shape == (2, 5, H) and y.dtype == np.float32
    ref = mlp_reference(x.reshape(10, H), *fs).reshape(2, 5, H)
    assert np.linalg.norm(d(y) - ref) / np.linalg.norm(ref) <= tol
    assert st_up.flops == 2 * 10 * (rg + ru) * (H + I)
    assert st_down.hbm_write_bytes == 10 * H * np.dtype(dtype).itemsize


def test_svd_mlp_sim_trn2_and_mixed_dtypes():
    """bf16 activations with fp32 factors: the kernels compute in bf16 (factors cast on
    load), the result comes back as float32."""
    fs = mlp_factors(64, 32, 32, 128, 32, np.float32, seed=2)
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(BF16)
    y = launch.svd_mlp_sim(x, *fs, target="trn2")
    ref = mlp_reference(x, *fs)
    assert y.dtype == np.float32
    assert np.linalg.norm(d(y) - ref) / np.linalg.norm(ref) <= 2e-2


def test_empty_batch():
    fs = mlp_factors(64, 32, 32, 128, 32, np.float32)
    y = launch.svd_mlp_sim(np.zeros((0, 64), np.float32), *fs)
    assert y.shape == (0, 64) and y.dtype == np.float32


def test_fused_xuv_sim():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 80)).astype(np.float32)
    u = rng.standard_normal((80, 48)).astype(np.float32)
    v = rng.standard_normal((48, 200)).astype(np.float32)
    y = launch.fused_xuv_sim(x, u, v)
    assert y.shape == (3, 4, 200) and y.dtype == np.float32
    np.testing.assert_allclose(y, d(x) @ d(u) @ d(v), rtol=1e-5, atol=1e-4)
    y_t = launch.fused_xuv_sim(x.reshape(12, 80), u, v, transpose_out=True)
    np.testing.assert_allclose(y_t, (d(x.reshape(12, 80)) @ d(u) @ d(v)).T, rtol=1e-5, atol=1e-4)


def test_input_validation():
    fs = mlp_factors(64, 32, 32, 128, 32, np.float32)
    with pytest.raises(TypeError, match="x: expected float32 or bfloat16, got int64"):
        launch.svd_mlp_sim(np.zeros((2, 64), np.int64), *fs)
    with pytest.raises(TypeError, match="u: expected a numpy array"):
        launch.fused_xuv_sim(np.zeros((2, 8), np.float32), [[1.0]], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="v_down has 63 output features, x has 64"):
        launch.svd_mlp_sim(np.zeros((2, 64), np.float32), *fs[:5], fs[5][:, :63])


@pytest.mark.skipif(nki_compat.REAL_NKI, reason="the Neuron SDK is installed here")
def test_svd_mlp_nki_needs_the_sdk():
    with pytest.raises(RuntimeError, match="needs the Neuron SDK"):
        launch.svd_mlp_nki(*([None] * 7))


def test_kernels_need_neither_torch_nor_the_sdk():
    code = ("import sys; import vllm_neuronmlp.kernels.launch, vllm_neuronmlp.kernels.baselines;"
            "from vllm_neuronmlp.kernels import nki_compat;"
            "assert 'torch' not in sys.modules, 'torch imported';"
            "print(nki_compat.REAL_NKI)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"VLLM_NEURONMLP_FORCE_SIM": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
