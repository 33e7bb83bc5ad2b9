"""The compressor on a tiny random Gemma 3 (both layer kinds, window 8 below the
64-token calibration windows): the default method end to end, and factors fitted
to the inputs the transformers model really feeds each projection."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model_factory import write_random_model
from test_compress import SMALL, write_text
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools.evaluation.hf_model import load_model
from vllm_neuronmlp.tools.evaluation.perplexity import perplexity_hf

pytestmark = pytest.mark.slow

LAYERS = 3  # sliding, global, sliding


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3")
    src = str(d / "src")
    write_random_model(src, "gemma3_text", hidden=128, intermediate=256, layers=LAYERS, heads=4, kv_heads=2)
    return {"dir": d, "src": src, "calib": write_text(d / "calib.txt", 4000),
            "heldout": write_text(d / "heldout.txt", 3000, seed=1)}


@pytest.mark.parametrize("method", [None, "fisher"])
def test_default_and_fisher_compress_and_load_in_transformers(work, method):
    """The default (hybrid: Fisher statistics, channels or factors, attention in the budget) and
    the Fisher-weighted factors of every decoder linear (the Fisher pass's gradients flow back
    through both layer kinds)."""
    kw = {"method": method} if method else {}
    res = C.compress(work["src"], str(work["dir"] / f"default-{method}"), 0.2, calib_text=[work["calib"]],
                     **SMALL, **kw)
    q = cf.read_quantization_config(res.out)
    cf.validate(res.out)
    assert q.provenance["method"] == (method or "hybrid") and q.provenance["scope"] == "all"
    assert abs(res.ratio_linears - 0.2) < 0.03  # attention in the budget (whether it wins any: the allocator's call)
    model, ranks = load_model(res.out)
    assert ranks == q.ranks
    dense = perplexity_hf(work["src"], work["heldout"], seq_len=64, progress=False)
    compressed = perplexity_hf(res.out, work["heldout"], seq_len=64, model=model, progress=False)
    # a random model's perplexity is near its vocabulary (384); removing 20 % must not wreck it
    assert np.isfinite(compressed.ppl) and compressed.ppl < 1.5 * dense.ppl


def calibration_inputs(work, module):
    """What the transformers model (not the tool's stream) feeds `module` on the calibration windows."""
    from vllm_neuronmlp.tools import calibration

    windows = calibration.load(work["src"], [work["calib"]], SMALL["calib_samples"], SMALL["calib_seq_len"], 0).windows
    model, _ = load_model(work["src"])
    xs = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().numpy()


@pytest.mark.parametrize("module", ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.q_proj",
                                    "model.layers.2.self_attn.o_proj"])
def test_factors_are_the_optimal_truncation_for_the_models_real_inputs(work, module):
    """whiten-uniform is optimal in the metric of the inputs the stream computed: equal to
    the optimum in the metric of the transformers model's inputs only if the stream reproduces
    the scaled embeddings, both norms, the sliding and global layers and their rotary bases."""
    res = C.compress(work["src"], str(work["dir"] / f"whiten-{module}"), 0.3, method="whiten",
                     rank_allocation="uniform", scope="all", dtype="float32", calib_text=[work["calib"]], **SMALL)
    r = res.ranks[module]
    x = calibration_inputs(work, module)
    w = load_file(f"{work['src']}/model.safetensors")[cf.weight_name(module)].double().numpy().T  # [in, out]
    out = load_file(f"{res.out}/model.safetensors")
    u, v = out[cf.u_name(module)].double().numpy(), out[cf.v_name(module)].double().numpy()
    err = np.linalg.norm(x @ (w - u @ v))
    s = np.linalg.svd(np.linalg.cholesky(x.T @ x + 1e-9 * np.eye(x.shape[1])).T @ w, compute_uv=False)
    assert err == pytest.approx(np.sqrt((s[r:] ** 2).sum()), rel=1e-4)
