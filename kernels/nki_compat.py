"""Which NKI the kernels see: the real Neuron SDK when it is importable, the project's
CPU emulator (`kernels.sim`) otherwise. Kernels import `jit`, `nl` and `nisa` only
from here, so one kernel source serves both.

Set VLLM_NEURONMLP_FORCE_SIM=1 to use the emulator even when the SDK is installed.

`jit` wraps a kernel function in a `Kernel` that keeps the plain Python function
(`__nki_python_fn__`, which `sim.run` executes) next to the real `nki.jit` object
(`nki_kernel`, for the device or `nki.simulate`). Calling a `Kernel` goes to the real
`nki.jit` when the SDK is present and to the emulator otherwise.
"""
import os


def _load_real():
    if os.environ.get("VLLM_NEURONMLP_FORCE_SIM", "") not in ("", "0"):
        return None
    try:
        import nki as real_nki
        import nki.isa as real_isa
        import nki.language as real_language
    except Exception:   # absent, or PyPI's placeholder package
        return None
    if not (hasattr(real_nki, "jit") and hasattr(real_isa, "nc_matmul")
            and hasattr(real_language, "ndarray")):
        return None
    return real_nki, real_language, real_isa


_real = _load_real()
REAL_NKI = _real is not None

if REAL_NKI:
    nki, nl, nisa = _real
else:
    from .sim import isa as nisa          # noqa: F401
    from .sim import language as nl       # noqa: F401
    from .sim import nki_api as nki       # noqa: F401


class Kernel:
    """A kernel usable three ways: `sim.run(k, ...)`, `k(...)`, and (SDK present)
    `nki.simulate(k.nki_kernel)(...)` or a device launch."""

    def __init__(self, fn):
        self.__nki_python_fn__ = fn
        self.__name__ = fn.__name__
        self.__qualname__ = getattr(fn, "__qualname__", fn.__name__)
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        self.__wrapped__ = fn
        self.nki_kernel = nki.jit(fn) if REAL_NKI else None

    def __call__(self, *args, **kwargs):
        if REAL_NKI:
            return self.nki_kernel(*args, **kwargs)
        from .sim import core, nki_api
        if getattr(core._state, "ctx", None) is not None:   # called from inside a run
            return self.__nki_python_fn__(*args, **kwargs)
        return nki_api.run(self.__nki_python_fn__, *args, **kwargs)[0]

    def inline(self, *args, **kwargs):
        """The kernel's body called from inside another kernel being traced or emulated:
        its instructions join the caller's (no launch of its own)."""
        return self.__nki_python_fn__(*args, **kwargs)

    def __repr__(self):
        return f"<NKI kernel {self.__module__}.{self.__name__}>"


def jit(fn):
    """Decorator for kernels (see `Kernel`)."""
    return Kernel(fn)


def target_name() -> str:
    """Target name for the block-size model: "trn1" on NeuronCore-v2, otherwise "trn2"
    (NeuronCore-v3 numbers, the conservative choice for newer cores). Inside a kernel
    this asks the target being compiled for (or emulated)."""
    version = nisa.get_nc_version()
    return "trn1" if getattr(version, "value", version) == 2 else "trn2"
