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

Attention is kept whole on every rank (the tests look at MLPs only).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import torch
from safetensors import safe_open


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


def _fused_whole(slices, rank):          # fused q/k/v (or any) tensors, kept whole, stored [in, out]
    return torch.cat([s[:] for s in slices], dim=0).T


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


# ---------------------------------------------------------------- the stock dense MLPs
class StandinLlamaMLP(torch.nn.Module):
    """llama3/model.py `LlamaMLP` (ae6c10e): the MLP-TP group is TP x mlp_dp_size; its
    loaders use `with_rank_override(..., rank=self.mlp_tp_rank)`."""

    def __init__(self, hidden: int, intermediate: int, tp_group: FakeGroup, mlp_tp_group: FakeGroup,
                 mlp_dp_group: FakeGroup, dtype=torch.float32):
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


class StandinQwen3MLP(torch.nn.Module):
    """qwen3/model.py `Qwen3MLP` (and model_bf16.py `Qwen3DenseMLP`, the same attributes):
    only `tp_group`, `world_size`, `hidden_size`, `intermediate_size_per_rank` and the
    three weights; NO rank attribute: its loaders shard by the rank the checkpoint reader
    passes (the model's `tp_group.rank_in_group`)."""

    def __init__(self, hidden: int, intermediate: int, tp_group: FakeGroup, dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        self.world_size = tp_group.world_size
        self.hidden_size = hidden
        self.intermediate_size_per_rank = intermediate // self.world_size
        i = self.intermediate_size_per_rank
        gate_up = sharding_weight_loader(1, i, self.world_size, True)
        self.gate_proj_weight = _param(hidden, i, dtype=dtype, loader=gate_up)
        self.up_proj_weight = _param(hidden, i, dtype=dtype, loader=gate_up)
        self.down_proj_weight = _param(i, hidden, dtype=dtype, loader=sharding_weight_loader(0, i, self.world_size, True))


class StandinQwen3Bf16MLP(torch.nn.Module):
    """model_bf16.py `Qwen3MLP`: a wrapper, `is_moe` and either `experts` (MoE) or
    `dense_mlp` (a `Qwen3DenseMLP`); called as `mlp(hidden_states, positions, is_decode, rank)`."""

    def __init__(self, hidden: int, intermediate: int, tp_group: FakeGroup, is_moe: bool = False):
        super().__init__()
        self.is_moe = is_moe
        if is_moe:
            self.experts = torch.nn.Module()
        else:
            self.dense_mlp = StandinQwen3MLP(hidden, intermediate, tp_group)


# ---------------------------------------------------------------- the stock model classes
def _holder(weight: torch.nn.Parameter) -> torch.nn.Module:
    m = torch.nn.Module()
    m.weight = weight
    return m


def _norm(size: int) -> torch.nn.Module:
    return _holder(_param(size))


class _StandinCausalLM(torch.nn.Module):
    """What the native Llama and Qwen3 `*ForCausalLM` share: `model.layers[i].mlp`,
    `tp_group` / `world_size` / `rank` (= `tp_group.rank_in_group`, the rank the reader
    passes to every loader), `from_configs(hf_config, neuron_config)`,
    `load_weights(checkpoint_path, device, cache_dir)` and the KV-cache hooks
    `get_kv_spec` / `bind_kv_cache` of the model interface. A subclass sets
    `group_factory` to play one rank of a TP group."""

    group_factory = staticmethod(lambda: FakeGroup(1, 0))
    qk_norm = None          # Qwen3: the per-head QK-norm modules' names

    def __init__(self, cfg: dict):
        super().__init__()
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or h // heads
        self.config = cfg
        self.tp_group = self.group_factory()
        self.world_size = self.tp_group.world_size
        self.rank = self.tp_group.rank_in_group
        self.model = torch.nn.Module()
        self.model.embed_tokens = _holder(_param(cfg["vocab_size"], h))
        self.model.norm = _norm(h)
        self.model.layers = torch.nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            layer = torch.nn.Module()
            layer.input_layernorm, layer.post_attention_layernorm = _norm(h), _norm(h)
            layer.self_attn = torch.nn.Module()
            layer.self_attn.qkv_proj_weight = _param(h, (heads + 2 * kv) * hd, loader=WeightLoader(_fused_whole))
            layer.self_attn.o_proj_weight = _param(heads * hd, h, loader=WeightLoader(_fused_whole))
            for name in self.qk_norm or ():
                layer.self_attn.add_module(name, _norm(hd))
            layer.mlp = self.make_mlp(h, i, self.tp_group)
            self.model.layers.append(layer)
        self.lm_head = _holder(_param(cfg["vocab_size"], h))
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", False)
        self.loaded_state: Dict[str, torch.Tensor] = {}
        self.lite_loaded = False

    def make_mlp(self, hidden, intermediate, tp_group) -> torch.nn.Module:
        raise NotImplementedError

    def get_kv_spec(self):               # the model interface's KV-cache hooks (unused by the tests)
        raise NotImplementedError

    def bind_kv_cache(self, kv_caches):
        raise NotImplementedError

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        return cls(hf_config if isinstance(hf_config, dict) else hf_config.to_dict())

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



def _load_weights_lite(self, checkpoint_path: str, device=None, cache_dir=None) -> None:
    """`load_weights_lite` of the Llama and Qwen3 (model.py) classes: KV-cache scales only
    (none in these checkpoints), no weight is read."""
    self.lite_loaded = True


class StandinLlamaForCausalLM(_StandinCausalLM):
    """llama3/model.py `LlamaForCausalLM` (ae6c10e); its config code rejects an unknown
    `quant_method` (llama3/quantization.py `QuantizationSpec.from_hf_quantization_config`)."""

    load_weights_lite = _load_weights_lite

    def make_mlp(self, hidden, intermediate, tp_group):
        single = FakeGroup(1, 0)       # mlp_dp_size 1: the MLP-TP group is the TP group
        return StandinLlamaMLP(hidden, intermediate, tp_group, tp_group, single)

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        qc = cfg.get("quantization_config")
        if qc and str(qc.get("quant_method", "")).lower() not in ("modelopt", "compressed-tensors"):
            raise ValueError(f"Unsupported quantization_config.quant_method={qc.get('quant_method')!r}. "
                             "Llama3 currently supports: 'modelopt', 'compressed-tensors'.")
        return cls(cfg)


class StandinQwen3ForCausalLM(_StandinCausalLM):
    """qwen3/model.py `Qwen3ForCausalLM`: per-head QK-norms; its config code
    (qwen3/config.py `Qwen3Config.from_configs`) keeps known fields and silently drops
    `quantization_config`."""

    qk_norm = ("q_norm", "k_norm")
    load_weights_lite = _load_weights_lite

    def make_mlp(self, hidden, intermediate, tp_group):
        return StandinQwen3MLP(hidden, intermediate, tp_group)

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

    def make_mlp(self, hidden, intermediate, tp_group):
        return StandinQwen3Bf16MLP(hidden, intermediate, tp_group)

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
        return mappings


class StandinQwen3Factory(torch.nn.Module):
    """qwen3/factory.py `Qwen3ForCausalLM` (ed3580d): what `vllm_neuron.model.qwen3`
    exports there. `from_configs` validates and returns an instance of the implementation
    class (qwen3/model.py's); the factory itself has no load entry point."""

    implementation = StandinQwen3ForCausalLM

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None):
        return cls.implementation.from_configs(hf_config, neuron_config)


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


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
