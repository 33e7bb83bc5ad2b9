"""Streaming a checkpoint one decoder layer at a time (docs/architecture.md).

The model skeleton is built on the `meta` device (no memory); each pass then
materializes one decoder layer on the skeleton's device (CPU, or a CUDA GPU
with `compress --device`) in float32 from its safetensors tensors,
runs the calibration hidden states through it, and drops it again. Peak memory
is one layer plus the activations, never the whole model. Every pass of the
compressor (statistics, allocation scoring, factoring) is built from the
pieces here.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families as fam
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.source import SourceCheckpoint
from vllm_neuronmlp.tools.whitening import GramAccumulator

CHUNK_TOKENS = 4096  # tokens per forward chunk

# the three roles of a gated MLP, act(gate(x)) * up(x) -> down (mlp_families)
GATE, UP, DOWN = fam.GATE, fam.UP, fam.DOWN
ROLES = fam.ROLES
# the attention projections, targeted too with `compress --scope all`
Q, K, V, O = fam.Q, fam.K, fam.V, fam.O
ATTENTION_ROLES = fam.ATTENTION_ROLES
# roles that read the same input, so one Gram matrix serves them: the first is hooked
SHARED_INPUT = {GATE: GATE, UP: GATE, DOWN: DOWN, Q: Q, K: Q, V: Q, O: O}


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
    family: fam.MLPFamily
    device: torch.device = torch.device("cpu")  # where layers are materialized and the passes compute
    roles: Tuple[str, ...] = ROLES  # the targeted projections: the MLP's, plus attention's with --scope all
    # what the model's embedding module multiplies the looked-up rows by (Gemma, Gemma 3: sqrt(hidden))
    embed_scale: float = 1.0

    def layer_type(self, i: int) -> Optional[str]:
        """config.layer_types[i] ("sliding_attention", "full_attention"), or None for a
        model whose layers are all alike."""
        types = getattr(self.config, "layer_types", None)
        return types[i] if types else None

    def sliding_window(self, i: int) -> Optional[int]:
        """How many tokens (itself included) a query of layer i sees, or None for full causal attention."""
        if self.layer_type(i) != "sliding_attention":
            return None
        return getattr(self.config, "sliding_window", None)

    def attr(self, role: str) -> str:
        """Attribute name of a role's projection in its parent (`mlp` or the attention module)."""
        if role in ATTENTION_ROLES:
            return self.family.attention_projection(role)
        return self.family.projection(role)

    def parent(self, layer: nn.Module, role: str) -> nn.Module:
        return getattr(layer, self.family.attention) if role in ATTENTION_ROLES else layer.mlp

    def projection(self, layer: nn.Module, role: str) -> nn.Module:
        return getattr(self.parent(layer, role), self.attr(role))

    def module_name(self, i: int, role: str) -> str:
        owner = self.family.attention if role in ATTENTION_ROLES else "mlp"
        return f"{self.layer_prefix}.{i}.{owner}.{self.attr(role)}"

    def module_names(self, i: int) -> Dict[str, str]:
        """{role: full module name} of layer i's targeted projections (MLP first)."""
        return {role: self.module_name(i, role) for role in self.roles}

    @property
    def targets_attention(self) -> bool:
        return any(r in ATTENTION_ROLES for r in self.roles)

    def shapes(self, roles: Optional[Tuple[str, ...]] = None) -> Dict[str, Tuple[int, int]]:
        """{module: (in, out)} of the projections of `roles` (default: the
        targeted ones) in every layer, read from the layer modules."""
        out = {}
        for i, layer in enumerate(self.layers):
            for role in (self.roles if roles is None else roles):
                lin = self.projection(layer, role)
                out[self.module_name(i, role)] = (lin.in_features, lin.out_features)
        return out


