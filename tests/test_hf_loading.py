"""transformers loads an svd_neuron checkpoint after `import vllm_neuronmlp`, for
every MLP family, and peft trains LoRA adapters on its factors and merges them back."""
import pytest
import torch

import vllm_neuronmlp  # noqa: F401  (registers the HF quantizer)
from model_factory import ARCHS, edit_checkpoint, make_dense_and_factored, write_unsupported_model
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.hf_quantizer import SVDLinear

IDS = torch.tensor([[5, 17, 33, 2, 9, 41]])


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    return make_dense_and_factored(str(tmp_path_factory.mktemp("hf")), "qwen3", hidden=192, intermediate=200,
                                   rank=32, factored_layers=[1])


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_matches_its_dense_twin(arch, tmp_path):
    dense_dir, fact_dir = make_dense_and_factored(str(tmp_path), arch, hidden=192, intermediate=200, rank=32)
    dense, fact = load(dense_dir), load(fact_dir)
    for module in cf.validate(fact_dir).factored:
        assert isinstance(fact.get_submodule(module), SVDLinear), module
    with torch.no_grad():
        torch.testing.assert_close(fact(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-4)


def test_from_pretrained_matches_dense_twin_and_saves_format_v1(twins, tmp_path):
    dense, fact = load(twins[0]), load(twins[1])
    assert isinstance(fact.model.layers[1].mlp.down_proj, SVDLinear)
    assert isinstance(fact.model.layers[0].mlp.down_proj, torch.nn.Linear)  # layer 0 stays dense
    with torch.no_grad():
        torch.testing.assert_close(fact(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-4)
    fact.save_pretrained(tmp_path / "resaved")
    report = cf.validate(str(tmp_path / "resaved"))
    assert report.quant.ranks == cf.validate(twins[1]).quant.ranks


def test_bad_quantization_config_is_named(twins, tmp_path):
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(twins[1], path)
    edit_checkpoint(str(path), quant_update={"format_version": 9})
    with pytest.raises(cf.CheckpointFormatError, match="format_version is 9"):
        load(path)


def test_unsupported_model_type_is_named(tmp_path):
    write_unsupported_model(str(tmp_path))
    with pytest.raises(mlp_families.UnsupportedModelError,
                       match=r"model_type 'phi3' has no known MLP family; vllm-neuronmlp supports model_type "
                             r"llama, mistral, qwen2, qwen3, gemma"):
        load(tmp_path)


# ---- peft: LoRA on the factors themselves, merged back into U and V
LORA_R, LORA_ALPHA = 4, 8


def test_peft_lora_trains_and_merges_into_the_factors(twins, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load(twins[1])
    factored = sorted(cf.validate(twins[1]).factored)
    before = {m: (model.get_submodule(m).svd_u.detach().double().clone(),
                  model.get_submodule(m).svd_v.detach().double().clone()) for m in factored}
    # SVDLinear is not an nn.Linear: peft targets its two parameters (one LoRA per factor),
    # so the merged update keeps the form x (U + dU) (V + dV) at the same rank.
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=[],
                        target_parameters=[cf.U_SUFFIX, cf.V_SUFFIX])
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * len(factored)  # lora_A and lora_B for each of U and V
    opt = torch.optim.SGD(trainable, lr=0.05)

    loss0 = peft_model(input_ids=IDS, labels=IDS).loss
    loss0.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        out = peft_model(input_ids=IDS, labels=IDS)
    assert out.loss < loss0, "one LoRA step did not lower the loss on its own batch"

    # dW = (alpha / r) * B A for each wrapped factor, read off the adapters before merging
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "parameter_name") and "default" in getattr(module, "lora_A", {}):
            owner = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            b, a = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
            deltas[(owner, module.parameter_name)] = (LORA_ALPHA / LORA_R) * (b @ a)
    assert set(deltas) == {(m, leaf) for m in factored for leaf in (cf.U_SUFFIX, cf.V_SUFFIX)}

    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, out.logits, rtol=0, atol=1e-5)
    for m in factored:
        layer = merged.get_submodule(m)
        assert type(layer) is SVDLinear
        u0, v0 = before[m]
        want_u, want_v = u0 + deltas[(m, cf.U_SUFFIX)], v0 + deltas[(m, cf.V_SUFFIX)]
        assert deltas[(m, cf.U_SUFFIX)].abs().max() > 0 and deltas[(m, cf.V_SUFFIX)].abs().max() > 0
        torch.testing.assert_close(layer.svd_u.detach().double(), want_u, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.svd_v.detach().double(), want_v, rtol=0, atol=1e-6)

    merged.save_pretrained(tmp_path / "merged")  # still format v1, ranks unchanged
    assert cf.validate(str(tmp_path / "merged")).quant.ranks == cf.validate(twins[1]).quant.ranks
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "merged")(IDS).logits, out.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_v2_per_layer_widths_match_the_dense_twin_and_save_back(arch, tmp_path):
    from model_factory import make_dense_and_narrowed, mlp_module

    ranks = {mlp_module(arch, 0, r): 32 for r in (mlp_families.GATE, mlp_families.UP)}
    ranks[mlp_module(arch, 1, mlp_families.DOWN)] = 64
    dense_dir, narrow_dir = make_dense_and_narrowed(str(tmp_path), {0: 96, 1: 160}, arch, hidden=192,
                                                    intermediate=256, ranks=ranks)
    dense, narrow = load(dense_dir), load(narrow_dir)
    mlp0, mlp1 = narrow.model.layers[0].mlp, narrow.model.layers[1].mlp
    assert isinstance(mlp0.gate_proj, SVDLinear) and mlp0.gate_proj.out_features == 96
    assert isinstance(mlp0.down_proj, torch.nn.Linear) and mlp0.down_proj.weight.shape == (192, 96)
    assert isinstance(mlp1.down_proj, SVDLinear) and mlp1.down_proj.in_features == 160
    assert mlp1.up_proj.weight.shape == (160, 192)
    with torch.no_grad():
        torch.testing.assert_close(narrow(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-4)
    narrow.save_pretrained(tmp_path / "resaved")
    report = cf.validate(str(tmp_path / "resaved"))
    assert report.quant.widths == cf.validate(narrow_dir).quant.widths and report.quant.format_version == 2


# ---- format v3: factored attention projections
V3_MODELS = {"llama": dict(heads=None, kv_heads=2),  # 6 heads x 32 = hidden, GQA
             "qwen3": dict(heads=4, kv_heads=1),     # explicit head_dim: q 128 wide, hidden 192; q_norm/k_norm
             "qwen2": dict(heads=None, kv_heads=2)}  # q/k/v biases stay dense beside the factors


def v3_twins(root, arch):
    from model_factory import V3_WIDTHS, make_dense_and_compressed, v3_ranks

    return make_dense_and_compressed(str(root), v3_ranks(arch), V3_WIDTHS, arch, hidden=192, intermediate=256,
                                     layers=3, **V3_MODELS[arch])


@pytest.mark.parametrize("arch", sorted(V3_MODELS))
def test_v3_factored_attention_matches_the_dense_twin_and_saves_back(arch, tmp_path):
    dense_dir, v3_dir = v3_twins(tmp_path, arch)
    dense, fact = load(dense_dir), load(v3_dir)
    report = cf.validate(v3_dir)
    assert report.quant.format_version == 3 and len(report.attention_factored) == 8
    for module, (n_in, n_out, rank) in report.attention_factored.items():
        layer = fact.get_submodule(module)
        assert (isinstance(layer, SVDLinear)
                and (layer.in_features, layer.out_features, layer.rank) == (n_in, n_out, rank))
        assert (layer.bias is not None) == (arch == "qwen2" and not module.endswith("o_proj"))
        if layer.bias is not None:  # loaded from the checkpoint, not left at SVDLinear's zeros
            torch.testing.assert_close(layer.bias, dense.get_submodule(module).bias, rtol=0, atol=0)
            assert layer.bias.abs().max() > 0
    assert isinstance(fact.model.layers[1].self_attn.q_proj, torch.nn.Linear)  # layer 1: q/k/v dense
    with torch.no_grad():
        torch.testing.assert_close(fact(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-4)
    fact.save_pretrained(tmp_path / "resaved")
    back = cf.validate(str(tmp_path / "resaved"))
    assert back.quant.format_version == 3 and back.quant.ranks == report.quant.ranks
    assert back.quant.widths == report.quant.widths


@pytest.fixture(scope="module")
def v3_llama(tmp_path_factory):
    return v3_twins(tmp_path_factory.mktemp("hf_v3"), "llama")[1]


@pytest.fixture
def v3_copy(v3_llama, tmp_path):
    import shutil

    path = str(tmp_path / "v3")
    shutil.copytree(v3_llama, path)
    return path


K0 = "model.layers.0.self_attn.k_proj"


def test_v3_missing_attention_factor_is_refused(v3_copy):
    # transformers alone would leave it uninitialized and load
    edit_checkpoint(v3_copy, drop=[cf.u_name(K0)])
    with pytest.raises(cf.CheckpointFormatError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.svd_u is "
                                                         r"missing; .* needs .*svd_u of shape \[192, 32\]"):
        load(v3_copy)


def test_v3_wrong_attention_factor_shape_is_refused(v3_copy):
    # transformers alone would load a factor of the wrong shape
    edit_checkpoint(v3_copy, replace={cf.v_name(K0): torch.zeros(32, 192)})
    with pytest.raises(cf.CheckpointFormatError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj"
                                                         r"\.svd_v has shape \[32, 192\], expected \[32, 64\] .*"
                                                         r"num_key_value_heads 2 x head_dim 32"):
        load(v3_copy)


def test_v3_q_without_k_and_v_is_refused(v3_copy):
    config = cf.read_config(v3_copy)
    ranks = config[cf.QUANTIZATION_CONFIG_KEY][cf.KEY_RANKS]
    del ranks[K0], ranks["model.layers.0.self_attn.v_proj"]
    edit_checkpoint(v3_copy, quant_update={cf.KEY_RANKS: ranks})
    with pytest.raises(cf.CheckpointFormatError, match=r"factors model\.layers\.0\.self_attn\.q_proj but not "
                                                         r"model\.layers\.0\.self_attn\.k_proj and "
                                                         r"model\.layers\.0\.self_attn\.v_proj"):
        load(v3_copy)
