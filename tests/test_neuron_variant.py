"""The model variant on stand-ins of vllm-neuron's native Llama and Qwen3 classes
(tests/neuron_standins.py, each with exactly the attributes of its upstream class):
`from_configs` builds the stock model and swaps in our MLP for the listed layers only,
`load_weights` puts every tensor into exactly one parameter, each tensor-parallel rank
loads ITS shard (found from the group the stock MLP really holds), a model compiled
before its weights (`load_weights_lite`) reads every factor as a parameter or buffer, a
wrong checkpoint is refused by name before anything is served. Format v2: every narrowed
layer becomes our MLP at its width; at TP 1, 2 and 4 the ranks' partial sums equal the
dense twin. Format v3 (factored attention): tests/test_neuron_attention.py.

UNIT tests of our hooks against the upstream classes; vllm-neuron itself cannot be
installed here."""
import collections
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_factory import edit_checkpoint, make_dense_and_factored, make_dense_and_narrowed
from neuron_standins import (FakeGroup, StandinLlamaForCausalLM, StandinLlamaMLP, StandinQwen3Bf16ForCausalLM,
                             StandinQwen3Factory, StandinQwen3ForCausalLM, StandinQwen3MLP, read_config)
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import ops
from vllm_neuronmlp.neuron import integrate, names
from vllm_neuronmlp.neuron import stack as stack_mod
from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP

HIDDEN, INTER = 128, 128   # 4 heads of 32 (2 KV heads): the stock attention splits them up to TP 4
STOCK = {"llama": (StandinLlamaForCausalLM, StandinLlamaMLP), "qwen3": (StandinQwen3ForCausalLM, StandinQwen3MLP)}


def _patched(base, tp: int = 1, rank: int = 0, global_rank=None):
    """A fresh subclass of a stand-in, playing rank `rank` of a TP group of `tp` (its
    global rank `global_rank`), patched by the variant; the stand-in itself stays stock."""
    group = staticmethod(lambda: FakeGroup(tp, rank, global_rank=global_rank))
    cls = type(f"{base.__name__}Rank{rank}of{tp}", (base,), {"group_factory": group})
    integrate.patch_model_class(cls)
    return cls


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    dense, factored = make_dense_and_factored(str(root), arch=request.param, hidden=HIDDEN, intermediate=INTER,
                                              layers=3, rank=32, block_size=32, factored_layers=[0, 2])
    return request.param, dense, factored


def _dense_mlp(w, i, x):
    p = f"model.layers.{i}.mlp"
    return (F.silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)) @ w[f"{p}.down_proj.weight"].T


def _rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _tensor_sources(model):
    sources = collections.Counter()
    for name, _ in model.named_parameters():
        keys = model.last_mappings.get(name, name)
        sources.update(keys if isinstance(keys, list) else [keys])
    return sources


def test_stock_config_code_rejects_or_drops_svd_neuron_without_the_hook(checkpoints):
    arch, _, factored = checkpoints
    if arch == "llama":   # llama3/quantization.py rejects an unknown quant_method
        with pytest.raises(ValueError, match="Unsupported quantization_config.quant_method='svd_neuron'"):
            StandinLlamaForCausalLM.from_configs(read_config(factored), None)
    else:                 # qwen3/config.py drops quantization_config: a dense model, whose weights are not there
        model = StandinQwen3ForCausalLM.from_configs(read_config(factored), None)
        with pytest.raises(RuntimeError, match=r"Checkpoint key\(s\) not found for parameter "
                                               r"'model\.layers\.0\.mlp\.gate_proj_weight'"):
            model.load_weights(factored, "cpu", None)


