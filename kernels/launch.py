"""The one way to call a kernel from torch or numpy: the CPU emulator or a Neuron device.

Factor orientation is the checkpoint's: y = (x @ U) @ V with U [in, r], V [r, out].

Every launch takes the block-size selector's block (`blocking.fused_xuv`, `blocking.up_gate`,
`blocking.down`: the kernels with `block_m` chosen while they are traced, for the target they
are traced for) unless a block is given.

Emulator (any machine; numpy in, numpy out):
    fused_xuv_sim(x, u, v)                      one low-rank linear through `xuv.fused_xuv`
    svd_mlp_sim(x, u_gate, v_gate, u_up, v_up, u_down, v_down)
                                                the MLP through `mlp.up_gate` then `mlp.down`

Device (Trainium; torch tensors on the Neuron device):
    svd_mlp(x, ..., fallback=fn)                the same two kernels, each launched through
                                                TorchNeuron's op wrapping of the real `nki.jit`
                                                kernel (`wrap_nki`, registered as a torch op
                                                with `nki_op`) on the logical NeuronCore
                                                config; `fn()` when the kernel cannot run,
                                                said once in the log with the reason.
    svd_mlp_nki(x, ...)                         the device launch alone (no fallback).
    wrap_for_device(kernel)                     any of our kernels, for benchmarks/neuron_check.py.

The device path follows TorchNeuron's documented pattern (docs/trainium.md): a kernel
wrapped once with `wrap_nki`, registered with `nki_op("ns::name", mutates_args={})`, and
launched as `wrapped[(lnc,)](...)` where `lnc` is the logical NeuronCore degree of the
graph being compiled (`torch_neuronx.utils.get_logical_neuron_cores()`; an NKI kernel's
degree must equal neuronx-cc's `--lnc`, which is 2 by default on Trn2 and later).
It has NOT run on hardware: the Neuron SDK cannot be installed on the development
machines. `benchmarks/neuron_check.py` is the command that checks it on a Trainium host.

This module imports numpy and the kernels only; torch and the SDK are imported lazily
inside the device functions, so the kernels package keeps its promise of no torch.
"""
import logging
import os

import numpy as np

from . import blocking, nki_compat, xuv
from .sim import run
from .sim.core import BF16, FP32

logger = logging.getLogger(__name__)

# torch device types TorchNeuron tensors carry: "neuron" (TorchNeuron / vllm-neuron's
# native line renames PrivateUse1), "privateuseone" (before the rename), "xla" (torch-xla).
NEURON_DEVICE_TYPES = ("neuron", "privateuseone", "xla")
DEVICE_DTYPES = ("bfloat16", "float16", "float32")
LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"


