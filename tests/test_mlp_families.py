"""mlp_families: which model_types are supported, and the names each family gives its MLP."""
import pytest

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.mlp_families import DOWN, GATE, UP

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text"}
GELU_TANH_TYPES = {"gemma", "gemma3_text"}


def test_each_supported_model_type_has_one_family():
    assert set(mlp_families.supported_model_types()) == SUPPORTED
    for model_type in SUPPORTED:
        family = mlp_families.family_for_config({"model_type": model_type})
        assert model_type in family.model_types
        assert family.activation == (mlp_families.GELU_TANH if model_type in GELU_TANH_TYPES else mlp_families.SILU)


def test_transformers_configs_and_nested_text_config():
    from transformers import GemmaConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    for cls, name in ((LlamaConfig, "llama"), (MistralConfig, "mistral"), (Qwen2Config, "qwen2"),
                      (Qwen3Config, "qwen3"), (GemmaConfig, "gemma"), (Gemma3TextConfig, "gemma3")):
        assert mlp_families.family_for_config(cls()).name == name
    # a multimodal config.json: the text model's type decides
    assert mlp_families.family_for_config(
        {"model_type": "llava", "text_config": {"model_type": "qwen2"}}).name == "qwen2"


@pytest.mark.parametrize("cfg,shown", [({"model_type": "gpt2"}, "'gpt2'"), ({}, "None")])
def test_unknown_model_type_names_it_and_the_supported_ones(cfg, shown):
    with pytest.raises(mlp_families.UnsupportedModelError,
                       match=rf"model_type {shown} has no known MLP family; vllm-neuronmlp supports model_type "
                             r"llama, mistral, qwen2, qwen3, gemma"):
        mlp_families.family_for_config(cfg)
    assert issubclass(mlp_families.UnsupportedModelError, ValueError)


def test_module_names_roles_and_partners():
    llama = mlp_families.family_for_config({"model_type": "llama"})
    assert mlp_families.module_name(llama, 3, llama.down) == "model.layers.3.mlp.down_proj"
    assert [llama.projection(r) for r in (GATE, UP, DOWN)] == ["gate_proj", "up_proj", "down_proj"]
    assert mlp_families.role_of("model.layers.0.mlp.up_proj") == UP
    assert mlp_families.role_of("model.layers.0.self_attn.q_proj") is None
    assert mlp_families.gate_up_partner("model.layers.2.mlp.gate_proj") == "model.layers.2.mlp.up_proj"
    assert mlp_families.gate_up_partner("model.layers.2.mlp.up_proj") == "model.layers.2.mlp.gate_proj"
    assert mlp_families.gate_up_partner("model.layers.2.mlp.down_proj") is None
    with pytest.raises(ValueError, match=r"'q_proj' is not an MLP projection of family 'llama'"):
        mlp_families.module_name(llama, 0, "q_proj")


def test_checkpoint_shapes_follow_the_role():
    config = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96}
    assert cf.expected_shape(config, "model.layers.1.mlp.gate_proj") == (64, 96)
    assert cf.expected_shape(config, "model.layers.1.mlp.down_proj") == (96, 64)
    # format v3: attention projections have shapes too (hidden 64 / 4 heads = head_dim 16, 2 kv heads)
    config.update(num_attention_heads=4, num_key_value_heads=2)
    assert cf.expected_shape(config, "model.layers.1.self_attn.o_proj") == (64, 64)
    assert cf.expected_shape(config, "model.layers.1.self_attn.k_proj") == (64, 32)
    with pytest.raises(cf.CheckpointFormatError, match=r"lm_head: not an MLP projection .* or an attention projection"):
        cf.expected_shape(config, "lm_head")


def test_a_family_with_an_unknown_activation_is_refused():
    with pytest.raises(ValueError, match=r"activation 'relu' is not one of \('silu', 'gelu_tanh'\)"):
        mlp_families.MLPFamily("toy", ("toy",), activation="relu")


def test_fusion_recognises_vllm_activation_modules_by_type():
    # the fused op is installed only where vLLM's activation module computes the family's activation
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

    from vllm_neuronmlp.mlp_fusion import computes_activation

    with set_current_vllm_config(VllmConfig()):
        silu, gelu_tanh, gelu = SiluAndMul(), GeluAndMul(approximate="tanh"), GeluAndMul()
    table = [[computes_activation(act, a) for a in (mlp_families.SILU, mlp_families.GELU_TANH)]
             for act in (silu, gelu_tanh, gelu)]
    assert table == [[True, False], [False, True], [False, False]]
