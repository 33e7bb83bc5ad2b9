"""Smallest stand-ins for the vllm-neuron pieces our Trainium variant talks to.

vllm-neuron cannot be installed here (the Neuron SDK is not on PyPI), so the tests that
use these are UNIT tests of our logic against the upstream signatures, not integration
tests. Each stand-in says which upstream file it mirrors: vllm-neuron's native line, tag
v0.21.0.1.0.0 (commit ae6c10e), as read in the public copy jinhuang12/vllm-neuron at
commit ed3580d. Only what our code touches is reproduced.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch
from safetensors import safe_open


class FakeGroup:
    """The collectives of a TP group coordinator as the stock MLP uses them
    (`all_gather(t, dim=0)`, `reduce_scatter(t, dim=0)`, `all_reduce(t)`; vLLM's
    GroupCoordinator). One process plays one rank: the test supplies what the gather
    returns and sums the recorded partials itself, as the real collective would."""

    def __init__(self, world_size: int, rank: int, gathered: Optional[torch.Tensor] = None):
        self.world_size, self.rank_in_group, self.gathered = world_size, rank, gathered
        self.partials: List[torch.Tensor] = []

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        assert dim == 0 and self.gathered is not None
        return self.gathered

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        assert dim == 0
        self.partials.append(t)
        return t.chunk(self.world_size, dim=0)[self.rank_in_group]   # shape only; the test sums

    def all_reduce(self, t: torch.Tensor) -> None:
        self.partials.append(t)        # vllm-neuron's model code uses it in place (returns None)


def read_checkpoint_like_vllm_neuron(model: torch.nn.Module, checkpoint_dir: str, mappings: Dict,
                                     rank: int = 0) -> Dict[str, torch.Tensor]:
    """Mirror of `SafetensorsCheckpoint.load_sharded` (vllm_neuron/utils/checkpoints.py):
    for every parameter, checkpoint key(s) = mappings.get(name, name); the parameter's
    `weight_loader` (default: take the tensor whole) gets one lazy slice per key; a
    missing key raises. Then `load_state_dict(..., strict=False, assign=True)` like
    `LlamaForCausalLM.load_weights` does."""
    files = [os.path.join(checkpoint_dir, f) for f in sorted(os.listdir(checkpoint_dir)) if f.endswith(".safetensors")]
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    state = {}
    for name, param in model.named_parameters():
        keys = mappings.get(name, name)
        keys = keys if isinstance(keys, list) else [keys]
        missing = [k for k in keys if k not in where]
        if missing:
            raise RuntimeError(f"Checkpoint key(s) not found for parameter '{name}': {missing}.")
        slices = [where[k].get_slice(k) for k in keys]
        loader = getattr(param, "weight_loader", None)
        state[name] = loader.load(slices, rank) if loader is not None else slices[0][:]
    model.load_state_dict(state, strict=False, assign=True)
    return state


class StockTransposedLoader:
    """The stock loaders of vllm_neuron/utils/weight_loader.py
    (`sharding_weight_loader(..., is_storage_transposed=True)`, `fused_qkv_weight_loader`),
    reduced to what the tests need: concatenate the checkpoint tensors (q, k, v), keep this
    rank's part of a split dimension (HF [out, in]: `out` for the column-parallel gate/up,
    `in` for the row-parallel down, with the MLP group's own rank like the stock MLP's
    `with_rank_override`), and transpose to the stored [in, out]. Attention is not split
    here (the stand-in model keeps it whole: the tests look at MLPs only)."""

    def __init__(self, split_dim: Optional[int] = None, rank: int = 0, world_size: int = 1):
        self.split_dim, self.rank, self.world_size = split_dim, rank, world_size

    def load(self, slices, rank):
        full = torch.cat([s[:] for s in slices], dim=0)
        if self.split_dim is not None and self.world_size > 1:
            full = full.chunk(self.world_size, dim=self.split_dim)[self.rank]
        return full.t().contiguous()


def _stock(param: torch.nn.Parameter, split_dim: Optional[int] = None, group: Optional["FakeGroup"] = None
           ) -> torch.nn.Parameter:
    world, rank = (group.world_size, group.rank_in_group) if group is not None else (1, 0)
    param.weight_loader = StockTransposedLoader(split_dim, rank, world)
    return param


class StandinMLP(torch.nn.Module):
    """vllm_neuron/model/llama3/model.py `LlamaMLP`: the attributes our variant reads
    (tp_group, world_size, rank, mlp_tp_group, mlp_tp_size, mlp_tp_rank) and its dense
    parameters; its forward is not needed by the tests."""

    def __init__(self, hidden: int, intermediate: int, group: FakeGroup, dtype=torch.float32):
        super().__init__()
        self.tp_group = self.mlp_tp_group = group
        self.world_size = self.mlp_tp_size = group.world_size
        self.rank = self.mlp_tp_rank = group.rank_in_group
        i_local = intermediate // group.world_size   # gate/up column-parallel, down row-parallel
        self.gate_proj_weight = _stock(torch.nn.Parameter(torch.empty(hidden, i_local, dtype=dtype)), 0, group)
        self.up_proj_weight = _stock(torch.nn.Parameter(torch.empty(hidden, i_local, dtype=dtype)), 0, group)
        self.down_proj_weight = _stock(torch.nn.Parameter(torch.empty(i_local, hidden, dtype=dtype)), 1, group)


class StandinLayer(torch.nn.Module):
    def __init__(self, hidden, intermediate, group, dtype):
        super().__init__()
        self.input_layernorm = torch.nn.Module()
        self.input_layernorm.weight = torch.nn.Parameter(torch.empty(hidden, dtype=dtype))
        self.post_attention_layernorm = torch.nn.Module()
        self.post_attention_layernorm.weight = torch.nn.Parameter(torch.empty(hidden, dtype=dtype))
        self.self_attn = torch.nn.Module()
        self.mlp = StandinMLP(hidden, intermediate, group, dtype)


class StandinLlamaForCausalLM(torch.nn.Module):
    """vllm_neuron/model/llama3/model.py `LlamaForCausalLM` (and, with the QK-norms,
    vllm_neuron/model/qwen3/model.py `Qwen3ForCausalLM`, which shares its structure): `from_configs(hf_config,
    neuron_config)` (the config code rejects an unknown `quant_method`, as
    vllm_neuron/model/llama3/quantization.py does), `model.layers[i].mlp`, and
    `load_weights(checkpoint_path, device, cache_dir)` with the stock mapping table (fused
    QKV from q/k/v, dense MLP `*_proj_weight` from `*_proj.weight`, tied lm_head)."""

    group_factory = staticmethod(lambda: FakeGroup(1, 0))

    def __init__(self, cfg: dict):
        super().__init__()
        h, i, dtype = cfg["hidden_size"], cfg["intermediate_size"], torch.float32
        heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim") or h // cfg["num_attention_heads"]
        group = self.group_factory()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Module()
        self.model.embed_tokens.weight = torch.nn.Parameter(torch.empty(cfg["vocab_size"], h))
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.empty(h))
        self.model.layers = torch.nn.ModuleList(StandinLayer(h, i, group, dtype) for _ in range(cfg["num_hidden_layers"]))
        for layer in self.model.layers:
            layer.self_attn.qkv_proj_weight = _stock(torch.nn.Parameter(torch.empty(h, (heads + 2 * kv) * hd)))
            layer.self_attn.o_proj_weight = _stock(torch.nn.Parameter(torch.empty(heads * hd, h)))
            if cfg.get("model_type") == "qwen3":   # vllm_neuron/model/qwen3/model.py: per-head QK-norm
                for norm in ("q_norm", "k_norm"):
                    layer.self_attn.add_module(norm, torch.nn.Module())
                    getattr(layer.self_attn, norm).weight = torch.nn.Parameter(torch.empty(hd))
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = torch.nn.Parameter(torch.empty(cfg["vocab_size"], h))
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", False)
        self.loaded_state: Dict[str, torch.Tensor] = {}

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        qc = cfg.get("quantization_config")
        if qc and str(qc.get("quant_method", "")).lower() not in ("modelopt", "compressed-tensors"):
            raise ValueError(f"Unsupported quantization_config.quant_method={qc.get('quant_method')!r}. "
                             "Llama3 currently supports: 'modelopt', 'compressed-tensors'.")
        return cls(cfg)

    def load_weights(self, checkpoint_path: str, device=None, cache_dir=None) -> None:
        mappings: Dict[str, object] = {}
        for i in range(len(self.model.layers)):
            p = f"model.layers.{i}"
            mappings[f"{p}.self_attn.qkv_proj_weight"] = [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]
            mappings[f"{p}.self_attn.o_proj_weight"] = f"{p}.self_attn.o_proj.weight"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                mappings[f"{p}.mlp.{proj}_weight"] = f"{p}.mlp.{proj}.weight"
        if self.tie_word_embeddings:
            mappings["lm_head.weight"] = "model.embed_tokens.weight"
        self.mappings = mappings
        self.loaded_state = read_checkpoint_like_vllm_neuron(self, checkpoint_path, mappings)


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)
