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

from vllm_neuronmlp import checkpoint_format as fmt
from vllm_neuronmlp import mlp_families

COLUMN_ROLES = (mlp_families.GATE, mlp_families.UP)   # output split
ROW_ROLES = (mlp_families.DOWN,)                      # input split


class SVDShardingError(fmt.TensorParallelError):
    """The MLP cannot be split over the tensor-parallel degree asked for (a
    TensorParallelError, the format module's error for the same fault on the CPU path)."""


def intermediate_shard(intermediate_size: int, tp_size: int, where: str, what: str = "intermediate_size") -> int:
    """I / tp (or a narrowed layer's k / tp, `what` naming it), or a named error when tp
    does not divide it."""
    if tp_size < 1:
        raise SVDShardingError(f"{where}: tensor-parallel degree must be >= 1, got {tp_size}")
    if intermediate_size % tp_size:
        divisors = [d for d in range(1, min(intermediate_size, 64) + 1) if intermediate_size % d == 0]
        raise SVDShardingError(
            f"{where}: {what} {intermediate_size} does not divide by the MLP's tensor-parallel "
            f"degree {tp_size} (tensor_parallel_size x mlp_dp_size), so its projections cannot be split evenly; "
            f"degrees that divide it: {divisors}")
    return intermediate_size // tp_size


def full_shape(role: str, leaf: str, hidden: int, intermediate: int, rank: Optional[int]) -> Tuple[int, int]:
    """Shape of the checkpoint tensor (HF layout) for one projection's leaf."""
    n_in, n_out = (hidden, intermediate) if role in COLUMN_ROLES else (intermediate, hidden)
    if leaf == fmt.U_SUFFIX:
        return (n_in, rank)
    if leaf == fmt.V_SUFFIX:
        return (rank, n_out)
    return (n_out, n_in)   # nn.Linear weight


def is_split(role: str, leaf: str) -> bool:
    """Whether ranks hold different parts of this leaf (else every rank holds it whole)."""
    if leaf == fmt.WEIGHT_SUFFIX:
        return True
    return role in (ROW_ROLES if leaf == fmt.U_SUFFIX else COLUMN_ROLES)


def shard_index(role: str, leaf: str, shape: Sequence[int], tp_rank: int, tp_size: int):
    """(index tuple into the checkpoint tensor, transpose?) for this rank's shard.

    Works on a torch tensor and on safetensors' lazy slice alike, so a rank reads only
    its part of a split factor."""
    every = slice(None)
    if leaf == fmt.WEIGHT_SUFFIX:        # HF [out, in]: split `out` for column roles, `in` for row roles
        dim = 0 if role in COLUMN_ROLES else 1
        transpose = True
    elif leaf == fmt.U_SUFFIX:           # [in, r]: split `in` for row roles only
        dim = 0 if role in ROW_ROLES else None
        transpose = False
    else:                                # V [r, out]: split `out` for column roles only
        dim = 1 if role in COLUMN_ROLES else None
        transpose = False
    index = [every, every]
    if dim is not None and tp_size > 1:
        size = shape[dim] // tp_size
        index[dim] = slice(tp_rank * size, (tp_rank + 1) * size)
    return tuple(index), transpose


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
            raise fmt.CheckpointFormatError(
                f"tensor {self.tensor_name}: expected exactly one checkpoint tensor, got {len(slices)}")
        source = slices[0]
        shape = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
        if shape != self.shape:
            raise fmt.CheckpointFormatError(
                f"tensor {self.tensor_name} has shape {list(shape)}, expected {list(self.shape)} "
                f"(from config.json and its {fmt.QUANTIZATION_CONFIG_KEY} {fmt.KEY_RANKS} / {fmt.KEY_WIDTHS})")
        part = source[self.index]
        if not torch.isfinite(part).all():
            raise fmt.CheckpointFormatError(f"tensor {self.tensor_name} has non-finite values (NaN or Inf)")
        part = (part.t() if self.transpose else part).to(self.dtype).contiguous()
        self.loaded, self.fingerprint = True, fingerprint(part)
        return part

    def __repr__(self) -> str:
        return f"ShardLoader({self.tensor_name}, {self.where}, {'split' if self.split else 'replicated'})"
