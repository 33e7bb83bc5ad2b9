"""The fused XUV kernel at Llama-3.1-8B's attention projections on the project's NKI
emulator (count-only runs, timeline cost model), against the dense blocked matmul
(`dense_xw`) at the same in/out shape. Every number is MODELLED, not measured.

Shapes (hidden 4096; 32 query heads and 8 key/value heads of 128):
  qkv_proj  4096 -> 6144   (q 4096 + k 1024 + v 1024, vLLM's fused qkv projection)
  o_proj    4096 -> 4096
Ranks: the allocator has not run at 8B scale, so each shape gets a rank set, the
block-aligned eq.-5 rank r = 128 round((1 - ratio) m n / ((m + n) 128)) at per-matrix
ratios 0.1, 0.2, 0.3, 0.5 (`eq5_rank` of tools/allocation/budget.py, where the uniform
allocator starts). bf16. S: prefill 1024, 4096; decode 1, 32. Targets trn1 and trn2.

Per shape, S and target: dense_xw's modelled latency, HBM bytes and MFU; the fused kernel's
at each rank of the set (at the block-size selector's block) and its speedup over dense;
and the break-even rank: the smallest multiple of 128 at which the fused kernel is no
faster than dense. Every multiple of 128 up to min(in, out) is run, so the break-even is
read off the whole curve, not interpolated (`order_flips_at` lists every rank where the
order flips; one entry means the curve crosses once).

    python benchmarks/attention_kernels.py   # writes benchmarks/results/attention_kernels.{json,png}
"""
import argparse
import json
import os
import platform
import sys
import time

from vllm_neuronmlp.kernels import blocking
from vllm_neuronmlp.tools.allocation.budget import eq5_rank

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_study  # noqa: E402  (the count-only runner and the per-launch row, one definition)

MODEL = "Llama-3.1-8B"
SHAPES = {"qkv_proj": {"in": 4096, "out": 4096 + 2 * 1024,
                       "what": "fused q, k, v: 32 query heads + 2 x 8 key/value heads of 128"},
          "o_proj": {"in": 4096, "out": 4096, "what": "attention output projection"}}
RATIOS = (0.1, 0.2, 0.3, 0.5)
BLOCK = 128
PREFILL, DECODE = [1024, 4096], [1, 32]
TARGETS = ("trn1", "trn2")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention_kernels")
RANK_RULE = ("eq. 5, block-aligned: r = 128 round((1 - ratio) m n / ((m + n) 128)) at a "
             "per-matrix ratio (tools/allocation/budget.eq5_rank, the uniform allocator's "
             "starting rank); the allocator has not run at 8B scale")


def rank_set(m, n, ratios=RATIOS, block=BLOCK):
    """{ratio: {rank, chosen_by, matrix_ratio}} for an m -> n projection."""
    out = {}
    for ratio in ratios:
        r = eq5_rank(m, n, ratio, block)
        out[str(ratio)] = {"rank": r, "chosen_by": f"eq5_rank(m={m}, n={n}, ratio={ratio}, block={block})",
                           "unaligned": (1 - ratio) * m * n / (m + n),
                           "matrix_ratio": 1 - r * (m + n) / (m * n)}
    return out


def fused_row(S, m, r, n, target):
    """The fused kernel at the selector's block: kernel_study's row plus the block."""
    bm = blocking.select_block_m(kernel_study.fused_shape(S, m, r, n, target), target)
    return kernel_study.row(kernel_study.run("fused_xuv", S, target, bm, shape=(m, r, n)), target,
                            block_m=bm, rank=r)


def dense_row(S, m, n, target):
    return kernel_study.row(kernel_study.run("dense_xw", S, target, shape=(m, 0, n)), target)


def break_even(scan_ms, dense_ms):
    """From {rank: fused ms} over consecutive block-aligned ranks: the smallest rank at
    which fused is no faster than dense (None if it is faster at every rank run), and
    every rank at which the order flips from the rank before (one flip: a single crossing)."""
    ranks = sorted(scan_ms)
    slower = [scan_ms[r] >= dense_ms for r in ranks]
    return {"rank": next((r for r, s in zip(ranks, slower) if s), None),
            "order_flips_at": [r for r, s, before in zip(ranks[1:], slower[1:], slower) if s != before],
            "ranks_run": f"{ranks[0]}..{ranks[-1]} step {BLOCK}"}


def point(name, S, target, ratios=RATIOS):
    """Everything for one shape, S and target (see the module doc)."""
    m, n = SHAPES[name]["in"], SHAPES[name]["out"]
    dense = dense_row(S, m, n, target)
    rows = {r: fused_row(S, m, r, n, target) for r in range(BLOCK, min(m, n) + 1, BLOCK)}
    fused = {}
    for ratio, chosen in rank_set(m, n, ratios).items():
        row = dict(rows[chosen["rank"]])
        row["speedup_vs_dense"] = dense["latency_ms"] / row["latency_ms"]
        row["hbm_vs_dense"] = row["hbm_gb"] / dense["hbm_gb"]
        fused[ratio] = row
    scan = {r: row["latency_ms"] for r, row in rows.items()}
    return {"dense": dense, "fused": fused, "break_even": break_even(scan, dense["latency_ms"]),
            "flop_break_even_rank": m * n / (m + n), "scan_ms": {str(r): ms for r, ms in scan.items()}}