def test_every_tensor_lands_in_exactly_one_parameter(checkpoints):
    arch, _, factored = checkpoints
    with torch.device("meta"):                   # the model runner builds the model on meta
        model = _patched(STOCK[arch][0]).from_configs(read_config(factored), None)
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [SVDNeuronMLP, STOCK[arch][1], SVDNeuronMLP]   # layer 1 is not in `ranks`: stays stock
    with pytest.raises(names.CheckpointMappingError, match=r"model\.layers\.0\.mlp\.gate_proj\.svd_u.* never filled"):
        names.check_loaded(model)                # built but not loaded: never served
    model.load_weights(factored, "cpu", None)
    checkpoint = load_file(f"{factored}/{cf.SAFETENSORS_SINGLE_FILE}")
    assert _tensor_sources(model) == collections.Counter(list(checkpoint))     # each tensor exactly once
    ours = names.param_plan(model)
    assert sorted(ours) == sorted(k for k in checkpoint if k.startswith(("model.layers.0.mlp.", "model.layers.2.mlp.")))
    for name, p in model.named_parameters():
        if name in ours:
            torch.testing.assert_close(p, checkpoint[name], rtol=0, atol=0)   # TP 1: whole tensors


def test_loaded_variant_mlp_matches_the_dense_twin(checkpoints):
    arch, dense, factored = checkpoints
    model = _patched(STOCK[arch][0]).from_configs(read_config(factored), None)
    model.load_weights(factored, "cpu", None)
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")      # W = U V stored dense (fp32)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    assert _rel(model.model.layers[2].mlp(x, is_prefill=False), _dense_mlp(w, 2, x)) < 1e-5


# ---------------------------------------------------------------- issue 18, point 1: each rank its shard
@pytest.mark.parametrize("tp", [2, 4])
def test_each_tp_rank_loads_its_own_shard(checkpoints, tp):
    """The rank comes from the group the stock MLP holds (Llama: `mlp_tp_rank`; Qwen3,
    which has no rank attribute: `tp_group.rank_in_group`), never from the global rank
    (here offset by 4, as for a second data-parallel replica) and never a default."""
    arch, dense, factored = checkpoints
    ckpt = load_file(f"{factored}/{cf.SAFETENSORS_SINGLE_FILE}")
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(tp))
    p, cols = "model.layers.0.mlp", INTER // tp
    total, seen = 0, set()
    for rank in range(tp):
        model = _patched(STOCK[arch][0], tp, rank, global_rank=rank + 4).from_configs(read_config(factored), None)
        model.load_weights(factored, "cpu", None)
        mlp = model.model.layers[0].mlp
        assert (mlp.mlp_tp_rank, mlp.mlp_tp_size) == (rank, tp)
        part = slice(rank * cols, (rank + 1) * cols)
        torch.testing.assert_close(mlp.gate_proj.svd_v, ckpt[f"{p}.gate_proj.svd_v"][:, part], rtol=0, atol=0)
        torch.testing.assert_close(mlp.up_proj.svd_v, ckpt[f"{p}.up_proj.svd_v"][:, part], rtol=0, atol=0)
        torch.testing.assert_close(mlp.down_proj.svd_u, ckpt[f"{p}.down_proj.svd_u"][part], rtol=0, atol=0)
        torch.testing.assert_close(mlp.gate_proj.svd_u, ckpt[f"{p}.gate_proj.svd_u"], rtol=0, atol=0)  # replicated
        seen.add(float(mlp.down_proj.svd_u.sum()))
        total = total + mlp(x, is_prefill=False)          # the all-reduce's sum
    assert len(seen) == tp                                  # every rank a different shard
    assert _rel(total, _dense_mlp(w, 0, x)) < 1e-5


class _GroupWithoutRank:
    """A process group that exposes only `world_size` (e.g. a torch ProcessGroup handle,
    not vLLM's GroupCoordinator): the stock MLP's rank cannot be read from it."""

    def __init__(self, world_size):
        self.world_size = world_size


