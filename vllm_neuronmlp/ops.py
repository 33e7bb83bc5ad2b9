"""The fused SVD MLP op, `svd_mlp`, and the one place that picks its backend.

    y = ( act(x U_g V_g) * (x U_u V_u) ) U_d V_d

act is the family's gate activation (mlp_families): SiLU, or GELU with the tanh
approximation (Gemma, Gemma 3); every backend computes both.

Backends:
- `torch`:   PyTorch GEMMs on whatever device vLLM runs on (CPU here). The first
             stage is one GEMM `x @ [U_g | U_u]`; each V multiplies only its own
             slice, so no zero block is ever multiplied.
- `nki`:     the NKI kernels (`vllm_neuronmlp.kernels`) on Trainium, launched by
             kernels/launch.py through TorchNeuron's `wrap_nki`; needs
             the Neuron SDK and tensors on a Neuron device.
- `nki-sim`: the same NKI kernels run by the project's CPU NKI emulator. Slow;
             it proves the kernels compute the right thing inside vLLM.

The backend is chosen by `VLLM_NEURONMLP_BACKEND` (`auto`, `torch`, `nki`,
`nki-sim`); `auto` (the default) takes `nki` for tensors on a Neuron device when
the SDK is importable and `torch` otherwise.

The op is registered with torch.library as `vllm_neuronmlp::svd_mlp`, so the
whole MLP is one opaque node for torch.compile (the emulator runs numpy, which
must not be traced).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from vllm_neuronmlp.mlp_families import ACTIVATIONS, SILU  # the activation names the fused op computes

BACKEND_ENV = "VLLM_NEURONMLP_BACKEND"
BACKENDS = ("torch", "nki", "nki-sim")
from vllm_neuronmlp.kernels.launch import NEURON_DEVICE_TYPES  # noqa: E402  (one definition)


class BackendError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def nki_available() -> bool:
    """True only when the real Neuron SDK's `nki` is importable. PyPI holds a placeholder
    package named `nki`, so the name alone proves nothing: `nki_compat.REAL_NKI` checks
    for what the SDK provides (nki.jit, nki.isa.nc_matmul, nki.language.ndarray)."""
    from vllm_neuronmlp.kernels import nki_compat

    return nki_compat.REAL_NKI


def select_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """Resolve `requested` (default: $VLLM_NEURONMLP_BACKEND, else auto) for `device`."""
    name = (requested if requested is not None else os.environ.get(BACKEND_ENV, "auto")).strip().lower()
    if name in ("", "auto"):
        return "nki" if device.type in NEURON_DEVICE_TYPES and nki_available() else "torch"
    if name not in BACKENDS:
        raise BackendError(f"{BACKEND_ENV}={name!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    if name == "nki":
        if not nki_available():
            raise BackendError(
                f"{BACKEND_ENV}=nki needs the Neuron SDK (the `nki` package), which is not importable here; "
                f"use nki-sim to run the same kernels on the CPU emulator")
        if device.type not in NEURON_DEVICE_TYPES:
            raise BackendError(f"{BACKEND_ENV}=nki needs tensors on a Neuron device, got device {device}")
    if name == "nki-sim" and device.type != "cpu":
        raise BackendError(f"{BACKEND_ENV}=nki-sim runs on CPU tensors, got device {device}")
    return name


# ---------------------------------------------------------------- backends


def _gate_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """act(h), in place where torch allows it."""
    if activation == SILU:
        return F.silu(h, inplace=True)
    return F.gelu(h, approximate="tanh")


def _mlp_torch(x: torch.Tensor, gate_up_u: torch.Tensor, gate_up_v: torch.Tensor,
               down_u: torch.Tensor, down_v: torch.Tensor, gate_rank: int, activation: str = SILU) -> torch.Tensor:
    t = x @ gate_up_u                       # [S, r_g + r_u]: both first stages in one GEMM
    h = t[:, :gate_rank] @ gate_up_v[:gate_rank]
    up = t[:, gate_rank:] @ gate_up_v[gate_rank:]
    h = _gate_activation(h, activation).mul_(up)    # [S, I_local]
    return (h @ down_u) @ down_v


def _to_numpy(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.detach().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float16:
        return t.detach().float().numpy()
    return t.detach().contiguous().numpy()


def _mlp_nki_sim(x, gate_up_u, gate_up_v, down_u, down_v, gate_rank: int, activation: str = SILU) -> torch.Tensor:
    from vllm_neuronmlp.kernels import launch

    a = [_to_numpy(t) for t in (x, gate_up_u, gate_up_v, down_u, down_v)]
    xs, guu, guv, du, dv = a
    y = launch.svd_mlp_sim(xs, guu[:, :gate_rank], guv[:gate_rank], guu[:, gate_rank:], guv[gate_rank:], du, dv,
                           activation=activation)
    return torch.from_numpy(y).to(x.dtype)


def _mlp_nki(x, gate_up_u, gate_up_v, down_u, down_v, gate_rank: int, activation: str = SILU) -> torch.Tensor:
    """The kernels on the Neuron device through the one launcher (kernels/launch.py), which
    falls back to `_mlp_torch` (saying so once in the log) when they cannot run."""
    from vllm_neuronmlp.kernels import launch

    return launch.svd_mlp(x, gate_up_u[:, :gate_rank].contiguous(), gate_up_v[:gate_rank],
                          gate_up_u[:, gate_rank:].contiguous(), gate_up_v[gate_rank:], down_u, down_v,
                          fallback=lambda: _mlp_torch(x, gate_up_u, gate_up_v, down_u, down_v, gate_rank, activation),
                          activation=activation)


_BACKEND_FUNCS = {"torch": _mlp_torch, "nki-sim": _mlp_nki_sim, "nki": _mlp_nki}


@torch.library.custom_op("vllm_neuronmlp::svd_mlp", mutates_args=())
def svd_mlp_op(x: torch.Tensor, gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor,
               down_v: torch.Tensor, gate_rank: int, backend: str, activation: str) -> torch.Tensor:
    shape = x.shape
    y = _BACKEND_FUNCS[backend](x.reshape(-1, shape[-1]), gate_up_u, gate_up_v, down_u, down_v, gate_rank,
                                activation)
    return y.reshape(*shape[:-1], down_v.shape[1])


@svd_mlp_op.register_fake
def _svd_mlp_fake(x, gate_up_u, gate_up_v, down_u, down_v, gate_rank, backend, activation):
    return x.new_empty(*x.shape[:-1], down_v.shape[1])


def svd_mlp(x: torch.Tensor, gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor,
            down_v: torch.Tensor, gate_rank: int, backend: Optional[str] = None,
            activation: str = SILU) -> torch.Tensor:
    """The factored MLP of one (tensor-parallel shard of a) layer.

    x [.., H]; gate_up_u [H, r_g + r_u] (= [U_g | U_u]); gate_up_v [r_g + r_u, I]
    (= [V_g ; V_u]); down_u [I, r_d]; down_v [r_d, H]; activation "silu" or
    "gelu_tanh" (the family's, mlp_families). Returns [.., H], the shard's partial
    sum under tensor parallelism (the caller all-reduces).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"svd_mlp: activation {activation!r} is not one of {ACTIVATIONS}")
    return svd_mlp_op(x, gate_up_u, gate_up_v, down_u, down_v, gate_rank,
                      backend or select_backend(x.device), activation)


