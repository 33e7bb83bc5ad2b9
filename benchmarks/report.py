"""Write docs/results.md from the benchmark results in benchmarks/results/*.json.

    python benchmarks/report.py            # (re)write docs/results.md
    python benchmarks/report.py --check    # exit 1 when docs/results.md is not what this would write

Every table is rendered from its JSON, with the command that made the JSON and the date it was
made (the JSON's own `date` or `started` field, else the date of the commit that last changed the
file), so the prose and the numbers cannot drift apart. A section made under an older default
(method or --scope) than today's is moved to the archive at the end and says so;
tests/test_results_report.py holds docs/results.md to what this script writes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "docs" / "results.md"


# --- formatting ---------------------------------------------------------------------------------

def num(x, digits=2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def ppl_cell(point, text) -> str:
    ppl, excess = point["ppl"], point["excess"]
    if isinstance(ppl, dict):
        ppl, excess = ppl.get(text), excess.get(text)
    return "—" if ppl is None else f"{ppl:.2f} ({excess:.3f})"


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


# --- one section per results file ---------------------------------------------------------------

@dataclass
class Section:
    file: str  # relative to benchmarks/results
    title: str
    command: str  # used when the JSON records none
    render: Callable[[dict], List[str]]
    # (method, scope) the run used as the compress default, for runs that depend on it; a run
    # whose default differs from today's goes to the archive
    default_when_run: Optional[Tuple[str, str]] = None
    note: str = ""


def render_whole_model(d):
    texts = list(d["dense"])
    lines = [f"{d['setup']['model']}; {d['setup']['eval']}; calibration {d['setup']['calibration']}. "
             "Perplexity with its excess over dense (PPL/dense − 1) in brackets; the ratio counts every decoder "
             "linear; the mix says where the removed parameters came from (fractions of the decoder linears).", ""]
    rows = [["dense", "—", "—", "—", "—"] + [f"{d['dense'][t]:.2f}" for t in texts]]
    for p in sorted(d["points"], key=lambda p: (p["ratio"], p["series"])):
        mix = p["mix_linears"]
        rows.append([p["key"], num(p["ratio_linears"], 4), num(p["ratio_mlp"], 4), num(p["ratio_model"], 4),
                     f"{mix['channels']:.4f} / {mix['mlp_ranks']:.4f} / {mix['attention_ranks']:.4f}"]
                    + [ppl_cell(p, t) for t in texts])
    lines += table(["scope/method/ratio", "linears removed", "MLP removed", "model removed",
                    "mix: channels / MLP ranks / attention ranks"] + [f"PPL {t}" for t in texts], rows)
    for key in ("tp", "tp_even_heads"):
        check = d.get(key)
        if not check:
            continue
        runs = ", ".join(f"TP {r['tp']} {'compiled' if r['compiled'] else 'eager'}: tokens "
                         f"{'equal' if r['compressed_vs_twin']['tokens_equal'] else 'DIFFER'}, logprobs within "
                         f"{max(c['max_logprob_diff'], c['max_prompt_logprob_diff']):.1e}"
                         for r in check["runs"] for c in [r["compressed_vs_twin"]])
        lines += ["", f"Tensor parallel, served by vLLM against the dense twin ({check['checkpoint']}): {runs}."]
    return lines


def render_serving(d):
    settings = d["settings"]
    models = settings.get("models") or {"dense": settings.get("dense"), "compressed": settings.get("compressed")}
    reference = settings.get("reference", "dense")
    lines = [f"`vllm bench serve`: {settings['num_prompts']} prompts, {settings['input_len']} tokens in / "
             f"{settings['output_len']} out, concurrency {settings['concurrency']}, servers up at once and the runs "
             f"alternating, {settings['repeats']} rounds; the median of the rounds.", ""]
    rows = []
    for name in models:
        runs = d["runs"][name]
        med = d["median"][name]
        ref = d["median"][reference]
        rows.append([name, " / ".join(f"{r['output_throughput']:.1f}" for r in runs),
                     f"{med['output_throughput']:.1f}", f"{med['output_throughput'] / ref['output_throughput']:.2f}×",
                     f"{med['median_tpot_ms']:.0f} ms", str(sum(r["failed"] for r in runs))])
    lines += table(["model", "output tok/s per round", "median", f"vs {reference}", "median TPOT", "failed"], rows)
    return lines


def render_compress_scale(d):
    stages = ["calibration", "fisher_forward", "fisher_backward", "channel_order", "spectra", "allocation",
              "factor_pass", "write"]
    rows = []
    for r in d["runs"]:
        est = r.get("estimate") or {}
        secs = r["stages"]["seconds"]
        rows.append([r["shape"], str(r["layers"]), f"{r['method']}, {r.get('scope', '?')}",
                     f"{r['peak_rss_bytes'] / 2 ** 30:.2f} GiB"
                     + (f" ({est['peak_bytes'] / 2 ** 30:.2f}, {est['peak_stage']})" if est else "")]
                    + [f"{secs.get(s, 0) / 60:.1f}" for s in stages]
                    + [f"{r['wall_time_s'] / 60:.1f} min", f"{r['peak_disk_bytes'] / 2 ** 30:.2f} GiB"])
    lines = ["Peak RSS is the process's VmHWM (the dry run's estimate and its peak stage in brackets); minutes per "
             "stage, on 2 CPU cores shared with other runs.", ""]
    lines += table(["shape", "layers", "method, scope", "peak RSS (estimate)"] + stages + ["total", "peak disk"], rows)
    for method, ex in d.get("extrapolation", {}).items():
        lines += ["", f"Extrapolated, not run ({method}, {ex['from']}): {ex['formula']} with a = {ex['a_s']:.0f} s, "
                      f"b = {ex['b_s_per_layer']:.0f} s per layer gives {ex['time_s'] / 3600:.1f} h for "
                      f"{ex['layers']} layers; estimated peak {ex['estimate']['peak_bytes'] / 2 ** 30:.1f} GiB "
                      f"({ex['estimate']['peak_stage']})."]
    if not d.get("depth_check"):
        lines += ["", "The measured depth check (the same shape at two depths) has not been run."]
    return lines


def render_channel_order(d):
    s = d["synthetic"]
    sm = d["smollm2"]
    rows = [[f"synthetic I = {s['inter']}, H = {s['hidden']}", f"{s['blocked']['wall_s']:.0f} s",
             f"{s['rank_one']['extrapolated_s']:.0f} s (extrapolated from {s['rank_one']['steps_run']} steps)",
             f"{s['channel_losses']['wall_s']:.0f} s", f"{s['blocked']['peak_rss_delta_mib'] / 1024:.1f} GiB"],
            [f"{sm['model']}, {len(sm['layers'])} layers", f"{sum(x['blocked']['wall_s'] for x in sm['layers']):.1f} s",
             f"{sum(x['rank_one']['wall_s'] for x in sm['layers']):.1f} s", "—", "—"]]
    lines = table(["shape", "blocked order", "rank-one order", "channel_losses", "peak memory above C"], rows)
    lines += ["", f"Same order as the rank-one version in all {len(sm['layers'])} SmolLM2 layers: "
                  f"{'yes' if sm['all_orders_identical'] else 'NO'}; {d['check']['checkpoint']} gives "
                  f"{d['check']['ppl_builtin_heldout']:.2f} on builtin:heldout ({d['check']['eval']})."]
    return lines


def render_allocate_timing(d):
    rows = [[str(r["ratio"]), str(r["normalize"]), f"{r['seconds']:.2f} s", f"{r['achieved_ratio']:.5f}"]
            for r in d["rows"]]
    return [f"{d['matrices']} matrices with spectra of length {d['spectrum_length']}, block {d['block']}.", ""] + \
        table(["ratio", "normalize", "allocation time", "ratio achieved"], rows)


def render_accuracy_vs_ratio(d):
    lines = [f"{d['setup']['model']}; {d['setup']['eval']}; calibration {d['setup']['calibration']}; ratios count "
             f"the MLP projections only. Dense: {d['dense']['ppl']:.2f}.", ""]
    points = sorted(d["points"], key=lambda p: (p["method"], p["allocation"], p["lora_steps"], p["ratio_requested"]))
    rows = [[str(p["ratio_requested"]), p["method"], p["allocation"], str(p["lora_steps"] or "—"),
             num(p["ratio_mlp"], 4), f"{p['ppl']:.2f}", f"{p['excess']:.3f}"] for p in points]
    return lines + table(["ratio", "method", "allocation", "LoRA steps", "MLP removed", "PPL", "excess"], rows)


def render_channels_vs_factors(d):
    texts = list(d["dense"])
    lines = [f"{d['setup']['model']}; {d['setup']['eval']}; ratios count the MLP projections only.", ""]
    rows = [["dense", "—", "—", "—"] + [f"{d['dense'][t]:.2f}" for t in texts]]
    for p in d["points"]:
        mix = p["allocation_mix"]
        rows.append([p["key"], num(p["ratio_mlp"], 4), f"{mix['ratio_by_channels']:.3f} / {mix['ratio_by_ranks']:.3f}",
                     str(mix["layers_narrowed"])] + [ppl_cell(p, t) for t in texts])
    return lines + table(["method/allocation/ratio", "MLP removed", "channels / ranks", "layers narrowed"]
                         + [f"PPL {t}" for t in texts], rows)


def render_gemma3_dense_check(d):
    g = d["greedy"]
    rows = [[f"{text} (6 × 2048 tokens, transformers float32, <bos> on every window)", f"{v['ppl']:.2f}"]
            for text, v in d["dense_ppl"].items()]
    rows += [[f"{text}, the same tokens in windows without <bos>", f"{v['ppl']:.2f}"]
             for text, v in d.get("dense_ppl_windows_without_bos", {}).items()]
    if d.get("vllm"):
        rows.append([f"builtin:heldout through vLLM ({d['vllm']['dtype']})",
                     f"{d['vllm']['ppl_builtin_heldout']['ppl']:.2f}"])
    lines = [f"{d['model']}. Greedy continuation of \"{g['prompt']}\": with <bos> \"{g['with_bos']['text'].strip()}\"; "
             f"without <bos> \"{g['without_bos']['text'].strip()}\".", ""] + table(["dense perplexity", "PPL"], rows)
    for name, c in d.get("compressed", {}).items():
        prov, mix = c["provenance"], c["provenance"]["allocation_mix"]
        lines += ["", f"`{name}`: `--method {prov['method']} --scope {prov['scope']} "
                      f"--ratio {prov['ratio_requested']}`, "
                      f"{prov['ratio_achieved_linears']:.4f} of the decoder linears removed (MLP "
                      f"{prov['ratio_achieved_mlp']:.4f}, model {prov['ratio_achieved_model']:.4f}); by MLP channels "
                      f"{mix['ratio_by_channels']:.3f}, MLP ranks {mix['ratio_by_mlp_ranks']:.3f}, attention ranks "
                      f"{mix['ratio_by_attention_ranks']:.3f}; {mix['layers_narrowed']} layers narrowed, "
                      f"{mix['factored_modules']} projections factored.", ""]
        lines += table(["text", "dense", "compressed", "excess"],
                       [[t, f"{v['dense']:.2f}", f"{v['ppl']:.2f}", f"{v['excess']:.3f}"] for t, v in c["ppl"].items()])
        if c.get("vllm"):
            lines += ["", f"Served by vLLM ({c['vllm']['dtype']}): greedy \"{c['vllm']['text'].strip()}\"; "
                          f"MLPs running the fused op: {c['vllm']['fused_mlps']}."]
    return lines


def render_neuron_check(d):
    rows = [[s["name"], s["status"], (s.get("summary") or s.get("reason") or "").replace("|", "/")]
            for s in d["steps"]]
    sdk = d.get("sdk", {})
    return [f"Mode `{d['mode']}`; real `nki` importable: {sdk.get('real_nki')}; vllm-neuron: "
            f"{sdk.get('vllm_neuron') or 'not installed'}.", ""] + table(["step", "status", "result"], rows)


def render_kernel_study(d):
    """Per target: each kernel's average over the prefill lengths (S >= 1K, the paper's Table 2 range)."""
    lines = ["**Modelled on the project's NKI emulator, not measured on Trainium.** DeepSeek-V3 up_proj shapes "
             f"K = {d['shapes']['K']}, r = {d['shapes']['r']}, N = {d['shapes']['N']}, {d['shapes']['dtype']}.", ""]
    rows = []
    for target, res in d["targets"].items():
        for kernel, per_s in res["rows"].items():
            prefill = [row for s, row in per_s.items() if int(s) >= 1024]
            if not prefill:
                continue
            mean = {k: sum(r[k] for r in prefill) / len(prefill) for k in ("hbm_gb", "latency_ms", "mfu")}
            rows.append([target, kernel, f"{mean['hbm_gb']:.2f} GB", f"{mean['latency_ms']:.2f} ms",
                         f"{mean['mfu']:.2f}"])
        sel = res.get("selector")
        if sel:
            rows.append([target, f"block-size selector: BM = {sel['pick']}", "—",
                         f"{sel['pick_ms']:.2f} ms at S = 4096 ({sel['pick_over_best']:+.1%} of the sweep's best)",
                         "—"])
    lines += ["Our own kernels and improved baselines (what we compare against ourselves); the paper's kernels as "
              "it measured them are in the paper check below.", ""]
    lines += table(["target", "kernel (average over S = 1K…32K)", "HBM traffic", "modelled latency", "MFU"], rows)
    return lines


def render_paper_check(d):
    lines = ["**Modelled, not measured on Trainium.** Each modelled point against the paper's measured one; "
             "points marked *fitted* set the one fitted knob, all others are held out.", "",
             f"Fused over sequential (Table 2 averages): {d['fused_over_seq']:.2f}× (paper 1.35×); fused over dense: "
             f"{d['fused_over_dense']:.2f}× (paper 2.09×). "
             f"Fitted: `{d['fitted']['name']}` = {d['fitted']['value']} on "
             f"{', '.join(d['fitted']['fitted_on'])} (rms error {d['fitted']['fit_rms']:.1%}).", ""]
    rows = [[str(p["id"]), p["kernel"], p["metric"], f"{p['measured']:.4g}", f"{p['modeled']:.4g}",
             f"{p['modeled'] / p['measured'] - 1:+.1%}" if p["measured"] else "—",
             "held out" if p["held_out"] else "fitted"] for p in d["points"]]
    return lines + table(["point", "kernel", "metric", "measured", "modelled", "error", "role"], rows)


def render_attention_kernels(d):
    lines = ["**Modelled on the project's NKI emulator, not measured on Trainium.** The fused XUV kernel against "
             f"the dense blocked matmul at {d['model']}'s attention projections, {d['dtype']}, at the eq.-5 ranks of "
             "per-matrix ratios " + ", ".join(next(iter(d["ranks"].values()))) + "; the break-even rank is the "
             "smallest multiple of 128 at which the fused kernel is no faster than dense.", ""]
    rows = []
    for target, res in d["targets"].items():
        for shape, per_s in res.items():
            for s, point in per_s.items():
                dense = point["dense"]["latency_ms"] * 1e3
                rows.append([target, shape, s, f"{dense:.0f} µs"]
                            + [f"r={f['rank']}: {f['latency_ms'] * 1e3:.0f} µs ({f['speedup_vs_dense']:.2f}×)"
                               for f in point["fused"].values()]
                            + [str(point["break_even"]["rank"])])
    ratios = list(next(iter(d["ranks"].values())))
    return lines + table(["target", "projection", "S", "dense_xw"] + [f"fused, ratio {r}" for r in ratios]
                         + ["break-even rank"], rows)


SECTIONS = [
    Section("whole_model.json", "Whole-model budgets on SmolLM2-135M (the default)",
            "python benchmarks/whole_model.py --work /tmp/wm", render_whole_model, ("hybrid", "all")),
    Section("serving_whole_model.json", "Serving at 0.2: dense, the default, the same parameters from the MLP only",
            "python benchmarks/serving.py --model dense=... --model all=... --model mlp=...", render_serving,
            ("hybrid", "all")),
    Section("gemma3_dense_check.json", "Gemma 3 270M: the converted dense model",
            "python benchmarks/gemma3_dense_check.py --work /tmp/g3w", render_gemma3_dense_check),
    Section("compress_scale.json", "Compression time and peak memory",
            "python benchmarks/compress_scale.py --work /tmp/scale --runs llama-3.1-8b:4:hybrid:default",
            render_compress_scale,
            note="The runs record their own method and scope; the SmolLM2 rows were made with `--scope mlp`."),
    Section("channel_order_timing.json", "The hybrid's channel order at the 8B width",
            "python benchmarks/channel_order_timing.py --work /tmp/chanorder", render_channel_order),
    Section("allocate_timing.json", "Greedy allocation time at the 8B shape",
            "python benchmarks/allocate_timing.py", render_allocate_timing),
    Section("kernel_study.json", "Kernel study at the paper's DeepSeek-V3 shapes (modelled)",
            "python benchmarks/kernel_study.py", render_kernel_study),
    Section("kernel_paper_check.json", "The kernel model against the paper's measured points",
            "python benchmarks/kernel_study.py --paper-check --json benchmarks/results/kernel_paper_check.json",
            render_paper_check),
    Section("attention_kernels.json", "Attention projections of Llama-3.1-8B (modelled)",
            "python benchmarks/attention_kernels.py", render_attention_kernels),
    Section("neuron/neuron_check.json", "`make neuron-check` on the development machine",
            "make neuron-check", render_neuron_check),
    Section("accuracy_vs_ratio.json", "Compression accuracy vs ratio on SmolLM2-135M",
            "python benchmarks/accuracy_vs_ratio.py --work /tmp/acc", render_accuracy_vs_ratio, ("fisher", "mlp")),
    Section("channels_vs_factors.json", "Channels, factors and the hybrid on SmolLM2-135M",
            "python benchmarks/channels_vs_factors.py --work /tmp/chan", render_channels_vs_factors,
            ("hybrid", "mlp")),
    Section("serving_channels.json", "Serving at 0.2: dense, the hybrid, Nyström only",
            "python benchmarks/serving.py --model dense=... --model hybrid=... --model nystrom=...",
            render_serving, ("hybrid", "mlp")),
    Section("serving.json", "Serving throughput, dense vs compressed",
            "python benchmarks/serving.py --dense ... --compressed ...", render_serving, ("fisher", "mlp")),
]


# --- provenance -----------------------------------------------------------------------------------

def command_of(d: dict, section: Section) -> str:
    return (d.get("command") or d.get("environment", {}).get("command") or section.command).strip()


def date_of(d: dict, path: Path) -> str:
    recorded = d.get("date") or d.get("started")
    if recorded:
        return str(recorded)[:10]
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "date not recorded"


def current_default() -> Tuple[str, str]:
    """(method, scope) that `compress MODEL OUT --ratio R` uses today, read from the tool's options."""
    sys.path.insert(0, str(ROOT))
    from vllm_neuronmlp.tools.methods import DEFAULT_METHOD
    from vllm_neuronmlp.tools.options import CompressOptions

    opts = CompressOptions(ratio=0.2, method=DEFAULT_METHOD)
    opts.validate()
    return DEFAULT_METHOD, opts.scope


