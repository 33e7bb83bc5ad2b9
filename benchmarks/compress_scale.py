"""Compression at the shapes our users have: peak memory, time per stage and disk.

1. Writes random-weight bf16 checkpoints of Llama-3.1-8B shape (hidden 4096,
   intermediate 14336, 32 heads / 8 KV heads of 128, vocab 128256, untied
   embeddings) with the given numbers of layers (default 4 and 8, cuts of the
   32-layer model at the same widths), tensor by tensor: the benchmark never
   holds a model either. `--full-layers 32` also writes the whole 32-layer
   model for the dry run's estimate and the disk figures.
2. Compresses each in a fresh subprocess (`vllm-neuronmlp compress --ratio 0.2`
   with the default method and with `fisher`, default calibration unless
   flags say otherwise), sampling the child's resident memory and the disk use
   of its output and resume state twice a second, and reads the child's own
   per-stage wall times and peaks (`--json`, the `stages` entry: calibration,
   Fisher forward/backward, spectra, channel order, allocation, factor pass,
   write).
3. Checks that the default method's peaks at the two depths differ by less
   than one layer's weights, and fits `time(L) = a + b L` to extrapolate the
   32-layer wall time (`a` = what does not grow with depth, `b` = per layer).
4. Records the memory estimate of `compress --dry-run` for every run beside
   the measured peak (tests/test_memory_estimate.py holds the estimate to
   within 25 % of these measurements).

Writes benchmarks/results/compress_scale.json and .png.

    python benchmarks/compress_scale.py --work /tmp/scale                 # 4 and 8 layers, hybrid + fisher
    python benchmarks/compress_scale.py --work /tmp/scale --layers 4 --methods hybrid --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = {
    "llama-3.1-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256,
                         tie=False, rope_theta=500000.0),
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256,
                         tie=True, rope_theta=500000.0),
}
GIB = 1024 ** 3


def layer_params(shape: Dict) -> int:
    h, f, q, kv = shape["hidden"], shape["intermediate"], shape["heads"] * shape["head_dim"], \
        shape["kv_heads"] * shape["head_dim"]
    return 2 * q * h + 2 * kv * h + 3 * h * f + 2 * h


def write_random_llama(path: str, shape: Dict, layers: int, seed: int = 0, shard_bytes: int = 2 * GIB) -> int:
    """A random Llama checkpoint of `shape`, written shard by shard. Returns bytes of weights."""
    import torch
    from safetensors.torch import save_file

    from vllm_neuronmlp.tools.data import tiny

    os.makedirs(path, exist_ok=True)
    tiny.make_tokenizer(path)
    h, f, nh, kv, hd, v = (shape[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": v, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": shape["rope_theta"],
        "tie_word_embeddings": shape["tie"], "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 0,
        "eos_token_id": 0, "attention_bias": False, "mlp_bias": False,
    }
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    g = torch.Generator().manual_seed(seed)

    def rnd(*dims, std=0.02):
        return (torch.randn(*dims, generator=g) * std).to(torch.bfloat16)

    shards, buf, size, total = [], {}, 0, 0

    def add(name, t):
        nonlocal size, total
        buf[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()

    def flush():
        nonlocal buf, size
        if buf:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(buf, os.path.join(path, fname), metadata={"format": "pt"})
            shards.append((fname, list(buf)))
            buf, size = {}, 0

    add("model.embed_tokens.weight", rnd(v, h))
    if not shape["tie"]:
        add("lm_head.weight", rnd(v, h))
    add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        add(p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        add(p + "self_attn.q_proj.weight", rnd(nh * hd, h))
        add(p + "self_attn.k_proj.weight", rnd(kv * hd, h))
        add(p + "self_attn.v_proj.weight", rnd(kv * hd, h))
        add(p + "self_attn.o_proj.weight", rnd(h, nh * hd))
        add(p + "mlp.gate_proj.weight", rnd(f, h))
        add(p + "mlp.up_proj.weight", rnd(f, h))
        add(p + "mlp.down_proj.weight", rnd(h, f))
    flush()
    weight_map = {name: fname for fname, names in shards for name in names}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def _du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Sampler:
    """Samples a process's VmRSS and the bytes under some directories."""

    def __init__(self, pid: int, dirs: List[str], period_s: float = 0.5):
        self.pid, self.dirs, self.period = pid, dirs, period_s
        self.peak_rss = 0
        self.peak_disk = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if tick % 20 == 0:  # disk every 10 s: walking a large tree costs more
                self.peak_disk = max(self.peak_disk, sum(_du(d) for d in self.dirs if os.path.exists(d)))
            tick += 1
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def vllm_neuronmlp_command() -> List[str]:
    return [sys.executable, "-m", "vllm_neuronmlp.tools.cli"]


