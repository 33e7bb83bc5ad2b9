"""The MLP families vllm-neuronmlp can factor: the one place that spells them.

A gated MLP computes `down(act(gate(x)) * up(x))`. Models differ only in the
names of the three projections, the activation, where the layers live, and the
`model_type` their config.json carries. Each family below records those facts,
so supporting another model of this shape is one more `MLPFamily` entry.

The checkpoint keeps the Hugging Face names (docs/checkpoint_format.md). vLLM's
model classes merge gate and up into one stacked linear and hold the activation
as a module; `vllm_gate_up` and `vllm_act` name those (docs/vllm.md).

This module imports nothing of the project and no torch, so the checkpoint
format, the tools and the plugin can all use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

SILU = "silu"            # x * sigmoid(x)
GELU_TANH = "gelu_tanh"  # GELU with the tanh approximation
ACTIVATIONS = (SILU, GELU_TANH)
GATE, UP, DOWN = "gate", "up", "down"  # the three roles in act(gate(x)) * up(x) -> down
ROLES = (GATE, UP, DOWN)
# The attention projections (format v3 may factor them): q, k, v read the layer's
# normalized input, o reads the attention output. Every family here names them alike.
Q, K, V, O = "q", "k", "v", "o"
ATTENTION_ROLES = (Q, K, V, O)
QKV_ROLES = (Q, K, V)  # vLLM runs these three as one merged linear (qkv_proj)


@dataclass(frozen=True)
class MLPFamily:
    """How one family of decoder models names and runs its gated MLP."""

    name: str                          # "llama", "qwen2", ...
    model_types: Tuple[str, ...]       # HF config.model_type values it covers
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    activation: str = SILU             # act(gate) * up
    layer_prefix: str = "model.layers"  # module path = f"{layer_prefix}.{i}.mlp.{proj}"
    vllm_gate_up: str = "gate_up_proj"  # vLLM's stacked gate+up linear
    vllm_act: str = "act_fn"            # vLLM's activation-and-mul module
    attention: str = "self_attn"        # attention module path = f"{layer_prefix}.{i}.{attention}.{proj}"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    vllm_qkv: str = "qkv_proj"          # vLLM's stacked q+k+v linear

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MLPFamily {self.name!r}: activation {self.activation!r} is not one of {ACTIVATIONS}")

    @property
    def projections(self) -> Tuple[str, str, str]:
        """(gate, up, down) in HF naming."""
        return (self.gate, self.up, self.down)

    def projection(self, role: str) -> str:
        """This family's name for the projection of one role (GATE, UP or DOWN)."""
        return self.projections[ROLES.index(role)]

    @property
    def attention_projections(self) -> Tuple[str, str, str, str]:
        """(q, k, v, o) in HF naming."""
        return (self.q, self.k, self.v, self.o)

    def attention_projection(self, role: str) -> str:
        """This family's name for the attention projection of one role (Q, K, V or O)."""
        return self.attention_projections[ATTENTION_ROLES.index(role)]


FAMILIES: Tuple[MLPFamily, ...] = (
    MLPFamily("llama", ("llama",)),
    MLPFamily("mistral", ("mistral",)),
    MLPFamily("qwen2", ("qwen2",)),
    MLPFamily("qwen3", ("qwen3",)),
    # Gemma (1st generation): GELU, tanh approximation (hidden_activation gelu_pytorch_tanh)
    MLPFamily("gemma", ("gemma",), activation=GELU_TANH),
    # Gemma 3 (text-only Gemma3ForCausalLM): GELU-tanh as Gemma; its q/k norms, the norms after attention
    # and MLP and the sliding-window layers change nothing in how the projections are named or factored
    MLPFamily("gemma3", ("gemma3_text",), activation=GELU_TANH),
)


class UnsupportedModelError(ValueError):
    """A model whose config.json model_type matches no known MLP family."""


def supported_model_types() -> Tuple[str, ...]:
    return tuple(t for f in FAMILIES for t in f.model_types)


