"""Run each factored MLP as one op instead of three linears and an activation.

A quantization method sees one linear at a time, so the fusion hooks in one
level up: a global torch module-registration hook watches vLLM build each MLP.
Once a module holds the merged gate/up linear, the down linear (both served by
`SVDLinearMethod`) and an activation module that computes its family's
activation (`mlp_families`), that instance gets a forward calling `ops.svd_mlp`.
The decision is made once, while vLLM builds the model, never inside a forward
that torch.compile traces.

The per-linear path stays available and runs wherever the pattern does not hold
(a bias, an activation the fused op does not compute); tests check that both
paths agree, eager and compiled (docs/vllm.md).

Set VLLM_NEURONMLP_FUSED_MLP=0 to keep the per-linear path.
"""
from __future__ import annotations

import os
import types
from typing import Optional

import torch

from vllm_neuronmlp import mlp_families

FUSED_MLP_ENV = "VLLM_NEURONMLP_FUSED_MLP"
# Activations `ops.svd_mlp` computes (act(gate) * up), on every backend.
FUSED_ACTIVATIONS = (mlp_families.SILU, mlp_families.GELU_TANH)

_installed = False
# Every vLLM module name the hook reacts to, over all families.
_WATCHED = frozenset(n for f in mlp_families.FAMILIES for n in (f.vllm_gate_up, f.down, f.vllm_act))


def fusion_enabled() -> bool:
    return os.environ.get(FUSED_MLP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install_mlp_fusion() -> None:
    """Install the registration hook once per process."""
    global _installed
    if _installed:
        return
    torch.nn.modules.module.register_module_module_registration_hook(_on_submodule_registered)
    _installed = True


# Each activation as vLLM's custom-op registry names the module computing
# act(gate) * up (the names `--compilation-config custom_ops` uses), and the
# GELU approximation it must be set to.
VLLM_ACT_OPS = {mlp_families.SILU: ("silu_and_mul", None), mlp_families.GELU_TANH: ("gelu_and_mul", "tanh")}


def computes_activation(act: torch.nn.Module, activation: str) -> bool:
    """Whether vLLM's activation module `act` computes `activation(gate) * up`
    on a `[gate | up]` input: an instance of the op class vLLM registers for it
    (out-of-tree replacements subclass it), with the right approximation."""
    import vllm.model_executor.layers.activation  # noqa: F401  (registers the ops)
    from vllm.model_executor.custom_op import op_registry

    op_name, approximate = VLLM_ACT_OPS[activation]
    return isinstance(act, op_registry[op_name]) and getattr(act, "approximate", None) == approximate


def _svd_family(linear) -> Optional[mlp_families.MLPFamily]:
    """The MLP family of a linear served by SVDLinearMethod, else None."""
    from vllm_neuronmlp.linear_method import SVDLinearMethod

    method = getattr(linear, "quant_method", None)
    return method.family if isinstance(method, SVDLinearMethod) else None


def _on_submodule_registered(parent: torch.nn.Module, name: str, submodule):
    if name not in _WATCHED or not fusion_enabled() or hasattr(parent, "_svd_unfused_forward"):
        return None
    modules = {**parent._modules, name: submodule}
    names = next((f for f in mlp_families.FAMILIES if f.vllm_gate_up in modules), None)  # vLLM's names for them
    if names is None:
        return None
    gate_up, down, act = modules.get(names.vllm_gate_up), modules.get(names.down), modules.get(names.vllm_act)
    if down is None or act is None or _svd_family(gate_up) is None or _svd_family(down) is None:
        return None  # not (yet) a complete factored MLP; a later registration completes it
    family = _svd_family(gate_up)  # the model's own family, as the quant config resolved it
    if family.activation not in FUSED_ACTIVATIONS or not computes_activation(act, family.activation):
        return None
    if len(gate_up.svd_ranks) != 2 or getattr(gate_up, "bias", None) is not None \
            or getattr(down, "bias", None) is not None:
        return None
    parent._svd_unfused_forward = parent.forward
    parent._svd_family = family
    parent.forward = types.MethodType(fused_mlp_forward, parent)
    return None


def fused_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`down(act(gate(x)) * up(x))` (the family's activation) as one `svd_mlp` op, all-reduced like the
    row-parallel down."""
    from vllm_neuronmlp.ops import svd_mlp

    family = self._svd_family
    gate_up, down = getattr(self, family.vllm_gate_up), getattr(self, family.down)
    y = svd_mlp(x, gate_up.svd_u, gate_up.svd_v, down.svd_u, down.svd_v, gate_up.svd_ranks[0], gate_up.svd_backend,
                family.activation)
    if down.reduce_results and down.tp_size > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        y = tensor_model_parallel_all_reduce(y)
    return y


def count_fused_mlps(model: torch.nn.Module) -> int:
    """How many MLPs of a loaded model run as the fused op (for `LLM.apply_model`)."""
    return sum(1 for m in model.modules() if hasattr(m, "_svd_unfused_forward"))