# ---------------------------------------------------------------- one factored linear
def factored_linear(x: torch.Tensor, u: torch.Tensor, v: Union[torch.Tensor, Sequence[torch.Tensor]],
                    rank_offsets: Optional[Sequence[int]] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`(x @ U) @ V`: one linear stored as its two factors (U [in, r], V [r, out]).

    The one implementation of the factored product, used by vLLM's per-linear
    method, transformers' `SVDLinear` and the compression tools. Never forms the
    dense `U V`. U may hold several packed modules side by side: then V is either
    their V's stacked by rows (one output size) with `rank_offsets` ([0, r_0,
    r_0 + r_1, ...]), or a sequence of the modules' V's ([r_k, out_k] each, their
    row counts giving the offsets; output sizes may differ, as q and k/v do). Each
    module's slice of `x U` meets only its own V, and the outputs are concatenated.
    """
    t = x @ u
    if isinstance(v, torch.Tensor):
        if rank_offsets is None or len(rank_offsets) <= 2:
            y = t @ v
            return y if bias is None else y + bias
        v = [v[a:b] for a, b in zip(rank_offsets[:-1], rank_offsets[1:])]
    if len(v) == 1:
        y = t @ v[0]
    else:
        parts, lo = [], 0
        for vk in v:
            parts.append(t[..., lo:lo + vk.shape[0]] @ vk)
            lo += vk.shape[0]
        y = torch.cat(parts, dim=-1)
    return y if bias is None else y + bias
