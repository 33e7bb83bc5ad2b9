"""Channel selection (`--method nystrom`) and the hybrid (`--method hybrid`) end to
end on a tiny random Llama: format-v2 output, the narrowed layer against an
independent reference, the chosen mix in provenance and `inspect`."""
import numpy as np
import pytest
import torch

from test_compress import SMALL, tensors, write_text
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import calibration
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.methods import nystrom as ny

pytestmark = pytest.mark.slow  # end-to-end runs of seconds each: `make test-fast` leaves them out

GATE0, UP0, DOWN0 = (f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("channels")
    return {"dir": d, "llama": tiny.make_model(str(d / "llama"), layers=2, dtype="float32"),
            "calib": write_text(d / "calib.txt", 4000)}


def run(work, name, ratio, **kw):
    return C.compress(work["llama"], str(work["dir"] / name), ratio, **{**SMALL, "calib_text": [work["calib"]], **kw})


def down_inputs(work):
    """Layer 0's down-projection inputs on the calibration windows, from the dense HF model."""
    from transformers import AutoModelForCausalLM

    calib = calibration.load(work["llama"], [work["calib"]], SMALL["calib_samples"], SMALL["calib_seq_len"], 0)
    model = AutoModelForCausalLM.from_pretrained(work["llama"], dtype=torch.float32).eval()
    got = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: got.append(a[0]))
    with torch.no_grad():
        model(calib.windows)
    hook.remove()
    return torch.cat(got).reshape(-1, 384).double().numpy()


def test_nystrom_uniform_narrows_every_layer_with_the_corrected_down_projection(work):
    res = run(work, "ny-uniform", 0.25, method="nystrom", rank_allocation="uniform")
    report = cf.validate(res.out)
    assert report.quant.format_version == 2 and not report.quant.ranks
    assert report.quant.widths == {"model.layers.0.mlp": 288, "model.layers.1.mlp": 288}  # 0.75 x 384
    assert res.ratio_mlp == pytest.approx(0.25) and res.widths == {0: 288, 1: 288}
    prov = report.quant.provenance
    assert prov["allocation_mix"]["ratio_by_channels"] == pytest.approx(0.25)
    assert prov["allocation_mix"]["ratio_by_ranks"] == 0
    # layer 0 against an independent reference: numpy leverage scores and least squares
    z = down_inputs(work)
    c = z.T @ z
    lam = ny.LEVERAGE_RIDGE * np.mean(np.diag(c))
    scores = np.diag(c @ np.linalg.inv(c + lam * np.eye(384)))
    keep = np.sort(np.argsort(-scores, kind="stable")[:288])
    src, out = tensors(work["llama"]), tensors(res.out)
    np.testing.assert_array_equal(out[cf.weight_name(GATE0)].numpy(), src[cf.weight_name(GATE0)].numpy()[keep])
    np.testing.assert_array_equal(out[cf.weight_name(UP0)].numpy(), src[cf.weight_name(UP0)].numpy()[keep])
    w_down = src[cf.weight_name(DOWN0)].double().numpy().T  # [in, out]
    best = np.linalg.lstsq(z[:, keep], z @ w_down, rcond=None)[0]
    got = out[cf.weight_name(DOWN0)].double().numpy().T
    err = lambda b: np.linalg.norm(z @ w_down - z[:, keep] @ b)
    assert err(got) <= err(best) * (1 + 1e-3)
    assert err(got) < 0.5 * err(w_down[keep])  # the correction matters


def test_nystrom_greedy_and_hybrid_fit_the_budget_and_load(work):
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    for method, ratio in (("nystrom", 0.3), ("hybrid", 0.3), ("hybrid", 0.6)):  # scope all: test_compress_scope
        res = run(work, f"{method}-{ratio}", ratio, method=method, scope="mlp")
        report = cf.validate(res.out)
        q = report.quant
        achieved = cf.mlp_ratio(report.model_config, q.ranks, widths=q.widths)
        assert ratio <= achieved == pytest.approx(res.ratio_mlp, abs=1e-9)
        assert achieved < ratio + 0.05
        mix = q.provenance["allocation_mix"]
        assert mix["ratio_by_channels"] + mix["ratio_by_ranks"] == pytest.approx(achieved, abs=1e-6)
        model, _ = load_model(res.out)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_inspect_reports_widths_and_the_mix(work, capsys):
    from vllm_neuronmlp.tools.cli import main as cli_main

    res = run(work, "hybrid-inspect", 0.5, method="hybrid", scope="mlp")
    assert cli_main(["inspect", res.out]) == 0
    out = capsys.readouterr().out
    mix = cf.read_quantization_config(res.out).provenance["allocation_mix"]
    if res.widths:
        assert f"narrowed {len(res.widths)} of 2 layers below intermediate size 384" in out
        assert (f"removed by MLP channels {mix['ratio_by_channels']:.4f}, MLP ranks {mix['ratio_by_mlp_ranks']:.4f}, "
                f"attention ranks 0.0000") in out
        for i, k in res.widths.items():
            assert any(cell.strip().startswith(f"{i}: w{k} ") for line in out.splitlines() for cell in line.split("|"))
    assert f"MLP ratio {res.ratio_mlp:.4f}" in out


def test_export_dense_is_a_plain_model_equal_to_the_narrowed_one(work):
    from transformers import AutoModelForCausalLM

    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    narrowed = run(work, "ny-export-src", 0.25, method="nystrom", rank_allocation="uniform")
    res = run(work, "ny-export", 0.25, method="nystrom", rank_allocation="uniform", export="dense")
    config = cf.read_config(res.out)
    assert cf.QUANTIZATION_CONFIG_KEY not in config and config["intermediate_size"] == 288
    assert cf.read_config(res.out)["num_hidden_layers"] == 2
    import json, os
    with open(os.path.join(res.out, "compression.json")) as f:
        assert json.load(f)["widths"] == {"model.layers.0.mlp": 288, "model.layers.1.mlp": 288}
    plain = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32).eval()
    ref, _ = load_model(narrowed.out)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kw,match", [
    (dict(method="nystrom", rank_allocation="uniform", ratio=0.2),
     r"here the layers keep different widths \(288, 320;"),
    (dict(method="hybrid", ratio=0.5), r"--export dense needs --method nystrom"),
])
def test_export_dense_refuses_with_the_reason(work, kw, match):
    from vllm_neuronmlp.tools.errors import UserError

    ratio = kw.pop("ratio")
    with pytest.raises(UserError, match=match):
        run(work, f"bad-export-{ratio}", ratio, export="dense", **kw)
    assert not (work["dir"] / f"bad-export-{ratio}").exists()


def test_hybrid_refuses_the_uniform_allocation(work):
    from vllm_neuronmlp.tools.errors import UserError

    with pytest.raises(UserError, match=r"--rank-allocation uniform: the hybrid has one allocation .*--method "
                                        r"nystrom --rank-allocation uniform"):
        run(work, "hybrid-uniform", 0.2, method="hybrid", rank_allocation="uniform")
    assert not (work["dir"] / "hybrid-uniform").exists()
