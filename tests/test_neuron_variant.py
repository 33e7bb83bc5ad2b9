"""The model variant on a stand-in of vllm-neuron's native Llama / Qwen3 model class:
`from_configs` builds the stock model and swaps in our MLP for the listed layers only,
`load_weights` puts every tensor of a format-v1 checkpoint into exactly one parameter,
and a wrong checkpoint is refused by name before anything is served. Format v2: every
narrowed layer (`quantization_config.widths`) becomes our MLP at its width, dense or
factored, and at TP 1, 2 and 4 the ranks' partial sums equal the dense twin.

UNIT tests of our hooks against the upstream signatures (tests/neuron_standins.py says
which file each stand-in mirrors); vllm-neuron itself cannot be installed here."""
import collections

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_factory import edit_checkpoint, make_dense_and_factored, make_dense_and_narrowed
from neuron_standins import FakeGroup, StandinLlamaForCausalLM, StandinMLP, read_config
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


def _built_with_entry(checkpoint: str, key: str, entry: str, value: int):
    """from_configs on the checkpoint's config with one more `quantization_config[key]` entry."""
    cfg = read_config(checkpoint)
    cfg[fmt.QUANTIZATION_CONFIG_KEY][key][entry] = value
    return Model.from_configs(cfg, None)


def test_ranks_naming_a_module_the_model_lacks(checkpoints):
    with pytest.raises(fmt.CheckpointFormatError, match=r"lists 'model\.layers\.7\.mlp\.down_proj', which is not an "
                                                        r"MLP projection of this .* model \(3 layers"):
        _built_with_entry(checkpoints[1], fmt.KEY_RANKS, "model.layers.7.mlp.down_proj", 32)


def test_dense_checkpoint_goes_through_untouched(checkpoints):
    dense, _ = checkpoints
    model = Model.from_configs(read_config(dense), None)
    assert all(isinstance(layer.mlp, StandinMLP) for layer in model.model.layers)
    assert not hasattr(model, "_svd_neuron")
    model.load_weights(dense, "cpu", None)
    assert not names.svd_mlps(model)


# ---------------------------------------------------------------- format v2: per-layer widths
# Layer 0 narrowed and dense, layer 1 narrowed with every projection factored at its width,
# layer 2 untouched (stays stock). 192, 96 and 128 all divide by 1, 2 and 4; 128 not by 3.
V2_INTER = 192
V2_WIDTHS = {0: 96, 1: 128}
V2_RANKS = {"model.layers.1.mlp.gate_proj": 32, "model.layers.1.mlp.up_proj": 64, "model.layers.1.mlp.down_proj": 32}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def narrowed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"v2-{request.param}")
    return make_dense_and_narrowed(str(root), V2_WIDTHS, request.param, hidden=HIDDEN, intermediate=V2_INTER,
                                   layers=3, ranks=V2_RANKS, block_size=32)


def _rank_model(tp: int, rank: int):
    """The patched stand-in built as MLP-TP rank `rank` of `tp` (one process plays one rank)."""
    return type(f"Rank{rank}of{tp}", (Model,), {"group_factory": staticmethod(lambda: FakeGroup(tp, rank))})


def _tensor_sources(model):
    sources = collections.Counter()
    for name, _ in model.named_parameters():
        keys = model.mappings.get(name, name)
        sources.update(keys if isinstance(keys, list) else [keys])
    return sources


def test_v2_config_is_parsed_and_its_widths_checked_against_the_model(narrowed):
    _, v2 = narrowed
    quant = integrate.svd_quant_config(read_config(v2))      # no longer refused
    assert quant.format_version == 2 and quant.widths == {"model.layers.0.mlp": 96, "model.layers.1.mlp": 128}
    with pytest.raises(fmt.CheckpointFormatError, match=r"widths lists \['model\.layers\.9\.mlp'\], which is not an "
                                                        r"MLP of this .* model \(3 layers"):
        _built_with_entry(v2, fmt.KEY_WIDTHS, "model.layers.9.mlp", 64)