def dry_run(src: str, out: str, flags: List[str]) -> Dict:
    proc = subprocess.run(vllm_neuronmlp_command() + ["compress", src, out, "--ratio", "0.2", "--dry-run",
                                                       "--json", "-"] + flags, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dry run failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def run_child(src: str, out: str, flags: List[str]) -> Dict:
    """Compress in a fresh process, sampling its memory and disk."""
    summary = out + ".summary.json"
    cmd = vllm_neuronmlp_command() + ["compress", src, out, "--ratio", "0.2", "--no-progress", "--json", summary] \
        + flags
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with Sampler(proc.pid, [out, out + ".resume"]) as sampler:
        _, err = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compress exited with {proc.returncode}: {err[-3000:]}")
    with open(summary) as f:
        res = json.load(f)
    return {"wall_time_s": wall, "peak_rss_bytes_sampled": sampler.peak_rss,
            "peak_rss_bytes": max(sampler.peak_rss, max(res["stages"].get("peak_rss_bytes", {}).values(), default=0)),
            "peak_disk_bytes": sampler.peak_disk, "output_bytes": _du(out), "stages": res["stages"],
            "ratio_mlp": res["ratio_mlp"], "widths": res["widths"], "factored_modules": len(res["ranks"]),
            "bytes_before": res["bytes_before"], "bytes_after": res["bytes_after"], "device": res["device"],
            "command": " ".join(["vllm-neuronmlp", "compress", "SRC", "OUT", "--ratio", "0.2"] + flags)}


def extrapolate(runs: List[Dict], target_layers: int) -> Optional[Dict]:
    """time(L) = a + b L from the runs of one method at two or more depths."""
    pts = sorted((r["layers"], r["wall_time_s"]) for r in runs)
    if len({L for L, _ in pts}) < 2:
        return None
    (l0, t0), (l1, t1) = pts[0], pts[-1]
    b = (t1 - t0) / (l1 - l0)
    a = t0 - b * l0
    return {"formula": "time(L) = a + b * L", "a_s": a, "b_s_per_layer": b, "layers": target_layers,
            "time_s": a + b * target_layers, "from_layers": [l0, l1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="directory for the random checkpoints and outputs (tens of GB)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--methods", nargs="+", default=["hybrid", "fisher"],
                    help="methods to run; the first is the default method (default: hybrid fisher)")
    ap.add_argument("--fisher-only-layers", type=int, nargs="*", default=None,
                    help="run the methods after the first only at these layer counts (default: the smallest)")
    ap.add_argument("--full-layers", type=int, default=32,
                    help="the full model's depth, for the extrapolation and the dry run (default 32)")
    ap.add_argument("--write-full", action="store_true", help="also write the full model (dry run and disk only)")
    ap.add_argument("--flags", default="", help="extra compress flags, e.g. '--calib-samples 32 --device cuda'")
    ap.add_argument("--json", default=os.path.join(RESULTS, "compress_scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: deleted after each run)")
    args = ap.parse_args()

    shape = SHAPES[args.shape]
    flags = args.flags.split()
    os.makedirs(args.work, exist_ok=True)
    results: Dict = {"shape": args.shape, **shape, "layer_params": layer_params(shape),
                     "layer_bytes_bf16": 2 * layer_params(shape), "flags": flags, "runs": [], "dry_runs": []}
    if os.path.exists(args.json):  # earlier runs (e.g. other depths made in another invocation) are kept
        with open(args.json) as f:
            old = json.load(f)
        if old.get("shape") == args.shape and old.get("flags") == flags:
            results["runs"] = [r for r in old.get("runs", []) if (r["layers"], r["method"]) not in
                               {(L, m) for L in args.layers for m in args.methods}]
            results["dry_runs"] = old.get("dry_runs", [])
    others_at = set(args.fisher_only_layers if args.fisher_only_layers is not None else [min(args.layers)])
    for layers in sorted(args.layers):
        src = os.path.join(args.work, f"{args.shape}-{layers}")
        if not os.path.exists(os.path.join(src, "config.json")):
            t = time.time()
            nbytes = write_random_llama(src, shape, layers)
            print(f"wrote {layers}-layer {args.shape} ({nbytes / GIB:.2f} GiB) in {time.time() - t:.0f} s", flush=True)
        for k, method in enumerate(args.methods):
            if k > 0 and layers not in others_at:
                continue
            out = os.path.join(args.work, f"out-{layers}-{method}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out + ".resume", ignore_errors=True)
            mflags = flags + ["--method", method]
            est = dry_run(src, out, mflags)["estimate"]
            print(f"{layers} layers, {method}: estimated peak {est['peak_bytes'] / GIB:.2f} GiB "
                  f"({est['peak_stage']})", flush=True)
            r = run_child(src, out, mflags)
            r.update({"layers": layers, "method": method, "estimate": est})
            results["runs"] = [x for x in results["runs"] if (x["layers"], x["method"]) != (layers, method)] + [r]
            print(f"  measured peak {r['peak_rss_bytes'] / GIB:.2f} GiB, {r['wall_time_s']:.0f} s, "
                  f"disk {r['peak_disk_bytes'] / GIB:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            write(results, args)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    if args.write_full:
        src = os.path.join(args.work, f"{args.shape}-{args.full_layers}")
        if not os.path.exists(os.path.join(src, "config.json")):
            write_random_llama(src, shape, args.full_layers)
        for method in args.methods:
            est = dry_run(src, os.path.join(args.work, f"out-{args.full_layers}-{method}"),
                          flags + ["--method", method])["estimate"]
            results["dry_runs"] = [d for d in results["dry_runs"] if (d["layers"], d["method"]) !=
                                   (args.full_layers, method)] + [{"layers": args.full_layers, "method": method,
                                                                   "estimate": est}]
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    summarize(results, args)
    write(results, args)
    return 0


def summarize(results: Dict, args) -> None:
    default = args.methods[0]
    mine = {r["layers"]: r for r in results["runs"] if r["method"] == default}
    if len(mine) >= 2:
        lo, hi = min(mine), max(mine)
        diff = mine[hi]["peak_rss_bytes"] - mine[lo]["peak_rss_bytes"]
        results["depth_check"] = {"method": default, "layers": [lo, hi], "peak_difference_bytes": diff,
                                  "one_layer_bytes_bf16": results["layer_bytes_bf16"],
                                  "ok": diff < results["layer_bytes_bf16"]}
    results["extrapolation"] = {}
    for method in args.methods:
        ex = extrapolate([r for r in results["runs"] if r["method"] == method], args.full_layers)
        if ex:
            results["extrapolation"][method] = ex


def write(results: Dict, args) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.splitext(args.json)[0] + ".png")


STAGES = ("calibration", "fisher_forward", "fisher_backward", "spectra", "channel_order", "allocation",
          "factor_pass", "write")


def plot(results: Dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"], key=lambda r: (r["method"], r["layers"]))
    if not runs:
        return
    labels = [f"{r['method']}\n{r['layers']} layers" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(runs))
    axes[0].bar([i - 0.2 for i in x], [r["peak_rss_bytes"] / GIB for r in runs], 0.4, label="measured peak RSS")
    axes[0].bar([i + 0.2 for i in x], [r["estimate"]["peak_bytes"] / GIB for r in runs], 0.4,
                label="estimate (--dry-run)", alpha=0.7)
    axes[0].axhline(20, color="tab:red", lw=1, ls="--", label="20 GiB target")
    axes[0].set_xticks(list(x), labels, fontsize=8)
    axes[0].set_ylabel("GiB")
    axes[0].set_title(f"peak memory, {results['shape']} shape, ratio 0.2")
    axes[0].legend(fontsize=7)
    bottom = [0.0] * len(runs)
    for stage in STAGES:
        vals = [r["stages"]["seconds"].get(stage, 0.0) / 60 for r in runs]
        if stage == "fisher_backward":  # spectra and channel order run inside the backward sweep
            vals = [v - (r["stages"]["seconds"].get("spectra", 0) + r["stages"]["seconds"].get("channel_order", 0))
                    / 60 for v, r in zip(vals, runs)]
        axes[1].bar(list(x), vals, 0.6, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set_xticks(list(x), labels, fontsize=8)
    axes[1].set_ylabel("minutes")
    axes[1].set_title("wall time by stage (2 CPU cores)" if "cuda" not in " ".join(results["flags"])
                      else "wall time by stage")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
