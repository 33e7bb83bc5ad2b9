"""`make neuron-check` on a machine without the Neuron SDK: exits 0, reports the emulator
results, lists every hardware step as skipped with the reason (CI runs it so the script
cannot rot). Quick mode keeps it to seconds."""
import json
import os
import subprocess
import sys

import pytest

from vllm_neuronmlp.kernels import nki_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import neuron_check  # noqa: E402

HARDWARE_STEPS = ("device-kernels", "device-timing", "serve-accuracy", "serve-variant", "serve-bench")


@pytest.mark.slow
@pytest.mark.skipif(nki_compat.REAL_NKI, reason="the Neuron SDK is installed: the hardware steps would run")
def test_make_neuron_check_without_the_sdk(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["make", "-s", "neuron-check", f"NEURON_PY={sys.executable}",
                           f"NEURON_CHECK_ARGS=--quick --out {out} --work {tmp_path / 'work'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "VIRTUAL_ENV": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "quick mode" in proc.stdout
    assert "NKI kernels are launched through: none: the Neuron SDK's `nki` (with nki.jit) is not importable" \
        in proc.stdout
    report = json.loads((out / "neuron_check.json").read_text())
    assert (out / "neuron_check.png").stat().st_size > 0
    status = {s["name"]: s for s in report["steps"]}
    assert status["emulator-kernels"]["status"] == "ran" and status["emulator-predict"]["status"] == "ran"
    for step in HARDWARE_STEPS:
        assert status[step]["status"] == "skipped"
        assert "`nki` is not importable" in status[step]["reason"]
        assert f"{step}" in proc.stdout and "SKIPPED" in proc.stdout
    checks = report["emulator"]["kernel_checks"]
    assert {c["case"].split()[0] for c in checks} == {"fused_xuv", "up_gate", "down", "dense_xw", "sequential_xuv"}
    assert all(c["ok"] and c["rel_err_vs_numpy"] <= c["tolerance"] for c in checks)
    pred = report["emulator"]["predictions"]["by_target"]["trn2"]
    for kernel in ("dense_xw", "sequential_xuv", "fused_xuv"):
        assert set(pred[kernel]) == {"1024"} and pred[kernel]["1024"]["latency_ms"] > 0
    assert pred["sweep"]["S"] == 1024 and set(pred["sweep"]["by_block"]) == {"128", "512", "1024"}


def test_help_names_the_quick_mode():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "neuron_check.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "CI mode" in proc.stdout


def test_serving_accuracy_rule():
    """The comparison the Trainium host runs (served bf16 vs CPU float32), checked here so
    its thresholds cannot rot."""
    ref = [{"prompt_logprobs": [-1.0, -2.0, -0.5] * 10, "greedy_ids": list(range(16))} for _ in range(4)]
    same = [{"prompt_logprobs": [x + 0.01 for x in r["prompt_logprobs"]], "greedy_ids": list(r["greedy_ids"])}
            for r in ref]
    res = neuron_check._compare(ref, same)
    assert res["ok"] and res["greedy_full_agreement"] == 1.0 and res["logprob_abs_diff_median"] == pytest.approx(0.01)
    drift = [dict(s, prompt_logprobs=[x + 0.2 for x in s["prompt_logprobs"]]) for s in same]
    assert not neuron_check._compare(ref, drift)["ok"]              # median 0.2 > 0.05 nats
    diverged = [dict(s, greedy_ids=[99] + s["greedy_ids"][1:]) for s in same]
    assert not neuron_check._compare(ref, diverged)["ok"]           # first greedy token must agree


def _shard_line(rank, split, replicated=7.5, cls="vllm_neuron.model.qwen3.model.Qwen3ForCausalLM"):
    from vllm_neuronmlp.neuron import integrate

    return integrate.SHARD_LINE.format(rank=rank, tp=2, mlps=30, implementation=cls,
                                       resolved="vllm_neuron.model.qwen3.factory.Qwen3ForCausalLM",
                                       split=split, replicated=replicated)


def test_serve_variant_reads_the_shard_lines_of_the_server_log():
    """The check the Trainium host runs on its TP-2 server log (the line is the one the
    variant's load_weights hook logs, tests/test_neuron_variant.py), checked here."""
    prefix = "(EngineCore_DP0 pid=1) INFO 01-01 00:00:00 [integrate.py:1] "
    good = "\n".join(["startup", prefix + _shard_line(1, -3.25), prefix + _shard_line(0, 12.5)])
    res = neuron_check.variant_report(good, 2)
    assert res["ok"] and [r["rank"] for r in res["ranks"]] == [0, 1]
    assert res["classes"] == [("vllm_neuron.model.qwen3.factory.Qwen3ForCausalLM",
                               "vllm_neuron.model.qwen3.model.Qwen3ForCausalLM")]
    same = "\n".join([_shard_line(0, 12.5), _shard_line(1, 12.5)])           # issue 18: both ranks loaded shard 0
    assert neuron_check.variant_report(same, 2)["problems"] == [
        "two ranks report the same split-shard checksum: they loaded the same shard"]
    one = neuron_check.variant_report(_shard_line(0, 12.5), 2)
    assert not one["ok"] and "shard lines from ranks [0], expected ranks 0..1" in one["problems"][0]
    drift = "\n".join([_shard_line(0, 12.5), _shard_line(1, -3.25, replicated=7.0)])
    assert neuron_check.variant_report(drift, 2)["problems"] == ["the replicated factors differ between ranks"]


def _config(tmp_path, heads, kv_heads, hidden=576):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads,
                                                      "hidden_size": hidden}))
    return str(tmp_path)


def test_serving_degrees_split_the_heads_like_vllm_neuron(tmp_path):
    """TP 1 and the smallest degree > 1 that vllm-neuron's attention can split the heads over:
    SmolLM2-135M's 9 heads / 3 KV heads take TP 3 (TP 2 is refused for the dense model too)."""
    degrees, note = neuron_check.serve_degrees(_config(tmp_path, 9, 3))
    assert degrees == [1, 3] and "TP 2 cannot split 9 heads / 3 KV heads" in note
    assert neuron_check.serve_degrees(_config(tmp_path, 32, 8, 4096)) == ([1, 2], "")
    assert neuron_check.serve_degrees(_config(tmp_path, 9, 3), "1,2")[0] == [1, 2]


def test_layer_paths_are_read_from_the_server_log():
    from vllm_neuronmlp.neuron import integrate

    prefix = "(EngineCore_DP0 pid=1) INFO 01-01 00:00:00 [integrate.py:1] "
    paths = ("model.layers.0.self_attn: q=kernels k=kernels v=kernels o=dense | "
             "model.layers.0.mlp: gate=dense up=dense down=dense")
    log = "\n".join(["startup", prefix + integrate.PATHS_LINE.format(rank=1, paths=paths.replace("kernels", "torch")),
                     prefix + integrate.PATHS_LINE.format(rank=0, paths=paths)])
    got = neuron_check.layer_paths(log)
    assert got[0] == {"model.layers.0.self_attn": {"q": "kernels", "k": "kernels", "v": "kernels", "o": "dense"},
                      "model.layers.0.mlp": {"gate": "dense", "up": "dense", "down": "dense"}}
    assert got[1]["model.layers.0.self_attn"]["q"] == "torch"