def render_section(section: Section, default: Tuple[str, str], results: Path = RESULTS) -> Tuple[bool, List[str]]:
    """(archived, lines) of one section; a missing results file is said, not skipped silently."""
    path = results / section.file
    head = f"## {section.title}"
    if not path.exists():
        return False, [head, "", f"`benchmarks/results/{section.file}` is missing: run `{section.command}`.", ""]
    d = json.loads(path.read_text())
    archived = section.default_when_run is not None and section.default_when_run != default
    lines = [head, "", f"`{command_of(d, section)}` — {date_of(d, path)}; "
                       f"results: `benchmarks/results/{section.file}`"
                       + (" and its `.png`" if path.with_suffix(".png").exists() else "") + "."]
    if archived:
        method, scope = section.default_when_run
        lines += ["", f"*Made under an older default (`--method {method} --scope {scope}`; today's is "
                      f"`--method {default[0]} --scope {default[1]}`).*"]
    if section.note:
        lines += ["", section.note]
    lines += [""] + section.render(d) + [""]
    return archived, lines


def render(results: Path = RESULTS, default: Optional[Tuple[str, str]] = None) -> str:
    """The whole of docs/results.md; `default` (method, scope) is today's compress default unless given."""
    default = default or current_default()
    current, archive = [], []
    for section in SECTIONS:
        archived, lines = render_section(section, default, results)
        (archive if archived else current).extend(lines)
    head = ["# Results", "",
            "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand "
            "(tests/test_results_report.py checks it). Every run was made on the project's development machine "
            "(2 CPU cores, no accelerator) unless its section says otherwise; kernel latencies are modelled on the "
            "project's NKI emulator, not measured on Trainium.", ""]
    tail = ["# Archive: runs made under an older default", ""] + archive if archive else []
    return "\n".join(head + current + tail).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from what would be written")
    ap.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default docs/results.md)")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        print(f"{args.output}: {'up to date' if same else 'STALE: run python benchmarks/report.py'}")
        return 0 if same else 1
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
