"""A checkpoint, dense or `svd_neuron`, as a transformers model on CPU.

`import vllm_neuronmlp` registers the svd_neuron quantizer with transformers
(hf_quantizer.py), so `from_pretrained` swaps every factored projection for an
`SVDLinear` computing `(x U) V` (ops.factored_linear). Used by the LoRA
recovery and by the transformers perplexity path of the benchmarks.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from vllm_neuronmlp import checkpoint_format as cf


def load_model(path: str, dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, Dict[str, int]]:
    """(model in eval mode, {factored module: rank}) for the checkpoint at `path`."""
    import vllm_neuronmlp  # noqa: F401  (registers the svd_neuron quantizer with transformers)
    from transformers import AutoModelForCausalLM

    ranks = cf.read_quantization_config(path).ranks if cf.has_svd_config(cf.read_config(path)) else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), ranks
