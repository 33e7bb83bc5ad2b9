"""The NeuronMM kernel study on the project's NKI emulator (count-only runs, timeline cost
model), and the model checked against the paper's measured tables.

Our kernels: dense_xw and sequential_xuv (our improved baselines), fused_xuv (TrainiumFusion at
the block-size selector's block, with the target's transposing load: the tensor engine on
trn1, DMA on trn2) at DeepSeek-V3 up_proj shapes K=7168, r=4096, N=18432 (bf16), prefill
S = 1K ... 32K and decode S = 1, 8, 32, 128, 512; per kernel and S: modelled latency, MFU,
HBM bytes, static/dynamic instruction counts, per-engine busy and stall time, and the
roofline time of the launch (max(FLOPs / peak, HBM bytes / HBM bandwidth)). Block sweep at
S=4096 and the selector's pick.

The paper check (`--paper-check`, also part of the full run): the paper's kernels as it
measured them (tutorial tiling with all-M bf16 accumulators, separate transpose launches,
the fused kernel with transposed output; `baselines.paper_launches`) against its trn1
tables: structure first (HBM bytes, transpose FLOPs, spill bytes), then the time, with ONE
knob (the tensor engine's efficiency while busy) fitted on Table 3's BM = 128 ... 1024
only and everything else held out, at both ends of the bracket of undocumented constants.

Every number is MODELLED, not measured.

    python benchmarks/kernel_study.py        # writes benchmarks/results/kernel_study.{json,png}
    python benchmarks/kernel_study.py --paper-check --json benchmarks/results/kernel_paper_check.json
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time

from dataclasses import replace

from vllm_neuronmlp.kernels import baselines, blocking, sim, strip_plan

K, R, N = 7168, 4096, 18432
SEQS = [1024, 2048, 4096, 8192, 16384, 32768]
DECODE = [1, 8, 32, 128, 512]
SWEEP_S = 4096
SWEEP_BM = [128, 256, 512, 1024, 2048, 4096]
KERNELS = ("dense_xw", "sequential_xuv", "fused_xuv")
BF = "bfloat16"

PAPER = {
    "source": "NeuronMM (trn1, bf16, measured): Tables 1-3 as quoted in docs/kernels.md",
    "table1_ms": {"sequential_xuv": 1.57, "naive_fused_xuv": 18.06},
    "table1_shape": {"S": 2048, "K": 2048, "r": 2048, "N": 8192},
    "table2_avg_ms": {"dense_xw": 57.89, "sequential_xuv": 37.47, "fused_xuv": 27.63},
    "table2_avg_mfu": {"dense_xw": 0.6409, "sequential_xuv": 0.6524, "fused_xuv": 0.8520},
    "table2_avg_hbm_gb": {"dense_xw": 9.93, "sequential_xuv": 6.52, "fused_xuv": 2.47},
    "table3_ms": {128: 31.25, 256: 16.02, 512: 11.02, 1024: 10.99, 2048: 11.07, 4096: 12.50},
    "s32k_ms": {"dense_xw": 186.60, "fused_xuv": 84.15},
}
GOALS = {"held_out_error_at_most": 0.15, "selector_within_of_best": 0.05,
         "fused_static_instructions_constant_in_S": True}
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(name, S, target, block_m=None, shape=(K, R, N)):
    """Count-only Stats of one launch of our kernels (fused_xuv: the selector's block and
    the transposing load `blocking.x_transpose_choice` picks for the target)."""
    k, r, n = shape
    x, u, v = sim.spec((S, k), BF), sim.spec((k, r), BF), sim.spec((r, n), BF)
    if name == "dense_xw":
        return sim.run(baselines.dense_xw, x, sim.spec((k, n), BF), target=target,
                       count_only=True)[1]
    if name == "sequential_xuv":
        return sim.run(baselines.sequential_xuv, x, u, v, target=target, count_only=True)[1]
    if name == "naive_fused_xuv":
        return sim.run(baselines.naive_fused_xuv, x, u, v, target=target, count_only=True)[1]
    ks = fused_shape(S, k, r, n, target)
    if block_m is None:
        block_m = blocking.select_block_m(ks, target)
    how = blocking.x_transpose_choice(ks, block_m, target)
    return blocking.modeled_stats(replace(ks, x_transpose=how), block_m, target)


def fused_shape(S, k, r, n, target):
    """The fused kernel's shape with the target's default transposing load."""
    name = target if isinstance(target, str) else target.name
    return strip_plan.xuv_shape(S, k, r, n, x_transpose=strip_plan.default_x_transpose(name))


def row(st, target, **extra):
    t = sim.get_target(target)
    roof = max(st.flops / t.peak_flops, st.hbm_bytes / t.hbm_bytes_per_s)
    d = {"latency_ms": st.modeled_latency_s * 1e3, "mfu": st.mfu, "hbm_gb": st.hbm_bytes / 1e9,
         "gflop": st.flops / 1e9, "roofline_ms": roof * 1e3,
         "roofline_bound": "compute" if st.flops / t.peak_flops >= st.hbm_bytes / t.hbm_bytes_per_s
         else "HBM",
         "static_instructions": st.static_instructions,
         "dynamic_instructions": st.dynamic_instructions,
         "busy_ms": {k: v * 1e3 for k, v in st.engine_busy_s.items() if v},
         "stall_ms": {k: v * 1e3 for k, v in st.engine_stall_s.items() if v},
         "sbuf_peak_kib": st.sbuf_peak_bytes / 1024, "dma_count": st.dma_count,
         "spill_gb": st.spill_bytes / 1e9, "transpose_gflop": st.transpose_flops / 1e9}
    d.update(extra)
    return d


def study(target, seqs, log):
    rows = {name: {} for name in KERNELS}
    for S in seqs:
        for name in KERNELS:
            t0 = time.time()
            bm = blocking.select_block_m(fused_shape(S, K, R, N, target), target) \
                if name == "fused_xuv" else None
            st = run(name, S, target, bm)
            rows[name][S] = row(st, target, **({"block_m": bm} if bm else {}))
            r = rows[name][S]
            log(f"  {target} S={S:6d} {name:15s} {r['latency_ms']:9.3f} ms (roofline "
                f"{r['roofline_ms']:8.3f}) MFU {r['mfu']:5.3f} {r['hbm_gb']:7.3f} GB static "
                f"{r['static_instructions']:6d} ({time.time() - t0:.1f} s)")
    return rows


def sweep(target, log):
    """Our fused kernel at every BM of the paper's sweep (S=4096) and the selector's pick;
    BMs whose plan exceeds SBUF run with the emulator's spills."""
    ks = fused_shape(SWEEP_S, K, R, N, target)
    pick = blocking.select_block_m(ks, target)
    out = {}
    for bm in sorted(set(SWEEP_BM) | {pick}):
        out[bm] = row(run("fused_xuv", SWEEP_S, target, bm), target, block_m=bm)
        log(f"  {target} sweep BM={bm:5d} {out[bm]['latency_ms']:8.3f} ms "
            f"(spill {out[bm]['spill_gb']:.2f} GB)")
    best = min(r["latency_ms"] for r in out.values())
    sel = {"pick": pick, "pick_ms": out[pick]["latency_ms"], "best_ms": best,
           "pick_over_best": out[pick]["latency_ms"] / best - 1.0}
    return out, sel


