"""Serving benchmark: `vllm bench serve` against two or more checkpoints.

All servers run at once (127.0.0.1, separate ports); the bench runs alternate
between them for --repeats rounds so that drift of the machine hits all alike.
Reports per-run numbers and, for each checkpoint, the ratios of its median
output throughput and median TPOT to the first one's. Writes JSON + PNG to
benchmarks/results/.

    python benchmarks/serving.py --dense work/smollm2-135m --compressed work/smollm2-135m-svd-0.2 --dtype float32
    python benchmarks/serving.py --model dense=DIR --model hybrid=DIR --model nystrom=DIR --name serving_channels
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict

from vllm_neuronmlp.tools.evaluation.serving import VllmServer, bench_serve, summarize_bench

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(models: Dict[str, str], repeats: int, num_prompts: int, input_len: int, output_len: int,
        concurrency: int, log_dir: str, extra_args=()) -> dict:
    """`models` {name: checkpoint}, in order; ratios are relative to the first."""
    os.makedirs(log_dir, exist_ok=True)
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
    first = next(iter(models))
    ratios = {name: {"output_throughput": m["output_throughput"] / med[first]["output_throughput"],
                     "median_tpot_ms": m["median_tpot_ms"] / med[first]["median_tpot_ms"]}
              for name, m in med.items()}
    result = {
        "settings": {"models": dict(models), "reference": first, "repeats": repeats, "num_prompts": num_prompts,
                     "input_len": input_len, "output_len": output_len, "concurrency": concurrency,
                     "ignore_eos": True, "extra_server_args": list(extra_args)},
        "runs": runs,
        "median": med,
        "ratio_to_reference": ratios,
        "failed_requests": sum(r["failed"] or 0 for rs in runs.values() for r in rs),
    }
    if list(models) == ["dense", "compressed"]:  # the two-checkpoint form's headline numbers
        result["output_throughput_ratio"] = ratios["compressed"]["output_throughput"]
        result["tpot_ratio"] = ratios["compressed"]["median_tpot_ms"]
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.5 * len(names), 3.6))
    for ax, key, label in ((axes[0], "output_throughput", "output throughput (tok/s)"),
                           (axes[1], "median_tpot_ms", "median TPOT (ms)")):
        for i, name in enumerate(names):
            vals = [r[key] for r in result["runs"][name]]
            ax.bar(i, statistics.median(vals), color=colors[i % len(colors)], alpha=0.7)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(label)
    s = result["settings"]
    ratios = ", ".join(f"{n} x{r['output_throughput']:.2f}" for n, r in result["ratio_to_reference"].items()
                       if n != s["reference"])
    fig.suptitle(f"vllm bench serve, {s['num_prompts']} prompts, {s['input_len']} in / {s['output_len']} out, "
                 f"concurrency {s['concurrency']}; throughput vs {s['reference']}: {ratios}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_models(a) -> Dict[str, str]:
    models: Dict[str, str] = {}
    if a.dense or a.compressed:
        if not (a.dense and a.compressed) or a.model:
            raise SystemExit("serving.py: give --dense and --compressed together, or --model NAME=DIR (2 or more)")
        models = {"dense": a.dense, "compressed": a.compressed}
    for spec in a.model or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"serving.py: --model {spec!r}: expected NAME=DIR")
        if name in models:
            raise SystemExit(f"serving.py: --model {spec!r}: the name {name!r} is given twice")
        models[name] = path
    if len(models) < 2:
        raise SystemExit("serving.py: give --dense and --compressed, or --model NAME=DIR at least twice")
    for name, path in models.items():
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"serving.py: {name}: {path} is not a checkpoint directory (no config.json)")
    return models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", help="dense HF checkpoint directory (with --compressed)")
    p.add_argument("--compressed", help="svd_neuron checkpoint directory (with --dense)")
    p.add_argument("--model", action="append", metavar="NAME=DIR",
                   help="a checkpoint to serve, repeatable; ratios are relative to the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="vLLM activation dtype for every server (default auto = the checkpoint's; on CPUs "
                        "without fast bf16 GEMMs float32 is the faster choice)")
    p.add_argument("--name", default="serving", help="results file stem in benchmarks/results/")
    a = p.parse_args(argv)
    models = parse_models(a)
    os.makedirs(RESULTS, exist_ok=True)
    result = run(models, a.repeats, a.num_prompts, a.input_len, a.output_len, a.concurrency,
                 log_dir=os.path.join(RESULTS, "logs"), extra_args=["--dtype", a.dtype])
    result["command"] = "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(RESULTS, f"{a.name}.png"))
    print("; ".join(f"{n}: throughput x{r['output_throughput']:.3f}, TPOT x{r['median_tpot_ms']:.3f}"
                    for n, r in result["ratio_to_reference"].items())
          + f" (vs {result['settings']['reference']}); failed requests {result['failed_requests']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
