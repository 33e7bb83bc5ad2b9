"""kernels.launch: the host-side helpers the plugin calls, and the kernels package's
dependency promise (numpy + ml_dtypes only, no torch)."""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import blocking, launch, nki_compat, sim, strip_plan, xuv

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


def test_fused_xuv_sim_with_a_given_block(monkeypatch):
    """block_m given: xuv.fused_xuv runs with it (three strips of 128 for 300 tokens, so
    U and V are read three times) and the values are right; without it, the kernel at the
    selector's block."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 80)).astype(np.float32)
    u = rng.standard_normal((80, 48)).astype(np.float32)
    v = rng.standard_normal((48, 200)).astype(np.float32)
    runs = []

    def recording_run(kernel, *arrays, **kwargs):
        out, st = sim.run(kernel, *arrays, **kwargs)
        runs.append((kernel, kwargs.get("block_m"), st.hbm_read_bytes))
        return out, st

    monkeypatch.setattr(launch, "run", recording_run)
    np.testing.assert_allclose(launch.fused_xuv_sim(x, u, v, block_m=128), d(x) @ d(u) @ d(v),
                               rtol=1e-5, atol=1e-4)
    launch.fused_xuv_sim(x, u, v)
    weights = 80 * 48 + 48 * 200
    picked = blocking.select_block_m(strip_plan.xuv_shape(300, 80, 48, 200, e=4), "trn1")
    assert runs == [(xuv.fused_xuv, 128, 4 * (300 * 80 + 3 * weights)),
                    (blocking.fused_xuv, None, 4 * (300 * 80 + -(-300 // picked) * weights))]


def test_input_validation():
    fs = mlp_factors(64, 32, 32, 128, 32, np.float32)
    with pytest.raises(TypeError, match="x: expected float32 or bfloat16, got int64"):
        launch.svd_mlp_sim(np.zeros((2, 64), np.int64), *fs)
    with pytest.raises(TypeError, match="u: expected a numpy array"):
        launch.fused_xuv_sim(np.zeros((2, 8), np.float32), [[1.0]], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="v_down has 63 output features, x has 64"):
        launch.svd_mlp_sim(np.zeros((2, 64), np.float32), *fs[:5], fs[5][:, :63])


@pytest.mark.skipif(nki_compat.REAL_NKI, reason="the Neuron SDK is installed here")
def test_device_path_without_the_sdk_says_why_and_falls_back_once(caplog):
    import torch

    with pytest.raises(launch.DeviceUnavailable, match=r"Neuron SDK's `nki` \(with nki.jit\) is not importable"):
        launch.svd_mlp_nki(*([None] * 7))
    fs = [torch.from_numpy(a) for a in mlp_factors(64, 32, 32, 128, 32, np.float32)]
    x = torch.zeros(3, 64)
    assert launch.device_support(x, *fs) == (False, "the Neuron SDK's `nki` (with nki.jit) is not importable")
    launch._fallbacks_logged.clear()
    with caplog.at_level("WARNING", logger=launch.__name__):
        for _ in range(3):
            assert launch.svd_mlp(x, *fs, fallback=lambda: "torch result") == "torch result"
    said = [r for r in caplog.records if "torch fallback" in r.getMessage()]
    assert len(said) == 1 and "svd_mlp" in said[0].getMessage() and "not importable" in said[0].getMessage()


def test_logical_nc_config(monkeypatch):
    monkeypatch.delenv(launch.LNC_ENV, raising=False)
    assert launch.logical_nc_config() == 2                      # neuronx-cc's default on Trn2+
    monkeypatch.setenv(launch.LNC_ENV, "1")
    assert launch.logical_nc_config() == 1
    assert launch.logical_nc_config(lambda: "2") == 2           # TorchNeuron's own answer wins
    monkeypatch.setenv(launch.LNC_ENV, "4")
    with pytest.raises(ValueError, match="NEURON_LOGICAL_NC_CONFIG='4': the logical NeuronCore degree is 1 or 2"):
        launch.logical_nc_config()


def test_kernels_need_neither_torch_nor_the_sdk():
    code = ("import sys; import vllm_neuronmlp.kernels.launch, vllm_neuronmlp.kernels.baselines;"
            "from vllm_neuronmlp.kernels import nki_compat;"
            "assert 'torch' not in sys.modules, 'torch imported';"
            "print(nki_compat.REAL_NKI)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"VLLM_NEURONMLP_FORCE_SIM": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- issue 22, point 2: launch like upstream
def _mlp_inputs(seed=7):
    import torch

    fs = mlp_factors(64, 32, 32, 128, 32, np.float32, seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((2, 3, 64)).astype(np.float32)
    return x, fs, torch.from_numpy(x), [torch.from_numpy(a) for a in fs]


def test_lite_runtime_is_taken_first_and_its_kernels_called_with_the_grid(monkeypatch):
    """Both runtimes installed: `wrap_nki` comes from vllm-neuron's lite runtime
    (libtorch_neuronx_lite.nki.nki_hop, as its functional/mlp.py imports it), the wrapped
    kernels are called directly with the grid, and nothing is registered with `nki_op`."""
    from neuron_standins import install_runtimes, pretend_neuron_host

    pretend_neuron_host(monkeypatch)
    monkeypatch.delenv(launch.LNC_ENV, raising=False)
    runtimes = install_runtimes(monkeypatch, "lite", "torch_neuronx", logical_cores=1)
    x, fs, xt, ft = _mlp_inputs()
    y = launch.svd_mlp_nki(xt, *ft)
    lite, tnx = runtimes["lite"], runtimes["torch_neuronx"]
    assert lite.launches == [("up_gate", (2,)), ("down", (2,))]     # lite has no LNC query: env, else 2
    assert not tnx.launches and not tnx.registered and not tnx.wrapped
    ref = mlp_reference(x.reshape(6, 64), *fs).reshape(2, 3, 64)
    assert np.linalg.norm(d(y.numpy()) - ref) / np.linalg.norm(ref) <= 2e-6
    launch.svd_mlp_nki(xt, *ft)
    assert sorted(lite.wrapped) == ["down", "up_gate"]              # wrapped once, launched every call


def test_torch_neuronx_runtime_when_the_lite_one_is_absent(monkeypatch):
    from neuron_standins import install_runtimes, pretend_neuron_host

    pretend_neuron_host(monkeypatch)
    runtimes = install_runtimes(monkeypatch, "torch_neuronx", logical_cores=1)
    x, fs, xt, ft = _mlp_inputs(seed=9)
    y = launch.svd_mlp_nki(xt, *ft)
    tnx = runtimes["torch_neuronx"]
    assert tnx.launches == [("up_gate", (1,)), ("down", (1,))]     # torch_neuronx.utils' LNC
    assert tnx.registered == []                                     # called directly, as upstream does
    ref = mlp_reference(x.reshape(6, 64), *fs).reshape(2, 3, 64)
    assert np.linalg.norm(d(y.numpy()) - ref) / np.linalg.norm(ref) <= 2e-6


def test_host_without_a_torchneuron_runtime_falls_back_with_a_clear_message(monkeypatch, caplog):
    from neuron_standins import install_runtimes, pretend_neuron_host

    pretend_neuron_host(monkeypatch)
    install_runtimes(monkeypatch)                                   # neither installed
    _, _, xt, ft = _mlp_inputs()
    ok, reason = launch.device_support(xt, *ft)
    assert not ok
    assert "no TorchNeuron runtime with `wrap_nki`" in reason
    assert "libtorch_neuronx_lite.nki.nki_hop" in reason and "torch_neuronx.nki_hop" in reason
    with pytest.raises(launch.DeviceUnavailable, match=r"no TorchNeuron runtime with `wrap_nki`"):
        launch.svd_mlp_nki(xt, *ft)
    launch._fallbacks_logged.clear()
    with caplog.at_level("WARNING", logger=launch.__name__):
        assert launch.svd_mlp(xt, *ft, fallback=lambda: "aten") == "aten"
    said = [r.getMessage() for r in caplog.records if "torch fallback" in r.getMessage()]
    assert len(said) == 1 and "no TorchNeuron runtime with `wrap_nki`" in said[0]


def test_the_entry_point_is_logged_once_per_process(monkeypatch, caplog):
    from neuron_standins import install_runtimes, pretend_neuron_host

    pretend_neuron_host(monkeypatch)
    install_runtimes(monkeypatch, "lite")
    _, _, xt, ft = _mlp_inputs()
    with caplog.at_level("INFO", logger=launch.__name__):
        for _ in range(3):
            launch.svd_mlp_nki(xt, *ft)
            launch.fused_xuv_nki(xt, ft[0], ft[1])
    said = [r.getMessage() for r in caplog.records if "NKI kernels are launched through" in r.getMessage()]
    assert len(said) == 1
    assert "libtorch_neuronx_lite.nki.nki_hop.wrap_nki" in said[0] and "grid (2,)" in said[0]
    assert launch.entry_point() == said[0].split("launched through ", 1)[1]
