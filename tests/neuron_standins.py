"""Smallest stand-ins for the vllm-neuron pieces our Trainium variant talks to.

vllm-neuron cannot be installed here (the Neuron SDK is not on PyPI), so the tests that
use these are UNIT tests of our logic against the upstream classes, not integration
tests. Each stand-in names the upstream file it mirrors and carries exactly the
attributes that class sets (no convenience extras: a stand-in with attributes the real
class lacks would hide a variant that reads them). Sources, vllm-neuron's native line
(docs/trainium.md lists them with their commits):

* Llama: vllm_neuron/model/llama3/model.py at tag v0.21.0.1.0.0 (commit ae6c10e), read in
  Infinity-AI-Institute/vllm-neuron;
* Qwen3: vllm_neuron/model/qwen3/model.py (jinhuang12/vllm-neuron ed3580d, the same in
  vllm-project/vllm-neuron 9d83b11), its factory (qwen3/factory.py, ed3580d) and
  vllm_neuron/model/qwen3/model_bf16.py (vllm-project/vllm-neuron 04c112d);
* the checkpoint reader and loaders: vllm_neuron/utils/checkpoints.py and
  vllm_neuron/utils/weight_loader.py.

The stock attention and MLPs compute (their torch equivalents of the fused kernels) and
shard exactly as upstream's do, so a whole model can be served on them: `RankWorld` plays
the tensor-parallel ranks as threads of one process, with distinct `tp_group`,
`mlp_tp_group` and `attn_tp_group` objects whose collectives really combine the ranks'
tensors; the reader moves each tensor to the device it is given and casts it to its
parameter's dtype; configs are `PretrainedConfig`s, as vLLM hands them over.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, List, Optional

import torch
from safetensors import safe_open
from transformers import PretrainedConfig


class FakeGroup:
    """vLLM's GroupCoordinator as the stock models use it: `world_size`, `rank_in_group`
    (the rank inside this group) and `rank` (the GLOBAL rank, which differs from
    `rank_in_group` as soon as data parallelism puts groups side by side: pass
    `global_rank` to make a test catch code that reads the wrong one), and the
    collectives `all_gather(t, dim=0)`, `reduce_scatter(t, dim=0)`, `all_reduce(t)`.
    One process plays one rank: the test supplies what the gather returns and sums the
    recorded partials itself, as the real collective would."""

    def __init__(self, world_size: int, rank: int, gathered: Optional[torch.Tensor] = None,
                 global_rank: Optional[int] = None):
        self.world_size, self.rank_in_group, self.gathered = world_size, rank, gathered
        self.rank = rank if global_rank is None else global_rank
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


# ---------------------------------------------------------------- utils/weight_loader.py
class WeightLoader:
    """`SafetensorsWeightLoader(transform)`: `load(slices, rank)`, identity without a transform."""

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform

    def load(self, slices, rank: int) -> torch.Tensor:
        if self.transform is None:
            assert len(slices) == 1
            return slices[0][:].contiguous()
        return self.transform(slices, rank).contiguous()


def sharding_weight_loader(shard_dim: int, shard_size: int, num_shards: int,
                           is_storage_transposed: bool = False) -> WeightLoader:
    """`sharding_weight_loader`: the rank passed to `load` picks the shard
    (`(rank % num_shards) * shard_size`), on the checkpoint's dim (1 - shard_dim when stored transposed)."""
    def transform(slices, rank):
        src = slices[0]
        dim = 1 - shard_dim if is_storage_transposed else shard_dim
        index = [slice(None)] * len(src.get_shape())
        start = (rank % num_shards) * shard_size
        index[dim] = slice(start, start + shard_size)
        part = src[tuple(index)]
        return part.T if is_storage_transposed else part
    return WeightLoader(transform)


def with_rank_override(loader: WeightLoader, rank: int) -> WeightLoader:
    """`with_rank_override`: ignore the rank the reader passes, use `rank`."""
    return WeightLoader(lambda slices, _: loader.load(slices, rank))


# ---------------------------------------------------------------- utils/checkpoints.py
def read_checkpoint_like_vllm_neuron(model: torch.nn.Module, checkpoint_dir: str, mappings: Dict,
                                     rank: int = 0, device=None) -> Dict[str, torch.Tensor]:
    """`SafetensorsCheckpoint.load_sharded` (strict): for every PARAMETER (buffers are
    skipped), checkpoint key(s) = mappings.get(name, name); the parameter's
    `weight_loader` (default: the tensor whole) gets one lazy slice per key and the
    model's tensor-parallel `rank`; a missing key raises. The loaded tensor goes to `device`
    (`load_sharded_pipelined(tp_rank, tp_size, model, mappings, device)`), then is cast to
    its parameter's dtype (llama3/model.py `_cast_to_model_dtype`, gated on the destination
    parameter's dtype), then `load_state_dict(..., strict=False, assign=True)` as the stock
    `load_weights` does."""
    files = [os.path.join(checkpoint_dir, f) for f in sorted(os.listdir(checkpoint_dir)) if f.endswith(".safetensors")]
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    state = {}
    for name, param in model.named_parameters():
        keys = mappings.get(name, name)
        keys = keys if isinstance(keys, list) else [keys]
        missing = [k for k in keys if k not in where]
        if missing:
            raise RuntimeError(f"Checkpoint key(s) not found for parameter '{name}': {missing}. "
                               f"Use strict=False to skip missing keys.")
        slices = [where[k].get_slice(k) for k in keys]
        loader = getattr(param, "weight_loader", None) or WeightLoader()
        tensor = loader.load(slices, rank)
        tensor = tensor if device is None else tensor.to(device)
        state[name] = tensor if tensor.dtype == param.dtype else tensor.to(param.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    return state


def _param(*shape, dtype=torch.float32, loader: Optional[WeightLoader] = None) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(*shape, dtype=dtype))
    if loader is not None:
        p.weight_loader = loader           # set_weight_loader
    return p


