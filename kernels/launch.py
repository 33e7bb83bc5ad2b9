"""Host-side entry points for the plugin: run the SVD MLP (or one low-rank linear)
through the NKI kernels, either in the CPU emulator (any machine) or on Trainium.

Factor orientation is the checkpoint's: y = (x @ U) @ V with U [in, r], V [r, out].
"""
import numpy as np

from . import mlp, xuv
from .sim import run
from .sim.core import BF16, FP32


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
    2-D x).
    """
    for name, a in (("x", x), ("u", u), ("v", v)):
        _check_array(name, a)
    x2, lead = _flatten_tokens(x)
    if x2.shape[0] == 0:
        return np.zeros((*lead, v.shape[1]), dtype=np.float32)
    y, _ = run(xuv.fused_xuv, x2, u, v, target=target, transpose_out=transpose_out,
               block_m=block_m)
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
    h_t, st_up = run(mlp.up_gate, x2, u_gate, v_gate, u_up, v_up, target=target)
    y, st_down = run(mlp.down, h_t, u_down, v_down, target=target)
    y = np.asarray(y, dtype=np.float32).reshape(*lead, H)
    return (y, (st_up, st_down)) if return_stats else y


def svd_mlp_nki(x, u_gate, v_gate, u_up, v_up, u_down, v_down):
    """The same two kernels through the real `nki.jit` on a Neuron device.

    x [..., H] and the factors are torch tensors already on the Neuron (XLA) device,
    normally bfloat16. Returns a torch tensor [..., H] on the device.

    Untested here: the Neuron SDK cannot be installed on the development machines, so
    this path has only been exercised by the emulator running the identical kernel
    source. Imports torch and the SDK lazily.
    """
    from . import nki_compat
    if not nki_compat.REAL_NKI:
        raise RuntimeError("svd_mlp_nki needs the Neuron SDK (`nki` with nki.jit); it is "
                           "not importable here -- use svd_mlp_sim for the CPU emulator")
    import torch  # noqa: F401  (the kernels receive torch tensors)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    h_t = mlp.up_gate(x2, u_gate, v_gate, u_up, v_up)
    y = mlp.down(h_t, u_down, v_down)
    return y.reshape(*lead, y.shape[-1])
