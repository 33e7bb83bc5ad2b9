"""Reading a dense Hugging Face checkpoint tensor by tensor (safetensors only).

Nothing here loads a whole model: tensors are fetched one at a time with
`safe_open`, so peak memory follows what the caller keeps. Errors for bad
input name the directory, file and tensor (CheckpointFormatError or UserError).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.errors import UserError

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class SourceCheckpoint:
    """A dense HF checkpoint directory: config.json + safetensors (single or sharded)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise UserError(f"{path}: no such directory (expected a Hugging Face checkpoint)")
        if not os.path.isdir(path):
            raise UserError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
        self.config: Dict = cf.read_config(path)
        if cf.QUANTIZATION_CONFIG_KEY in self.config:
            method = (self.config[cf.QUANTIZATION_CONFIG_KEY] or {}).get(cf.KEY_QUANT_METHOD, "?")
            raise UserError(f"{os.path.join(path, cf.CONFIG_FILE)}: the model is already quantized "
                            f"(quant_method {method!r}); compress needs a dense checkpoint")
        self.files = cf.safetensors_files(path)  # name -> file; clear errors for missing files
        self.headers: Dict[str, Dict] = {}
        for f in sorted(set(self.files.values())):
            self.headers[f] = cf.read_safetensors_header(f)
        for name, f in self.files.items():
            if name not in self.headers[f]:
                raise cf.CheckpointFormatError(f"{f}: the index maps tensor {name} to this file, but it is not in it")

    # ---------------------------------------------------------------- metadata
    def names(self) -> List[str]:
        return list(self.files)

    def info(self, name: str) -> Dict:
        return self.headers[self.files[name]][name]

    def shape(self, name: str) -> List[int]:
        return list(self.info(name)["shape"])

    def dtype_str(self, name: str) -> str:
        return self.info(name)["dtype"]

    def torch_dtype(self, name: str) -> torch.dtype:
        d = self.dtype_str(name)
        if d not in _DTYPES:
            raise UserError(f"{self.files[name]}: tensor {name} has dtype {d}; only float16, bfloat16, float32 "
                            f"and float64 weights can be compressed")
        return _DTYPES[d]

    def nbytes(self, name: Optional[str] = None) -> int:
        if name is not None:
            a, b = self.info(name)["data_offsets"]
            return b - a
        return sum(self.nbytes(n) for n in self.files)

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= int(s)
        return n

    def total_bytes_on_disk(self) -> int:
        return sum(os.path.getsize(f) for f in set(self.files.values()))

    # ---------------------------------------------------------------- data
    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """One tensor, copied out of its file. The file is opened (memory-mapped)
        for this read only: a mapping kept open would let the pages of every
        tensor read so far count in the resident set, i.e. grow with the model."""
        from safetensors import safe_open

        if name not in self.files:
            raise cf.CheckpointFormatError(f"{self.path}: tensor {name} is missing")
        path = self.files[name]
        try:
            with safe_open(path, framework="pt") as h:
                t = h.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise cf.CheckpointFormatError(f"{path}: cannot read tensor {name} ({e})") from None
        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise cf.CheckpointFormatError(f"{path}: tensor {name} has {bad} non-finite values (NaN or Inf); "
                                           f"refusing to compress a broken checkpoint")
        return t

    def close(self) -> None:
        pass

    def with_prefix(self, prefix: str) -> List[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def other_files(self) -> Iterable[str]:
        """Top-level non-weight files to copy to the output (tokenizer, generation config...)."""
        skip_ext = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".lock")
        for entry in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, entry)
            if not os.path.isfile(full) or entry.startswith("."):
                continue
            if entry in (cf.CONFIG_FILE, cf.SAFETENSORS_INDEX_FILE) or entry.endswith(skip_ext):
                continue
            if entry.endswith(".index.json"):
                continue
            yield entry


def text_config(config: Dict) -> Dict:
    return config.get("text_config", config)


def load_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)
