"""The human-readable summary `compress` prints."""
from __future__ import annotations

from typing import Dict, List, Mapping

from vllm_neuronmlp import mlp_families as fam
from vllm_neuronmlp.tools import allocation as alloc

ROWS_PER_LINE = 3


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def layer_table(num_layers: int, ranks: Mapping[str, int], widths: Mapping[int, int], intermediate: int) -> List[str]:
    """Each decoder layer's MLP width and projection ranks, the one table `compress`'s
    summary and `inspect` print: `  7: w1408 dense dense dense` (narrowed, dense),
    ` 12: w1536 r256 r256 dense` (full width, gate and up factored at rank 256),
    and, when an attention projection is factored anywhere, q k v o after a `/`.
    `ranks` {module: rank} lists the factored modules; `widths` {layer: k} the
    narrowed layers."""
    by_layer: Dict[int, Dict[str, int]] = {}
    for name, r in ranks.items():
        role = fam.role_of(name) or fam.attention_role_of(name)
        if role is not None:
            by_layer.setdefault(alloc.layer_index(name), {})[role] = r
    attention = any(fam.attention_role_of(n) for n in ranks)
    width_cell = max(len(f"w{k}") for k in [intermediate, *widths.values()])
    rank_cell = max([len("dense")] + [len(f"r{r}") for r in ranks.values()])
    rows = []
    for i in range(num_layers):
        roles = by_layer.get(i, {})

        def cells(which):
            return [(f"r{roles[role]}" if role in roles else "dense").ljust(rank_cell) for role in which]

        row = [f"w{widths.get(i, intermediate)}".ljust(width_cell)] + cells(fam.ROLES)
        if attention:
            row += ["/"] + cells(fam.ATTENTION_ROLES)
        rows.append(f"{i:>3}: " + " ".join(row))
    heading = "  per layer (layer: MLP width, then gate up down"
    heading += " / q k v o" if attention else ""
    lines = [heading + " as rN = factored at rank N, or dense):"]
    per_line = ROWS_PER_LINE - (1 if attention else 0)
    for k in range(0, len(rows), per_line):
        lines.append("    " + "  | ".join(rows[k:k + per_line]))
    return lines


def describe_mix(mix: Mapping) -> str:
    """One line: where the removed parameters came from (compressor.allocation_mix)."""
    return (f"removed by MLP channels {mix['ratio_by_channels']:.4f}, MLP ranks "
            f"{mix.get('ratio_by_mlp_ranks', mix['ratio_by_ranks']):.4f}, attention ranks "
            f"{mix.get('ratio_by_attention_ranks', 0.0):.4f} (fractions of the targeted parameters; "
            f"{mix['layers_narrowed']} layers narrowed, {mix['factored_modules']} projections factored)")


def format_summary(res) -> str:
    """Summary of a compressor.CompressResult."""
    lines = [f"compressed -> {res.out}",
             f"  method {res.method}, rank allocation {res.allocation}, {res.num_layers} layers"]
    lines += layer_table(res.num_layers, res.ranks, res.widths, res.intermediate_size)
    scope = ("of every decoder linear (q k v o gate up down; embeddings and LM head not counted)"
             if res.scope == "all" else "of the MLP projections")
    lines.append(f"  ratio requested {res.ratio_requested:.4f} {scope}; achieved: MLP {res.ratio_mlp:.4f}, "
                 f"decoder linears {res.ratio_linears:.4f}, whole model {res.ratio_model:.4f}")
    lines.append(f"  MLP parameters {res.mlp_params_before:,} -> {res.mlp_params_after:,}; decoder linears "
                 f"{res.linear_params_before:,} -> {res.linear_params_after:,}; "
                 f"model {res.params_before:,} -> {res.params_after:,}")
    lines.append(f"  size on disk {human_bytes(res.bytes_before)} -> {human_bytes(res.bytes_after)}")
    if res.mix:
        lines.append("  " + describe_mix(res.mix))
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
