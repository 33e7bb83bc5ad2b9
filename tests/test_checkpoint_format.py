"""Formats v1 to v3: validate() accepts a good checkpoint and names each problem."""
import json
import os
import shutil

import pytest
import torch

from model_factory import edit_checkpoint, make_dense_and_factored, mlp_module
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.mlp_families import DOWN, GATE, UP

L0_GATE = mlp_module("llama", 0, GATE)
L0_UP = mlp_module("llama", 0, UP)
L1_DOWN = mlp_module("llama", 1, DOWN)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    _, fact = make_dense_and_factored(str(root), hidden=64 * 3, intermediate=200, layers=2, rank=32,
                                      ranks={L1_DOWN: 64})
    return fact


@pytest.fixture
def ckpt(good, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(good, path)
    return path


def test_good_checkpoint_report(good):
    report = cf.validate(good)
    assert report.factored[L0_GATE] == (192, 200, 32)
    assert report.factored[L1_DOWN] == (200, 192, 64)
    assert len(report.factored) == 6
    # independent count of the factored parameters
    want = 5 * 32 * (192 + 200) + 64 * (200 + 192)
    assert report.mlp_factored_params == want
    assert report.mlp_dense_params == 6 * 192 * 200
    assert cf.mlp_ratio(report.model_config, report.quant.ranks) == pytest.approx(1 - want / (6 * 192 * 200))


def test_config_round_trip():
    q = cf.QuantizationConfig(block_size=128, ranks={L0_GATE: 256, L0_UP: 128}, provenance={"ratio": 0.2})
    d = q.to_dict()
    assert d["quant_method"] == "svd_neuron" and d["format_version"] == 1
    back = cf.QuantizationConfig.from_dict(d)
    assert back.ranks == q.ranks and back.block_size == 128 and back.provenance == {"ratio": 0.2}


def test_missing_factor(ckpt):
    edit_checkpoint(ckpt, drop=[cf.v_name(L1_DOWN)])
    with pytest.raises(cf.CheckpointFormatError, match=r"model\.layers\.1\.mlp\.down_proj\.svd_v is missing"):
        cf.validate(ckpt)


def test_wrong_shape(ckpt):
    edit_checkpoint(ckpt, replace={cf.u_name(L0_GATE): torch.zeros(192, 64)})
    with pytest.raises(cf.CheckpointFormatError,
                       match=r"gate_proj\.svd_u has shape \[192, 64\], expected \[192, 32\]"):
        cf.validate(ckpt)


def test_rank_not_multiple_of_block(ckpt):
    edit_checkpoint(ckpt, quant_update={"block_size": 64})
    with pytest.raises(cf.CheckpointFormatError, match=r"ranks\['model\.layers\.0\.mlp\.gate_proj'\] is 32, "
                                                          r"expected a positive multiple of block_size 64"):
        cf.validate(ckpt)


def test_unknown_format_version(ckpt):
    edit_checkpoint(ckpt, quant_update={"format_version": 7})
    with pytest.raises(cf.CheckpointFormatError, match=r"format_version is 7; .* reads format versions \[1, 2, 3\]"):
        cf.validate(ckpt)


def test_weight_left_beside_factors(ckpt):
    edit_checkpoint(ckpt, replace={cf.weight_name(L0_UP): torch.zeros(200, 192)})
    with pytest.raises(cf.CheckpointFormatError, match=r"up_proj\.weight is present although .* is factored"):
        cf.validate(ckpt)


def unlist(ckpt, modules):
    """Remove modules from config.json's ranks, leaving their tensors in place."""
    config = cf.read_config(ckpt)
    for m in modules:
        del config["quantization_config"]["ranks"][m]
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)


def test_gate_without_up(ckpt):
    unlist(ckpt, [L0_UP])
    with pytest.raises(cf.CheckpointFormatError, match=r"gate_proj is factored but .*up_proj is not"):
        cf.validate(ckpt)


def test_non_finite_values(ckpt):
    bad = torch.randn(32, 200)
    bad[3, 4] = float("nan")
    edit_checkpoint(ckpt, replace={cf.v_name(L0_UP): bad})
    with pytest.raises(cf.CheckpointFormatError, match=r"up_proj\.svd_v has 1 non-finite values"):
        cf.validate(ckpt)


