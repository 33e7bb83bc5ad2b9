"""The factored MLP that replaces vllm-neuron's stock dense MLP in a listed layer.

It keeps the stock module's forward contract (vllm_neuron/model/llama3/model.py,
`LlamaMLP.forward(hidden_states, is_prefill)`, vllm-neuron 0.21; Qwen3's MLP is the same):

* prefill (sequence parallel): the tokens arrive split over the TP group; all-gather them
  (dim 0), run the MLP on this rank's slice of the intermediate dimension, reduce-scatter
  the partial sums back to the token split;
* decode: run on all tokens, all-reduce the partial sums over the MLP's TP group.

Each projection lives in a child module named like the checkpoint's (`gate_proj`,
`up_proj`, `down_proj`, from vllm_neuronmlp/mlp_families.py) holding `svd_u` / `svd_v`
(factored) or `weight` (left dense), so every parameter's name IS its checkpoint key and
vllm-neuron's own checkpoint reader fills it with our `ShardLoader` (sharding.py).

Compute, for a fully factored SiLU MLP: the two NKI kernels (`mlp.up_gate` then
`mlp.down`) on a Neuron device, the same kernels on the CPU emulator (`nki-sim`), or plain
aten ops (compute.py). The path is decided once, by a load entry point, outside the
compiled graph: `finalize` after `load_weights`, `prepare_weightless` after
`load_weights_lite` (vllm-neuron's CPU compile, which traces the model before any weight
exists). Every tensor the forward reads is a parameter, so a traced graph takes them as
inputs, never as constants; nothing is computed from the loaded weights after loading (the
factors are used as loaded: no side-by-side copy), and the forward refuses to run before a
load entry point prepared it. A layer with a dense projection (the compressor keeps a
module dense when factoring saves nothing) runs each projection on its own: its factored
projections through the fused XUV kernel (or its fallback), a dense one as `x @ W`.

Which tensor-parallel rank a layer holds comes from the stock MLP it replaces
(`stock_parallelism`): llama3/model.py's `LlamaMLP` sets `mlp_tp_group` / `mlp_tp_rank`
/ `mlp_tp_size`; qwen3/model.py's `Qwen3MLP` sets only `tp_group` and `world_size`, its
loaders shard by the rank the reader passes, the group's `rank_in_group`. A stock MLP
with neither is refused by name, never given rank 0.

A layer narrowed by format v2 (`quantization_config.widths`, docs/checkpoint_format.md) is
this module built at its width k instead of the config's intermediate_size: every
projection, dense or factored, has k on its intermediate side, sharded k/tp per rank.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.neuron import compute
from vllm_neuronmlp.neuron.sharding import ShardLoader, full_shape, intermediate_shard
from vllm_neuronmlp.neuron.stack import HookTargetError, class_path


class SVDNeuronStateError(RuntimeError):
    """The MLP was used before a load entry point prepared it."""


def stock_parallelism(stock: torch.nn.Module, where: str, intermediate_size: Optional[int] = None) -> Tuple:
    """(tp_group, mlp_tp_group, mlp_tp_rank, mlp_tp_size) the stock MLP really shards by.

    llama3/model.py `LlamaMLP` (ae6c10e): `mlp_tp_group` / `mlp_tp_rank` / `mlp_tp_size`
    (TP x mlp_dp_size; its loaders use `with_rank_override(rank=mlp_tp_rank)`).
    qwen3/model.py `Qwen3MLP` (and model_bf16.py `Qwen3DenseMLP`): only `tp_group` and
    `world_size`; its loaders take the rank the checkpoint reader passes, which is the
    model's `tp_group.rank_in_group` (vLLM's GroupCoordinator; its `rank` is the GLOBAL
    rank). `intermediate_size` (the config's) cross-checks the degree against the
    stock MLP's own `intermediate_size_per_rank`."""
    name = f"{class_path(stock)} (the stock MLP of {where})"
    tp_group = getattr(stock, "tp_group", None)
    if tp_group is None:
        raise HookTargetError(f"{name} has no `tp_group`; the svd_neuron variant reads its collectives from it")
    if hasattr(stock, "mlp_tp_rank"):
        group, rank, size = getattr(stock, "mlp_tp_group", None), stock.mlp_tp_rank, getattr(stock, "mlp_tp_size", None)
        if group is None or size is None:
            raise HookTargetError(f"{name} has `mlp_tp_rank` but no `mlp_tp_group` / `mlp_tp_size` "
                                  f"(llama3/model.py LlamaMLP sets all three)")
    else:
        group, rank, size = tp_group, getattr(tp_group, "rank_in_group", None), getattr(tp_group, "world_size", None)
        if rank is None or size is None:
            raise HookTargetError(
                f"{name} holds no tensor-parallel rank the svd_neuron variant can read: neither `mlp_tp_rank` "
                f"(llama3/model.py LlamaMLP) nor `tp_group.rank_in_group` with `tp_group.world_size` (qwen3/model.py "
                f"Qwen3MLP, {type(tp_group).__name__} here); "
                "refusing rather than loading one rank's shard on every rank")
    rank, size = int(rank), int(size)
    if not 0 <= rank < size:
        raise HookTargetError(f"{name}: tensor-parallel rank {rank} is outside its group of {size}")
    per_rank = getattr(stock, "intermediate_size_per_rank", None)
    if intermediate_size is not None and per_rank is not None and intermediate_size % size == 0 \
            and int(per_rank) * size != intermediate_size:   # (an indivisible size is named by intermediate_shard)
        raise HookTargetError(f"{name} holds intermediate_size_per_rank {per_rank}, which is not intermediate_size "
                              f"{intermediate_size} / its MLP tensor-parallel degree {size}: the variant would shard "
                              f"differently from the stock MLP")
    return tp_group, group, rank, size


class FactoredProjection(torch.nn.Module):
    """One projection's shard on this rank: `svd_u`/`svd_v` (rank given) or `weight`, each
    a parameter filled by its `ShardLoader` (the loaders say which part of the checkpoint
    tensor this rank holds; they stay here, since the reader's load_state_dict(assign=True)
    replaces the parameter objects)."""

    def __init__(self, tensor_prefix: str, rank: Optional[int], loaders: Dict[str, ShardLoader], dtype: torch.dtype):
        super().__init__()
        self.tensor_prefix, self.rank, self.loaders = tensor_prefix, rank, dict(loaders)
        for leaf, loader in self.loaders.items():
            param = torch.nn.Parameter(torch.empty(*loader.local_shape(), dtype=dtype), requires_grad=False)
            param.weight_loader = loader
            self.register_parameter(leaf, param)

    @classmethod
    def for_mlp(cls, tensor_prefix: str, role: str, hidden: int, intermediate: int, rank: Optional[int],
                tp_rank: int, tp_size: int, dtype: torch.dtype) -> "FactoredProjection":
        leaves = (cf.U_SUFFIX, cf.V_SUFFIX) if rank else (cf.WEIGHT_SUFFIX,)
        loaders = {leaf: ShardLoader.for_mlp(f"{tensor_prefix}.{leaf}", role, leaf,
                                             full_shape(role, leaf, hidden, intermediate, rank), tp_rank, tp_size,
                                             dtype) for leaf in leaves}
        return cls(tensor_prefix, rank, loaders, dtype)

    @property
    def factored(self) -> bool:
        return bool(self.rank)

    path = compute.TORCH    # set by the owner's load entry point

    def runs(self) -> str:
        """What computes this projection: its path ("kernels", "torch", "nki-sim"), or "dense"."""
        return self.path if self.factored else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored:
            return compute.xuv(x, self.svd_u, self.svd_v, self.path)
        return x @ self.weight


_ACTIVATIONS = {mlp_families.SILU: F.silu, mlp_families.GELU_TANH: lambda t: F.gelu(t, approximate="tanh")}


def _all_reduce(group, tensor: torch.Tensor) -> torch.Tensor:
    # vllm-neuron's group all-reduce works in place and returns nothing in its model
    # code; vLLM's GroupCoordinator returns the result. Accept both.
    out = group.all_reduce(tensor)
    return tensor if out is None else out


class SVDNeuronMLP(torch.nn.Module):
    """A drop-in for vllm-neuron's stock MLP whose listed projections are factored, at
    its layer's intermediate width."""

    def __init__(self, *, layer: int, family: mlp_families.MLPFamily, hidden_size: int, intermediate_size: int,
                 ranks: Mapping[str, Optional[int]], tp_group, mlp_tp_group, mlp_tp_rank: int, mlp_tp_size: int,
                 dtype: torch.dtype, narrowed: bool = False):
        """`intermediate_size` is this layer's own: the config's, or its format-v2 width
        when `narrowed` (which only changes how errors name it)."""
        super().__init__()
        self.layer, self.family = layer, family
        self.tp_group, self.mlp_tp_group = tp_group, mlp_tp_group
        self.world_size = tp_group.world_size if tp_group is not None else 1
        self.mlp_tp_rank, self.mlp_tp_size = mlp_tp_rank, mlp_tp_size
        self.hidden_size, self.intermediate_size, self.narrowed = hidden_size, intermediate_size, narrowed
        where = f"{family.layer_prefix}.{layer}.mlp"
        what = f"width (its {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_WIDTHS})" if narrowed else "intermediate_size"
        self.intermediate_size_per_rank = intermediate_shard(intermediate_size, mlp_tp_size, where, what)
        self.act = _ACTIVATIONS[family.activation]
        for role, proj in zip(mlp_families.ROLES, family.projections):
            module = mlp_families.module_name(family, layer, proj)
            self.add_module(proj, FactoredProjection.for_mlp(module, role, hidden_size, intermediate_size,
                                                               ranks.get(role), mlp_tp_rank, mlp_tp_size, dtype))
        self.where = f"{family.layer_prefix}.{layer}.mlp"
        self._path = None      # decided once by a load entry point: "kernels", "torch", "nki-sim" or "per-projection"

    @classmethod
    def from_stock(cls, stock: torch.nn.Module, *, layer: int, family: mlp_families.MLPFamily, hidden_size: int,
                   intermediate_size: int, ranks: Mapping[str, Optional[int]], narrowed: bool = False,
                   stock_intermediate_size: Optional[int] = None) -> "SVDNeuronMLP":
        """Take the stock MLP's process groups, MLP-TP rank/size (`stock_parallelism`) and
        dtype; `stock_intermediate_size` (the config's) cross-checks the degree."""
        where = f"{family.layer_prefix}.{layer}.mlp"
        tp_group, mlp_tp_group, mlp_tp_rank, mlp_tp_size = stock_parallelism(stock, where, stock_intermediate_size)
        dtype = next((p.dtype for p in stock.parameters()), torch.bfloat16)
        return cls(layer=layer, family=family, hidden_size=hidden_size, intermediate_size=intermediate_size,
                   ranks=ranks, tp_group=tp_group, mlp_tp_group=mlp_tp_group, mlp_tp_rank=mlp_tp_rank,
                   mlp_tp_size=mlp_tp_size, dtype=dtype, narrowed=narrowed)

    # ------------------------------------------------------------ structure
    def projections(self) -> Dict[str, FactoredProjection]:
        return {role: getattr(self, proj) for role, proj in zip(mlp_families.ROLES, self.family.projections)}

    @property
    def fully_factored(self) -> bool:
        return all(p.factored for p in self.projections().values())

    @property
    def fused(self) -> bool:
        """Runs as one fused MLP (kernels or ops.svd_mlp): all factored, SiLU."""
        return self.fully_factored and self.family.activation == mlp_families.SILU

    @property
    def compute_path(self) -> Optional[str]:
        """How the forward computes, once a load entry point decided it (else None)."""
        return self._path

    def _set_path(self, path: str) -> None:
        self._path = path if self.fused else "per-projection"
        for proj in self.projections().values():
            proj.path = path

    def finalize(self) -> None:
        """After `load_weights`, outside any compiled graph: decide how this MLP computes.

        The NKI kernels where they can run on the loaded factors (a Neuron device, a dtype
        they take, a TorchNeuron runtime with `wrap_nki`), else the aten fallback, said once
        in the log with the reason. Reads the factors' device and dtype only: no arithmetic
        on loaded weights (on Neuron, eager ops on device tensors are not supported)."""
        probe = next(p for proj in self.projections().values() for p in proj.parameters())
        self._set_path(compute.choose_path(probe.device, probe, "the svd_neuron MLP"))

    def prepare_weightless(self, device) -> None:
        """After `load_weights_lite` (vllm-neuron's CPU compile: the model is traced before
        any weight exists): decide the path for `device`, the one the stock lite load was
        given. No tensor is read or built."""
        self._set_path(compute.choose_path(torch.device(device or "cpu"), None, "the svd_neuron MLP"))

    def path_summary(self) -> str:
        """Per projection, what computes it (the server log's per-layer line): a fused MLP
        runs the two MLP kernels (or their fallback) for all three at once."""
        what = " ".join(f"{role}={proj.runs()}" for role, proj in self.projections().items())
        return f"{what} (fused MLP)" if self.fused else what

    # ------------------------------------------------------------ compute
    def local_mlp(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's partial MLP output (before any reduction)."""
        p = self.projections()
        gate, up, down = p[mlp_families.GATE], p[mlp_families.UP], p[mlp_families.DOWN]
        if self._path is None:
            raise SVDNeuronStateError(
                f"{self.where}: the svd_neuron MLP ran before a load entry point (load_weights, or load_weights_lite "
                f"when compiling before the weights) prepared it; vllm_neuronmlp/neuron/integrate.py wraps both")
        if not self.fused:
            return down(self.act(gate(h)) * up(h))
        return compute.svd_mlp(h, gate.svd_u, gate.svd_v, up.svd_u, up.svd_v, down.svd_u, down.svd_v,
                               self._path, self.act)

    def forward(self, hidden_states: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        if is_prefill and self.world_size > 1:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        output = self.local_mlp(hidden_states)
        if is_prefill:
            if self.world_size > 1:
                output = self.tp_group.reduce_scatter(output, dim=0)
        elif self.mlp_tp_size > 1:
            output = _all_reduce(self.mlp_tp_group, output)
        return output

    def extra_repr(self) -> str:
        ranks = {role: proj.rank for role, proj in self.projections().items()}
        width = f"width={self.intermediate_size}, " if self.narrowed else ""
        return (f"layer={self.layer}, {width}ranks={ranks}, mlp_tp={self.mlp_tp_rank}/{self.mlp_tp_size}, "
                f"intermediate_per_rank={self.intermediate_size_per_rank}")


class SVDNeuronWrapperMLP(SVDNeuronMLP):
    """Takes the place of qwen3/model_bf16.py's `Qwen3MLP`, a wrapper that its decoder
    layer calls as `mlp(hidden_states, positions, is_decode, rank)` and asks `is_moe`
    (its `dense_mlp` is the stock MLP whose groups we take). Replacing the wrapper, not
    `dense_mlp`, keeps our parameters named like the checkpoint tensors."""

    is_moe = False

    def forward(self, hidden_states: torch.Tensor, positions=None, is_decode: bool = False,
                rank=None) -> torch.Tensor:
        return super().forward(hidden_states, is_prefill=not is_decode)
