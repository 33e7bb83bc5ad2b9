"""Format v1: validate() accepts a good checkpoint and names each problem."""
import json
import os
import shutil

import pytest
import torch

from model_factory import edit_checkpoint, make_dense_and_factored, mlp_module
from vllm_neuronmlp import checkpoint_format as fmt
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
    report = fmt.validate(good)
    assert report.factored[L0_GATE] == (192, 200, 32)
    assert report.factored[L1_DOWN] == (200, 192, 64)
    assert len(report.factored) == 6
    # independent count of the factored parameters
    want = 5 * 32 * (192 + 200) + 64 * (200 + 192)
    assert report.mlp_factored_params == want
    assert report.mlp_dense_params == 6 * 192 * 200
    assert fmt.mlp_ratio(report.model_config, report.quant.ranks) == pytest.approx(1 - want / (6 * 192 * 200))


def test_config_round_trip():
    q = fmt.QuantizationConfig(block_size=128, ranks={L0_GATE: 256, L0_UP: 128}, provenance={"ratio": 0.2})
    d = q.to_dict()
    assert d["quant_method"] == "svd_neuron" and d["format_version"] == 1
    back = fmt.QuantizationConfig.from_dict(d)
    assert back.ranks == q.ranks and back.block_size == 128 and back.provenance == {"ratio": 0.2}


def test_missing_factor(ckpt):
    edit_checkpoint(ckpt, drop=[fmt.v_name(L1_DOWN)])
    with pytest.raises(fmt.CheckpointFormatError, match=r"model\.layers\.1\.mlp\.down_proj\.svd_v is missing"):
        fmt.validate(ckpt)


def test_wrong_shape(ckpt):
    edit_checkpoint(ckpt, replace={fmt.u_name(L0_GATE): torch.zeros(192, 64)})
    with pytest.raises(fmt.CheckpointFormatError,
                       match=r"gate_proj\.svd_u has shape \[192, 64\], expected \[192, 32\]"):
        fmt.validate(ckpt)


def test_rank_not_multiple_of_block(ckpt):
    edit_checkpoint(ckpt, quant_update={"block_size": 64})
    with pytest.raises(fmt.CheckpointFormatError, match=r"ranks\['model\.layers\.0\.mlp\.gate_proj'\] is 32, "
                                                          r"expected a positive multiple of block_size 64"):
        fmt.validate(ckpt)


def test_unknown_format_version(ckpt):
    edit_checkpoint(ckpt, quant_update={"format_version": 7})
    with pytest.raises(fmt.CheckpointFormatError, match=r"format_version is 7; .* reads format versions \[1, 2, 3\]"):
        fmt.validate(ckpt)


def test_weight_left_beside_factors(ckpt):
    edit_checkpoint(ckpt, replace={fmt.weight_name(L0_UP): torch.zeros(200, 192)})
    with pytest.raises(fmt.CheckpointFormatError, match=r"up_proj\.weight is present although .* is factored"):
        fmt.validate(ckpt)


def unlist(ckpt, modules):
    """Remove modules from config.json's ranks, leaving their tensors in place."""
    config = fmt.read_config(ckpt)
    for m in modules:
        del config["quantization_config"]["ranks"][m]
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)


def test_gate_without_up(ckpt):
    unlist(ckpt, [L0_UP])
    with pytest.raises(fmt.CheckpointFormatError, match=r"gate_proj is factored but .*up_proj is not"):
        fmt.validate(ckpt)


def test_non_finite_values(ckpt):
    bad = torch.randn(32, 200)
    bad[3, 4] = float("nan")
    edit_checkpoint(ckpt, replace={fmt.v_name(L0_UP): bad})
    with pytest.raises(fmt.CheckpointFormatError, match=r"up_proj\.svd_v has 1 non-finite values"):
        fmt.validate(ckpt)


def test_stray_factor(ckpt):
    unlist(ckpt, [mlp_module("llama", 1, role) for role in (GATE, UP)])
    with pytest.raises(fmt.CheckpointFormatError, match=r"layers\.1\.mlp\.(gate|up)_proj\.svd_[uv] is a factor of .*not listed"):
        fmt.validate(ckpt)


def test_truncated_safetensors(ckpt):
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(fmt.CheckpointFormatError, match=r"model\.safetensors: tensor .* runs past the end"):
        fmt.validate(ckpt)