# -- the paper check -------------------------------------------------------------------------
#
# The model against the paper's measured points (trn1), with the paper's kernels as it measured
# them (kernels/baselines.py, `paper_launches`): first the structure (HBM bytes, transpose FLOPs,
# spills), then the time. One knob (FIT_KNOB: the tensor engine's efficiency while busy) is
# fitted on Table 3's BM = 128 ... 1024 points only; every other point is held out. Every
# undocumented constant is bracketed (`sim.targets.bracket_end`): the whole check, fit
# included, runs at each end of the bracket; `modeled` is the optimistic end (unknown
# overheads at their cheapest), `modeled_pessimistic` the other.

FIT_KNOB = "pe_efficiency"
FIT_RANGE = (0.6, 1.0)
FIT_STEP = 0.01
FIT_BMS = (128, 256, 512, 1024)
TABLE1 = (2048, 2048, 2048, 8192)          # S, K, r, N
PAPER_STRUCTURE = {"table2_transpose_gflop": {"dense_xw": 68.01, "sequential_xuv": 78.92},
                   "table1_hbm_mb": {"sequential_xuv": 298.66}}
DONE = {"held_out_error_at_most": 0.15, "fused_over_seq": (1.15, 1.55),
        "fused_over_dense": (1.8, 2.4)}


