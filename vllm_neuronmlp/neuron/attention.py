"""The attention that replaces vllm-neuron's stock attention in a layer whose q/k/v/o
projections a format-v3 checkpoint factors.

It keeps the stock module's contract (vllm_neuron/model/llama3/model.py `LlamaAttention`,
ae6c10e; qwen3/model.py `Qwen3Attention` the same plus per-head q/k norms):

* `forward(hidden_states, positions, position_embeddings, attn_metadata)`; the layer's
  entry `attn_metadata["layers.<i>.self_attn"]` says prefill or decode
  (`max_query_len <= decode_token_threshold`) and where the keys and values go
  (`slot_mapping`, `block_size`, `block_table_tensor`); the paged caches `k_cache` /
  `v_cache` ([blocks, kv heads of this rank, block_size, head_dim]) are bound by the
  model's `bind_kv_cache`, sized by `num_key_value_heads_per_rank`, `head_dim`, `dtype`;
* prefill: the sequence-parallel tokens are all-gathered over `tp_group`, the output
  projection's partial sums reduce-scattered back; decode: all-reduced over the
  attention's TP group (`attn_tp_group`, TP x attention-DP, where the stock module has
  one; Qwen3's reduces over `tp_group`).

Sharding, exactly as the stock module shards the dense projections (its
`fused_qkv_weight_loader` / `sharding_weight_loader`): q heads split over the TP ranks
(rank r holds heads [r nh/tp, (r+1) nh/tp)); KV heads split the same way while tp < nkv,
and once tp >= nkv each rank holds one KV head, replicated tp/nkv times (rank r holds head
r // (tp/nkv)); o row-parallel over the q heads' columns. For a factored projection that
means (the MLP's rule, docs/trainium.md): q/k/v `U` replicated and `V` split by the
columns of the rank's heads; o `U` split by the rows of the rank's heads and `V`
replicated. A projection left dense keeps the stock layout (`[in, out]`, the same split).

Compute: every factored projection is x U V through the fused XUV kernel
(`xuv.fused_xuv`, compute.py) on the Neuron device, or its aten fallback; a dense one is
`x @ W`. Then Qwen3's q/k norms (the stock modules, before RoPE), rotate-half RoPE with
the model's cos/sin, the cache write at `slot_mapping`, softmax attention in fp32 (prefill:
causal over the step's tokens, one sequence, as the stock full-prefill path; decode: each
sequence's cached context through its block table), the output projection. All aten
ops: the stock module's fused attention kernels take the dense fused qkv weight, so they
cannot serve factored projections; what the attention core costs on the device beside
them is for a Trainium host to measure (docs/trainium.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.neuron import compute
from vllm_neuronmlp.neuron.mlp import FactoredProjection, SVDNeuronStateError
from vllm_neuronmlp.neuron.sharding import ShardLoader, SVDShardingError
from vllm_neuronmlp.neuron.stack import HookTargetError, class_path

COLUMN_ROLES = mlp_families.QKV_ROLES      # q, k, v: output split by heads
ROW_ROLES = (mlp_families.O,)              # o: input split by heads


@dataclass(frozen=True)
class HeadSharding:
    """Which heads one TP rank holds, by the stock attention's rule."""
    heads: int
    kv_heads: int
    head_dim: int
    tp: int
    rank: int

    @classmethod
    def checked(cls, heads: int, kv_heads: int, head_dim: int, tp: int, rank: int, where: str) -> "HeadSharding":
        if heads % tp or (tp >= kv_heads and tp % kv_heads) or (tp < kv_heads and kv_heads % tp):
            raise SVDShardingError(
                f"{where}: {heads} attention heads and {kv_heads} KV heads cannot be split over tensor-parallel "
                f"degree {tp} the way vllm-neuron's attention splits them (heads divisible by the degree; KV heads "
                f"divisible by it, or dividing it when replicated)")
        return cls(heads, kv_heads, head_dim, tp, rank)

    @property
    def heads_per_rank(self) -> int:
        return self.heads // self.tp

    @property
    def kv_replicas(self) -> int:
        return self.tp // self.kv_heads if self.tp >= self.kv_heads else 1

    @property
    def kv_heads_per_rank(self) -> int:
        return 1 if self.tp >= self.kv_heads else self.kv_heads // self.tp

    def columns(self, role: str) -> slice:
        """This rank's slice of the projection's head dimension (q/k/v outputs, o inputs)."""
        if role in (mlp_families.K, mlp_families.V):
            n = self.kv_heads_per_rank * self.head_dim
            return slice((self.rank // self.kv_replicas) * n, (self.rank // self.kv_replicas + 1) * n)
        n = self.heads_per_rank * self.head_dim
        return slice(self.rank * n, (self.rank + 1) * n)

    def loader(self, tensor_name: str, role: str, leaf: str, shape: Tuple[int, int],
               dtype: torch.dtype) -> ShardLoader:
        """The loader of one leaf: HF weight [out, in] (stored transposed), U [in, r], V [r, out]."""
        every, cols = slice(None), self.columns(role)
        column = role in COLUMN_ROLES
        if leaf == cf.WEIGHT_SUFFIX:
            index = (cols, every) if column else (every, cols)
        elif leaf == cf.U_SUFFIX:
            index = (every, every) if column else (cols, every)
        else:
            index = (every, cols) if column else (every, every)
        split = index != (every, every) and self.tp > 1
        return ShardLoader(tensor_name, shape, index, leaf == cf.WEIGHT_SUFFIX, split, dtype,
                           f"rank {self.rank}/{self.tp}")


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _all_reduce(group, tensor: torch.Tensor) -> torch.Tensor:
    out = group.all_reduce(tensor)     # vllm-neuron's model code uses it in place; vLLM's returns the result
    return tensor if out is None else out


class SVDNeuronAttention(torch.nn.Module):
    """A drop-in for vllm-neuron's stock attention whose listed projections are factored."""

    def __init__(self, *, layer: int, family: mlp_families.MLPFamily, hidden_size: int,
                 ranks: Mapping[str, Optional[int]], sharding: HeadSharding, tp_group, reduce_group,
                 dtype: torch.dtype, qk_norms: Optional[Tuple[Tuple[str, torch.nn.Module], ...]] = None):
        super().__init__()
        self.layer_idx, self.family, self.sharding = layer, family, sharding
        self.tp_group, self.reduce_group = tp_group, reduce_group
        self.world_size, self.rank = sharding.tp, sharding.rank
        self.hidden_size, self.head_dim, self.dtype = hidden_size, sharding.head_dim, dtype
        self.num_attention_heads, self.num_key_value_heads = sharding.heads, sharding.kv_heads
        self.num_attention_heads_per_rank = sharding.heads_per_rank
        self.num_key_value_heads_per_rank = sharding.kv_heads_per_rank
        self.num_kv_replicas = sharding.kv_replicas
        self.num_key_value_groups = sharding.heads_per_rank // sharding.kv_heads_per_rank
        self.scaling = sharding.head_dim ** -0.5
        self.k_cache = self.v_cache = None            # bound by the model's bind_kv_cache
        for role in mlp_families.ATTENTION_ROLES:
            proj = family.attention_projection(role)
            module = mlp_families.attention_module_name(family, layer, proj)
            n_q, n_kv = sharding.heads * sharding.head_dim, sharding.kv_heads * sharding.head_dim
            n_in, n_out = {mlp_families.Q: (hidden_size, n_q), mlp_families.K: (hidden_size, n_kv),
                           mlp_families.V: (hidden_size, n_kv), mlp_families.O: (n_q, hidden_size)}[role]
            rank = ranks.get(role)
            shapes = ({cf.U_SUFFIX: (n_in, rank), cf.V_SUFFIX: (rank, n_out)} if rank
                      else {cf.WEIGHT_SUFFIX: (n_out, n_in)})
            loaders = {leaf: sharding.loader(f"{module}.{leaf}", role, leaf, shape, dtype)
                       for leaf, shape in shapes.items()}
            self.add_module(proj, FactoredProjection(module, rank, loaders, dtype))
        self.qk_norm_names = tuple(name for name, _ in qk_norms or ())
        for name, norm in qk_norms or ():
            self.add_module(name, norm)               # the stock modules: their names keep the stock mapping
        self._path = None

    @classmethod
    def from_stock(cls, stock: torch.nn.Module, *, layer: int, family: mlp_families.MLPFamily,
                   ranks: Mapping[str, Optional[int]], qk_norm_names: Tuple[str, ...] = ()) -> "SVDNeuronAttention":
        """Take the stock attention's groups, rank, head counts, dtype and q/k norm modules."""
        where = f"{family.layer_prefix}.{layer}.{family.attention}"
        name = f"{class_path(stock)} (the stock attention of {where})"
        missing = [a for a in ("tp_group", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
                   if getattr(stock, a, None) is None]
        if missing:
            raise HookTargetError(f"{name} has no {missing}; the svd_neuron variant reads its sharding from them")
        for attr, what in (("attention_dp_size", "attention data parallelism"), ("dcp_size", "decode context "
                                                                                               "parallelism")):
            if int(getattr(stock, attr, 1) or 1) > 1:
                raise HookTargetError(f"{name} runs with {what} ({attr}={getattr(stock, attr)}), which the svd_neuron "
                                      f"variant's factored attention does not implement; serve without it")
        tp_group = stock.tp_group
        tp, rank = int(tp_group.world_size), int(tp_group.rank_in_group)
        sharding = HeadSharding.checked(int(stock.num_attention_heads), int(stock.num_key_value_heads),
                                        int(stock.head_dim), tp, rank, where)
        norms = []
        for n in qk_norm_names:
            norm = getattr(stock, n, None)
            if norm is None:
                raise HookTargetError(f"{name} has no `{n}`, the q/k norm the svd_neuron variant applies after the "
                                      f"factored projections")
            norms.append((n, norm))
        dtype = getattr(stock, "dtype", None) or next((p.dtype for p in stock.parameters()), torch.bfloat16)
        reduce_group = getattr(stock, "attn_tp_group", None) or tp_group
        return cls(layer=layer, family=family, hidden_size=int(stock.hidden_size), ranks=ranks, sharding=sharding,
                   tp_group=tp_group, reduce_group=reduce_group, dtype=dtype, qk_norms=tuple(norms))

    # ------------------------------------------------------------ structure
    def projections(self) -> Dict[str, FactoredProjection]:
        return {role: getattr(self, self.family.attention_projection(role))
                for role in mlp_families.ATTENTION_ROLES}

    @property
    def compute_path(self) -> Optional[str]:
        return self._path

    def _set_path(self, path: str) -> None:
        self._path = path
        for proj in self.projections().values():
            proj.path = path

    def finalize(self) -> None:
        """After `load_weights`: the fused XUV kernel where it can run on the loaded factors,
        else the aten fallback (logged once). Reads devices and dtypes only."""
        probe = next(p for proj in self.projections().values() for p in proj.parameters())
        self._set_path(compute.choose_path(probe.device, probe, "the svd_neuron attention"))

    def prepare_weightless(self, device) -> None:
        self._set_path(compute.choose_path(torch.device(device or "cpu"), None, "the svd_neuron attention"))

    def path_summary(self) -> str:
        """Per projection, what computes it: the fused XUV kernel ("kernels"), its fallback, or "dense"."""
        return " ".join(f"{role}={proj.runs()}" for role, proj in self.projections().items())

    # ------------------------------------------------------------ compute
    def _qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [T, nh, hd], k and v [T, nkv, hd] of this rank, q/k normed (Qwen3) and rotated."""
        if self._path is None:
            raise SVDNeuronStateError(
                f"{self.family.layer_prefix}.{self.layer_idx}.{self.family.attention}: the svd_neuron attention ran "
                f"before a load entry point (load_weights, or load_weights_lite) prepared it")
        p = self.projections()
        tokens = h.shape[0]
        q = p[mlp_families.Q](h).view(tokens, self.num_attention_heads_per_rank, self.head_dim)
        k = p[mlp_families.K](h).view(tokens, self.num_key_value_heads_per_rank, self.head_dim)
        v = p[mlp_families.V](h).view(tokens, self.num_key_value_heads_per_rank, self.head_dim)
        if self.qk_norm_names:
            q, k = getattr(self, self.qk_norm_names[0])(q), getattr(self, self.qk_norm_names[1])(k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)           # [T, 1, hd]
        return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin), v

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, meta: Mapping) -> None:
        if self.k_cache is None:
            return
        slots, block_size = meta["slot_mapping"], meta["block_size"]
        blocks, offsets = slots // block_size, slots % block_size
        self.k_cache[blocks, :, offsets] = k.to(self.k_cache.dtype)     # [T, nkv, hd] at (block, :, offset)
        self.v_cache[blocks, :, offsets] = v.to(self.v_cache.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v in fp32 over [.., heads, queries, keys]; KV heads repeated for GQA."""
        k = k.repeat_interleave(self.num_key_value_groups, dim=-3)
        v = v.repeat_interleave(self.num_key_value_groups, dim=-3)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)

    def forward_prefill(self, h: torch.Tensor, position_embeddings, meta: Mapping) -> torch.Tensor:
        q, k, v = self._qkv(h.to(self.dtype), *position_embeddings)
        self._write_cache(k, v, meta)
        tokens = h.shape[0]
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=h.device).tril()
        out = self._attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal)   # [nh, T, hd]
        out = self.projections()[mlp_families.O](out.transpose(0, 1).reshape(tokens, -1))
        if self.world_size > 1:
            out = self.tp_group.reduce_scatter(out, dim=0)
        return out

    def forward_decode(self, h: torch.Tensor, positions: torch.Tensor, position_embeddings,
                       meta: Mapping) -> torch.Tensor:
        q, k, v = self._qkv(h.to(self.dtype), *position_embeddings)
        self._write_cache(k, v, meta)
        table = meta["block_table_tensor"]                         # [B, blocks per sequence]
        batch, tokens = table.shape[0], h.shape[0]
        per_seq = tokens // batch
        keys = self.k_cache[table].permute(0, 2, 1, 3, 4).flatten(2, 3)     # [B, nkv, context, hd]
        values = self.v_cache[table].permute(0, 2, 1, 3, 4).flatten(2, 3)
        q = q.view(batch, per_seq, -1, self.head_dim).transpose(1, 2)       # [B, nh, S, hd]
        context = torch.arange(keys.shape[2], device=h.device)
        mask = context.view(1, 1, 1, -1) <= positions.view(batch, 1, per_seq, 1)
        out = self._attend(q, keys, values, mask)                           # [B, nh, S, hd]
        out = self.projections()[mlp_families.O](out.transpose(1, 2).reshape(tokens, -1))
        if self.world_size > 1:
            out = _all_reduce(self.reduce_group, out)
        return out

    def forward(self, hidden_states: torch.Tensor, positions: Optional[torch.Tensor] = None,
                position_embeddings=None, attn_metadata=None, **kwargs) -> torch.Tensor:
        if attn_metadata is None:
            return torch.zeros_like(hidden_states)
        meta = attn_metadata[f"layers.{self.layer_idx}.self_attn"]
        if meta["max_query_len"] <= meta["decode_token_threshold"]:
            return self.forward_decode(hidden_states, positions, position_embeddings, meta)
        if self.world_size > 1:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        return self.forward_prefill(hidden_states, position_embeddings, meta)

    def extra_repr(self) -> str:
        ranks = {role: proj.rank for role, proj in self.projections().items()}
        s = self.sharding
        return (f"layer={self.layer_idx}, ranks={ranks}, tp={s.rank}/{s.tp}, heads/rank={s.heads_per_rank}, "
                f"kv heads/rank={s.kv_heads_per_rank} (replicas {s.kv_replicas})")