@pytest.mark.parametrize("checkpoints", ["qwen3"], indirect=True)
def test_stock_mlp_whose_rank_cannot_be_found_is_refused_by_name(checkpoints):
    _, _, factored = checkpoints

    class Qwen3NoRank(StandinQwen3ForCausalLM):
        def make_mlp(self, hidden, intermediate, tp_group):
            return StandinQwen3MLP(hidden, intermediate, _GroupWithoutRank(2))

    integrate.patch_model_class(Qwen3NoRank)
    model_cls = Qwen3NoRank
    with pytest.raises(stack_mod.NeuronStackError,
                       match=r"neuron_standins\.StandinQwen3MLP \(the stock MLP of model\.layers\.0\.mlp\) holds no "
                             r"tensor-parallel rank.*`mlp_tp_rank`.*`tp_group\.rank_in_group`.*refusing"):
        model_cls.from_configs(read_config(factored), None)


# ---------------------------------------------------------------- issue 18, point 2: compile before weights
def _tensors_of(module):
    return {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}


def test_compile_before_weights_traces_parameters_only(checkpoints):
    """VLLM_NEURON_CPU_COMPILE: the runner builds on meta, calls `load_weights_lite`
    (no weight read), moves everything to meta and compiles. The traced graph must read
    every factor as a parameter (attributes by name, no tensor constant),
    and tracing must not change the module; the same graph then computes the
    dense twin once a serving process has loaded the weights."""
    arch, dense, factored = checkpoints
    model_cls = _patched(STOCK[arch][0])
    with torch.device("meta"):
        model = model_cls.from_configs(read_config(factored), None)
    model.load_weights_lite(factored, torch.device("cpu"), None)
    assert model.lite_loaded                                   # the stock lite load still ran
    model = model.to("meta")
    mlp = model.model.layers[2].mlp
    assert mlp.compute_path == "torch"                         # decided by the load entry point, not the forward
    state, buffers = dict(vars(mlp)), dict(mlp.named_buffers())
    graph = torch.fx.symbolic_trace(mlp, concrete_args={"is_prefill": False})
    assert dict(vars(mlp)) == state                            # tracing left the module as it was
    assert all(t is buffers[n] for n, t in mlp.named_buffers()) and len(buffers) == len(dict(mlp.named_buffers()))
    reads = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    assert reads and reads <= _tensors_of(mlp)                 # parameters / buffers, no `_tensor_constant`

    served = model_cls.from_configs(read_config(factored), None)   # a later process, with weights
    served.load_weights(factored, "cpu", None)
    for name in reads:
        owner, _, leaf = name.rpartition(".")
        target = graph.get_submodule(owner) if owner else graph
        value = served.model.layers[2].mlp.get_submodule(owner) if owner else served.model.layers[2].mlp
        setattr(target, leaf, getattr(value, leaf))
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(3))
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    assert _rel(graph(x, False), _dense_mlp(w, 2, x)) < 1e-5   # is_prefill stays an argument, fixed at trace


def test_forward_before_any_load_entry_point_is_refused(checkpoints):
    arch, _, factored = checkpoints
    model = _patched(STOCK[arch][0]).from_configs(read_config(factored), None)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp: the svd_neuron MLP ran before a load entry point"):
        model.model.layers[0].mlp(torch.zeros(2, HIDDEN), is_prefill=False)
    assert not any(isinstance(v, torch.Tensor) for v in vars(model.model.layers[0].mlp).values())


def test_unknown_load_entry_point_is_refused_by_name(checkpoints):
    arch, _, factored = checkpoints

    def load_weights_streaming(self, checkpoint_path, device, cache_dir):   # an upstream entry point we do not know
        raise AssertionError("must not run for an svd_neuron model")

    model_cls = type("WithStreaming", (STOCK[arch][0],), {"load_weights_streaming": load_weights_streaming})
    integrate.patch_model_class(model_cls)
    model = model_cls.from_configs(read_config(factored), None)
    with pytest.raises(stack_mod.NeuronStackError, match=r"test_neuron_variant\.WithStreaming\.load_weights_streaming "
                                                         r"is a load entry point the svd_neuron variant does not know"):
        model.load_weights_streaming(factored, "cpu", None)