def build_skeleton(src: SourceCheckpoint, device: str = "cpu", attention: bool = False) -> Skeleton:
    """The model on the meta device; `attention` targets the attention
    projections as well as the MLP's (`compress --scope all`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "text_config" in src.config:
        raise UserError(f"{src.path}: multimodal configs (with text_config) are not supported; "
                        f"compress a text-only causal LM ({', '.join(fam.supported_model_types())})")
    try:
        family = fam.family_for_config(src.config)
    except fam.UnsupportedModelError as e:
        raise UserError(f"{os.path.join(src.path, cf.CONFIG_FILE)}: {e}") from None
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"{os.path.join(src.path, cf.CONFIG_FILE)}: "
                        f"transformers cannot read this config ({e})") from None
    config._attn_implementation = "sdpa"  # causal attention (sliding-window layers get a mask, LayerRunner)
    _refuse_unstreamed_features(src, config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"{src.path}: transformers cannot build a causal LM from this config ({e})") from None
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    expected = "/".join(family.projections)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UserError(f"{src.path}: {type(model).__name__} has no decoder layer list at "
                        f"{model.base_model_prefix}.layers; the {family.name} family expects an MLP of {expected}")
    prefix = f"{model.base_model_prefix}.layers"
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        missing = [p for p in family.projections if not isinstance(getattr(mlp, p, None), nn.Linear)]
        if mlp is None or missing:
            raise UserError(f"{src.path}: {prefix}.{i}.mlp has no {', '.join(missing) or 'MLP'} linear; the "
                            f"{family.name} family expects {expected}")
        for p in family.projections:
            name = cf.weight_name(f"{prefix}.{i}.mlp.{p}")
            if name not in src.files:
                raise cf.CheckpointFormatError(f"{src.path}: tensor {name} is missing from the safetensors files")
            if getattr(mlp, p).bias is not None or f"{prefix}.{i}.mlp.{p}.bias" in src.files:
                raise UserError(f"{src.path}: {prefix}.{i}.mlp.{p} has a bias; format v1 factors bias-free MLPs only")
        attn = getattr(layer, family.attention, None)
        missing = [p for p in family.attention_projections if not isinstance(getattr(attn, p, None), nn.Linear)]
        if attention and missing:
            raise UserError(f"{src.path}: {prefix}.{i}.{family.attention} has no {', '.join(missing)} linear; "
                            f"--scope all factors the {family.name} family's "
                            f"{'/'.join(family.attention_projections)}")
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
    dev = torch.device(device)
    if rotary is not None:
        rotary = rotary.to(dev)
    # Gemma's embedding module scales the rows it looks up (its `scalar_embed_scale`); models that scale
    # in the config instead (Granite-style `embedding_multiplier`) say so there
    embed_scale = float(getattr(embed_module, "scalar_embed_scale", 1.0)) * float(
        getattr(config, "embedding_multiplier", None) or 1.0)
    return Skeleton(config, model, layers, prefix, embed_name, rotary, len(layers), int(config.hidden_size),
                    int(config.intermediate_size), family, dev, ROLES + (ATTENTION_ROLES if attention else ()),
                    embed_scale)


def _refuse_unstreamed_features(src: SourceCheckpoint, config) -> None:
    """Config settings the streamed forward does not reproduce: refused by name, never run wrongly."""
    where = os.path.join(src.path, cf.CONFIG_FILE)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None):
            raise UserError(f"{where}: {key} = {getattr(config, key)} is not supported (the streamed forward "
                            f"computes plain logits and attention scores)")
    if getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"{where}: use_bidirectional_attention is not supported; compress a causal LM")


def materialize_layer(sk: Skeleton, src: SourceCheckpoint, i: int) -> nn.Module:
    """Decoder layer i on the skeleton's device in float32 with its weights from the checkpoint."""
    layer = sk.layers[i]
    prefix = f"{sk.layer_prefix}.{i}."
    state = {key: src.get(prefix + key).to(sk.device, torch.float32) for key in layer.state_dict().keys()}
    # assign: the loaded tensors become the parameters (no second copy of the layer)
    layer.load_state_dict(state, strict=True, assign=True)
    del state
    left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{src.path}: {prefix}{left[0]} is neither a stored tensor nor computable; cannot "
                        f"materialize layer {i}")
    layer.eval()
    return layer


def release_layer(sk: Skeleton, i: int) -> None:
    sk.layers[i].to("meta")
    return_freed_memory()


def return_freed_memory() -> None:
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
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def materialize_head(sk: Skeleton, src: SourceCheckpoint) -> Tuple[nn.Module, torch.Tensor]:
    """(final norm on the skeleton's device in float32, LM head weight [vocab, hidden] in float32);
    tied embeddings are used as the head when there is no lm_head tensor.
    Call `norm.to("meta")` when done."""
    base = getattr(sk.model, sk.model.base_model_prefix)
    norm = base.norm
    norm.to_empty(device=sk.device)
    norm_name = [n for n, m in sk.model.named_modules() if m is norm][0]
    norm.load_state_dict({k: src.get(f"{norm_name}.{k}").float() for k in norm.state_dict()})
    norm.requires_grad_(False)
    head_name = "lm_head.weight" if "lm_head.weight" in src.files else sk.embed_name
    return norm, src.get(head_name).to(sk.device, torch.float32)


def embed(sk: Skeleton, src: SourceCheckpoint, ids: torch.Tensor) -> torch.Tensor:
    """Input hidden states [n, S, hidden] (float32, on the skeleton's device) of token windows `ids` [n, S],
    scaled as the model's embedding scales them (`Skeleton.embed_scale`)."""
    w = src.get(sk.embed_name)
    x = torch.nn.functional.embedding(ids, w).to(sk.device, torch.float32)
    if sk.embed_scale != 1.0:
        x = x * sk.embed_scale
    return x


