"""`compress --export dense`: a channel-selected checkpoint as a plain model.

When every layer keeps the same number k of intermediate channels and no
projection is factored, the narrowed model is simply the original
architecture with `intermediate_size = k`: its tensors already have those
shapes (format v2, docs/checkpoint_format.md), so the export only rewrites
config.json without `quantization_config`, and stock vLLM or transformers
serve it without this plugin. The compression provenance moves to
`compression.json` beside it. Anything else is refused with the reason.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.writer import write_json

EXPORTS = ("svd_neuron", "dense")
PROVENANCE_FILE = "compression.json"


def check_exportable(ranks: Mapping[str, int], widths: Mapping[Any, int], num_layers: int) -> int:
    """The one intermediate_size of the plain model for a plan (factored
    modules `ranks`, narrowed layers `widths`); UserError naming why there is none."""
    why = []
    if ranks:
        attention = sum(1 for m in ranks if cf.is_attention_module(m))
        why.append(f"{len(ranks)} projection(s) are factored (a plain model has no factors"
                   + (f"; {attention} of them attention projections)" if attention else ")"))
    if len(widths) != num_layers:
        why.append(f"{num_layers - len(widths)} of {num_layers} layer(s) keep the full width")
    kept = sorted(set(widths.values()))
    if len(kept) > 1:
        why.append(f"the layers keep different widths ({', '.join(str(w) for w in kept)}; one "
                   f"intermediate_size must fit all)")
    if why:
        raise UserError("--export dense needs every layer narrowed to the same width and nothing factored "
                        "(e.g. --method nystrom --rank-allocation uniform at a ratio that is a whole number of "
                        "blocks); here " + "; ".join(why) + ". Serve it as an svd_neuron checkpoint instead.")
    return kept[0]


def dense_config(config: Mapping[str, Any], num_layers: int) -> Dict[str, Any]:
    """config.json of the plain model equivalent to an svd_neuron `config`."""
    quant = cf.QuantizationConfig.from_dict(config[cf.QUANTIZATION_CONFIG_KEY])
    out = {k: v for k, v in config.items() if k != cf.QUANTIZATION_CONFIG_KEY}
    out["intermediate_size"] = check_exportable(quant.ranks, quant.widths, num_layers)
    return out


def export_dense(directory: str, num_layers: int) -> None:
    """Rewrite the svd_neuron checkpoint in `directory` (being staged) as a plain one."""
    config = cf.read_config(directory)
    plain = dense_config(config, num_layers)
    write_json(os.path.join(directory, PROVENANCE_FILE), config[cf.QUANTIZATION_CONFIG_KEY])
    write_json(os.path.join(directory, cf.CONFIG_FILE), plain)
