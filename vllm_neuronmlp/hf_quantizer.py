"""Load `svd_neuron` checkpoints in Hugging Face transformers.

After `import vllm_neuronmlp`, `AutoModelForCausalLM.from_pretrained(ckpt)` reads
the checkpoint's `quantization_config`, swaps every factored `nn.Linear` for an
`SVDLinear` holding `svd_u` / `svd_v` (the same names as on disk, so the normal
loader fills them) and computes `(x @ svd_u) @ svd_v`: MLP projections and, in
format v3, attention projections alike (a projection's bias, Qwen2's q/k/v, stays
a dense `bias` beside the factors). In a format-v2 checkpoint the projections of
a narrowed layer are built at its width (gate/up outputs and down inputs k wide),
dense or factored. Before any weight loads, the checkpoint's tensors are checked
against the format (`checkpoint_format.validate`, headers only): transformers
itself would leave a missing factor uninitialized and accept a factor of the
wrong shape. peft and other HF tools then see ordinary trainable parameters;
`save_pretrained` writes the same format version back.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.ops import factored_linear


class SVDLinear(nn.Module):
    """A linear layer stored as two factors: y = (x @ svd_u) @ svd_v (+ bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"dtype": dtype, "device": device}
        setattr(self, cf.U_SUFFIX, nn.Parameter(torch.empty(in_features, rank, **kw)))
        setattr(self, cf.V_SUFFIX, nn.Parameter(torch.empty(rank, out_features, **kw)))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return factored_linear(x, getattr(self, cf.U_SUFFIX), getattr(self, cf.V_SUFFIX), bias=self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SVDNeuronHFConfig(QuantizationConfigMixin):
    """The `quantization_config` of an svd_neuron checkpoint, as transformers holds it."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault(cf.KEY_QUANT_METHOD, cf.QUANT_METHOD)
        parsed = cf.QuantizationConfig.from_dict(kwargs)  # checks version, ranks, block size
        self.quant_method = cf.QUANT_METHOD
        self._raw: Dict[str, Any] = dict(kwargs)
        self.ranks = parsed.ranks
        self.widths = parsed.widths
        self.block_size = parsed.block_size

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._raw)

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()


class SVDNeuronHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-factored checkpoints load; the tool makes them

    def _process_model_before_weight_loading(self, model, checkpoint_files: Optional[Sequence[str]] = None,
                                             **kwargs) -> None:
        family = mlp_families.family_for_config(model.config)  # refuses a model_type whose MLP the format does not know
        if checkpoint_files:  # every factor present at its shape, no stray or leftover tensors (names them)
            cf.validate(os.path.dirname(checkpoint_files[0]), check_values=False)
        ranks = self.quantization_config.ranks
        widths = self.quantization_config.widths
        for mlp, width in widths.items():
            for proj in family.projections:
                name = f"{mlp}.{proj}"
                if name in ranks:
                    continue
                linear = _linear(model, name, cf.KEY_WIDTHS)
                n_in, n_out = _narrowed(name, linear, width)
                _replace(model, name, nn.Linear(n_in, n_out, bias=linear.bias is not None, dtype=linear.weight.dtype,
                                                device=linear.weight.device))
        for name in ranks:
            linear = _linear(model, name, cf.KEY_RANKS)
            n_in, n_out = _narrowed(name, linear, widths.get(cf.mlp_module(name)))
            _replace(model, name, SVDLinear(n_in, n_out, ranks[name], bias=linear.bias is not None,
                                            dtype=linear.weight.dtype, device=linear.weight.device))

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _linear(model, name: str, key: str) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise cf.CheckpointFormatError(
            f"{cf.CONFIG_FILE} {cf.QUANTIZATION_CONFIG_KEY}.{key} names {name}, which this model does not have"
        ) from None
    if not isinstance(linear, nn.Linear):
        raise cf.CheckpointFormatError(f"{name} is a {type(linear).__name__}, not a linear layer")
    return linear


def _narrowed(name: str, linear: nn.Linear, width) -> tuple:
    """(in, out) of a projection in a layer narrowed to `width` channels (None: unchanged)."""
    if width is None:
        return linear.in_features, linear.out_features
    if mlp_families.role_of(name) == mlp_families.DOWN:
        return width, linear.out_features
    return linear.in_features, width


def _replace(model, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def register_with_transformers() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZER_MAPPING.get(cf.QUANT_METHOD) is SVDNeuronHfQuantizer:
        return
    register_quantization_config(cf.QUANT_METHOD)(SVDNeuronHFConfig)
    register_quantizer(cf.QUANT_METHOD)(SVDNeuronHfQuantizer)


register_with_transformers()
