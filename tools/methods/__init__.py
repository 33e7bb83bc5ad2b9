"""The compression methods, registered in one place.

A method is a module of this package defining a `methods.base.Method`
subclass and `METHOD = ThatClass()`; it is registered by one entry in
`REGISTRY` below: name -> (module, one line for `compress --help`). The
modules are imported only when a method runs, so `--help` stays free of torch.
"""
from __future__ import annotations

import importlib

REGISTRY = {
    "plain": ("plain", "truncated SVD of W, no calibration"),
    "whiten": ("whiten", "SVD-LLM input whitening"),
    "fisher": ("fisher", "input whitening plus loss-sensitivity (Fisher) weights on the output channels"),
    "error-aware": ("error_aware", "whitening fit on the inputs the compressed model really feeds each layer"),
    "nystrom": ("nystrom", "MLP channels by ridge leverage, Nyström-corrected down projection (MoDeGPT)"),
    "hybrid": ("hybrid", "channel selection and Fisher-weighted factors under one loss-based budget"),
}
METHODS = tuple(REGISTRY)
DEFAULT_METHOD = "hybrid"  # best measured on SmolLM2 (benchmarks/results/channels_vs_factors.json)
ALLOCATIONS = ("uniform", "adaptive")
DEFAULT_ALLOCATION = "adaptive"


def get(name: str):
    """The registered `Method` object called `name`."""
    module, _help = REGISTRY[name]
    method = importlib.import_module(f"{__name__}.{module}").METHOD
    if method.name != name:
        raise RuntimeError(f"methods/{module}.py defines method {method.name!r}, registered as {name!r}")
    return method
