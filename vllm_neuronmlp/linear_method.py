"""The factored linear method: `y = (x @ svd_u) @ svd_v` for one vLLM linear.

Parameters on the layer (per tensor-parallel rank):

    svd_u  [in_local, r_0 + r_1 + ...]   the U of each packed HF module side by side
    svd_v  the V of each packed module, [r_k, out_k] on this rank:
           - stacked by rows, [r_0 + r_1 + ..., out_shard], when the packed modules
             have one output size (gate_up, any single module; mlp_fusion reads it);
           - else (qkv_proj of a GQA model: q wider than k and v) back to back in one
             flat parameter, each block stored column-major ([out_k, r_k] row-major,
             nn.Linear's weight layout), read as [r_k, out_k] views (`v_blocks`).

For the merged gate_up linear that is `[U_g | U_u]` and `[V_g ; V_u]`, for qkv
`[U_q | U_k | U_v]` and V_q, V_k, V_v: one GEMM for the first stage, then each
V multiplies only its own slice of `x U`, so no zero blocks are ever stored or
multiplied.

Tensor parallelism (docs/vllm.md), exact for every layer kind; which tensor is
split along which dimension, and each rank's part, come from checkpoint_format
(`split_dim`, `tp_part`, `tp_slice`), shared with the Trainium MLP:
- column parallel (merged gate_up, qkv): input whole, output split. U is
  replicated; each V is split along its columns exactly as vLLM splits that
  module's dense weight rows (`column_shard`: for qkv by heads, q heads over the
  ranks, k/v heads too or, with more ranks than kv heads, replicated).
- row parallel (down, o): input split, output all-reduced by the layer. U is
  split along its rows, V replicated: sum_k (x_k U_k) V = x U V.
- replicated: both whole.

This per-linear path is the reference; the MLP normally runs through the fused
`svd_mlp` op (see `mlp_fusion`), and tests check that both agree. Attention
projections (format v3) always run here. A bias (Qwen2's q/k/v) is the layer's
own dense parameter, loaded by vLLM and added after the factors.

Format v2 (per-layer intermediate widths, docs/checkpoint_format.md): vLLM builds
every MLP at the config's intermediate_size I; for a layer narrowed to k channels
the methods here allocate the parameters at k instead (each rank k / tp, split as
above), so the activation and the down projection simply see k / tp channels.
`NarrowedDenseMethod` does that for the projections of such a layer that stay dense.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.mlp_families import MLPFamily
from vllm_neuronmlp.ops import factored_linear, select_backend


# vLLM's shard ids of the modules a QKVParallelLinear packs, in packing order.
QKV_SHARD_IDS = ("q", "k", "v")


def _linear_method_base():
    from vllm.model_executor.layers.linear import LinearMethodBase

    return LinearMethodBase


class SVDLinearMethod(_linear_method_base()):
    def __init__(self, hf_modules: List[str], ranks: List[int], family: MLPFamily,
                 width: Optional[int] = None) -> None:
        self.family = family  # the model's MLP family: names and activation (mlp_fusion reads it)
        self.width = width  # the layer's intermediate width (format v2), None for the config's
        self.hf_modules = list(hf_modules)
        self.ranks = list(ranks)
        self.rank_offsets = [sum(self.ranks[:k]) for k in range(len(self.ranks) + 1)]

    # ------------------------------------------------------------ weights
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        from vllm.model_executor.layers.linear import RowParallelLinear
        from vllm.model_executor.utils import set_weight_attrs

        if len(output_partition_sizes) != len(self.ranks):
            raise cf.CheckpointFormatError(
                f"{self.hf_modules}: vLLM builds this layer from {len(output_partition_sizes)} modules "
                f"but the checkpoint factors {len(self.ranks)}")
        extra_weight_attrs.pop("weight_loader", None)
        out_shards = list(output_partition_sizes)
        total_rank = self.rank_offsets[-1]
        parallel = cf.ROW_PARALLEL if isinstance(layer, RowParallelLinear) else cf.COLUMN_PARALLEL
        if self.width is not None:  # a narrowed layer: its intermediate side is `width` wide
            input_size_per_partition, input_size, narrowed_out = narrowed_sizes(
                layer, self.width, input_size_per_partition, input_size, out_shards[0])
            out_shards = [narrowed_out] * len(out_shards)
        stacked = len(set(out_shards)) == 1
        # flat layout: where each module's V block starts in the parameter
        v_offsets = [sum(r * n for r, n in zip(self.ranks[:k], out_shards[:k])) for k in range(len(self.ranks) + 1)]

        u = torch.nn.Parameter(torch.empty(input_size_per_partition, total_rank, dtype=params_dtype),
                               requires_grad=False)
        v = torch.nn.Parameter(torch.empty((total_rank, out_shards[0]) if stacked else (v_offsets[-1],),
                                           dtype=params_dtype), requires_grad=False)
        layer.register_parameter(cf.U_SUFFIX, u)
        layer.register_parameter(cf.V_SUFFIX, v)
        layer.svd_loaded = set()
        layer.svd_ranks = self.ranks
        layer.svd_rank_offsets = self.rank_offsets
        layer.svd_hf_modules = self.hf_modules
        layer.svd_out_shards = out_shards
        layer.svd_v_offsets = None if stacked else v_offsets

        def shard_index(shard_id) -> int:
            if shard_id is None and len(self.ranks) == 1:
                return 0
            if shard_id in QKV_SHARD_IDS and len(self.ranks) == len(QKV_SHARD_IDS):
                return QKV_SHARD_IDS.index(shard_id)
            if isinstance(shard_id, int) and 0 <= shard_id < len(self.ranks):
                return shard_id
            raise cf.CheckpointFormatError(
                f"{self.hf_modules}: cannot place a factor with shard id {shard_id!r} "
                f"(this layer packs {len(self.ranks)} modules, stored separately in the checkpoint)")

        def check_shape(name: str, loaded: torch.Tensor, want) -> None:
            if list(loaded.shape) != list(want):
                raise cf.CheckpointFormatError(
                    f"tensor {name} has shape {list(loaded.shape)}, expected {list(want)} "
                    f"(rank {want[1] if name.endswith(cf.U_SUFFIX) else want[0]} from "
                    f"{cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_RANKS})")

        def load_u(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
            k = shard_index(shard_id)
            r, lo = self.ranks[k], self.rank_offsets[k]
            check_shape(cf.u_name(self.hf_modules[k]), loaded, (input_size, r))
            dim = cf.split_dim(parallel, cf.U_SUFFIX)
            if dim is not None and layer.tp_size > 1:
                loaded = loaded.narrow(dim, *cf.tp_slice(loaded.shape[dim], layer.tp_rank, layer.tp_size))
            param.data[:, lo:lo + r].copy_(loaded)
            layer.svd_loaded.add((cf.U_SUFFIX, k))

        def load_v(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
            k = shard_index(shard_id)
            r, n = self.ranks[k], out_shards[k]
            full_out, start = column_shard(layer, k, n)
            check_shape(cf.v_name(self.hf_modules[k]), loaded, (r, full_out))
            loaded = loaded.narrow(1, start, n)
            v_blocks(layer, param.data)[k].copy_(loaded)
            layer.svd_loaded.add((cf.V_SUFFIX, k))

        set_weight_attrs(u, {"weight_loader": load_u, **extra_weight_attrs})
        set_weight_attrs(v, {"weight_loader": load_v, **extra_weight_attrs})

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Refuse to run a half-loaded layer: every factor must have arrived, finite."""
        missing = [(cf.u_name(m) if f == cf.U_SUFFIX else cf.v_name(m))
                   for k, m in enumerate(self.hf_modules)
                   for f in (cf.U_SUFFIX, cf.V_SUFFIX) if (f, k) not in layer.svd_loaded]
        if missing:
            raise cf.CheckpointFormatError(
                f"the checkpoint lacks {', '.join(missing)}: these modules are listed in "
                f"{cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_RANKS}, so both factors must be present")
        for name in (cf.U_SUFFIX, cf.V_SUFFIX):
            param = getattr(layer, name)
            if not torch.isfinite(param).all():
                raise cf.CheckpointFormatError(
                    f"factor {name} of {self.hf_modules} has non-finite values (NaN or Inf)")
            if param.device.type == "cpu" and param.dim() == 2:
                # Same logical shape, nn.Linear's memory layout (column-major): CPU
                # GEMMs, bf16 ones above all on CPUs without AVX512-BF16, run several
                # times faster with it (measured 6x for `x @ U` in bf16 on AVX2).
                # (A flat V holds its blocks in that layout from the start.)
                param.data = param.data.t().contiguous().t()
        # Chosen once, here, where the weights' device is known and outside any
        # torch.compile trace; the fused MLP op reads it (mlp_fusion).
        layer.svd_backend = select_backend(layer.svd_u.device)

    # ------------------------------------------------------------ compute
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return factored_linear(x, layer.svd_u, v_blocks(layer, layer.svd_v), bias=bias)