def test_v2_every_tensor_lands_in_exactly_one_parameter_at_its_width(narrowed):
    _, v2 = narrowed
    with torch.device("meta"):
        model = Model.from_configs(read_config(v2), None)
    layers = model.model.layers
    assert [type(layer.mlp) for layer in layers] == [SVDNeuronMLP, SVDNeuronMLP, StandinMLP]
    assert model._svd_neuron.layers == (0, 1)
    assert not any(p.factored for p in layers[0].mlp.projections().values())        # narrowed, dense
    assert layers[1].mlp.fully_factored and layers[1].mlp.fused                        # narrowed, factored
    assert (layers[0].mlp.intermediate_size, layers[1].mlp.intermediate_size) == (96, 128)
    model.load_weights(v2, "cpu", None)
    checkpoint = load_file(f"{v2}/{fmt.SAFETENSORS_SINGLE_FILE}")
    assert _tensor_sources(model) == collections.Counter(list(checkpoint))   # each tensor exactly once, none missing
    ours = names.mlp_param_plan(model)
    assert sorted(ours) == sorted(k for k in checkpoint if k.startswith(("model.layers.0.mlp.", "model.layers.1.mlp.")))
    params = dict(model.named_parameters())
    for name in ours:
        want = checkpoint[name].T if name.endswith(".weight") else checkpoint[name]   # dense stored [in, out]
        torch.testing.assert_close(params[name], want, rtol=0, atol=0)
    assert tuple(params["model.layers.0.mlp.down_proj.weight"].shape) == (96, HIDDEN)
    assert tuple(params["model.layers.1.mlp.up_proj.svd_v"].shape) == (64, 128)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_v2_served_by_the_variant_equals_the_dense_twin(narrowed, tp, monkeypatch):
    dense, v2 = narrowed
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    checkpoint = collections.Counter(list(load_file(f"{v2}/{fmt.SAFETENSORS_SINGLE_FILE}")))
    w = load_file(f"{dense}/{fmt.SAFETENSORS_SINGLE_FILE}")   # full width; the removed channels' down columns are 0
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(tp))
    totals = {0: 0, 1: 0}
    for rank in range(tp):
        model = _rank_model(tp, rank).from_configs(read_config(v2), None)
        model.load_weights(v2, "cpu", None)
        assert _tensor_sources(model) == checkpoint       # on every rank, each tensor lands exactly once
        for i in totals:
            mlp = model.model.layers[i].mlp
            assert mlp.intermediate_size_per_rank == V2_WIDTHS[i] // tp
            totals[i] = totals[i] + mlp(x, is_prefill=False)   # the all-reduce's sum
        group = model.model.layers[0].mlp.mlp_tp_group             # the model's one MLP-TP group
        assert len(group.partials) == (len(totals) if tp > 1 else 0)   # decode: one all-reduce per layer
    for i, total in totals.items():
        p = f"model.layers.{i}.mlp"
        ref = (F.silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)) @ w[f"{p}.down_proj.weight"].T
        assert ((total - ref).abs().max() / ref.abs().max()).item() < 1e-5, f"layer {i} at TP {tp}"


def test_v2_width_the_tp_degree_does_not_divide_is_named_before_loading(narrowed):
    _, v2 = narrowed
    with pytest.raises(fmt.TensorParallelError, match=r"model\.layers\.1\.mlp: width \(its quantization_config\.widths\) "
                                                      r"128 does not divide by the MLP's tensor-parallel degree 3"):
        _rank_model(3, 0).from_configs(read_config(v2), None)      # from_configs: nothing loaded yet


def test_v2_tensor_at_the_wrong_width_is_refused_before_loading(tmp_path):
    _, v2 = make_dense_and_narrowed(str(tmp_path), V2_WIDTHS, hidden=HIDDEN, intermediate=V2_INTER, layers=3,
                                    ranks=V2_RANKS, block_size=32)
    edit_checkpoint(v2, replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(V2_INTER, HIDDEN)})  # full width
    model = Model.from_configs(read_config(v2), None)
    with pytest.raises(names.CheckpointMappingError,
                       match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \[192, 64\], expected \[96, 64\] "
                             r"\(model\.layers\.0\.mlp narrowed to width 96 by quantization_config\.widths\)"):
        model.load_weights(v2, "cpu", None)
    assert not model.loaded_state