def test_class_without_load_weights_is_refused_with_its_path():
    class Renamed(StandinQwen3ForCausalLM):
        load_weights = None                       # upstream renamed it

    with pytest.raises(stack_mod.NeuronStackError,
                       match=r"test_neuron_variant\..*Renamed has no callable `load_weights`"):
        integrate.patch_model_class(Renamed)


# ---------------------------------------------------------------- the other upstream layouts
@pytest.mark.parametrize("checkpoints", ["qwen3"], indirect=True)
def test_factory_class_patches_the_implementation_it_returns(checkpoints):
    """qwen3/factory.py: the package exports a factory whose `from_configs` returns
    qwen3/model.py's class; the load entry points are that class's."""
    _, dense, factored = checkpoints
    impl = type("Impl", (StandinQwen3ForCausalLM,), {})
    factory = type("Factory", (StandinQwen3Factory,), {"implementation": impl})
    integrate.patch_model_class(factory)
    model = factory.from_configs(read_config(factored), None)
    assert type(model) is impl and isinstance(model.model.layers[0].mlp, SVDNeuronMLP)
    assert impl.__dict__.get("_vllm_neuronmlp_load_patched")          # its load entry points are wrapped
    model.load_weights(factored, "cpu", None)
    names.check_loaded(model)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    assert _rel(model.model.layers[0].mlp(x, is_prefill=False), _dense_mlp(w, 0, x)) < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_model_bf16_layout_at_tp(tmp_path, tp):
    """qwen3/model_bf16.py: `layers[i].mlp` is a wrapper (`is_moe`, `dense_mlp`) called as
    `mlp(hidden_states, positions, is_decode, rank)`; the variant replaces the wrapper, so
    its parameters keep the checkpoint's names, and reads the rank from `dense_mlp`."""
    dense, factored = make_dense_and_factored(str(tmp_path), arch="qwen3", hidden=HIDDEN, intermediate=INTER, layers=2,
                                              rank=32, block_size=32, factored_layers=[1])
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(5))
    total = 0
    for rank in range(tp):
        model = _patched(StandinQwen3Bf16ForCausalLM, tp, rank).from_configs(read_config(factored), None)
        mlp = model.model.layers[1].mlp
        assert isinstance(mlp, SVDNeuronMLP) and mlp.is_moe is False
        model.load_weights(factored, "cpu", None)
        assert _tensor_sources(model) == collections.Counter(
            list(load_file(f"{factored}/{cf.SAFETENSORS_SINGLE_FILE}")))
        total = total + mlp(x, None, True, None)                # positions, is_decode, rank
    assert _rel(total, _dense_mlp(w, 1, x)) < 1e-5


# ---------------------------------------------------------------- refusals before loading
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
    model = _patched(StandinLlamaForCausalLM).from_configs(read_config(factored), None)
    with pytest.raises(names.CheckpointMappingError, match=match):
        model.load_weights(factored, "cpu", None)
    assert not model.loaded_state                 # refused before the stock reader ran


def _built_with_entry(checkpoint: str, key: str, entry: str, value: int, base=StandinLlamaForCausalLM):
    """from_configs on the checkpoint's config with one more `quantization_config[key]` entry."""
    cfg = read_config(checkpoint)
    getattr(cfg, cf.QUANTIZATION_CONFIG_KEY)[key][entry] = value
    return _patched(base).from_configs(cfg, None)


def test_ranks_naming_a_module_the_model_lacks(checkpoints):
    with pytest.raises(cf.CheckpointFormatError, match=r"lists 'model\.layers\.7\.mlp\.down_proj', which is not an "
                                                        r"MLP or attention projection of this .* model \(3 layers"):
        _built_with_entry(checkpoints[2], cf.KEY_RANKS, "model.layers.7.mlp.down_proj", 32)


