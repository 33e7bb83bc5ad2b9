"""Time and peak memory of the hybrid's channel order (`nystrom.loss_aware_order`),
blocked (now) against the rank-one version it replaced, and whether the two
give the same order.

Parts (`--part`, default all; each updates its section of the JSON):

  synthetic  I = 14336, H = 4096 (Llama-3.1-8B's MLP). C = Z^T Z + 1e-3 mean(diag) I
             with Z 4096 x I standard normal times lognormal(0, 1) column
             scales (seeded), W_d [I, H] standard normal (float32, as a
             checkpoint holds it), Fisher weights uniform(0.5, 2). The work of
             both algorithms does not depend on the values. The blocked order
             runs in full; the rank-one one runs its setup (the same two GEMMs,
             Cholesky and inverse) and `--old-steps` of its I - 1 equal-cost
             steps (each a rank-one update of the full I x I and I x H
             matrices), extrapolated as setup + (I - 1) x mean step. Also
             `channel_losses`, current and before (one GEMM and one I x I copy
             more), in full.
  smollm2    SmolLM2-135M-Instruct (I = 1536, H = 576), `compress --ratio 0.2`
             with the default method (hybrid) and calibration (64 x 512 tokens,
             32 Fisher windows); every layer's (C, W_d, D) is recorded where the
             tool calls loss_aware_order, then both orders are computed and
             compared: same order, positions that differ, kept sets at the
             multiples of 128. Also the rank-one order in float32 on three
             layers (is float32 usable?).
  check      perplexity of the smollm2 part's checkpoint (blocked order) on
             builtin:heldout, same protocol as ppl: with identical orders it
             should equal the README's hybrid row at 0.2.
  ppl        if any SmolLM2 order differs: perplexity of `compress --ratio 0.2`
             with each order (the README protocol of channels_vs_factors.py:
             first 6 windows of 2048 tokens, transformers float32, on
             builtin:heldout and, when --fortunes exists, the fortunes text).

Peak memory: the process's resident set sampled every 2 ms by a thread
(/proc/self/statm) during the call, minus the RSS just before it (the inputs
already exist). Wall and CPU time (process_time: all threads) are both given,
with the load average, because the machine's 2 cores are shared.

    python benchmarks/channel_order_timing.py --work /tmp/chanorder
Writes benchmarks/results/channel_order_timing.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import torch

from vllm_neuronmlp.tools.methods import nystrom as ny

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
INTER, HIDDEN, ROWS = 14336, 4096, 4096
BLOCK = 128
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- measuring
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Measured:
    """Wall time, CPU time and peak RSS above the starting RSS of a block."""

    def __enter__(self):
        self.base, self.peak, self._stop = _rss(), 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self.load_before = os.getloadavg()[0]
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    def record(self) -> dict:
        return {"wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 2),
                "peak_rss_delta_mib": round((self.peak - self.base) / 2 ** 20, 1),
                "load_avg_1min": [round(self.load_before, 2), round(os.getloadavg()[0], 2)]}


# ---------------------------------------------------------------- the previous versions
def rank_one_order(c, w_down_io, out_weights=None, rel_ridge=ny.SOLVE_RIDGE, max_steps=None, dtype=torch.float64):
    """The loss_aware_order this benchmark compares against: one rank-one
    downdate of the full G = A_SS^-1 and M = G B_S per removal. With
    `max_steps`, stops after that many removals (order None). Returns
    (order, setup seconds, seconds per step)."""
    t0 = time.perf_counter()
    a = c.to(dtype).clone()
    wt = w_down_io.to(dtype)
    if out_weights is not None:
        wt = wt * out_weights.to(dtype)[None, :]
    b = a @ wt
    a.diagonal().add_(ny._ridge(a, rel_ridge))
    g = torch.cholesky_inverse(ny._cholesky(a, "rank-one reference"))
    m = g @ b
    n = a.shape[0]
    kept = torch.ones(n, dtype=torch.bool)
    removed = []
    steps = n - 1 if max_steps is None else min(max_steps, n - 1)
    t1 = time.perf_counter()
    for _ in range(steps):
        d = g.diagonal()
        lost = torch.where(kept, m.pow(2).sum(1) / d, torch.full_like(d, float("inf")))
        j = int(torch.argmin(lost))
        removed.append(j)
        kept[j] = False
        g_j, m_j, pivot = g[:, j].clone(), m[j].clone(), float(d[j])
        g.addr_(g_j, g_j, alpha=-1.0 / pivot)
        m.addr_(g_j, m_j, alpha=-1.0 / pivot)
        g[j, j] = 1.0
    t2 = time.perf_counter()
    order = None
    if steps == n - 1:
        order = torch.tensor([int(i) for i in torch.nonzero(kept)] + removed[::-1], dtype=torch.long)
    return order, t1 - t0, (t2 - t1) / max(steps, 1)


def previous_channel_losses(c, w_down_io, order, out_weights=None, rel_ridge=ny.SOLVE_RIDGE):
    """channel_losses before this change (permuted copy, its clone, two GEMMs)."""
    c = c.to(torch.float64)
    wt = w_down_io.to(torch.float64)
    if out_weights is not None:
        wt = wt * out_weights.to(torch.float64)[None, :]
    cp = c[order][:, order]
    reg = cp.clone()
    reg.diagonal().add_(ny._ridge(c, rel_ridge))
    chol = ny._cholesky(reg, "previous channel_losses")
    g = torch.linalg.solve_triangular(chol, cp @ wt[order], upper=False)
    explained = torch.cat([torch.zeros(1, dtype=torch.float64), g.pow(2).sum(1).cumsum(0)])
    total = float((wt * (c @ wt)).sum())
    losses = (total - explained).clamp_min(0)
    losses[-1] = 0.0
    return losses


def memory_formulas(i: int, h: int) -> dict:
    """Peak bytes above the caller's C (float64) and W_d, from the allocations in
    the code: float64 I x I (8 I^2) and I x H (8 I H) matrices, and the check of
    every Cholesky factor in nystrom._cholesky (torch.isfinite(factor).all()),
    11 I^2 as measured at I = 4096 and 14336 (a temporary and the mask)."""
    i2, ih = i * i, i * h
    return {"loss_aware_order (blocked)": max(27 * i2 + 16 * ih, 16 * i2 + 8 * ih),
            "loss_aware_order (rank-one, before)": max(27 * i2 + 16 * ih, 16 * i2 + 32 * ih),
            "channel_losses": max(27 * i2 + 16 * ih, 8 * i2 + 40 * ih),
            "channel_losses (before)": 35 * i2 + 8 * ih,
            "formula": {
                "loss_aware_order (blocked)": "max(27 I^2 + 16 I H, 16 I^2 + 8 I H): A = C + lambda I, its factor "
                                              "and the factor's check (8 + 8 + 11 I^2) with W_d D and C W_d D; "
                                              "later G and N with M",
                "loss_aware_order (rank-one, before)": "max(27 I^2 + 16 I H, 16 I^2 + 32 I H): the same first stage; "
                                                       "A and G with W_d D, B, M and one I x H temporary per step",
                "channel_losses": "max(27 I^2 + 16 I H, 8 I^2 + 40 I H): P C P^T, its factor and the check with "
                                  "C W_d D and W_d D; later the factor with five I x H",
                "channel_losses (before)": "35 I^2 + 8 I H: P C P^T, its clone, the factor and the check, W_d D",
                "note": "add 8 I^2 for C itself where the caller does not hold it already; without the 11 I^2 of "
                        "the factor check the blocked order and channel_losses would peak at 16 I^2 + 16 I H"}}


# ---------------------------------------------------------------- parts
def synthetic_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(ROWS, INTER, generator=gen, dtype=torch.float64)
    z *= torch.empty(INTER, dtype=torch.float64).log_normal_(0.0, 1.0, generator=gen)[None, :]
    c = z.T @ z
    del z
    c.diagonal().add_(1e-3 * float(c.diagonal().mean()))
    w = torch.randn(INTER, HIDDEN, generator=gen, dtype=torch.float32)
    d = torch.empty(HIDDEN, dtype=torch.float32).uniform_(0.5, 2.0, generator=gen)
    return c, w, d


def part_synthetic(args) -> dict:
    c, w, d = synthetic_inputs()
    out = {"inter": INTER, "hidden": HIDDEN, "block": ny.ORDER_BLOCK,
           "construction": f"C = Z^T Z + 1e-3 mean(diag) I, Z {ROWS} x {INTER} N(0,1) x lognormal(0,1) column "
                           f"scales; W_d N(0,1) float32; D uniform(0.5, 2); seed 0"}
    with Measured() as m:
        order = ny.loss_aware_order(c, w, d)
    out["blocked"] = m.record()
    print("blocked order:", out["blocked"], flush=True)
    with Measured() as m:
        ny.channel_losses(c, w, order, d)
    out["channel_losses"] = m.record()
    print("channel_losses:", out["channel_losses"], flush=True)
    with Measured() as m:
        previous_channel_losses(c, w, order, d)
    out["channel_losses_before"] = m.record()
    print("channel_losses (before):", out["channel_losses_before"], flush=True)
    with Measured() as m:
        _, setup, step = rank_one_order(c, w, d, max_steps=args.old_steps)
    rec = m.record()
    rec.update({"setup_s": round(setup, 2), "steps_run": args.old_steps, "seconds_per_step": round(step, 4),
                "extrapolated_s": round(setup + (INTER - 1) * step, 1),
                "extrapolation": "setup + (I - 1) x mean step (every step updates the full I x I and I x H)"})
    out["rank_one"] = rec
    print("rank-one order:", rec, flush=True)
    return out


def _compress(model, out, capture=None, order_fn=None):
    from vllm_neuronmlp.tools import compressor as C
    from vllm_neuronmlp.tools.options import CompressOptions

    real = ny.loss_aware_order

    def recording(c, w_down_io, out_weights=None, rel_ridge=ny.SOLVE_RIDGE):
        fn = order_fn or real
        t0 = time.perf_counter()
        order = fn(c, w_down_io, out_weights, rel_ridge)
        if capture is not None:
            capture.append({"c": c.detach().cpu().clone(), "w": w_down_io.detach().cpu().clone(),
                            "d": None if out_weights is None else out_weights.detach().cpu().clone(),
                            "order": order.cpu(), "seconds": time.perf_counter() - t0})
        return order

    ny.loss_aware_order = recording
    try:
        t0 = time.time()
        res = C.compress_with_options(model, out, CompressOptions(ratio=0.2, method="hybrid",
                                                                  rank_allocation="adaptive",
                                                                  overwrite=True, progress=False))
        return res, time.time() - t0
    finally:
        ny.loss_aware_order = real


def _kept_sets_equal(a, b, n):
    return {k: bool(set(a[:k].tolist()) == set(b[:k].tolist())) for k in range(BLOCK, n, BLOCK)}


def part_smollm2(args) -> dict:
    model = _model(args)
    capture = []
    res, secs = _compress(model, os.path.join(args.work, "ckpt-blocked"), capture)
    torch.save(capture, os.path.join(args.work, "captured.pt"))
    layers = []
    for i, rec in enumerate(capture):
        c, w, d = rec["c"], rec["w"], rec["d"]
        with Measured() as m:
            new = ny.loss_aware_order(c, w, d)
        with Measured() as m_old:
            old, _, _ = rank_one_order(c, w, d)
        n = int(new.numel())
        differ = int((new != old).sum())
        first = int(torch.nonzero(new != old)[0]) if differ else None
        row = {"layer": i, "same_order": differ == 0, "positions_differing": differ, "first_difference": first,
               "kept_sets_equal_at_block_multiples": _kept_sets_equal(new, old, n),
               "blocked": m.record(), "rank_one": m_old.record(), "in_compress_s": round(rec["seconds"], 2)}
        if i in (0, len(capture) // 2, len(capture) - 1):
            o32, _, _ = rank_one_order(c, w, d, dtype=torch.float32)
            row["float32_rank_one_positions_differing"] = int((o32 != old).sum())
            row["float32_kept_sets_equal_at_block_multiples"] = all(_kept_sets_equal(o32, old, n).values())
        layers.append(row)
        print(f"layer {i}: same {row['same_order']} differ {differ} blocked {m.wall:.2f}s rank-one {m_old.wall:.2f}s"
              + (f" float32 differ {row['float32_rank_one_positions_differing']}"
                 if "float32_rank_one_positions_differing" in row else ""), flush=True)
    return {"model": "SmolLM2-135M-Instruct (default-model)", "inter": int(capture[0]["c"].shape[0]),
            "hidden": int(capture[0]["w"].shape[1]), "compress_ratio_mlp": res.ratio_mlp,
            "compress_seconds": round(secs, 1), "layers": layers,
            "all_orders_identical": all(r["same_order"] for r in layers)}


def _model(args) -> str:
    from vllm_neuronmlp.tools.data import default_model

    model = args.model or os.path.join(args.work, "smollm2")
    if not os.path.isdir(model):
        default_model.materialize(model)
    return model


def part_ppl(args, data) -> dict:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from channels_vs_factors import fortunes_text
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate

    model = _model(args)
    texts = {"builtin:heldout": "builtin:heldout"}
    if os.path.isdir(args.fortunes):
        texts["fortunes"] = fortunes_text(args.fortunes, os.path.join(args.work, "fortunes.txt"))
    max_tokens = 6 * 2048
    out = {"texts": list(texts), "eval": "first 6 windows of 2048 tokens, transformers float32"}
    for name, fn in (("blocked", None), ("rank_one", lambda *a: rank_one_order(*a)[0])):
        ckpt = os.path.join(args.work, f"ckpt-{name}")
        res, secs = _compress(model, ckpt, order_fn=fn)
        out[name] = {"ratio_mlp": res.ratio_mlp, "compress_seconds": round(secs, 1),
                     "ppl": {t: evaluate.perplexity_hf(ckpt, src, max_tokens=max_tokens, progress=False).ppl
                             for t, src in texts.items()}}
        print(name, out[name], flush=True)
    out["relative_difference"] = {t: out["blocked"]["ppl"][t] / out["rank_one"]["ppl"][t] - 1 for t in texts}
    return out


def part_check(args) -> dict:
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate

    ckpt = os.path.join(args.work, "ckpt-blocked")
    ppl = evaluate.perplexity_hf(ckpt, "builtin:heldout", max_tokens=6 * 2048, progress=False).ppl
    print("blocked order, ratio 0.2, builtin:heldout ppl", ppl, flush=True)
    return {"checkpoint": "compress --ratio 0.2 (hybrid) with the blocked order", "ppl_builtin_heldout": ppl,
            "eval": "first 6 windows of 2048 tokens, transformers float32"}


def plot(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    s = data.get("synthetic")
    if s:
        labels = ["order: rank-one\n(extrapolated)", "order: blocked", "channel_losses\n(before)", "channel_losses"]
        vals = [s["rank_one"]["extrapolated_s"], s["blocked"]["wall_s"], s["channel_losses_before"]["wall_s"],
                s["channel_losses"]["wall_s"]]
        bars = axes[0].bar(labels, vals, color=["#bbbbbb", "#1f77b4", "#bbbbbb", "#1f77b4"])
        bars[0].set_hatch("//")
        for b, v in zip(bars, vals):
            axes[0].text(b.get_x() + b.get_width() / 2, v, f"{v:.0f} s", ha="center", va="bottom", fontsize=9)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("wall seconds, one layer (2 shared cores)")
        axes[0].set_title(f"I = {s['inter']}, H = {s['hidden']} (synthetic C)")
    m = data.get("smollm2")
    if m:
        xs = [r["layer"] for r in m["layers"]]
        axes[1].plot(xs, [r["rank_one"]["wall_s"] for r in m["layers"]], marker="o", label="rank-one (before)")
        axes[1].plot(xs, [r["blocked"]["wall_s"] for r in m["layers"]], marker="o", label="blocked (now)")
        same = sum(r["same_order"] for r in m["layers"])
        axes[1].set_title(f"SmolLM2-135M, I = {m['inter']}: identical order in {same}/{len(xs)} layers")
        axes[1].set_xlabel("layer")
        axes[1].set_ylabel("wall seconds")
        axes[1].set_ylim(bottom=0)
        axes[1].legend()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle("nystrom.loss_aware_order: blocked lazy downdates vs one rank-one downdate per removal")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("synthetic", "smollm2", "check", "ppl", "all", "report"), default="all",
                    help="report: rewrite the JSON's formulas and the PNG from the JSON, measuring nothing")
    ap.add_argument("--work", default="/tmp/vllm_neuronmlp_chanorder")
    ap.add_argument("--model", help="SmolLM2 checkpoint (default: WORK/smollm2, made by default-model)")
    ap.add_argument("--fortunes", default="/usr/share/games/fortunes")
    ap.add_argument("--old-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(RESULTS, "channel_order_timing.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    data = {}
    if os.path.isfile(args.json):
        with open(args.json) as f:
            data = json.load(f)
    data["setup"] = {"note": "peak_rss_delta at I = 1536 is not reliable (matrices under glibc's mmap threshold "
                             "reuse freed heap); at I = 14336 every matrix is its own mapping",
                     "threads": args.threads, "cpus": os.cpu_count(), "python": platform.python_version(),
                     "torch": torch.__version__, "machine": platform.machine(), "order_block": ny.ORDER_BLOCK}

    def save():
        if "synthetic" in data:
            data["synthetic"]["memory_formula_bytes"] = memory_formulas(INTER, HIDDEN)
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        plot(data, os.path.splitext(args.json)[0] + ".png")

    if args.part == "report":
        save()
    if args.part in ("synthetic", "all"):
        data["synthetic"] = part_synthetic(args)
        save()
    if args.part in ("smollm2", "all"):
        data["smollm2"] = part_smollm2(args)
        save()
    if args.part in ("check", "all"):
        data["check"] = part_check(args)
        save()
    if args.part == "ppl" or (args.part == "all" and not data["smollm2"]["all_orders_identical"]):
        data["ppl"] = part_ppl(args, data)
        save()


if __name__ == "__main__":
    main()