def paper_sequence(name, S, target, shape=(K, R, N), block_m=None):
    """SequenceStats of the paper's launch sequence for `name` (count-only)."""
    k, r, n = shape
    tensors = {"x": (S, k), "w": (k, n), "u": (k, r), "v": (r, n)}
    kw = {"block_m": block_m} if block_m else {}
    return baselines.run_launches(baselines.paper_launches(name, **kw), tensors, target,
                                  count_only=True)[1]


def paper_model(target, log, fit_only=False):
    """Every modelled paper point on `target`: {point id: (metric, value)} plus the raw
    Table 2 rows. fit_only: Table 3's fit points only."""
    out = {}
    for bm in (FIT_BMS if fit_only else SWEEP_BM):
        st = paper_sequence("fused_xuv", SWEEP_S, target, block_m=bm)
        out[f"t3_bm{bm}"] = ("ms", st.latency_s * 1e3)
        if bm >= 2048:
            out[f"t3_bm{bm}_spill"] = ("spill_gb", st.spill_bytes / 1e9)
    if fit_only:
        return out, None
    rows = {name: {} for name in KERNELS}
    for S in SEQS:
        for name in KERNELS:
            st = paper_sequence(name, S, target)
            rows[name][S] = {"latency_ms": st.latency_s * 1e3, "hbm_gb": st.hbm_bytes / 1e9,
                             "transpose_gflop": st.transpose_flops / 1e9, "mfu": st.mfu,
                             "spill_gb": st.spill_bytes / 1e9,
                             "launches_ms": [[n, x.modeled_latency_s * 1e3] for n, x in st.launches]}
    log(f"  Table 2 sequences on {target.name} done")
    mean = lambda name, key: sum(rows[name][S][key] for S in SEQS) / len(SEQS)   # noqa: E731
    for name in KERNELS:
        out[f"t2_{name}_ms"] = ("ms", mean(name, "latency_ms"))
        out[f"t2_{name}_hbm"] = ("hbm_gb", mean(name, "hbm_gb"))
    for name in PAPER_STRUCTURE["table2_transpose_gflop"]:
        out[f"t2_{name}_transpose"] = ("transpose_gflop", mean(name, "transpose_gflop"))
    for name in PAPER["s32k_ms"]:
        out[f"s32k_{name}"] = ("ms", rows[name][32768]["latency_ms"])
    S1, k1, r1, n1 = TABLE1
    st = paper_sequence("sequential_xuv", S1, target, shape=(k1, r1, n1))
    out["t1_sequential_xuv"] = ("ms", st.latency_s * 1e3)
    out["t1_sequential_xuv_hbm"] = ("hbm_mb", st.hbm_bytes / 1e6)
    st = run("naive_fused_xuv", S1, target, shape=(k1, r1, n1))
    out["t1_naive_fused_xuv"] = ("ms", st.modeled_latency_s * 1e3)
    return out, rows


def measured_points():
    """{point id: (kernel, shape, metric, measured)} of every paper number checked."""
    big = f"K={K} r={R} N={N}"
    pts = {}
    for bm, ms in PAPER["table3_ms"].items():
        pts[f"t3_bm{bm}"] = ("fused_xuv", f"S={SWEEP_S} {big} BM={bm}", "ms", ms)
    for name in KERNELS:
        pts[f"t2_{name}_ms"] = (name, f"mean over S=1K..32K, {big}", "ms", PAPER["table2_avg_ms"][name])
        pts[f"t2_{name}_hbm"] = (name, f"mean over S=1K..32K, {big}", "hbm_gb",
                                 PAPER["table2_avg_hbm_gb"][name])
    for name, g in PAPER_STRUCTURE["table2_transpose_gflop"].items():
        pts[f"t2_{name}_transpose"] = (name, f"mean over S=1K..32K, {big}", "transpose_gflop", g)
    for name, ms in PAPER["s32k_ms"].items():
        pts[f"s32k_{name}"] = (name, f"S=32768 {big}", "ms", ms)
    t1 = "S=2048 K=2048 r=2048 N=8192"
    pts["t1_sequential_xuv"] = ("sequential_xuv", t1, "ms", PAPER["table1_ms"]["sequential_xuv"])
    pts["t1_sequential_xuv_hbm"] = ("sequential_xuv", t1, "hbm_mb",
                                    PAPER_STRUCTURE["table1_hbm_mb"]["sequential_xuv"])
    pts["t1_naive_fused_xuv"] = ("naive_fused_xuv", t1, "ms", PAPER["table1_ms"]["naive_fused_xuv"])
    return pts


