"""Writing a checkpoint safely: a temporary sibling directory, sharded
safetensors written as tensors arrive, renamed into place only when complete.

An interrupted or failed run (exception or Ctrl-C) removes the temporary
directory, so the output name never holds half a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.errors import UserError

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3


def check_output_path(out: str, overwrite: bool, src: Optional[str] = None) -> None:
    """Refuse an existing OUT (without overwrite), a non-directory OUT, and any
    OUT that is, contains or lies inside the source."""
    out_real = os.path.realpath(out)
    if src is not None:
        src_real = os.path.realpath(src)
        if out_real == src_real or out_real.startswith(src_real + os.sep) or src_real.startswith(out_real + os.sep):
            raise UserError(f"{out}: the output must not be the source {src}, inside it, or contain it "
                            f"(the source is never written)")
    if os.path.lexists(out):
        if not overwrite:
            raise UserError(f"{out}: already exists; pass --overwrite to replace it")
        if not os.path.isdir(out) or os.path.islink(out):
            raise UserError(f"{out}: exists and is not a directory; refusing to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: parent directory {parent} is not writable")


class StagingDir:
    """`with StagingDir(out, overwrite) as tmp:` ... `commit()` renames tmp to out.
    Leaving the block without commit (error, Ctrl-C) deletes tmp."""

    def __init__(self, out: str, overwrite: bool):
        self.out = os.path.abspath(out)
        self.overwrite = overwrite
        self.path: Optional[str] = None
        self.committed = False

    def __enter__(self) -> "StagingDir":
        parent = os.path.dirname(self.out)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        return self

    def commit(self) -> None:
        assert self.path is not None
        if os.path.lexists(self.out):
            if not self.overwrite:
                raise UserError(f"{self.out}: appeared while compressing; pass --overwrite to replace it")
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out))
            os.rename(self.out, os.path.join(trash, "old"))
            try:
                os.rename(self.path, self.out)
            except BaseException:
                os.rename(os.path.join(trash, "old"), self.out)
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.path, self.out)
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.committed and self.path and os.path.exists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        return False


class ShardWriter:
    """Collects tensors and flushes them to numbered safetensors shards once
    the buffer passes `max_shard_bytes` (or when `flush()` is called: the
    compressor flushes after every decoder layer, so a shard never spans two
    layers and a finished layer is on disk). `finish()` names the shards
    `model-0000i-of-0000n.safetensors` and writes the index, or writes a single
    `model.safetensors` when everything fits in one shard; `finish(dest)` puts
    them into another directory of the same filesystem by hard links (the
    shards themselves stay where they are, part of the resume state).
    `state()` / `restore()` carry a writer across an interrupted run."""

    def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.dir = directory
        self.max = max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0
        self.total_params = 0
        self.names: set = set()

    def state(self) -> Dict:
        """What `restore` needs: the flushed shards (call after `flush()`)."""
        assert not self.buffer, "state() of a writer with unflushed tensors"
        return {"shards": self.shards, "total_bytes": self.total_bytes, "total_params": self.total_params}

    @classmethod
    def restore(cls, directory: str, max_shard_bytes: int, state: Optional[Dict]) -> "ShardWriter":
        w = cls(directory, max_shard_bytes)
        if state:
            w.shards = [list(names) for names in state["shards"]]
            w.total_bytes, w.total_params = int(state["total_bytes"]), int(state["total_params"])
            w.names = {n for names in w.shards for n in names}
        return w

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        t = tensor.detach().cpu().contiguous()
        self.buffer[name] = t
        nbytes = t.numel() * t.element_size()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes
        self.total_params += t.numel()
        if self.buffer_bytes >= self.max:
            self.flush()

    def _shard_path(self, idx: int) -> str:
        return os.path.join(self.dir, f".shard-{idx:05d}.safetensors")

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        idx = len(self.shards)
        tmp = self._shard_path(idx) + ".tmp"
        save_file(self.buffer, tmp, metadata={"format": "pt"})
        os.replace(tmp, self._shard_path(idx))
        self.shards.append(sorted(self.buffer))
        self.buffer = {}
        self.buffer_bytes = 0

    def finish(self, dest: Optional[str] = None) -> List[str]:
        """The checkpoint's safetensors files in `dest` (default: this writer's
        directory, shards renamed), index included when there are several."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("no tensors written")
        place = os.rename if dest is None else _link_or_copy
        dest = dest or self.dir
        if n == 1 or self.total_bytes <= self.max:
            single = os.path.join(dest, cf.SAFETENSORS_SINGLE_FILE)
            if n == 1:
                place(self._shard_path(0), single)
            else:  # several layer shards that fit in one file: merge them (at most max bytes in memory)
                from safetensors.torch import load_file, save_file

                tensors = {}
                for i in range(n):
                    tensors.update(load_file(self._shard_path(i)))
                save_file(dict(sorted(tensors.items())), single, metadata={"format": "pt"})
                if place is os.rename:
                    for i in range(n):
                        os.remove(self._shard_path(i))
            return [cf.SAFETENSORS_SINGLE_FILE]
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            place(self._shard_path(i), os.path.join(dest, fname))
            files.append(fname)
            for name in names:
                weight_map[name] = fname
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(dest, cf.SAFETENSORS_INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        return files


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (instant, no extra disk), or a copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
