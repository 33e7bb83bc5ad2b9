"""SVD compression of the MLPs of a Hugging Face checkpoint, streamed layer by layer.

Pipeline (design notes §7):

1. Read config and tensor headers; build the model skeleton on the `meta`
   device (no memory), check that every decoder layer has a gate/up/down MLP.
2. Tokenize the calibration text; pick `calib_samples` non-overlapping windows
   of `calib_seq_len` tokens at random (seeded).
3. `fisher` method: one streamed forward/backward pass (sensitivity.py) gives
   every projection's output-channel Fisher weights and, for `adaptive`, its
   Fisher-weighted whitened spectrum. Choose ranks: `uniform` (eq. 5 per
   matrix, corrected to the global budget) or `adaptive` (fisher: greedy by
   estimated loss; other methods: candidates from the whitened spectra,
   scored on held-aside calibration windows, two extra streamed passes).
4. Stream: for each decoder layer, materialize it alone on CPU (float32) from
   its safetensors tensors, run the calibration hidden states through it,
   accumulate float64 Gram matrices of the MLP inputs, factor, write the
   layer's tensors, drop the layer. Peak memory is one layer plus the
   calibration activations plus the Gram matrices, never the whole model.
5. Optional LoRA recovery (loads the whole compressed model; see lora.py).
6. config.json with `quantization_config` (format v1 + provenance), tokenizer
   and other files copied, and the temporary directory renamed to OUT.

Methods (`method`):
- `plain`: truncated SVD of W, no calibration (the weak baseline).
- `whiten`: SVD-LLM-style whitening with the dense model's activations.
- `fisher` (default): whitening on the input side and, on the output side,
  each channel weighted by the loss's sensitivity to it (diagonal empirical
  Fisher of the projection's outputs, from one streamed forward/backward
  pass over calibration windows; sensitivity.py, whitening.py). Dropped
  singular values become loss estimates, so the adaptive allocation ranks
  all matrices of the model in one unit. On SmolLM2 it cuts the excess
  perplexity of the unaligned whitened baseline by 77-92 % at ratios
  0.05-0.4 (benchmarks/accuracy_vs_ratio.py).
- `error-aware`: the calibration text also runs through the already-compressed
  layers; each factorization is fit so that the compressed layer, fed the
  inputs it will really see, reproduces the original layer's outputs (closed
  form, see whitening.py). Measured on SmolLM2 it loses to `whiten` (the
  least-squares fit on the shifted inputs overfits the calibration windows and
  blows up at aggressive ranks), so it is not the default.

Allocations (`rank_allocation`):
- `uniform`: eq.-5 ranks, corrected to the global budget (ranks.py).
- `adaptive` (default): with `fisher`, one greedy allocation by estimated loss
  reduction per parameter. With other methods, several allocations under the
  same budget (the uniform one and greedy ones from the spectra, see
  `candidate_allocations`) are scored by streaming held-aside calibration
  windows through each candidate's compressed layers (`selection_pass`); the
  lowest validation perplexity wins.
  So adaptive is never worse than uniform on that validation data.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm_neuronmlp import __version__ as TOOL_VERSION
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import ranks as rk
from vllm_neuronmlp.tools import text_data
from vllm_neuronmlp.tools.cli import UserError
from vllm_neuronmlp.tools.source import SourceCheckpoint
from vllm_neuronmlp.tools.whitening import (FactorizationError, GramAccumulator, factorize, robust_cholesky,
                                             whitened_spectrum)
from vllm_neuronmlp.tools.writer import ShardWriter, StagingDir, check_output_path, write_json

log = logging.getLogger("vllm_neuronmlp.compress")

METHODS = ("plain", "whiten", "fisher", "error-aware")
ALLOCATIONS = ("uniform", "adaptive")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DEFAULT_METHOD = "fisher"  # best measured on SmolLM2 (benchmarks/results/accuracy_vs_ratio.json)
DEFAULT_ALLOCATION = "adaptive"
DEFAULT_CALIB_TEXT = text_data.BUILTIN_PREFIX + "calibration"
CHUNK_TOKENS = 4096  # tokens per forward chunk during calibration
VALIDATION_WINDOWS = 8  # unused calibration windows that rank the adaptive candidates (and judge LoRA)
DEFAULT_FISHER_SAMPLES = 32  # calibration windows of the Fisher pass (its stored activations grow with them)


@dataclass
class CompressOptions:
    ratio: float
    block_size: int = cf.DEFAULT_BLOCK_SIZE
    rounding_threshold: float = 0.5
    calib_text: Sequence[str] = (DEFAULT_CALIB_TEXT,)
    calib_samples: int = 64
    calib_seq_len: int = 512
    fisher_samples: int = DEFAULT_FISHER_SAMPLES  # at most calib_samples are used
    seed: int = 0
    rank_allocation: str = DEFAULT_ALLOCATION
    method: str = DEFAULT_METHOD
    damping: float = 0.0  # ridge added to every Gram matrix, relative to its mean diagonal
    lora_steps: int = 0
    lora_rank: int = 8
    lora_lr: float = 2e-4
    lora_batch: int = 4
    dtype: str = "auto"
    overwrite: bool = False
    max_shard_bytes: int = 512 * 1024 ** 2  # also bounds the write buffer held in memory
    progress: bool = True

    def validate(self) -> None:
        try:
            rk.check_ratio(self.ratio)
        except ValueError as e:
            raise UserError(f"--ratio: {e}") from None
        try:
            rk.check_block_size(self.block_size)
        except ValueError as e:
            raise UserError(f"--block-size: {e}") from None
        if not 0.0 < self.rounding_threshold <= 1.0:
            raise UserError(f"--rounding-threshold must be in (0, 1], got {self.rounding_threshold}")
        if self.calib_samples < 1:
            raise UserError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.fisher_samples < 1:
            raise UserError(f"--fisher-samples must be at least 1, got {self.fisher_samples}")
        if self.calib_seq_len < 2:
            raise UserError(f"--calib-seq-len must be at least 2, got {self.calib_seq_len}")
        if self.rank_allocation not in ALLOCATIONS:
            raise UserError(f"--rank-allocation must be one of {', '.join(ALLOCATIONS)}, got {self.rank_allocation!r}")
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.lora_steps < 0:
            raise UserError(f"--lora-steps must be >= 0, got {self.lora_steps}")
        if self.dtype not in DTYPE_CHOICES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not self.calib_text:
            raise UserError("--calib-text: at least one text file is needed")


@dataclass
class CompressResult:
    out: str
    ranks: Dict[str, int]  # factored modules only
    dense_modules: List[str]
    ratio_requested: float
    ratio_mlp: float
    ratio_model: float
    params_before: int
    params_after: int
    mlp_params_before: int
    mlp_params_after: int
    bytes_before: int
    bytes_after: int
    wall_time_s: float
    method: str
    allocation: str
    num_layers: int
    calibration: Dict = field(default_factory=dict)
    jitter_modules: List[str] = field(default_factory=list)
    lora: Dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    selection: Dict = field(default_factory=dict)

    def to_dict(self) -> Dict:
        return asdict(self)


# ---------------------------------------------------------------------- model skeleton
@dataclass
class Skeleton:
    config: object  # transformers PretrainedConfig
    model: nn.Module  # on the meta device
    layers: nn.ModuleList
    layer_prefix: str  # e.g. "model.layers"
    embed_name: str  # e.g. "model.embed_tokens.weight"
    rotary: Optional[nn.Module]
    num_layers: int
    hidden: int
    intermediate: int


def build_skeleton(src: SourceCheckpoint) -> Skeleton:
    from transformers import AutoConfig, AutoModelForCausalLM

    if "text_config" in src.config:
        raise UserError(f"{src.path}: multimodal configs (with text_config) are not supported; "
                        f"compress a text-only causal LM (Llama, Qwen3, Mistral, ...)")
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"{os.path.join(src.path, cf.CONFIG_FILE)}: transformers cannot read this config ({e})") from None
    config._attn_implementation = "sdpa"  # causal attention with no mask tensor
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"{src.path}: transformers cannot build a causal LM from this config ({e})") from None
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UserError(f"{src.path}: {type(model).__name__} has no decoder layer list at "
                        f"{model.base_model_prefix}.layers; only Llama-style decoders whose MLP is "
                        f"gate_proj/up_proj/down_proj (Llama, Qwen3, Mistral, ...) can be compressed")
    prefix = f"{model.base_model_prefix}.layers"
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        missing = [p for p in cf.MLP_PROJECTIONS if not isinstance(getattr(mlp, p, None), nn.Linear)]
        if mlp is None or missing:
            raise UserError(f"{src.path}: {prefix}.{i}.mlp has no {', '.join(missing) or 'MLP'} linear; only models "
                            f"whose MLP is gate_proj/up_proj/down_proj (Llama, Qwen3, Mistral, ...) can be compressed")
        for p in cf.MLP_PROJECTIONS:
            name = cf.weight_name(f"{prefix}.{i}.mlp.{p}")
            if name not in src.files:
                raise cf.CheckpointFormatError(f"{src.path}: tensor {name} is missing from the safetensors files")
            if getattr(mlp, p).bias is not None or f"{prefix}.{i}.mlp.{p}.bias" in src.files:
                raise UserError(f"{src.path}: {prefix}.{i}.mlp.{p} has a bias; format v1 factors bias-free MLPs only")
    embed_module = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embed_name = None
    for name, mod in model.named_modules():
        if mod is embed_module:
            embed_name = cf.weight_name(name)
    if embed_name is None or embed_name not in src.files:
        raise cf.CheckpointFormatError(f"{src.path}: input embedding tensor {embed_name} is missing")
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        rotary = type(rotary)(config=config)  # real buffers on CPU (the meta copy has none)
    hidden = int(config.hidden_size)
    intermediate = int(config.intermediate_size)
    return Skeleton(config, model, layers, prefix, embed_name, rotary, len(layers), hidden, intermediate)


def module_names(sk: Skeleton, layer: int) -> Dict[str, str]:
    return {p: f"{sk.layer_prefix}.{layer}.mlp.{p}" for p in cf.MLP_PROJECTIONS}


def mlp_shapes(sk: Skeleton) -> Dict[str, Tuple[int, int]]:
    """{module: (in, out)} for every targeted projection, read from the layer modules."""
    out = {}
    for i, layer in enumerate(sk.layers):
        for p, name in module_names(sk, i).items():
            lin = getattr(layer.mlp, p)
            out[name] = (lin.in_features, lin.out_features)
    return out


def materialize_layer(sk: Skeleton, src: SourceCheckpoint, i: int) -> nn.Module:
    """Decoder layer i on CPU in float32 with its weights from the checkpoint."""
    layer = sk.layers[i]
    layer.to_empty(device="cpu")
    prefix = f"{sk.layer_prefix}.{i}."
    state = {}
    for key in layer.state_dict().keys():
        state[key] = src.get(prefix + key).to(torch.float32)
    layer.load_state_dict(state, strict=True)
    layer.to(torch.float32)
    layer.eval()
    return layer


def release_layer(sk: Skeleton, i: int) -> None:
    sk.layers[i].to("meta")
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS after each layer. Without it glibc
    keeps them (fragmented arenas) and the resident set creeps up with the
    number of layers although the live data does not."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---------------------------------------------------------------------- calibration data
def calibration_tokens(src_path: str, texts: Sequence[str], samples: int, seq_len: int, seed: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """(chosen windows [samples, seq_len], unused windows [k, seq_len], info)."""
    from transformers import AutoTokenizer

    parts = []
    for name in texts:
        try:
            parts.append(text_data.read_text(name))
        except text_data.TextDataError as e:
            raise UserError(f"--calib-text: {e}") from None
    text = "\n\n".join(parts)
    try:
        tok = AutoTokenizer.from_pretrained(src_path)
    except Exception as e:
        raise UserError(f"{src_path}: cannot load its tokenizer, needed to tokenize --calib-text ({e})") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // seq_len
    if n_windows < samples:
        raise UserError(
            f"--calib-text {', '.join(texts)}: {len(ids)} tokens make only {n_windows} windows of --calib-seq-len "
            f"{seq_len}, fewer than --calib-samples {samples} (needs {samples * seq_len} tokens); give more text "
            f"or ask for fewer/shorter samples")
    windows = torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_windows, generator=g)
    chosen = windows[perm[:samples].sort().values]
    unused = windows[perm[samples:].sort().values]
    info = {"source": [text_data.describe(t) for t in texts], "tokens_available": len(ids), "samples": samples,
            "seq_len": seq_len, "tokens_used": samples * seq_len, "seed": seed}
    return chosen, unused, info


# distinct seeded streams for the subsets, so each is a random draw independent of the others
FISHER_STREAM, VALIDATION_STREAM = 1, 2


def random_subset(windows: torch.Tensor, k: int, seed: int, stream: int) -> torch.Tensor:
    """`min(k, len(windows))` windows drawn uniformly at random (seeded) from
    `windows` [n, seq_len]. The calibration windows are kept in text order, so
    taking the first k would see only the start of the text."""
    g = torch.Generator().manual_seed(seed * 1000 + stream)
    pick = torch.randperm(windows.shape[0], generator=g)[:k]
    return windows[pick.sort().values]


# ---------------------------------------------------------------------- layer execution
class _Stop(Exception):
    pass


class FactoredLinear(nn.Module):
    """`y = (x @ u) @ v` in float32 (calibration-time stand-in for a factored projection)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.u = u.to(torch.float32)
        self.v = v.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.u) @ self.v


