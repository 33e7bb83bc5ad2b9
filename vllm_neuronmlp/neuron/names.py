"""Checkpoint tensor -> parameter of the variant, and the check that nothing is lost.

Each parameter of an `SVDNeuronMLP` is named exactly like the checkpoint tensor it holds
(`model.layers.3.mlp.gate_proj.svd_u`), and vllm-neuron's checkpoint reader falls back to
the parameter name when its mapping table has no entry (`load_sharded` /
`load_sharded_pipelined` in vllm_neuron/utils/checkpoints.py, vllm-neuron 0.21: "If
parameter name not in mappings, uses parameter name as checkpoint key"). So the plan is
the identity on our parameters; the stock mapping covers the rest of the model.

The reader ignores checkpoint tensors nobody asked for, so a misnamed factor would be
silently dropped. `check_tensors` refuses that before any loading: within every module we
replaced, each checkpoint tensor must land in exactly one of our parameters and each of our
parameters must find its tensor. Given the tensors' shapes (read from the safetensors
headers), it also checks each against the shape the parameter expects, which for a layer
narrowed by format v2 (`quantization_config.widths`) is at that layer's width, so a
checkpoint whose tensors disagree with its widths is refused before loading too.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence, Tuple, Union

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.neuron.attention import SVDNeuronAttention
from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP
from vllm_neuronmlp.neuron.sharding import ShardLoader


class CheckpointMappingError(cf.CheckpointFormatError):
    """A checkpoint tensor has no parameter of the variant to land in, or a parameter
    has no tensor; the message names them."""


def svd_mlps(model: torch.nn.Module) -> Dict[str, SVDNeuronMLP]:
    """module path -> our MLP, for every MLP the variant replaced."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDNeuronMLP)}


def svd_attentions(model: torch.nn.Module) -> Dict[str, SVDNeuronAttention]:
    """module path -> our attention, for every attention the variant replaced (format v3)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDNeuronAttention)}


def variant_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Every module the variant put in (MLPs and attentions), by path."""
    return {**svd_mlps(model), **svd_attentions(model)}


def _loaders(module: torch.nn.Module) -> Dict[str, ShardLoader]:
    """parameter name (within the module) -> its loader, for the projections' parameters (an
    attention's q/k norms are the stock modules, loaded by the stock mapping)."""
    return {f"{proj_name}.{leaf}": loader for proj_name, proj in module.named_children()
            for leaf, loader in getattr(proj, "loaders", {}).items()}


def param_plan(model: torch.nn.Module) -> Dict[str, str]:
    """parameter name -> checkpoint tensor name, for the projections of the modules the
    variant put in (the identity: each parameter is named like its tensor)."""
    return {f"{path}.{name}": f"{path}.{name}" for path, module in variant_modules(model).items()
            for name in _loaders(module)}


def _width(path: str, module: torch.nn.Module) -> str:
    if isinstance(module, SVDNeuronAttention):
        s = module.sharding
        return f"{path} with {s.heads} heads and {s.kv_heads} KV heads of {s.head_dim}"
    if module.narrowed:
        return f"{path} narrowed to width {module.intermediate_size} by {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_WIDTHS}"
    return f"{path} at intermediate_size {module.intermediate_size}"


def expected_shapes(model: torch.nn.Module) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """checkpoint tensor -> (its full shape, HF layout; what sets it), for the projections
    of the modules the variant put in (the shape each parameter's ShardLoader accepts)."""
    return {f"{path}.{name}": (tuple(loader.shape), _width(path, module))
            for path, module in variant_modules(model).items() for name, loader in _loaders(module).items()}


def check_tensors(checkpoint_tensors: Union[Iterable[str], Mapping[str, Sequence[int]]], model: torch.nn.Module,
                  source: str = "checkpoint") -> None:
    """Every tensor of a projection the variant replaced (an MLP's, or a factored attention's
    q/k/v/o) maps to exactly one of our parameters and every
    parameter has its tensor; given {tensor: shape}, each has the shape its parameter
    expects (at its layer's width). Otherwise CheckpointMappingError naming them."""
    shapes = checkpoint_tensors if isinstance(checkpoint_tensors, Mapping) else None
    tensors = set(checkpoint_tensors)
    plan = param_plan(model)
    missing = sorted(p for p, t in plan.items() if t not in tensors)
    if missing:
        raise CheckpointMappingError(
            f"{source}: the svd_neuron model variant needs tensor(s) {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''} ({len(missing)} in all), which the checkpoint lacks; "
            f"config.json {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_RANKS} lists their modules as factored "
            f"(svd_u/svd_v) or the variant expected a dense .weight (the other projections of a layer listed in "
            f"{cf.KEY_RANKS} or narrowed by {cf.KEY_WIDTHS})")
    claimed = set(plan.values())
    prefixes = tuple(f"{path}.{proj}." for path, module in variant_modules(model).items()
                     for proj, child in module.named_children() if hasattr(child, "loaders"))
    leftover = sorted(t for t in tensors if t.startswith(prefixes) and t not in claimed)
    if leftover:
        raise CheckpointMappingError(
            f"{source}: tensor(s) {leftover[:6]}{' ...' if len(leftover) > 6 else ''} would be left over: "
            f"no parameter of the svd_neuron model variant takes them (a .weight of a factored module, or a "
            f"misnamed factor); fix the checkpoint or its {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_RANKS}")
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
    empty = [f"{path}.{name}" for path, module in variant_modules(model).items()
             for name, loader in _loaders(module).items() if not loader.loaded]
    if empty:
        raise CheckpointMappingError(
            f"after loading, parameter(s) {empty[:6]} of the svd_neuron model variant were never filled "
            f"from the checkpoint; refusing to serve a half-loaded model")


def shard_checksums(model: torch.nn.Module) -> Dict[str, Union[int, float]]:
    """This rank's fingerprint of its loaded svd_neuron tensors, to compare across ranks:
    `split` over the tensors ranks hold different parts of (V of gate/up/q/k/v, U of down/o,
    dense weights; it differs between ranks), `replicated` over those every rank holds whole
    (the same on every rank). Summed from what each parameter's loader computed on the host
    while loading (sharding.fingerprint), so no loaded tensor is read again. `rank` and `tp`
    are the MLPs' tensor-parallel rank and degree (the attention's where no MLP was replaced)."""
    mlps = svd_mlps(model)
    split = replicated = 0.0
    rank, tp = 0, 1
    for module in list(svd_attentions(model).values()) + list(mlps.values()):
        if isinstance(module, SVDNeuronAttention):
            rank, tp = module.rank, module.world_size
        else:
            rank, tp = module.mlp_tp_rank, module.mlp_tp_size
        for loader in _loaders(module).values():
            value = loader.fingerprint or 0.0
            if loader.split:
                split += value
            else:
                replicated += value
    return {"rank": rank, "tp": tp, "mlps": len(mlps), "split": split, "replicated": replicated}
