"""Run each factored MLP as one op instead of three linears and an activation.

A quantization method sees one linear at a time, so the fusion hooks in one
level up: a global torch module-registration hook watches for a module that
gains both a `gate_up_proj` and a `down_proj` served by `SVDLinearMethod`, i.e.
the MLP of a Llama/Qwen-style model (any vLLM model built that way), and gives
that instance a forward that calls `ops.svd_mlp`. The per-linear path stays
available (and is what runs when the MLP does not fit the pattern: a bias, an
activation other than SiLU-and-mul), and tests check that both agree.

Set VLLM_NEURONMLP_FUSED_MLP=0 to keep the per-linear path.
"""
from __future__ import annotations

import os
import types

import torch

FUSED_MLP_ENV = "VLLM_NEURONMLP_FUSED_MLP"

_installed = False


def fusion_enabled() -> bool:
    return os.environ.get(FUSED_MLP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install_mlp_fusion() -> None:
    """Install the registration hook once per process."""
    global _installed
    if _installed:
        return
    torch.nn.modules.module.register_module_module_registration_hook(_on_submodule_registered)
    _installed = True


def _is_factored(linear) -> bool:
    from vllm_neuronmlp.linear_method import SVDLinearMethod

    return isinstance(getattr(linear, "quant_method", None), SVDLinearMethod)


def _on_submodule_registered(parent: torch.nn.Module, name: str, submodule):
    if name not in ("gate_up_proj", "down_proj") or not fusion_enabled():
        return None
    gate_up = submodule if name == "gate_up_proj" else parent._modules.get("gate_up_proj")
    down = submodule if name == "down_proj" else parent._modules.get("down_proj")
    if gate_up is None or down is None or not (_is_factored(gate_up) and _is_factored(down)):
        return None
    if hasattr(parent, "_svd_unfused_forward") or len(gate_up.svd_ranks) != 2 or getattr(gate_up, "bias", None) is not None \
            or getattr(down, "bias", None) is not None:
        return None
    parent._svd_unfused_forward = parent.forward
    parent.forward = types.MethodType(fused_mlp_forward, parent)
    return None


def _act_is_silu_and_mul(mlp: torch.nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return act is not None and type(act).__name__ == "SiluAndMul"


def fused_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`down(silu(gate(x)) * up(x))` as one `svd_mlp` op, all-reduced like the row-parallel down."""
    if not _act_is_silu_and_mul(self):  # built with another activation: keep the reference path
        return self._svd_unfused_forward(x)
    from vllm_neuronmlp.ops import svd_mlp
    from vllm_neuronmlp.ops import select_backend

    gate_up, down = self.gate_up_proj, self.down_proj
    backend = getattr(self, "_svd_backend", None)
    if backend is None:  # resolved once per MLP, on the device its weights live on
        backend = self._svd_backend = select_backend(gate_up.svd_u.device)
    y = svd_mlp(x, gate_up.svd_u, gate_up.svd_v, down.svd_u, down.svd_v, gate_up.svd_ranks[0], backend)
    if down.reduce_results and down.tp_size > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        y = tensor_model_parallel_all_reduce(y)
    return y


def count_fused_mlps(model: torch.nn.Module) -> int:
    """How many MLPs of a loaded model run as the fused op (for `LLM.apply_model`)."""
    return sum(1 for m in model.modules() if hasattr(m, "_svd_unfused_forward"))