def test_dense_checkpoint_goes_through_untouched(checkpoints):
    arch, dense, _ = checkpoints
    model = _patched(STOCK[arch][0]).from_configs(read_config(dense), None)
    assert all(isinstance(layer.mlp, STOCK[arch][1]) for layer in model.model.layers)
    assert not hasattr(model, "_svd_neuron")
    model.load_weights(dense, "cpu", None)
    model.load_weights_lite(dense, "cpu", None)
    assert not names.svd_mlps(model) and model.lite_loaded


# ---------------------------------------------------------------- what the Trainium host sees
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_load_logs_the_classes_and_a_per_rank_shard_checksum(checkpoints):
    """`make neuron-check` reads this line from the server log (it goes through a child of
    vLLM's `vllm` logger, the one vLLM's logging config prints): which classes the hooks
    took and a checksum of this rank's split shards (differs between ranks) and of the
    replicated factors (the same on every rank)."""
    arch, _, factored = checkpoints
    assert integrate.SERVING_LOG.name.startswith("vllm.")
    sums = []
    for rank in range(2):
        model = _patched(STOCK[arch][0], 2, rank).from_configs(read_config(factored), None)
        handler, level = _Lines(), integrate.SERVING_LOG.level
        integrate.SERVING_LOG.addHandler(handler)
        integrate.SERVING_LOG.setLevel(logging.INFO)
        try:
            model.load_weights(factored, "cpu", None)
        finally:
            integrate.SERVING_LOG.removeHandler(handler)
            integrate.SERVING_LOG.setLevel(level)
        lines = [line for line in handler.lines if "svd_neuron shards loaded" in line]
        assert len(lines) == 1
        parsed = integrate.parse_shard_line(lines[0])
        assert (parsed["rank"], parsed["tp"], parsed["mlps"]) == (rank, 2, 2)
        assert parsed["implementation"].endswith(f"test_neuron_variant.{STOCK[arch][0].__name__}Rank{rank}of2")
        assert parsed == {**parsed, **names.shard_checksums(model)}
        sums.append(parsed)
    assert sums[0]["split"] != sums[1]["split"] and sums[0]["replicated"] == sums[1]["replicated"]


# ---------------------------------------------------------------- format v2: per-layer widths
# Layer 0 narrowed and dense, layer 1 narrowed with every projection factored at its width,
# layer 2 untouched (stays stock). 192, 96 and 128 all divide by 1, 2 and 4; 128 not by 3.
V2_INTER = 192
V2_WIDTHS = {0: 96, 1: 128}
V2_RANKS = {"model.layers.1.mlp.gate_proj": 32, "model.layers.1.mlp.up_proj": 64, "model.layers.1.mlp.down_proj": 32}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def narrowed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"v2-{request.param}")
    return (request.param, *make_dense_and_narrowed(str(root), V2_WIDTHS, request.param, hidden=HIDDEN,
                                                    intermediate=V2_INTER, layers=3, ranks=V2_RANKS, block_size=32))


def test_v2_config_is_parsed_and_its_widths_checked_against_the_model(narrowed):
    _, _, v2 = narrowed
    quant = integrate.svd_quant_config(read_config(v2))      # no longer refused
    assert quant.format_version == 2 and quant.widths == {"model.layers.0.mlp": 96, "model.layers.1.mlp": 128}
    with pytest.raises(cf.CheckpointFormatError, match=r"widths lists \['model\.layers\.9\.mlp'\], which is not an "
                                                        r"MLP of this .* model \(3 layers"):
        _built_with_entry(v2, cf.KEY_WIDTHS, "model.layers.9.mlp", 64)


