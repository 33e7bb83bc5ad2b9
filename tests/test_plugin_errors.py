"""Bad checkpoints fail at load, before serving, with the plugin's message.

Each case starts a real engine (in its own process) and checks its exit and
the message on stderr: never a silently half-loaded model.
"""
import pytest
import torch

from model_factory import edit_checkpoint, make_dense_and_factored, mlp_module, write_unsupported_model
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.mlp_families import DOWN, GATE
from vllm_runner import run_engine

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
DOWN1 = mlp_module("llama", 1, DOWN)
GATE0 = mlp_module("llama", 0, GATE)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_dense_and_factored(str(tmp_path_factory.mktemp("bad")), hidden=192, intermediate=200, rank=32)


@pytest.fixture
def factored(models, tmp_path):
    import shutil

    path = str(tmp_path / "ckpt")
    shutil.copytree(models[1], path)
    return path


def fails_with(proc, pattern):
    import re

    assert proc.returncode != 0, "the engine started on a bad checkpoint"
    assert re.search(pattern, proc.stderr), proc.stderr[-4000:]


def test_missing_factor_without_weight_tracking(factored, tmp_path):
    # vLLM itself would leave the parameter uninitialized; the plugin refuses.
    edit_checkpoint(factored, drop=[cf.v_name(DOWN1)])
    proc = run_engine(factored, str(tmp_path / "o.json"), track_weights=False)
    fails_with(proc, r"CheckpointFormatError: the checkpoint lacks model\.layers\.1\.mlp\.down_proj\.svd_v")


def test_wrong_factor_shape(factored, tmp_path):
    edit_checkpoint(factored, replace={cf.u_name(GATE0): torch.zeros(192, 64)})
    proc = run_engine(factored, str(tmp_path / "o.json"))
    fails_with(proc, r"CheckpointFormatError: tensor model\.layers\.0\.mlp\.gate_proj\.svd_u has shape \[192, 64\], "
                     r"expected \[192, 32\]")


def test_rank_not_a_multiple_of_block_size(factored, tmp_path):
    edit_checkpoint(factored, quant_update={"block_size": 128})
    proc = run_engine(factored, str(tmp_path / "o.json"))
    # raised while vLLM builds its config, so pydantic wraps it as a "Value error"
    fails_with(proc, r"config\.json: quantization_config\.ranks\['model\.layers\.\d\.mlp\.\w+_proj'\] is 32, "
                     r"expected a positive multiple of block_size 128")


def test_unknown_format_version(factored, tmp_path):
    edit_checkpoint(factored, quant_update={"format_version": 9})
    proc = run_engine(factored, str(tmp_path / "o.json"))
    fails_with(proc, r"config\.json: quantization_config\.format_version is 9; "
                     r"this version of vllm-neuronmlp reads format versions \[1, 2, 3\]")


def test_quantization_flag_on_a_dense_checkpoint(models, tmp_path):
    proc = run_engine(models[0], str(tmp_path / "o.json"), quantization="svd_neuron")
    fails_with(proc, r"--quantization svd_neuron was given, but the model's config\.json has no "
                     r"'quantization_config'")


def test_unsupported_model_type(tmp_path):
    write_unsupported_model(str(tmp_path / "phi3"))
    proc = run_engine(str(tmp_path / "phi3"), str(tmp_path / "o.json"))
    fails_with(proc, r"UnsupportedModelError: config\.json model_type 'phi3' has no known MLP family; vllm-neuronmlp "
                     r"supports model_type llama, mistral, qwen2, qwen3, gemma")