# ---------------------------------------------------------------- vLLM's GroupCoordinator, ranks simulated
_CURRENT = threading.local()      # the rank a thread of RankWorld.run plays


class _Exchange:
    """One group's rendezvous: every rank puts its tensor in, all read all of them."""

    def __init__(self, size: int, timeout: float):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)

    def swap(self, rank: int, t: torch.Tensor) -> List[torch.Tensor]:
        self.slots[rank] = t
        self.barrier.wait()
        out = [s.clone() for s in self.slots]   # copies: an in-place all_reduce may write its input next
        self.barrier.wait()
        return out


class SimGroup:
    """vLLM's GroupCoordinator as vllm-neuron's models use it, one rank of a group whose
    ranks are threads of this process (RankWorld): `world_size`, `rank_in_group`, `rank`
    (global), and collectives that really combine the ranks' tensors:
    `all_gather(t, dim=0)` (concatenated in rank order), `reduce_scatter(t, dim=0)` (the
    sum, this rank's chunk), `all_reduce(t)` (the sum, written in place and returning None,
    as vllm-neuron's model code uses it)."""

    def __init__(self, exchange: _Exchange, rank: int, kind: str):
        self.world_size, self.rank_in_group, self.rank, self.kind = exchange.size, rank, rank, kind
        self._exchange = exchange

    def _all(self, t: torch.Tensor) -> List[torch.Tensor]:
        return self._exchange.swap(self.rank_in_group, t)

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat(self._all(t), dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        total = sum(self._all(t))
        return total.chunk(self.world_size, dim=dim)[self.rank_in_group].contiguous()

    def all_reduce(self, t: torch.Tensor) -> None:
        t.copy_(sum(self._all(t)))

    def __repr__(self):
        return f"SimGroup({self.kind}, rank {self.rank_in_group} of {self.world_size})"


class RankWorld:
    """`tp` tensor-parallel ranks played by threads of one process. Each kind of group
    vllm-neuron's parallel state hands out ("tp", "mlp_tp" = TP x mlp_dp_size, "attn_tp" =
    TP x attention_dp_size; all of size tp here) is a distinct object per rank with its
    own rendezvous, as upstream's are distinct GroupCoordinators. `run(fn)` calls fn(rank)
    on every rank at once; inside it, `current_group(kind)` is this rank's group."""

    def __init__(self, tp: int, timeout: float = 120.0):
        self.tp, self.timeout = tp, timeout
        self._exchanges: Dict[str, _Exchange] = {}
        self._groups: Dict[tuple, SimGroup] = {}
        self._lock = threading.Lock()

    def group(self, kind: str, rank: int) -> SimGroup:
        with self._lock:
            exchange = self._exchanges.setdefault(kind, _Exchange(self.tp, self.timeout))
            return self._groups.setdefault((kind, rank), SimGroup(exchange, rank, kind))

    def run(self, fn: Callable[[int], object]) -> List[object]:
        results, errors = [None] * self.tp, []

        def play(rank):
            _CURRENT.world, _CURRENT.rank = self, rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:   # noqa: B902  (re-raised below, in the caller)
                errors.append(e)
                for exchange in self._exchanges.values():
                    exchange.barrier.abort()
        threads = [threading.Thread(target=play, args=(r,)) for r in range(self.tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def current_group(kind: str = "tp") -> SimGroup:
    """This thread's rank's group of `kind` inside RankWorld.run, else a group of one."""
    world = getattr(_CURRENT, "world", None)
    if world is None:
        return RankWorld(1).group(kind, 0)
    return world.group(kind, _CURRENT.rank)


def _collective_group(model_group, kind: str):
    """The group of `kind` for a model whose TP group is `model_group`: the simulated rank's
    own group of that kind, or (a FakeGroup playing one rank) the TP group itself."""
    return current_group(kind) if isinstance(model_group, SimGroup) else model_group


def _all_reduce(group, t: torch.Tensor) -> torch.Tensor:
    out = group.all_reduce(t)
    return t if out is None else out


# ---------------------------------------------------------------- the stock dense MLPs
def _silu_mlp(h, gate, up, down):
    """functional/mlp.py's torch fallback (`_torch_mlp_impl`, no norm): (silu(h G) * (h U)) D."""
    return (torch.nn.functional.silu(h @ gate) * (h @ up)) @ down


class StandinLlamaMLP(torch.nn.Module):
    """llama3/model.py `LlamaMLP` (ae6c10e): the MLP-TP group is TP x mlp_dp_size; its
    loaders use `with_rank_override(..., rank=self.mlp_tp_rank)`; forward(h, is_prefill):
    prefill all-gathers over tp_group and reduce-scatters, decode all-reduces over
    mlp_tp_group."""

    def __init__(self, hidden: int, intermediate: int, tp_group, mlp_tp_group, mlp_dp_group, dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        self.world_size = tp_group.world_size
        self.rank = tp_group.rank_in_group
        self.mlp_dp_size = mlp_dp_group.world_size
        self.mlp_tp_group = mlp_tp_group
        self.mlp_tp_size = mlp_tp_group.world_size
        self.mlp_tp_rank = mlp_tp_group.rank_in_group
        self.mlp_dp_group = mlp_dp_group
        self.hidden_size = hidden
        self.intermediate_size_per_rank = intermediate // self.mlp_tp_size
        i = self.intermediate_size_per_rank
        gate_up = with_rank_override(sharding_weight_loader(1, i, self.mlp_tp_size, True), self.mlp_tp_rank)
        down = with_rank_override(sharding_weight_loader(0, i, self.mlp_tp_size, True), self.mlp_tp_rank)
        self.gate_proj_weight = _param(hidden, i, dtype=dtype, loader=gate_up)
        self.up_proj_weight = _param(hidden, i, dtype=dtype, loader=gate_up)
        self.down_proj_weight = _param(i, hidden, dtype=dtype, loader=down)

    def forward(self, hidden_states: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        if is_prefill and self.world_size > 1:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        out = _silu_mlp(hidden_states, self.gate_proj_weight, self.up_proj_weight, self.down_proj_weight)
        if is_prefill:
            return self.tp_group.reduce_scatter(out, dim=0) if self.world_size > 1 else out
        self.mlp_tp_group.all_reduce(out)
        return out


class StandinQwen3MLP(torch.nn.Module):
    """qwen3/model.py `Qwen3MLP` (and model_bf16.py `Qwen3DenseMLP`, the same attributes):
    only `tp_group`, `world_size`, `hidden_size`, `intermediate_size_per_rank` and the
    three weights; NO rank attribute: its loaders shard by the rank the checkpoint reader
    passes (the model's `tp_group.rank_in_group`). Its collectives run over tp_group."""

    def __init__(self, hidden: int, intermediate: int, tp_group, dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        self.world_size = tp_group.world_size
        self.hidden_size = hidden
        self.intermediate_size_per_rank = intermediate // self.world_size
        i = self.intermediate_size_per_rank
        gate_up = sharding_weight_loader(1, i, self.world_size, True)
        self.gate_proj_weight = _param(hidden, i, dtype=dtype, loader=gate_up)
        self.up_proj_weight = _param(hidden, i, dtype=dtype, loader=gate_up)
        self.down_proj_weight = _param(i, hidden, dtype=dtype,
                                       loader=sharding_weight_loader(0, i, self.world_size, True))

    def forward(self, hidden_states: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        if is_prefill and self.world_size > 1:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        out = _silu_mlp(hidden_states, self.gate_proj_weight, self.up_proj_weight, self.down_proj_weight)
        if self.world_size > 1:
            out = self.tp_group.reduce_scatter(out, dim=0) if is_prefill else _all_reduce(self.tp_group, out)
        return out


class StandinQwen3Bf16MLP(torch.nn.Module):
    """model_bf16.py `Qwen3MLP`: a wrapper, `is_moe` and either `experts` (MoE) or
    `dense_mlp` (a `Qwen3DenseMLP`); called as `mlp(hidden_states, positions, is_decode, rank)`."""

    def __init__(self, hidden: int, intermediate: int, tp_group, is_moe: bool = False, dtype=torch.float32):
        super().__init__()
        self.is_moe = is_moe
        if is_moe:
            self.experts = torch.nn.Module()
        else:
            self.dense_mlp = StandinQwen3MLP(hidden, intermediate, tp_group, dtype)

    def forward(self, hidden_states, positions=None, is_decode=False, rank=None):
        return self.dense_mlp(hidden_states, is_prefill=not is_decode)


# ---------------------------------------------------------------- the stock attention
def fused_qkv_weight_loader(num_shards: int, num_kv_replicas: int) -> WeightLoader:
    """utils/weight_loader.py `fused_qkv_weight_loader` (`qkv_shard_offsets`): from the
    checkpoint's q, k, v ([out, in]) the rank's q rows (`rank * q_total/num_shards`) and KV
    rows (group `rank // num_kv_replicas` of `num_shards // num_kv_replicas`), fused and
    stored transposed [in, q + 2 kv]."""
    def transform(slices, rank):
        q, k, v = slices
        local = rank % num_shards
        q_rows = q.get_shape()[0] // num_shards
        kv_rows = k.get_shape()[0] // (num_shards // num_kv_replicas)
        kv0 = (local // num_kv_replicas) * kv_rows
        return torch.cat([q[local * q_rows:(local + 1) * q_rows], k[kv0:kv0 + kv_rows], v[kv0:kv0 + kv_rows]]).T
    return WeightLoader(transform)


def _rope(x, cos, sin):
    """rotate_half RoPE (llama3/model.py and qwen3/model.py `_apply_rotary_emb`)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class StandinAttention(torch.nn.Module):
    """llama3/model.py `LlamaAttention` (ae6c10e) and qwen3/model.py `Qwen3Attention`
    (ed3580d), attention_dp_size 1 and no DCP: heads over the TP ranks, one KV head per rank
    replicated `world_size // num_key_value_heads` times once TP reaches the KV-head count;
    `qkv_proj_weight` [H, q + 2 kv] and `o_proj_weight` [heads hd / tp, H]; Qwen3's per-head
    `q_norm` / `k_norm` before RoPE. forward(h, positions, position_embeddings, attn_metadata):
    prefill all-gathers, attends causally over the step's tokens and reduce-scatters; decode
    attends over the paged cache and all-reduces over `attn_tp_group` (Llama) / `tp_group`
    (Qwen3). The fused kernels' torch equivalents, in fp32 softmax."""

    def __init__(self, cfg, layer_idx: int, tp_group, attn_tp_group=None, qk_norm=(), o_rank_override=True,
                 dtype=torch.float32):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size, self.dtype = cfg.hidden_size, dtype
        self.num_attention_heads, self.num_key_value_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.tp_group, self.world_size, self.rank = tp_group, tp_group.world_size, tp_group.rank_in_group
        if attn_tp_group is not None:
            self.attn_tp_group = attn_tp_group
        self.num_attention_heads_per_rank = self.num_attention_heads // self.world_size
        if self.world_size >= self.num_key_value_heads:
            self.num_key_value_heads_per_rank = 1
            self.num_kv_replicas = self.world_size // self.num_key_value_heads
        else:
            self.num_key_value_heads_per_rank = self.num_key_value_heads // self.world_size
            self.num_kv_replicas = 1
        self.num_key_value_groups = self.num_attention_heads_per_rank // self.num_key_value_heads_per_rank
        self.q_size = self.num_attention_heads_per_rank * self.head_dim
        self.kv_size = self.num_key_value_heads_per_rank * self.head_dim
        self.qkv_split_indices = [self.q_size, self.q_size + self.kv_size]
        o_in = self.num_attention_heads * self.head_dim // self.world_size
        o_loader = sharding_weight_loader(0, o_in, self.world_size, True)
        self.qkv_proj_weight = _param(self.hidden_size, self.q_size + 2 * self.kv_size, dtype=dtype,
                                      loader=fused_qkv_weight_loader(self.world_size, self.num_kv_replicas))
        self.o_proj_weight = _param(o_in, self.hidden_size, dtype=dtype,
                                    loader=with_rank_override(o_loader, self.rank) if o_rank_override else o_loader)
        self.qk_norm = tuple(qk_norm)
        for name in self.qk_norm:
            self.add_module(name, StandinRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype))
        self.k_cache = self.v_cache = None

    def forward(self, hidden_states, positions, position_embeddings, attn_metadata=None):
        meta = attn_metadata[f"layers.{self.layer_idx}.self_attn"]
        decode = meta["max_query_len"] <= meta["decode_token_threshold"]
        if not decode and self.world_size > 1:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        tokens = hidden_states.shape[0]
        q, k, v = torch.tensor_split(hidden_states @ self.qkv_proj_weight, self.qkv_split_indices, dim=-1)
        q = q.view(tokens, -1, self.head_dim)
        k = k.view(tokens, -1, self.head_dim)
        v = v.view(tokens, -1, self.head_dim)
        if self.qk_norm:
            q, k = getattr(self, self.qk_norm[0])(q), getattr(self, self.qk_norm[1])(k)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        slots, bs = meta["slot_mapping"], meta["block_size"]
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):      # [blocks, kv heads, block, hd]
            for t in range(tokens):
                cache[int(slots[t]) // bs, :, int(slots[t]) % bs] = new[t]
        out = torch.empty(tokens, self.num_attention_heads_per_rank, self.head_dim, dtype=q.dtype,
                          device=q.device)
        table = meta["block_table_tensor"]
        per_seq = tokens // table.shape[0]
        for t in range(tokens):
            if decode:   # this token's sequence, its context up to its position, from the cache
                blocks = table[t // per_seq]
                n = int(positions[t]) + 1
                keys = torch.cat([self.k_cache[int(b)] for b in blocks], dim=1)[:, :n]     # [kv, n, hd]
                values = torch.cat([self.v_cache[int(b)] for b in blocks], dim=1)[:, :n]
            else:        # the step's tokens up to this one (one sequence, the stock full prefill)
                keys, values = k[:t + 1].transpose(0, 1), v[:t + 1].transpose(0, 1)
            keys = keys.repeat_interleave(self.num_key_value_groups, dim=0)
            values = values.repeat_interleave(self.num_key_value_groups, dim=0)
            scores = (keys.float() @ q[t].float().unsqueeze(-1)).squeeze(-1) * self.scaling        # [nh, n]
            out[t] = (torch.softmax(scores, dim=-1).unsqueeze(1) @ values.float()).squeeze(1).to(q.dtype)
        out = out.reshape(tokens, -1) @ self.o_proj_weight
        if not decode:
            return self.tp_group.reduce_scatter(out, dim=0) if self.world_size > 1 else out
        if self.world_size > 1:
            out = _all_reduce(getattr(self, "attn_tp_group", self.tp_group), out)
        return out


# ---------------------------------------------------------------- the stock model classes
def _holder(weight: torch.nn.Parameter) -> torch.nn.Module:
    m = torch.nn.Module()
    m.weight = weight
    return m


class StandinRMSNorm(torch.nn.Module):
    """llama3/model.py `LlamaRMSNorm` / qwen3/model.py `Qwen3RMSNorm`: fp32 variance, weight times."""

    def __init__(self, size: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = _param(size, dtype=dtype)
        self.variance_epsilon = eps

    def forward(self, x):
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))).to(x.dtype)


def _as_config(hf_config):
    """vllm-neuron's models take the HF `PretrainedConfig` vLLM parsed; a plain dict is
    turned into one (what `PretrainedConfig.from_dict` gives for config.json)."""
    if isinstance(hf_config, PretrainedConfig):
        return hf_config
    from transformers import AutoConfig

    d = dict(hf_config)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def config_dtype(cfg) -> torch.dtype:
    """The model dtype (llama3/model.py: `config.torch_dtype`; vLLM's --dtype overrides it)."""
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype.replace("torch.", "")) if isinstance(dtype, str) else dtype


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0) or 10000.0))


class _StandinCausalLM(torch.nn.Module):
    """What the native Llama and Qwen3 `*ForCausalLM` share: `model.layers[i].mlp` and
    `.self_attn`, `tp_group` / `world_size` / `rank` (= `tp_group.rank_in_group`, the rank
    the reader passes to every loader), `from_configs(hf_config, neuron_config)` (a
    `PretrainedConfig`), `load_weights(checkpoint_path, device, cache_dir)`, the KV-cache
    hooks `get_kv_spec` / `bind_kv_cache`, and a forward(input_ids, positions, attn_metadata)
    returning logits: the decoder layers' prefill (sequence parallel: each rank holds its
    chunk of the tokens between the modules) or decode, the final norm, the LM head (whole
    here; the logits all-gathered in prefill). A subclass sets `group_factory` to play one
    rank of a TP group with FakeGroup; inside RankWorld.run the groups are the rank's."""

    group_factory = staticmethod(lambda: current_group("tp"))
    qk_norm = ()            # Qwen3: the per-head QK-norm modules' names
    o_rank_override = True  # llama3's o_proj loader overrides the rank; qwen3's takes the reader's

    def __init__(self, cfg):
        super().__init__()
        cfg = _as_config(cfg)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.config, self.dtype = cfg, config_dtype(cfg)
        dt = self.dtype
        self.tp_group = self.group_factory()
        self.world_size = self.tp_group.world_size
        self.rank = self.tp_group.rank_in_group
        attn_tp = self.attention_group()
        self.model = torch.nn.Module()
        self.model.embed_tokens = _holder(_param(cfg.vocab_size, h, dtype=dt))
        self.model.norm = StandinRMSNorm(h, cfg.rms_norm_eps, dt)
        self.model.layers = torch.nn.ModuleList()
        for n in range(cfg.num_hidden_layers):
            layer = torch.nn.Module()
            layer.input_layernorm = StandinRMSNorm(h, cfg.rms_norm_eps, dt)
            layer.post_attention_layernorm = StandinRMSNorm(h, cfg.rms_norm_eps, dt)
            layer.self_attn = StandinAttention(cfg, n, self.tp_group, attn_tp, self.qk_norm, self.o_rank_override, dt)
            layer.mlp = self.make_mlp(h, i, self.tp_group)
            self.model.layers.append(layer)
        self.lm_head = _holder(_param(cfg.vocab_size, h, dtype=dt))
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.loaded_state: Dict[str, torch.Tensor] = {}
        self.lite_loaded = False

    def attention_group(self):
        return None

    def make_mlp(self, hidden, intermediate, tp_group) -> torch.nn.Module:
        raise NotImplementedError

    def get_kv_spec(self):
        """[(layer name, KV heads of this rank, head_dim, dtype)] (llama3/model.py's LayerSpecs)."""
        return [(f"layers.{i}.self_attn", layer.self_attn.num_key_value_heads_per_rank, layer.self_attn.head_dim,
                 layer.self_attn.dtype) for i, layer in enumerate(self.model.layers)]

    def bind_kv_cache(self, kv_caches):
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv_caches[f"layers.{i}.self_attn"]

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        return cls(hf_config)

    def mappings(self) -> Dict[str, object]:
        mappings: Dict[str, object] = {}
        for i in range(len(self.model.layers)):
            p = f"model.layers.{i}"
            mappings[f"{p}.self_attn.qkv_proj_weight"] = [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]
            mappings[f"{p}.self_attn.o_proj_weight"] = f"{p}.self_attn.o_proj.weight"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                mappings[f"{p}.mlp.{proj}_weight"] = f"{p}.mlp.{proj}.weight"
        if self.tie_word_embeddings:
            mappings["lm_head.weight"] = "model.embed_tokens.weight"
        return mappings

    def load_weights(self, checkpoint_path: str, device=None, cache_dir=None) -> None:
        self.last_mappings = self.mappings()
        self.loaded_state = read_checkpoint_like_vllm_neuron(self, checkpoint_path, self.last_mappings, rank=self.rank,
                                                             device=device)

    # ------------------------------------------------------------ forward
    def rotary(self, positions: torch.Tensor):
        attn = self.model.layers[0].self_attn
        hd = attn.head_dim
        inv_freq = 1.0 / (rope_theta(self.config) ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def call_mlp(self, mlp, h, positions, is_decode):
        return mlp(h, is_prefill=not is_decode)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        meta = attn_metadata["layers.0.self_attn"]
        is_decode = meta["max_query_len"] <= meta["decode_token_threshold"]
        h = self.model.embed_tokens.weight[input_ids]
        position_embeddings = tuple(t.to(self.dtype) for t in self.rotary(positions))
        if not is_decode and self.world_size > 1:
            h = h.chunk(self.world_size)[self.rank]
        for layer in self.model.layers:
            residual = h
            h = residual + layer.self_attn(layer.input_layernorm(h), positions, position_embeddings, attn_metadata)
            residual = h
            h = residual + self.call_mlp(layer.mlp, layer.post_attention_layernorm(h), positions, is_decode)
        logits = self.model.norm(h) @ self.lm_head.weight.T
        if not is_decode and self.world_size > 1:
            logits = self.tp_group.all_gather(logits, dim=0)
        return logits


def _load_weights_lite(self, checkpoint_path: str, device=None, cache_dir=None) -> None:
    """`load_weights_lite` of the Llama and Qwen3 (model.py) classes: KV-cache scales only
    (none in these checkpoints), no weight is read."""
    self.lite_loaded = True


class StandinLlamaForCausalLM(_StandinCausalLM):
    """llama3/model.py `LlamaForCausalLM` (ae6c10e); its config code rejects an unknown
    `quant_method` (llama3/quantization.py `QuantizationSpec.from_hf_quantization_config`).
    Its attention all-reduces decode over `attn_tp_group`, its MLP over `mlp_tp_group`
    (distinct groups from `tp_group`)."""

    load_weights_lite = _load_weights_lite

    def attention_group(self):
        return _collective_group(self.tp_group, "attn_tp")

    def make_mlp(self, hidden, intermediate, tp_group):
        single = FakeGroup(1, 0)       # mlp_dp_size 1: the MLP-TP group is TP wide
        return StandinLlamaMLP(hidden, intermediate, tp_group, _collective_group(tp_group, "mlp_tp"), single,
                               self.dtype)

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        cfg = _as_config(hf_config)
        qc = getattr(cfg, "quantization_config", None)
        if qc and str(qc.get("quant_method", "")).lower() not in ("modelopt", "compressed-tensors"):
            raise ValueError(f"Unsupported quantization_config.quant_method={qc.get('quant_method')!r}. "
                             "Llama3 currently supports: 'modelopt', 'compressed-tensors'.")
        return cls(cfg)


class StandinQwen3ForCausalLM(_StandinCausalLM):
    """qwen3/model.py `Qwen3ForCausalLM`: per-head QK-norms; its config code
    (qwen3/config.py `Qwen3Config.from_configs`) keeps known fields and silently drops
    `quantization_config`."""

    qk_norm = ("q_norm", "k_norm")
    o_rank_override = False
    load_weights_lite = _load_weights_lite

    def make_mlp(self, hidden, intermediate, tp_group):
        return StandinQwen3MLP(hidden, intermediate, tp_group, self.dtype)

    def mappings(self):
        mappings = super().mappings()
        for i in range(len(self.model.layers)):
            for n in self.qk_norm:
                mappings[f"model.layers.{i}.self_attn.{n}.weight"] = f"model.layers.{i}.self_attn.{n}.weight"
        return mappings


class StandinQwen3Bf16ForCausalLM(_StandinCausalLM):
    """qwen3/model_bf16.py `Qwen3ForCausalLM` ("for vLLM-Neuron 0.21.0"): `q_layernorm` /
    `k_layernorm` (mapped from the checkpoint's q_norm / k_norm), `layers[i].mlp` a
    wrapper with `dense_mlp`, whose weights it maps as `mlp.dense_mlp.*_proj_weight`; no
    `load_weights_lite`."""

    qk_norm = ("q_layernorm", "k_layernorm")
    o_rank_override = False

    def make_mlp(self, hidden, intermediate, tp_group):
        return StandinQwen3Bf16MLP(hidden, intermediate, tp_group, dtype=self.dtype)

    def call_mlp(self, mlp, h, positions, is_decode):
        return mlp(h, positions, is_decode, self.rank)

    def mappings(self):
        mappings: Dict[str, object] = {}
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}"
            mappings[f"{p}.self_attn.qkv_proj_weight"] = [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]
            mappings[f"{p}.self_attn.o_proj_weight"] = f"{p}.self_attn.o_proj.weight"
            mappings[f"{p}.self_attn.q_layernorm.weight"] = f"{p}.self_attn.q_norm.weight"
            mappings[f"{p}.self_attn.k_layernorm.weight"] = f"{p}.self_attn.k_norm.weight"
            if not layer.mlp.is_moe:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    mappings[f"{p}.mlp.dense_mlp.{proj}_weight"] = f"{p}.mlp.{proj}.weight"
        if self.tie_word_embeddings:
            mappings["lm_head.weight"] = "model.embed_tokens.weight"
        return mappings


class StandinQwen3Factory(torch.nn.Module):
    """qwen3/factory.py `Qwen3ForCausalLM` (ed3580d): what `vllm_neuron.model.qwen3`
    exports there. `from_configs` validates and returns an instance of the implementation
    class (qwen3/model.py's); the factory itself has no load entry point."""

    implementation = StandinQwen3ForCausalLM

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        return cls.implementation.from_configs(hf_config, neuron_config)


def read_config(path: str) -> PretrainedConfig:
    """config.json as vLLM hands it to vllm-neuron: a transformers `PretrainedConfig`."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


# ---------------------------------------------------------------- serving a model on the stand-ins
def attention_metadata(num_layers: int, slots: torch.Tensor, block_table: torch.Tensor, max_query_len: int,
                       block_size: int, decode_token_threshold: int = 1) -> Dict[str, dict]:
    """The per-layer `attn_metadata` entries the stock attention reads."""
    entry = {"max_query_len": max_query_len, "decode_token_threshold": decode_token_threshold,
             "slot_mapping": slots, "block_size": block_size, "block_table_tensor": block_table,
             "max_blocks_per_seq": block_table.shape[1]}
    return {f"layers.{i}.self_attn": entry for i in range(num_layers)}


def greedy_serve(model: torch.nn.Module, prompt: List[int], steps: int, block_size: int = 16) -> dict:
    """One sequence through the model runner's steps: a prefill of `prompt` (its length a
    multiple of the TP degree: sequence parallel), then `steps` decode steps of one token
    each, the greedy token fed back. Caches from `get_kv_spec`, bound with `bind_kv_cache`.
    Returns {"prefill_logits": [T, V], "decode_logits": [steps, V], "tokens": [...]}."""
    total = len(prompt) + steps
    blocks = -(-total // block_size)
    caches = {name: [torch.zeros(blocks, heads, block_size, hd, dtype=dtype) for _ in range(2)]
              for name, heads, hd, dtype in model.get_kv_spec()}
    model.bind_kv_cache(caches)
    table = torch.arange(blocks).view(1, blocks)
    n_layers = len(model.model.layers)
    ids = torch.tensor(prompt)
    positions = torch.arange(len(prompt))
    with torch.no_grad():
        logits = model(ids, positions, attention_metadata(n_layers, positions, table, len(prompt), block_size))
        prefill, decoded, tokens = logits, [], [int(logits[-1].argmax())]
        for step in range(steps):
            pos = torch.tensor([len(prompt) + step])
            out = model(torch.tensor(tokens[-1:]), pos, attention_metadata(n_layers, pos, table, 1, block_size))
            decoded.append(out[0])
            tokens.append(int(out[0].argmax()))
    return {"prefill_logits": prefill, "decode_logits": torch.stack(decoded) if decoded else None,
            "tokens": tokens}


# ---------------------------------------------------------------- TorchNeuron runtimes (kernel launch)
# The two places vllm-neuron's native line and TorchNeuron keep `wrap_nki`:
#   libtorch_neuronx_lite/nki/nki_hop.py  `wrap_nki` only (what vllm_neuron/functional/mlp.py and
#                                         functional/attention/qkv.py import; no public `nki_op`)
#   torch_neuronx/nki_hop.py              `wrap_nki` and `nki_op`; `torch_neuronx/utils.py` has
#                                         `get_logical_neuron_cores`
# `wrap_nki(kernel)` returns an object indexed by the launch grid, `wrapped[grid](**kwargs)`
# (functional/mlp.py: `wrapped_mlp[2](hidden_tensor=..., ...)`). Here the launch runs the kernel on
# the project's emulator through one torch op of this stand-in (`neuron_standin::nki_launch`), so
# a traced graph holds the launch as one node, as it holds the real higher-order op.
_LAUNCH_KERNELS: Dict[str, object] = {}


def _output_shape(name: str, tensors):
    if name == "up_gate":                  # [I, S]: h^T
        return (tensors[2].shape[1], tensors[0].shape[0])
    if name == "down":                     # [S, H] from h^T [I, S]
        return (tensors[0].shape[1], tensors[2].shape[1])
    return (tensors[0].shape[0], tensors[2].shape[1])   # fused_xuv: [S, N]


@torch.library.custom_op("neuron_standin::nki_launch", mutates_args=())
def _nki_launch(name: str, grid: int, tensors: List[torch.Tensor]) -> torch.Tensor:
    import numpy as np
    from vllm_neuronmlp import ops
    from vllm_neuronmlp.kernels import sim

    out, _ = sim.run(_LAUNCH_KERNELS[name], *[ops._to_numpy(t) for t in tensors])
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(tensors[0].dtype)


@_nki_launch.register_fake
def _nki_launch_fake(name, grid, tensors):
    return tensors[0].new_empty(_output_shape(name, tensors))


class StandinRuntime:
    """What one stand-in runtime saw: `wrapped` (kernel names passed to wrap_nki), `launches`
    ((kernel name, grid) per call), `registered` (names given to nki_op, if it has one)."""

    def __init__(self, module: str):
        self.module = module
        self.wrapped: List[str] = []
        self.launches: List[tuple] = []
        self.registered: List[str] = []

    def wrap_nki(self, kernel):
        name = kernel.__name__
        _LAUNCH_KERNELS[name] = kernel
        self.wrapped.append(name)
        runtime = self

        class Wrapped:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    runtime.launches.append((name, grid))
                    tensors = list(args) + list(kwargs.values())
                    return torch.ops.neuron_standin.nki_launch(name, int(grid[0] if isinstance(grid, tuple)
                                                                         else grid), tensors)
                return launch
        return Wrapped()

    def nki_op(self, name, mutates_args):
        def register(fn):
            self.registered.append(name)
            return fn
        return register


def install_runtimes(monkeypatch, *layouts: str, logical_cores: int = 2) -> Dict[str, StandinRuntime]:
    """Put stand-ins of the named runtimes ("lite", "torch_neuronx") into sys.modules, with
    their real module layout, and make the absent ones unimportable. Returns them by name."""
    import sys
    import types

    installed: Dict[str, StandinRuntime] = {}
    names = ("libtorch_neuronx_lite", "libtorch_neuronx_lite.nki", "libtorch_neuronx_lite.nki.nki_hop",
             "torch_neuronx", "torch_neuronx.nki_hop", "torch_neuronx.utils")
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)          # None in sys.modules: `import` raises ImportError
    if "lite" in layouts:
        rt = installed["lite"] = StandinRuntime("libtorch_neuronx_lite.nki.nki_hop")
        pkg, nki_pkg, hop = (types.ModuleType(n) for n in names[:3])
        hop.wrap_nki = rt.wrap_nki
        pkg.nki, nki_pkg.nki_hop = nki_pkg, hop
        for n, m in zip(names[:3], (pkg, nki_pkg, hop)):
            monkeypatch.setitem(sys.modules, n, m)
    if "torch_neuronx" in layouts:
        rt = installed["torch_neuronx"] = StandinRuntime("torch_neuronx.nki_hop")
        pkg, hop, utils = (types.ModuleType(n) for n in names[3:])
        hop.wrap_nki, hop.nki_op = rt.wrap_nki, rt.nki_op
        pkg.wrap_nki, pkg.nki_op = rt.wrap_nki, rt.nki_op
        utils.get_logical_neuron_cores = lambda: logical_cores
        pkg.nki_hop, pkg.utils = hop, utils
        for n, m in zip(names[3:], (pkg, hop, utils)):
            monkeypatch.setitem(sys.modules, n, m)
    return installed


def pretend_neuron_host(monkeypatch) -> None:
    """Make this CPU look like a Neuron host to kernels/launch.py and ops.py: the SDK's `nki`
    importable (our kernels' `nki_kernel` is the kernel itself, run on the emulator by the
    stand-in runtime) and CPU tensors counted as on the Neuron device. Which TorchNeuron
    runtime is installed is up to `install_runtimes`."""
    from vllm_neuronmlp import ops
    from vllm_neuronmlp.kernels import blocking, launch, nki_compat

    monkeypatch.setattr(nki_compat, "REAL_NKI", True)
    for kernel in (blocking.up_gate, blocking.down, blocking.fused_xuv):
        monkeypatch.setattr(kernel, "nki_kernel", kernel, raising=False)
    device_types = tuple(launch.NEURON_DEVICE_TYPES) + ("cpu",)
    monkeypatch.setattr(launch, "NEURON_DEVICE_TYPES", device_types)
    monkeypatch.setattr(ops, "NEURON_DEVICE_TYPES", device_types)
    for name in ("_device_ops", "_runtime", "_device"):        # what this process resolved before
        monkeypatch.setattr(launch, name, None, raising=False)