def chunks(n: int, seq_len: int) -> List[slice]:
    """Slices of the window axis, about CHUNK_TOKENS tokens each."""
    per = max(1, CHUNK_TOKENS // seq_len)
    return [slice(s, min(n, s + per)) for s in range(0, n, per)]


class _Stop(Exception):
    pass


def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S] boolean, True where query q may read key k: causal, and at most `window`
    tokens back, itself included (k > q - window, as transformers' and vLLM's sliding windows)."""
    q = torch.arange(seq_len, device=device).unsqueeze(1)
    k = torch.arange(seq_len, device=device).unsqueeze(0)
    return ((k <= q) & (k > q - window)).view(1, 1, seq_len, seq_len)


class LayerRunner:
    """Runs one materialized decoder layer over chunks of hidden states and
    captures the inputs of the MLP (shared by gate and up) and of down.

    A model with several layer kinds (Gemma 3: sliding-window layers between
    global ones, `config.layer_types`) gets each kind's rotary embedding (its own
    base) and mask, as the transformers model hands them to its layers; full
    causal attention needs no mask tensor (sdpa's causal flag)."""

    def __init__(self, sk: Skeleton, seq_len: int):
        self.sk = sk
        self.position_ids = torch.arange(seq_len, device=sk.device).unsqueeze(0)
        self.layer_index = {id(layer): i for i, layer in enumerate(sk.layers)}
        kinds = sorted({sk.layer_type(i) for i in range(sk.num_layers)}, key=str)
        self.position_embeddings: Dict[Optional[str], object] = {}
        if sk.rotary is not None:
            dummy = torch.zeros(1, seq_len, sk.hidden, device=sk.device)
            per_kind = "layer_type" in inspect.signature(sk.rotary.forward).parameters
            with torch.no_grad():
                for kind in kinds:
                    self.position_embeddings[kind] = (sk.rotary(dummy, self.position_ids, kind) if per_kind
                                                      else sk.rotary(dummy, self.position_ids))
        self.masks: Dict[int, torch.Tensor] = {}
        for i in range(sk.num_layers):
            window = sk.sliding_window(i)
            if window is not None and window < seq_len:
                self.masks[i] = sliding_window_mask(seq_len, window, sk.device)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        i = self.layer_index[id(layer)]
        kwargs = dict(attention_mask=self.masks.get(i), position_ids=self.position_ids.expand(x.shape[0], -1))
        if self.position_embeddings:
            kwargs["position_embeddings"] = self.position_embeddings[self.sk.layer_type(i)]
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
            hooks.append(self.sk.projection(layer, DOWN).register_forward_pre_hook(
                grab("down_in", stop_at == "down"), with_kwargs=True))
        try:
            got["out"] = self.forward(layer, x)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return got


def attach_input_grams(sk: Skeleton, layer: nn.Module, roles: Optional[Tuple[str, ...]] = None
                       ) -> Tuple[Dict[str, GramAccumulator], List]:
    """Forward pre-hooks that accumulate the float64 Gram matrix of the input of
    every projection of `roles` (default: the targeted ones) while `layer` runs:
    ({role: accumulator}, hook handles to remove). Roles that read the same
    input (gate and up; q, k and v) share one accumulator."""
    roles = sk.roles if roles is None else roles
    grams: Dict[str, GramAccumulator] = {}
    hooks = []
    for role in roles:
        first = SHARED_INPUT[role]
        if first not in grams:
            lin = sk.projection(layer, first)
            grams[first] = GramAccumulator(lin.in_features, device=sk.device)
            hooks.append(lin.register_forward_pre_hook(_accumulate(grams[first])))
        grams[role] = grams[first]
    return {role: grams[role] for role in roles}, hooks


def _accumulate(acc: GramAccumulator):
    def hook(_mod, args):
        acc.add(args[0].detach())
    return hook


def input_grams(sk: Skeleton, runner: LayerRunner, layer: nn.Module, x: torch.Tensor,
                roles: Optional[Tuple[str, ...]] = None) -> Dict[str, GramAccumulator]:
    """Run `x` through `layer` in place; the input Gram matrices of `roles`
    (default: the targeted projections), as `attach_input_grams`."""
    grams, hooks = attach_input_grams(sk, layer, roles)
    try:
        with torch.no_grad():
            for sl in chunks(x.shape[0], x.shape[1]):
                x[sl] = runner.forward(layer, x[sl])
    finally:
        for h in hooks:
            h.remove()
    return grams


def factored_module(u: torch.Tensor, v: torch.Tensor) -> nn.Module:
    """A frozen `SVDLinear` computing `(x U) V` (ops.factored_linear), float32, on U's device."""
    from vllm_neuronmlp.hf_quantizer import SVDLinear

    mod = SVDLinear(u.shape[0], v.shape[1], u.shape[1], dtype=torch.float32).to(u.device)
    with torch.no_grad():
        getattr(mod, cf.U_SUFFIX).copy_(u)
        getattr(mod, cf.V_SUFFIX).copy_(v)
    return mod.requires_grad_(False)


@contextlib.contextmanager
def swapped(sk: Skeleton, layer: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Within the block, layer's projections {role: module} are replaced."""
    dense = {role: sk.projection(layer, role) for role in modules}
    for role, mod in modules.items():
        setattr(layer.mlp, sk.attr(role), mod)
    try:
        yield
    finally:
        for role, mod in dense.items():
            setattr(layer.mlp, sk.attr(role), mod)
