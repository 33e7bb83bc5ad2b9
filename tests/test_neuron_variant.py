"""The model variant on a stand-in of vllm-neuron's native Llama / Qwen3 model class:
`from_configs` builds the stock model and swaps in our MLP for the listed layers only,
`load_weights` puts every tensor of a format-v1 checkpoint into exactly one parameter,
and a wrong checkpoint is refused by name before anything is served.

UNIT tests of our hooks against the upstream signatures (tests/neuron_standins.py says
which file each stand-in mirrors); vllm-neuron itself cannot be installed here."""
import collections

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_factory import edit_checkpoint, make_dense_and_factored
from neuron_standins import StandinLlamaForCausalLM, StandinMLP, read_config
from vllm_neuronmlp import checkpoint_format as fmt
from vllm_neuronmlp import ops
from vllm_neuronmlp.neuron import integrate, names
from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP

HIDDEN, INTER = 64, 128


class Model(StandinLlamaForCausalLM):
    """A fresh subclass per module, so patching it leaves the stand-in itself stock."""


integrate.patch_model_class(Model)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    dense, factored = make_dense_and_factored(str(root), arch=request.param, hidden=HIDDEN, intermediate=INTER,
                                              layers=3, rank=32, block_size=32, factored_layers=[0, 2])
    return dense, factored


def test_stock_config_code_rejects_svd_neuron_without_the_hook(checkpoints):
    _, factored = checkpoints
    with pytest.raises(ValueError, match="Unsupported quantization_config.quant_method='svd_neuron'"):
        StandinLlamaForCausalLM.from_configs(read_config(factored), None)


def test_every_tensor_lands_in_exactly_one_parameter(checkpoints):
    _, factored = checkpoints
    with torch.device("meta"):                   # the model runner builds the model on meta
        model = Model.from_configs(read_config(factored), None)
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [SVDNeuronMLP, StandinMLP, SVDNeuronMLP]   # layer 1 is not in `ranks`: stays stock
    with pytest.raises(names.CheckpointMappingError, match=r"model\.layers\.0\.mlp\.gate_proj\.svd_u.* never filled"):
        names.check_loaded(model)                # built but not loaded: never served
    model.load_weights(factored, "cpu", None)
    sources = collections.Counter()
    for name, _ in model.named_parameters():
        keys = model.mappings.get(name, name)
        sources.update(keys if isinstance(keys, list) else [keys])
    checkpoint = load_file(f"{factored}/{fmt.SAFETENSORS_SINGLE_FILE}")
    assert sources == collections.Counter(list(checkpoint))     # each tensor exactly once, none missing
    ours = names.mlp_param_plan(model)
    assert sorted(ours) == sorted(k for k in checkpoint if k.startswith(("model.layers.0.mlp.", "model.layers.2.mlp.")))
    for name, p in model.named_parameters():
        if name in ours:
            torch.testing.assert_close(p, checkpoint[name], rtol=0, atol=0)   # TP 1: whole tensors


def test_loaded_variant_mlp_matches_the_dense_twin(checkpoints, monkeypatch):
    dense, factored = checkpoints
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    model = Model.from_configs(read_config(factored), None)
    model.load_weights(factored, "cpu", None)
    w = load_file(f"{dense}/{fmt.SAFETENSORS_SINGLE_FILE}")      # W = U V stored dense (fp32)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    p = "model.layers.2.mlp"
    ref = (F.silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)) @ w[f"{p}.down_proj.weight"].T
    y = model.model.layers[2].mlp(x, is_prefill=False)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("edit,match", [
    ({"drop": ["model.layers.2.mlp.up_proj.svd_v"]},
     r"needs tensor\(s\) \['model\.layers\.2\.mlp\.up_proj\.svd_v'\]"),
    ({"replace": {"model.layers.0.mlp.gate_proj.svd_x": torch.zeros(2, 2)}},
     r"tensor\(s\) \['model\.layers\.0\.mlp\.gate_proj\.svd_x'\] would be left over"),
    ({"replace": {"model.layers.2.mlp.down_proj.weight": torch.zeros(HIDDEN, INTER)}},
     r"tensor\(s\) \['model\.layers\.2\.mlp\.down_proj\.weight'\] would be left over"),
], ids=["missing-factor", "misnamed-factor", "stale-dense-weight"])
def test_bad_checkpoint_is_refused_by_name_before_loading(tmp_path, edit, match):
    _, factored = make_dense_and_factored(str(tmp_path), hidden=HIDDEN, intermediate=INTER, layers=3, rank=32,
                                          block_size=32, factored_layers=[0, 2])
    edit_checkpoint(factored, **edit)
    model = Model.from_configs(read_config(factored), None)
    with pytest.raises(names.CheckpointMappingError, match=match):
        model.load_weights(factored, "cpu", None)
    assert not model.loaded_state                 # refused before the stock reader ran


def test_ranks_naming_a_module_the_model_lacks(checkpoints):
    _, factored = checkpoints
    cfg = read_config(factored)
    cfg[fmt.QUANTIZATION_CONFIG_KEY][fmt.KEY_RANKS]["model.layers.7.mlp.down_proj"] = 32
    with pytest.raises(fmt.CheckpointFormatError, match=r"lists 'model\.layers\.7\.mlp\.down_proj', which is not an "
                                                        r"MLP projection of this .* model \(3 layers"):
        Model.from_configs(cfg, None)


def test_dense_checkpoint_goes_through_untouched(checkpoints):
    dense, _ = checkpoints
    model = Model.from_configs(read_config(dense), None)
    assert all(isinstance(layer.mlp, StandinMLP) for layer in model.model.layers)
    assert not hasattr(model, "_svd_neuron")
    model.load_weights(dense, "cpu", None)
    assert not names.svd_mlps(model)


def test_per_layer_widths_are_refused_on_trainium():
    quant = fmt.QuantizationConfig(block_size=32, ranks={}, widths={"model.layers.0.mlp": 64})
    config = {"model_type": "llama", fmt.QUANTIZATION_CONFIG_KEY: quant.to_dict()}
    with pytest.raises(fmt.CheckpointFormatError, match=r"quantization_config\.widths narrows 1 layer\(s\) \(format "
                                                        r"version 2\); the Trainium variant serves format-v1"):
        integrate.svd_quant_config(config)
