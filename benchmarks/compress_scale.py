"""Compression at the shapes our users have: peak memory, time per stage and disk.

1. Writes random-weight bf16 checkpoints of Llama-3.1-8B shape (hidden 4096,
   intermediate 14336, 32 heads / 8 KV heads of 128, vocab 128256, untied
   embeddings) with the layer counts the runs ask for (cuts of the 32-layer
   model at the same widths), tensor by tensor: the benchmark never holds a
   model either. `--write-full` also writes the whole 32-layer model for the
   dry run's estimate and the disk figures. SHAPEs `smollm2` and `gemma-3-270m`
   are the embedded models instead (`default-model`), at their own depth.
2. Compresses each in a fresh subprocess (`vllm-neuronmlp compress --ratio 0.2
   --method M` plus the preset's calibration flags: `default` = the tool's
   defaults, `reduced` = 8 calibration and 8 Fisher windows), sampling the
   child's resident memory and the disk use of its output and resume state,
   and reading the child's own per-stage wall times and peaks (`--json`, its
   `stages`: calibration, fisher_forward, fisher_backward, spectra,
   channel_order, allocation, factor_pass, write, total; the peaks are the
   kernel's high-water marks, reset per stage).
3. Checks that the default method's peaks at two depths (same preset) differ by
   less than one layer's weights, and extrapolates the 32-layer wall time from
   the default-preset runs: time(L) = a + b L, b what the layer sweeps took per
   layer, a the rest.
4. Records the dry run's memory estimate beside every measured peak
   (tests/test_memory_estimate.py holds the estimate to within 25 % of them).

Writes benchmarks/results/compress_scale.json and .png (runs are merged into
an existing JSON; a run made again replaces its entry).

    python benchmarks/compress_scale.py --work /tmp/scale           # the default plan (see --runs)
    python benchmarks/compress_scale.py --work /tmp/scale --runs smollm2:30:hybrid:default
    python benchmarks/compress_scale.py --work /tmp/scale --runs gemma-3-270m:18:hybrid:default --keep
    python benchmarks/compress_scale.py --work /tmp/scale --runs llama-3.1-8b:4:hybrid:default --flags "--device cuda"
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

from vllm_neuronmlp import checkpoint_format as cf

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = {
    "llama-3.1-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256,
                         tie=False, rope_theta=500000.0),
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256,
                         tie=True, rope_theta=500000.0),
}
GIB = 1024 ** 3
# the embedded real models a run may name as its SHAPE: {shape: default-model --model name}
EMBEDDED = {"smollm2": "smollm2-135m", "gemma-3-270m": "gemma-3-270m"}


def layer_params(shape: Dict) -> int:
    h, f, q, kv = shape["hidden"], shape["intermediate"], shape["heads"] * shape["head_dim"], \
        shape["kv_heads"] * shape["head_dim"]
    return 2 * q * h + 2 * kv * h + cf.mlp_params(h, f) + 2 * h


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
    return {**_from_summary(res, wall, sampler.peak_rss, sampler.peak_disk, out),
            "command": " ".join(["vllm-neuronmlp", "compress", "SRC", "OUT", "--ratio", "0.2"] + flags)}


def _from_summary(res: Dict, wall: float, sampled_rss: int, peak_disk: int, out: Optional[str]) -> Dict:
    """A run's record from compress's --json summary (its own per-stage peaks are
    the kernel's high-water marks; the sampled RSS is a cross-check)."""
    own_peak = max(res["stages"].get("peak_rss_bytes", {}).values(), default=0)
    return {"wall_time_s": wall, "peak_rss_bytes_sampled": sampled_rss, "peak_rss_bytes": max(sampled_rss, own_peak),
            "peak_disk_bytes": peak_disk, "output_bytes": _du(out) if out else res["bytes_after"],
            "stages": res["stages"], "scope": res["scope"], "ratio_mlp": res["ratio_mlp"],
            "ratio_linears": res["ratio_linears"], "widths": res["widths"],
            "factored_modules": len(res["ranks"]), "layers": res["num_layers"], "bytes_before": res["bytes_before"],
            "bytes_after": res["bytes_after"], "device": res["device"]}


# calibration presets: the defaults, and a reduced one that keeps the depth check and the
# memory estimate's test points cheap (the peak of each stage but the Fisher pass's does not
# depend on the Fisher windows; the hidden states scale with the tokens)
PRESETS = {"default": [], "reduced": ["--calib-samples", "8", "--fisher-samples", "8"]}


def run_options(run: Dict):
    """The CompressOptions a recorded run was made with: the tool's defaults, its
    preset's calibration flags, its method and scope."""
    from vllm_neuronmlp.tools.options import CompressOptions

    flags = PRESETS[run["preset"]]
    kw = {f.lstrip("-").replace("-", "_"): int(v) for f, v in zip(flags[::2], flags[1::2])}
    return CompressOptions(ratio=0.2, method=run["method"], scope=run["scope"], **kw)


def run_key(r: Dict) -> tuple:
    return (r["shape"], r["layers"], r["method"], r["preset"], r["scope"])


def extrapolate(run: Dict, target_layers: int) -> Dict:
    """time(L) = a + b L from one run's stages: b is what its passes spent per
    layer (every stage but calibration, allocation and the write is a sweep over
    the layers), a the rest (calibration, the LM head inside the Fisher forward
    is counted per layer here, a small overestimate)."""
    sec = run["stages"]["seconds"]
    fixed = sum(sec.get(k, 0.0) for k in ("calibration", "allocation", "write"))
    total = sec.get("total", run["wall_time_s"])
    b = (total - fixed) / run["layers"]
    return {"formula": "time(L) = a + b * L", "a_s": fixed, "b_s_per_layer": b, "layers": target_layers,
            "time_s": fixed + b * target_layers, "from": f"{run['layers']}-layer run, preset {run['preset']}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="directory for the random checkpoints and outputs (tens of GB)")
    ap.add_argument("--runs", nargs="+", default=["llama-3.1-8b:4:hybrid:default", "llama-3.1-8b:4:hybrid:reduced",
                                                   "llama-3.1-8b:8:hybrid:reduced", "llama-3.1-8b:4:fisher:reduced"],
                    help="SHAPE:LAYERS:METHOD:PRESET for each run (shapes: %s; presets: %s; SHAPEs %s are the "
                         "embedded models, LAYERS then ignored)" % (", ".join(SHAPES), ", ".join(PRESETS),
                                                                     ", ".join(EMBEDDED)))
    ap.add_argument("--full-layers", type=int, default=32,
                    help="the full model's depth, for the extrapolation and the dry run (default 32)")
    ap.add_argument("--write-full", action="store_true", help="also write the full 8B model (dry run and disk only)")
    ap.add_argument("--flags", default="", help="extra compress flags for every run, e.g. '--device cuda'")
    ap.add_argument("--import-run", nargs=2, metavar=("SPEC", "SUMMARY_JSON"), action="append", default=[],
                    help="record a run made outside this script (the compress --json summary; its own per-stage "
                         "peaks stand in for the sampled RSS)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "compress_scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and the compressed outputs (default: "
                                                         "deleted after the runs)")
    args = ap.parse_args()

    flags = args.flags.split()
    os.makedirs(args.work, exist_ok=True)
    results: Dict = {"shapes": SHAPES, "layer_params": {k: layer_params(v) for k, v in SHAPES.items()},
                     "presets": PRESETS, "runs": [], "dry_runs": []}
    if os.path.exists(args.json):  # earlier runs are kept; a run made again replaces its entry
        with open(args.json) as f:
            old = json.load(f)
        results["runs"], results["dry_runs"] = old.get("runs", []), old.get("dry_runs", [])

    def record(r: Dict) -> None:
        results["runs"] = [x for x in results["runs"] if run_key(x) != run_key(r)] + [r]
        write(results, args)

    for spec, summary in args.import_run:
        shape, layers, method, preset = spec.split(":")
        with open(summary) as f:
            res = json.load(f)
        peak = max(res["stages"]["peak_rss_bytes"].values())
        record({**_from_summary(res, 0.0, peak, 0, None), "wall_time_s": res["wall_time_s"], "shape": shape,
                "layers": int(layers), "method": method, "preset": preset, "imported": True,
                "estimate": res["memory_estimate"], "command": "vllm-neuronmlp compress SRC OUT --ratio 0.2 "
                + " ".join(PRESETS[preset] + ["--method", method])})
    sources: Dict[tuple, str] = {}
    for spec in args.runs:
        shape, layers, method, preset = spec.split(":")
        layers = int(layers)
        src = source_checkpoint(args.work, shape, layers, sources)
        out = os.path.join(args.work, f"out-{shape}-{layers}-{method}-{preset}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + ".resume", ignore_errors=True)
        mflags = flags + PRESETS[preset] + ["--method", method]
        est = dry_run(src, out, mflags)["estimate"]
        print(f"{spec}: estimated peak {est['peak_bytes'] / GIB:.2f} GiB ({est['peak_stage']})", flush=True)
        r = run_child(src, out, mflags)
        r.update({"shape": shape, "layers": layers if shape not in EMBEDDED else r["layers"], "method": method,
                  "preset": preset, "estimate": est})
        print(f"  measured peak {r['peak_rss_bytes'] / GIB:.2f} GiB, {r['wall_time_s']:.0f} s, "
              f"disk {r['peak_disk_bytes'] / GIB:.2f} GiB", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        record(r)
    if args.write_full:
        shape = "llama-3.1-8b"
        src = source_checkpoint(args.work, shape, args.full_layers, sources)
        for method in ("hybrid", "fisher"):
            est = dry_run(src, os.path.join(args.work, f"out-{args.full_layers}-{method}"),
                          flags + ["--method", method])["estimate"]
            results["dry_runs"] = [d for d in results["dry_runs"] if (d["layers"], d["method"]) !=
                                   (args.full_layers, method)] + [{"shape": shape, "layers": args.full_layers,
                                                                   "method": method, "estimate": est}]
    if not args.keep:
        for src in sources.values():
            if os.path.basename(src) not in EMBEDDED:
                shutil.rmtree(src, ignore_errors=True)
    summarize(results, args)
    write(results, args)
    return 0


def source_checkpoint(work: str, shape: str, layers: int, made: Dict[tuple, str]) -> str:
    """The random checkpoint of `shape` with `layers` layers (written once), or an embedded model."""
    if (shape, layers) in made:
        return made[(shape, layers)]
    if shape in EMBEDDED:
        from vllm_neuronmlp.tools.data import default_model

        src = os.path.join(work, shape)
        if not os.path.exists(os.path.join(src, "config.json")):
            default_model.materialize(src, model=EMBEDDED[shape])
    else:
        src = os.path.join(work, f"{shape}-{layers}")
        if not os.path.exists(os.path.join(src, "config.json")):
            t = time.time()
            nbytes = write_random_llama(src, SHAPES[shape], layers)
            print(f"wrote {layers}-layer {shape} ({nbytes / GIB:.2f} GiB) in {time.time() - t:.0f} s", flush=True)
    made[(shape, layers)] = src
    return src


def summarize(results: Dict, args) -> None:
    results["depth_check"] = {}
    for shape in SHAPES:  # the default method at two depths of one shape, same preset and scope
        runs = [r for r in results["runs"] if r["shape"] == shape and r["method"] == "hybrid"]
        for preset, scope in sorted({(r["preset"], r["scope"]) for r in runs}):
            mine = {r["layers"]: r for r in runs if (r["preset"], r["scope"]) == (preset, scope)}
            if len(mine) >= 2:
                lo, hi = min(mine), max(mine)
                diff = mine[hi]["peak_rss_bytes"] - mine[lo]["peak_rss_bytes"]
                one_layer = 2 * results["layer_params"][shape]
                results["depth_check"][f"{shape}:{preset}:{scope}"] = {
                    "method": "hybrid", "layers": [lo, hi], "peak_difference_bytes": diff,
                    "one_layer_bytes_bf16": one_layer, "ok": diff < one_layer}
    results["extrapolation"] = {}
    for r in results["runs"]:
        if r["shape"] == "llama-3.1-8b" and r["preset"] == "default":
            results["extrapolation"][r["method"]] = {**extrapolate(r, args.full_layers),
                                                     "estimate": full_depth_estimate(r, args.full_layers)}


def recorded_shape(run: Dict, layers: Optional[int] = None):
    """The memory_estimate.ModelShape a recorded run's dry run saw, or the same
    model at depth `layers` (its source grown by that many layers' weights)."""
    from vllm_neuronmlp.tools import memory_estimate as me

    inputs = run["estimate"]["inputs"]
    layers = inputs["layers"] if layers is None else layers
    extra = (layers - inputs["layers"]) * inputs["layer_params"] * inputs["source_bytes_per_param"]
    return me.ModelShape(**{k: inputs[k] for k in ("hidden", "intermediate", "vocab", "heads", "kv_heads", "head_dim",
                                                   "layer_params", "source_bytes_per_param")},
                         layers=layers, source_bytes=inputs["source_bytes"] + extra)


def full_depth_estimate(run: Dict, layers: int) -> Dict:
    """The memory estimate (the dry run's, from the shape alone) of the same run on
    the full-depth model: the 4- or 8-layer cut with `layers` layers."""
    from vllm_neuronmlp.tools import memory_estimate as me

    shp = recorded_shape(run, layers)
    est = me.estimate(shp, run_options(run), run["method"], device=run["device"], attention=run["scope"] == "all")
    return {"layers": layers, "peak_bytes": est.peak_bytes, "peak_stage": est.peak_stage,
            "disk_bytes": est.disk_bytes, "source_bytes": shp.source_bytes}


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

    runs = sorted(results["runs"], key=lambda r: (r["shape"], r["preset"], r["method"], r["layers"]))
    if not runs:
        return
    labels = [f"{r['shape'].replace('llama-3.1-8b', '8B')} {r['layers']}L\n{r['method']} {r['preset']}" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(runs))
    axes[0].bar([i - 0.2 for i in x], [r["peak_rss_bytes"] / GIB for r in runs], 0.4, label="measured peak RSS")
    axes[0].bar([i + 0.2 for i in x], [r["estimate"]["peak_bytes"] / GIB for r in runs], 0.4,
                label="estimate (--dry-run)", alpha=0.7)
    axes[0].axhline(20, color="tab:red", lw=1, ls="--", label="20 GiB target")
    axes[0].set_xticks(list(x), labels, fontsize=8)
    axes[0].set_ylabel("GiB")
    axes[0].set_title("peak memory, ratio 0.2")
    axes[0].legend(fontsize=7)
    bottom = [0.0] * len(runs)
    for stage in STAGES:
        vals = [r["stages"]["seconds"].get(stage, 0.0) / 60 for r in runs]  # the stages do not overlap
        axes[1].bar(list(x), vals, 0.6, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set_xticks(list(x), labels, fontsize=8)
    axes[1].set_ylabel("minutes")
    axes[1].set_title("wall time by stage (2 shared CPU cores)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
