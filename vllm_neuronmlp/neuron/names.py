"""Checkpoint tensor -> parameter of the variant, and the check that nothing is lost.

Each parameter of an `SVDNeuronMLP` is named exactly like the checkpoint tensor it holds
(`model.layers.3.mlp.gate_proj.svd_u`), and vllm-neuron's checkpoint reader falls back to
the parameter name when its mapping table has no entry (`load_sharded` /
`load_sharded_pipelined` in vllm_neuron/utils/checkpoints.py, vllm-neuron 0.21: "If
parameter name not in mappings, uses parameter name as checkpoint key"). So the plan is
the identity on our parameters; the stock mapping covers the rest of the model.

The reader ignores checkpoint tensors nobody asked for, so a misnamed factor would be
silently dropped. `check_mlp_tensors` refuses that before any loading: within every MLP we
replaced, each checkpoint tensor must land in exactly one of our parameters and each of our
parameters must find its tensor. Given the tensors' shapes (read from the safetensors
headers), it also checks each against the shape the parameter expects, which for a layer
narrowed by format v2 (`quantization_config.widths`) is at that layer's width, so a
checkpoint whose tensors disagree with its widths is refused before loading too.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence, Tuple, Union

import torch

from vllm_neuronmlp import checkpoint_format as fmt
from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP
from vllm_neuronmlp.neuron.sharding import ShardLoader, is_split


class CheckpointMappingError(fmt.CheckpointFormatError):
    """A checkpoint tensor has no parameter of the variant to land in, or a parameter
    has no tensor; the message names them."""


def svd_mlps(model: torch.nn.Module) -> Dict[str, SVDNeuronMLP]:
    """module path -> our MLP, for every MLP the variant replaced."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDNeuronMLP)}


def _loaders(mlp: SVDNeuronMLP) -> Dict[str, ShardLoader]:
    """parameter name (within the MLP) -> its loader."""
    return {f"{proj_name}.{leaf}": loader for proj_name, proj in mlp.named_children()
            for leaf, loader in getattr(proj, "loaders", {}).items()}


def mlp_param_plan(model: torch.nn.Module) -> Dict[str, str]:
    """parameter name -> checkpoint tensor name, for the parameters of our MLPs."""
    plan = {}
    for path, mlp in svd_mlps(model).items():
        for name, _ in mlp.named_parameters():
            full = f"{path}.{name}"
            plan[full] = full
    return plan


def expected_shapes(model: torch.nn.Module) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """checkpoint tensor -> (its full shape, HF layout; what sets the layer's width), for
    the parameters of our MLPs (the shape each parameter's ShardLoader will accept)."""
    out = {}
    for path, mlp in svd_mlps(model).items():
        width = (f"{path} narrowed to width {mlp.intermediate_size} by {fmt.QUANTIZATION_CONFIG_KEY}."
                 f"{fmt.KEY_WIDTHS}" if mlp.narrowed else f"{path} at intermediate_size {mlp.intermediate_size}")
        for name, loader in _loaders(mlp).items():
            out[f"{path}.{name}"] = (tuple(loader.shape), width)
    return out


def check_mlp_tensors(checkpoint_tensors: Union[Iterable[str], Mapping[str, Sequence[int]]], model: torch.nn.Module,
                      source: str = "checkpoint") -> None:
    """Every tensor inside a replaced MLP maps to exactly one of our parameters and every
    parameter has its tensor; given {tensor: shape}, each has the shape its parameter
    expects (at its layer's width). Otherwise CheckpointMappingError naming them."""
    shapes = checkpoint_tensors if isinstance(checkpoint_tensors, Mapping) else None
    tensors = set(checkpoint_tensors)
    plan = mlp_param_plan(model)
    missing = sorted(p for p, t in plan.items() if t not in tensors)
    if missing:
        raise CheckpointMappingError(
            f"{source}: the svd_neuron model variant needs tensor(s) {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''} ({len(missing)} in all), which the checkpoint lacks; "
            f"config.json {fmt.QUANTIZATION_CONFIG_KEY}.{fmt.KEY_RANKS} lists their modules as factored "
            f"(svd_u/svd_v) or the variant expected a dense .weight (the other projections of a layer listed in "
            f"{fmt.KEY_RANKS} or narrowed by {fmt.KEY_WIDTHS})")
    claimed = set(plan.values())
    prefixes = tuple(f"{path}." for path in svd_mlps(model))
    leftover = sorted(t for t in tensors if t.startswith(prefixes) and t not in claimed)
    if leftover:
        raise CheckpointMappingError(
            f"{source}: tensor(s) {leftover[:6]}{' ...' if len(leftover) > 6 else ''} would be left over: "
            f"no parameter of the svd_neuron model variant takes them (a .weight of a factored module, or a "
            f"misnamed factor); fix the checkpoint or its {fmt.QUANTIZATION_CONFIG_KEY}.{fmt.KEY_RANKS}")
    if shapes is not None:
        wrong = [f"{t} has shape {list(shapes[t])}, expected {list(want)} ({why})"
                 for t, (want, why) in sorted(expected_shapes(model).items()) if tuple(shapes[t]) != want]
        if wrong:
            raise CheckpointMappingError(
                f"{source}: tensor(s) of the svd_neuron model variant disagree with config.json: {'; '.join(wrong[:4])}"
                f"{' ...' if len(wrong) > 4 else ''} ({len(wrong)} in all)")


def check_loaded(model: torch.nn.Module) -> None:
    """After loading: every parameter of our MLPs was filled by its loader (the model is
    built on the meta device, and a parameter the reader skipped stays unfilled) -- a
    half-loaded model is never served. Asks the loaders, never the tensors."""
    empty = [f"{path}.{name}" for path, mlp in svd_mlps(model).items()
             for name, loader in _loaders(mlp).items() if not loader.loaded]
    if empty:
        raise CheckpointMappingError(
            f"after loading, parameter(s) {empty[:6]} of the svd_neuron model variant were never filled "
            f"from the checkpoint; refusing to serve a half-loaded model")


def shard_checksums(model: torch.nn.Module) -> Dict[str, Union[int, float]]:
    """This rank's fingerprint of its loaded svd_neuron tensors, to compare across ranks:
    `split` over the tensors ranks hold different parts of (V of gate/up, U of down, dense
    weights; it differs between ranks), `replicated` over those every rank holds whole
    (the same on every rank). Summed from what each parameter's loader computed on the
    host while loading (sharding.fingerprint), so no loaded tensor is read again."""
    mlps = svd_mlps(model)
    split = replicated = 0.0
    rank, tp = 0, 1
    for mlp in mlps.values():
        rank, tp = mlp.mlp_tp_rank, mlp.mlp_tp_size
        for role, proj in mlp.projections().items():
            for leaf, loader in proj.loaders.items():
                value = loader.fingerprint or 0.0
                if is_split(role, leaf):
                    split += value
                else:
                    replicated += value
    return {"rank": rank, "tp": tp, "mlps": len(mlps), "split": split, "replicated": replicated}
