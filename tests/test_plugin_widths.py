"""Format v2 (per-layer intermediate widths) served by vLLM: a narrowed checkpoint
equals its full-width dense twin (tests/model_factory.make_dense_and_narrowed,
whose dropped channels feed zero down-projection columns).

Two engines cover the matrix: Llama at TP 1 eager and Qwen3 at TP 2 on vLLM's
default compiled path. In each, layer 0 is narrowed and fully factored (the
fused svd_mlp op at the narrowed width), layer 1 narrowed with dense gate/up and
a factored down (the per-linear path, NarrowedDenseMethod + SVDLinearMethod).
"""
import pytest

from model_factory import make_dense_and_narrowed, mlp_module
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.mlp_families import DOWN, GATE, UP
from vllm_runner import load_result, reference_outputs, run_engine

FP32_LOGPROB_TOL = 1e-4
pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


@pytest.mark.parametrize("arch,tp,compiled", [("llama", 1, False), ("qwen3", 2, True)])
def test_narrowed_checkpoint_matches_its_dense_twin(arch, tp, compiled, tmp_path):
    ranks = {mlp_module(arch, 0, role): 32 for role in (GATE, UP, DOWN)}
    ranks[mlp_module(arch, 1, DOWN)] = 64
    dense, narrowed = make_dense_and_narrowed(str(tmp_path), {0: 128, 1: 192}, arch, hidden=192, intermediate=256,
                                              ranks=ranks)
    assert cf.validate(narrowed).quant.format_version == 2
    out = str(tmp_path / "out.json")
    got = load_result(run_engine(narrowed, out, tp=tp, compiled=compiled), out)
    assert got["fused_mlps"] >= 1  # layer 0 ran as the fused op (counted per rank's model)
    assert got["compilation"]["mode"] != "NONE" if compiled else got["compilation"]["mode"] == "NONE"
    want = reference_outputs(dense)
    assert got["tokens"] == want["tokens"]
    for key in ("logprobs", "prompt_logprobs"):
        assert max(abs(x - y) for a, b in zip(got[key], want[key]) for x, y in zip(a, b)) < FP32_LOGPROB_TOL