def fit_knob(base, log):
    """Grid search of FIT_KNOB over FIT_RANGE in steps of FIT_STEP minimising the RMS
    relative error on Table 3's BM = 128 ... 1024 (nothing else is looked at). A grid, not
    a bisection: the modelled time is not smooth in the knob (a greedy schedule can flip
    to another order, e.g. +13% at BM = 256 between 0.862 and 0.864). Returns (value, rms)."""
    lo, hi = FIT_RANGE
    grid = [round(lo + i * FIT_STEP, 4) for i in range(int(round((hi - lo) / FIT_STEP)) + 1)]
    losses = {}
    for v in grid:
        model, _ = paper_model(dataclasses.replace(base, **{FIT_KNOB: v}), log, fit_only=True)
        errs = [model[f"t3_bm{bm}"][1] / PAPER["table3_ms"][bm] - 1 for bm in FIT_BMS]
        losses[v] = (sum(e * e for e in errs) / len(errs)) ** 0.5
    best = min(losses, key=losses.get)
    log(f"    fit {FIT_KNOB} = {best}: rms {losses[best]:.4f} over {len(grid)} grid points")
    return best, losses[best]


def paper_check(log):
    """The JSON the README quotes (see the module doc and docs/kernels.md)."""
    ends = {}
    for end in ("optimistic", "pessimistic"):
        log(f"[paper check] bracket end: {end}")
        base = sim.targets.bracket_end(sim.TRN1, end)
        value, rms = fit_knob(base, log)
        model, rows = paper_model(dataclasses.replace(base, **{FIT_KNOB: value}), log)
        ends[end] = {"fitted": {"name": FIT_KNOB, "value": value, "fit_rms": rms,
                                "fitted_on": [f"t3_bm{bm}" for bm in FIT_BMS]},
                     "model": model, "rows": rows}
    opt, pes = ends["optimistic"], ends["pessimistic"]
    points = []
    for pid, (kernel, shape, metric, measured) in measured_points().items():
        modeled, worst = opt["model"][pid][1], pes["model"][pid][1]
        points.append({"id": pid, "shape": shape, "kernel": kernel, "metric": metric,
                       "measured": measured, "modeled": modeled, "error": modeled / measured - 1,
                       "modeled_pessimistic": worst, "error_pessimistic": worst / measured - 1,
                       "held_out": pid not in opt["fitted"]["fitted_on"]})
    ratio = lambda m, a, b: m[f"t2_{a}_ms"][1] / m[f"t2_{b}_ms"][1]   # noqa: E731
    held = [p for p in points if p["held_out"]]
    worst = max(held, key=lambda p: abs(p["error"]))
    result = {
        "modelled": True,
        "note": "the project's NKI emulator (timeline cost model) against the paper's trn1 "
                "measurements; a model, not a hardware measurement",
        "points": points,
        "fused_over_seq": ratio(opt["model"], "sequential_xuv", "fused_xuv"),
        "fused_over_dense": ratio(opt["model"], "dense_xw", "fused_xuv"),
        "fused_over_seq_pessimistic": ratio(pes["model"], "sequential_xuv", "fused_xuv"),
        "fused_over_dense_pessimistic": ratio(pes["model"], "dense_xw", "fused_xuv"),
        "fitted": opt["fitted"], "fitted_pessimistic": pes["fitted"],
        "bracket": {end: {k: getattr(sim.targets.bracket_end(sim.TRN1, end), k)
                          for k in ("access_overhead_cycles", "dma_transpose_efficiency",
                                    "swdge_dynamic_s")} for end in ends},
        "spill_gb_table3": {str(bm): opt["model"][f"t3_bm{bm}_spill"][1] for bm in (2048, 4096)},
        "table2_rows": {end: e["rows"] for end, e in ends.items()},
        "done_when": DONE,
        "held_out_max_abs_error": abs(worst["error"]), "held_out_worst": worst["id"],
        "held_out_over_15pct": [p["id"] for p in held if abs(p["error"]) > DONE["held_out_error_at_most"]],
    }
    lo, hi = DONE["fused_over_seq"]
    result["fused_over_seq_in_range"] = lo <= result["fused_over_seq"] <= hi
    lo, hi = DONE["fused_over_dense"]
    result["fused_over_dense_in_range"] = lo <= result["fused_over_dense"] <= hi
    return result


