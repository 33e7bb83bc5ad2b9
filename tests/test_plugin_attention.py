"""Format v3: factored attention projections served by vLLM (CPU build).

Two halves:

- Engine-less, exact: vLLM's own QKVParallelLinear / RowParallelLinear /
  MergedColumnParallelLinear are built for every rank of tensor parallel sizes
  1, 2, 4 and 8 (vLLM's TP rank and size patched in; no process group), once
  with SVDLinearMethod and the factors, once dense with W = (U V)^T loaded by
  vLLM's own loader. Each rank's factored output must equal its dense shard's
  output, which pins the V column split to vLLM's head split, including kv heads
  replicated when tp > num_kv_heads (2 kv heads at tp 4 and 8). The same harness
  checks that a wrong factor shape and a missing factor are refused by name.
- Engines (marked `engine`): tiny Llama and Qwen3 checkpoints with factored
  attention (layer 0: q/k/v and the MLP factored; layer 1: o factored, the MLP
  narrowed to a width; layer 2: q/k/v and o factored, MLP dense) against their
  dense twin (transformers fp32, `reference_outputs`), four engine starts in all:
  Llama TP 1 eager and TP 2 compiled (GQA 6 q heads / 2 kv heads); Qwen3, with
  4 heads of explicit head_dim 32 (q 128 wide, hidden 192) and one kv head, TP 1
  compiled and TP 2 eager (tp 2 > 1 kv head: vLLM replicates it on both ranks).
"""
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from model_factory import V3_WIDTHS, attention_module, make_dense_and_compressed, mlp_module, v3_ranks
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.mlp_families import GATE, K, O, Q, UP, V
from vllm_runner import load_result, reference_outputs, run_engine

FP32_LOGPROB_TOL = 1e-4  # as tests/test_plugin_vllm.py: float32 roundings only (measured ~2e-6)
EXACT_TOL = 1e-10        # float64 harness: the factored and dense products differ by roundings only
LLAMA = mlp_families.family_for_model_type("llama")


# ---------------------------------------------------------------- engine-less: vLLM's layers, every TP rank
class _OneMethod:
    """The smallest quantization config vLLM's layers accept: it hands out one method."""

    online_quantization_config = None

    def __init__(self, method):
        self.method = method

    def get_quant_method(self, layer, prefix):
        return self.method


