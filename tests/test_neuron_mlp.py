"""The Trainium variant's MLP on CPU: tensor-parallel sharding of the factors is exact, and
its forward equals `ops.svd_mlp` (torch backend and the NKI emulator).

Unit tests of our logic; the vllm-neuron collectives and checkpoint reader are the
stand-ins of tests/neuron_standins.py (not an integration test: vllm-neuron cannot be
installed here)."""
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from neuron_standins import FakeGroup, read_checkpoint_like_vllm_neuron
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families, ops
from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP
from vllm_neuronmlp.neuron.sharding import SVDShardingError

H, I, S = 64, 256, 12
RANKS = {"gate": 32, "up": 48, "down": 32}
LLAMA = mlp_families.family_for_model_type("llama")
PREFIX = "model.layers.0.mlp"
# fp32 against a float64 reference built from the dense W = U V: relative to the output's
# largest value, summation order alone moves fp32 results by ~1e-6.
TOL = 1e-5


def _factors(seed=0, dense=(), inter=I):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for role, proj in zip(mlp_families.ROLES, LLAMA.projections):
        n_in, n_out = (H, inter) if role != "down" else (inter, H)
        name = f"{PREFIX}.{proj}"
        u = torch.randn(n_in, RANKS[role], generator=g, dtype=torch.float64) / n_in ** 0.5
        v = torch.randn(RANKS[role], n_out, generator=g, dtype=torch.float64) / RANKS[role] ** 0.5
        if role in dense:
            t[f"{name}.weight"] = (u @ v).T.contiguous().float()     # HF layout [out, in]
        else:
            t[f"{name}.svd_u"], t[f"{name}.svd_v"] = u.float(), v.float()
    return t


def _dense_reference(tensors, x):
    def w(proj):
        name = f"{PREFIX}.{proj}"
        if f"{name}.weight" in tensors:
            return tensors[f"{name}.weight"].double().T
        return tensors[f"{name}.svd_u"].double() @ tensors[f"{name}.svd_v"].double()  # W = U V
    g, u, d = (w(p) for p in LLAMA.projections)
    xd = x.double()
    return (F.silu(xd @ g) * (xd @ u)) @ d


def _rank_mlp(ckpt_dir, tp, rank, gathered=None, dense=(), width=None):
    """Rank `rank` of `tp`, loaded like vllm-neuron's reader does; `width`: a format-v2 narrowed layer."""
    group = FakeGroup(tp, rank, gathered)
    ranks = {r: (None if r in dense else RANKS[r]) for r in mlp_families.ROLES}
    mlp = SVDNeuronMLP(layer=0, family=LLAMA, hidden_size=H, intermediate_size=width or I, ranks=ranks,
                       tp_group=group, mlp_tp_group=group, mlp_tp_rank=rank, mlp_tp_size=tp, dtype=torch.float32,
                       narrowed=width is not None)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.model.layers[0].mlp = mlp
    read_checkpoint_like_vllm_neuron(holder, ckpt_dir, mappings={}, rank=999)  # rank ignored: the MLP group's own
    mlp.finalize()
    return mlp, group


