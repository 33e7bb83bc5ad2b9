"""The NeuronMM kernel study, modelled by the project's NKI emulator (count-only runs).

DeepSeek-V3 up_proj shapes K=7168, r=4096, N=18432 (bf16), S = 1K ... 32K tokens:
dense_xw (NKI XW), sequential_xuv (NKI XUV) and fused_xuv (TrainiumFusion) -- HBM
traffic, FLOPs, modelled latency, MFU, peak SBUF -- on trn1 (the paper's target) and
trn2; averages beside the paper's; then the block-size sweep at S=4096 beside the
paper's table 3.

fused_xuv runs twice: with the block the kernels use by default (the block-size
model's fastest modelled block, fewest HBM bytes among ties) and with the paper's
literal rule, the smallest block clearing the roofline ridge.

Every number here is MODELLED by the emulator's cost model (see kernels/sim/runner.py),
not measured on hardware.

    python benchmarks/kernel_study.py            # writes benchmarks/results/kernel_study.{json,png}
"""
import argparse
import json
import os
import platform
import sys
import time

from vllm_neuronmlp.kernels import baselines, blocking, sim, xuv

K, R, N = 7168, 4096, 18432
SEQS = [1024, 2048, 4096, 8192, 16384, 32768]
SWEEP_S = 4096
SWEEP_BM = [128, 256, 512, 1024, 2048, 4096]

PAPER = {
    "avg_hbm_gb": {"dense_xw": 9.93, "sequential_xuv": 6.52, "fused_xuv": 2.47},
    "avg_latency_ms": {"dense_xw": 57.89, "sequential_xuv": 37.47, "fused_xuv": 27.63},
    "fused_mfu": 0.85,
    "speedup_vs_dense": 2.09, "speedup_vs_sequential": 1.35,
    "sweep_ms": {128: 31.25, 256: 16.02, 512: 11.02, 1024: 10.99, 2048: 11.07, 4096: 12.50},
    "source": "NeuronMM (trn1, bf16), as quoted in the project's design notes section 9",
}
GOALS = {"fused_avg_hbm_gb_at_most": 2.47, "speedup_vs_sequential_at_least": 1.4,
         "speedup_vs_dense_at_least": 2.1, "fused_mfu_at_least_for_S_ge_4096": 0.90}

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BF = "bfloat16"


def _row(st, **extra):
    d = {
        "hbm_gb": st.hbm_bytes / 1e9,
        "hbm_read_gb": st.hbm_read_bytes / 1e9,
        "hbm_write_gb": st.hbm_write_bytes / 1e9,
        "gflop": st.flops / 1e9,
        "latency_ms": st.modeled_latency_s * 1e3,
        "mfu": st.mfu,
        "sbuf_peak_kib": st.sbuf_peak_bytes / 1024,
        "psum_peak_kib": st.psum_peak_bytes / 1024,
        "bound_by": st.bound_by,
        "engine_ms": {k: v * 1e3 for k, v in st.engine_time_s.items()},
        "dma_count": st.dma_count,
        "matmul_count": st.matmul_count,
    }
    d.update(extra)
    return d


def run_kernel(name, S, target, block_m=None):
    x, u, v = sim.spec((S, K), BF), sim.spec((K, R), BF), sim.spec((R, N), BF)
    if name == "dense_xw":
        return sim.run(baselines.dense_xw, x, sim.spec((K, N), BF), target=target,
                       count_only=True)[1]
    if name == "sequential_xuv":
        return sim.run(baselines.sequential_xuv, x, u, v, target=target, count_only=True)[1]
    return sim.run(xuv.fused_xuv, x, u, v, block_m=block_m, target=target, count_only=True)[1]


def study(target, seqs, log):
    rows = {"dense_xw": {}, "sequential_xuv": {}, "fused_xuv": {}, "fused_xuv_smallest_ridge_block": {}}
    for S in seqs:
        ks = blocking.xuv_shape(S, K, R, N)
        bm_default = blocking.select_block_m(ks, target)
        bm_ridge = blocking.select_block_m(ks, target, objective="ridge")
        for name, bm in (("dense_xw", None), ("sequential_xuv", None),
                         ("fused_xuv", bm_default), ("fused_xuv_smallest_ridge_block", bm_ridge)):
            t0 = time.time()
            st = run_kernel(name, S, target, bm)
            extra = {"block_m": bm} if bm else {}
            rows[name][S] = _row(st, **extra)
            log(f"  {target} S={S:6d} {name:22s} {st.hbm_bytes / 1e9:7.3f} GB "
                f"{st.modeled_latency_s * 1e3:8.3f} ms  MFU {st.mfu:5.3f}  "
                f"SBUF {st.sbuf_peak_bytes / 1024:6.1f} KiB  ({time.time() - t0:.1f} s)")
    return rows


