"""The emulator as the top-level `nki` package: `jit`, `simulate`, the `language` / `isa`
sub-modules, and `run` (exported as `sim.run`), which executes a kernel through
`runner.execute`.

When the real Neuron SDK is importable, kernel modules have bound `nki`, `nki.language`
and `nki.isa` to it (`kernels/nki_compat.py`); for the duration of an emulated run those
names are pointed at this module and its `language` / `isa`, and put back after. This
module is the emulator's `nki`, so it is also what the real `nki` is replaced by.
"""
import sys

from . import core, isa, language
from .runner import execute, python_function

__all__ = ["jit", "simulate", "run", "language", "isa"]

SDK_MODULES = ("nki", "nki.language", "nki.isa")


class _SdkNamesPointedAtTheEmulator:
    """Inside the block, every module global bound to the real `nki`, `nki.language` or
    `nki.isa` is rebound to the emulator's stand-in (the SDK's own modules and the
    emulator's are left alone); on exit the SDK's modules are put back."""

    def __enter__(self):
        self.saved = []
        real = {name: sys.modules.get(name) for name in SDK_MODULES}
        if real["nki"] is None:
            return self
        stand_in = {id(real["nki"]): sys.modules[__name__], id(real.get("nki.language")): language,
                    id(real.get("nki.isa")): isa}
        reals = [m for m in real.values() if m is not None]
        own = __name__.rsplit(".", 1)[0]
        for mod in list(sys.modules.values()):
            name = getattr(mod, "__name__", "") or ""
            if name == "nki" or name.startswith("nki.") or name.startswith(own):
                continue
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict):
                continue
            for k, v in list(d.items()):
                for m in reals:
                    if v is m:
                        self.saved.append((d, k, v))
                        d[k] = stand_in[id(m)]
        return self

    def __exit__(self, *exc):
        for d, k, v in self.saved:
            d[k] = v
        return False


def run(kernel, *arrays, target="trn1", count_only=False, spill=True, **kernel_kwargs):
    """Execute `kernel` in the emulator.

    arrays: numpy float32 / bfloat16 arrays (or `sim.spec` placeholders when
    count_only); kernel_kwargs are passed to the kernel unchanged. spill=False refuses
    SBUF overflow (SbufCapacityError) instead of charging spill traffic.
    Returns (outputs, stats): outputs as numpy arrays (a tuple when the kernel returns
    several; None in count-only mode), stats a `Stats`.
    """
    with _SdkNamesPointedAtTheEmulator():
        return execute(kernel, *arrays, target=target, count_only=count_only, spill=spill,
                       **kernel_kwargs)


class SimKernel:
    """What the emulator's `nki.jit` returns: calling it runs the kernel (values mode,
    target trn1 unless a run is already active) and returns its outputs."""

    def __init__(self, fn, target="trn1"):
        self.__nki_python_fn__ = fn
        self.target = target
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if getattr(core._state, "ctx", None) is not None:
            return self.__nki_python_fn__(*args, **kwargs)
        outputs, _ = run(self.__nki_python_fn__, *args, target=self.target, **kwargs)
        return outputs


def jit(fn=None, **options):
    if fn is None:
        return lambda f: SimKernel(f)
    return SimKernel(fn)


def simulate(kernel):
    """Like `nki.simulate(kernel)`: a callable running it on numpy arrays."""
    fn = python_function(kernel)
    return lambda *args, **kwargs: run(fn, *args, **kwargs)[0]
