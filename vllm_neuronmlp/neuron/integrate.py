"""Install the svd_neuron model variant into vllm-neuron's native line, or refuse clearly.

`install()` runs from our `vllm.general_plugins` entry point (vllm_neuronmlp.register) in
every vLLM process. With no vllm-neuron installed it returns at once and touches nothing.
When vllm-neuron is the active platform it:

native line (0.21+; the sources read are listed in docs/trainium.md)
  1. adds `svd_neuron` to the platform's `supported_quantization` (vllm_neuron/vllm/platform.py,
     `NeuronPlatform.supported_quantization`), so vLLM's own check (ModelConfig
     `_verify_quantization` -> `Platform.verify_quantization`) accepts the checkpoint with or
     without `--quantization svd_neuron`;
  2. wraps the platform's `check_and_update_config` to refuse, before anything compiles, an
     architecture we cannot serve, a class the registry resolves that lacks what we hook
     (named with its path and the vllm-neuron version), a TP degree that cannot split a factored
     attention's heads the way the stock attention splits them (format v3), or
     an intermediate size (or a format-v2 layer width) the MLP's TP degree does not divide;
  3. patches the classes vllm_neuron/model/registry.py resolves, whichever module defines
     them (registry.py imports them from the packages `llama3` and `qwen3`; qwen3 has two
     implementations, model.py and model_bf16.py, and a factory): each package's exported
     class is patched as the package loads, `get_models()` is checked on every call, and a
     class whose `from_configs` returns another class's instance (qwen3/factory.py) gets
     that class's load entry points patched too:
       * `from_configs(hf_config, neuron_config)`: build the stock model from a copy of the
         config without our `quantization_config` (the stock Llama config code,
         vllm_neuron/model/llama3/quantization.py `QuantizationSpec.from_hf_quantization_config`,
         rejects unknown quant methods), then replace the MLP of every layer listed in
         `ranks` or narrowed by `widths` (format v2) by `SVDNeuronMLP` built at that layer's
         width (layers neither factored nor narrowed stay stock), and the attention of every
         layer whose q/k/v/o `ranks` lists (format v3) by `SVDNeuronAttention`, sharded like
         the stock attention, with the stock q/k norm modules (Qwen3);
       * `load_weights(checkpoint_path, device, cache_dir)`: check the checkpoint's tensor
         names and shapes for the replaced modules against our parameters (names.py), run
         the stock loader (which fills our parameters through their `ShardLoader`, on the
         host), then refuse a half-loaded model, decide each module's compute path (devices
         and dtypes only: no arithmetic on loaded weights) and log this rank's shard checksum;
       * `load_weights_lite(...)` (the CPU-compile load: KV-cache scales only): run it, then
         decide each module's path without data, so the traced graph reads our parameters;
         any other `load_weights*` entry point refuses an svd_neuron model by name.
0.2.x (NxD Inference) or a layout we do not recognise
  wraps `check_and_update_config` to refuse svd_neuron checkpoints with a message naming
  the stack, the version found and what is supported (stack.py). Its platform turned vLLM's
  quantization check into a no-op, so without this the checkpoint would load as dense.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.import_hooks import call_after_import
from vllm_neuronmlp.neuron import stack as stack_mod
from vllm_neuronmlp.neuron.sharding import intermediate_shard
from vllm_neuronmlp.neuron.stack import class_path

logger = logging.getLogger(__name__)
# Lines meant for the server log go through a child of vLLM's `vllm` logger: vLLM's logging
# config (vllm/logger.py) gives a handler to that hierarchy only, so INFO from our own
# `vllm_neuronmlp.*` loggers never reaches a `vllm serve` log.
SERVING_LOG = logging.getLogger("vllm.vllm_neuronmlp")


@dataclass(frozen=True)
class ModelHook:
    architecture: str   # HF config `architectures` entry the registry maps
    package: str        # the package vllm_neuron/model/registry.py imports the class from
    cls: str


# vllm_neuron/model/registry.py: `from .llama3 import LlamaForCausalLM`, `from .qwen3 import Qwen3ForCausalLM`.
MODEL_HOOKS: Tuple[ModelHook, ...] = (
    ModelHook("LlamaForCausalLM", "vllm_neuron.model.llama3", "LlamaForCausalLM"),
    ModelHook("Qwen3ForCausalLM", "vllm_neuron.model.qwen3", "Qwen3ForCausalLM"),
)
SUPPORTED_ARCHITECTURES = tuple(h.architecture for h in MODEL_HOOKS)
REGISTRY_MODULE = "vllm_neuron.model.registry"
LOAD_ENTRY_POINTS = ("load_weights", "load_weights_lite")   # what llama3/model.py and qwen3/model.py define
_PATCHED = "_vllm_neuronmlp_patched"
_LOAD_PATCHED = "_vllm_neuronmlp_load_patched"
_WRAPPER = "_vllm_neuronmlp_wrapper"

_STACK: Optional[stack_mod.NeuronStack] = None   # what install() found, named in every refusal
_RESOLVED: Dict[str, str] = {}                   # architecture -> path of the class the registry resolves
_PROBLEMS: Dict[str, str] = {}                   # architecture -> why its hooks could not be installed


def _stack_text() -> str:
    return _STACK.describe() if _STACK is not None and _STACK.installed else "vllm-neuron not detected"


# ---------------------------------------------------------------- config helpers
def _config_dict(hf_config: Any) -> Dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if isinstance(hf_config, (str, bytes, os.PathLike)):
        with open(hf_config) as f:
            return json.load(f)
    return hf_config.to_dict()


def svd_quant_config(hf_config: Any) -> Optional[cf.QuantizationConfig]:
    """Our parsed quantization config (format v1, v2 or v3) when the model config carries one,
    else None; an unknown format version or a malformed key is refused by the format module."""
    cfg = _config_dict(hf_config)
    if not cf.has_svd_config(cfg):
        return None
    return cf.QuantizationConfig.from_dict(cfg[cf.QUANTIZATION_CONFIG_KEY], source=cf.CONFIG_FILE)


def without_quantization(hf_config: Any) -> Any:
    """A copy of the model config without `quantization_config` (the stock config code
    would reject ours); the original is left untouched."""
    if isinstance(hf_config, (Mapping, str, bytes, os.PathLike)):
        cfg = _config_dict(hf_config)
        cfg.pop(cf.QUANTIZATION_CONFIG_KEY, None)
        return cfg
    stripped = copy.deepcopy(hf_config)
    if hasattr(stripped, cf.QUANTIZATION_CONFIG_KEY):
        delattr(stripped, cf.QUANTIZATION_CONFIG_KEY)
    return stripped


def _text_dims(cfg: Mapping[str, Any]) -> Tuple[int, int, int]:
    text = cfg.get("text_config") or cfg
    return int(text["hidden_size"]), int(text["intermediate_size"]), int(text["num_hidden_layers"])


def ranks_by_layer(quant: cf.QuantizationConfig, family: mlp_families.MLPFamily,
                   num_layers: int) -> Tuple[Dict[int, Dict[str, int]], Dict[int, Dict[str, int]]]:
    """({layer: {MLP role: rank}}, {layer: {attention role: rank}}) from `ranks`; a named
    error for a module the model lacks."""
    mlps: Dict[int, Dict[str, int]] = {}
    attentions: Dict[int, Dict[str, int]] = {}
    prefix = f"{family.layer_prefix}."
    for module, rank in quant.ranks.items():
        attention_role = mlp_families.attention_role_of(module)
        owner = f".{family.attention}." if attention_role else ".mlp."
        head, _, proj = module.rpartition(owner)
        layer = head[len(prefix):] if head.startswith(prefix) else ""
        known = family.attention_projections if attention_role else family.projections
        if not layer.isdigit() or proj not in known or int(layer) >= num_layers:
            raise cf.CheckpointFormatError(
                f"{cf.CONFIG_FILE} {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_RANKS} lists {module!r}, which is not an "
                f"MLP or attention projection of this {family.name} model ({num_layers} layers, modules "
                f"{family.layer_prefix}.<i>.mlp.{{{','.join(family.projections)}}} and "
                f"{family.layer_prefix}.<i>.{family.attention}.{{{','.join(family.attention_projections)}}})")
        if attention_role:
            attentions.setdefault(int(layer), {})[attention_role] = rank
        else:
            mlps.setdefault(int(layer), {})[mlp_families.role_of(module)] = rank
    return mlps, attentions


def widths_by_layer(quant: cf.QuantizationConfig, family: mlp_families.MLPFamily,
                    num_layers: int) -> Dict[int, int]:
    """{layer: width} of the layers format v2 narrows (read with `quant.width_of`); a named
    error for a `widths` entry that is not an MLP of this model (it would be ignored)."""
    first = family.projections[0]
    out = {i: quant.width_of(mlp_families.module_name(family, i, first)) for i in range(num_layers)}
    known = {cf.mlp_module(mlp_families.module_name(family, i, first)) for i in range(num_layers)}
    unknown = sorted(set(quant.widths) - known)
    if unknown:
        raise cf.CheckpointFormatError(
            f"{cf.CONFIG_FILE} {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_WIDTHS} lists {unknown}, which "
            f"{'is' if len(unknown) == 1 else 'are'} not an MLP of this {family.name} model ({num_layers} layers, "
            f"modules {family.layer_prefix}.<i>.mlp)")
    return {i: w for i, w in out.items() if w is not None}


# ---------------------------------------------------------------- the model variant
# Where the stock attentions keep their per-head q/k norms (qwen3/model.py `Qwen3Attention`:
# q_norm / k_norm; qwen3/model_bf16.py: q_layernorm / k_layernorm); Llama has none.
QK_NORM_NAMES = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
QK_NORM_MODEL_TYPES = ("qwen3",)


def check_attention_split(hf_config: Any, quant: cf.QuantizationConfig, tp: int, source: str) -> None:
    """A factored attention is split like the stock one (heads over the TP ranks, KV heads
    replicated past their count): refuse a degree that cannot, before anything is built."""
    if not quant.attention_ranks():
        return
    from vllm_neuronmlp.neuron.attention import HeadSharding

    cfg = _config_dict(hf_config)
    text = cfg.get("text_config") or cfg
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    HeadSharding.checked(heads, kv_heads, head_dim, tp, 0, f"{source}: the factored attention")


@dataclass
class VariantInfo:
    quant: cf.QuantizationConfig
    family: mlp_families.MLPFamily
    layers: Tuple[int, ...]           # layers whose MLP the variant replaced
    attention_layers: Tuple[int, ...] = ()   # layers whose attention it replaced (format v3)
    resolved: str = ""          # the class whose from_configs built the model (what the registry resolves)
    implementation: str = ""    # the model's own class (the same, or a factory's product)


def _stock_slot(layer, i: int):
    """(stock dense MLP, our class) for one decoder layer, by the upstream layout:
    llama3/model.py and qwen3/model.py hold the dense MLP as `layer.mlp` (`gate_proj_weight`
    ...); qwen3/model_bf16.py holds a wrapper with `is_moe` and `dense_mlp`."""
    from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP, SVDNeuronWrapperMLP

    mlp = getattr(layer, "mlp", None)
    where = f"model.layers.{i}.mlp"
    if mlp is not None and hasattr(mlp, "is_moe"):
        if mlp.is_moe:
            raise cf.CheckpointFormatError(
                f"{cf.CONFIG_FILE} {cf.QUANTIZATION_CONFIG_KEY} lists {where}, a mixture-of-experts layer of "
                f"{class_path(mlp)} (is_moe); the svd_neuron variant factors dense MLPs only")
        stock = getattr(mlp, "dense_mlp", None)
        if stock is not None:
            return stock, SVDNeuronWrapperMLP
    elif mlp is not None and hasattr(mlp, "gate_proj_weight"):
        return mlp, SVDNeuronMLP
    raise stack_mod.HookTargetError(
        f"{class_path(mlp)} at {where} is neither a dense MLP with `gate_proj_weight` (llama3/model.py LlamaMLP, "
        f"qwen3/model.py Qwen3MLP) nor qwen3/model_bf16.py's wrapper (`is_moe`, `dense_mlp`); the svd_neuron "
        f"variant does not know where its MLP goes ({_stack_text()})")


def _svd_attention(layer, i: int, family: mlp_families.MLPFamily, ranks: Dict[str, int], cfg: Mapping[str, Any]):
    """Our attention in place of layer i's stock one (llama3/model.py, qwen3/model.py and
    model_bf16.py hold it as `layer.self_attn`), with the stock q/k norm modules (Qwen3)."""
    from vllm_neuronmlp.neuron.attention import SVDNeuronAttention

    stock = getattr(layer, family.attention, None)
    if stock is None:
        raise stack_mod.HookTargetError(f"{class_path(layer)} at {family.layer_prefix}.{i} has no "
                                        f"`{family.attention}`, where the svd_neuron variant puts the factored "
                                        f"attention ({_stack_text()})")
    qk = next((pair for pair in QK_NORM_NAMES if all(hasattr(stock, n) for n in pair)), ())
    model_type = str((cfg.get("text_config") or cfg).get("model_type", ""))
    if not qk and model_type in QK_NORM_MODEL_TYPES:
        raise stack_mod.HookTargetError(
            f"{class_path(stock)} (the stock attention of {family.layer_prefix}.{i}) has none of the q/k norm modules "
            f"{[list(p) for p in QK_NORM_NAMES]} a {model_type} attention applies after its projections "
            f"({_stack_text()})")
    try:
        return SVDNeuronAttention.from_stock(stock, layer=i, family=family, ranks=ranks, qk_norm_names=qk)
    except stack_mod.HookTargetError as e:
        raise stack_mod.HookTargetError(f"{e} ({_stack_text()})") from None


def install_variant(model, quant: cf.QuantizationConfig, hf_config: Any, resolved: str = "") -> VariantInfo:
    """Replace the MLP of every layer listed in `ranks` or narrowed by `widths`, each built
    at its own width, and the attention of every layer whose q/k/v/o `ranks` lists (format
    v3); other modules stay stock."""
    cfg = _config_dict(hf_config)
    family = mlp_families.family_for_config(cfg)
    hidden, intermediate, _ = _text_dims(cfg)
    layers = getattr(getattr(model, "model", None), "layers", None)   # *ForCausalLM.model.layers
    if layers is None:
        raise stack_mod.HookTargetError(f"{class_path(model)} has no `model.layers`, where the svd_neuron variant "
                                        f"replaces MLPs ({_stack_text()})")
    plan, attention_plan = ranks_by_layer(quant, family, len(layers))
    widths = widths_by_layer(quant, family, len(layers))
    replaced = sorted(set(plan) | set(widths))
    for i in replaced:
        stock, ours = _stock_slot(layers[i], i)
        try:
            layers[i].mlp = ours.from_stock(stock, layer=i, family=family, hidden_size=hidden,
                                            intermediate_size=widths.get(i, intermediate), ranks=plan.get(i, {}),
                                            narrowed=i in widths, stock_intermediate_size=intermediate)
        except stack_mod.HookTargetError as e:
            raise stack_mod.HookTargetError(f"{e} ({_stack_text()})") from None
    for i, attention_ranks in sorted(attention_plan.items()):
        layers[i].self_attn = _svd_attention(layers[i], i, family, attention_ranks, cfg)
    info = VariantInfo(quant, family, tuple(replaced), tuple(sorted(attention_plan)), resolved or class_path(model),
                       class_path(model))
    model._svd_neuron = info
    # Per rank, factors beat the dense shard only while r < H (I/tp) / (H + I/tp) (docs/trainium.md);
    # each layer is compared with its dense shard at its own width.
    ours = sum(p.numel() for i in replaced for p in layers[i].mlp.parameters())
    dense = sum(cf.mlp_params(hidden, layers[i].mlp.intermediate_size_per_rank) for i in replaced)
    SERVING_LOG.info("vllm-neuronmlp: %d of %d %s MLPs replaced by the svd_neuron variant (%d factored, %d narrowed "
                     "by format-v2 widths) and %d attentions (factored q/k/v/o) in %s (registry class %s); the MLPs' "
                     "parameters per rank: %.1f M (dense at the same widths: %.1f M)", len(replaced), len(layers),
                     family.name, len(plan), len(widths), len(attention_plan), info.implementation, info.resolved,
                     ours / 1e6, dense / 1e6)
    if ours > dense:
        SERVING_LOG.warning("vllm-neuronmlp: at this tensor-parallel degree the factored MLPs hold more parameters "
                            "per rank than the dense ones would (%d > %d); a lower degree or lower ranks would save "
                            "memory", ours, dense)
    return info


def _checkpoint_tensor_shapes(checkpoint_path: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """{tensor: shape} from the safetensors headers (no data read), None for a hub name."""
    if not os.path.isdir(str(checkpoint_path)):
        return None   # a hub name: the reader downloads it; our after-load check still runs
    files = cf.safetensors_files(str(checkpoint_path))
    shapes: Dict[str, Tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        for name, header in cf.read_safetensors_header(path).items():
            if name in files:
                shapes[name] = tuple(header["shape"])
    return shapes


# ---------------------------------------------------------------- the patches
SHARD_LINE = ("vllm-neuronmlp: svd_neuron shards loaded: rank {rank} of {tp}, {mlps} MLPs, class {implementation} "
              "(registry: {resolved}), checksum split={split!r} replicated={replicated!r}")
_SHARD_RE = re.compile(r"svd_neuron shards loaded: rank (?P<rank>\d+) of (?P<tp>\d+), (?P<mlps>\d+) MLPs, class "
                       r"(?P<implementation>\S+) \(registry: (?P<resolved>\S+)\), checksum split=(?P<split>\S+) "
                       r"replicated=(?P<replicated>\S+)")


PATHS_LINE = "vllm-neuronmlp: svd_neuron compute paths, rank {rank}: {paths}"
_PATHS_RE = re.compile(r"svd_neuron compute paths, rank (?P<rank>\d+): (?P<paths>.*)$")


def paths_text(model) -> str:
    """`module: role=path ...` for every module the variant put in, joined by " | "."""
    from vllm_neuronmlp.neuron import names

    return " | ".join(f"{path}: {module.path_summary()}" for path, module in names.variant_modules(model).items())


def parse_paths_line(line: str) -> Optional[Dict[str, Any]]:
    """{"rank": r, "modules": {module: {role: path}}} from a PATHS_LINE, None if none."""
    m = _PATHS_RE.search(line)
    if m is None:
        return None
    modules = {}
    for item in m.group("paths").split(" | "):
        module, _, rest = item.partition(": ")
        modules[module] = dict(w.split("=", 1) for w in rest.split() if "=" in w)
    return {"rank": int(m.group("rank")), "modules": modules}


def parse_shard_line(line: str) -> Optional[Dict[str, Any]]:
    """The fields of a SHARD_LINE in `line` (a server log line), None if it has none."""
    m = _SHARD_RE.search(line)
    if m is None:
        return None
    out: Dict[str, Any] = dict(m.groupdict())
    for k in ("rank", "tp", "mlps"):
        out[k] = int(out[k])
    for k in ("split", "replicated"):
        out[k] = float(out[k])
    return out


def _is_ours(fn) -> bool:
    return getattr(getattr(fn, "__func__", fn), _WRAPPER, False)


def _marked(fn):
    setattr(fn, _WRAPPER, True)
    return fn


def _wrap_load_weights(cls, original):
    from vllm_neuronmlp.neuron import names

    @functools.wraps(original)
    def load_weights(self, checkpoint_path, *args, **kwargs):
        info = getattr(self, "_svd_neuron", None)
        if info is None:     # a dense model, or a factory delegating to the model that holds our MLPs
            return original(self, checkpoint_path, *args, **kwargs)
        tensors = _checkpoint_tensor_shapes(checkpoint_path)
        if tensors is not None:
            names.check_tensors(tensors, self, source=str(checkpoint_path))
        result = original(self, checkpoint_path, *args, **kwargs)
        names.check_loaded(self)
        for module in names.variant_modules(self).values():
            module.finalize()
        checksums = names.shard_checksums(self)
        SERVING_LOG.info(SHARD_LINE.format(implementation=info.implementation, resolved=info.resolved, **checksums))
        SERVING_LOG.info(PATHS_LINE.format(rank=checksums["rank"], paths=paths_text(self)))
        return result
    return _marked(load_weights)


def _wrap_load_weights_lite(cls, original):
    from vllm_neuronmlp.neuron import names

    @functools.wraps(original)
    def load_weights_lite(self, checkpoint_path, *args, **kwargs):
        result = original(self, checkpoint_path, *args, **kwargs)
        if getattr(self, "_svd_neuron", None) is not None:
            device = args[0] if args else kwargs.get("device")
            modules = names.variant_modules(self).values()
            for module in modules:
                module.prepare_weightless(device)
            paths = {module.compute_path for module in modules}
            SERVING_LOG.info("vllm-neuronmlp: %s compiled before its weights (load_weights_lite): the svd_neuron MLPs "
                             "trace their %s path, reading factors as parameters and buffers", class_path(self),
                             "/".join(sorted(paths)))
        return result
    return _marked(load_weights_lite)


def _refusing_entry_point(cls, name, original):
    @functools.wraps(original)
    def entry(self, *args, **kwargs):
        if getattr(self, "_svd_neuron", None) is not None:
            raise stack_mod.HookTargetError(
                f"{class_path(cls)}.{name} is a load entry point the svd_neuron variant does not know (it wraps "
                f"{', '.join(LOAD_ENTRY_POINTS)}); refusing to load an svd_neuron checkpoint through it "
                f"({_stack_text()}); vllm_neuronmlp/neuron/integrate.py must learn it first")
        return original(self, *args, **kwargs)
    return _marked(entry)


def patch_load_entry_points(cls) -> None:
    """Wrap every load entry point of a model class (idempotent): `load_weights`
    (required), `load_weights_lite`, and a refusal for any other `load_weights*`."""
    if cls.__dict__.get(_LOAD_PATCHED, False):
        return
    if not callable(getattr(cls, "load_weights", None)):
        raise stack_mod.HookTargetError(
            f"{class_path(cls)} has no callable `load_weights`, the load entry point the svd_neuron variant wraps "
            f"({_stack_text()}); if upstream renamed it, vllm_neuronmlp/neuron/integrate.py must follow")
    for name in sorted(n for n in dir(cls) if n.startswith("load_weights")):
        original = getattr(cls, name)
        if not callable(original) or _is_ours(original):
            continue          # not a method, or inherited from a class we already patched
        if name == "load_weights":
            setattr(cls, name, _wrap_load_weights(cls, original))
        elif name == "load_weights_lite":
            setattr(cls, name, _wrap_load_weights_lite(cls, original))
        else:
            setattr(cls, name, _refusing_entry_point(cls, name, original))
    setattr(cls, _LOAD_PATCHED, True)


def _is_model_class(cls) -> bool:
    """A class implementing vllm-neuron's model interface (load_weights, get_kv_spec,
    bind_kv_cache, ...) rather than a factory whose `from_configs` returns another class's
    instance (qwen3/factory.py)."""
    return any(hasattr(cls, n) for n in ("load_weights", "get_kv_spec", "bind_kv_cache"))


def patch_model_class(cls) -> None:
    """Wrap `from_configs` and, for a model class, its load entry points (idempotent); a
    factory's product gets its load entry points when `from_configs` returns it. A class
    without them is refused with its path and the vllm-neuron version."""
    if cls.__dict__.get(_PATCHED, False):
        return
    if not isinstance(inspect.getattr_static(cls, "from_configs", None), classmethod):
        raise stack_mod.HookTargetError(
            f"{class_path(cls)} has no classmethod `from_configs`, the build entry point the svd_neuron variant wraps "
            f"({_stack_text()}); if upstream renamed it, vllm_neuronmlp/neuron/integrate.py must follow")
    if _is_model_class(cls):
        patch_load_entry_points(cls)
    if not _is_ours(cls.from_configs):
        original_from_configs = cls.from_configs.__func__

        def from_configs(klass, hf_config, *args, **kwargs):
            quant = svd_quant_config(hf_config)
            if quant is None:
                return original_from_configs(klass, hf_config, *args, **kwargs)
            model = original_from_configs(klass, without_quantization(hf_config), *args, **kwargs)
            patch_load_entry_points(type(model))
            install_variant(model, quant, hf_config, resolved=class_path(klass))
            return model

        from_configs.__doc__ = f"{original_from_configs.__doc__ or ''}\n(vllm-neuronmlp: svd_neuron MLPs)"
        cls.from_configs = classmethod(_marked(from_configs))
    setattr(cls, _PATCHED, True)


# ---------------------------------------------------------------- import hooks and the registry
def _patch_resolved(hook: ModelHook, cls, where: str) -> None:
    """Patch the class `where` resolves for `hook.architecture`; record why not."""
    try:
        patch_model_class(cls)
    except stack_mod.HookTargetError as e:
        _PROBLEMS[hook.architecture] = str(e)
        logger.error("vllm-neuronmlp: %s; svd_neuron checkpoints of %s will be refused", e, hook.architecture)
        return
    _PROBLEMS.pop(hook.architecture, None)
    _RESOLVED[hook.architecture] = class_path(cls)
    logger.info("vllm-neuronmlp: %s resolves %s to %s (patched)", where, hook.architecture, class_path(cls))


def _package_hook(hook: ModelHook) -> Callable:
    def patch(module):
        cls = getattr(module, hook.cls, None)
        if cls is None:
            _PROBLEMS[hook.architecture] = f"{hook.package} exports no {hook.cls} ({_stack_text()})"
            logger.error("vllm-neuronmlp: %s", _PROBLEMS[hook.architecture])
            return
        _patch_resolved(hook, cls, hook.package)
    return patch


def _check_models(models) -> None:
    for arch, cls in list(models or ()):
        hook = next((h for h in MODEL_HOOKS if h.architecture == arch), None)
        if hook is not None and isinstance(cls, type) and not cls.__dict__.get(_PATCHED, False):
            _patch_resolved(hook, cls, f"{REGISTRY_MODULE}.get_models()")


def _registry_hook(module) -> None:
    """vllm_neuron/model/registry.py: every `get_models()` call patches what it returns."""
    original = getattr(module, "get_models", None)
    if not callable(original) or _is_ours(original):
        return

    @functools.wraps(original)
    def get_models(*args, **kwargs):
        models = original(*args, **kwargs)
        _check_models(models)
        return models

    module.get_models = _marked(get_models)
    try:
        module.get_models()
    except Exception as e:   # reported again, as a refusal, when an svd_neuron checkpoint asks for it
        logger.error("vllm-neuronmlp: %s.get_models() failed (%s: %s)", REGISTRY_MODULE, type(e).__name__, e)


def resolve(architecture: str):
    """The class vllm_neuron/model/registry.py resolves for `architecture`, patched; a
    HookTargetError naming the registry, the class and the vllm-neuron otherwise."""
    try:
        registry = importlib.import_module(REGISTRY_MODULE)
        models = dict(registry.get_models())
    except Exception as e:
        raise stack_mod.HookTargetError(
            f"could not read {REGISTRY_MODULE}.get_models() to find the class for {architecture} "
            f"({type(e).__name__}: {e}; {_stack_text()})") from e
    cls = models.get(architecture)
    if cls is None:
        raise stack_mod.HookTargetError(
            f"{REGISTRY_MODULE}.get_models() resolves no {architecture} (on {_stack_text()}), so the svd_neuron "
            f"variant has no class to install into; registered: {sorted(models)}")
    patch_model_class(cls)
    _RESOLVED[architecture] = class_path(cls)
    return cls


def resolved_classes() -> Dict[str, str]:
    """architecture -> path of the class the registry resolved and we patched, this process."""
    return dict(_RESOLVED)


# ---------------------------------------------------------------- platform checks
def _svd_requested(model_config) -> bool:
    if getattr(model_config, "quantization", None) == cf.QUANT_METHOD:
        return True
    hf_config = getattr(model_config, "hf_config", None)
    qc = getattr(hf_config, cf.QUANTIZATION_CONFIG_KEY, None)
    return isinstance(qc, Mapping) and qc.get(cf.KEY_QUANT_METHOD) == cf.QUANT_METHOD


def refuse_check(stack: stack_mod.NeuronStack) -> Callable:
    """check_and_update_config guard for a stack we cannot serve on."""
    def check(vllm_config) -> None:
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None and _svd_requested(model_config):
            raise stack_mod.NeuronStackError(stack_mod.refusal_message(stack))
    return check


def native_check(stack: stack_mod.NeuronStack) -> Callable:
    """check_and_update_config guard on the native line: our architecture, the class the
    registry resolves for it patched (or refused by name), an intermediate size the MLP TP
    degree divides, a TP degree that splits a factored attention like the stock one."""
    def check(vllm_config) -> None:
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is None or not _svd_requested(model_config):
            return
        hf_config = model_config.hf_config
        architectures = list(getattr(hf_config, "architectures", None) or [])
        hooks = [h for h in MODEL_HOOKS if h.architecture in architectures]
        if not hooks:
            raise stack_mod.NeuronStackError(stack_mod.refusal_message(
                stack, f"architecture {architectures} has no svd_neuron variant; supported: "
                       f"{list(SUPPORTED_ARCHITECTURES)}"))
        if cf.QUANTIZATION_CONFIG_KEY not in _config_dict(hf_config):
            raise cf.CheckpointFormatError(
                f"--quantization {cf.QUANT_METHOD} was given, but the model's {cf.CONFIG_FILE} has no "
                f"'{cf.QUANTIZATION_CONFIG_KEY}' with quant_method '{cf.QUANT_METHOD}': it is a dense checkpoint")
        quant = svd_quant_config(hf_config)
        resolve(hooks[0].architecture)
        tp = int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1) or 1)
        additional = getattr(vllm_config, "additional_config", None) or {}
        mlp_dp = int((additional.get("neuron_config") or {}).get("mlp_dp_size", 1) or 1)
        _, intermediate, _ = _text_dims(_config_dict(hf_config))
        intermediate_shard(intermediate, tp * mlp_dp, f"{model_config.model}: the MLP")
        check_attention_split(hf_config, quant, tp, str(model_config.model))
        # format v2: every narrowed layer is split by its own width (the CPU path's check and error)
        cf.check_tensor_parallel(quant, tp * mlp_dp,
                                  source=f"{model_config.model}: {cf.CONFIG_FILE} (the MLP's tensor-parallel degree "
                                         f"is tensor_parallel_size {tp} x mlp_dp_size {mlp_dp})")
    return check


def wrap_check_and_update_config(platform_cls, check: Callable) -> None:
    """Run `check(vllm_config)` before the platform's own check_and_update_config."""
    current = platform_cls.__dict__.get("check_and_update_config")
    if getattr(getattr(current, "__func__", None), _PATCHED, False):
        return
    original = getattr(platform_cls, "check_and_update_config").__func__

    def check_and_update_config(cls, vllm_config):
        check(vllm_config)
        return original(cls, vllm_config)

    setattr(check_and_update_config, _PATCHED, True)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def allow_quantization(platform_cls) -> None:
    supported = list(getattr(platform_cls, "supported_quantization", None) or [])
    if supported and cf.QUANT_METHOD not in supported:
        platform_cls.supported_quantization = supported + [cf.QUANT_METHOD]


