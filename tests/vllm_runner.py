"""Run one vLLM engine in a fresh process and write what it produced as JSON.

Tests start engines through `run_engine()` so that every engine gets a clean
process (vLLM's distributed state is per process) and a load error arrives as
the plugin's own message on stderr (`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the
engine core in this process for TP=1).

Engines run eager (`enforce_eager=True`) unless `compiled=True`, which keeps
vLLM's default: the model compiled by torch.compile, as `vllm serve` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [12, 3, 3, 8], list(range(20, 60))]


def run_engine(model: str, out_json: str, dtype: str = "float32", tp: int = 1, max_tokens: int = 8,
               quantization: Optional[str] = None, env: Optional[Dict[str, str]] = None,
               track_weights: bool = True, compiled: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--out", out_json, "--dtype", dtype,
           "--tp", str(tp), "--max-tokens", str(max_tokens)]
    if quantization:
        cmd += ["--quantization", quantization]
    if not track_weights:
        cmd += ["--no-track-weights"]
    if compiled:
        cmd += ["--compiled"]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if tp == 1 else "1",
                **({"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"} if tp == 2 else {}),
                **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def load_result(proc: subprocess.CompletedProcess, out_json: str) -> dict:
    if proc.returncode != 0:
        raise AssertionError(f"vLLM engine failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    with open(out_json) as f:
        return json.load(f)


def reference_outputs(model: str, max_tokens: int = 8) -> dict:
    """What a float32 engine run of the dense `model` gives, computed by transformers
    instead of vLLM (same keys as an engine's JSON): greedy tokens with their
    logprobs, and the prompt logprobs. It stands in for a dense vLLM engine as the
    reference of the fp32 equivalence tests; on the tiny models the two agree to
    ~2e-6 in logprob (measured, eager and compiled)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    result = {"tokens": [], "logprobs": [], "prompt_logprobs": []}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = list(prompt)
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
            result["prompt_logprobs"].append([lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)])
            tokens, logprobs = [], []
            for _ in range(max_tokens):
                token = int(lp[-1].argmax())
                tokens.append(token)
                logprobs.append(lp[-1, token].item())
                ids.append(token)
                lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
            result["tokens"].append(tokens)
            result["logprobs"].append(logprobs)
    return result


def compilation_of(llm) -> dict:
    """How vLLM runs the model: compilation mode (NONE = eager) and torch.compile backend."""
    cc = llm.llm_engine.vllm_config.compilation_config
    return {"mode": getattr(cc.mode, "name", str(cc.mode)), "backend": cc.backend}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--quantization", default=None)
    p.add_argument("--no-track-weights", action="store_true")
    p.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile path (not enforce_eager)")
    a = p.parse_args(argv)

    import time

    from vllm import LLM, SamplingParams

    from vllm_neuronmlp.mlp_fusion import count_fused_mlps

    start = time.perf_counter()
    llm = LLM(a.model, dtype=a.dtype, tensor_parallel_size=a.tp, quantization=a.quantization,
              enforce_eager=not a.compiled, max_model_len=256, seed=0,
              model_loader_extra_config={"enable_weights_track": not a.no_track_weights})
    startup_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, logprobs=0, prompt_logprobs=0,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    result = {"tokens": [], "logprobs": [], "prompt_logprobs": [], "startup_s": startup_s,
              "compilation": compilation_of(llm)}
    for o in outs:
        c = o.outputs[0]
        result["tokens"].append(list(c.token_ids))
        result["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
        result["prompt_logprobs"].append([lp[t].logprob
                                          for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])])
    try:
        result["fused_mlps"] = sum(llm.apply_model(count_fused_mlps))
    except Exception as e:  # report, don't hide: the test asserting the count will show it
        result["fused_mlps"] = None
        result["fused_mlps_error"] = repr(e)
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
