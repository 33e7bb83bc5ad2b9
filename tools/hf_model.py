"""Loading a checkpoint into a plain transformers model, dense or `svd_neuron`,
without vLLM and without relying on an HF quantizer being registered.

Factored modules become :class:`FactoredLinearHF`, two bias-free nn.Linear
children `u` (in -> r) and `v` (r -> out), so that LoRA adapters (peft) can
attach to them and merge back into the same two factors. Used by the LoRA
recovery step and by the transformers perplexity path of the benchmarks.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from vllm_neuronmlp import checkpoint_format as cf


class FactoredLinearHF(nn.Module):
    """y = v(u(x)) with u.weight = svd_u^T [r, in] and v.weight = svd_v^T [out, r]."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.v = nn.Linear(rank, out_features, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(x))

    def set_factors(self, u: torch.Tensor, v: torch.Tensor) -> None:
        with torch.no_grad():
            self.u.weight.copy_(u.T)
            self.v.weight.copy_(v.T)

    def factors(self):
        return self.u.weight.detach().T.contiguous(), self.v.weight.detach().T.contiguous()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def load_model(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, ranks) for a dense or svd_neuron checkpoint at `path`; weights
    read with safetensors only."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = cf.read_config(path)
    ranks: Dict[str, int] = {}
    if cf.has_svd_config(raw):
        ranks = cf.read_quantization_config(path).ranks
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, cf.QUANTIZATION_CONFIG_KEY):
        delattr(config, cf.QUANTIZATION_CONFIG_KEY)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, rank in ranks.items():
        lin = model.get_submodule(name)
        _set_module(model, name, FactoredLinearHF(lin.in_features, lin.out_features, rank))
    model.to_empty(device="cpu")
    files = cf.safetensors_files(path)
    state = model.state_dict()
    loaded = set()
    by_file: Dict[str, list] = {}
    for name in files:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(f, framework="pt") as h:
                for name in names:
                    split = cf.split_factor_name(name)
                    t = h.get_tensor(name)
                    if split:
                        module, leaf = split
                        key = f"{module}.{'u' if leaf == cf.U_SUFFIX else 'v'}.weight"
                        t = t.T
                    else:
                        key = name
                    if key not in state:
                        continue
                    state[key].copy_(t.to(state[key].dtype))
                    loaded.add(key)
    missing = [k for k in state if k not in loaded]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise cf.CheckpointFormatError(f"{path}: tensors missing for {missing[:5]}")
    # non-persistent buffers (rotary inv_freq) were left uninitialised by to_empty: rebuild them
    for name, mod in model.named_modules():
        if hasattr(mod, "rope_init_fn") or type(mod).__name__.endswith("RotaryEmbedding"):
            fresh = type(mod)(config=config)
            _set_module(model, name, fresh)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(dtype)
    model.eval()
    return model, ranks


def factored_modules(model: nn.Module) -> Dict[str, FactoredLinearHF]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinearHF)}
