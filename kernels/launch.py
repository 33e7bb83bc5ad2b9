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
    fused_xuv_nki(x, u, v)                      one low-rank linear through `xuv.fused_xuv`
    svd_mlp_nki(x, u_gate, ..., v_down)         the MLP through `mlp.up_gate` then `mlp.down`
    svd_mlp(x, ..., fallback=fn)                the same, or `fn()` when the kernels cannot run,
                                                said once in the log with the reason
    device_support(*tensors)                    whether they can run on these tensors, and why not
    entry_point()                               how this process launches kernels (logged once)
    wrap_for_device(kernel)                     any of our kernels, for benchmarks/neuron_check.py

The device path launches kernels the way vllm-neuron's native line launches its own
(vllm_neuron/functional/mlp.py): `wrap_nki` taken from the TorchNeuron runtime that is
installed (vllm-neuron's lite runtime `libtorch_neuronx_lite.nki.nki_hop` first, then
torch-neuronx's `torch_neuronx.nki_hop`), each kernel wrapped once per process, and the
wrapped kernel called directly with its grid inside the forward, `wrapped[(lnc,)](x=..., ...)`,
so `torch.compile(fullgraph=True)` traces the launch itself (no `nki_op` registration: the
lite runtime exports none, and vllm-neuron's own kernels do without). `lnc` is the logical
NeuronCore degree of the graph being compiled (an NKI kernel's degree must equal
neuronx-cc's `--lnc`, 2 by default on Trn2 and later).
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
                return_stats=False, activation="silu"):
    """The SVD MLP (act(x Ug Vg) * (x Uu Vu)) Ud Vd through the two NKI kernels
    (`mlp.up_gate` then `mlp.down`) in the CPU emulator; act is `activation`
    ("silu" or "gelu_tanh", `mlp.ACTIVATIONS`).

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
    h_t, st_up = run(blocking.up_gate, x2, u_gate, v_gate, u_up, v_up, target=target, activation=activation)
    y, st_down = run(blocking.down, h_t, u_down, v_down, target=target)
    y = np.asarray(y, dtype=np.float32).reshape(*lead, H)
    return (y, (st_up, st_down)) if return_stats else y


# ---------------------------------------------------------------- device
class DeviceUnavailable(RuntimeError):
    """The device path cannot run here; the message says why."""


# Where `wrap_nki` lives, in the order it is taken: vllm-neuron's native line installs its own
# lite TorchNeuron runtime and imports `wrap_nki` from it (vllm_neuron/functional/mlp.py and
# functional/attention/qkv.py: `from libtorch_neuronx_lite.nki.nki_hop import wrap_nki`); the
# full TorchNeuron package (torch-neuronx) keeps it in `torch_neuronx.nki_hop`.
RUNTIME_MODULES = ("libtorch_neuronx_lite.nki.nki_hop", "torch_neuronx.nki_hop")
NO_RUNTIME = "no TorchNeuron runtime with `wrap_nki` is importable"


class Runtime:
    """The TorchNeuron runtime this process launches kernels through: `wrap_nki` from
    `module`, and the launch grid (the logical NeuronCore degree) fixed once."""

    def __init__(self, module: str, wrap_nki, grid):
        self.module, self.wrap_nki, self.grid = module, wrap_nki, grid
        self.wrapped = {}

    def kernel(self, kernel):
        """`wrap_nki(kernel)`, once per kernel and process (outside any traced forward)."""
        name = kernel.__name__
        if name not in self.wrapped:
            self.wrapped[name] = self.wrap_nki(kernel.nki_kernel)
        return self.wrapped[name]

    def describe(self) -> str:
        return f"{self.module}.wrap_nki, called as wrapped[grid](...) with grid {self.grid}"


def _lnc_query(module: str):
    """TorchNeuron's own answer for the logical NeuronCore degree, where the runtime has one
    (torch_neuronx.utils.get_logical_neuron_cores); the lite runtime has none."""
    if not module.startswith("torch_neuronx"):
        return None
    try:
        from torch_neuronx.utils import get_logical_neuron_cores
    except Exception:
        return None
    return get_logical_neuron_cores


_runtime = None


def _torch_neuron_api() -> Runtime:
    """The runtime kernels are launched through (resolved once per process, and logged once).
    Raises DeviceUnavailable naming every module tried and why it was not taken."""
    global _runtime
    if _runtime is not None:
        return _runtime
    if not nki_compat.REAL_NKI:
        raise DeviceUnavailable("the Neuron SDK's `nki` (with nki.jit) is not importable")
    errors = []
    for module in RUNTIME_MODULES:
        try:
            mod = __import__(module, fromlist=["wrap_nki"])
        except Exception as e:   # absent, or a broken install
            errors.append(f"{module}: {type(e).__name__}: {e}")
            continue
        wrap_nki = getattr(mod, "wrap_nki", None)
        if wrap_nki is None:
            errors.append(f"{module}: has no wrap_nki")
            continue
        _runtime = Runtime(module, wrap_nki, (logical_nc_config(_lnc_query(module)),))
        logger.info("vllm-neuronmlp: NKI kernels are launched through %s", _runtime.describe())
        return _runtime
    raise DeviceUnavailable(f"{NO_RUNTIME} (vllm-neuron's lite runtime or torch-neuronx); tried "
                            + "; ".join(errors))


def entry_point() -> str:
    """How this process launches NKI kernels (the line logged once), or why it cannot."""
    try:
        return _torch_neuron_api().describe()
    except DeviceUnavailable as e:
        return f"none: {e}"


def logical_nc_config(get_logical_neuron_cores=None) -> int:
    """The logical NeuronCore degree kernels must be launched with (1 or 2).

    TorchNeuron's own answer when it has one; else $NEURON_LOGICAL_NC_CONFIG; else 2,
    neuronx-cc's default on Trn2 and later and the grid vllm-neuron's own kernels are
    launched with (`wrapped_mlp[2](...)`; the native line runs on Trn2/Trn3 only; on Trn1
    set NEURON_LOGICAL_NC_CONFIG=1)."""
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
    the Neuron device through the runtime's `wrap_nki`, with the launch grid equal to the
    logical NeuronCore degree. Our kernels do not split their work by program id, so on an
    LNC=2 graph both physical cores of the logical core compute the whole (identical)
    result; the grid must still equal the graph's LNC degree (compiler error NCC_EVRF066)."""
    runtime = _torch_neuron_api()
    wrapped = runtime.kernel(kernel)

    def launch_kernel(*tensors, **kwargs):
        return wrapped[runtime.grid](*tensors, **kwargs)

    return launch_kernel


def device_support(*tensors):
    """(True, "") if the device kernels can run on these torch tensors, else (False, why).
    Reads devices and dtypes only (no tensor data); wraps the kernels once."""
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
        runtime = _torch_neuron_api()
        for kernel in (blocking.up_gate, blocking.down, blocking.fused_xuv):
            runtime.kernel(kernel)
    except DeviceUnavailable as e:
        return False, str(e)
    return True, ""


# The launches below run inside the model's forward, i.e. inside vllm-neuron's
# torch.compile(fullgraph=True): the kernels were wrapped beforehand (`device_support`, called
# by the load entry point), and each call is `wrapped[grid](name=tensor, ...)`, as vllm-neuron
# calls its own kernels; the reshapes around them are plain aten ops.
def fused_xuv_nki(x, u, v):
    """y = (x @ u) @ v through `xuv.fused_xuv` (the selector's block) on the Neuron device.
    x [..., K], u [K, r], v [r, N], torch tensors on the device. Returns [..., N]."""
    runtime = _torch_neuron_api()
    lead = tuple(x.shape[:-1])
    y = runtime.kernel(blocking.fused_xuv)[runtime.grid](x=x.reshape(-1, x.shape[-1]), u=u, v=v)
    return y.reshape(*lead, v.shape[1])


def svd_mlp_nki(x, u_gate, v_gate, u_up, v_up, u_down, v_down, activation="silu"):
    """`mlp.up_gate` then `mlp.down` on the Neuron device.

    x [..., H] and the factors are torch tensors on the Neuron device (normally bf16).
    Returns [..., H] on the device. Raises DeviceUnavailable when the SDK or a TorchNeuron
    runtime with `wrap_nki` is missing."""
    runtime = _torch_neuron_api()
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    # the activation is a trace-time constant; SiLU, the kernel's default, is not passed
    act = {} if activation == "silu" else {"activation": activation}
    h_t = runtime.kernel(blocking.up_gate)[runtime.grid](x=x2, u_gate=u_gate, v_gate=v_gate, u_up=u_up,
                                                          v_up=v_up, **act)  # [I, S]: no transpose between
    y = runtime.kernel(blocking.down)[runtime.grid](h_t=h_t, u_down=u_down, v_down=v_down)   # [S, H]
    return y.reshape(*lead, y.shape[-1])


_fallbacks_logged = set()


def log_fallback_once(what: str, reason: str) -> None:
    """Say once per process (per kernel and reason) that the torch fallback runs."""
    key = (what, reason)
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        logger.warning("vllm-neuronmlp: %s runs its torch fallback instead of the NKI kernels: %s",
                       what, reason)


def svd_mlp(x, u_gate, v_gate, u_up, v_up, u_down, v_down, *, fallback, activation="silu"):
    """The MLP through the device kernels when they can run on these tensors, else
    `fallback()` (the caller's torch implementation), said once in the log."""
    ok, reason = device_support(x, u_gate, v_gate, u_up, v_up, u_down, v_down)
    if not ok:
        log_fallback_once("svd_mlp", reason)
        return fallback()
    return svd_mlp_nki(x, u_gate, v_gate, u_up, v_up, u_down, v_down, activation)
