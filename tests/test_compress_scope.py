"""`compress --scope all`: the attention projections factored under the same
budget as the MLP (checkpoint format v3)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_compress import SMALL, write_text
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families as fam
from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.evaluation.hf_model import load_model
from vllm_neuronmlp.tools.options import CompressOptions

pytestmark = pytest.mark.slow

SHAPE = dict(layers=3, hidden=256, intermediate=512, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("scope")
    src = tiny.make_model(str(d / "src"), **SHAPE)
    calib = write_text(d / "calib.txt", 4000)
    return {"dir": d, "src": src, "calib": calib}


def run(work, name, ratio=0.3, **kw):
    return C.compress(work["src"], str(work["dir"] / name), ratio, scope="all", calib_text=[work["calib"]],
                      **{**SMALL, **kw})


def decoder_linears():
    h, i, q, kv = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["hidden"], SHAPE["kv_heads"] * 64
    per_layer = 3 * h * i + 2 * h * q + 2 * h * kv
    return per_layer * SHAPE["layers"]


@pytest.mark.parametrize("method, extra", [("hybrid", {}), ("fisher", {}), ("whiten", {"rank_allocation": "uniform"})])
def test_the_ratio_counts_every_decoder_linear_and_attention_is_factored(work, method, extra):
    res = run(work, f"all-{method}", method=method, **extra)
    q = cf.read_quantization_config(res.out)
    assert q.format_version == cf.ATTENTION_FORMAT_VERSION and q.attention_ranks()
    cf.validate(res.out)
    assert res.linear_params_before == decoder_linears()
    # what the files hold of the seven projections (weights or factors), counted from the tensors themselves
    tensors = load_file(f"{res.out}/model.safetensors")
    kept = sum(t.numel() for n, t in tensors.items()
               if n.rpartition(".")[0] in _all_modules() and not n.endswith(".bias"))
    assert kept == res.linear_params_after
    assert res.linear_params_after <= alloc.budget_params([alloc.Matrix("all", decoder_linears(), 1)], 0.3)
    assert abs(res.ratio_linears - 0.3) < 0.03
    assert q.provenance["scope"] == "all"
    mix = q.provenance["allocation_mix"]
    assert mix["ratio_by_attention_ranks"] > 0
    assert mix["ratio_by_channels"] + mix["ratio_by_mlp_ranks"] + mix["ratio_by_attention_ranks"] == \
        pytest.approx(res.ratio_linears, abs=1e-5)
    for module in q.attention_ranks():  # q, k and v factored together
        for partner in fam.qkv_partners(module):
            assert partner in q.ranks
    model, _ = load_model(res.out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4, 5]])).logits).all()


def _all_modules():
    return [f"model.layers.{i}.{owner}.{p}" for i in range(SHAPE["layers"])
            for owner, projs in (("mlp", ("gate_proj", "up_proj", "down_proj")),
                                 ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))) for p in projs]


def calibration_inputs(work, module):
    """The inputs the dense model feeds `module` on the calibration windows, by a
    transformers forward with a hook (independent of the tool's streaming)."""
    from vllm_neuronmlp.tools import calibration

    windows = calibration.load(work["src"], [work["calib"]], SMALL["calib_samples"], SMALL["calib_seq_len"], 0).windows
    model, _ = load_model(work["src"])
    xs = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().numpy()


@pytest.mark.parametrize("module", ["model.layers.1.self_attn.o_proj", "model.layers.2.self_attn.k_proj"])
def test_attention_factors_are_the_optimal_whitened_truncation(work, module):
    """whiten-uniform factors each projection in the metric of its own inputs: the error
    ||X (W - U V)|| equals the optimal rank-r error read off the SVD of L^T W, with X
    the inputs the dense model really feeds that projection (o: the attention output;
    k: the normalized hidden states). Written in float32, so storage does not round."""
    res = run(work, f"whiten-optimal-{module}", method="whiten", rank_allocation="uniform", dtype="float32")
    r = res.ranks[module]
    x = calibration_inputs(work, module)
    w = load_file(f"{work['src']}/model.safetensors")[cf.weight_name(module)].double().numpy().T  # [in, out]
    out = load_file(f"{res.out}/model.safetensors")
    u, v = out[cf.u_name(module)].double().numpy(), out[cf.v_name(module)].double().numpy()
    err = np.linalg.norm(x @ (w - u @ v))
    s = np.linalg.svd(np.linalg.cholesky(x.T @ x + 1e-9 * np.eye(x.shape[1])).T @ w, compute_uv=False)
    optimal = np.sqrt((s[r:] ** 2).sum())
    assert err == pytest.approx(optimal, rel=1e-4)  # stored in float32 (bf16 rounding alone adds ~4 % here)
    assert err < 0.999 * np.linalg.norm(x @ (w - _plain_truncation(w, r)))  # better than ignoring X


def _plain_truncation(w, r):
    p, s, qt = np.linalg.svd(w, full_matrices=False)
    return (p[:, :r] * s[:r]) @ qt[:r]


def test_summary_and_inspect_show_the_attention_ranks(work, capsys):
    from vllm_neuronmlp.tools.cli import main
    from vllm_neuronmlp.tools.summary import format_summary

    res = run(work, "all-table")
    text = format_summary(res)
    assert "gate up down / q k v o" in text and "embeddings and LM head not counted" in text
    assert f"decoder linears {res.ratio_linears:.4f}" in text
    assert main(["inspect", res.out]) == 0
    out = capsys.readouterr().out
    q = cf.read_quantization_config(res.out)
    assert f"factored {len(q.attention_ranks())} of {4 * SHAPE['layers']} attention projections" in out
    for module, r in q.attention_ranks().items():
        layer = alloc.layer_index(module)
        row = next(c.strip() for line in out.splitlines() if line.startswith("    ") for c in line.split("|")
                   if c.strip().startswith(f"{layer}: "))
        attention_cells = row.split("/")[1].split()
        assert attention_cells[fam.ATTENTION_ROLES.index(fam.attention_role_of(module))] == f"r{r}"


@pytest.mark.parametrize("kw, match", [
    ({"method": "nystrom"}, r"--scope all factors the attention projections, which --method nystrom cannot "
                            r"\(it keeps MLP channels only\)"),
    ({"method": "error-aware"}, r"--method error-aware cannot \(it fits MLPs only\)"),
    ({"method": "whiten"}, r"--scope all with --method whiten needs --rank-allocation uniform"),
    ({"method": "nystrom", "export": "dense"}, r"--scope all factors"),
])
def test_scope_all_refuses_what_cannot_factor_attention(kw, match):
    with pytest.raises(UserError, match=match):
        CompressOptions(ratio=0.2, scope="all", **kw).validate()


def test_statistics_are_kept_apart_by_scope_and_carry_the_fused_qkv_spectrum(work):
    """One spectra_cache across scopes (as the benchmarks sweep them): the MLP-scope
    statistics hold no attention, so --scope all must not reuse them (it raised a
    KeyError on the first q_proj); nor may --resume (the state's statistics key names
    the scope; an MLP-scope key is unchanged). The hybrid's statistics keep the
    spectrum of [W_q W_k W_v] with one shared U: in the same metric, so its squared
    sum is the sum of the three projections' (D is block-diagonal)."""
    from vllm_neuronmlp.tools import methods
    from vllm_neuronmlp.tools.source import SourceCheckpoint

    def compress(name, scope):
        opts = CompressOptions(ratio=0.3, scope=scope, calib_text=[work["calib"]], **SMALL)
        return C.compress_with_options(work["src"], str(work["dir"] / name), opts, spectra_cache=cache)

    cache = {}
    mlp = compress("cache-mlp", "mlp")
    assert not cf.read_quantization_config(mlp.out).attention_ranks()
    res = compress("cache-all", "all")
    assert cf.read_quantization_config(res.out).attention_ranks() and len(cache) == 2
    stats = next(s for s in cache.values() if s.fused_qkv_spectra)
    assert sorted(stats.fused_qkv_spectra) == [f"model.layers.{i}.self_attn.qkv" for i in range(SHAPE["layers"])]
    for i in range(SHAPE["layers"]):
        fused = np.square(stats.fused_qkv_spectra[f"model.layers.{i}.self_attn.qkv"]).sum()
        parts = sum(np.square(stats.spectra[f"model.layers.{i}.self_attn.{p}_proj"]).sum() for p in "qkv")
        assert fused == pytest.approx(parts, rel=1e-6)
    src, hybrid = SourceCheckpoint(work["src"]), methods.get("hybrid")
    key_mlp = C.statistics_key(src, CompressOptions(ratio=0.3, scope="mlp"), hybrid)
    key_all = C.statistics_key(src, CompressOptions(ratio=0.3, scope="all"), hybrid)
    assert "scope" not in key_mlp and key_all == {**key_mlp, "scope": "all"}


@pytest.mark.parametrize("kw, scope", [
    ({}, "all"),  # the default method
    ({"method": "fisher"}, "all"),
    ({"method": "plain"}, "all"),
    ({"method": "whiten", "rank_allocation": "uniform"}, "all"),
    ({"method": "whiten"}, "mlp"),  # its adaptive mode scores MLP allocations only
    ({"method": "nystrom"}, "mlp"),
    ({"method": "error-aware"}, "mlp"),
    ({"scope": "mlp"}, "mlp"),
])
def test_scope_auto_is_all_where_the_method_can_factor_attention(kw, scope):
    opts = CompressOptions(ratio=0.2, **kw)
    opts.validate()
    assert opts.scope == scope


def test_cli_scope_defaults_to_auto():
    import argparse

    from vllm_neuronmlp.tools.cli import compress as cli_compress

    sub = argparse.ArgumentParser().add_subparsers()
    cli_compress.add_parser(sub)
    args = sub.choices["compress"].parse_args(["SRC", "OUT", "--ratio", "0.2"])
    assert args.scope == "auto" and CompressOptions(ratio=0.2).scope == "auto"
