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
    the buffer passes `max_shard_bytes`; `finish()` names the shards
    `model-0000i-of-0000n.safetensors` and writes the index (or a single
    `model.safetensors` when everything fits in one shard)."""

    def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.dir = directory
        self.max = max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0
        self.total_params = 0
        self.names: set = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        t = tensor.detach().contiguous()
        self.buffer[name] = t
        nbytes = t.numel() * t.element_size()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes
        self.total_params += t.numel()
        if self.buffer_bytes >= self.max:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        idx = len(self.shards)
        save_file(self.buffer, os.path.join(self.dir, f".shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(sorted(self.buffer))
        self.buffer = {}
        self.buffer_bytes = 0

    def finish(self) -> List[str]:
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("no tensors written")
        if n == 1:
            os.rename(os.path.join(self.dir, ".shard-00000.safetensors"),
                      os.path.join(self.dir, cf.SAFETENSORS_SINGLE_FILE))
            return [cf.SAFETENSORS_SINGLE_FILE]
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.dir, f".shard-{i:05d}.safetensors"), os.path.join(self.dir, fname))
            files.append(fname)
            for name in names:
                weight_map[name] = fname
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.dir, cf.SAFETENSORS_INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        return files


def write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
