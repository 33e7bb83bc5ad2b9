"""Tensor-parallel shards of one MLP's factors, read straight from the checkpoint.

The stock native MLP (vllm_neuron/model/llama3/model.py, `LlamaMLP`, vllm-neuron 0.21)
splits the intermediate dimension I over the MLP's tensor-parallel group: gate/up are
column-parallel (output split), down is row-parallel (input split, partial sums reduced
by the caller). For factors that means (docs/trainium.md):

    gate, up  U [H, r] replicated        V [r, I] split by columns -> [r, I/tp]
    down      U [I, r] split by rows     V [r, H] replicated
    dense     HF weight [out, in]: gate/up rows split, down columns split, stored
              transposed ([in, out]) like the stock MLP stores its own weights

so `sum_k (h_k U_d,k) V_d = h U_d V_d` over the ranks is exact. A rank holds factors
smaller than its dense shard only while r < H (I/tp) / (H + I/tp).

A layer narrowed by format v2 (`quantization_config.widths`, docs/checkpoint_format.md)
is the same with its own width k in place of I: each rank holds k/tp of its channels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from vllm_neuronmlp import checkpoint_format as cf

# The split arithmetic (which dimension of which leaf a rank splits, each rank's slice, the
# checkpoint shapes) is the format module's, shared with the CPU/GPU vLLM plugin.


class SVDShardingError(cf.TensorParallelError):
    """The MLP cannot be split over the tensor-parallel degree asked for (a
    TensorParallelError, the format module's error for the same fault on the CPU path)."""


def intermediate_shard(intermediate_size: int, tp_size: int, where: str, what: str = "intermediate_size") -> int:
    """I / tp (or a narrowed layer's k / tp, `what` naming it), or a named error when tp
    does not divide it."""
    return cf.tp_part(intermediate_size, tp_size,
                      f"{where}: {what} (split over the MLP's tensor-parallel degree, "
                      f"tensor_parallel_size x mlp_dp_size)", SVDShardingError)


def full_shape(role: str, leaf: str, hidden: int, intermediate: int, rank: Optional[int]) -> Tuple[int, int]:
    """Shape of the checkpoint tensor (HF layout) for one projection's leaf."""
    return cf.leaf_shape(*cf.projection_shape(role, hidden, intermediate), leaf, rank)


def is_split(role: str, leaf: str) -> bool:
    """Whether ranks hold different parts of this leaf (else every rank holds it whole)."""
    return cf.split_dim(cf.parallelism(role), leaf) is not None


def shard_index(role: str, leaf: str, shape: Sequence[int], tp_rank: int, tp_size: int):
    """(index tuple into the checkpoint tensor, transpose?) for this rank's shard; a dense
    weight is stored transposed ([in, out]) like the stock MLP stores its own.

    Works on a torch tensor and on safetensors' lazy slice alike, so a rank reads only
    its part of a split factor."""
    dim = cf.split_dim(cf.parallelism(role), leaf)
    index = [slice(None), slice(None)]
    if dim is not None and tp_size > 1:
        first, size = cf.tp_slice(shape[dim], tp_rank, tp_size)
        index[dim] = slice(first, first + size)
    return tuple(index), leaf == cf.WEIGHT_SUFFIX


def shard_tensor(full: torch.Tensor, role: str, leaf: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of a whole checkpoint tensor (what the loader produces)."""
    index, transpose = shard_index(role, leaf, full.shape, tp_rank, tp_size)
    part = full[index]
    return (part.t() if transpose else part).contiguous()


_SAMPLE = 4096   # elements of each tensor a fingerprint reads (strided over the whole tensor)


def fingerprint(t: torch.Tensor) -> float:
    """A position-weighted sum of a strided sample of `t` (a host tensor): cheap even for a
    large model, and different for different shards."""
    flat = t.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // _SAMPLE)][:_SAMPLE].to("cpu", torch.float64)
    return float((sample * torch.arange(1, sample.numel() + 1, dtype=torch.float64)).sum())


class ShardLoader:
    """Loads one parameter of the variant (an MLP's or an attention's) from its checkpoint tensor.

    Duck-types vllm-neuron's `SafetensorsWeightLoader` (vllm_neuron/utils/weight_loader.py,
    0.21): its checkpoint reader calls `load(slices, rank)` with one lazy safetensors slice
    per checkpoint key. Like the stock modules' `with_rank_override`, the shard read is the
    one this loader was built for (`index`, from the module's own tensor-parallel rank), not
    the rank passed in. `split` says whether ranks hold different parts of the tensor.

    Everything derived from the tensor is computed here, on the host copy the reader hands
    over, before the reader moves the result to the device: the finiteness check and this
    shard's `fingerprint` (for the per-rank checksum the load logs). vllm-neuron's model
    runner does not support eager ops on device tensors, so nothing reads the loaded
    parameter afterwards. `loaded` says the reader called this loader."""

    def __init__(self, tensor_name: str, shape: Sequence[int], index: Tuple[slice, ...], transpose: bool,
                 split: bool, dtype: torch.dtype, where: str = ""):
        self.tensor_name, self.shape, self.index, self.transpose = tensor_name, tuple(shape), index, transpose
        self.split, self.dtype, self.where = split, dtype, where
        self.loaded, self.fingerprint = False, None

    @classmethod
    def for_mlp(cls, tensor_name: str, role: str, leaf: str, shape: Tuple[int, int], tp_rank: int, tp_size: int,
                dtype: torch.dtype) -> "ShardLoader":
        index, transpose = shard_index(role, leaf, shape, tp_rank, tp_size)
        return cls(tensor_name, shape, index, transpose, is_split(role, leaf), dtype, f"rank {tp_rank}/{tp_size}")

    def local_shape(self) -> Tuple[int, ...]:
        """The shape of this rank's parameter."""
        local = [len(range(*s.indices(n))) for s, n in zip(self.index, self.shape)]
        return tuple(local[::-1] if self.transpose else local)

    def load(self, slices, rank: int = 0) -> torch.Tensor:
        if len(slices) != 1:
            raise cf.CheckpointFormatError(
                f"tensor {self.tensor_name}: expected exactly one checkpoint tensor, got {len(slices)}")
        source = slices[0]
        shape = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
        if shape != self.shape:
            raise cf.CheckpointFormatError(
                f"tensor {self.tensor_name} has shape {list(shape)}, expected {list(self.shape)} "
                f"(from config.json and its {cf.QUANTIZATION_CONFIG_KEY} {cf.KEY_RANKS} / {cf.KEY_WIDTHS})")
        part = source[self.index]
        if not torch.isfinite(part).all():
            raise cf.CheckpointFormatError(f"tensor {self.tensor_name} has non-finite values (NaN or Inf)")
        part = (part.t() if self.transpose else part).to(self.dtype).contiguous()
        self.loaded, self.fingerprint = True, fingerprint(part)
        return part

    def __repr__(self) -> str:
        return f"ShardLoader({self.tensor_name}, {self.where}, {'split' if self.split else 'replicated'})"
