"""`vllm serve` on a factored checkpoint (with and without --quantization svd_neuron)
answers an OpenAI-client completion, and `vllm bench serve` runs against it with
zero failed requests. Servers listen on 127.0.0.1 only."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from model_factory import make_dense_and_factored

pytestmark = pytest.mark.timeout(900)
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, log_path: str, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = subprocess.Popen(
            [VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
             "--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.log_path = log_path

    def wait_ready(self, timeout=420):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"vllm serve not ready after {timeout}s:\n{self.tail()}")

    def tail(self, chars=5000):
        self.log.flush()
        with open(self.log_path) as f:
            text = f.read()
        return text[-chars:] if chars else text

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    return make_dense_and_factored(str(tmp_path_factory.mktemp("serve")), hidden=192, intermediate=200, rank=64)[1]


@pytest.fixture(scope="module", params=[(), ("--quantization", "svd_neuron")], ids=["auto", "flag"])
def server(request, factored, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    s = Server(factored, log, request.param)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_openai_completion(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    assert out.choices[0].text, "empty completion"
    assert "quantization=svd_neuron" in server.tail(None)  # the server really took the plugin's method


def test_bench_serve_has_no_failures(server, factored, tmp_path):
    if "--quantization" in server.proc.args:
        pytest.skip("bench once, against the auto-detected server")
    cmd = [VLLM, "bench", "serve", "--backend", "vllm", "--base-url", server.url, "--model", "tiny",
           "--tokenizer", factored, "--dataset-name", "random", "--random-input-len", "32",
           "--random-output-len", "16", "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    assert result["completed"] == 8
    assert result.get("failed", 0) == 0
    assert result["total_output_tokens"] == 8 * 16