class LayerRunner:
    """Runs one materialized decoder layer over chunks of hidden states and
    captures the inputs of the MLP (shared by gate and up) and of down_proj."""

    def __init__(self, sk: Skeleton, seq_len: int):
        self.sk = sk
        self.position_ids = torch.arange(seq_len).unsqueeze(0)
        self.position_embeddings = None
        if sk.rotary is not None:
            dummy = torch.zeros(1, seq_len, sk.hidden)
            with torch.no_grad():
                self.position_embeddings = sk.rotary(dummy, self.position_ids)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kwargs = dict(attention_mask=None, position_ids=self.position_ids.expand(x.shape[0], -1))
        if self.position_embeddings is not None:
            kwargs["position_embeddings"] = self.position_embeddings
        out = layer(x, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def run(self, layer: nn.Module, x: torch.Tensor, want_mlp_in: bool = False, want_down_in: bool = False,
            stop_at: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Forward x through the layer. Returns {"out", "mlp_in", "down_in"} as asked.
        `stop_at` ("mlp" or "down") ends the forward once that input is captured."""
        got: Dict[str, torch.Tensor] = {}
        hooks = []

        def grab(key: str, stop: bool):
            def hook(_mod, args, kwargs):
                got[key] = args[0] if args else next(iter(kwargs.values()))
                if stop:
                    raise _Stop()
            return hook

        if want_mlp_in or stop_at == "mlp":
            hooks.append(layer.mlp.register_forward_pre_hook(grab("mlp_in", stop_at == "mlp"), with_kwargs=True))
        if want_down_in or stop_at == "down":
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(grab("down_in", stop_at == "down"),
                                                                       with_kwargs=True))
        try:
            got["out"] = self.forward(layer, x)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return got


def _chunks(n: int, seq_len: int) -> List[slice]:
    per = max(1, CHUNK_TOKENS // seq_len)
    return [slice(s, min(n, s + per)) for s in range(0, n, per)]


def _embed(sk: Skeleton, src: SourceCheckpoint, ids: torch.Tensor) -> torch.Tensor:
    w = src.get(sk.embed_name)
    x = torch.nn.functional.embedding(ids, w).to(torch.float32)
    scale = getattr(sk.config, "embedding_multiplier", None)  # e.g. Granite-style scaling; Llama has none
    if scale:
        x = x * float(scale)
    del w
    return x


# ---------------------------------------------------------------------- ranks
def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def _mlp_input_grams(sk: Skeleton, runner: "LayerRunner", layer: nn.Module, x: torch.Tensor):
    """Run `x` through `layer` in place, accumulating the Gram matrices of the MLP
    input (shared by gate and up) and of the down projection's input."""
    acc_a = GramAccumulator(sk.hidden)
    acc_z = GramAccumulator(getattr(layer.mlp, cf.DOWN).in_features)
    for sl in _chunks(x.shape[0], x.shape[1]):
        got = runner.run(layer, x[sl], want_mlp_in=True, want_down_in=True)
        acc_a.add(got["mlp_in"])
        acc_z.add(got["down_in"])
        x[sl] = got["out"]
    return acc_a, acc_z


def spectra_pass(sk: Skeleton, src: SourceCheckpoint, ids: Optional[torch.Tensor], method: str, damping: float,
                 progress: bool) -> Dict[str, List[float]]:
    """Whitened singular values of every projection, from the dense model
    (plain singular values when method is `plain`). The fisher method gets
    its output-weighted spectra from sensitivity.sensitivity_pass instead."""
    spectra: Dict[str, List[float]] = {}
    x = None
    runner = None
    if method != "plain":
        x = _embed(sk, src, ids)
        runner = LayerRunner(sk, ids.shape[1])
    for i in _progress(range(sk.num_layers), progress, desc="spectra (adaptive ranks)", unit="layer"):
        layer = materialize_layer(sk, src, i)
        names = module_names(sk, i)
        if method == "plain":
            for p, name in names.items():
                w = getattr(layer.mlp, p).weight.T
                spectra[name] = whitened_spectrum(w, None).tolist()
        else:
            acc_a, acc_z = _mlp_input_grams(sk, runner, layer, x)
            chol_a = robust_cholesky(acc_a.matrix, f"{names[cf.GATE]} input", damping).factor
            chol_z = robust_cholesky(acc_z.matrix, f"{names[cf.DOWN]} input", damping).factor
            for p, name in names.items():
                w = getattr(layer.mlp, p).weight.T
                spectra[name] = whitened_spectrum(w, chol_z if p == cf.DOWN else chol_a).tolist()
        release_layer(sk, i)
    return spectra


ADAPTIVE_POWERS = (1.0, 2.0, 4.0)


def candidate_allocations(sk: Skeleton, opts: CompressOptions, spectra: Optional[Dict[str, List[float]]]
                          ) -> Dict[str, Dict[str, int]]:
    """Allocations meeting the same budget; more than one are scored by
    `selection_pass`. With `fisher` the dropped squared singular values are
    loss estimates, comparable across matrices, so adaptive is the one greedy
    allocation by estimated loss reduction per parameter (`fisher-greedy`,
    no scoring pass). Otherwise they are output errors of different scales:
    the uniform allocation competes with greedy ones on the relative
    truncation error raised to a power p (larger p spreads the cuts more evenly)."""
    mats = rk.matrices_from_shapes(mlp_shapes(sk))
    if opts.rank_allocation == "adaptive" and opts.method == "fisher":
        return {"fisher-greedy": rk.allocate_adaptive(mats, spectra, opts.ratio, opts.block_size, normalize=False,
                                                      power=1.0)}
    out = {"uniform": rk.allocate_uniform(mats, opts.ratio, opts.block_size, opts.rounding_threshold)}
    if opts.rank_allocation == "adaptive":
        for p in ADAPTIVE_POWERS:
            cand = rk.allocate_adaptive(mats, spectra, opts.ratio, opts.block_size, power=p)
            if cand not in out.values():
                out[f"spectral-p{p:g}"] = cand
    return out


@torch.no_grad()
def selection_pass(sk: Skeleton, src: SourceCheckpoint, ids: torch.Tensor, val: torch.Tensor,
                   candidates: Dict[str, Dict[str, int]], damping: float, progress: bool) -> Dict[str, float]:
    """Validation perplexity of each candidate allocation, streamed layer by layer.

    The calibration windows run through the dense layers (whitening statistics,
    as in `whiten`); the validation windows (calibration windows not used for
    the statistics) run through each candidate's compressed layers. At the end
    the final norm and LM head turn each candidate's hidden states into a loss.
    Memory: one layer, plus one small set of validation activations per candidate."""
    x = _embed(sk, src, ids)
    xv = {name: _embed(sk, src, val) for name in candidates}
    runner = LayerRunner(sk, ids.shape[1])
    vrunner = LayerRunner(sk, val.shape[1])
    for i in _progress(range(sk.num_layers), progress, desc="select allocation", unit="layer"):
        layer = materialize_layer(sk, src, i)
        names = module_names(sk, i)
        acc_a, acc_z = _mlp_input_grams(sk, runner, layer, x)
        chol = {cf.GATE: robust_cholesky(acc_a.matrix, names[cf.GATE], damping).factor,
                cf.DOWN: robust_cholesky(acc_z.matrix, names[cf.DOWN], damping).factor}
        chol[cf.UP] = chol[cf.GATE]
        dense = {p: getattr(layer.mlp, p) for p in cf.MLP_PROJECTIONS}
        cache: Dict[Tuple[str, int], FactoredLinear] = {}
        for name, ranks in candidates.items():
            for p in cf.MLP_PROJECTIONS:
                r = ranks[names[p]]
                if r != rk.DENSE:
                    if (p, r) not in cache:
                        f = factorize(dense[p].weight.T, r, chol[p])
                        cache[(p, r)] = FactoredLinear(f.u.to(torch.bfloat16), f.v.to(torch.bfloat16))
                    setattr(layer.mlp, p, cache[(p, r)])
            for sl in _chunks(xv[name].shape[0], xv[name].shape[1]):
                xv[name][sl] = vrunner.run(layer, xv[name][sl])["out"]
            for p in cf.MLP_PROJECTIONS:
                setattr(layer.mlp, p, dense[p])
        release_layer(sk, i)
    norm, head = materialize_head(sk, src)
    scores = {}
    for name, h in xv.items():
        nll, n = 0.0, 0
        for k in range(h.shape[0]):
            logits = norm(h[k]) @ head.T
            lp = torch.log_softmax(logits[:-1], dim=-1)
            nll -= float(lp.gather(-1, val[k, 1:, None]).sum())
            n += val.shape[1] - 1
        scores[name] = math.exp(nll / n)
    norm.to("meta")
    return scores


def materialize_head(sk: Skeleton, src: SourceCheckpoint) -> Tuple[nn.Module, torch.Tensor]:
    """(final norm on CPU in float32, LM head weight [vocab, hidden] in float32);
    tied embeddings are used as the head when there is no lm_head tensor.
    Call `norm.to("meta")` when done."""
    base = getattr(sk.model, sk.model.base_model_prefix)
    norm = base.norm
    norm.to_empty(device="cpu")
    norm_name = [n for n, m in sk.model.named_modules() if m is norm][0]
    norm.load_state_dict({k: src.get(f"{norm_name}.{k}").float() for k in norm.state_dict()})
    norm.requires_grad_(False)
    head_name = "lm_head.weight" if "lm_head.weight" in src.files else sk.embed_name
    return norm, src.get(head_name).float()


# ---------------------------------------------------------------------- the factor pass
def _out_dtype(src: SourceCheckpoint, sk: Skeleton, opts: CompressOptions) -> torch.dtype:
    if opts.dtype != "auto":
        return getattr(torch, opts.dtype)
    return src.torch_dtype(cf.weight_name(module_names(sk, 0)[cf.GATE]))


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t


def factor_pass(sk: Skeleton, src: SourceCheckpoint, ids: Optional[torch.Tensor], ranks: Dict[str, int],
                opts: CompressOptions, writer: ShardWriter, out_dtype: torch.dtype, cast_all: bool,
                on_layer: Optional[Callable[[int], None]] = None,
                out_scales: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
    """Factor every layer with the chosen ranks and write its tensors
    (`out_scales`: the fisher method's output-channel weights). Returns stats."""
    scales = out_scales or {}
    method = opts.method
    stats = {"jitter_modules": []}
    x_o = x_c = None
    runner = None
    if method != "plain":
        x_o = _embed(sk, src, ids)
        x_c = x_o  # the two paths coincide until the first factored layer
        runner = LayerRunner(sk, ids.shape[1])
    diverged = False

    def chol(acc: GramAccumulator, name: str) -> torch.Tensor:
        res = robust_cholesky(acc.matrix, f"{name} input", opts.damping)
        if res.retried:
            stats["jitter_modules"].append(name)
            log.info("%s: input covariance not positive definite; added jitter %.3g", name, res.jitter)
        return res.factor

    def stored(f) -> Tuple[torch.Tensor, torch.Tensor]:
        return f.u.to(out_dtype), f.v.to(out_dtype)

    for i in _progress(range(sk.num_layers), opts.progress, desc=f"factor ({method})", unit="layer"):
        layer = materialize_layer(sk, src, i)
        names = module_names(sk, i)
        todo = {p: ranks[n] for p, n in names.items() if ranks.get(n, rk.DENSE) != rk.DENSE}
        weights = {p: getattr(layer.mlp, p).weight.detach().T.contiguous() for p in cf.MLP_PROJECTIONS}
        factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

        if method == "plain":
            for p, r in todo.items():
                factors[p] = stored(factorize(weights[p], r))
        elif method in ("whiten", "fisher"):
            acc_a = GramAccumulator(weights[cf.GATE].shape[0])
            acc_z = GramAccumulator(weights[cf.DOWN].shape[0])
            for sl in _chunks(x_o.shape[0], x_o.shape[1]):
                got = runner.run(layer, x_o[sl], want_mlp_in=bool(todo), want_down_in=bool(todo))
                if todo:
                    acc_a.add(got["mlp_in"])
                    acc_z.add(got["down_in"])
                x_o[sl] = got["out"]
            if todo:
                l_a = chol(acc_a, names[cf.GATE]) if (cf.GATE in todo or cf.UP in todo) else None
                l_z = chol(acc_z, names[cf.DOWN]) if cf.DOWN in todo else None
                for p, r in todo.items():
                    factors[p] = stored(factorize(weights[p], r, l_z if p == cf.DOWN else l_a,
                                                  out_scale=scales.get(names[p])))
        else:  # error-aware
            if todo and not diverged:
                x_c = x_o.clone()
                diverged = True
            dense = {p: getattr(layer.mlp, p) for p in cf.MLP_PROJECTIONS}
            chunks = _chunks(x_o.shape[0], x_o.shape[1])
            gu = [p for p in (cf.GATE, cf.UP) if p in todo]
            if gu:
                # stage A: inputs of gate/up on both paths -> fit gate/up
                acc_cc = GramAccumulator(weights[cf.GATE].shape[0])
                acc_co = GramAccumulator(weights[cf.GATE].shape[0])
                for sl in chunks:
                    a_o = runner.run(layer, x_o[sl], stop_at="mlp")["mlp_in"]
                    a_c = runner.run(layer, x_c[sl], stop_at="mlp")["mlp_in"] if diverged else a_o
                    acc_cc.add(a_c)
                    acc_co.add(a_c, a_o)
                l_a = chol(acc_cc, names[cf.GATE])
                for p in gu:
                    factors[p] = stored(factorize(weights[p], todo[p], l_a, acc_co.matrix))
                del acc_cc, acc_co
            if cf.DOWN in todo:
                # stage B: input of down on both paths (gate/up already compressed on the c path)
                acc_cc = GramAccumulator(weights[cf.DOWN].shape[0])
                acc_co = GramAccumulator(weights[cf.DOWN].shape[0])
                for sl in chunks:
                    got_o = runner.run(layer, x_o[sl], want_down_in=True)
                    for p in gu:
                        setattr(layer.mlp, p, FactoredLinear(*factors[p]))
                    z_c = runner.run(layer, x_c[sl], stop_at="down")["down_in"]
                    for p in gu:
                        setattr(layer.mlp, p, dense[p])
                    acc_cc.add(z_c)
                    acc_co.add(z_c, got_o["down_in"])
                    x_o[sl] = got_o["out"]
                l_z = chol(acc_cc, names[cf.DOWN])
                factors[cf.DOWN] = stored(factorize(weights[cf.DOWN], todo[cf.DOWN], l_z, acc_co.matrix))
                del acc_cc, acc_co
            else:
                for sl in chunks:
                    x_o[sl] = runner.run(layer, x_o[sl])["out"]
            if diverged:
                # stage C: the compressed path moves on through the compressed layer
                for p in factors:
                    setattr(layer.mlp, p, FactoredLinear(*factors[p]))
                for sl in chunks:
                    x_c[sl] = runner.run(layer, x_c[sl])["out"]
                for p in cf.MLP_PROJECTIONS:
                    setattr(layer.mlp, p, dense[p])
            else:
                x_c = x_o

        # write this layer: factors for factored modules, everything else as stored
        prefix = f"{sk.layer_prefix}.{i}."
        skip = {cf.weight_name(names[p]) for p in factors}
        for name in sorted(src.with_prefix(prefix)):
            if name in skip:
                continue
            writer.add(name, _cast(src.get(name), out_dtype if cast_all else None))
        for p, (u, v) in factors.items():
            writer.add(cf.u_name(names[p]), u)
            writer.add(cf.v_name(names[p]), v)
        release_layer(sk, i)
        del weights, factors
        if on_layer is not None:
            on_layer(i)
    return stats


# ---------------------------------------------------------------------- orchestration
def _model_params(src: SourceCheckpoint) -> int:
    return sum(src.numel(n) for n in src.names())


def compress(src_path: str, out_path: str, ratio: float, **kwargs) -> CompressResult:
    """Compress the MLPs of the dense HF checkpoint `src_path` into `out_path`.

    Keyword arguments are the fields of CompressOptions (block_size,
    rounding_threshold, calib_text, calib_samples, calib_seq_len, seed,
    rank_allocation, method, damping, lora_steps, lora_rank, lora_lr,
    lora_batch, dtype, overwrite, max_shard_bytes, progress). Raises UserError
    or CheckpointFormatError for bad input; never leaves a partial `out_path`.
    """
    opts = CompressOptions(ratio=ratio, **kwargs)
    return compress_with_options(src_path, out_path, opts)


def compress_with_options(src_path: str, out_path: str, opts: CompressOptions,
                          on_layer: Optional[Callable[[int], None]] = None,
                          spectra_cache: Optional[Dict] = None) -> CompressResult:
    """`compress` with a CompressOptions. `on_layer(i)` is called after layer i
    is written (tests use it to interrupt); `spectra_cache`, a dict shared
    between calls on the same source and calibration, saves the ratio-independent
    passes (the fisher method's sensitivity pass, the spectra pass of the
    adaptive allocation) across calls (benchmarks sweep ratios with it)."""
    try:
        return _compress(src_path, out_path, opts, on_layer, spectra_cache)
    except FactorizationError as e:
        raise UserError(str(e)) from None


def _compress(src_path: str, out_path: str, opts: CompressOptions, on_layer, spectra_cache) -> CompressResult:
    t0 = time.time()
    opts.validate()
    check_output_path(out_path, opts.overwrite, src_path)
    src = SourceCheckpoint(src_path)
    sk = build_skeleton(src)
    warnings: List[str] = []

    ids = val = None
    calib_info: Dict = {}
    if opts.method != "plain" or opts.lora_steps > 0:
        ids, unused, calib_info = calibration_tokens(src_path, opts.calib_text, opts.calib_samples,
                                                     opts.calib_seq_len, opts.seed)
        if unused.shape[0] > 0:
            val = random_subset(unused, VALIDATION_WINDOWS, opts.seed, VALIDATION_STREAM)

    cache = spectra_cache if spectra_cache is not None else {}
    calib_key = (os.path.abspath(src_path), tuple(opts.calib_text), opts.calib_samples, opts.calib_seq_len,
                 opts.seed, opts.damping, opts.fisher_samples)
    out_scales = spectra = None
    if opts.method == "fisher":
        # one streamed forward/backward gives the Fisher weights and (adaptive) the weighted spectra
        from vllm_neuronmlp.tools.sensitivity import output_weights, sensitivity_pass

        key = ("fisher", opts.rank_allocation == "adaptive") + calib_key
        fisher_ids = random_subset(ids, opts.fisher_samples, opts.seed, FISHER_STREAM)
        calib_info["fisher_samples"] = int(fisher_ids.shape[0])
        if key not in cache:
            cache[key] = sensitivity_pass(sk, src, fisher_ids, opts.progress, opts.rank_allocation == "adaptive",
                                          opts.damping)
        fisher, spectra = cache[key]
        out_scales = {name: output_weights(f) for name, f in fisher.items()}
    elif opts.rank_allocation == "adaptive":
        key = ("spectra", opts.method == "plain") + calib_key
        if key not in cache:
            cache[key] = spectra_pass(sk, src, ids, opts.method, opts.damping, opts.progress)
        spectra = cache[key]
    try:
        candidates = candidate_allocations(sk, opts, spectra)
    except rk.BudgetError as e:
        raise UserError(f"--ratio: {e}") from None
    selection: Dict = {}
    if len(candidates) == 1:
        (chosen, all_ranks), = candidates.items()
        if chosen != "uniform":
            selection = {"chosen": chosen, "note": "greedy by estimated loss (Fisher-weighted spectra); not scored"}
    else:
        if val is None or opts.method == "plain":
            spectral = [n for n in candidates if n != "uniform"]
            chosen = "spectral-p2" if "spectral-p2" in candidates else spectral[0]
            all_ranks = candidates[chosen]
            selection = {"chosen": chosen, "note": "not scored (plain method or no unused calibration windows)"}
        else:
            scores = selection_pass(sk, src, ids, val, candidates, opts.damping, opts.progress)
            best = min(scores, key=scores.get)
            all_ranks = candidates[best]
            selection = {"chosen": best, "validation_ppl": {k: round(v, 4) for k, v in scores.items()},
                         "validation_tokens": int(val.numel())}
    shapes = mlp_shapes(sk)
    mats = rk.matrices_from_shapes(shapes)
    never = [m.name for m in mats if m.max_rank(opts.block_size) == 0]
    if never:
        warnings.append(f"{len(never)} projection(s) stay dense: no multiple of block size {opts.block_size} "
                        f"saves parameters for their shape (e.g. {never[0]} {list(shapes[never[0]])})")
    achieved = rk.achieved_ratio(mats, all_ranks)
    if abs(achieved - opts.ratio) > 0.03:
        warnings.append(f"achieved MLP ratio {achieved:.4f} is more than 0.03 from the requested {opts.ratio} "
                        f"(block size {opts.block_size} is coarse for these shapes)")
    for w in warnings:
        log.warning(w)

    out_dtype = _out_dtype(src, sk, opts)
    src_dtype = src.torch_dtype(cf.weight_name(module_names(sk, 0)[cf.GATE]))
    cast_all = out_dtype != src_dtype

    lora_info: Dict = {}
    with StagingDir(out_path, opts.overwrite) as stage:
        writer = ShardWriter(stage.path, opts.max_shard_bytes)
        # everything outside the decoder layers is copied first (embeddings, final norm, lm_head)
        layer_prefix = sk.layer_prefix + "."
        for name in sorted(n for n in src.names() if not n.startswith(layer_prefix)):
            writer.add(name, _cast(src.get(name), out_dtype if cast_all else None))
        stats = factor_pass(sk, src, ids, all_ranks, opts, writer, out_dtype, cast_all, on_layer, out_scales)
        writer.finish()
        factored = {n: r for n, r in all_ranks.items() if r != rk.DENSE}
        dense_modules = sorted(n for n, r in all_ranks.items() if r == rk.DENSE)

        config = dict(src.config)
        if cast_all:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = str(out_dtype).replace("torch.", "")
        mlp_before = sum(m.dense for m in mats)
        mlp_after = rk.total_cost(mats, all_ranks)
        params_before = _model_params(src)
        params_after = params_before - (mlp_before - mlp_after)
        provenance = {
            "tool": "vllm-neuronmlp compress",
            "tool_version": TOOL_VERSION,
            "source_model": os.path.abspath(src_path),
            "ratio_requested": opts.ratio,
            "ratio_achieved_mlp": round(achieved, 6),
            "ratio_achieved_model": round(1 - params_after / params_before, 6),
            "method": opts.method,
            "rank_allocation": opts.rank_allocation,
            "allocation_selection": selection,
            "rounding_threshold": opts.rounding_threshold,
            "calibration": calib_info,
            "seed": opts.seed,
            "params_before": params_before,
            "params_after": params_after,
            "bytes_before": src.nbytes(),
            "bytes_after": writer.total_bytes,
            "dtype": str(out_dtype).replace("torch.", ""),
        }
        if opts.lora_steps > 0:
            from vllm_neuronmlp.tools import lora

            write_json(os.path.join(stage.path, cf.CONFIG_FILE),
                       {**config, cf.QUANTIZATION_CONFIG_KEY: cf.QuantizationConfig(
                           block_size=opts.block_size, ranks=factored, provenance=provenance).to_dict()})
            lora_info = lora.recover(stage.path, ids, val, steps=opts.lora_steps, rank=opts.lora_rank,
                                     lr=opts.lora_lr, batch=opts.lora_batch, seed=opts.seed,
                                     progress=opts.progress, max_shard_bytes=opts.max_shard_bytes)
            provenance["lora"] = lora_info
        qc = cf.QuantizationConfig(block_size=opts.block_size, ranks=factored, provenance=provenance)
        config[cf.QUANTIZATION_CONFIG_KEY] = qc.to_dict()
        write_json(os.path.join(stage.path, cf.CONFIG_FILE), config)
        for entry in src.other_files():
            shutil.copy2(os.path.join(src_path, entry), os.path.join(stage.path, entry))
        cf.validate(stage.path, check_values=False)  # never publish a checkpoint that breaks the format
        bytes_after = sum(os.path.getsize(os.path.join(stage.path, f)) for f in os.listdir(stage.path)
                          if f.endswith(".safetensors"))
        stage.commit()
    src.close()
    return CompressResult(
        out=os.path.abspath(out_path), ranks=factored, dense_modules=dense_modules, ratio_requested=opts.ratio,
        ratio_mlp=achieved, ratio_model=1 - params_after / params_before, params_before=params_before,
        params_after=params_after, mlp_params_before=mlp_before, mlp_params_after=mlp_after,
        bytes_before=src.total_bytes_on_disk(), bytes_after=bytes_after, wall_time_s=time.time() - t0,
        method=opts.method, allocation=opts.rank_allocation, num_layers=sk.num_layers, calibration=calib_info,
        jitter_modules=stats["jitter_modules"], lora=lora_info, warnings=warnings, selection=selection)


# ---------------------------------------------------------------------- summary
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(res: CompressResult, sk_layers: Optional[int] = None) -> str:
    lines = [f"compressed -> {res.out}"]
    lines.append(f"  method {res.method}, rank allocation {res.allocation}, {res.num_layers} layers")
    per_layer: Dict[int, Dict[str, str]] = {}
    for name in list(res.ranks) + res.dense_modules:
        layer = rk._layer_index(name)
        proj = name.rpartition(".")[2]
        per_layer.setdefault(layer, {})[proj] = str(res.ranks[name]) if name in res.ranks else "dense"
    lines.append("  ranks per projection (layer: gate up down):")
    rows = []
    for layer in sorted(per_layer):
        d = per_layer[layer]
        rows.append(f"{layer:>3}: {d.get(cf.GATE, '-'):>5} {d.get(cf.UP, '-'):>5} {d.get(cf.DOWN, '-'):>5}")
    for k in range(0, len(rows), 3):
        lines.append("    " + "   |".join(rows[k:k + 3]))
    lines.append(f"  ratio requested {res.ratio_requested:.4f}; achieved: MLP {res.ratio_mlp:.4f}, "
                 f"whole model {res.ratio_model:.4f}")
    lines.append(f"  MLP parameters {res.mlp_params_before:,} -> {res.mlp_params_after:,}; "
                 f"model {res.params_before:,} -> {res.params_after:,}")
    lines.append(f"  size on disk {_human(res.bytes_before)} -> {_human(res.bytes_after)}")
    if res.calibration:
        c = res.calibration
        lines.append(f"  calibration: {c['samples']} x {c['seq_len']} tokens from {', '.join(c['source'])}")
    if res.selection.get("validation_ppl"):
        sc = res.selection["validation_ppl"]
        lines.append(f"  allocation chosen: {res.selection['chosen']} (validation perplexity on "
                     f"{res.selection['validation_tokens']} held-aside calibration tokens: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sc.items()) + ")")
    if res.jitter_modules:
        lines.append(f"  Cholesky needed jitter for {len(res.jitter_modules)} input covariance(s) "
                     f"(e.g. {res.jitter_modules[0]})")
    if res.lora:
        lr = res.lora
        lines.append(f"  LoRA: {lr['steps']} steps, validation perplexity {lr['ppl_before']:.3f} -> "
                     f"{lr['ppl_after']:.3f} ({lr['eval_tokens']} tokens)")
    for w in res.warnings:
        lines.append(f"  warning: {w}")
    lines.append(f"  wall time {res.wall_time_s:.1f} s")
    return "\n".join(lines)