def static_independence(log):
    counts = {}
    for S in (1024, 4096, 32768):
        st = run("fused_xuv", S, "trn1", 1024)
        counts[S] = st.static_instructions
    log(f"  fused_xuv static instructions at BM=1024: {counts}")
    return {"block_m": 1024, "static_instructions": counts,
            "constant": len(set(counts.values())) == 1}


# -- plot -------------------------------------------------------------------------------------

def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    rows = result["targets"]["trn1"]["rows"]
    seqs = result["seqs"]
    styles = {"dense_xw": "o-", "sequential_xuv": "s-", "fused_xuv": "^-"}
    ax = axes[0, 0]
    for name, st in styles.items():
        ax.plot(seqs, [rows[name][str(S)]["latency_ms"] for S in seqs], st, label=name)
        ax.plot(seqs, [rows[name][str(S)]["roofline_ms"] for S in seqs], st[0] + ":",
                alpha=0.5, label=f"{name} roofline")
    ax.set(title="trn1 modelled latency (prefill and decode)", xlabel="S", ylabel="ms",
           xscale="log", yscale="log")
    ax = axes[0, 1]
    for name, st in styles.items():
        ax.plot(seqs, [rows[name][str(S)]["mfu"] for S in seqs], st, label=name)
    ax.set(title="trn1 modelled MFU", xlabel="S", ylabel="MFU", xscale="log", ylim=(0, 1.05))
    ax = axes[0, 2]
    for name, st in styles.items():
        ax.plot(seqs, [rows[name][str(S)]["hbm_gb"] for S in seqs], st, label=name)
    ax.set(title="HBM traffic", xlabel="S", ylabel="GB", xscale="log", yscale="log")
    ax = axes[1, 0]
    pre = [S for S in seqs if S >= 1024]
    width = 0.25
    for i, name in enumerate(styles):
        busy = [rows[name][str(S)]["busy_ms"].get("tensor", 0) for S in pre]
        stall = [rows[name][str(S)]["stall_ms"].get("tensor", 0) for S in pre]
        xs = [j + (i - 1) * width for j in range(len(pre))]
        ax.bar(xs, busy, width, label=f"{name} PE busy")
        ax.bar(xs, stall, width, bottom=busy, alpha=0.4, label=f"{name} PE stalled")
    ax.set_xticks(range(len(pre)), [f"{S // 1024}K" for S in pre])
    ax.set(title="tensor engine: busy vs waiting on inputs (trn1)", ylabel="ms", yscale="log")
    ax = axes[1, 1]
    sw = result["targets"]["trn1"]["sweep"]
    bms = sorted(int(b) for b in sw)
    ax.plot(bms, [sw[str(b)]["latency_ms"] for b in bms], "o-", label="our fused kernel (model)")
    pc = result.get("paper_check")
    if pc:
        t3 = {p["id"]: p for p in pc["points"]}
        ax.plot(SWEEP_BM, [t3[f"t3_bm{bm}"]["modeled"] for bm in SWEEP_BM], "s--",
                label="paper's kernel (model, knob fitted on BM<=1024)")
    ax.plot(SWEEP_BM, [PAPER["table3_ms"][bm] for bm in SWEEP_BM], "k^:", label="paper (measured)")
    ax.set(title=f"block sweep, S={SWEEP_S} (trn1)", xlabel="BM", ylabel="ms", xscale="log")
    ax.set_xticks(SWEEP_BM, [str(b) for b in SWEEP_BM])
    ax.minorticks_off()
    ax = axes[1, 2]
    if pc:
        pts = pc["points"]
        ys = range(len(pts))
        ax.barh([j - 0.2 for j in ys], [100 * p["error"] for p in pts], 0.4,
                label="optimistic end (nominal)")
        ax.barh([j + 0.2 for j in ys], [100 * p["error_pessimistic"] for p in pts], 0.4,
                label="pessimistic end")
        ax.set_yticks(list(ys), [p["id"] + ("" if p["held_out"] else " (fit)") for p in pts],
                      fontsize=6)
        ax.set_xlim(-100, 100)
    ax.axvline(15, color="k", ls=":")
    ax.axvline(-15, color="k", ls=":")
    ax.set(title="model vs paper: error (%), clipped at +-100", xlabel="%")
    for a in axes.flat:
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=6)
    fig.suptitle("NeuronMM kernels on the NKI emulator's timeline model, K=7168 r=4096 N=18432 "
                 "bf16 (modelled, not hardware timings)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="trn1,trn2")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "kernel_study"))
    ap.add_argument("--paper-check", action="store_true",
                    help="only the model against the paper's measured points")
    ap.add_argument("--json", default=os.path.join(OUT_DIR, "kernel_paper_check.json"),
                    help="where --paper-check (and the full run) write the paper check")
    ap.add_argument("--no-paper-check", action="store_true")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)   # noqa: E731
    start = time.time()
    command = "python benchmarks/kernel_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = {"python": sys.version.split()[0], "machine": platform.machine(), "command": command}
    check = None
    if not args.no_paper_check:
        check = paper_check(log)
        check["environment"] = dict(env, wall_s=time.time() - start)
        check["command"] = command
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(check, f, indent=1, default=str)
        paper_summary(check, log)
        log(f"wrote {args.json}")
        if args.paper_check:
            return check
    seqs = DECODE + SEQS
    result = {"shapes": {"K": K, "r": R, "N": N, "dtype": BF}, "seqs": seqs, "paper": PAPER,
              "goals": GOALS, "modelled": True, "targets": {}}
    for target in args.targets.split(","):
        log(f"[{target}] kernels")
        t0 = time.time()
        rows = study(target, seqs, log)
        sw, sel = sweep(target, log)
        result["targets"][target] = {
            "rows": {n: {str(S): r for S, r in rs.items()} for n, rs in rows.items()},
            "sweep": {str(b): r for b, r in sw.items()}, "selector": sel,
            "wall_s": time.time() - t0}
    result["static_instructions_vs_S"] = static_independence(log)
    if check is not None:
        result["paper_check"] = {k: check[k] for k in ("points", "fused_over_seq", "fused_over_dense",
                                                         "fitted", "held_out_over_15pct")}
    result["goals_met"] = goals_met(result)
    result["wall_s"] = time.time() - start
    result["environment"] = env
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    if "trn1" in result["targets"]:
        plot(result, args.out + ".png")
    summary(result, log)
    log(f"wall time {result['wall_s']:.0f} s; wrote {args.out}.json")
    return result


