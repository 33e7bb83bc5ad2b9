"""Which vllm-neuron is installed, told from what is on disk (nothing is imported).

vllm-neuron has two lines (docs/trainium.md):

* 0.2.x: models from NxD Inference (`vllm_neuron/worker/neuronx_distributed_model_loader.py`
  in tag 0.2.0 of vllm-project/vllm-neuron). Its platform turns vLLM's quantization check
  into a no-op, so an svd_neuron checkpoint would be served as if dense. We refuse it.
* the native line, 0.21 and later: models written inside the plugin on
  `vllm_neuron.functional` (`vllm_neuron/functional/`, `vllm_neuron/model/registry.py`,
  `vllm_neuron/model/llama3/model.py`, `vllm_neuron/model/qwen3/model.py`). Our model
  variant hooks into it (`vllm_neuronmlp/neuron/integrate.py`).

Written against vllm-neuron tag v0.21.0.1.0.0 (commit ae6c10e, vLLM 0.24, Neuron SDK with
NKI 0.3+); the upstream snapshot reachable here stops at 0.2.0, so the native-line files
were read in public copies and forks of that line (docs/trainium.md lists them with their
commits).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

DIST_NAME = "vllm-neuron"
PACKAGE = "vllm_neuron"
NATIVE_MIN_VERSION = (0, 21)
WRITTEN_AGAINST = "vllm-neuron 0.21 (tag v0.21.0.1.0.0) with vLLM 0.24"
SUPPORTED = (f"vllm-neuron >= {NATIVE_MIN_VERSION[0]}.{NATIVE_MIN_VERSION[1]} (the native line, "
             f"written against {WRITTEN_AGAINST}) serving Llama or Qwen3 checkpoints")

# Files that identify each line, relative to the vllm_neuron package directory.
NXDI_MARKER = os.path.join("worker", "neuronx_distributed_model_loader.py")
NATIVE_MARKERS = ("functional", os.path.join("model", "registry.py"))

ABSENT, NXDI, NATIVE, UNKNOWN = "absent", "nxdi", "native", "unknown"
LINE_NAMES = {
    NXDI: "the 0.2.x line (models from NxD Inference)",
    NATIVE: "the native line (models on vllm_neuron.functional)",
    UNKNOWN: "a vllm-neuron layout this plugin does not recognise",
}


class NeuronStackError(RuntimeError):
    """An svd_neuron checkpoint cannot be served on the installed Neuron stack; the
    message names the stack, the version found and what is supported."""


class HookTargetError(NeuronStackError):
    """An upstream class the variant hooks lacks what the hook relies on (a method, an
    attribute, a registry entry); the message names the class path, what is missing and
    the vllm-neuron found, so a renamed upstream method fails loudly, never silently."""


@dataclass(frozen=True)
class NeuronStack:
    line: str                       # ABSENT, NXDI, NATIVE or UNKNOWN
    version: Optional[str] = None   # the vllm-neuron distribution's version, if known
    location: Optional[str] = None  # the vllm_neuron package directory

    @property
    def installed(self) -> bool:
        return self.line != ABSENT

    def describe(self) -> str:
        version = self.version or "version unknown"
        return f"vllm-neuron {version} at {self.location}, {LINE_NAMES.get(self.line, self.line)}"

    def has_file(self, relative: str) -> bool:
        return self.location is not None and os.path.exists(os.path.join(self.location, relative))


def class_path(obj) -> str:
    """`module.QualName` of a class (or of an object's class), as refusals name them."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def version_tuple(version: Optional[str]) -> Tuple[int, ...]:
    """Leading numeric components: "0.21.0.1.0.0" -> (0, 21, 0, 1, 0, 0); "0.2.0rc1" -> (0, 2, 0)."""
    out = []
    for part in (version or "").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def detect_stack() -> NeuronStack:
    """Find vllm-neuron without importing it (its import initialises the Neuron backend)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return NeuronStack(ABSENT)
    location = list(spec.submodule_search_locations)[0]
    try:
        version = importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        version = None
    probe = NeuronStack(UNKNOWN, version, location)
    if all(probe.has_file(m) for m in NATIVE_MARKERS):
        line = NATIVE
        if version is not None and version_tuple(version)[:2] < NATIVE_MIN_VERSION:
            line = UNKNOWN  # native layout under a version number we did not write against
    elif probe.has_file(NXDI_MARKER) or (version is not None and version_tuple(version)[:2] < NATIVE_MIN_VERSION):
        line = NXDI
    else:
        line = UNKNOWN
    return NeuronStack(line, version, location)


def refusal_message(stack: NeuronStack, reason: str = "") -> str:
    """Why an svd_neuron checkpoint is refused on `stack`, and what would serve it."""
    why = {
        NXDI: ("its models come from NxD Inference, which never calls vLLM quantization methods, and its "
               "platform disables vLLM's quantization check: the checkpoint would load as a dense model "
               "with missing weights"),
        UNKNOWN: "vllm-neuronmlp does not know how to install its model variant into this layout",
        NATIVE: "vllm-neuronmlp's model variant cannot be installed into it",
    }.get(stack.line, "")
    detail = f" ({reason})" if reason else ""
    return (f"svd_neuron checkpoints cannot be served on {stack.describe()}: {why}{detail}. "
            f"Supported: {SUPPORTED}; on CPU, plain vLLM serves them (docs/trainium.md).")