@contextmanager
def tensor_parallel(tp, rank):
    """vLLM's TP rank and size as its layers and parameters read them, without a process group."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    with mock.patch.object(linear, "get_tensor_model_parallel_world_size", lambda: tp), \
            mock.patch.object(linear, "get_tensor_model_parallel_rank", lambda: rank), \
            mock.patch.object(parameter, "get_tensor_model_parallel_world_size", lambda: tp), \
            mock.patch.object(parameter, "get_tensor_model_parallel_rank", lambda: rank):
        yield


def svd_method(modules, ranks):
    from vllm_neuronmlp.linear_method import SVDLinearMethod

    return SVDLinearMethod(hf_modules=modules, ranks=ranks, family=LLAMA)


HIDDEN, HEADS, KV_HEADS, HEAD = 64, 8, 2, 8  # q 64 wide, k/v 16 wide
QKV = [attention_module("llama", 0, r) for r in (Q, K, V)]
O_PROJ = attention_module("llama", 0, O)
QKV_RANKS = [32, 16, 24]


def factors(n_in, n_out, r, gen):
    return torch.randn(n_in, r, generator=gen, dtype=torch.float64), torch.randn(r, n_out, generator=gen,
                                                                                   dtype=torch.float64)


def qkv_layer(method, bias=True):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    return QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=bias, params_dtype=torch.float64,
                             quant_config=_OneMethod(method) if method else None)


def load(param, tensor, shard_id=None):
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_qkv_shards_equal_vllms_dense_shards(tp):
    # 8 q heads split over the ranks; 2 kv heads split (tp 2) or replicated (tp 4, 8)
    gen = torch.Generator().manual_seed(tp)
    sizes = {"q": HEADS * HEAD, "k": KV_HEADS * HEAD, "v": KV_HEADS * HEAD}
    fac = {s: factors(HIDDEN, sizes[s], r, gen) for s, r in zip("qkv", QKV_RANKS)}
    bias = {s: torch.randn(sizes[s], generator=gen, dtype=torch.float64) for s in "qkv"}
    x = torch.randn(5, HIDDEN, generator=gen, dtype=torch.float64)
    outputs = []
    for rank in range(tp):
        with tensor_parallel(tp, rank):
            fact, dense = qkv_layer(svd_method(QKV, QKV_RANKS)), qkv_layer(None)
        for s, (u, v) in fac.items():
            load(fact.svd_u, u, s)
            load(fact.svd_v, v, s)
            load(dense.weight, (u @ v).T.contiguous(), s)
            for layer in (fact, dense):
                load(layer.bias, bias[s], s)
        fact.quant_method.process_weights_after_loading(fact)
        assert fact.svd_u.shape == (HIDDEN, sum(QKV_RANKS))  # [U_q | U_k | U_v], replicated
        assert fact.svd_v.numel() == sum(r * n for r, n in zip(QKV_RANKS, fact.output_partition_sizes))  # no zeros
        got = fact.quant_method.apply(fact, x, fact.bias)
        want = torch.nn.functional.linear(x, dense.weight, dense.bias)
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT_TOL)
        outputs.append(got)
    # independent of vLLM's loader: rank t holds q heads [t*h, (t+1)*h) and kv head(s) by the same rule
    full = {s: x @ u @ v + bias[s] for s, (u, v) in fac.items()}
    q_local = HEADS * HEAD // tp
    kv_local = max(KV_HEADS // tp, 1) * HEAD
    for rank, got in enumerate(outputs):
        kv_rank = rank // max(tp // KV_HEADS, 1)
        want = torch.cat([full["q"][:, rank * q_local:(rank + 1) * q_local],
                          full["k"][:, kv_rank * kv_local:(kv_rank + 1) * kv_local],
                          full["v"][:, kv_rank * kv_local:(kv_rank + 1) * kv_local]], dim=-1)
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_o_proj_row_shards_sum_to_the_dense_product(tp):
    from vllm.model_executor.layers.linear import RowParallelLinear

    gen = torch.Generator().manual_seed(10 + tp)
    u, v = factors(HEADS * HEAD, HIDDEN, 32, gen)
    x = torch.randn(5, HEADS * HEAD, generator=gen, dtype=torch.float64)
    total = 0
    for rank in range(tp):
        with tensor_parallel(tp, rank):
            fact = RowParallelLinear(HEADS * HEAD, HIDDEN, bias=False, params_dtype=torch.float64,
                                     quant_config=_OneMethod(svd_method([O_PROJ], [32])))
        load(fact.svd_u, u)
        load(fact.svd_v, v)
        fact.quant_method.process_weights_after_loading(fact)
        assert fact.svd_u.shape == (HEADS * HEAD // tp, 32) and fact.svd_v.shape == (32, HIDDEN)  # U split, V whole
        local = HEADS * HEAD // tp
        total = total + fact.quant_method.apply(fact, x[:, rank * local:(rank + 1) * local])
    torch.testing.assert_close(total, x @ u @ v, rtol=0, atol=EXACT_TOL)  # what the all-reduce adds up


@pytest.mark.parametrize("tp", [1, 2])
def test_gate_up_keeps_its_stacked_layout(tp):
    # The generalized method still stacks equal-width modules' V by rows (the fused MLP op reads it so).
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    gen = torch.Generator().manual_seed(20 + tp)
    inter = 48
    fac = [factors(HIDDEN, inter, r, gen) for r in (32, 16)]
    x = torch.randn(3, HIDDEN, generator=gen, dtype=torch.float64)
    modules = [mlp_module("llama", 0, GATE), mlp_module("llama", 0, UP)]
    for rank in range(tp):
        with tensor_parallel(tp, rank):
            fact = MergedColumnParallelLinear(HIDDEN, [inter, inter], bias=False, params_dtype=torch.float64,
                                              quant_config=_OneMethod(svd_method(modules, [32, 16])))
        for k, (u, v) in enumerate(fac):
            load(fact.svd_u, u, k)
            load(fact.svd_v, v, k)
        assert fact.svd_v.shape == (48, inter // tp)
        local = inter // tp
        want = torch.cat([(x @ u @ v)[:, rank * local:(rank + 1) * local] for u, v in fac], dim=-1)
        torch.testing.assert_close(fact.quant_method.apply(fact, x), want, rtol=0, atol=EXACT_TOL)


def test_wrong_qkv_factor_shape_is_named():
    with tensor_parallel(2, 1):
        fact = qkv_layer(svd_method(QKV, QKV_RANKS), bias=False)
    with pytest.raises(cf.CheckpointFormatError,
                       match=r"tensor model\.layers\.0\.self_attn\.k_proj\.svd_v has shape \[16, 64\], "
                             r"expected \[16, 16\]"):
        load(fact.svd_v, torch.zeros(16, 64, dtype=torch.float64), "k")  # k given q's width


def test_missing_attention_factor_is_named():
    with tensor_parallel(1, 0):
        fact = qkv_layer(svd_method(QKV, QKV_RANKS), bias=False)
    gen = torch.Generator().manual_seed(0)
    for s, r, n in zip("qkv", QKV_RANKS, (64, 16, 16)):
        u, v = factors(HIDDEN, n, r, gen)
        if s != "v":
            load(fact.svd_u, u, s)
        load(fact.svd_v, v, s)
    with pytest.raises(cf.CheckpointFormatError,
                       match=r"the checkpoint lacks model\.layers\.0\.self_attn\.v_proj\.svd_u"):
        fact.quant_method.process_weights_after_loading(fact)


def test_vllm_config_refuses_q_without_k_and_v():
    # What vLLM builds from config.json (SVDNeuronConfig.from_config), before any weight loads.
    from vllm_neuronmlp.quant_config import SVDNeuronConfig

    qc = cf.QuantizationConfig(block_size=16, ranks={QKV[0]: 32, O_PROJ: 16}).to_dict()
    with pytest.raises(cf.CheckpointFormatError,
                       match=r"factors model\.layers\.0\.self_attn\.q_proj but not model\.layers\.0\.self_attn\.k_proj "
                             r"and model\.layers\.0\.self_attn\.v_proj"):
        SVDNeuronConfig.from_config(qc)


# ---------------------------------------------------------------- engines: vLLM serving v3 checkpoints
LAYERS = 3  # the layout of model_factory.v3_ranks: each layer a different mix of factored attention and MLP

MODELS = {"llama": dict(heads=None, kv_heads=2),  # 6 heads of 32 = hidden, GQA 3:1
          "qwen3": dict(heads=4, kv_heads=1)}     # 4 heads of explicit head_dim 32 (q 128 < hidden 192), MQA


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    out = {}
    for arch, heads in MODELS.items():
        root = str(tmp_path_factory.mktemp(f"v3_{arch}"))
        out[arch] = make_dense_and_compressed(root, v3_ranks(arch), V3_WIDTHS, arch, hidden=192, intermediate=256,
                                              layers=LAYERS, **heads)
    return out


@pytest.fixture(scope="module")
def references(twins):
    return {arch: reference_outputs(dense) for arch, (dense, _) in twins.items()}


def test_v3_checkpoints_validate(twins):
    report = cf.validate(twins["qwen3"][1])
    assert report.quant.format_version == cf.ATTENTION_FORMAT_VERSION and report.quant.widths
    assert report.attention_factored[attention_module("qwen3", 0, Q)] == (192, 128, 64)  # 4 heads x 32
    assert report.attention_factored[attention_module("qwen3", 0, K)] == (192, 32, 32)   # 1 kv head x 32
    assert report.attention_factored[attention_module("qwen3", 1, O)] == (128, 192, 64)
    assert len(report.attention_factored) == 8 and len(report.mlp_factored) == 3


@pytest.mark.engine
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("arch,tp,compiled", [("llama", 1, False), ("llama", 2, True),
                                              ("qwen3", 1, True), ("qwen3", 2, False)])
def test_factored_attention_matches_the_dense_twin(arch, tp, compiled, twins, references, tmp_path):
    out = str(tmp_path / "out.json")
    got = load_result(run_engine(twins[arch][1], out, tp=tp, compiled=compiled), out)
    assert got["compilation"]["mode"] != "NONE" if compiled else got["compilation"]["mode"] == "NONE"
    assert got["fused_mlps"] == tp  # layer 0's MLP on each rank; layer 1 (dense gate/up) runs per linear
    want = references[arch]
    assert got["tokens"] == want["tokens"]
    for key in ("logprobs", "prompt_logprobs"):
        diff = max(abs(x - y) for a, b in zip(got[key], want[key]) for x, y in zip(a, b))
        print(f"{arch} tp{tp} {'compiled' if compiled else 'eager'}: max {key} difference {diff:.2e}")
        assert diff < FP32_LOGPROB_TOL
