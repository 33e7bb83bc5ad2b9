"""The emulator's stand-in for the top-level `nki` package: `jit`, `simulate`, and the
`language` / `isa` sub-modules."""
from . import isa, language
from .runner import jit, simulate

__all__ = ["jit", "simulate", "language", "isa"]