def test_not_a_svd_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(fmt.CheckpointFormatError, match=r"config\.json: has no 'quantization_config'"):
        fmt.validate(str(tmp_path))
    with pytest.raises(fmt.CheckpointFormatError, match=r"config\.json: not found"):
        fmt.validate(str(tmp_path / "nowhere"))


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
    report = fmt.validate(good_v2)
    q = report.quant
    assert q.format_version == 2 and q.widths == {"model.layers.0.mlp": 128, "model.layers.1.mlp": 192}
    assert report.factored[L0_GATE] == (192, 128, 64) and report.factored[L1_DOWN] == (192, 192, 32)
    dense = 3 * 192 * 256 * 2
    kept = (2 * 64 * (192 + 128) + 192 * 128) + (2 * 192 * 192 + 32 * (192 + 192))
    assert fmt.mlp_ratio(report.model_config, q.ranks, widths=q.widths) == pytest.approx(1 - kept / dense)


def test_v1_config_writes_version_1_and_round_trips():
    q = fmt.QuantizationConfig(block_size=32, ranks={L0_GATE: 32, L0_UP: 32})
    assert q.to_dict()["format_version"] == 1 and "widths" not in q.to_dict()
    q2 = fmt.QuantizationConfig(block_size=32, ranks={}, widths={"model.layers.0.mlp": 64})
    assert fmt.QuantizationConfig.from_dict(q2.to_dict()).widths == {"model.layers.0.mlp": 64}
    assert q2.to_dict()["format_version"] == 2


def test_v2_width_not_a_multiple_of_the_block_size(ckpt_v2):
    edit_checkpoint(ckpt_v2, quant_update={"widths": {"model.layers.0.mlp": 120, "model.layers.1.mlp": 192}})
    with pytest.raises(fmt.CheckpointFormatError, match=r"widths\['model.layers.0.mlp'\] is 120, expected a "
                                                         r"positive multiple of block_size 32"):
        fmt.validate(ckpt_v2)


def test_v2_width_not_below_the_intermediate_size(ckpt_v2):
    edit_checkpoint(ckpt_v2, quant_update={"widths": {"model.layers.0.mlp": 128, "model.layers.1.mlp": 256}})
    with pytest.raises(fmt.CheckpointFormatError, match=r"is 256, expected less than intermediate_size 256"):
        fmt.validate(ckpt_v2)


def test_v2_factor_shape_inconsistent_with_the_width(ckpt_v2):
    edit_checkpoint(ckpt_v2, replace={fmt.v_name(L0_GATE): torch.zeros(64, 256)})
    with pytest.raises(fmt.CheckpointFormatError, match=r"gate_proj\.svd_v has shape \[64, 256\], expected "
                                                         r"\[64, 128\] .*width of model.layers.0.mlp"):
        fmt.validate(ckpt_v2)


def test_v2_dense_weight_inconsistent_with_the_width(ckpt_v2):
    edit_checkpoint(ckpt_v2, replace={fmt.weight_name(mlp_module("llama", 0, DOWN)): torch.zeros(192, 256)})
    with pytest.raises(fmt.CheckpointFormatError, match=r"down_proj\.weight has shape \[192, 256\], expected "
                                                         r"\[192, 128\] \(width 128 of model.layers.0.mlp"):
        fmt.validate(ckpt_v2)


def test_widths_need_format_version_2(ckpt):
    edit_checkpoint(ckpt, quant_update={"widths": {"model.layers.0.mlp": 64}})
    with pytest.raises(fmt.CheckpointFormatError, match=r"widths needs format_version 2, the config says 1"):
        fmt.validate(ckpt)


def test_v2_widths_must_split_over_tensor_parallel_ranks():
    q = fmt.QuantizationConfig(block_size=32, ranks={}, widths={"model.layers.0.mlp": 96, "model.layers.1.mlp": 64})
    fmt.check_tensor_parallel(q, 1)
    fmt.check_tensor_parallel(q, 2)
    with pytest.raises(fmt.TensorParallelError, match=r"widths\['model.layers.0.mlp'\] is 96, which does not "
                                                      r"split over tensor parallel size 64"):
        fmt.check_tensor_parallel(q, 64)
