"""Run a callback right after a module of another package is imported.

The plugin adapts two packages it must not import eagerly: transformers (our
quantizer joins its registry, `vllm_neuronmlp/__init__.py`) and vllm-neuron (its
native model classes are patched, `vllm_neuronmlp/neuron/integrate.py`). Either may
be imported before or after us, by any process, so both go through `call_after_import`.

Imports nothing of the project.
"""
from __future__ import annotations

import importlib.machinery
import sys
from typing import Callable


class _AfterImport:
    """A meta-path finder that runs `callback(module)` right after `fullname` executes."""

    def __init__(self, fullname: str, callback: Callable):
        self.fullname, self.callback = fullname, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_callback(module):
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_callback
        return spec


def call_after_import(fullname: str, callback: Callable) -> None:
    """`callback(module)` now if `fullname` is already imported, else right after it is
    (once per fullname and process: a second request for the same module is ignored)."""
    module = sys.modules.get(fullname)
    if module is not None:
        callback(module)
    elif not any(isinstance(f, _AfterImport) and f.fullname == fullname for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(fullname, callback))