def summarize(rows, seqs):
    mean = lambda vals: sum(vals) / len(vals)   # noqa: E731
    avg = {name: {"hbm_gb": mean([r[S]["hbm_gb"] for S in seqs]),
                  "latency_ms": mean([r[S]["latency_ms"] for S in seqs]),
                  "mfu": mean([r[S]["mfu"] for S in seqs])}
           for name, r in rows.items()}
    out = {"avg": avg}
    for fused in ("fused_xuv", "fused_xuv_smallest_ridge_block"):
        f = avg[fused]["latency_ms"]
        out[fused] = {
            "speedup_vs_dense": avg["dense_xw"]["latency_ms"] / f,
            "speedup_vs_sequential": avg["sequential_xuv"]["latency_ms"] / f,
            "min_mfu_S_ge_4096": min((rows[fused][S]["mfu"] for S in seqs if S >= 4096),
                                     default=None),
        }
    return out


def sweep(target, log):
    res = {}
    for bm in SWEEP_BM:
        t0 = time.time()
        try:
            st = run_kernel("fused_xuv", SWEEP_S, target, bm)
            res[bm] = _row(st, block_m=bm)
            log(f"  {target} sweep BM={bm:5d} {st.modeled_latency_s * 1e3:8.3f} ms "
                f"{st.hbm_bytes / 1e9:6.3f} GB bound by {st.bound_by} ({time.time() - t0:.1f} s)")
        except sim.SbufCapacityError as exc:
            res[bm] = {"block_m": bm, "rejected": "SbufCapacityError", "message": str(exc)}
            log(f"  {target} sweep BM={bm:5d} rejected: {exc}")
    return res


