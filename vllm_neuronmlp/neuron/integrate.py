"""Install the svd_neuron model variant into vllm-neuron's native line, or refuse clearly.

`install()` runs from our `vllm.general_plugins` entry point (vllm_neuronmlp.register) in
every vLLM process. With no vllm-neuron installed it returns at once and touches nothing.
When vllm-neuron is the active platform it:

native line (0.21+; written against tag v0.21.0.1.0.0, vLLM 0.24)
  1. adds `svd_neuron` to the platform's `supported_quantization` (vllm_neuron/vllm/platform.py,
     `NeuronPlatform.supported_quantization`), so vLLM's own check (ModelConfig
     `_verify_quantization` -> `Platform.verify_quantization`) accepts the checkpoint with or
     without `--quantization svd_neuron`;
  2. wraps the platform's `check_and_update_config` to refuse, before anything compiles, an
     architecture we cannot serve or an intermediate size (or a format-v2 layer width) the
     TP degree does not divide;
  3. patches the stock model classes when their modules are imported (whichever plugin
     loads first): `LlamaForCausalLM` (vllm_neuron/model/llama3/model.py) and
     `Qwen3ForCausalLM` (vllm_neuron/model/qwen3/model.py):
       * `from_configs(hf_config, neuron_config)`: build the stock model from a copy of the
         config without our `quantization_config` (the stock Llama config code,
         vllm_neuron/model/llama3/quantization.py `QuantizationSpec.from_hf_quantization_config`,
         rejects unknown quant methods), then replace the MLP of every layer listed in
         `ranks` or narrowed by `widths` (format v2) by `SVDNeuronMLP` built at that layer's
         width (layers neither factored nor narrowed stay stock);
       * `load_weights(checkpoint_path, device, cache_dir)`: check the checkpoint's MLP
         tensor names against our parameters (names.py), run the stock loader (which fills
         our parameters through their `ShardLoader`), then refuse a half-loaded model and
         prepare each MLP's compute path.
0.2.x (NxD Inference) or a layout we do not recognise
  wraps `check_and_update_config` to refuse svd_neuron checkpoints with a message naming
  the stack, the version found and what is supported (stack.py). Its platform turned vLLM's
  quantization check into a no-op, so without this the checkpoint would load as dense.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from vllm_neuronmlp import checkpoint_format as fmt
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.import_hooks import call_after_import
from vllm_neuronmlp.neuron import stack as stack_mod
from vllm_neuronmlp.neuron.sharding import intermediate_shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelHook:
    architecture: str   # HF config `architectures` entry vllm-neuron registers
    module: str         # where the native line defines the model class
    cls: str


# vllm_neuron/model/registry.py (0.21) maps these architectures to the classes below.
MODEL_HOOKS: Tuple[ModelHook, ...] = (
    ModelHook("LlamaForCausalLM", "vllm_neuron.model.llama3.model", "LlamaForCausalLM"),
    ModelHook("Qwen3ForCausalLM", "vllm_neuron.model.qwen3.model", "Qwen3ForCausalLM"),
)
SUPPORTED_ARCHITECTURES = tuple(h.architecture for h in MODEL_HOOKS)
_PATCHED = "_vllm_neuronmlp_patched"


# ---------------------------------------------------------------- config helpers
def _config_dict(hf_config: Any) -> Dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if isinstance(hf_config, (str, bytes, os.PathLike)):
        with open(hf_config) as f:
            return json.load(f)
    return hf_config.to_dict()


def svd_quant_config(hf_config: Any) -> Optional[fmt.QuantizationConfig]:
    """Our parsed quantization config (format v1 or v2) when the model config carries one,
    else None; an unknown format version or a malformed key is refused by the format module."""
    cfg = _config_dict(hf_config)
    if not fmt.has_svd_config(cfg):
        return None
    return fmt.QuantizationConfig.from_dict(cfg[fmt.QUANTIZATION_CONFIG_KEY], source=fmt.CONFIG_FILE)


def without_quantization(hf_config: Any) -> Any:
    """A copy of the model config without `quantization_config` (the stock config code
    would reject ours); the original is left untouched."""
    if isinstance(hf_config, (Mapping, str, bytes, os.PathLike)):
        cfg = _config_dict(hf_config)
        cfg.pop(fmt.QUANTIZATION_CONFIG_KEY, None)
        return cfg
    stripped = copy.deepcopy(hf_config)
    if hasattr(stripped, fmt.QUANTIZATION_CONFIG_KEY):
        delattr(stripped, fmt.QUANTIZATION_CONFIG_KEY)
    return stripped


def _text_dims(cfg: Mapping[str, Any]) -> Tuple[int, int, int]:
    text = cfg.get("text_config") or cfg
    return int(text["hidden_size"]), int(text["intermediate_size"]), int(text["num_hidden_layers"])


def ranks_by_layer(quant: fmt.QuantizationConfig, family: mlp_families.MLPFamily,
                   num_layers: int) -> Dict[int, Dict[str, int]]:
    """{layer: {role: rank}} from `ranks`; a named error for a module the model lacks."""
    out: Dict[int, Dict[str, int]] = {}
    prefix = f"{family.layer_prefix}."
    for module, rank in quant.ranks.items():
        head, _, proj = module.rpartition(".mlp.")
        layer = head[len(prefix):] if head.startswith(prefix) else ""
        if not layer.isdigit() or proj not in family.projections or int(layer) >= num_layers:
            raise fmt.CheckpointFormatError(
                f"{fmt.CONFIG_FILE} {fmt.QUANTIZATION_CONFIG_KEY}.{fmt.KEY_RANKS} lists {module!r}, which is not an "
                f"MLP projection of this {family.name} model ({num_layers} layers, modules "
                f"{family.layer_prefix}.<i>.mlp.{{{','.join(family.projections)}}})")
        out.setdefault(int(layer), {})[mlp_families.role_of(module)] = rank
    return out


def widths_by_layer(quant: fmt.QuantizationConfig, family: mlp_families.MLPFamily,
                    num_layers: int) -> Dict[int, int]:
    """{layer: width} of the layers format v2 narrows (read with `quant.width_of`); a named
    error for a `widths` entry that is not an MLP of this model (it would be ignored)."""
    first = family.projections[0]
    out = {i: quant.width_of(mlp_families.module_name(family, i, first)) for i in range(num_layers)}
    known = {fmt.mlp_module(mlp_families.module_name(family, i, first)) for i in range(num_layers)}
    unknown = sorted(set(quant.widths) - known)
    if unknown:
        raise fmt.CheckpointFormatError(
            f"{fmt.CONFIG_FILE} {fmt.QUANTIZATION_CONFIG_KEY}.{fmt.KEY_WIDTHS} lists {unknown}, which "
            f"{'is' if len(unknown) == 1 else 'are'} not an MLP of this {family.name} model ({num_layers} layers, "
            f"modules {family.layer_prefix}.<i>.mlp)")
    return {i: w for i, w in out.items() if w is not None}


# ---------------------------------------------------------------- the model variant
@dataclass
class VariantInfo:
    quant: fmt.QuantizationConfig
    family: mlp_families.MLPFamily
    layers: Tuple[int, ...]


def install_svd_mlps(model, quant: fmt.QuantizationConfig, hf_config: Any) -> VariantInfo:
    """Replace the MLP of every layer listed in `ranks` or narrowed by `widths`, each built
    at its own width (layers neither factored nor narrowed stay stock)."""
    from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP

    cfg = _config_dict(hf_config)
    family = mlp_families.family_for_config(cfg)
    hidden, intermediate, _ = _text_dims(cfg)
    layers = model.model.layers          # LlamaForCausalLM.model (LlamaModel).layers, vllm-neuron 0.21
    plan = ranks_by_layer(quant, family, len(layers))
    widths = widths_by_layer(quant, family, len(layers))
    replaced = sorted(set(plan) | set(widths))
    for i in replaced:
        layers[i].mlp = SVDNeuronMLP.from_stock(layers[i].mlp, layer=i, family=family, hidden_size=hidden,
                                                intermediate_size=widths.get(i, intermediate),
                                                ranks=plan.get(i, {}), narrowed=i in widths)
    info = VariantInfo(quant, family, tuple(replaced))
    model._svd_neuron = info
    # Per rank, factors beat the dense shard only while r < H (I/tp) / (H + I/tp) (docs/trainium.md);
    # each layer is compared with its dense shard at its own width.
    ours = sum(p.numel() for i in replaced for p in layers[i].mlp.parameters())
    dense = sum(3 * hidden * layers[i].mlp.intermediate_size_per_rank for i in replaced)
    logger.info("vllm-neuronmlp: %d of %d %s MLPs replaced by the svd_neuron variant (%d factored, %d narrowed "
                "by format-v2 widths); their parameters per rank: %.1f M (dense at the same widths: %.1f M)",
                len(replaced), len(layers), family.name, len(plan), len(widths), ours / 1e6, dense / 1e6)
    if ours > dense:
        logger.warning("vllm-neuronmlp: at this tensor-parallel degree the factored MLPs hold more parameters per "
                       "rank than the dense ones would (%d > %d); a lower degree or lower ranks would save memory",
                       ours, dense)
    return info


def _checkpoint_tensor_shapes(checkpoint_path: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """{tensor: shape} from the safetensors headers (no data read), None for a hub name."""
    if not os.path.isdir(str(checkpoint_path)):
        return None   # a hub name: the reader downloads it; our after-load check still runs
    files = fmt.safetensors_files(str(checkpoint_path))
    shapes: Dict[str, Tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        for name, header in fmt.read_safetensors_header(path).items():
            if name in files:
                shapes[name] = tuple(header["shape"])
    return shapes


def patch_model_class(cls) -> None:
    """Wrap `from_configs` and `load_weights` of one native model class (idempotent)."""
    if cls.__dict__.get(_PATCHED, False):
        return
    from vllm_neuronmlp.neuron import names

    original_from_configs = cls.from_configs.__func__
    original_load_weights = cls.load_weights

    def from_configs(klass, hf_config, *args, **kwargs):
        quant = svd_quant_config(hf_config)
        if quant is None:
            return original_from_configs(klass, hf_config, *args, **kwargs)
        model = original_from_configs(klass, without_quantization(hf_config), *args, **kwargs)
        install_svd_mlps(model, quant, hf_config)
        return model

    def load_weights(self, checkpoint_path, *args, **kwargs):
        info = getattr(self, "_svd_neuron", None)
        if info is not None:
            tensors = _checkpoint_tensor_shapes(checkpoint_path)
            if tensors is not None:
                names.check_mlp_tensors(tensors, self, source=str(checkpoint_path))
        result = original_load_weights(self, checkpoint_path, *args, **kwargs)
        if info is not None:
            names.check_loaded(self)
            for mlp in names.svd_mlps(self).values():
                mlp.finalize()
        return result

    from_configs.__doc__ = f"{original_from_configs.__doc__ or ''}\n(vllm-neuronmlp: svd_neuron MLPs)"
    cls.from_configs = classmethod(from_configs)
    cls.load_weights = load_weights
    setattr(cls, _PATCHED, True)


# ---------------------------------------------------------------- import hooks
def _patch_hook_target(hook: ModelHook) -> Callable:
    def patch(module):
        cls = getattr(module, hook.cls, None)
        if cls is None or not hasattr(getattr(cls, "from_configs", None), "__func__") \
                or not hasattr(cls, "load_weights"):
            logger.error("vllm-neuronmlp: %s.%s has no from_configs/load_weights; svd_neuron checkpoints "
                         "of %s will be refused", hook.module, hook.cls, hook.architecture)
            return
        patch_model_class(cls)
    return patch


# ---------------------------------------------------------------- platform checks
def _svd_requested(model_config) -> bool:
    if getattr(model_config, "quantization", None) == fmt.QUANT_METHOD:
        return True
    hf_config = getattr(model_config, "hf_config", None)
    qc = getattr(hf_config, fmt.QUANTIZATION_CONFIG_KEY, None)
    return isinstance(qc, Mapping) and qc.get(fmt.KEY_QUANT_METHOD) == fmt.QUANT_METHOD


def refuse_check(stack: stack_mod.NeuronStack) -> Callable:
    """check_and_update_config guard for a stack we cannot serve on."""
    def check(vllm_config) -> None:
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None and _svd_requested(model_config):
            raise stack_mod.NeuronStackError(stack_mod.refusal_message(stack))
    return check


def native_check(stack: stack_mod.NeuronStack) -> Callable:
    """check_and_update_config guard on the native line: our architecture, our hook
    target present in this vllm-neuron, an intermediate size the MLP TP degree divides."""
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
        module_file = os.path.join(*hooks[0].module.split(".")[1:]) + ".py"
        if not stack.has_file(module_file):
            raise stack_mod.NeuronStackError(stack_mod.refusal_message(
                stack, f"{hooks[0].module} ({module_file}), which the variant patches, does not exist"))
        if fmt.QUANTIZATION_CONFIG_KEY not in _config_dict(hf_config):
            raise fmt.CheckpointFormatError(
                f"--quantization {fmt.QUANT_METHOD} was given, but the model's {fmt.CONFIG_FILE} has no "
                f"'{fmt.QUANTIZATION_CONFIG_KEY}' with quant_method '{fmt.QUANT_METHOD}': it is a dense checkpoint")
        tp = int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1) or 1)
        additional = getattr(vllm_config, "additional_config", None) or {}
        mlp_dp = int((additional.get("neuron_config") or {}).get("mlp_dp_size", 1) or 1)
        _, intermediate, _ = _text_dims(_config_dict(hf_config))
        intermediate_shard(intermediate, tp * mlp_dp, f"{model_config.model}: the MLP")
        # format v2: every narrowed layer is split by its own width (the CPU path's check and error)
        fmt.check_tensor_parallel(svd_quant_config(hf_config), tp * mlp_dp,
                                  source=f"{model_config.model}: {fmt.CONFIG_FILE} (the MLP's tensor-parallel degree "
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
    if supported and fmt.QUANT_METHOD not in supported:
        platform_cls.supported_quantization = supported + [fmt.QUANT_METHOD]


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
    allow_quantization(platform_cls)
    if stack.line != stack_mod.NATIVE:
        wrap_check_and_update_config(platform_cls, refuse_check(stack))
        logger.info("vllm-neuronmlp: %s; svd_neuron checkpoints will be refused", stack.describe())
        return REFUSING
    wrap_check_and_update_config(platform_cls, native_check(stack))
    for hook in MODEL_HOOKS:
        call_after_import(hook.module, _patch_hook_target(hook))
    return NATIVE
