"""Gemma 3 served by the svd_neuron plugin (vLLM's CPU build).

- Engine-less, exact: vLLM's own `Gemma3MLP` (its merged gate/up, row-parallel down and
  GELU-tanh activation module) is built with the plugin's method on every rank of tensor
  parallel sizes 1 and 2 (rank and size patched in, no process group; the all-reduce is
  the sum over ranks), factored at the full width and narrowed to a width (format v2).
  The registration hook must turn each into the fused `svd_mlp` op, and the ranks' outputs
  must add up to a float64 reference with the tanh-approximated GELU.
- One engine (marked `engine`): a tiny random Gemma 3 (sliding-window and global layers,
  window 8 below the prompts' lengths; q/k norms; 4 q heads, 1 kv head) compressed in the
  format-v3 mix of tests/model_factory.py (factored q/k/v and o, a factored MLP, a narrowed
  MLP) against its dense twin run by transformers in float32, TP 1 eager.
"""
from unittest import mock

import numpy as np
import pytest
import torch

from model_factory import V3_WIDTHS, make_dense_and_compressed, mlp_module, v3_ranks
from test_plugin_attention import FP32_LOGPROB_TOL, load, tensor_parallel
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.mlp_families import DOWN, GATE, UP

GEMMA3 = mlp_families.family_for_model_type("gemma3_text")
HIDDEN, INTER = 64, 96
RANKS = {GATE: 32, UP: 16, DOWN: 24}


class _ByPrefix:
    """A quantization config handing each vLLM linear the plugin's method for its HF modules."""

    online_quantization_config = None

    def __init__(self, width):
        self.width = width

    def get_quant_method(self, layer, prefix):
        from vllm_neuronmlp.linear_method import SVDLinearMethod

        roles = (GATE, UP) if prefix.endswith("gate_up_proj") else (DOWN,)
        return SVDLinearMethod([mlp_module("gemma3_text", 0, r) for r in roles], [RANKS[r] for r in roles],
                               family=GEMMA3, width=self.width)


def gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("width", [None, 64])
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_gemma3_mlp_runs_the_fused_gelu_tanh_op_on_every_rank(tp, width):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.gemma3 import Gemma3MLP

    from vllm_neuronmlp.mlp_fusion import install_mlp_fusion

    install_mlp_fusion()
    k = width or INTER
    gen = torch.Generator().manual_seed(tp)
    fac = {}
    for role, (n_in, n_out) in {GATE: (HIDDEN, k), UP: (HIDDEN, k), DOWN: (k, HIDDEN)}.items():
        fac[role] = (torch.randn(n_in, RANKS[role], generator=gen, dtype=torch.float64) / n_in ** 0.5,
                     torch.randn(RANKS[role], n_out, generator=gen, dtype=torch.float64) / RANKS[role] ** 0.5)
    x = torch.randn(5, HIDDEN, generator=gen, dtype=torch.float64)
    total = 0
    for rank in range(tp):
        with tensor_parallel(tp, rank), set_current_vllm_config(VllmConfig()):
            torch.set_default_dtype(torch.float64)
            try:
                mlp = Gemma3MLP(HIDDEN, INTER, "gelu_pytorch_tanh", quant_config=_ByPrefix(width), prefix="mlp")
            finally:
                torch.set_default_dtype(torch.float32)
        assert hasattr(mlp, "_svd_unfused_forward")  # the registration hook installed the fused op
        for shard, role in enumerate((GATE, UP)):
            load(mlp.gate_up_proj.svd_u, fac[role][0], shard)
            load(mlp.gate_up_proj.svd_v, fac[role][1], shard)
        load(mlp.down_proj.svd_u, fac[DOWN][0])
        load(mlp.down_proj.svd_v, fac[DOWN][1])
        for lin in (mlp.gate_up_proj, mlp.down_proj):
            lin.quant_method.process_weights_after_loading(lin)
        with mock.patch("vllm.distributed.tensor_model_parallel_all_reduce", lambda y: y):  # the rank's share
            total = total + mlp(x)
    d = {role: (u @ v).numpy() for role, (u, v) in fac.items()}
    xd = x.numpy()
    want = (gelu_tanh(xd @ d[GATE]) * (xd @ d[UP])) @ d[DOWN]
    np.testing.assert_allclose(total.numpy(), want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- one engine
@pytest.mark.engine
@pytest.mark.timeout(900)
def test_compressed_gemma3_matches_its_dense_twin_in_vllm(tmp_path):
    from test_plugin_vllm import assert_same_outputs, engine
    from vllm_runner import PROMPTS, reference_outputs

    from model_factory import GEMMA3_SLIDING_WINDOW

    assert max(len(p) for p in PROMPTS) + 8 > GEMMA3_SLIDING_WINDOW  # the window cuts the longer prompts
    dense, compressed = make_dense_and_compressed(str(tmp_path), v3_ranks("gemma3_text"), V3_WIDTHS,
                                                  arch="gemma3_text", hidden=128, intermediate=256, layers=3,
                                                  heads=4, kv_heads=1)
    got = engine(tmp_path, compressed, "compressed")
    assert got["fused_mlps"] == 1  # layer 0's factored MLP; layer 1's is narrowed dense, layer 2's dense
    assert got["compilation"]["mode"] == "NONE"
    assert_same_outputs(got, reference_outputs(dense), FP32_LOGPROB_TOL)
