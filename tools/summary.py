"""The human-readable summary `compress` prints."""
from __future__ import annotations

from typing import Dict

from vllm_neuronmlp import mlp_families as fam
from vllm_neuronmlp.tools import ranks as rk


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(res) -> str:
    """Summary of a compressor.CompressResult."""
    lines = [f"compressed -> {res.out}",
             f"  method {res.method}, rank allocation {res.allocation}, {res.num_layers} layers"]
    per_layer: Dict[int, Dict[str, str]] = {}
    for name in list(res.ranks) + list(res.dense_modules):
        per_layer.setdefault(rk.layer_index(name), {})[fam.role_of(name)] = (
            str(res.ranks[name]) if name in res.ranks else "dense")
    lines.append("  ranks per projection (layer: gate up down):")
    rows = [f"{layer:>3}: " + " ".join(f"{d.get(role, '-'):>5}" for role in fam.ROLES)
            for layer, d in sorted(per_layer.items())]
    for k in range(0, len(rows), 3):
        lines.append("    " + "   |".join(rows[k:k + 3]))
    lines.append(f"  ratio requested {res.ratio_requested:.4f}; achieved: MLP {res.ratio_mlp:.4f}, "
                 f"whole model {res.ratio_model:.4f}")
    lines.append(f"  MLP parameters {res.mlp_params_before:,} -> {res.mlp_params_after:,}; "
                 f"model {res.params_before:,} -> {res.params_after:,}")
    lines.append(f"  size on disk {human_bytes(res.bytes_before)} -> {human_bytes(res.bytes_after)}")
    if res.calibration:
        c = res.calibration
        fisher = f" (Fisher pass: {c['fisher_samples']} of them, drawn at random)" if "fisher_samples" in c else ""
        lines.append(f"  calibration: {c['samples']} x {c['seq_len']} tokens from {', '.join(c['source'])}{fisher}")
    if res.selection.get("validation_ppl"):
        sc = res.selection["validation_ppl"]
        lines.append(f"  allocation chosen: {res.selection['chosen']} (validation perplexity on "
                     f"{res.selection['validation_tokens']} held-aside calibration tokens: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sc.items()) + ")")
    if res.jitter_modules:
        lines.append(f"  Cholesky needed jitter for {len(res.jitter_modules)} input covariance(s) "
                     f"(e.g. {res.jitter_modules[0]})")
    if res.lora:
        lr = res.lora
        if "note" in lr:
            lines.append(f"  LoRA: not run, {lr['note']}")
        else:
            lines.append(f"  LoRA: {lr['steps']} steps on {lr['adapted_factored']} factored and "
                         f"{lr['adapted_dense_narrowed']} narrowed dense projections, validation perplexity "
                         f"{lr['ppl_before']:.3f} -> {lr['ppl_after']:.3f} ({lr['eval_tokens']} tokens)")
    for w in res.warnings:
        lines.append(f"  warning: {w}")
    lines.append(f"  wall time {res.wall_time_s:.1f} s")
    return "\n".join(lines)