def _active_neuron_platform():
    """vLLM's current platform class when it is vllm-neuron's, else None."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    return cls if cls.__module__.split(".")[0] == stack_mod.PACKAGE else None


# ---------------------------------------------------------------- entry
ABSENT, INACTIVE, NATIVE, REFUSING = "absent", "inactive", "native", "refusing"


def install(platform_cls=None, stack: Optional[stack_mod.NeuronStack] = None) -> str:
    """Called by `vllm_neuronmlp.register()`; returns what it did (ABSENT: no vllm-neuron,
    nothing touched; INACTIVE: installed but not vLLM's platform; NATIVE; REFUSING)."""
    global _STACK
    stack = stack or stack_mod.detect_stack()
    if not stack.installed:
        return ABSENT
    if platform_cls is None:
        try:
            platform_cls = _active_neuron_platform()
        except Exception as e:   # e.g. called while vLLM is still resolving its platform
            logger.warning("vllm-neuronmlp: could not tell whether vllm-neuron is vLLM's platform (%s: %s); "
                           "the svd_neuron variant is not installed in this process", type(e).__name__, e)
            return INACTIVE
    if platform_cls is None:
        return INACTIVE
    _STACK = stack
    allow_quantization(platform_cls)
    if stack.line != stack_mod.NATIVE:
        wrap_check_and_update_config(platform_cls, refuse_check(stack))
        logger.info("vllm-neuronmlp: %s; svd_neuron checkpoints will be refused", stack.describe())
        return REFUSING
    _RESOLVED.clear()
    _PROBLEMS.clear()
    wrap_check_and_update_config(platform_cls, native_check(stack))
    for hook in MODEL_HOOKS:
        call_after_import(hook.package, _package_hook(hook))
    call_after_import(REGISTRY_MODULE, _registry_hook)
    return NATIVE
