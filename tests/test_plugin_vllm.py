"""The svd_neuron plugin inside real vLLM engines (CPU build), on tiny random models.

Every engine runs in its own process (tests/vllm_runner.py) with
`enable_weights_track`. A factored checkpoint and its dense twin with W = U V
exactly must agree: in float32 the greedy tokens are identical and every
logprob is within FP32_LOGPROB_TOL (measured differences are ~2e-6; the two
sides differ only in the order of float32 roundings).

Engine start-ups are what these tests cost, so each engine serves several
checks, and the float32 dense twin is run by transformers (`reference_outputs`,
which matches a dense vLLM engine to ~2e-6) rather than by another engine.
One model per MLP family: Llama, Qwen3, Qwen2 and Gemma (GELU-tanh) eager, Mistral
on vLLM's default compiled path (torch.compile, inductor), which `vllm serve` runs.
"""
import pytest

from model_factory import make_dense_and_factored, mlp_module
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.mlp_families import DOWN, GATE, UP
from vllm_runner import load_result, reference_outputs, run_engine

FP32_LOGPROB_TOL = 1e-4
LAYERS = 2

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


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
    return {"dense": reference_outputs(dense), "factored": engine(tmp, factored, "factored")}


def test_llama_factored_matches_dense_fp32(llama_runs):
    assert llama_runs["factored"]["fused_mlps"] == LAYERS  # every MLP ran as the fused op
    assert llama_runs["factored"]["compilation"]["mode"] == "NONE"  # eager
    assert_same_outputs(llama_runs["factored"], llama_runs["dense"], FP32_LOGPROB_TOL)


def mixed_ranks(arch):
    """Layer 0's ranks, different per projection (other layers take the default rank or stay dense)."""
    return {mlp_module(arch, 0, GATE): 64, mlp_module(arch, 0, UP): 32, mlp_module(arch, 0, DOWN): 96}


def test_qwen3_mixed_ranks_and_a_dense_layer(tmp_path):
    # ranks differ per projection; layer 1 stays dense; intermediate 200 is no multiple of 128
    ranks = mixed_ranks("qwen3")
    dense, factored = make_dense_and_factored(str(tmp_path), "qwen3", hidden=192, intermediate=200, layers=LAYERS,
                                              ranks=ranks, factored_layers=[0])
    assert set(cf.validate(factored).factored) == set(ranks)
    got = engine(tmp_path, factored, "factored")
    assert got["fused_mlps"] == 1
    assert_same_outputs(got, reference_outputs(dense), FP32_LOGPROB_TOL)


def test_qwen2_factored_matches_dense_fp32(tmp_path):
    # Qwen2: biased q/k/v projections next to the factored, bias-free MLP
    dense, factored = make_dense_and_factored(str(tmp_path), "qwen2", hidden=192, intermediate=200, layers=LAYERS,
                                              rank=64)
    got = engine(tmp_path, factored, "factored")
    assert got["fused_mlps"] == LAYERS
    assert_same_outputs(got, reference_outputs(dense), FP32_LOGPROB_TOL)


def test_gemma_gelu_tanh_family_runs_fused(tmp_path):
    # The fused op computes the tanh-approximated GELU too: every factored MLP runs as one op
    dense, factored = make_dense_and_factored(str(tmp_path), "gemma", hidden=192, intermediate=200, layers=LAYERS,
                                              rank=64)
    got = engine(tmp_path, factored, "factored")
    assert got["fused_mlps"] == LAYERS
    assert_same_outputs(got, reference_outputs(dense), FP32_LOGPROB_TOL)


# ---- vLLM's default compiled path (what `vllm serve` runs), on the Mistral family
@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return make_dense_and_factored(str(tmp_path_factory.mktemp("mistral")), "mistral", hidden=192, intermediate=200,
                                   layers=LAYERS, rank=64, ranks=mixed_ranks("mistral"))


@pytest.fixture(scope="module")
def mistral_compiled_runs(mistral, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mistral_runs")
    dense, factored = mistral
    return {"dense": reference_outputs(dense),
            "fused": engine(tmp, factored, "compiled_fused", compiled=True),
            "per_linear": engine(tmp, factored, "compiled_per_linear", compiled=True,
                                 env={"VLLM_NEURONMLP_FUSED_MLP": "0"})}


def assert_compiled(run):
    # vLLM's CPU platform turns its default compile mode into one Dynamo trace
    # compiled by inductor (vllm/platforms/cpu.py); eager would say "NONE".
    assert run["compilation"] == {"mode": "DYNAMO_TRACE_ONCE", "backend": "inductor"}


def test_compiled_factored_matches_dense_fp32(mistral_compiled_runs):
    fused = mistral_compiled_runs["fused"]
    assert_compiled(fused)
    assert fused["fused_mlps"] == LAYERS
    assert_same_outputs(fused, mistral_compiled_runs["dense"], FP32_LOGPROB_TOL)


def test_compiled_per_linear_path_matches_fused(mistral_compiled_runs):
    per_linear = mistral_compiled_runs["per_linear"]
    assert_compiled(per_linear)
    assert per_linear["fused_mlps"] == 0
    assert_same_outputs(per_linear, mistral_compiled_runs["fused"], FP32_LOGPROB_TOL)
    assert_same_outputs(per_linear, mistral_compiled_runs["dense"], FP32_LOGPROB_TOL)


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