def paper_summary(check, log):
    log("\n== the model against the paper (trn1; modelled, optimistic / pessimistic end) ==")
    for p in check["points"]:
        log(f"  {p['id']:24s} {p['metric']:16s} paper {p['measured']:9.2f}  model {p['modeled']:9.2f} "
            f"({100 * p['error']:+6.1f}%)  pessimistic {p['modeled_pessimistic']:9.2f} "
            f"({100 * p['error_pessimistic']:+6.1f}%){'' if p['held_out'] else '  [fitted]'}")
    log(f"  fused/seq {check['fused_over_seq']:.2f} (pessimistic {check['fused_over_seq_pessimistic']:.2f}), "
        f"fused/dense {check['fused_over_dense']:.2f} (pessimistic {check['fused_over_dense_pessimistic']:.2f}); "
        f"fitted {check['fitted']['name']} = {check['fitted']['value']} "
        f"(pessimistic {check['fitted_pessimistic']['value']})")


def goals_met(result):
    """The issue's three goals, each with the figure it was judged on."""
    out = {"selector_within_5pct_of_best": {
        t: [r["selector"]["pick_over_best"],
            r["selector"]["pick_over_best"] <= GOALS["selector_within_of_best"]]
        for t, r in result["targets"].items()},
        "fused_static_instructions_constant_in_S": result["static_instructions_vs_S"]["constant"]}
    pc = result.get("paper_check")
    if pc:
        out["held_out_over_15pct"] = pc["held_out_over_15pct"]
    return out


def summary(result, log):
    for target, res in result["targets"].items():
        log(f"\n== {target} (modelled) ==  selector: BM={res['selector']['pick']} "
            f"{100 * res['selector']['pick_over_best']:+.1f}% vs best in sweep")
        for S in result["seqs"]:
            cells = [f"{res['rows'][n][str(S)]['latency_ms']:9.3f}ms/{res['rows'][n][str(S)]['roofline_ms']:8.3f}"
                     for n in KERNELS]
            log(f"{S:6d} | " + " | ".join(cells))
    log(f"goals: {json.dumps(result['goals_met'])}")


if __name__ == "__main__":
    main()
