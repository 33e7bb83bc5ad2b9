"""How the Trainium variant computes a factored projection or a factored MLP, by the path
its load entry point chose (never decided inside the compiled forward):

    "kernels"  the NKI kernels on the Neuron device, launched as vllm-neuron launches its
               own (kernels/launch.py: `wrapped[grid](...)` inside the forward): the fused
               XUV kernel for one projection, `mlp.up_gate` + `mlp.down` for an MLP;
    "nki-sim"  the same kernels on the project's CPU emulator (numpy; eager only: for
               tests and `VLLM_NEURONMLP_BACKEND=nki-sim` on CPU);
    "torch"    plain aten ops, `(x @ U) @ V` (the fallback where the kernels cannot run).

On the Neuron path the forward therefore traces into aten ops plus the kernel launches:
no custom op of ours (the CPU vLLM path keeps `ops.svd_mlp`, an opaque op, for its own
reasons; vllm-neuron's torch.compile backend lowers aten graphs, and an opaque Python op
may not lower).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vllm_neuronmlp import ops

KERNELS, NKI_SIM, TORCH = "kernels", "nki-sim", "torch"


def choose_path(device: torch.device, probe: Optional[torch.Tensor], what: str) -> str:
    """The path for tensors on `device` ($VLLM_NEURONMLP_BACKEND, else auto); `probe` (a
    loaded factor, None before the weights) tells whether the kernels can run on it. A
    fallback on a Neuron host is logged once with the reason. Reads devices and dtypes only."""
    from vllm_neuronmlp.kernels import launch

    path = ops.select_backend(device)
    if path != "nki":
        return path
    ok, reason = launch.device_support(probe) if probe is not None else (
        False, "compiled before its weights (load_weights_lite): no factor is on a device yet")
    if not ok:
        launch.log_fallback_once(what, reason)
    return KERNELS if ok else TORCH


def _sim_in(t: torch.Tensor):
    return ops._to_numpy(t)


def xuv(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, path: str) -> torch.Tensor:
    """(x @ u) @ v for x [..., K], u [K, r], v [r, N]."""
    from vllm_neuronmlp.kernels import launch

    if path == KERNELS:
        return launch.fused_xuv_nki(x, u, v)
    if path == NKI_SIM:
        return torch.from_numpy(launch.fused_xuv_sim(_sim_in(x), _sim_in(u), _sim_in(v))).to(x.dtype)
    return (x @ u) @ v      # ops.factored_linear's one-module case, written out: torch.fx traces it as is


def svd_mlp(x: torch.Tensor, u_gate, v_gate, u_up, v_up, u_down, v_down, path: str,
            act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(act(x Ug Vg) * (x Uu Vu)) Ud Vd for a fully factored MLP (the kernels: SiLU only)."""
    from vllm_neuronmlp.kernels import launch

    if path == KERNELS:
        return launch.svd_mlp_nki(x, u_gate, v_gate, u_up, v_up, u_down, v_down)
    if path == NKI_SIM:
        arrays = [_sim_in(t) for t in (x, u_gate, v_gate, u_up, v_up, u_down, v_down)]
        return torch.from_numpy(launch.svd_mlp_sim(*arrays)).to(x.dtype)
    h = act(xuv(x, u_gate, v_gate, TORCH)) * xuv(x, u_up, v_up, TORCH)
    return xuv(h, u_down, v_down, TORCH)