def test_stray_factor(ckpt):
    unlist(ckpt, [mlp_module("llama", 1, role) for role in (GATE, UP)])
    with pytest.raises(cf.CheckpointFormatError,
                       match=r"layers\.1\.mlp\.(gate|up)_proj\.svd_[uv] is a factor of .*not listed"):
        cf.validate(ckpt)


def test_truncated_safetensors(ckpt):
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(cf.CheckpointFormatError, match=r"model\.safetensors: tensor .* runs past the end"):
        cf.validate(ckpt)


def test_not_a_svd_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(cf.CheckpointFormatError, match=r"config\.json: has no 'quantization_config'"):
        cf.validate(str(tmp_path))
    with pytest.raises(cf.CheckpointFormatError, match=r"config\.json: not found"):
        cf.validate(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- format v2: per-layer intermediate widths
@pytest.fixture(scope="module")
def good_v2(tmp_path_factory):
    from model_factory import make_dense_and_narrowed

    root = tmp_path_factory.mktemp("fmt2")
    ranks = {L1_DOWN: 32, L0_GATE: 64, L0_UP: 64}
    _, narrowed = make_dense_and_narrowed(str(root), {0: 128, 1: 192}, hidden=192, intermediate=256, ranks=ranks)
    return narrowed


@pytest.fixture
def ckpt_v2(good_v2, tmp_path):
    path = str(tmp_path / "ckpt2")
    shutil.copytree(good_v2, path)
    return path


def test_v2_widths_validate_and_count(good_v2):
    report = cf.validate(good_v2)
    q = report.quant
    assert q.format_version == 2 and q.widths == {"model.layers.0.mlp": 128, "model.layers.1.mlp": 192}
    assert report.factored[L0_GATE] == (192, 128, 64) and report.factored[L1_DOWN] == (192, 192, 32)
    dense = 3 * 192 * 256 * 2
    kept = (2 * 64 * (192 + 128) + 192 * 128) + (2 * 192 * 192 + 32 * (192 + 192))
    assert cf.mlp_ratio(report.model_config, q.ranks, widths=q.widths) == pytest.approx(1 - kept / dense)


def test_v1_config_writes_version_1_and_round_trips():
    q = cf.QuantizationConfig(block_size=32, ranks={L0_GATE: 32, L0_UP: 32})
    assert q.to_dict()["format_version"] == 1 and "widths" not in q.to_dict()
    q2 = cf.QuantizationConfig(block_size=32, ranks={}, widths={"model.layers.0.mlp": 64})
    assert cf.QuantizationConfig.from_dict(q2.to_dict()).widths == {"model.layers.0.mlp": 64}
    assert q2.to_dict()["format_version"] == 2


def test_v2_width_not_a_multiple_of_the_block_size(ckpt_v2):
    edit_checkpoint(ckpt_v2, quant_update={"widths": {"model.layers.0.mlp": 120, "model.layers.1.mlp": 192}})
    with pytest.raises(cf.CheckpointFormatError, match=r"widths\['model.layers.0.mlp'\] is 120, expected a "
                                                         r"positive multiple of block_size 32"):
        cf.validate(ckpt_v2)


def test_v2_width_not_below_the_intermediate_size(ckpt_v2):
    edit_checkpoint(ckpt_v2, quant_update={"widths": {"model.layers.0.mlp": 128, "model.layers.1.mlp": 256}})
    with pytest.raises(cf.CheckpointFormatError, match=r"is 256, expected less than intermediate_size 256"):
        cf.validate(ckpt_v2)


def test_v2_factor_shape_inconsistent_with_the_width(ckpt_v2):
    edit_checkpoint(ckpt_v2, replace={cf.v_name(L0_GATE): torch.zeros(64, 256)})
    with pytest.raises(cf.CheckpointFormatError, match=r"gate_proj\.svd_v has shape \[64, 256\], expected "
                                                         r"\[64, 128\] .*width of model.layers.0.mlp"):
        cf.validate(ckpt_v2)


def test_v2_dense_weight_inconsistent_with_the_width(ckpt_v2):
    edit_checkpoint(ckpt_v2, replace={cf.weight_name(mlp_module("llama", 0, DOWN)): torch.zeros(192, 256)})
    with pytest.raises(cf.CheckpointFormatError, match=r"down_proj\.weight has shape \[192, 256\], expected "
                                                         r"\[192, 128\] \(width 128 of model.layers.0.mlp"):
        cf.validate(ckpt_v2)


def test_widths_need_format_version_2(ckpt):
    edit_checkpoint(ckpt, quant_update={"widths": {"model.layers.0.mlp": 64}})
    with pytest.raises(cf.CheckpointFormatError, match=r"widths needs format_version 2, the config says 1"):
        cf.validate(ckpt)


def test_v2_widths_must_split_over_tensor_parallel_ranks():
    q = cf.QuantizationConfig(block_size=32, ranks={}, widths={"model.layers.0.mlp": 96, "model.layers.1.mlp": 64})
    cf.check_tensor_parallel(q, 1)
    cf.check_tensor_parallel(q, 2)
    with pytest.raises(cf.TensorParallelError, match=r"widths\['model.layers.0.mlp'\] is 96, which does not "
                                                      r"split over tensor parallel size 64"):
        cf.check_tensor_parallel(q, 64)


# ---------------------------------------------------------------- format v3: factored attention projections
L0_Q, L0_K, L0_V = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
L1_O = "model.layers.1.self_attn.o_proj"


@pytest.fixture(scope="module")
def good_v3(tmp_path_factory):
    from model_factory import V3_WIDTHS, make_dense_and_compressed, v3_ranks

    # Qwen3 with 4 heads of its explicit head_dim 32 (q 128 wide, hidden 192) and one kv head
    _, v3 = make_dense_and_compressed(str(tmp_path_factory.mktemp("fmt3")), v3_ranks("qwen3"), V3_WIDTHS, "qwen3",
                                      hidden=192, intermediate=256, layers=3, heads=4, kv_heads=1)
    return v3


@pytest.fixture
def ckpt_v3(good_v3, tmp_path):
    path = str(tmp_path / "ckpt3")
    shutil.copytree(good_v3, path)
    return path


def test_v3_attention_validates_and_counts(good_v3):
    report = cf.validate(good_v3)
    q = report.quant
    assert q.format_version == 3 and q.widths == {"model.layers.1.mlp": 128}
    # (in, out, rank) from heads x head_dim: q 4 x 32, k/v 1 x 32, o back to hidden 192
    assert report.attention_factored == {
        L0_Q: (192, 128, 64), L0_K: (192, 32, 32), L0_V: (192, 32, 32), L1_O: (128, 192, 64),
        "model.layers.2.self_attn.q_proj": (192, 128, 32), "model.layers.2.self_attn.k_proj": (192, 32, 32),
        "model.layers.2.self_attn.v_proj": (192, 32, 32), "model.layers.2.self_attn.o_proj": (128, 192, 32)}
    assert set(report.mlp_factored) == {mlp_module("qwen3", 0, r) for r in (GATE, UP, DOWN)}
    assert set(report.factored) == set(report.attention_factored) | set(report.mlp_factored)
    assert report.attention_dense_params == 2 * (192 * 128 + 2 * 192 * 32) + 2 * 128 * 192
    assert report.attention_factored_params == (64 * 320 + 2 * 32 * 224 + 64 * 320
                                                + 32 * 320 + 2 * 32 * 224 + 32 * 320)
    # the MLP figures and the MLP ratio ignore the attention factors
    assert report.mlp_dense_params == 3 * 192 * 256 and report.mlp_factored_params == 3 * 32 * (192 + 256)
    dense = 3 * 3 * 192 * 256
    kept = 3 * 32 * (192 + 256) + 3 * 192 * 128 + 3 * 192 * 256
    assert cf.mlp_ratio(report.model_config, q.ranks, widths=q.widths) == pytest.approx(1 - kept / dense)


def test_expected_shape_of_attention_projections():
    explicit = {"hidden_size": 192, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 48}
    assert cf.expected_shape(explicit, L0_Q) == (192, 192) and cf.expected_shape(explicit, L0_V) == (192, 48)
    assert cf.expected_shape(explicit, L1_O) == (192, 192)
    derived = {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": None}
    assert cf.expected_shape(derived, L0_K) == (192, 64)  # head_dim = 192 / 6
    mha = {"hidden_size": 128, "num_attention_heads": 4}    # no num_key_value_heads: k/v as wide as q
    assert cf.expected_shape(mha, L0_K) == (128, 128)
    nested = {"text_config": explicit}
    assert cf.expected_shape(nested, L1_O) == (192, 192)


def test_v3_written_exactly_when_attention_is_factored():
    mlp = cf.QuantizationConfig(block_size=32, ranks={L0_GATE: 32, L0_UP: 32}, widths={"model.layers.1.mlp": 64})
    assert mlp.to_dict()["format_version"] == 2 and mlp.attention_ranks() == {}
    att = cf.QuantizationConfig(block_size=32, ranks={L0_GATE: 32, L0_UP: 32, L1_O: 64},
                                 widths={"model.layers.1.mlp": 64})
    d = att.to_dict()
    assert d["format_version"] == 3 and att.attention_ranks() == {L1_O: 64}
    back = cf.QuantizationConfig.from_dict(d)
    assert back.format_version == 3 and back.ranks == att.ranks and back.widths == att.widths
    assert back.width_of(L1_O) is None  # widths never narrow attention


@pytest.mark.parametrize("version", [1, 2])
def test_attention_needs_format_version_3(version):
    qc = {"quant_method": "svd_neuron", "format_version": version, "block_size": 32, "ranks": {L1_O: 32}}
    with pytest.raises(cf.CheckpointFormatError,
                       match=rf"config\.json: quantization_config\.ranks lists the attention projection "
                             rf"model\.layers\.1\.self_attn\.o_proj, which needs format_version 3; the config says "
                             rf"{version}"):
        cf.QuantizationConfig.from_dict(qc)


@pytest.mark.parametrize("listed,missing", [((L0_Q,), r"k_proj and model\.layers\.0\.self_attn\.v_proj"),
                                            ((L0_Q, L0_K), r"v_proj"),
                                            ((L0_V,), r"q_proj and model\.layers\.0\.self_attn\.k_proj")])
def test_q_k_v_factored_together(listed, missing):
    qc = cf.QuantizationConfig(block_size=32, ranks={m: 32 for m in listed}).to_dict()
    with pytest.raises(cf.CheckpointFormatError,
                       match=rf"factors model\.layers\.0\.self_attn\.\w_proj but not model\.layers\.0\.self_attn\."
                             rf"{missing}; the q, k and v projections of one layer must be factored together"):
        cf.QuantizationConfig.from_dict(qc)


def test_v3_q_without_k_and_v_in_a_checkpoint(ckpt_v3):
    unlist(ckpt_v3, [L0_K, L0_V])
    with pytest.raises(cf.CheckpointFormatError, match=r"config\.json: .*factors model\.layers\.0\.self_attn\.q_proj "
                                                         r"but not model\.layers\.0\.self_attn\.k_proj"):
        cf.validate(ckpt_v3)


def test_v3_missing_attention_factor(ckpt_v3):
    edit_checkpoint(ckpt_v3, drop=[cf.v_name(L1_O)])
    with pytest.raises(cf.CheckpointFormatError, match=r"tensor model\.layers\.1\.self_attn\.o_proj\.svd_v is missing; "
                                                         r".*rank 64, so it needs .*svd_v of shape \[64, 192\]"):
        cf.validate(ckpt_v3)


def test_v3_wrong_attention_factor_shape(ckpt_v3):
    # q's V given hidden_size columns: the config's 4 heads x head_dim 32 make it 128
    edit_checkpoint(ckpt_v3, replace={cf.v_name(L0_Q): torch.zeros(64, 192)})
    with pytest.raises(cf.CheckpointFormatError,
                       match=r"ckpt3/model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.svd_v has shape "
                             r"\[64, 192\], expected \[64, 128\] \(in_features=192, rank=64, out_features=128 from "
                             r".*config\.json, num_attention_heads 4 x head_dim 32\)"):
        cf.validate(ckpt_v3)


def test_v3_attention_weight_left_beside_factors(ckpt_v3):
    edit_checkpoint(ckpt_v3, replace={cf.weight_name(L0_K): torch.zeros(32, 192)})
    with pytest.raises(cf.CheckpointFormatError, match=r"k_proj\.weight is present although .*k_proj is factored"):
        cf.validate(ckpt_v3)


def test_v3_bias_beside_factors_has_the_output_shape(ckpt_v3):
    cf.validate(ckpt_v3)
    edit_checkpoint(ckpt_v3, replace={cf.bias_name(L0_K): torch.zeros(32)})  # a dense bias beside factors is fine
    cf.validate(ckpt_v3)
    edit_checkpoint(ckpt_v3, replace={cf.bias_name(L0_K): torch.zeros(128)})
    with pytest.raises(cf.CheckpointFormatError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.bias has shape "
                                                         r"\[128\], expected \[32\]"):
        cf.validate(ckpt_v3)


def test_v3_stray_attention_factor(ckpt_v3):
    unlist(ckpt_v3, [L1_O])
    with pytest.raises(cf.CheckpointFormatError, match=r"o_proj\.svd_[uv] is a factor of model\.layers\.1\.self_attn"
                                                         r"\.o_proj, which is not listed"):
        cf.validate(ckpt_v3)


# ---------------------------------------------------------------- shapes and tensor-parallel shards
@pytest.mark.parametrize("role", ["gate", "up", "down", "q", "k", "v", "o"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_the_split_table_keeps_every_factored_product_exact(role, tp):
    """Each rank's part of W, U and V (split_dim, tp_slice) computes its part of x W^T:
    a column-parallel rank its output columns, a row-parallel rank a partial sum; the
    reference is the whole product, in float64."""
    gen = torch.Generator().manual_seed(tp)
    n_in, n_out, r = 64, 96, 8
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    u, v = torch.randn(n_in, r, generator=gen, dtype=torch.float64), torch.randn(r, n_out, generator=gen,
                                                                                 dtype=torch.float64)
    x = torch.randn(5, n_in, generator=gen, dtype=torch.float64)
    parallel = cf.parallelism(role)
    assert parallel == (cf.ROW_PARALLEL if role in ("down", "o") else cf.COLUMN_PARALLEL)

    def part(t, leaf, rank):
        dim = cf.split_dim(parallel, leaf)
        return t if dim is None else t.narrow(dim, *cf.tp_slice(t.shape[dim], rank, tp))

    def x_part(rank):  # a row-parallel rank reads its slice of the input
        return x.narrow(1, *cf.tp_slice(n_in, rank, tp)) if parallel == cf.ROW_PARALLEL else x

    dense = [x_part(k) @ part(w, cf.WEIGHT_SUFFIX, k).T for k in range(tp)]
    factored = [(x_part(k) @ part(u, cf.U_SUFFIX, k)) @ part(v, cf.V_SUFFIX, k) for k in range(tp)]
    combine = sum if parallel == cf.ROW_PARALLEL else (lambda parts: torch.cat(parts, 1))
    torch.testing.assert_close(combine(dense), x @ w.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(combine(factored), x @ u @ v, rtol=0, atol=1e-10)


def test_tp_part_names_what_does_not_split_and_what_would():
    assert cf.tp_part(96, 4, "width") == 24
    assert [cf.tp_slice(96, k, 4) for k in range(4)] == [(0, 24), (24, 24), (48, 24), (72, 24)]
    with pytest.raises(cf.TensorParallelError, match=r"^layer 3's width is 96, which does not split over tensor "
                                                     r"parallel size 64; tensor parallel sizes that divide it \(up "
                                                     r"to 64\): \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48\]$"):
        cf.tp_part(96, 64, "layer 3's width")

    class OwnError(cf.TensorParallelError):
        pass

    with pytest.raises(OwnError, match=r"^the MLP: tensor-parallel degree must be >= 1, got 0$"):
        cf.tp_part(96, 0, "the MLP", OwnError)


def test_shapes_from_the_role_agree_with_the_config_and_the_gated_mlp_count():
    config = {"hidden_size": 192, "intermediate_size": 200, "num_attention_heads": 6, "num_hidden_layers": 2}
    for role, module in (("gate", "model.layers.0.mlp.gate_proj"), ("up", "model.layers.0.mlp.up_proj"),
                         ("down", "model.layers.0.mlp.down_proj")):
        assert cf.projection_shape(role, 192, 200) == cf.expected_shape(config, module)
        assert cf.projection_shape(role, 192, 96) == cf.expected_shape(config, module, width=96)
        n_in, n_out = cf.projection_shape(role, 192, 200)
        assert cf.leaf_shape(n_in, n_out, cf.WEIGHT_SUFFIX) == (n_out, n_in)
        assert cf.leaf_shape(n_in, n_out, cf.U_SUFFIX, 32) == (n_in, 32)
        assert cf.leaf_shape(n_in, n_out, cf.V_SUFFIX, 32) == (32, n_out)
    layer = [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert cf.mlp_params(192, 200) == sum(cf.dense_params(*cf.expected_shape(config, m)) for m in layer)
