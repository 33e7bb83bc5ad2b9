"""Factored attention on Trainium (issue 22, point 1): a format-v3 checkpoint served by the
variant on the stand-ins of vllm-neuron's native Llama and Qwen3 (tests/neuron_standins.py:
they compute and shard as upstream does, the ranks played by threads whose collectives
really combine their tensors) gives the logits and greedy tokens transformers computes for
the same checkpoint, at TP 1, 2 and 4 (4 heads, 2 KV heads: at TP 4 every KV head is
replicated on two ranks), prefill and decode.

The reference is transformers on CPU in float32: for the compressed checkpoint through
this project's HF loader (its factored projections as U V), for the synthetic one its
dense twin (W = U V). UNIT tests of our logic against stand-ins; vllm-neuron itself cannot
be installed here."""
import pytest
import torch
from safetensors.torch import load_file
from torch.fx.experimental.proxy_tensor import make_fx

from model_factory import make_dense_and_compressed, v3_ranks, V3_WIDTHS
from neuron_standins import (RankWorld, StandinLlamaForCausalLM, StandinQwen3Bf16ForCausalLM, StandinQwen3ForCausalLM,
                             attention_metadata, greedy_serve, install_runtimes, pretend_neuron_host, read_config)
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import ops
from vllm_neuronmlp.neuron import integrate, names
from vllm_neuronmlp.neuron.attention import SVDNeuronAttention
from vllm_neuronmlp.neuron.mlp import SVDNeuronMLP

STOCK = {"llama": StandinLlamaForCausalLM, "qwen3": StandinQwen3ForCausalLM}
PROMPT = [3, 17, 42, 7, 99, 5, 23, 11]          # 8 tokens: a multiple of every TP degree (sequence parallel)
STEPS = 3


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")


def _patched(base):
    cls = type(f"{base.__name__}Patched", (base,), {})
    integrate.patch_model_class(cls)
    return cls


def hf_reference(path, prompt=PROMPT, steps=STEPS, dtype=torch.float32):
    """transformers' logits for the prompt and the greedy continuation (no KV cache: each
    step recomputes the sequence), through this project's HF loader."""
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    model, _ = load_model(path, dtype=dtype)
    with torch.no_grad():
        prefill = model(torch.tensor([prompt])).logits[0].float()
        tokens, decoded = [int(prefill[-1].argmax())], []
        for _ in range(steps):
            out = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            decoded.append(out)
            tokens.append(int(out.argmax()))
    return {"prefill_logits": prefill, "decode_logits": torch.stack(decoded), "tokens": tokens}


def serve(cls, path, tp, dtype=None):
    """The model runner's sequence on every rank: from_configs on meta, load_weights, serve."""
    def rank(_):
        cfg = read_config(path)
        if dtype is not None:
            cfg.dtype = dtype                      # vLLM's --dtype
        with torch.device("meta"):
            model = cls.from_configs(cfg, None)
        model.load_weights(path, torch.device("cpu"), None)
        return model, greedy_serve(model, PROMPT, STEPS)
    return RankWorld(tp).run(rank)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def assert_same_as(served, ref, tol):
    for model, out in served:                       # every rank holds the whole logits
        assert _rel(out["prefill_logits"], ref["prefill_logits"]) < tol
        assert _rel(out["decode_logits"], ref["decode_logits"]) < tol
        assert out["tokens"] == ref["tokens"]