def _write(tmp_path, tensors):
    d = str(tmp_path)
    save_file(tensors, os.path.join(d, "model.safetensors"))
    return d


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_decode_partials_sum_to_dense_mlp(tmp_path, tp):
    tensors = _factors()
    ckpt = _write(tmp_path, tensors)
    x = torch.randn(S, H, generator=torch.Generator().manual_seed(5))
    total = 0
    for rank in range(tp):
        mlp, group = _rank_mlp(ckpt, tp, rank)
        gate = mlp.gate_proj
        assert tuple(gate.svd_u.shape) == (H, RANKS["gate"]) and tuple(gate.svd_v.shape) == (RANKS["gate"], I // tp)
        assert tuple(mlp.down_proj.svd_u.shape) == (I // tp, RANKS["down"])
        assert tuple(mlp.down_proj.svd_v.shape) == (RANKS["down"], H)
        y = mlp(x, is_prefill=False)
        assert len(group.partials) == (1 if tp > 1 else 0)   # decode all-reduces over the MLP TP group
        total = total + y
    assert _rel(total, _dense_reference(tensors, x)) < TOL


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_prefill_gathers_tokens_and_reduce_scatters(tmp_path, tp):
    tensors = _factors(seed=1)
    ckpt = _write(tmp_path, tensors)
    x = torch.randn(S * tp, H, generator=torch.Generator().manual_seed(6))
    partials, outs = [], []
    for rank in range(tp):
        mlp, group = _rank_mlp(ckpt, tp, rank, gathered=x)
        outs.append(mlp(x.chunk(tp)[rank], is_prefill=True))   # each rank holds its token chunk
        partials += group.partials
    assert len(partials) == tp and all(o.shape == (S, H) for o in outs)
    summed = sum(partials)   # the reduce-scatter's sum; rank r keeps chunk r
    ref = _dense_reference(tensors, x)
    assert _rel(summed, ref) < TOL


def test_mixed_layer_dense_down(tmp_path):
    """A layer whose down projection stayed dense (the compressor keeps a module dense
    when factoring saves nothing) still shards exactly."""
    tensors = _factors(seed=2, dense=("down",))
    ckpt = _write(tmp_path, tensors)
    x = torch.randn(S, H, generator=torch.Generator().manual_seed(7))
    total = sum(_rank_mlp(ckpt, 4, r, dense=("down",))[0](x, is_prefill=False) for r in range(4))
    assert _rel(total, _dense_reference(tensors, x)) < TOL


@pytest.mark.parametrize("dense", [(), ("down",), ("gate", "up", "down")], ids=["factored", "dense-down", "dense"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_narrowed_layer_shards_by_its_width(tmp_path, tp, dense):
    """Format v2: a layer kept at K < I channels, factored or dense, splits K (not I) over
    the ranks; decode partials and prefill's reduce-scatter both sum to its dense MLP."""
    K = 96
    tensors = _factors(seed=10, dense=dense, inter=K)
    ckpt = _write(tmp_path, tensors)
    x = torch.randn(S * tp, H, generator=torch.Generator().manual_seed(11))
    decode, prefill = 0, 0
    for rank in range(tp):
        mlp, group = _rank_mlp(ckpt, tp, rank, gathered=x, dense=dense, width=K)
        assert mlp.intermediate_size_per_rank == K // tp and mlp.fused == (not dense)
        down = mlp.down_proj.weight if "down" in dense else mlp.down_proj.svd_u
        assert down.shape[0] == K // tp                           # row-parallel down: K/tp rows here
        decode = decode + mlp(x, is_prefill=False)
        mlp(x.chunk(tp)[rank], is_prefill=True)
        prefill = prefill + (group.partials[-1] if tp > 1 else mlp(x, is_prefill=True))
    ref = _dense_reference(tensors, x)
    assert _rel(decode, ref) < TOL and _rel(prefill, ref) < TOL


def test_narrowed_width_that_does_not_divide_is_a_named_error():
    group = FakeGroup(5, 0)
    with pytest.raises(cf.TensorParallelError,
                       match=r"model\.layers\.0\.mlp: width \(its quantization_config\.widths\) "
                             r"\(split over the MLP's tensor-parallel degree, "
                   r"tensor_parallel_size x mlp_dp_size\) is 96, which does not split over tensor parallel size 5"):
        SVDNeuronMLP(layer=0, family=LLAMA, hidden_size=H, intermediate_size=96, ranks=RANKS, tp_group=group,
                     mlp_tp_group=group, mlp_tp_rank=0, mlp_tp_size=5, dtype=torch.float32, narrowed=True)


def test_tp_degree_that_does_not_divide_is_a_named_error():
    group = FakeGroup(3, 0)
    with pytest.raises(SVDShardingError, match=r"model\.layers\.0\.mlp: intermediate_size "
                                               r"\(split over the MLP's tensor-parallel degree, "
                   r"tensor_parallel_size x mlp_dp_size\) is 256, which does not split over tensor parallel size 3"):
        SVDNeuronMLP(layer=0, family=LLAMA, hidden_size=H, intermediate_size=I, ranks=RANKS, tp_group=group,
                     mlp_tp_group=group, mlp_tp_rank=0, mlp_tp_size=3, dtype=torch.float32)


def test_forward_equals_ops_svd_mlp_torch_and_emulator(tmp_path, monkeypatch):
    tensors = _factors(seed=3)
    ckpt = _write(tmp_path, tensors)
    x = torch.randn(S, H, generator=torch.Generator().manual_seed(8))
    mlp, _ = _rank_mlp(ckpt, 1, 0)
    t = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: v for k, v in tensors.items()}
    args = (torch.cat([t["gate_proj.svd_u"], t["up_proj.svd_u"]], 1),
            torch.cat([t["gate_proj.svd_v"], t["up_proj.svd_v"]], 0),
            t["down_proj.svd_u"], t["down_proj.svd_v"], RANKS["gate"])
    ours_torch = mlp(x, is_prefill=False)
    torch.testing.assert_close(ours_torch, ops.svd_mlp(x, *args, backend="torch"), rtol=0, atol=0)
    monkeypatch.setenv(ops.BACKEND_ENV, "nki-sim")   # the same NKI kernels, run by the CPU emulator
    mlp.finalize()                                   # the path is decided after loading
    assert mlp.compute_path == "nki-sim"
    ours_sim = mlp(x, is_prefill=False)
    torch.testing.assert_close(ours_sim, ops.svd_mlp(x, *args, backend="nki-sim"), rtol=0, atol=0)
    assert _rel(ours_sim, _dense_reference(tensors, x)) < TOL


def test_bad_shape_and_non_finite_factor_are_named(tmp_path):
    tensors = _factors(seed=4)
    tensors[f"{PREFIX}.up_proj.svd_v"] = tensors[f"{PREFIX}.up_proj.svd_v"][:, :-1].contiguous()
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.svd_v has shape \[48, 255\], "
                                         r"expected \[48, 256\]"):
        _rank_mlp(_write(tmp_path, tensors), 2, 0)
    tensors = _factors(seed=4)
    tensors[f"{PREFIX}.down_proj.svd_u"][3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.svd_u has non-finite values"):
        _rank_mlp(_write(tmp_path, tensors), 1, 0)


def test_kernel_path_is_chosen_once_and_takes_the_four_factors(tmp_path, monkeypatch):
    """Where the device kernels can run, finalize() picks them and the forward hands the
    separate factors to the launcher (no side-by-side copy). The device here is stood in
    by the emulator behind `launch.svd_mlp_nki`; see test_kernels_launch for the launch
    itself. Where they cannot, the torch fallback is said once in the log."""
    import numpy as np

    from vllm_neuronmlp.kernels import launch

    tensors = _factors(seed=5)
    ckpt = _write(tmp_path, tensors)
    calls = []

    def device_standin(x, *factors):
        calls.append([tuple(f.shape) for f in factors])
        y = launch.svd_mlp_sim(x.numpy(), *[f.numpy() for f in factors])
        return torch.from_numpy(np.asarray(y))

    monkeypatch.setattr(ops, "select_backend", lambda device, requested=None: "nki")
    monkeypatch.setattr(launch, "device_support", lambda *t: (True, ""))
    monkeypatch.setattr(launch, "svd_mlp_nki", device_standin)
    mlp, _ = _rank_mlp(ckpt, 2, 1)
    assert mlp.compute_path == "kernels" and not list(mlp.buffers())   # no side-by-side copy
    x = torch.randn(S, H, generator=torch.Generator().manual_seed(9))
    partial = mlp(x, is_prefill=False)
    assert calls == [[(H, 32), (32, I // 2), (H, 48), (48, I // 2), (I // 2, 32), (32, H)]]
    other, _ = _rank_mlp(ckpt, 2, 0)
    assert _rel(partial + other(x, is_prefill=False), _dense_reference(tensors, x)) < TOL

    monkeypatch.setattr(launch, "device_support", lambda *t: (False, "tensors are on device cpu, not a Neuron device"))
    launch._fallbacks_logged.clear()
    with pytest.MonkeyPatch.context() as m:
        records = []
        m.setattr(launch.logger, "warning", lambda *a: records.append(a[0] % a[1:]))
        mlp.finalize()
        mlp.finalize()
    assert mlp.compute_path == "torch" and len(records) == 1 and "not a Neuron device" in records[0]
