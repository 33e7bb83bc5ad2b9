"""transformers loads an svd_neuron checkpoint after `import vllm_neuronmlp`."""
import pytest
import torch

import vllm_neuronmlp  # noqa: F401  (registers the HF quantizer)
from model_factory import edit_checkpoint, make_dense_and_factored
from vllm_neuronmlp import checkpoint_format as fmt
from vllm_neuronmlp.hf_quantizer import SVDLinear


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    return make_dense_and_factored(str(tmp_path_factory.mktemp("hf")), "qwen3", hidden=192, intermediate=200,
                                   rank=32, factored_layers=[1])


def test_from_pretrained_matches_dense_twin_and_saves_format_v1(twins, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(twins[0], dtype=torch.float32)
    fact = AutoModelForCausalLM.from_pretrained(twins[1], dtype=torch.float32)
    assert isinstance(fact.model.layers[1].mlp.down_proj, SVDLinear)
    assert isinstance(fact.model.layers[0].mlp.down_proj, torch.nn.Linear)  # layer 0 stays dense
    ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
    with torch.no_grad():
        torch.testing.assert_close(fact(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)
    fact.save_pretrained(tmp_path / "resaved")
    report = fmt.validate(str(tmp_path / "resaved"))
    assert report.quant.ranks == fmt.validate(twins[1]).quant.ranks


def test_bad_quantization_config_is_named(twins, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path / "bad"
    shutil.copytree(twins[1], path)
    edit_checkpoint(str(path), quant_update={"format_version": 9})
    with pytest.raises(fmt.CheckpointFormatError, match="format_version is 9"):
        AutoModelForCausalLM.from_pretrained(path)