# ---------------------------------------------------------------- the stand-ins themselves
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 3-layer format-v3 checkpoint (layer 0: q/k/v and the MLP factored, layer 1: o
    factored and the MLP narrowed, layer 2: q/k/v/o factored) and its dense twin, per family."""
    out = {}
    for arch in ("llama", "qwen3"):
        root = tmp_path_factory.mktemp(f"v3-{arch}")
        out[arch] = make_dense_and_compressed(str(root), v3_ranks(arch), V3_WIDTHS, arch, hidden=128,
                                              intermediate=256, layers=3, heads=4, kv_heads=2)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stock_standins_serve_the_dense_model_like_transformers(synthetic, arch):
    """The stand-ins' own forward (stock attention and MLP, sharded, collectives over the
    simulated ranks) against transformers: what the variant is then compared on."""
    dense, _ = synthetic[arch]
    assert_same_as(serve(STOCK[arch], dense, 2), hf_reference(dense), 1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_v3_checkpoint_served_by_the_variant_equals_its_dense_twin(synthetic, arch, tp):
    dense, v3 = synthetic[arch]
    served = serve(_patched(STOCK[arch]), v3, tp)
    model = served[0][0]
    kinds = [(type(layer.self_attn), type(layer.mlp)) for layer in model.model.layers]
    assert kinds[0] == (SVDNeuronAttention, SVDNeuronMLP) and kinds[2][0] is SVDNeuronAttention
    assert kinds[1][0] is SVDNeuronAttention                       # only o factored: the layer's q/k/v stay dense
    assert not model.model.layers[1].self_attn.q_proj.factored and model.model.layers[1].self_attn.o_proj.factored
    if tp > 1:   # the collectives the stock modules use: distinct group objects, taken over from them
        mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
        assert mlp.tp_group is model.tp_group and attn.tp_group is model.tp_group
        assert (mlp.mlp_tp_group.kind, attn.reduce_group.kind) == (("mlp_tp", "attn_tp") if arch == "llama"
                                                                   else ("tp", "tp"))
    assert_same_as(served, hf_reference(dense), 1e-4)


def test_each_rank_holds_the_heads_vllm_neurons_attention_gives_it(synthetic):
    """TP 4 with 4 heads and 2 KV heads: rank r holds q head r, KV head r // 2 (replicated on
    two ranks), o's input rows of head r; U of q/k/v and V of o whole on every rank."""
    _, v3 = synthetic["llama"]
    ckpt = load_file(f"{v3}/{cf.SAFETENSORS_SINGLE_FILE}")
    p, hd = "model.layers.2.self_attn", 32

    def shards(rank):
        with torch.device("meta"):
            model = _patched(StandinLlamaForCausalLM).from_configs(read_config(v3), None)
        model.load_weights(v3, "cpu", None)
        a = model.model.layers[2].self_attn
        return (a.num_attention_heads_per_rank, a.num_key_value_heads_per_rank, a.num_kv_replicas,
                {n: t.clone() for n, t in a.named_parameters()})

    for rank, (heads, kv_heads, replicas, t) in enumerate(RankWorld(4).run(shards)):
        assert (heads, kv_heads, replicas) == (1, 1, 2)
        q, kv = slice(rank * hd, (rank + 1) * hd), slice((rank // 2) * hd, (rank // 2 + 1) * hd)
        torch.testing.assert_close(t["q_proj.svd_v"], ckpt[f"{p}.q_proj.svd_v"][:, q], rtol=0, atol=0)
        torch.testing.assert_close(t["k_proj.svd_v"], ckpt[f"{p}.k_proj.svd_v"][:, kv], rtol=0, atol=0)
        torch.testing.assert_close(t["v_proj.svd_v"], ckpt[f"{p}.v_proj.svd_v"][:, kv], rtol=0, atol=0)
        torch.testing.assert_close(t["o_proj.svd_u"], ckpt[f"{p}.o_proj.svd_u"][q], rtol=0, atol=0)
        for leaf in ("q_proj.svd_u", "k_proj.svd_u", "v_proj.svd_u", "o_proj.svd_v"):
            torch.testing.assert_close(t[leaf], ckpt[f"{p}.{leaf}"], rtol=0, atol=0)


def test_model_bf16_layout_keeps_its_qk_norm_names(synthetic):
    """qwen3/model_bf16.py maps q_layernorm / k_layernorm from the checkpoint's q_norm /
    k_norm: the variant's attention keeps the stock norm modules under the stock names, so
    the stock mapping still fills them."""
    dense, v3 = synthetic["qwen3"]
    served = serve(_patched(StandinQwen3Bf16ForCausalLM), v3, 2)
    attn = served[0][0].model.layers[0].self_attn
    assert isinstance(attn, SVDNeuronAttention) and attn.qk_norm_names == ("q_layernorm", "k_layernorm")
    assert_same_as(served, hf_reference(dense), 1e-4)


def test_the_nki_sim_backend_serves_the_v3_checkpoint(synthetic, monkeypatch):
    """The same checkpoint at TP 2 with VLLM_NEURONMLP_BACKEND=nki-sim: every factored
    projection runs the fused XUV kernel (and layer 0's MLP the two MLP kernels) on the
    emulator, in fp32."""
    monkeypatch.setenv(ops.BACKEND_ENV, "nki-sim")
    dense, v3 = synthetic["llama"]
    served = serve(_patched(StandinLlamaForCausalLM), v3, 2)
    layers = served[0][0].model.layers
    assert {layers[i].self_attn.compute_path for i in range(3)} == {"nki-sim"}
    assert layers[0].mlp.compute_path == "nki-sim"
    assert_same_as(served, hf_reference(dense), 1e-4)


# ---------------------------------------------------------------- the checkpoint `compress` writes by default
@pytest.fixture(scope="module", params=["llama", "qwen3"])
def default_compressed(request, tmp_path_factory):
    """A tiny random model (4 heads, 2 KV heads, float32) compressed with compress's defaults
    (--method hybrid --scope auto: MLPs narrowed, attention factored; format v3) at ratio
    0.2, with a small calibration set for speed. Compressed once per family."""
    from test_compress import SMALL, write_text
    from vllm_neuronmlp.tools import compressor
    from vllm_neuronmlp.tools.data import tiny
    from vllm_neuronmlp.tools.options import CompressOptions

    root = tmp_path_factory.mktemp(f"default-{request.param}")
    src = tiny.make_model(str(root / "src"), arch=request.param, hidden=256, intermediate=512, layers=2, heads=4,
                          kv_heads=2, dtype="float32")
    calib = write_text(root / "calib.txt", 2000)
    defaults = CompressOptions(ratio=0.2)
    res = compressor.compress(src, str(root / "out"), 0.2, calib_text=[calib], **{**SMALL, "calib_samples": 4})
    quant = cf.read_quantization_config(res.out)
    assert (quant.provenance["method"], quant.provenance["scope"]) == (defaults.method, "all")
    assert quant.format_version == cf.ATTENTION_FORMAT_VERSION and quant.attention_ranks()
    return request.param, res.out, hf_reference(res.out)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_the_default_checkpoint_is_served_like_transformers_serves_it(default_compressed, tp):
    arch, path, ref = default_compressed
    served = serve(_patched(STOCK[arch]), path, tp)
    model = served[0][0]
    assert names.svd_attentions(model) and names.svd_mlps(model)
    assert_same_as(served, ref, 1e-4)


@pytest.mark.slow
def test_the_default_checkpoint_through_the_kernels_on_the_emulator(default_compressed, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "nki-sim")
    arch, path, ref = default_compressed
    served = serve(_patched(STOCK[arch]), path, 2)
    assert {m.compute_path for m in names.svd_attentions(served[0][0]).values()} == {"nki-sim"}
    assert_same_as(served, ref, 1e-4)


# ---------------------------------------------------------------- bf16 (the reader casts to the parameter's dtype)
def test_float32_checkpoint_served_in_bfloat16(synthetic):
    """The reader casts each tensor to its parameter's dtype (llama3/model.py
    `_cast_to_model_dtype`); with --dtype bfloat16 every parameter, stock and ours, is
    bf16, and the logits stay within bf16 rounding of the float32 reference."""
    dense, v3 = synthetic["qwen3"]
    served = serve(_patched(StandinQwen3ForCausalLM), v3, 2, dtype=torch.bfloat16)
    model, out = served[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = hf_reference(dense)
    assert _rel(out["prefill_logits"], ref["prefill_logits"]) < 0.05
    assert out["tokens"][0] == ref["tokens"][0]


# ---------------------------------------------------------------- compilable (point 3, attention)
def _meta(model, tokens, decode=False):
    blocks = 2
    caches = {name: [torch.zeros(blocks, h, 16, hd, dtype=dt) for _ in range(2)]
              for name, h, hd, dt in model.get_kv_spec()}
    model.bind_kv_cache(caches)
    slots = torch.arange(tokens)
    return attention_metadata(len(model.model.layers), slots, torch.arange(blocks).view(1, -1),
                              1 if decode else tokens, 16)


def test_attention_traces_to_aten_and_compiles(synthetic):
    _, v3 = synthetic["qwen3"]
    model = _patched(StandinQwen3ForCausalLM).from_configs(read_config(v3), None)
    model.load_weights(v3, "cpu", None)
    attn = model.model.layers[2].self_attn
    meta = _meta(model, 6)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6)
    rope = model.rotary(positions)
    graph = make_fx(lambda h: attn(h, positions, rope, meta))(x)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets and all(t.startswith("aten.") for t in targets), sorted(set(targets))
    eager = attn(x, positions, rope, meta)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: attn(h, positions, rope, meta), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_attention_kernel_path_launches_the_fused_xuv_kernel(synthetic, monkeypatch):
    """On a (stand-in) Neuron host with the lite runtime, each factored projection is one
    launch of the fused XUV kernel in the traced graph, and the result is unchanged."""
    _, v3 = synthetic["llama"]
    reference = _patched(StandinLlamaForCausalLM).from_configs(read_config(v3), None)
    reference.load_weights(v3, "cpu", None)
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    pretend_neuron_host(monkeypatch)
    runtime = install_runtimes(monkeypatch, "lite")["lite"]
    model = _patched(StandinLlamaForCausalLM).from_configs(read_config(v3), None)
    model.load_weights(v3, "cpu", None)
    attn = model.model.layers[2].self_attn
    assert attn.compute_path == "kernels"
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(4)
    rope = model.rotary(positions)
    graph = make_fx(lambda h: attn(h, positions, rope, _meta(model, 4)))(x)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count("neuron_standin.nki_launch.default") == 4            # q, k, v, o
    assert not [t for t in targets if t.startswith("vllm_neuronmlp.")]
    expected = reference.model.layers[2].self_attn(x, positions, rope, _meta(reference, 4))
    torch.testing.assert_close(attn(x, positions, rope, _meta(model, 4)), expected, rtol=1e-4, atol=1e-5)
    assert set(runtime.launches) == {("fused_xuv", (2,))}


# ---------------------------------------------------------------- refusals
def test_a_tp_degree_that_cannot_split_the_heads_is_refused_by_name(synthetic):
    _, v3 = synthetic["llama"]

    def build(_):
        return _patched(StandinLlamaForCausalLM).from_configs(read_config(v3), None)

    with pytest.raises(cf.TensorParallelError, match=r"model\.layers\.0\.self_attn: 4 attention heads and 2 KV heads "
                                                      r"cannot be split over tensor-parallel degree 8"):
        RankWorld(8).run(build)


def test_a_misnamed_attention_factor_is_refused_before_loading(synthetic, tmp_path):
    import shutil

    from model_factory import edit_checkpoint

    _, v3 = synthetic["llama"]
    broken = str(tmp_path / "broken")
    shutil.copytree(v3, broken)
    t = load_file(f"{broken}/{cf.SAFETENSORS_SINGLE_FILE}")["model.layers.2.self_attn.k_proj.svd_v"]
    edit_checkpoint(broken, drop=["model.layers.2.self_attn.k_proj.svd_v"],
                    replace={"model.layers.2.self_attn.k_proj.svd_w": t})
    model = _patched(StandinLlamaForCausalLM).from_configs(read_config(broken), None)
    with pytest.raises(names.CheckpointMappingError, match=r"needs tensor\(s\) \['model\.layers\.2\.self_attn\.k_proj"
                                                           r"\.svd_v'\]"):
        model.load_weights(broken, "cpu", None)
    assert not model.loaded_state


# ---------------------------------------------------------------- what the Trainium host's log says
def test_the_load_logs_per_layer_which_kernel_or_fallback_runs(synthetic, monkeypatch):
    """`make neuron-check` prints, per layer, whether the NKI kernels or the fallback ran: the
    line the load logs through vLLM's logger (integrate.PATHS_LINE)."""
    import logging

    _, v3 = synthetic["llama"]
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    pretend_neuron_host(monkeypatch)
    install_runtimes(monkeypatch, "lite")
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = integrate.SERVING_LOG.level
    integrate.SERVING_LOG.addHandler(handler)
    integrate.SERVING_LOG.setLevel(logging.INFO)
    try:
        model = _patched(StandinLlamaForCausalLM).from_configs(read_config(v3), None)
        model.load_weights(v3, "cpu", None)
    finally:
        integrate.SERVING_LOG.removeHandler(handler)
        integrate.SERVING_LOG.setLevel(level)
    parsed = [p for p in map(integrate.parse_paths_line, lines) if p is not None]
    assert len(parsed) == 1 and parsed[0]["rank"] == 0
    modules = parsed[0]["modules"]
    assert modules["model.layers.0.self_attn"] == {"q": "kernels", "k": "kernels", "v": "kernels", "o": "dense"}
    assert modules["model.layers.1.self_attn"] == {"q": "dense", "k": "dense", "v": "dense", "o": "kernels"}
    assert modules["model.layers.0.mlp"] == {"gate": "kernels", "up": "kernels", "down": "kernels"}
    assert modules["model.layers.1.mlp"] == {"gate": "dense", "up": "dense", "down": "dense"}   # narrowed, dense
    assert "model.layers.2.mlp" not in modules                                                   # stock
