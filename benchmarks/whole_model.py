"""Whole-model budgets on SmolLM2-135M: `--scope all` against the same parameters
taken from the MLP only, and an SVD-LLM-style baseline (issue 16, item 5).

The ratio counts every decoder linear (q, k, v, o, gate, up, down; embeddings and
LM head not counted). Points, at whole-model ratios 0.1 and 0.2:

  all/hybrid        --scope all, the default method (one greedy over MLP channel
                    blocks, MLP rank blocks and attention rank blocks)
  mlp/hybrid        the same number of decoder-linear parameters removed from the
                    MLP only: --scope mlp --ratio R * linears / MLP, default method
  all/whiten-b32    SVD-LLM style: whitened SVD, the same (eq.-5) ratio on all seven
                    projections (--method whiten --rank-allocation uniform), block 32
                    (the finest the tool allows; SVD-LLM's own ranks are unaligned)
  all/whiten-b128   the same at the default block 128

Protocol of benchmarks/channels_vs_factors.py (its text helpers are imported):
64 x 512 calibration tokens of builtin:calibration (seed 0), perplexity over the
first 6 non-overlapping 2048-token windows, transformers float32, on
`builtin:heldout` and on the fortunes text.

Also measured here:
  - fused vs separate q/k/v (`qkv` in the JSON): from the statistics of the
    all/hybrid Fisher pass, per layer, the smallest estimated loss (Fisher units:
    tail sums of the squared whitened, Fisher-weighted singular values) reachable
    at a parameter saving by separate q, k, v factors (block-aligned ranks, each
    member free to stay dense, or the product's rule: all three factored or none)
    against one shared U at rank r (cost r (H + q + k + v)), at 10 / 25 / 50 % of
    the qkv parameters and at the savings the allocator chose;
  - tensor parallel (`tp` in the JSON): the all/hybrid 0.2 checkpoint served by
    vLLM at TP 1 (eager) and TP 2 (compiled) against its dense twin (a float32
    checkpoint whose weights are the multiplied-out factors, narrowed layers
    zero-padded to full width), tokens and prompt/sample logprobs, through the
    engine runner of tests/vllm_runner.py.

    python benchmarks/whole_model.py --work /tmp/wm
    python benchmarks/whole_model.py --table
Writes benchmarks/results/whole_model.json and .png; finished points are kept and
`--resume` skips them. The serving run (dense vs all vs mlp at 0.2) is
benchmarks/serving.py with --name serving_whole_model; the command is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import channels_vs_factors as cvf  # noqa: E402  (the fortunes text and the protocol's constants, one definition)
from vllm_neuronmlp import checkpoint_format as cf  # noqa: E402

RESULTS = os.path.join(HERE, "results")
RATIOS = (0.2, 0.1)  # of the decoder linears
# (series, scope, method, rank allocation, block size)
SERIES = [("all/hybrid", "all", "hybrid", "adaptive", 128),
          ("mlp/hybrid", "mlp", "hybrid", "adaptive", 128),
          ("all/whiten-b32", "all", "whiten", "uniform", 32),
          ("all/whiten-b128", "all", "whiten", "uniform", 128)]
QKV_FRACTIONS = (0.10, 0.25, 0.50)  # fixed savings, of the layer's q/k/v parameters
QKV_BLOCKS = (128, 32, 1)  # 1 = unaligned ranks
TP_MODES = ((1, False), (2, True))  # (tp, compiled): TP 1 eager, TP 2 compiled
TP_MODES_ALL = ((1, False), (2, True), (1, True), (2, False))
FP32_TOL = 1e-3  # float32 roundings over 30 layers (the tiny-model tests use 1e-4 over 2-3 layers)


def plan(only: Optional[Sequence[str]] = None) -> List[Tuple[str, str, str, str, int, float]]:
    out = [(s, scope, m, a, b, r) for s, scope, m, a, b in SERIES for r in RATIOS]
    return [p for p in out if not only or f"{p[0]}/{p[5]}" in only]


def shapes(model: str) -> Dict[str, int]:
    """Per-layer parameter counts of SmolLM2-like Llama configs."""
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    h, i, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    q, k = heads * hd, kv * hd
    return {"hidden": h, "intermediate": i, "q": q, "kv": k, "layers": c["num_hidden_layers"],
            "mlp_per_layer": cf.mlp_params(h, i), "attention_per_layer": h * q + 2 * h * k + q * h,
            "linears_per_layer": cf.mlp_params(h, i) + h * q + 2 * h * k + q * h}


# ---------------------------------------------------------------- fused vs separate q/k/v
def _levels(m: int, n: int, tail: Sequence[float], block: int, dense: bool):
    """(costs, losses, ranks) of one matrix: every block-aligned rank that saves
    parameters, and with `dense` the dense level (rank 0, loss 0)."""
    import numpy as np

    top = ((m * n - 1) // (m + n)) // block * block
    ranks = list(range(block, top + 1, block)) + ([0] if dense else [])
    cost = [r * (m + n) if r else m * n for r in ranks]
    loss = [float(tail[r]) if r else 0.0 for r in ranks]
    return np.array(cost, dtype=np.int64), np.array(loss), np.array(ranks)


class Options:
    """Every way to store one layer's q/k/v at one block size, of one kind:
    "separate" (each member factored or dense), "separate-grouped" (the product's
    rule: all three factored, each at its own rank, or all three dense) or "fused"
    (one shared U: [W_q W_k W_v] ~ U V at rank r, cost r (H + q + k + v))."""

    def __init__(self, kind: str, h: int, nq: int, nk: int, spectra: Dict[str, Sequence[float]], block: int):
        import numpy as np

        from vllm_neuronmlp.tools.allocation.budget import tail_energies

        self.dense = h * (nq + 2 * nk)
        if kind == "fused":
            cost, self.loss, r = _levels(h, nq + 2 * nk, tail_energies(spectra["qkv"]), block, True)
            self.ranks = [(int(x),) for x in r]
        else:
            free = kind == "separate"
            lv = [_levels(h, n, tail_energies(spectra[p]), block, free) for p, n in (("q", nq), ("k", nk), ("v", nk))]
            (cq, lq, self.rq), (ck, lk, self.rk), (cv, lv_, self.rv) = lv
            cost = (cq[:, None, None] + ck[None, :, None] + cv[None, None, :]).ravel()
            self.loss = (lq[:, None, None] + lk[None, :, None] + lv_[None, None, :]).ravel()
            self.ranks = None
            if not free:  # all three dense, the last option
                cost, self.loss = np.append(cost, self.dense), np.append(self.loss, 0.0)
        self.savings = self.dense - cost

    def rank_of(self, j: int):
        if self.ranks is not None:
            return self.ranks[j]
        shape = (len(self.rq), len(self.rk), len(self.rv))
        if j == shape[0] * shape[1] * shape[2]:
            return (0, 0, 0)
        a, b, c = (int(x) for x in __import__("numpy").unravel_index(j, shape))
        return int(self.rq[a]), int(self.rk[b]), int(self.rv[c])

    def best_at(self, saving: int):
        """(loss, savings, ranks) of the smallest-loss way to save at least `saving`
        parameters; None when no way saves that much."""
        import numpy as np

        ok = np.flatnonzero(self.savings >= saving)
        if ok.size == 0:
            return None
        j = int(ok[np.argmin(self.loss[ok])])
        return float(self.loss[j]), int(self.savings[j]), self.rank_of(j)


KINDS = ("separate", "separate-grouped", "fused")


def qkv_comparison(spectra: Dict[int, Dict[str, Sequence[float]]], dims: Dict[str, int],
                   chosen: Dict[str, Dict[int, Tuple[int, int, int]]]) -> Dict:
    """Per layer and summed over the layers: the smallest estimated loss of separate
    and of fused q/k/v at a saving of at least the target, at the fixed fractions of
    QKV_FRACTIONS (every block of QKV_BLOCKS) and at the savings the allocator chose
    (`chosen` {point: {layer: (r_q, r_k, r_v)}}; blocks 128 and 32). A layer's option
    "wins per parameter" when its loss per parameter saved is the smaller."""
    from vllm_neuronmlp.tools.allocation.budget import tail_energies

    h, nq, nk = dims["hidden"], dims["q"], dims["kv"]
    dense = h * (nq + 2 * nk)
    layers = sorted(spectra)
    rows = []  # (label, block, {layer: target saving}, allocator's own losses or None)
    for f in QKV_FRACTIONS:
        for b in QKV_BLOCKS:
            rows.append(({"fraction": f}, b, {i: int(round(f * dense)) for i in layers}, None))
    for point, ranks in chosen.items():
        factored = {i: r for i, r in ranks.items() if r and any(r)}
        targets = {i: dense - sum(x * (h + n) if x else h * n for x, n in zip(r, (nq, nk, nk)))
                   for i, r in factored.items()}
        own = {i: sum(tail_energies(spectra[i][p])[x] if x else 0.0 for p, x in zip("qkv", r))
               for i, r in factored.items()}
        for b in (128, 32):
            rows.append(({"point": point, "allocator_ranks": {str(i): list(r) for i, r in factored.items()},
                          "allocator_loss": sum(own.values()), "allocator_savings": sum(targets.values())},
                         b, targets, own))
    results = [{**label, "block": b, "per_layer": {}} for label, b, _, _ in rows]
    for b in QKV_BLOCKS:
        for i in layers:
            opts = {k: Options(k, h, nq, nk, spectra[i], b) for k in KINDS}
            for (label, block, targets, _), res in zip(rows, results):
                if block == b and i in targets:
                    res["per_layer"][str(i)] = {"target": targets[i],
                                                **{k: o.best_at(targets[i]) for k, o in opts.items()}}
            del opts
    for res in results:
        per = res["per_layer"]
        res["layers"] = len(per)
        res["total"] = {}
        for k in KINDS:
            got = [p[k] for p in per.values()]
            res["total"][k] = (None if not got or any(g is None for g in got) else
                               {"loss": sum(g[0] for g in got), "savings": sum(g[1] for g in got)})
        both = [(p["separate"], p["fused"]) for p in per.values() if p["separate"] and p["fused"]]
        res["comparable_layers"] = len(both)
        res["fused_wins_per_parameter_layers"] = sum(1 for s, f in both if f[0] / f[1] < s[0] / s[1])
        res["fused_lower_loss_layers"] = sum(1 for s, f in both if f[0] < s[0])
    return {"qkv_params_per_layer": dense, "kinds": list(KINDS),
            "fixed": [r for r in results if "fraction" in r], "allocator": [r for r in results if "point" in r]}


def qkv_spectra_of(cache: Dict, layers: int) -> Dict[int, Dict[str, List[float]]]:
    """{layer: {q, k, v, qkv: spectrum}} from the spectra_cache of an all/hybrid run."""
    stats = next(s for s in cache.values() if getattr(s, "fused_qkv_spectra", None))
    out = {}
    for i in range(layers):
        pre = f"model.layers.{i}.self_attn"
        out[i] = {p: list(stats.spectra[f"{pre}.{p}_proj"]) for p in "qkv"}
        out[i]["qkv"] = list(stats.fused_qkv_spectra[f"{pre}.qkv"])
    return out


# ---------------------------------------------------------------- tensor parallel vs the dense twin
def dense_twin(ckpt: str, out: str) -> str:
    """A plain float32 checkpoint computing what `ckpt` computes: every factored
    projection's weight is (U V)^T (float64 product), every narrowed MLP is padded
    back to the full width with zero channels (gate/up rows and down columns)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vllm_neuronmlp import checkpoint_format as cf

    config = cf.read_config(ckpt)
    quant = cf.read_quantization_config(ckpt)
    inter = config["intermediate_size"]
    tensors = {}
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, name), "pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
    state = {}
    for k, t in tensors.items():
        if k.endswith(".svd_v"):
            continue
        if k.endswith(".svd_u"):
            module = k[: -len(".svd_u")]
            w = (t.double() @ tensors[module + ".svd_v"].double()).T.float().contiguous()
            k = cf.weight_name(module)
        else:
            w = t.float() if t.is_floating_point() else t
        state[k] = w
    for mlp, width in quant.widths.items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            k = cf.weight_name(f"{mlp}.{proj}")
            w = state[k]
            padded = torch.zeros((inter, w.shape[1]) if proj != "down_proj" else (w.shape[0], inter))
            if proj == "down_proj":
                padded[:, :width] = w
            else:
                padded[:width] = w
            state[k] = padded
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    save_file(state, os.path.join(out, cf.SAFETENSORS_SINGLE_FILE), metadata={"format": "pt"})
    config.pop(cf.QUANTIZATION_CONFIG_KEY, None)
    config["torch_dtype"] = "float32"
    with open(os.path.join(out, cf.CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(ckpt):
        if not (name.endswith(".safetensors") or name in (cf.CONFIG_FILE, cf.SAFETENSORS_INDEX_FILE)):
            src = os.path.join(ckpt, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out, name))
    return out


def tp_check(ckpt: str, twin: str, work: str, modes) -> Dict:
    """The compressed checkpoint and its twin through vLLM float32 engines at each
    (tp, compiled) of `modes`, and the twin through transformers: greedy tokens
    equal, max |logprob| differences of sampled and prompt tokens."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from vllm_runner import PROMPTS, load_result, reference_outputs, run_engine

    def maxdiff(a, b):
        return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))

    def compare(got, want):
        return {"tokens_equal": got["tokens"] == want["tokens"],
                "max_logprob_diff": maxdiff(got["logprobs"], want["logprobs"]),
                "max_prompt_logprob_diff": maxdiff(got["prompt_logprobs"], want["prompt_logprobs"])}

    t0 = time.time()
    ref = reference_outputs(twin)
    out = {"prompts_tokens": [len(p) for p in PROMPTS], "max_tokens": 8, "tolerance": FP32_TOL,
           "reference": "the dense twin through transformers float32", "runs": []}
    first_twin = None
    for tp, compiled in modes:
        mode = f"tp{tp} {'compiled' if compiled else 'eager'}"
        t = time.time()
        res = {}
        for label, path in (("compressed", ckpt), ("twin", twin)):
            js = os.path.join(work, f"tp-{label}-{tp}-{int(compiled)}.json")
            try:
                res[label] = load_result(run_engine(path, js, tp=tp, compiled=compiled, timeout=1500), js)
            except Exception as e:  # keep the other modes' results
                res[label] = {"error": str(e)[-3000:]}
        entry = {"tp": tp, "compiled": compiled, "seconds": round(time.time() - t, 1)}
        if "error" in res["compressed"] or "error" in res["twin"]:
            entry["error"] = {k: v["error"] for k, v in res.items() if "error" in v}
        else:
            entry["compilation"] = res["compressed"]["compilation"]
            entry["compressed_vs_twin"] = compare(res["compressed"], res["twin"])
            entry["compressed_vs_reference"] = compare(res["compressed"], ref)
            entry["twin_vs_reference"] = compare(res["twin"], ref)
            if first_twin is None:
                first_twin = (mode, res["twin"])
            else:
                entry["twin_vs_first_mode_twin"] = {"first_mode": first_twin[0], **compare(res["twin"], first_twin[1])}
            c = entry["compressed_vs_twin"]
            entry["pass"] = (c["tokens_equal"] and c["max_logprob_diff"] < FP32_TOL
                             and c["max_prompt_logprob_diff"] < FP32_TOL)
        out["runs"].append(entry)
        print(f"tp check {mode}: {json.dumps({k: v for k, v in entry.items() if k != 'error'})}"
              + (f" ERROR {entry['error']}" if "error" in entry else ""), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def tp_check_even_heads(work: str, modes) -> Dict:
    """TP 2 on a model it can split: a random Llama with 4 heads / 2 KV heads (head
    dim 64), 3 layers, compressed by the default (`--ratio 0.2`, scope all; block 32,
    8 x 128 calibration tokens, as its widths are small), against its dense twin."""
    from vllm_neuronmlp import checkpoint_format as cf
    from vllm_neuronmlp.tools import compressor as C
    from vllm_neuronmlp.tools.data import tiny
    from vllm_neuronmlp.tools.options import DEFAULT_CALIB_TEXT, CompressOptions

    src = tiny.make_model(os.path.join(work, "even-heads-dense"), layers=3, hidden=256, intermediate=512, heads=4,
                          kv_heads=2, init_std=0.05, dtype="float32")
    ckpt = os.path.join(work, "even-heads-all-0.2")
    res = C.compress_with_options(src, ckpt, CompressOptions(ratio=0.2, block_size=32, calib_text=[DEFAULT_CALIB_TEXT],
                                                             calib_samples=8, calib_seq_len=128, overwrite=True,
                                                             progress=False))
    twin = dense_twin(ckpt, os.path.join(work, "even-heads-twin"))
    q = cf.read_quantization_config(ckpt)
    return {"checkpoint": "random Llama 3 x (hidden 256, intermediate 512, 4 heads / 2 KV heads), compress --ratio 0.2 "
                          "--block-size 32 --calib-samples 8 --calib-seq-len 128 (scope all)",
            "format_version": q.format_version, "ratio_linears": res.ratio_linears, "widths": q.widths,
            "ranks": q.ranks, **tp_check(ckpt, twin, work, modes)}


# ---------------------------------------------------------------- output
def plot(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(data["dense"])
    fig, axes = plt.subplots(1, len(texts) + 1, figsize=(5.5 * (len(texts) + 1), 4.5))
    for ax, text in zip(axes, texts):
        series = {}
        for p in data["points"]:
            series.setdefault(p["series"], []).append((p["ratio_linears"], p["excess"][text]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("achieved ratio of decoder-linear parameters")
        ax.set_ylabel("excess perplexity (PPL / dense - 1)")
        ax.set_title(f"{text} (dense {data['dense'][text]:.2f})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    q = data.get("qkv")
    if q:
        width = 0.25
        rows = [r for r in q["fixed"] if r["block"] in (128, 32)]
        labels = [f"{int(r['fraction'] * 100)}% b{r['block']}" for r in rows]
        for j, kind in enumerate(q["kinds"]):
            vals = [r["total"][kind]["loss"] if r["total"][kind] else float("nan") for r in rows]
            ax.bar([x + (j - 1) * width for x in range(len(rows))], vals, width, label=kind)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("estimated loss, sum over layers (Fisher units)")
        ax.set_title("q/k/v: separate vs one shared U, at >= the qkv saving")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: whole-model budgets (ratio of decoder linears)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown_tables(data) -> str:
    texts = list(data["dense"])
    rows = ["| ratio asked (of decoder linears) | series | `--ratio` given | ratio achieved (linears) | MLP ratio | "
            "mix: channels / MLP ranks / attention ranks | " + " | ".join(f"PPL {t} (excess)" for t in texts) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(texts),
            "| — | dense | — | 0 | 0 | — | " + " | ".join(f"{data['dense'][t]:.2f}" for t in texts) + " |"]
    for p in sorted(data["points"], key=lambda p: (p["ratio"], [s[0] for s in SERIES].index(p["series"]))):
        m = p["mix_linears"]
        rows.append(f"| {p['ratio']} | {p['series']} | {p['ratio_option']:.4f} | {p['ratio_linears']:.4f} | "
                    f"{p['ratio_mlp']:.4f} | {m['channels']:.4f} / {m['mlp_ranks']:.4f} / {m['attention_ranks']:.4f} | "
                    + " | ".join(f"{p['ppl'][t]:.2f} ({p['excess'][t]:.3f})" for t in texts) + " |")
    out = ["\n".join(rows)]
    q = data.get("qkv")
    if q:
        lines = ["| qkv saving asked (per layer) | block | separate: loss (saved) | separate, grouped | "
                 "fused (shared U) | fused / separate loss | layers where fused wins per parameter |",
                 "|---|---|---|---|---|---|---|"]

        def cell(t):
            return "—" if not t else f"{t['loss']:.4g} ({t['savings'] / 1e6:.3f} M)"

        for r in q["fixed"] + q["allocator"]:
            what = (f"{int(round(r['fraction'] * 100))} %" if "fraction" in r else
                    f"as chosen at {r['point']} ({r['layers']} layers; the allocator's own loss "
                    f"{r['allocator_loss']:.4g}, {r['allocator_savings'] / 1e6:.3f} M saved)")
            s, g, f = (r["total"][k] for k in q["kinds"])
            ratio = f"{f['loss'] / s['loss']:.2f}" if s and f and s["loss"] > 0 else "—"
            lines.append(f"| {what} | {r['block'] if r['block'] > 1 else 'unaligned'} | {cell(s)} | {cell(g)} | "
                         f"{cell(f)} | {ratio} | {r['fused_wins_per_parameter_layers']} of {r['comparable_layers']} |")
        out.append("\n".join(lines))
    tp = data.get("tp")
    if tp:
        lines = ["| mode | tokens equal | max sampled-logprob diff | max prompt-logprob diff | "
                 "compressed vs transformers (twin) | twin vs first mode's twin |", "|---|---|---|---|---|---|"]
        for r in tp["runs"]:
            if "error" in r:
                lines.append(f"| tp{r['tp']} {'compiled' if r['compiled'] else 'eager'} | error | | | | |")
                continue
            c, ref = r["compressed_vs_twin"], r["compressed_vs_reference"]
            tw = r.get("twin_vs_first_mode_twin")
            lines.append(f"| tp{r['tp']} {'compiled' if r['compiled'] else 'eager'} ({r['compilation']['mode']}) | "
                         f"{c['tokens_equal']} | {c['max_logprob_diff']:.2e} | {c['max_prompt_logprob_diff']:.2e} | "
                         f"{max(ref['max_logprob_diff'], ref['max_prompt_logprob_diff']):.2e} | "
                         + (f"{max(tw['max_logprob_diff'], tw['max_prompt_logprob_diff']):.2e}" if tw else "—")
                         + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def point_record(series, scope, method, alloc_, block, ratio, ratio_option, res, ppl, dense_ppl, t_comp, t_eval,
                 load) -> Dict:
    mix = res.mix
    removed = {k: sum(v[k] for v in mix["removed_per_layer"].values())
               for k in ("channels", "mlp_ranks", "attention_ranks")}
    attention = {n: r for n, r in res.ranks.items() if ".self_attn." in n}
    return {"key": f"{series}/{ratio}", "series": series, "scope": scope, "method": method, "allocation": alloc_,
            "block_size": block, "ratio": ratio, "ratio_option": ratio_option, "ratio_linears": res.ratio_linears,
            "ratio_mlp": res.ratio_mlp, "ratio_model": res.ratio_model,
            "linear_params_before": res.linear_params_before, "linear_params_after": res.linear_params_after,
            "removed": removed, "mix_linears": {k: v / res.linear_params_before for k, v in removed.items()},
            "mix": {k: v for k, v in mix.items() if k != "removed_per_layer"},
            "removed_per_layer": mix["removed_per_layer"], "widths": {str(k): v for k, v in res.widths.items()},
            "attention_ranks": attention, "factored_modules": len(res.ranks),
            "ppl": ppl, "excess": {n: ppl[n] / dense_ppl[n] - 1 for n in ppl},
            "compress_seconds": round(t_comp, 1), "eval_seconds": round(t_eval, 1),
            "stages": {k: v.get("seconds") if isinstance(v, dict) else v for k, v in (res.stages or {}).items()},
            "load_average": load}


def chosen_qkv(point: Dict, layers: int) -> Dict[int, Tuple[int, int, int]]:
    r = point["attention_ranks"]
    return {i: tuple(r.get(f"model.layers.{i}.self_attn.{p}_proj", 0) for p in "qkv") for i in range(layers)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/vllm_neuronmlp_whole_model")
    ap.add_argument("--json", default=os.path.join(RESULTS, "whole_model.json"))
    ap.add_argument("--fortunes", default="/usr/share/games/fortunes", help="directory of the fortunes package's files")
    ap.add_argument("--eval-windows", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="points as SERIES/RATIO, e.g. all/hybrid/0.2")
    ap.add_argument("--resume", action="store_true", help="keep the points, qkv and tp results already in --json")
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--tp-all-modes", action="store_true", help="also TP 1 compiled and TP 2 eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the README's markdown tables from --json, then exit")
    args = ap.parse_args()
    if args.table:
        with open(args.json) as f:
            print(markdown_tables(json.load(f)))
        return

    from vllm_neuronmlp.tools import compressor as C
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate
    from vllm_neuronmlp.tools.options import CompressOptions

    model, texts, max_tokens, data = cvf.protocol_setup(args)
    dims = shapes(model)
    to_mlp = dims["linears_per_layer"] / dims["mlp_per_layer"]
    data["setup"].update({"shapes": dims,
                          "mlp_ratio_for_linears_ratio": f"R_mlp = R x {to_mlp:.6f} (linears / MLP parameters)",
                          "machine": f"{os.cpu_count()} CPU cores shared with another long run (timings inflated)"})

    def save():
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        plot(data, os.path.splitext(args.json)[0] + ".png")

    if "dense" not in data:
        data["dense"] = {name: evaluate.perplexity_hf(model, t, max_tokens=max_tokens, progress=False).ppl
                         for name, t in texts.items()}
        print("dense", data["dense"], flush=True)
        save()
    done = {p["key"] for p in data["points"]}
    cache: Dict = {}
    spectra_file = os.path.join(args.work, "qkv_spectra.json")
    for series, scope, method, alloc_, block, ratio in plan(args.only):
        key = f"{series}/{ratio}"
        if key in done:
            continue
        ratio_option = ratio if scope == "all" else ratio * to_mlp
        out = os.path.join(args.work, "ckpt-" + key.replace("/", "_"))
        load0 = os.getloadavg()[0]
        t0 = time.time()
        res = C.compress_with_options(model, out, CompressOptions(
            ratio=ratio_option, method=method, rank_allocation=alloc_, scope=scope, block_size=block,
            overwrite=True, progress=False), spectra_cache=cache)
        t_comp = time.time() - t0
        if series == "all/hybrid" and not os.path.isfile(spectra_file):
            with open(spectra_file, "w") as f:
                json.dump(qkv_spectra_of(cache, dims["layers"]), f)
        t1 = time.time()
        ppl = {name: evaluate.perplexity_hf(out, t, max_tokens=max_tokens, progress=False).ppl
               for name, t in texts.items()}
        point = point_record(series, scope, method, alloc_, block, ratio, ratio_option, res, ppl, data["dense"],
                             t_comp, time.time() - t1, [round(load0, 2), round(os.getloadavg()[0], 2)])
        data["points"] = [p for p in data["points"] if p["key"] != key] + [point]
        save()
        m = point["mix_linears"]
        print(f"{key}: linears {res.ratio_linears:.4f} (mlp {res.ratio_mlp:.4f}) mix {m['channels']:.4f}/"
              f"{m['mlp_ranks']:.4f}/{m['attention_ranks']:.4f} ppl "
              + " ".join(f"{n} {v:.3f}" for n, v in ppl.items()) + f" (compress {t_comp:.0f}s)", flush=True)

    if os.path.isfile(spectra_file) and (not args.resume or "qkv" not in data):
        with open(spectra_file) as f:
            spectra = {int(k): v for k, v in json.load(f).items()}
        chosen = {p["key"]: chosen_qkv(p, dims["layers"]) for p in data["points"] if p["series"] == "all/hybrid"}
        t0 = time.time()
        data["qkv"] = qkv_comparison(spectra, dims, chosen)
        data["qkv"]["seconds"] = round(time.time() - t0, 1)
        save()
        print(markdown_tables({"dense": data["dense"], "points": [], "qkv": data["qkv"]}).split("\n\n")[-1],
              flush=True)

    ckpt = os.path.join(args.work, "ckpt-all_hybrid_0.2")
    modes = TP_MODES_ALL if args.tp_all_modes else TP_MODES
    if not args.skip_tp and os.path.isdir(ckpt) and (not args.resume or "tp" not in data):
        twin = dense_twin(ckpt, os.path.join(args.work, "twin-all_hybrid_0.2"))
        # SmolLM2 has 9 attention heads: vLLM refuses TP 2 for it (dense too), so TP 1 here
        data["tp"] = {"checkpoint": "all/hybrid/0.2",
                      **tp_check(ckpt, twin, args.work, [m for m in modes if m[0] == 1])}
        save()
    if not args.skip_tp and (not args.resume or "tp_even_heads" not in data):
        data["tp_even_heads"] = tp_check_even_heads(args.work, modes)
        save()
    save()
    print("serving: python benchmarks/serving.py --model dense=" + model
          + f" --model all={ckpt} --model mlp={os.path.join(args.work, 'ckpt-mlp_hybrid_0.2')}"
          " --dtype float32 --num-prompts 32 --repeats 3 --name serving_whole_model")


if __name__ == "__main__":
    main()