def test_v2_every_tensor_lands_in_exactly_one_parameter_at_its_width(narrowed):
    arch, _, v2 = narrowed
    with torch.device("meta"):
        model = _patched(STOCK[arch][0]).from_configs(read_config(v2), None)
    layers = model.model.layers
    assert [type(layer.mlp) for layer in layers] == [SVDNeuronMLP, SVDNeuronMLP, STOCK[arch][1]]
    assert model._svd_neuron.layers == (0, 1)
    assert not any(p.factored for p in layers[0].mlp.projections().values())        # narrowed, dense
    assert layers[1].mlp.fully_factored and layers[1].mlp.fused                        # narrowed, factored
    assert (layers[0].mlp.intermediate_size, layers[1].mlp.intermediate_size) == (96, 128)
    model.load_weights(v2, "cpu", None)
    checkpoint = load_file(f"{v2}/{cf.SAFETENSORS_SINGLE_FILE}")
    assert _tensor_sources(model) == collections.Counter(list(checkpoint))   # each tensor exactly once, none missing
    ours = names.param_plan(model)
    assert sorted(ours) == sorted(k for k in checkpoint if k.startswith(("model.layers.0.mlp.", "model.layers.1.mlp.")))
    params = dict(model.named_parameters())
    for name in ours:
        want = checkpoint[name].T if name.endswith(".weight") else checkpoint[name]   # dense stored [in, out]
        torch.testing.assert_close(params[name], want, rtol=0, atol=0)
    assert tuple(params["model.layers.0.mlp.down_proj.weight"].shape) == (96, HIDDEN)
    assert tuple(params["model.layers.1.mlp.up_proj.svd_v"].shape) == (64, 128)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_v2_served_by_the_variant_equals_the_dense_twin(narrowed, tp):
    arch, dense, v2 = narrowed
    checkpoint = collections.Counter(list(load_file(f"{v2}/{cf.SAFETENSORS_SINGLE_FILE}")))
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")   # full width; the removed channels' down columns are 0
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(tp))
    totals = {0: 0, 1: 0}
    for rank in range(tp):
        model = _patched(STOCK[arch][0], tp, rank).from_configs(read_config(v2), None)
        model.load_weights(v2, "cpu", None)
        assert _tensor_sources(model) == checkpoint       # on every rank, each tensor lands exactly once
        for i in totals:
            mlp = model.model.layers[i].mlp
            assert mlp.intermediate_size_per_rank == V2_WIDTHS[i] // tp
            totals[i] = totals[i] + mlp(x, is_prefill=False)   # the all-reduce's sum
        group = model.model.layers[0].mlp.mlp_tp_group             # the model's one MLP-TP group
        assert len(group.partials) == (len(totals) if tp > 1 else 0)   # decode: one all-reduce per layer
    for i, total in totals.items():
        assert _rel(total, _dense_mlp(w, i, x)) < 1e-5, f"layer {i} at TP {tp}"


def test_v2_width_the_tp_degree_does_not_divide_is_named_before_loading(narrowed):
    arch, _, v2 = narrowed
    with pytest.raises(cf.TensorParallelError,
                       match=r"model\.layers\.1\.mlp: width \(its quantization_config\.widths\) "
                             r"\(split over the MLP's tensor-parallel degree, "
                   r"tensor_parallel_size x mlp_dp_size\) is 128, which does not split over tensor parallel size 3"):
        _patched(STOCK[arch][0], 3, 0).from_configs(read_config(v2), None)      # from_configs: nothing loaded yet


def test_v2_tensor_at_the_wrong_width_is_refused_before_loading(tmp_path):
    _, v2 = make_dense_and_narrowed(str(tmp_path), V2_WIDTHS, hidden=HIDDEN, intermediate=V2_INTER, layers=3,
                                    ranks=V2_RANKS, block_size=32)
    edit_checkpoint(v2, replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(V2_INTER, HIDDEN)})  # full width
    model = _patched(StandinLlamaForCausalLM).from_configs(read_config(v2), None)
    with pytest.raises(names.CheckpointMappingError,
                       match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \[192, 128\], expected \[96, 128\] "
                             r"\(model\.layers\.0\.mlp narrowed to width 96 by quantization_config\.widths\)"):
        model.load_weights(v2, "cpu", None)
    assert not model.loaded_state