def _model_types(cfg: Any) -> Tuple[Any, ...]:
    """model_type of the text model (multimodal configs nest it) and of the whole config."""
    if isinstance(cfg, Mapping):
        text = cfg.get("text_config") or {}
        return (text.get("model_type"), cfg.get("model_type"))
    text = getattr(cfg, "text_config", None)
    return (getattr(text, "model_type", None), getattr(cfg, "model_type", None))


def family_for_model_type(model_type: Any) -> MLPFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"config.json model_type {model_type!r} has no known MLP family; vllm-neuronmlp supports "
        f"model_type {', '.join(supported_model_types())} (add an MLPFamily to vllm_neuronmlp/mlp_families.py "
        f"for another gated-MLP model)")


def family_for_config(cfg: Any) -> MLPFamily:
    """The family of a model config: a config.json dict or a transformers
    PretrainedConfig (a multimodal config's `text_config` is tried first)."""
    text_type, top_type = _model_types(cfg)
    for model_type in (text_type, top_type):
        if model_type is not None and model_type in supported_model_types():
            return family_for_model_type(model_type)
    return family_for_model_type(top_type if top_type is not None else text_type)


def module_name(family: MLPFamily, layer: int, proj: str) -> str:
    """HF module name of one MLP projection, e.g. `model.layers.3.mlp.down_proj`."""
    if proj not in family.projections:
        raise ValueError(f"{proj!r} is not an MLP projection of family {family.name!r}; "
                         f"expected one of {family.projections}")
    return f"{family.layer_prefix}.{layer}.mlp.{proj}"


def attention_module_name(family: MLPFamily, layer: int, proj: str) -> str:
    """HF module name of one attention projection, e.g. `model.layers.3.self_attn.q_proj`."""
    if proj not in family.attention_projections:
        raise ValueError(f"{proj!r} is not an attention projection of family {family.name!r}; expected one of "
                         f"{family.attention_projections}")
    return f"{family.layer_prefix}.{layer}.{family.attention}.{proj}"


def attention_role_of(module: str) -> Optional[str]:
    """Q, K, V or O for an attention module name such as
    `model.layers.3.self_attn.k_proj` (its last two components, in any family), else None."""
    parent, _, leaf = module.rpartition(".")
    owner = parent.rpartition(".")[2]
    for family in FAMILIES:
        if owner == family.attention and leaf in family.attention_projections:
            return ATTENTION_ROLES[family.attention_projections.index(leaf)]
    return None


def qkv_partners(module: str) -> Tuple[str, ...]:
    """The other two of q/k/v for one of them (same attention module), else ():
    vLLM runs the three as one merged linear, so they are factored together."""
    role = attention_role_of(module)
    if role not in QKV_ROLES:
        return ()
    parent, _, leaf = module.rpartition(".")
    for family in FAMILIES:
        if leaf in family.attention_projections:
            return tuple(f"{parent}.{family.attention_projection(r)}" for r in QKV_ROLES if r != role)
    return ()


def _roles_by_name() -> Dict[str, str]:
    roles: Dict[str, str] = {}
    for family in FAMILIES:
        for proj, role in zip(family.projections, ROLES):
            if roles.setdefault(proj, role) != role:
                raise ValueError(f"projection name {proj!r} is {roles[proj]} in one family and {role} in another")
    return roles


_ROLE_OF = _roles_by_name()


def all_projection_names() -> Tuple[str, ...]:
    """Every projection name any family uses."""
    return tuple(_ROLE_OF)


def role_of(module: str) -> Optional[str]:
    """GATE, UP or DOWN for an MLP module name such as `model.layers.3.mlp.up_proj`
    (judged by its last component, in any family), else None."""
    return _ROLE_OF.get(module.rpartition(".")[2])


def gate_up_partner(module: str) -> Optional[str]:
    """The up module of a gate module and vice versa (same MLP), else None:
    vLLM runs the two as one merged linear, so they are factored together."""
    parent, _, leaf = module.rpartition(".")
    for family in FAMILIES:
        if leaf in (family.gate, family.up):
            other = family.up if leaf == family.gate else family.gate
            return f"{parent}.{other}" if parent else other
    return None
