"""Perplexity protocol, the transformers backend against transformers' own loss,
and the vLLM path end to end: compress -> validate -> load in vLLM (plugin,
weights tracked) -> prompt logprobs, on tiny random models built here."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools.evaluation import perplexity as P
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs of seconds each: `make test-fast` leaves them out


def _text(n=3000):
    return " ".join(f"Sentence {i % 53} talks about item {i % 17} and the river {i % 11}." for i in range(n))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    src = tiny.make_model(str(d / "dense"), layers=2, init_std=0.05)
    text = d / "text.txt"
    text.write_text(_text())
    out = str(d / "svd")
    C.compress(src, out, 0.5, block_size=32, calib_text=[str(text)], calib_samples=8, calib_seq_len=64,
               progress=False)
    return {"dir": d, "dense": src, "svd": out, "text": str(text)}


def test_windows_follow_the_protocol(work):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(work["dense"])(_text())["input_ids"]
    windows, total = P.eval_windows(work["dense"], work["text"], seq_len=100)
    assert total == len(ids)
    assert len(windows) == len(ids) // 100  # non-overlapping, remainder dropped
    assert windows[0] == ids[:100] and windows[-1] == ids[(len(windows) - 1) * 100: len(windows) * 100]
    capped, _ = P.eval_windows(work["dense"], work["text"], seq_len=100, max_tokens=350)
    assert len(capped) == 3
    with pytest.raises(UserError, match="not one full window of --seq-len 100000"):
        P.eval_windows(work["dense"], work["text"], seq_len=100000)
    with pytest.raises(UserError, match="--max-tokens 50 is below one window"):
        P.eval_windows(work["dense"], work["text"], seq_len=100, max_tokens=50)
    with pytest.raises(UserError, match="nope.txt: text file not found"):
        P.eval_windows(work["dense"], str(work["dir"] / "nope.txt"), seq_len=100)


@pytest.mark.parametrize("which", ["dense", "svd"])
def test_hf_perplexity_matches_transformers_loss(work, which):
    """Independent reference: transformers' own causal-LM loss per window
    (through the project's HF quantizer for the compressed checkpoint)."""
    import vllm_neuronmlp  # noqa: F401  (registers the svd_neuron HF quantizer)
    from transformers import AutoModelForCausalLM

    res = P.perplexity_hf(work[which], work["text"], seq_len=128, max_tokens=512, progress=False)
    windows, _ = P.eval_windows(work[which], work["text"], seq_len=128, max_tokens=512)
    model = AutoModelForCausalLM.from_pretrained(work[which], dtype=torch.float32)
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss) for w in windows]
    assert res.windows == 4 and res.tokens_scored == 4 * 127
    assert res.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)


def test_hf_model_loads_factors_as_svdlinear(work):
    """The tools' transformers loader gives SVDLinear modules ((x U) V, ops.factored_linear)
    holding exactly the stored factors, and the ranks of the quantization config."""
    from safetensors.torch import load_file

    from vllm_neuronmlp.hf_quantizer import SVDLinear
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    model, ranks = load_model(work["svd"])
    assert ranks and ranks == cf.read_quantization_config(work["svd"]).ranks
    stored = {}
    for path in set(cf.safetensors_files(work["svd"]).values()):
        stored.update(load_file(path))
    for name, rank in ranks.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, SVDLinear) and mod.rank == rank
        torch.testing.assert_close(mod.svd_u.detach(), stored[cf.u_name(name)].float(), rtol=0, atol=0)
        torch.testing.assert_close(mod.svd_v.detach(), stored[cf.v_name(name)].float(), rtol=0, atol=0)


def _cli_eval(model, text, out_json):
    exe = os.path.join(os.path.dirname(sys.executable), "vllm-neuronmlp")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return subprocess.run([exe, "eval", model, "--text", text, "--seq-len", "128", "--max-tokens", "512",
                           "--json", out_json], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.engine
@pytest.mark.parametrize("which", ["dense", "svd"])
def test_eval_through_vllm_matches_hf(work, which):
    """The CLI's vLLM path (prompt logprobs; for the compressed checkpoint the
    svd_neuron plugin with weight tracking) agrees with the transformers path."""
    cf.validate(work["svd"])
    out_json = str(work["dir"] / f"vllm-{which}.json")
    proc = _cli_eval(work[which], work["text"], out_json)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "4 windows of 128 tokens" in proc.stdout and "508 tokens scored" in proc.stdout
    got = json.load(open(out_json))
    ref = P.perplexity_hf(work[which], work["text"], seq_len=128, max_tokens=512, progress=False)
    assert got["backend"] == "vllm" and got["windows"] == 4
    from vllm_neuronmlp.tools.cli.common import fast_dtype

    assert got["dtype"] == fast_dtype()  # the default picks the fast dtype for this CPU
    rel = 0.03 if got["dtype"] != "float32" else 5e-3  # bf16 serving vs the float32 reference
    assert got["ppl"] == pytest.approx(ref.ppl, rel=rel)


def test_eval_cli_errors(work, capsys):
    from vllm_neuronmlp.tools.cli import main

    assert main(["eval", str(work["dir"] / "missing"), "--text", work["text"]]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    # a checkpoint whose quantization_config breaks the format is named, not skipped
    import shutil

    bad = str(work["dir"] / "bad-quant")
    shutil.copytree(work["svd"], bad)
    config = json.load(open(os.path.join(bad, cf.CONFIG_FILE)))
    config[cf.QUANTIZATION_CONFIG_KEY]["format_version"] = 9
    json.dump(config, open(os.path.join(bad, cf.CONFIG_FILE), "w"))
    assert main(["eval", bad, "--text", work["text"]]) == 2
    err = capsys.readouterr().err
    assert "format_version is 9" in err and "Traceback" not in err
    assert main(["eval", work["dense"], "--text", str(work["dir"] / "none.txt"), "--backend", "hf"]) == 2
    assert "none.txt: text file not found" in capsys.readouterr().err
