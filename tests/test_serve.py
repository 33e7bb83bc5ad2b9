"""`vllm serve` on a factored checkpoint (with and without --quantization svd_neuron)
answers an OpenAI-client completion, and `vllm bench serve` runs against it with
zero failed requests. Servers listen on 127.0.0.1 only. They run vLLM's default
compiled path (no --enforce-eager), as a user's `vllm serve` does."""
import pytest

from model_factory import make_dense_and_factored
from vllm_neuronmlp.tools.evaluation.serving import VllmServer, bench_serve

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "256"]


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    return make_dense_and_factored(str(tmp_path_factory.mktemp("serve")), hidden=192, intermediate=200, rank=64)[1]


@pytest.fixture(scope="module", params=[(), ("--quantization", "svd_neuron")], ids=["auto", "flag"])
def server(request, factored, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    with VllmServer(factored, log, served_name="tiny", extra_args=SERVE_ARGS + list(request.param),
                    env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as s:
        yield s


def test_openai_completion(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    assert out.choices[0].text, "empty completion"
    assert "quantization=svd_neuron" in server.log_text()  # the server really took the plugin's method


def test_bench_serve_has_no_failures(server, factored):
    if "--quantization" in server.extra_args:
        pytest.skip("bench runs once, against the server that found svd_neuron in config.json")
    result = bench_serve(server, factored, num_prompts=8, input_len=32, output_len=16, concurrency=4)
    assert result["completed"] == 8
    assert result.get("failed", 0) == 0
    assert result["total_output_tokens"] == 8 * 16
