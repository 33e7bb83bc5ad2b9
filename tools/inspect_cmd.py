"""`vllm-neuronmlp inspect CKPT`: validate an svd_neuron checkpoint and summarize it."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

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
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def summarize(ckpt: str, check_values: bool = True) -> Dict:
    """Validated summary of a checkpoint (raises CheckpointFormatError)."""
    from vllm_neuronmlp import checkpoint_format as cf

    report = cf.validate(ckpt, check_values=check_values)
    ranks = {m: r for m, (_i, _o, r) in report.factored.items()}
    by_proj: Dict[str, List[int]] = {}
    for m, r in ranks.items():
        by_proj.setdefault(cf.projection_of(m) or "?", []).append(r)
    text = report.model_config.get("text_config", report.model_config)
    return {
        "checkpoint": ckpt,
        "format_version": report.quant.format_version,
        "block_size": report.quant.block_size,
        "factored_modules": len(ranks),
        "mlp_modules": 3 * int(text.get("num_hidden_layers", 0)),
        "ranks": ranks,
        "ranks_by_projection": {p: {"min": min(v), "max": max(v), "mean": sum(v) / len(v)} for p, v in by_proj.items()},
        "mlp_ratio": cf.mlp_ratio(report.model_config, ranks),
        "mlp_params_dense": report.mlp_dense_params,
        "mlp_params_factored": report.mlp_factored_params,
        "tensor_bytes": report.tensor_bytes,
        "provenance": report.quant.provenance,
    }


def run(args) -> int:
    s = summarize(args.ckpt, check_values=not args.no_values)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['checkpoint']}: valid svd_neuron checkpoint (format v{s['format_version']}, block size "
          f"{s['block_size']})")
    print(f"  factored {s['factored_modules']} of {s['mlp_modules']} MLP projections; MLP ratio "
          f"{s['mlp_ratio']:.4f} (parameters of the factored modules {s['mlp_params_dense']:,} -> "
          f"{s['mlp_params_factored']:,})")
    for proj, st in sorted(s["ranks_by_projection"].items()):
        print(f"  {proj}: rank min {st['min']} max {st['max']} mean {st['mean']:.1f}")
    print(f"  tensor bytes {s['tensor_bytes']:,}")
    prov = s["provenance"]
    if prov:
        print("  provenance:")
        for k, v in prov.items():
            print(f"    {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    layers: Dict[int, Dict[str, int]] = {}
    for m, r in s["ranks"].items():
        parts = m.split(".")
        idx = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
        layers.setdefault(idx, {})[parts[-1]] = r
    print("  ranks (layer: gate up down):")
    for idx in sorted(layers):
        d = layers[idx]
        print(f"    {idx:>3}: " + " ".join(f"{str(d.get(p, 'dense')):>6}" for p in ("gate_proj", "up_proj", "down_proj")))
    return 0
