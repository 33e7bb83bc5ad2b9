"""The svd_neuron plugin inside real vLLM engines (CPU build), on tiny random models.

Every engine runs in its own process (tests/vllm_runner.py) with
`enable_weights_track`. A factored checkpoint and its dense twin with W = U V
exactly must agree: in float32 the greedy tokens are identical and every
logprob is within FP32_LOGPROB_TOL (measured differences are ~1e-6; the two
sides differ only in the order of float32 roundings).
"""
import os

import pytest

from model_factory import edit_checkpoint, make_dense_and_factored
from vllm_neuronmlp import checkpoint_format as fmt
from vllm_runner import load_result, run_engine

FP32_LOGPROB_TOL = 1e-4
LAYERS = 2

pytestmark = pytest.mark.timeout(900)


def max_diff(a, b, key):
    return max(abs(x - y) for ra, rb in zip(a[key], b[key]) for x, y in zip(ra, rb))


def engine(tmp_path, model, tag, **kw):
    out = str(tmp_path / f"{tag}.json")
    return load_result(run_engine(model, out, **kw), out)


def assert_same_outputs(got, want, tol):
    assert got["tokens"] == want["tokens"]
    assert max_diff(got, want, "logprobs") < tol
    assert max_diff(got, want, "prompt_logprobs") < tol


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # MLP sizes that are not multiples of 128: hidden 192, intermediate 200
    return make_dense_and_factored(str(tmp_path_factory.mktemp("llama")), "llama", hidden=192, intermediate=200,
                                   layers=LAYERS, rank=64)


@pytest.fixture(scope="module")
def llama_runs(llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_runs")
    dense, factored = llama
    return {"dense": engine(tmp, dense, "dense"), "factored": engine(tmp, factored, "factored")}


def test_llama_factored_matches_dense_fp32(llama_runs):
    assert llama_runs["factored"]["fused_mlps"] == LAYERS  # every MLP ran as the fused op
    assert llama_runs["dense"]["fused_mlps"] == 0
    assert_same_outputs(llama_runs["factored"], llama_runs["dense"], FP32_LOGPROB_TOL)


def test_qwen3_mixed_ranks_and_a_dense_layer(tmp_path):
    # ranks differ per projection; layer 1 stays dense; intermediate 200 is no multiple of 128
    ranks = {fmt.mlp_module_name(0, fmt.GATE): 64, fmt.mlp_module_name(0, fmt.UP): 32,
             fmt.mlp_module_name(0, fmt.DOWN): 96}
    dense, factored = make_dense_and_factored(str(tmp_path), "qwen3", hidden=192, intermediate=200, layers=LAYERS,
                                              ranks=ranks, factored_layers=[0])
    assert set(fmt.validate(factored).factored) == set(ranks)
    want, got = engine(tmp_path, dense, "dense"), engine(tmp_path, factored, "factored")
    assert got["fused_mlps"] == 1
    assert_same_outputs(got, want, FP32_LOGPROB_TOL)


def test_per_linear_path_matches_fused(llama, llama_runs, tmp_path):
    per_linear = engine(tmp_path, llama[1], "per_linear", env={"VLLM_NEURONMLP_FUSED_MLP": "0"})
    assert per_linear["fused_mlps"] == 0
    assert_same_outputs(per_linear, llama_runs["factored"], FP32_LOGPROB_TOL)


def test_tensor_parallel_2_matches_1(llama, llama_runs, tmp_path):
    tp2 = engine(tmp_path, llama[1], "tp2", tp=2)
    assert tp2["fused_mlps"] == 2 * LAYERS  # each rank runs its shard of every MLP as the fused op
    assert_same_outputs(tp2, llama_runs["factored"], FP32_LOGPROB_TOL)


# bf16 keeps 8 mantissa bits: W = U V rounded once (dense) vs U and V rounded
# separately (factored) moves prompt logprobs by ~2e-2 (bf16) and ~3e-3 (fp16) here.
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.05), ("float16", 0.01)])  # measured 0.017, 0.0026
def test_low_precision_activations(llama, tmp_path, dtype, tol):
    dense = engine(tmp_path, llama[0], f"dense_{dtype}", dtype=dtype)
    factored = engine(tmp_path, llama[1], f"factored_{dtype}", dtype=dtype)
    diff = max_diff(factored, dense, "prompt_logprobs")
    print(f"{dtype}: max prompt logprob difference {diff:.4f}")
    assert diff < tol
    assert [t[0] for t in factored["tokens"]] == [t[0] for t in dense["tokens"]]


def test_nki_sim_backend_matches_torch(llama, llama_runs, tmp_path):
    # The MLP runs through the NKI kernels on the CPU emulator (fp32 tiles, fp32 PSUM).
    sim = engine(tmp_path, llama[1], "nki_sim", env={"VLLM_NEURONMLP_BACKEND": "nki-sim"})
    assert sim["fused_mlps"] == LAYERS
    assert_same_outputs(sim, llama_runs["factored"], FP32_LOGPROB_TOL)
