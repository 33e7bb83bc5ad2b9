"""`vllm-neuronmlp inspect CKPT`: validate an svd_neuron checkpoint and summarize it."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

from vllm_neuronmlp.tools.cli.common import add_json_argument, emit

DESCRIPTION = """\
Check CKPT against the svd_neuron checkpoint format (version, ranks, factor
shapes and values, no leftover dense weights) and print what it holds: the
rank of every factored projection, the compression ratio, tensor bytes and the
provenance recorded by `compress`. Exits non-zero with a message naming the
file and tensor when the checkpoint is invalid.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="validate and summarize an svd_neuron checkpoint",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory")
    p.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan of the factors (faster)")
    add_json_argument(p, "the summary")
    p.set_defaults(func=run)


def summarize(ckpt: str, check_values: bool = True) -> Dict:
    """Validated summary of a checkpoint (raises CheckpointFormatError)."""
    from vllm_neuronmlp import checkpoint_format as cf
    from vllm_neuronmlp import mlp_families as fam

    report = cf.validate(ckpt, check_values=check_values)
    ranks = {m: r for m, (_i, _o, r) in report.factored.items()}
    by_proj: Dict[str, List[int]] = {}
    for m, r in ranks.items():
        by_proj.setdefault(fam.role_of(m) or fam.attention_role_of(m) or "?", []).append(r)
    text = report.model_config.get("text_config", report.model_config)
    return {
        "checkpoint": ckpt,
        "format_version": report.quant.format_version,
        "block_size": report.quant.block_size,
        "factored_modules": len(report.mlp_factored),
        "factored_attention_modules": len(report.attention_factored),
        "mlp_modules": 3 * int(text.get("num_hidden_layers", 0)),
        "ranks": ranks,
        "ranks_by_projection": {p: {"min": min(v), "max": max(v), "mean": sum(v) / len(v)} for p, v in by_proj.items()},
        "mlp_ratio": cf.mlp_ratio(report.model_config, {m: r for m, (_i, _o, r) in report.mlp_factored.items()},
                                  widths=report.quant.widths),
        "widths": dict(report.quant.widths),
        "intermediate_size": int(text.get("intermediate_size", 0)),
        "num_layers": int(text.get("num_hidden_layers", 0)),
        "mlp_params_dense": report.mlp_dense_params,
        "mlp_params_factored": report.mlp_factored_params,
        "tensor_bytes": report.tensor_bytes,
        "provenance": report.quant.provenance,
    }


def run(args) -> int:
    s = summarize(args.ckpt, check_values=not args.no_values)
    emit(args, describe(s), s)
    return 0


def describe(s: Dict) -> str:
    from vllm_neuronmlp import mlp_families as fam
    from vllm_neuronmlp.tools.allocation import layer_index
    from vllm_neuronmlp.tools.summary import describe_mix, layer_table

    lines = [f"{s['checkpoint']}: valid svd_neuron checkpoint (format v{s['format_version']}, block size "
             f"{s['block_size']})",
             f"  MLP ratio {s['mlp_ratio']:.4f}; factored {s['factored_modules']} of {s['mlp_modules']} MLP "
             f"projections"
             + (f" (their parameters {s['mlp_params_dense']:,} -> {s['mlp_params_factored']:,})"
                if s["factored_modules"] else "")]
    if s["factored_attention_modules"]:
        lines.append(f"  factored {s['factored_attention_modules']} of {4 * (s['mlp_modules'] // 3)} attention "
                     f"projections (format v3)")
    if s["widths"]:
        lines.append(f"  narrowed {len(s['widths'])} of {s['mlp_modules'] // 3} layers below intermediate size "
                     f"{s['intermediate_size']}")
    mix = s["provenance"].get("allocation_mix")
    if mix:
        lines.append("  " + describe_mix(mix))
    for role in fam.ROLES + fam.ATTENTION_ROLES:
        st = s["ranks_by_projection"].get(role)
        if st:
            lines.append(f"  {role}: rank min {st['min']} max {st['max']} mean {st['mean']:.1f}")
    lines.append(f"  tensor bytes {s['tensor_bytes']:,}")
    prov = s["provenance"]
    if prov:
        lines.append("  provenance:")
        for k, v in prov.items():
            lines.append(f"    {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    widths = {layer_index(m): k for m, k in s["widths"].items()}
    lines += layer_table(s["num_layers"], s["ranks"], widths, s["intermediate_size"])
    return "\n".join(lines)