def study(targets=TARGETS, seqs=DECODE + PREFILL, log=print, ratios=RATIOS):
    result = {"model": MODEL, "shapes": SHAPES, "dtype": "bfloat16", "rank_rule": RANK_RULE,
              "ranks": {name: rank_set(s["in"], s["out"], ratios) for name, s in SHAPES.items()},
              "seqs": {"decode": [S for S in seqs if S in DECODE], "prefill": [S for S in seqs if S not in DECODE]},
              "modelled": True,
              "note": "modelled latencies on the project's NKI emulator (timeline cost model), "
                      "not measured on Trainium",
              "targets": {}}
    for target in targets:
        result["targets"][target] = {}
        for name in SHAPES:
            result["targets"][target][name] = {}
            for S in seqs:
                t0 = time.time()
                p = point(name, S, target, ratios)
                result["targets"][target][name][str(S)] = p
                be = p["break_even"]["rank"]
                log(f"  {target} {name:8s} S={S:5d} dense {p['dense']['latency_ms'] * 1e3:9.1f} us | "
                    + " ".join(f"r{f['rank']} {f['latency_ms'] * 1e3:8.1f} us ({f['speedup_vs_dense']:.2f}x)"
                               for f in p["fused"].values())
                    + f" | break-even r={be} ({time.time() - t0:.1f} s)")
    return result


def table(result, target="trn1"):
    """The README's table (markdown): per shape and S, dense and the fused kernel at each
    ratio of the rank set (modelled us, speedup), and the break-even rank."""
    ratios = list(next(iter(result["ranks"].values())))
    lines = ["| " + target + " | S | dense_xw | " + " | ".join(f"fused, ratio {q}" for q in ratios)
             + " | break-even rank |",
             "|---|---|---|" + "---|" * len(ratios) + "---|"]
    for name, by_s in result["targets"][target].items():
        for S, p in sorted(by_s.items(), key=lambda kv: int(kv[0])):
            cells = [f"r={f['rank']}: {f['latency_ms'] * 1e3:.0f} µs ({f['speedup_vs_dense']:.2f}×)"
                     for f in p["fused"].values()]
            be = p["break_even"]["rank"]
            if be is None:
                be = "none ≤ " + str(min(SHAPES[name]['in'], SHAPES[name]['out']))
            lines.append(f"| {name} {SHAPES[name]['in']}→{SHAPES[name]['out']} | {S} | "
                         f"{p['dense']['latency_ms'] * 1e3:.0f} µs | " + " | ".join(cells)
                         + f" | {be} |")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SHAPES)
    seqs = sorted({int(S) for t in result["targets"].values() for s in t.values() for S in s})
    fig, axes = plt.subplots(len(names), len(seqs), figsize=(4 * len(seqs), 3.4 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, S in enumerate(seqs):
            ax = axes[i, j]
            for target, style in zip(result["targets"], ("-", "--")):
                p = result["targets"][target][name].get(str(S))
                if p is None:
                    continue
                ranks = sorted(int(r) for r in p["scan_ms"])
                line, = ax.plot(ranks, [p["scan_ms"][str(r)] * 1e3 for r in ranks], style, label=f"fused {target}")
                ax.axhline(p["dense"]["latency_ms"] * 1e3, color=line.get_color(), ls=":", label=f"dense_xw {target}")
                if p["break_even"]["rank"] is not None:
                    ax.axvline(p["break_even"]["rank"], color=line.get_color(), alpha=0.3)
            for ratio, chosen in result["ranks"][name].items():
                ax.axvline(chosen["rank"], color="k", lw=0.5, alpha=0.4)
                ax.text(chosen["rank"], 0.02, f" {ratio}", fontsize=6, rotation=90,
                        transform=ax.get_xaxis_transform())
            ax.set(title=f"{name} {SHAPES[name]['in']}→{SHAPES[name]['out']}, S={S}", xlabel="rank r", ylabel="µs")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"{MODEL} attention, bf16: fused XUV by rank vs dense_xw (grey: the eq.-5 ranks at ratios "
                 "0.1-0.5; light: break-even)\nMODELLED on the project's NKI emulator, not measured on Trainium",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seqs", default=",".join(str(S) for S in DECODE + PREFILL))
    ap.add_argument("--out", default=OUT,
                    help="path prefix of the .json and .png (default benchmarks/results/attention_kernels)")
    ap.add_argument("--table", action="store_true", help="print the README table from an existing JSON and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.out + ".json") as f:
            result = json.load(f)
        for target in result["targets"]:
            print(table(result, target) + "\n")
        return result
    start = time.time()
    result = study(args.targets.split(","), [int(S) for S in args.seqs.split(",")],
                   log=lambda msg: print(msg, flush=True))
    result["wall_s"] = time.time() - start
    result["environment"] = {"python": sys.version.split()[0], "machine": platform.machine(),
                             "command": "python benchmarks/attention_kernels.py " + " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out + ".png")
    print(f"wall time {result['wall_s']:.0f} s; wrote {args.out}.json and .png (modelled, not measured)")
    return result


if __name__ == "__main__":
    main()