def v_blocks(layer: torch.nn.Module, v: torch.Tensor) -> List[torch.Tensor]:
    """Each packed module's V on this rank, [r_k, out_k], as views of the layer's `svd_v` storage `v`."""
    ranks, offsets = layer.svd_ranks, layer.svd_v_offsets
    if offsets is None:  # stacked by rows
        return [v.narrow(0, lo, r) for lo, r in zip(layer.svd_rank_offsets, ranks)]
    return [v.narrow(0, offsets[k], r * n).view(n, r).t() for k, (r, n) in enumerate(zip(ranks, layer.svd_out_shards))]


def column_shard(layer: torch.nn.Module, k: int, out_shard: int) -> Tuple[int, int]:
    """(full output size, first output column on this rank) of packed module k of a
    vLLM linear whose rank holds `out_shard` of its outputs; the V factor's columns
    are split exactly like the dense weight's rows. For QKVParallelLinear this
    mirrors its weight_loader: q heads are split over the ranks, k/v heads too, or,
    with more ranks than kv heads, each replicated on num_kv_head_replicas ranks
    (rank t holds kv head t // num_kv_head_replicas)."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear

    if not isinstance(layer, ColumnParallelLinear):
        return out_shard, 0
    if isinstance(layer, QKVParallelLinear):
        if k == 0:
            return layer.total_num_heads * layer.head_size, layer.tp_rank * out_shard
        head = layer.head_size if k == 1 else layer.v_head_size
        return layer.total_num_kv_heads * head, (layer.tp_rank // layer.num_kv_head_replicas) * out_shard
    full = out_shard * layer.tp_size
    return full, cf.tp_slice(full, layer.tp_rank, layer.tp_size)[0]


def narrowed_sizes(layer: torch.nn.Module, width: int, in_local: int, in_full: int, out_shard: int):
    """(input size per rank, input size, output size per packed module and rank) of
    an MLP linear of a layer narrowed to `width` intermediate channels: the
    row-parallel down projection loses input rows, the column-parallel gate/up
    output columns; each rank keeps width / tp of them."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    what = f"{cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_WIDTHS} (a narrowed MLP layer's width)"
    if isinstance(layer, RowParallelLinear):
        return cf.tp_part(width, layer.tp_size, what), width, out_shard
    if isinstance(layer, ColumnParallelLinear):
        return in_local, in_full, cf.tp_part(width, layer.tp_size, what)
    raise cf.CheckpointFormatError(f"a narrowed MLP (format v2) has a {type(layer).__name__}, expected the "
                                    f"column-parallel gate/up and the row-parallel down")


def _unquantized_method_base():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return UnquantizedLinearMethod


class NarrowedDenseMethod(_unquantized_method_base()):
    """A dense MLP linear of a layer narrowed to `width` channels (format v2):
    vLLM's dense compute on a weight allocated and loaded at the narrowed shape."""

    def __init__(self, hf_modules: List[str], width: int) -> None:
        super().__init__()
        self.hf_modules, self.width = list(hf_modules), width

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        from vllm.model_executor.layers.linear import RowParallelLinear
        from vllm.model_executor.utils import set_weight_attrs

        extra_weight_attrs.pop("weight_loader", None)
        in_local, in_full, out_shard = narrowed_sizes(layer, self.width, input_size_per_partition, input_size,
                                                      output_partition_sizes[0])
        split_input = isinstance(layer, RowParallelLinear)
        dim = cf.split_dim(cf.ROW_PARALLEL if split_input else cf.COLUMN_PARALLEL, cf.WEIGHT_SUFFIX)
        n = len(output_partition_sizes)
        weight = torch.nn.Parameter(torch.empty(out_shard * n, in_local, dtype=params_dtype), requires_grad=False)
        layer.register_parameter("weight", weight)

        def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
            k = 0 if shard_id is None else int(shard_id)
            want = [output_size if split_input else out_shard * layer.tp_size, in_full]  # HF [out, in]
            if list(loaded.shape) != want:
                raise cf.CheckpointFormatError(
                    f"tensor {cf.weight_name(self.hf_modules[k])} has shape {list(loaded.shape)}, expected {want} "
                    f"(width {self.width} from {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_WIDTHS})")
            if layer.tp_size > 1:
                loaded = loaded.narrow(dim, *cf.tp_slice(loaded.shape[dim], layer.tp_rank, layer.tp_size))
            param.data[k * out_shard:(k + 1) * out_shard].copy_(loaded)

        set_weight_attrs(weight, {"weight_loader": load, **extra_weight_attrs})

