"""Peak memory and wall time of `compress`: streaming means memory follows one
decoder layer, not the model.

1. Writes a random-weight checkpoint of Llama-3.2-1B shape (hidden 2048,
   intermediate 8192, 32 heads / 8 KV heads, vocab 128256, bf16, tied
   embeddings) with 16 layers and another with 8, tensor by tensor (the
   benchmark never holds the model either), into a temporary directory that is
   deleted afterwards.
2. Compresses each in a fresh subprocess (ratio 0.2, method whiten, uniform
   ranks, calibration 8 x 128 tokens of the built-in text, to keep the run
   short on 2 cores; error-aware holds one more Gram matrix per projection
   input, adaptive adds passes that hold less than the factor pass: neither
   grows with the number of layers) and records the child's peak RSS
   (ru_maxrss) and wall time.
3. Checks that the two peaks differ by less than one decoder layer's weights.
4. Does the same for SmolLM2-135M (if `--smollm2 DIR` is given, or
   materialized into the temp dir), with the default calibration (64 x 512).

Writes benchmarks/results/compress_memory.json and .png.

    python benchmarks/compress_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LLAMA_1B = dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256)


def write_random_llama(path: str, layers: int, seed: int = 0, shard_bytes: int = 1 << 30) -> int:
    """A random Llama-3.2-1B-shaped checkpoint, written shard by shard. Returns bytes of weights."""
    import torch
    from safetensors.torch import save_file

    from vllm_neuronmlp.tools.data import tiny

    os.makedirs(path, exist_ok=True)
    tiny.make_tokenizer(path)
    h, f, nh, kv, hd, v = (LLAMA_1B[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": v, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 0,
        "eos_token_id": 0, "attention_bias": False, "mlp_bias": False,
    }
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

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


def layer_bytes() -> int:
    h, f, nh, kv, hd = (LLAMA_1B[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim"))
    params = 2 * nh * hd * h + 2 * kv * hd * h + 3 * h * f + 2 * h
    return params * 2  # bf16


def run_child(src: str, out: str, extra) -> dict:
    """Compress in a fresh process; peak RSS from the kernel's accounting of that child."""
    code = (
        "import sys, json, time, torch\n"
        "torch.set_num_threads(2)\n"
        "from vllm_neuronmlp.tools import compressor as C\n"
        "kw = json.loads(sys.argv[3])\n"
        "t = time.time()\n"
        "r = C.compress(sys.argv[1], sys.argv[2], kw.pop('ratio'), progress=False, **kw)\n"
        "print(json.dumps({'wall_time_s': time.time() - t, 'ratio_mlp': r.ratio_mlp, 'bytes_after': r.bytes_after,"
        " 'bytes_before': r.bytes_before}))\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, src, out, json.dumps(extra)], capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compress child exited with {proc.returncode}: {proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib < before:
        peak_kib = before
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update({"peak_rss_mib": peak_kib / 1024, "process_wall_s": wall})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(RESULTS, "compress_memory.json"))
    ap.add_argument("--smollm2", default=None, help="existing SmolLM2 checkpoint (else materialized)")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--tmp", default=None, help="parent of the temporary directory")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16],
                    help="layer counts to run, smallest first (default 8 16)")
    ap.add_argument("--prior", default=None,
                    help="JSON lines of earlier runs (one per layer count) to merge, e.g. when the runs were "
                         "made in separate invocations (peak RSS is per child process either way)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="compress_memory-", dir=args.tmp)
    results = {"llama_1b_shape": LLAMA_1B, "layer_bytes_bf16": layer_bytes(), "runs": []}
    try:
        common = {"ratio": 0.2, "method": "whiten", "rank_allocation": "uniform", "calib_samples": 8,
                  "calib_seq_len": 128}
        # ru_maxrss of RUSAGE_CHILDREN is a max over all children so far: run the smaller model first
        if args.prior:
            with open(args.prior) as fh:
                results["runs"].extend(json.loads(line) for line in fh if line.strip().startswith("{"))
        for layers in args.layers:
            src = os.path.join(tmp, f"llama1b-{layers}")
            t = time.time()
            nbytes = write_random_llama(src, layers)
            print(f"wrote {layers}-layer model ({nbytes / 2**30:.2f} GiB) in {time.time() - t:.0f}s", flush=True)
            r = run_child(src, os.path.join(tmp, f"out-{layers}"), common)
            r.update({"model": f"random Llama-3.2-1B shape, {layers} layers", "layers": layers,
                      "model_bytes": nbytes, **{k: v for k, v in common.items()}})
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            shutil.rmtree(src)
            shutil.rmtree(os.path.join(tmp, f"out-{layers}"))
        by_layers = {r["layers"]: r for r in results["runs"]}
        if 8 in by_layers and 16 in by_layers:
            a, b = by_layers[8], by_layers[16]
            diff = (b["peak_rss_mib"] - a["peak_rss_mib"]) * 2**20
            results["peak_rss_diff_16_vs_8_bytes"] = diff
            results["one_layer_bytes"] = layer_bytes()
            results["streaming_ok"] = diff < layer_bytes()
            print(f"peak RSS 16 vs 8 layers differs by {diff / 2**20:.1f} MiB; one layer is "
                  f"{layer_bytes() / 2**20:.1f} MiB -> {'OK' if results['streaming_ok'] else 'FAIL'}", flush=True)
        if not args.skip_smollm2:
            smol = args.smollm2
            if smol is None:
                from vllm_neuronmlp.tools.data import default_model

                smol = default_model.materialize(os.path.join(tmp, "smollm2"))
            r = run_child(smol, os.path.join(tmp, "out-smol"), {"ratio": 0.2})
            r.update({"model": "SmolLM2-135M-Instruct", "layers": 30, "settings": "defaults (error-aware, adaptive, "
                      "64 x 512 calibration tokens)", "ratio": 0.2})
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.splitext(args.json)[0] + ".png")


def plot(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [r["model"].replace("random Llama-3.2-1B shape, ", "Llama-1B shape\n") for r in runs]
    axes[0].bar(labels, [r["peak_rss_mib"] for r in runs], color="tab:blue", label="peak RSS of compress")
    axes[0].bar(labels, [r.get("model_bytes", 0) / 2**20 for r in runs], color="tab:gray", alpha=0.4,
                label="model weights (bf16)")
    axes[0].set_ylabel("MiB")
    axes[0].set_title("peak memory: follows one layer, not the model")
    axes[0].legend(fontsize=8)
    axes[1].bar(labels, [r["wall_time_s"] for r in runs], color="tab:orange")
    axes[1].set_ylabel("seconds")
    axes[1].set_title("compress wall time (2 cores)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
