"""What an interrupted `compress` leaves behind so that `--resume` can go on.

A run keeps its expensive intermediate results in `OUT.resume/` beside the
output (never inside it, never in the source):

    state.json            which source, which options, what is finished
    statistics/           the method's statistics: per decoder layer while the
                          streamed passes run (the Fisher pass's stored layer
                          inputs and its running gradient, each finished layer's
                          Fisher weights, spectra and channel order), then the
                          whole statistics object once complete
    layers/               the output tensors of every finished decoder layer
                          (safetensors shards that never span two layers), the
                          tensors outside the layers, and the factor pass's
                          streamed hidden states after the last finished layer

Every file is written under a temporary name and renamed, and state.json is
rewritten (the same way) only after the files it lists exist, so a run killed
at any instant leaves a state that is consistent. The checkpoint itself is
assembled at the end in a staging directory (writer.StagingDir) from hard
links to these shards and renamed to OUT; only then is OUT.resume removed.

Statistics do not depend on the ratio, the allocation or the output options:
a resumed run with other values of those reuses the statistics and recomputes
the layers (`statistics_key` vs `layers_key`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from vllm_neuronmlp import __version__ as TOOL_VERSION
from vllm_neuronmlp.tools.errors import UserError

SUFFIX = ".resume"
STATE_FILE = "state.json"
STATE_VERSION = 1
# the entries of state.json that describe the written layers (dropped with them when the options changed)
LAYER_ENTRIES = ("layers_done", "writer", "outside_layers_done", "jitter_modules")


def state_dir_for(out_path: str) -> str:
    """Where the resume state of a run writing `out_path` lives."""
    return os.path.abspath(os.path.normpath(out_path)) + SUFFIX


def source_fingerprint(src) -> Dict[str, Any]:
    """What identifies a source checkpoint: its config and the name, size and
    modification time of every safetensors file (reading the weights to hash
    them would take minutes at 8B)."""
    files = sorted(set(src.files.values()))
    return {"path": os.path.abspath(src.path),
            "config_sha256": hashlib.sha256(json.dumps(src.config, sort_keys=True).encode()).hexdigest(),
            "files": [[os.path.basename(f), os.path.getsize(f), int(os.stat(f).st_mtime)] for f in files]}


def statistics_key(src, opts, method) -> Dict[str, Any]:
    """What a method's statistics depend on (JSON-able): the source, the method's
    own `statistics_key(opts)`, the calibration, the damping, the tool version
    and the scope. The one key of the statistics, both in the resume state (a
    resumed run reuses them when equal) and in the in-process cache a benchmark
    shares between calls (`cache_key`)."""
    key = method.statistics_key(opts)
    return {"source": source_fingerprint(src), "method_statistics": list(key) if key is not None else None,
            "calibration": [list(opts.calib_text), opts.calib_samples, opts.calib_seq_len, opts.seed],
            "damping": opts.damping, "tool_version": TOOL_VERSION,
            # --scope all's statistics also cover the attention projections; an MLP-scope key stays as it
            # was, so resume states written before scopes existed still match
            **({"scope": opts.scope} if opts.scope != "mlp" else {})}


def cache_key(statistics_key: Dict[str, Any]) -> str:
    """A `statistics_key` as a dictionary key."""
    return json.dumps(statistics_key, sort_keys=True)


def _atomic_write_bytes(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


class RunState:
    """The resume directory of one run. `statistics_key` and `layers_key` are
    JSON-able descriptions of what the statistics and the layers depend on."""

    def __init__(self, path: str, statistics_key: Dict[str, Any], layers_key: Dict[str, Any]):
        self.path = path
        self.statistics_key = statistics_key
        self.layers_key = layers_key
        self.data: Dict[str, Any] = {}
        self.reused: List[str] = []  # what a resumed run took over, for the summary

    # ------------------------------------------------------------ opening
    @classmethod
    def open(cls, out_path: str, statistics_key: Dict, layers_key: Dict, resume: bool) -> "RunState":
        """The run's state: a fresh one, or with `resume` the one an earlier run
        left (its statistics kept when they were made the same way, its layers
        when everything matches). Without `resume` an existing state is refused,
        so hours of work are never discarded silently."""
        path = state_dir_for(out_path)
        state = cls(path, statistics_key, layers_key)
        exists = os.path.isfile(os.path.join(path, STATE_FILE))
        if os.path.lexists(path) and not exists:
            if not os.path.isdir(path) or os.listdir(path):
                raise UserError(f"{path}: exists but holds no {STATE_FILE}; it is not a resume state of "
                                f"vllm-neuronmlp compress. Move it away (the run keeps its state there)")
        if exists and not resume:
            raise UserError(f"{path}: an earlier run of this output left its resume state here; pass --resume to "
                            f"continue it (what still matches is reused), or delete that directory to start over")
        if resume and exists:
            with open(os.path.join(path, STATE_FILE)) as f:
                old = json.load(f)
            if old.get("version") != STATE_VERSION or old.get("statistics_key") != statistics_key:
                why = _difference(old.get("statistics_key") or {}, statistics_key)
                raise UserError(f"--resume: the state in {path} was made {why}; its statistics cannot be reused. "
                                f"Run with the earlier options, or delete that directory to start over")
            state.data = old
            state.reused.append("statistics" if old.get("statistics_done") else
                                f"statistics of {len(old.get('statistics_layers', []))} layers")
            if old.get("layers_key") != layers_key:
                for entry in LAYER_ENTRIES:
                    state.data.pop(entry, None)
                shutil.rmtree(state.subdir("layers"), ignore_errors=True)
                state.reused.append(f"no finished layers ({_difference(old.get('layers_key') or {}, layers_key)})")
            elif old.get("layers_done"):
                state.reused.append(f"{len(old['layers_done'])} finished layers")
        elif resume:
            state.reused.append(f"nothing (no resume state in {path})")
        os.makedirs(path, exist_ok=True)
        state.data.update(version=STATE_VERSION, statistics_key=statistics_key, layers_key=layers_key)
        state.data.setdefault("layers_done", [])
        state.data.setdefault("statistics_layers", [])
        state.save()
        return state

    # ------------------------------------------------------------ state.json
    def save(self) -> None:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
        _atomic_write_bytes(os.path.join(self.path, STATE_FILE), write)

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def set(self, **values) -> None:
        self.data.update(values)
        self.save()

    # ------------------------------------------------------------ files
    def subdir(self, *parts: str) -> str:
        d = os.path.join(self.path, *parts)
        os.makedirs(d, exist_ok=True)
        return d

    def file(self, *parts: str) -> str:
        return os.path.join(self.subdir(*parts[:-1]), parts[-1])

    def put(self, obj: Any, *parts: str) -> None:
        """torch.save under a temporary name, renamed into place."""
        _atomic_write_bytes(self.file(*parts), lambda tmp: torch.save(obj, tmp))

    def load(self, *parts: str) -> Any:
        # the state's own files, written by `put` above (they hold dataclasses and lists too)
        return torch.load(os.path.join(self.path, *parts), map_location="cpu", weights_only=False)

    def has(self, *parts: str) -> bool:
        return os.path.isfile(os.path.join(self.path, *parts))

    def remove(self, *parts: str) -> None:
        p = os.path.join(self.path, *parts)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)

    def discard(self) -> None:
        """The run finished: its state is no longer needed."""
        shutil.rmtree(self.path, ignore_errors=True)


def _difference(old: Dict, new: Dict) -> str:
    diffs = [f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    return "with " + ", ".join(diffs) if diffs else "by another version of the state"


class ActivationStore:
    """Per-layer tensors on disk (the Fisher pass's stored layer inputs): one
    file each, written atomically, read back whole; memory holds one at a time."""

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.pt")

    def put(self, key: str, t: torch.Tensor) -> None:
        _atomic_write_bytes(self._path(key), lambda tmp: torch.save(t.detach().cpu(), tmp))

    def get(self, key: str, device: Optional[torch.device] = None) -> torch.Tensor:
        return torch.load(self._path(key), map_location=device or "cpu", weights_only=True)

    def has(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def drop(self, key: str) -> None:
        if os.path.exists(self._path(key)):
            os.remove(self._path(key))
