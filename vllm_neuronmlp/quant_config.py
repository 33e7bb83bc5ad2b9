"""The `svd_neuron` quantization config vLLM sees.

vLLM adopts it from a checkpoint's config.json (`quant_method: svd_neuron`) with
no flag, and `--quantization svd_neuron` must agree with it. It answers
`get_quant_method` for every linear layer: the factored linear method for the
projections listed in `ranks` (MLP, and in format v3 attention: vLLM's merged
qkv_proj and o_proj), vLLM's own unquantized method for every other linear (a
dense attention or MLP), and None for non-linear layers. The model's family
(`mlp_families`, from config.json's model_type) says which HF modules vLLM's
merged gate/up and qkv linears pack; an unknown model_type is refused with the
supported ones named.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families

logger = logging.getLogger(__name__)


def _model_family() -> mlp_families.MLPFamily:
    """The MLP family of the model vLLM is building right now (get_quant_method
    runs inside vLLM's model construction, where the current config is set)."""
    from vllm.config import get_current_vllm_config

    return mlp_families.family_for_config(get_current_vllm_config().model_config.hf_config)


def _vllm_config_base():
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    return QuantizationConfig


class SVDNeuronConfig(_vllm_config_base()):
    """Ranks per HF module name, from `quantization_config` of config.json."""

    def __init__(self, quant: Optional[cf.QuantizationConfig] = None) -> None:
        super().__init__()
        if quant is None:
            # vLLM builds the config with no arguments when `--quantization
            # svd_neuron` is given for a checkpoint whose config.json has no
            # quantization_config (see get_config_filenames).
            raise cf.CheckpointFormatError(
                f"--quantization {cf.QUANT_METHOD} was given, but the model's {cf.CONFIG_FILE} has no "
                f"'{cf.QUANTIZATION_CONFIG_KEY}' with quant_method '{cf.QUANT_METHOD}': it is a dense "
                f"checkpoint. Serve it without --quantization, or make an {cf.QUANT_METHOD} checkpoint "
                f"with `vllm-neuronmlp compress`.")
        self.quant = quant
        self.ranks: Dict[str, int] = dict(quant.ranks)
        self.block_size = quant.block_size

    def __repr__(self) -> str:
        return f"SVDNeuronConfig(block_size={self.block_size}, factored_modules={len(self.ranks)})"

    # ---- what vLLM asks of every quantization config
    @classmethod
    def get_name(cls) -> str:
        return cf.QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain GEMMs: any device vLLM runs on

    @staticmethod
    def get_config_filenames() -> List[str]:
        # The config lives in config.json, which vLLM reads itself. With no
        # file names vLLM calls SVDNeuronConfig(), which reports a dense model.
        return []

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SVDNeuronConfig":
        return cls(cf.QuantizationConfig.from_dict(config, source=cf.CONFIG_FILE))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get(cf.KEY_QUANT_METHOD) == cf.QUANT_METHOD:
            if user_quant not in (None, cf.QUANT_METHOD):
                return None  # let vLLM report the disagreement
            return cf.QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # A model that renames HF prefixes (e.g. `model.` -> `language_model.model.`)
        # tells us here; our ranks are keyed by HF names.
        mapped = hf_to_vllm_mapper.apply_dict(self.ranks)
        if mapped:
            self.ranks = mapped

    # ---- which method each layer gets
    def hf_modules(self, prefix: str, family: mlp_families.MLPFamily) -> List[str]:
        """HF module names behind one vLLM layer prefix (a packed layer has several).
        The model's own `packed_modules_mapping` comes first; the family's merged
        gate/up and q/k/v cover a model that has not set one."""
        head, _, leaf = prefix.rpartition(".")
        family_packed = {family.vllm_gate_up: [family.gate, family.up],
                         family.vllm_qkv: [family.q, family.k, family.v]}
        members = (self.packed_modules_mapping or {}).get(leaf) or family_packed.get(leaf)
        if not members:
            return [prefix]
        return [f"{head}.{m}" if head else m for m in members]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if not isinstance(layer, LinearBase):
            return None
        family = _model_family()
        modules = self.hf_modules(prefix, family)
        factored = [m in self.ranks for m in modules]
        width = self.quant.width_of(modules[0])  # format v2: this MLP keeps `width` intermediate channels
        if width is not None:  # (vLLM resolves the method before it sets layer.tp_size)
            from vllm.distributed import get_tensor_model_parallel_world_size

            cf.check_tensor_parallel(self.quant, get_tensor_model_parallel_world_size())
        if not any(factored):
            if width is not None:
                from vllm_neuronmlp.linear_method import NarrowedDenseMethod

                return NarrowedDenseMethod(modules, width)
            return UnquantizedLinearMethod()
        if not all(factored):
            missing = [m for m, f in zip(modules, factored) if not f]
            raise cf.CheckpointFormatError(
                f"{cf.CONFIG_FILE} {cf.QUANTIZATION_CONFIG_KEY}.{cf.KEY_RANKS}: vLLM layer {prefix} packs "
                f"{modules}, but {missing} are not factored; packed modules must be factored together")
        from vllm_neuronmlp.linear_method import SVDLinearMethod
        from vllm_neuronmlp.mlp_fusion import install_mlp_fusion

        # Here, not in __init__: the config may be built in another process and
        # pickled to the workers, but the layers are built where this runs.
        install_mlp_fusion()
        return SVDLinearMethod(hf_modules=modules, ranks=[self.ranks[m] for m in modules], family=family, width=width)


def register_with_vllm() -> None:
    from vllm.model_executor.layers.quantization import (
        _CUSTOMIZED_METHOD_TO_QUANT_CONFIG,
        register_quantization_config,
    )

    if _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(cf.QUANT_METHOD) is SVDNeuronConfig:
        return
    register_quantization_config(cf.QUANT_METHOD)(SVDNeuronConfig)