# ---------------------------------------------------------------- emulator
def _check_array(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in (FP32, BF16):
        raise TypeError(f"{name}: expected float32 or bfloat16, got {a.dtype}")


def _flatten_tokens(x):
    if x.ndim < 2:
        raise ValueError(f"x must have shape [..., features], got {x.shape}")
    lead = x.shape[:-1]
    return x.reshape(-1, x.shape[-1]), lead


def fused_xuv_sim(x, u, v, target="trn1", transpose_out=False, block_m=None):
    """y = (x @ u) @ v through `xuv.fused_xuv` in the emulator; float32 result.

    x [..., K] (float32 or bfloat16), u [K, r], v [r, N]; the kernel computes in x's
    dtype (u, v are cast on load). Returns [..., N] (or [N, S] if transpose_out with
    2-D x). block_m: tokens per row strip; None -> the block-size selector's choice.
    """
    for name, a in (("x", x), ("u", u), ("v", v)):
        _check_array(name, a)
    x2, lead = _flatten_tokens(x)
    if x2.shape[0] == 0:
        return np.zeros((*lead, v.shape[1]), dtype=np.float32)
    if block_m is None:
        y, _ = run(blocking.fused_xuv, x2, u, v, target=target, transpose_out=transpose_out)
    else:
        y, _ = run(xuv.fused_xuv, x2, u, v, target=target, block_m=block_m, transpose_out=transpose_out)
    y = np.asarray(y, dtype=np.float32)
    return y if transpose_out else y.reshape(*lead, v.shape[1])


def svd_mlp_sim(x, u_gate, v_gate, u_up, v_up, u_down, v_down, target="trn1",
                return_stats=False):
    """The SVD MLP (silu(x Ug Vg) * (x Uu Vu)) Ud Vd through the two NKI kernels
    (`mlp.up_gate` then `mlp.down`) in the CPU emulator.

    x [..., H] float32 or bfloat16 (the kernels compute in x's dtype; factors of
    another dtype are cast on load); u_gate [H, rg], v_gate [rg, I], u_up [H, ru],
    v_up [ru, I], u_down [I, rd], v_down [rd, H]. Returns [..., H] float32 (and the
    two kernels' `sim.Stats` if return_stats).
    """
    arrays = (("x", x), ("u_gate", u_gate), ("v_gate", v_gate), ("u_up", u_up),
              ("v_up", v_up), ("u_down", u_down), ("v_down", v_down))
    for name, a in arrays:
        _check_array(name, a)
    x2, lead = _flatten_tokens(x)
    H = x2.shape[1]
    if v_down.shape[1] != H:
        raise ValueError(f"v_down has {v_down.shape[1]} output features, x has {H}")
    if x2.shape[0] == 0:
        y = np.zeros((*lead, H), dtype=np.float32)
        return (y, None) if return_stats else y
    h_t, st_up = run(blocking.up_gate, x2, u_gate, v_gate, u_up, v_up, target=target)
    y, st_down = run(blocking.down, h_t, u_down, v_down, target=target)
    y = np.asarray(y, dtype=np.float32).reshape(*lead, H)
    return (y, (st_up, st_down)) if return_stats else y


# ---------------------------------------------------------------- device
class DeviceUnavailable(RuntimeError):
    """The device path cannot run here; the message says why."""


def _torch_neuron_api():
    """(wrap_nki, nki_op, get_logical_neuron_cores or None) from TorchNeuron.

    TorchNeuron (`torch-neuronx`, the native line's runtime) exports `wrap_nki` and
    `nki_op` from `torch_neuronx.nki_hop` (also re-exported by `torch_neuronx`) and
    `get_logical_neuron_cores` from `torch_neuronx.utils`. vllm-neuron's own "lite"
    runtime keeps `wrap_nki` in `libtorch_neuronx_lite.nki.nki_hop`."""
    if not nki_compat.REAL_NKI:
        raise DeviceUnavailable("the Neuron SDK's `nki` (with nki.jit) is not importable")
    errors = []
    for module in ("torch_neuronx.nki_hop", "torch_neuronx", "libtorch_neuronx_lite.nki.nki_hop"):
        try:
            mod = __import__(module, fromlist=["wrap_nki"])
        except Exception as e:   # absent, or a broken install
            errors.append(f"{module}: {type(e).__name__}: {e}")
            continue
        wrap_nki, nki_op = getattr(mod, "wrap_nki", None), getattr(mod, "nki_op", None)
        if wrap_nki is None or nki_op is None:
            errors.append(f"{module}: has no wrap_nki/nki_op")
            continue
        try:
            from torch_neuronx.utils import get_logical_neuron_cores
        except Exception:
            get_logical_neuron_cores = None
        return wrap_nki, nki_op, get_logical_neuron_cores
    raise DeviceUnavailable("TorchNeuron's kernel wrapping (wrap_nki / nki_op) is not importable: "
                            + "; ".join(errors))


def logical_nc_config(get_logical_neuron_cores=None) -> int:
    """The logical NeuronCore degree kernels must be launched with (1 or 2).

    TorchNeuron's own answer when it has one; else $NEURON_LOGICAL_NC_CONFIG; else 2,
    neuronx-cc's default on Trn2 and later (vllm-neuron's native line runs on Trn2/Trn3
    only; on Trn1 set NEURON_LOGICAL_NC_CONFIG=1)."""
    if get_logical_neuron_cores is not None:
        return int(get_logical_neuron_cores())
    env = os.environ.get(LNC_ENV, "").strip()
    if env:
        if env not in ("1", "2"):
            raise ValueError(f"{LNC_ENV}={env!r}: the logical NeuronCore degree is 1 or 2")
        return int(env)
    return 2


def wrap_for_device(kernel):
    """`fn(*tensors, **kwargs)` launching `kernel` (one of ours, a `nki_compat.Kernel`) on
    the Neuron device through TorchNeuron's `wrap_nki`, with the launch grid equal to the
    logical NeuronCore degree. Our kernels do not split their work by program id, so on an
    LNC=2 graph both physical cores of the logical core compute the whole (identical)
    result; the grid must still equal the graph's LNC degree (compiler error NCC_EVRF066)."""
    wrap_nki, _, get_lnc = _torch_neuron_api()
    wrapped = wrap_nki(kernel.nki_kernel)

    def launch_kernel(*tensors, **kwargs):
        return wrapped[(logical_nc_config(get_lnc),)](*tensors, **kwargs)

    return launch_kernel


_device_ops = None


def _register_device_ops():
    """Register our two MLP kernels as torch ops (once per process) through TorchNeuron's
    `nki_op`, so torch.compile sees each as one op whose lowering is the NKI kernel."""
    global _device_ops
    if _device_ops is not None:
        return _device_ops
    _, nki_op, _ = _torch_neuron_api()
    import torch

    up_gate_k, down_k = wrap_for_device(blocking.up_gate), wrap_for_device(blocking.down)

    @nki_op("vllm_neuronmlp::nki_up_gate", mutates_args={})
    def nki_up_gate(x: torch.Tensor, u_gate: torch.Tensor, v_gate: torch.Tensor,
                    u_up: torch.Tensor, v_up: torch.Tensor) -> torch.Tensor:
        return up_gate_k(x, u_gate, v_gate, u_up, v_up)

    @nki_op("vllm_neuronmlp::nki_down", mutates_args={})
    def nki_down(h_t: torch.Tensor, u_down: torch.Tensor, v_down: torch.Tensor) -> torch.Tensor:
        return down_k(h_t, u_down, v_down)

    _device_ops = (nki_up_gate, nki_down)
    return _device_ops


def device_support(*tensors):
    """(True, "") if the device kernels can run on these torch tensors, else (False, why)."""
    if not nki_compat.REAL_NKI:
        return False, "the Neuron SDK's `nki` (with nki.jit) is not importable"
    for t in tensors:
        device = getattr(t, "device", None)
        if device is None or device.type not in NEURON_DEVICE_TYPES:
            return False, f"tensors are on device {device}, not a Neuron device"
        dtype = str(getattr(t, "dtype", "")).replace("torch.", "")
        if dtype not in DEVICE_DTYPES:
            return False, f"dtype {dtype} (the kernels take {', '.join(DEVICE_DTYPES)})"
    try:
        _register_device_ops()
    except DeviceUnavailable as e:
        return False, str(e)
    return True, ""


def svd_mlp_nki(x, u_gate, v_gate, u_up, v_up, u_down, v_down):
    """`mlp.up_gate` then `mlp.down` on the Neuron device through TorchNeuron.

    x [..., H] and the factors are torch tensors on the Neuron device (normally bf16).
    Returns [..., H] on the device. Raises DeviceUnavailable when the SDK or TorchNeuron's
    kernel wrapping is missing."""
    nki_up_gate, nki_down = _register_device_ops()
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    h_t = nki_up_gate(x2, u_gate, v_gate, u_up, v_up)      # [I, S]: no transpose between the kernels
    y = nki_down(h_t, u_down, v_down)                        # [S, H]
    return y.reshape(*lead, y.shape[-1])


_fallbacks_logged = set()


def log_fallback_once(what: str, reason: str) -> None:
    """Say once per process (per kernel and reason) that the torch fallback runs."""
    key = (what, reason)
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        logger.warning("vllm-neuronmlp: %s runs its torch fallback instead of the NKI kernels: %s",
                       what, reason)


def svd_mlp(x, u_gate, v_gate, u_up, v_up, u_down, v_down, *, fallback):
    """The MLP through the device kernels when they can run on these tensors, else
    `fallback()` (the caller's torch implementation), said once in the log."""
    ok, reason = device_support(x, u_gate, v_gate, u_up, v_up, u_down, v_down)
    if not ok:
        log_fallback_once("svd_mlp", reason)
        return fallback()
    return svd_mlp_nki(x, u_gate, v_gate, u_up, v_up, u_down, v_down)
