"""The compression methods, registered in one place.

A method is a module defining a `methods.base.Method` subclass, whose
`capabilities` say what it supports, writes and costs, and `METHOD =
ThatClass()`; it is registered by one entry in `REGISTRY` below: name ->
(module, one line for `compress --help`). A module name starting with "." is
one of this package's; any other is imported as given (tests register a method
of their own that way). The modules are imported only when a method is asked
for, so `--help` stays free of torch.
"""
from __future__ import annotations

import importlib
from typing import Callable, List

REGISTRY = {
    "plain": (".plain", "truncated SVD of W, no calibration"),
    "whiten": (".whiten", "SVD-LLM input whitening"),
    "fisher": (".fisher", "input whitening plus loss-sensitivity (Fisher) weights on the output channels"),
    "error-aware": (".error_aware", "whitening fit on the inputs the compressed model really feeds each layer"),
    "nystrom": (".nystrom", "MLP channels by ridge leverage, Nyström-corrected down projection (MoDeGPT)"),
    "hybrid": (".hybrid", "channel selection and Fisher-weighted factors under one loss-based budget"),
}
DEFAULT_METHOD = "hybrid"  # best measured on SmolLM2 (benchmarks/results/channels_vs_factors.json)
ALLOCATIONS = ("uniform", "adaptive")
DEFAULT_ALLOCATION = "adaptive"


def get(name: str):
    """The registered `Method` object called `name`."""
    module, _help = REGISTRY[name]
    method = importlib.import_module(module, __name__).METHOD
    if method.name != name:
        raise RuntimeError(f"{module} defines method {method.name!r}, registered as {name!r}")
    return method


def names_where(predicate: Callable) -> List[str]:
    """The registered methods whose `capabilities` satisfy `predicate`, in registry order."""
    return [name for name in REGISTRY if predicate(get(name).capabilities)]
