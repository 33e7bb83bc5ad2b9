"""Serving benchmark: `vllm bench serve` against a dense and a compressed checkpoint.

Both servers run at once (127.0.0.1, separate ports); the bench runs alternate
dense / compressed for --repeats rounds so that drift of the machine hits both
alike. Reports per-run numbers and the compressed/dense ratios of the median
output throughput and median TPOT. Writes JSON + PNG to benchmarks/results/.

    python benchmarks/serving.py --dense work/smollm2-135m --compressed work/smollm2-135m-svd-0.2 --dtype float32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from vllm_neuronmlp.tools.serving import VllmServer, bench_serve, summarize_bench

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(dense: str, compressed: str, repeats: int, num_prompts: int, input_len: int, output_len: int,
        concurrency: int, log_dir: str, extra_args=()) -> dict:
    os.makedirs(log_dir, exist_ok=True)
    models = {"dense": dense, "compressed": compressed}
    runs = {name: [] for name in models}
    servers = {name: VllmServer(path, os.path.join(log_dir, f"serve_{name}.log"), served_name=name,
                                extra_args=["--max-model-len", str(input_len + output_len + 64), *extra_args])
               for name, path in models.items()}
    try:
        for s in servers.values():
            s.start()
        for name, s in servers.items():  # warm-up, not recorded
            bench_serve(s, models[name], num_prompts=concurrency, input_len=input_len, output_len=8,
                        concurrency=concurrency)
        for rep in range(repeats):
            for name, s in servers.items():
                t = time.time()
                r = summarize_bench(bench_serve(s, models[name], num_prompts, input_len, output_len, concurrency,
                                                seed=rep))
                runs[name].append(r)
                print(f"[{rep + 1}/{repeats}] {name:10s} output {r['output_throughput']:7.1f} tok/s  "
                      f"TPOT {r['median_tpot_ms']:7.1f} ms  failed {r['failed']}  ({time.time() - t:.0f} s)",
                      flush=True)
    finally:
        for s in servers.values():
            s.stop()
    med = {name: {"output_throughput": statistics.median(r["output_throughput"] for r in rs),
                  "median_tpot_ms": statistics.median(r["median_tpot_ms"] for r in rs)}
           for name, rs in runs.items()}
    return {
        "settings": {"dense": dense, "compressed": compressed, "repeats": repeats, "num_prompts": num_prompts,
                     "input_len": input_len, "output_len": output_len, "concurrency": concurrency,
                     "ignore_eos": True, "extra_server_args": list(extra_args)},
        "runs": runs,
        "median": med,
        "output_throughput_ratio": med["compressed"]["output_throughput"] / med["dense"]["output_throughput"],
        "tpot_ratio": med["compressed"]["median_tpot_ms"] / med["dense"]["median_tpot_ms"],
        "failed_requests": sum(r["failed"] or 0 for rs in runs.values() for r in rs),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "output_throughput", "output throughput (tok/s)"),
                           (axes[1], "median_tpot_ms", "median TPOT (ms)")):
        for i, name in enumerate(("dense", "compressed")):
            vals = [r[key] for r in result["runs"][name]]
            ax.bar(i, statistics.median(vals), color=("tab:gray", "tab:blue")[i], alpha=0.7)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks([0, 1], ["dense", "compressed"])
        ax.set_title(label)
    s = result["settings"]
    fig.suptitle(f"vllm bench serve, {s['num_prompts']} prompts, {s['input_len']} in / {s['output_len']} out, "
                 f"concurrency {s['concurrency']}: throughput x{result['output_throughput_ratio']:.2f}, "
                 f"TPOT x{result['tpot_ratio']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense HF checkpoint directory")
    p.add_argument("--compressed", required=True, help="svd_neuron checkpoint directory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="vLLM activation dtype for both servers (default auto = the checkpoint's; on CPUs "
                        "without fast bf16 GEMMs float32 is the faster choice)")
    p.add_argument("--name", default="serving", help="results file stem in benchmarks/results/")
    a = p.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    result = run(a.dense, a.compressed, a.repeats, a.num_prompts, a.input_len, a.output_len, a.concurrency,
                 log_dir=os.path.join(RESULTS, "logs"), extra_args=["--dtype", a.dtype])
    result["command"] = "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(RESULTS, f"{a.name}.png"))
    print(f"output throughput ratio (compressed/dense) {result['output_throughput_ratio']:.3f}, "
          f"TPOT ratio {result['tpot_ratio']:.3f}, failed requests {result['failed_requests']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