def goals(summary, rows, seqs):
    out = {}
    for fused in ("fused_xuv", "fused_xuv_smallest_ridge_block"):
        s = summary[fused]
        gb = summary["avg"][fused]["hbm_gb"]
        out[fused] = {
            "fused_avg_hbm_gb": [gb, gb <= GOALS["fused_avg_hbm_gb_at_most"]],
            "speedup_vs_sequential": [s["speedup_vs_sequential"],
                                      s["speedup_vs_sequential"] >= GOALS["speedup_vs_sequential_at_least"]],
            "speedup_vs_dense": [s["speedup_vs_dense"],
                                 s["speedup_vs_dense"] >= GOALS["speedup_vs_dense_at_least"]],
            "min_mfu_S_ge_4096": [s["min_mfu_S_ge_4096"],
                                  s["min_mfu_S_ge_4096"] is not None and
                                  s["min_mfu_S_ge_4096"] >= GOALS["fused_mfu_at_least_for_S_ge_4096"]],
        }
    return out


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = result["seqs"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    styles = {"dense_xw": ("NKI XW (dense)", "o-"), "sequential_xuv": ("NKI XUV (sequential)", "s-"),
              "fused_xuv": ("fused XUV (default block)", "^-"),
              "fused_xuv_smallest_ridge_block": ("fused XUV (smallest block clearing the ridge)", "v--")}
    for target in result["targets"]:
        rows = result["targets"][target]["rows"]
        for name, (label, style) in styles.items():
            if target != "trn1" and name != "fused_xuv":
                continue           # trn2: only the fused kernel, to keep the panels readable
            st = style if target == "trn1" else style[0] + ":"
            kw = {"label": f"{label}, {target}"}
            axes[0, 0].plot(seqs, [rows[name][str(S)]["hbm_gb"] for S in seqs], st, **kw)
            axes[0, 1].plot(seqs, [rows[name][str(S)]["latency_ms"] for S in seqs], st, **kw)
            axes[1, 0].plot(seqs, [rows[name][str(S)]["mfu"] for S in seqs], st, **kw)
    axes[0, 0].set(title="HBM traffic (modelled)", xlabel="S (tokens)", ylabel="GB", yscale="log")
    axes[0, 1].set(title="Latency (modelled)", xlabel="S (tokens)", ylabel="ms", yscale="log")
    axes[1, 0].set(title="MFU (modelled)", xlabel="S (tokens)", ylabel="MFU", ylim=(0, 1.05))
    ax = axes[1, 1]
    for target, mk in (("trn1", "o-"), ("trn2", "s:")):
        if target not in result["targets"]:
            continue
        sw = result["targets"][target]["sweep"]
        bms = [bm for bm in SWEEP_BM if "latency_ms" in sw[str(bm)]]
        ax.plot(bms, [sw[str(bm)]["latency_ms"] for bm in bms], mk, label=f"emulator {target}")
        rejected = [bm for bm in SWEEP_BM if "rejected" in sw[str(bm)]]
        if rejected:
            ax.plot(rejected, [1.0] * len(rejected), "rx", label=f"{target}: exceeds SBUF")
    ax.plot(SWEEP_BM, [PAPER["sweep_ms"][bm] for bm in SWEEP_BM], "k^--", label="paper (trn1, measured)")
    ax.set(title=f"Block-size sweep, S={SWEEP_S}", xlabel="BM (tokens)", ylabel="ms")
    ax.set_xscale("log", base=2)
    ax.set_xticks(SWEEP_BM, [str(bm) for bm in SWEEP_BM])
    for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
        a.set_xscale("log", base=2)
        a.set_xticks(seqs, [f"{S // 1024}K" for S in seqs])
    for a in axes.flat:
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("NeuronMM kernel study on the NKI emulator: K=7168, r=4096, N=18432, bf16 "
                 "(modelled, not hardware timings)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="trn1,trn2")
    ap.add_argument("--seqs", default=",".join(str(s) for s in SEQS))
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "kernel_study"))
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    targets = args.targets.split(",")
    start = time.time()
    log = lambda msg: print(msg, flush=True)   # noqa: E731

    result = {"shapes": {"K": K, "r": R, "N": N, "dtype": "bfloat16"}, "seqs": seqs,
              "paper": PAPER, "goals": GOALS, "modelled": True, "targets": {}}
    for target in targets:
        t0 = time.time()
        log(f"[{target}] kernel study")
        rows = study(target, seqs, log)
        summary = summarize(rows, seqs)
        log(f"[{target}] block-size sweep at S={SWEEP_S}")
        sw = sweep(target, log)
        result["targets"][target] = {
            "rows": {name: {str(S): r for S, r in rs.items()} for name, rs in rows.items()},
            "summary": summary, "goals": goals(summary, rows, seqs),
            "sweep": {str(bm): r for bm, r in sw.items()},
            "wall_s": time.time() - t0,
        }
    result["wall_s"] = time.time() - start
    result["environment"] = {"python": sys.version.split()[0], "machine": platform.machine(),
                             "command": "python benchmarks/kernel_study.py " + " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    plot(result, args.out + ".png")
    print_table(result)
    log(f"wall time {result['wall_s']:.0f} s; wrote {args.out}.json")
    return result


def print_table(result):
    for target, res in result["targets"].items():
        print(f"\n== {target} (modelled) ==")
        print(f"{'S':>6} | " + " | ".join(f"{n:>22}" for n in res["rows"]))
        for S in result["seqs"]:
            cells = []
            for name in res["rows"]:
                r = res["rows"][name][str(S)]
                cells.append(f"{r['hbm_gb']:6.2f}GB {r['latency_ms']:7.2f}ms {r['mfu']:4.2f}")
            print(f"{S:>6} | " + " | ".join(f"{c:>22}" for c in cells))
        avg = res["summary"]["avg"]
        print("avg    | " + " | ".join(f"{avg[n]['hbm_gb']:6.2f}GB {avg[n]['latency_ms']:7.2f}ms"
                                       .rjust(22) for n in res["rows"]))
        for fused in ("fused_xuv", "fused_xuv_smallest_ridge_block"):
            print(f"{fused}: goals {json.dumps(res['goals'][fused])}")


if __name__ == "__main__":
    main()
