"""End-to-end compression on tiny random Llama/Qwen3 checkpoints built here,
the streaming writer on sharded sources, and every kind of bad input."""
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.options import CompressOptions
from vllm_neuronmlp.tools.cli import main as cli_main
from vllm_neuronmlp.tools.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs of seconds each: `make test-fast` leaves them out

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or first also new "
         "had not but one two its after their have they who has been other all time most some into more three "
         "city school year river war music film world state people known used between during later many").split()


def write_text(path, n_words, seed=0):
    rnd = random.Random(seed)
    lines = []
    for _ in range(n_words // 12 + 1):
        lines.append(" ".join(rnd.choice(WORDS) for _ in range(12)).capitalize() + ".")
    path.write_text("\n".join(lines))
    return str(path)


SMALL = dict(block_size=32, calib_samples=8, calib_seq_len=64, progress=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    llama = tiny.make_model(str(d / "llama"), layers=2)
    calib = write_text(d / "calib.txt", 4000)
    return {"dir": d, "llama": llama, "calib": calib}


def opts(work, **kw):
    return {**SMALL, "calib_text": [work["calib"]], **kw}


def digest(directory):
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def tensors(directory):
    out = {}
    for name, path in cf.safetensors_files(directory).items():
        with safe_open(path, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


# ---------------------------------------------------------------- happy paths
def test_compress_llama_end_to_end(work):
    """The factor path end to end (the default method's own test follows)."""
    src = work["llama"]
    before = digest(src)
    out = str(work["dir"] / "out-fisher")
    res = C.compress(src, out, 0.5, method="fisher", **opts(work))
    assert digest(src) == before  # the source is never written
    report = cf.validate(out)  # format v1, shapes, finite values
    qc = cf.read_quantization_config(out)
    assert qc.block_size == 32 and qc.ranks == res.ranks and res.ranks
    assert all(r % 32 == 0 for r in qc.ranks.values())
    prov = qc.provenance
    for key in ("ratio_requested", "ratio_achieved_mlp", "ratio_achieved_model", "method", "rank_allocation",
                "calibration", "seed", "tool_version", "bytes_before", "bytes_after", "params_before"):
        assert key in prov, key
    assert prov["method"] == "fisher" and prov["rank_allocation"] == "adaptive"
    assert prov["allocation_selection"]["chosen"] == "fisher-greedy"  # one allocation, in estimated-loss units
    assert prov["ratio_requested"] == 0.5
    assert prov["ratio_achieved_mlp"] == pytest.approx(cf.mlp_ratio(report.model_config, qc.ranks), abs=1e-6)
    assert abs(res.ratio_mlp - 0.5) <= 0.2  # coarse: block 32 on 128x384 matrices has levels 1/3, 2/3
    t = tensors(out)
    for module, rank in qc.ranks.items():
        assert t[cf.u_name(module)].dtype == torch.bfloat16  # source dtype kept
        assert cf.weight_name(module) not in t
    # everything not factored is copied bit for bit
    src_t = tensors(src)
    for name, value in src_t.items():
        if name.rpartition(".")[0] not in qc.ranks:
            assert torch.equal(t[name], value), name
    # tokenizer and generation config copied
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert not [n for n in os.listdir(work["dir"]) if n.startswith(".out-fisher")]


def test_default_method_is_the_hybrid_and_writes_a_valid_checkpoint(work):
    out = str(work["dir"] / "out-default")
    res = C.compress(work["llama"], out, 0.5, **opts(work))
    report = cf.validate(out)  # v2 widths and/or v1 factors, shapes, finite values
    qc = report.quant
    prov = qc.provenance
    assert prov["method"] == "hybrid" and prov["rank_allocation"] == "adaptive"
    assert prov["allocation_selection"]["chosen"] == "hybrid-greedy"
    # --scope auto: the hybrid counts (and may factor) every decoder linear
    assert prov["scope"] == "all" and res.scope == "all"
    mix = prov["allocation_mix"]
    assert mix["layers_narrowed"] == len(qc.widths) and mix["factored_modules"] == len(qc.ranks)
    assert mix["ratio_by_channels"] + mix["ratio_by_ranks"] == pytest.approx(res.ratio_linears, abs=1e-6)
    assert qc.widths or qc.ranks
    h, i, q, kv = 128, 384, 128, 64  # tiny.make_model's defaults, 2 layers
    linears = 2 * (h * (2 * q + 2 * kv) + 3 * h * i)
    assert 0.5 <= res.ratio_linears <= 0.5 + 32 * 3 * h / linears + 1e-9  # at most one channel block over
    assert prov["ratio_achieved_mlp"] == pytest.approx(res.ratio_mlp, abs=1e-6)


def test_plain_method_factors_equal_truncated_svd(work):
    """Independent reference: numpy SVD of each W^T, truncated to the stored rank."""
    out = str(work["dir"] / "out-plain")
    res = C.compress(work["llama"], out, 0.6, method="plain", rank_allocation="uniform", dtype="float32",
                     **opts(work))
    t = tensors(out)
    src_t = tensors(work["llama"])
    assert res.ranks
    for module, rank in res.ranks.items():
        w = src_t[cf.weight_name(module)].float().double().numpy().T  # [in, out]
        p, s, vt = np.linalg.svd(w, full_matrices=False)
        ref = (p[:, :rank] * s[:rank]) @ vt[:rank]
        got = (t[cf.u_name(module)].double() @ t[cf.v_name(module)].double()).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert t[cf.u_name(module)].dtype == torch.float32
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg.get("torch_dtype") == "float32" or cfg.get("dtype") == "float32"


def test_whitening_reduces_output_error_of_the_real_model(work):
    """On held-out text of the calibration's kind, whiten and error-aware keep
    the logits closer to the dense model's than plain SVD at equal ranks."""
    from transformers import AutoTokenizer

    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    dense, _ = load_model(work["llama"])
    tok = AutoTokenizer.from_pretrained(work["llama"])
    held = open(write_text(work["dir"] / "held.txt", 600, seed=9)).read()
    ids = torch.tensor(tok(held)["input_ids"][: 4 * 64]).view(4, 64)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    errs = {}
    for method in ("plain", "whiten", "fisher", "error-aware"):
        out = str(work["dir"] / f"out-cmp-{method}")
        C.compress(work["llama"], out, 0.6, method=method, rank_allocation="uniform", dtype="float32",
                   **opts(work, calib_samples=48))
        model, _ = load_model(out)
        with torch.no_grad():
            errs[method] = float((model(input_ids=ids).logits - ref).norm() / ref.norm())
    assert errs["whiten"] < errs["plain"]
    assert errs["fisher"] < errs["plain"]
    assert errs["error-aware"] < errs["plain"]


def test_whiten_adaptive_scores_its_candidates_and_keeps_the_best(work):
    out = str(work["dir"] / "out-whiten-adaptive")
    res = C.compress(work["llama"], out, 0.5, method="whiten", rank_allocation="adaptive", **opts(work))
    sel = cf.read_quantization_config(out).provenance["allocation_selection"]
    assert sel == res.selection
    assert sel["chosen"] in sel["validation_ppl"] and "uniform" in sel["validation_ppl"]
    assert sel["validation_ppl"][sel["chosen"]] == min(sel["validation_ppl"].values())


def test_qwen3(work):
    src = tiny.make_model(str(work["dir"] / "qwen3"), arch="qwen3", layers=2)
    out = str(work["dir"] / "out-qwen3")
    res = C.compress(src, out, 0.5, **opts(work))
    qc = cf.validate(out).quant
    assert (qc.widths or qc.ranks) and cf.read_config(out)["model_type"] == "qwen3"
    assert res.ratio_mlp >= 0.5


def test_sharded_source_and_sharded_output(work):
    src = tiny.make_model(str(work["dir"] / "sharded"), layers=3, max_shard_size="300KB", seed=3)
    assert os.path.isfile(os.path.join(src, cf.SAFETENSORS_INDEX_FILE))
    assert len(set(cf.safetensors_files(src).values())) > 1
    single = str(work["dir"] / "out-single")
    sharded = str(work["dir"] / "out-sharded")
    C.compress(src, single, 0.5, **opts(work))
    C.compress(src, sharded, 0.5, max_shard_bytes=150_000, **opts(work))
    assert os.path.isfile(os.path.join(single, cf.SAFETENSORS_SINGLE_FILE))
    index = json.load(open(os.path.join(sharded, cf.SAFETENSORS_INDEX_FILE)))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors")
                                  for f in files)
    cf.validate(sharded)
    a, b = tensors(single), tensors(sharded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in b.values())


def test_small_ratio_mixes_dense_and_factored(work):
    # 0.1 cannot be met by factoring everything (the smallest saving is 1/3 per matrix here):
    # some projections stay dense, and gate/up stay paired
    src = tiny.make_model(str(work["dir"] / "six"), layers=6, seed=4)
    out = str(work["dir"] / "out-mixed")
    res = C.compress(src, out, 0.1, method="fisher", rank_allocation="uniform", **opts(work))
    assert res.dense_modules and res.ranks
    assert abs(res.ratio_mlp - 0.1) <= 0.03
    t = tensors(out)
    for m in res.dense_modules:
        assert cf.weight_name(m) in t and cf.u_name(m) not in t
    cf.validate(out)


def test_dead_channel_cholesky_recovers(work):
    src = str(work["dir"] / "dead")
    tiny.make_model(src, layers=2, seed=5)
    path = os.path.join(src, cf.SAFETENSORS_SINGLE_FILE)
    t = load_file(path)
    t["model.layers.0.post_attention_layernorm.weight"][:7] = 0  # gate/up inputs 0..6 are always zero
    save_file(t, path, metadata={"format": "pt"})
    out = str(work["dir"] / "out-dead")
    res = C.compress(src, out, 0.5, method="whiten", **opts(work))
    assert "model.layers.0.mlp.gate_proj" in res.jitter_modules
    cf.validate(out)


# ---------------------------------------------------------------- bad input
def expect_user_error(work, src, out, ratio=0.5, match=None, exc=(UserError, cf.CheckpointFormatError), **kw):
    with pytest.raises(exc, match=match):
        C.compress(src, out, ratio, **opts(work, **kw))
    assert not os.path.exists(out)


def test_missing_source(work):
    expect_user_error(work, str(work["dir"] / "nope"), str(work["dir"] / "o1"), match="nope: no such directory")


def test_source_without_config_or_weights(work):
    d = work["dir"] / "empty"
    d.mkdir()
    expect_user_error(work, str(d), str(work["dir"] / "o2"), match="config.json: not found")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expect_user_error(work, str(d), str(work["dir"] / "o2"), match="no model.safetensors or model.safetensors.index")


def _copy_model(work, name, seed=0):
    return tiny.make_model(str(work["dir"] / name), layers=2, seed=seed)


def test_corrupt_safetensors(work):
    src = _copy_model(work, "trunc")
    path = os.path.join(src, cf.SAFETENSORS_SINGLE_FILE)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    expect_user_error(work, src, str(work["dir"] / "o3"), match=r"model.safetensors: tensor .* runs past the end")
    open(path, "wb").write(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    expect_user_error(work, src, str(work["dir"] / "o3"), match="model.safetensors: not a readable safetensors")


def test_index_pointing_to_missing_shard(work):
    src = tiny.make_model(str(work["dir"] / "lostshard"), layers=2, max_shard_size="300KB")
    files = sorted(set(cf.safetensors_files(src).values()))
    os.remove(files[-1])
    expect_user_error(work, src, str(work["dir"] / "o4"), match=f"{os.path.basename(files[-1])}, which does not exist")


def test_missing_mlp_tensor(work):
    src = _copy_model(work, "missing-tensor")
    path = os.path.join(src, cf.SAFETENSORS_SINGLE_FILE)
    t = load_file(path)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, path, metadata={"format": "pt"})
    expect_user_error(work, src, str(work["dir"] / "o5"), match="model.layers.1.mlp.up_proj.weight is missing")


def test_model_without_gate_up_down(work):
    from transformers import Phi3Config, Phi3ForCausalLM

    src = str(work["dir"] / "phi3")
    Phi3ForCausalLM(Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).save_pretrained(src)
    expect_user_error(work, src, str(work["dir"] / "o6"),
                      match=r"phi3/config.json: .*model_type 'phi3' has no known MLP family.*llama, mistral, qwen2")


def test_model_without_decoder_layers(work):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = str(work["dir"] / "gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=2)).save_pretrained(src)
    expect_user_error(work, src, str(work["dir"] / "o7"), match=r"gpt2/config.json: .*model_type 'gpt2' has no known")


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.3])
def test_ratio_outside_open_interval(work, ratio):
    expect_user_error(work, work["llama"], str(work["dir"] / "o8"), ratio=ratio, match="--ratio.*between 0 and 1")


@pytest.mark.parametrize("block", [0, 48, -32, 100])
def test_block_size_not_multiple_of_32(work, block):
    with pytest.raises(UserError, match="--block-size.*positive multiple of 32"):
        C.compress(work["llama"], str(work["dir"] / "o9"), 0.5, **{**opts(work), "block_size": block})


def test_unreachable_ratio(work):
    # the default (hybrid, scope all) keeps at least one block of 32 channels of 384 per layer and
    # one block of rank 32 per attention projection: of 2 x 196,608 linear parameters it keeps
    # 2 x (32 x 3 x 128 + 32 x (128 + 128) + 2 x 32 x (128 + 64) + 32 x (128 + 128)) = 81,920
    expect_user_error(work, work["llama"], str(work["dir"] / "o10"), ratio=0.95,
                      match=r"--ratio: ratio 0.95 cannot be reached .*32 channels per layer and attention at one "
                            r"block of rank keep 81,920 of 393,216 parameters \(largest reachable ratio 0\.7916\)")
    expect_user_error(work, work["llama"], str(work["dir"] / "o10"), ratio=0.95, scope="mlp",
                      match=r"--ratio: ratio 0.95 cannot be reached .*largest reachable ratio 0\.9166\)")
    expect_user_error(work, work["llama"], str(work["dir"] / "o10"), ratio=0.9, method="fisher",
                      match="largest reachable ratio")


def test_calibration_text_too_short(work):
    short = write_text(work["dir"] / "short.txt", 60)
    with pytest.raises(UserError, match=r"short.txt: \d+ tokens make only \d+ windows .*--calib-samples 8"):
        C.compress(work["llama"], str(work["dir"] / "o11"), 0.5, **{**opts(work), "calib_text": [short]})
    with pytest.raises(UserError, match="missing.txt: text file not found"):
        C.compress(work["llama"], str(work["dir"] / "o11"), 0.5,
                   **{**opts(work), "calib_text": [str(work["dir"] / "missing.txt")]})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(work, value):
    src = _copy_model(work, f"nan-{value}")
    path = os.path.join(src, cf.SAFETENSORS_SINGLE_FILE)
    t = load_file(path)
    t["model.layers.1.mlp.down_proj.weight"][3, 4] = value
    save_file(t, path, metadata={"format": "pt"})
    expect_user_error(work, src, str(work["dir"] / "o12"),
                      match=r"model.layers.1.mlp.down_proj.weight has 1 non-finite values")


def test_output_exists_and_overwrite(work):
    out = work["dir"] / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists: already exists; pass --overwrite"):
        C.compress(work["llama"], str(out), 0.5, **opts(work))
    assert (out / "keep.txt").read_text() == "mine"
    C.compress(work["llama"], str(out), 0.5, overwrite=True, **opts(work))
    assert not (out / "keep.txt").exists()
    cf.validate(str(out))


def test_output_must_not_touch_source(work):
    with pytest.raises(UserError, match="must not be the source"):
        C.compress(work["llama"], work["llama"], 0.5, overwrite=True, **opts(work))
    with pytest.raises(UserError, match="must not be the source"):
        C.compress(work["llama"], os.path.join(work["llama"], "sub"), 0.5, **opts(work))
    cf.safetensors_files(work["llama"])  # still intact


@pytest.mark.parametrize("existing", [False, True])
def test_interruption_leaves_nothing(work, existing):
    out = work["dir"] / f"interrupted-{existing}"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous result")

    def boom(layer):
        if layer == 0:
            raise KeyboardInterrupt

    options = CompressOptions(ratio=0.5, **opts(work), overwrite=existing)
    with pytest.raises(KeyboardInterrupt):
        C.compress_with_options(work["llama"], str(out), options, on_layer=boom)
    leftovers = [n for n in os.listdir(work["dir"]) if n.startswith(f".interrupted-{existing}")]
    assert leftovers == []
    if existing:
        assert (out / "old.txt").read_text() == "previous result"
    else:
        assert not out.exists()


# ---------------------------------------------------------------- the command line
def test_cli_compress_and_errors(work, capsys):
    out = str(work["dir"] / "cli-out")
    code = cli_main(["compress", work["llama"], out, "--ratio", "0.5", "--block-size", "32", "--calib-text",
                     work["calib"], "--calib-samples", "8", "--calib-seq-len", "64", "--no-progress",
                     "--json", str(work["dir"] / "summary.json")])
    text = capsys.readouterr().out
    assert code == 0
    assert "per layer (layer: MLP width" in text and "achieved: MLP" in text and "whole model" in text
    assert "size on disk" in text and "wall time" in text
    assert json.load(open(work["dir"] / "summary.json"))["ratio_requested"] == 0.5
    code = cli_main(["compress", work["llama"], out, "--ratio", "0.5", "--block-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "already exists" in err and "Traceback" not in err
    code = cli_main(["compress", work["llama"], str(work["dir"] / "x"), "--ratio", "1.5"])
    assert code == 2 and "--ratio" in capsys.readouterr().err
    code = cli_main(["compress", work["llama"], str(work["dir"] / "x"), "--ratio", "0.5", "--block-size", "40"])
    assert code == 2 and "multiple of 32" in capsys.readouterr().err


# ---------------------------------------------------------------- LoRA recovery, from the command line
def test_cli_lora_options_train_merge_and_write_what_was_measured(work):
    from vllm_neuronmlp.tools import calibration, lora
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    base = str(work["dir"] / "lora-off")
    out = str(work["dir"] / "lora-on")
    # a factoring method, whatever the default: this test is about the factors (the next one, narrowed layers)
    common = ["--ratio", "0.5", "--method", "fisher", "--block-size", "32", "--calib-text", work["calib"],
              "--calib-samples", "8", "--calib-seq-len", "64", "--no-progress"]
    assert cli_main(["compress", work["llama"], base, *common]) == 0
    assert cli_main(["compress", work["llama"], out, *common, "--lora-steps", "6", "--lora-rank", "4",
                     "--lora-lr", "1e-2", "--lora-batch", "2"]) == 0
    info = cf.read_quantization_config(out).provenance["lora"]
    assert (info["steps"], info["rank"], info["lr"], info["batch"]) == (6, 4, 1e-2, 2)
    assert info["eval_text"].startswith("unused calibration windows")
    assert info["ppl_after"] < info["ppl_before"]
    cf.validate(out)
    # same ranks as without LoRA, different factors
    assert cf.read_quantization_config(out).ranks == cf.read_quantization_config(base).ranks
    t_on, t_off = tensors(out), tensors(base)
    changed = [n for n in t_on if n.endswith(cf.U_SUFFIX) and not torch.equal(t_on[n], t_off[n])]
    assert changed
    # the written checkpoint scores what LoRA reported on its validation windows (bf16 storage aside)
    val = calibration.load(work["llama"], [work["calib"]], 8, 64, 0).validation
    model, _ = load_model(out)
    assert lora._ppl(model, val) == pytest.approx(info["ppl_after"], rel=2e-2)


def test_cli_lora_adapts_the_narrowed_dense_layers_of_a_nystrom_checkpoint(work, capsys):
    """--method nystrom narrows every layer and factors nothing: LoRA trains ordinary
    adapters on the narrowed gate/up/down and merges them at the same widths."""
    from vllm_neuronmlp.tools import calibration, lora
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    out = str(work["dir"] / "ny-lora")
    assert cli_main(["compress", work["llama"], out, "--ratio", "0.25", "--method", "nystrom", "--rank-allocation",
                     "uniform", "--block-size", "32", "--calib-text", work["calib"], "--calib-samples", "8",
                     "--calib-seq-len", "64", "--no-progress", "--lora-steps", "6", "--lora-rank", "4",
                     "--lora-lr", "1e-2", "--lora-batch", "2"]) == 0
    assert "LoRA: 6 steps on 0 factored and 6 narrowed dense projections" in capsys.readouterr().out
    qc = cf.validate(out).quant  # narrowed shapes as the widths say
    assert qc.format_version == 2 and not qc.ranks
    assert qc.widths == {"model.layers.0.mlp": 288, "model.layers.1.mlp": 288}  # 0.75 x 384
    info = qc.provenance["lora"]
    assert (info["adapted_factored"], info["adapted_dense_narrowed"]) == (0, 6)
    assert info["ppl_after"] < 0.95 * info["ppl_before"]
    # the written weights are the merged ones: they score what LoRA measured after merging (bf16 storage aside)
    val = calibration.load(work["llama"], [work["calib"]], 8, 64, 0).validation
    model, _ = load_model(out)
    assert lora._ppl(model, val) == pytest.approx(info["ppl_after"], rel=2e-2)


def test_progress_names_every_stage_and_no_progress_silences_it(work, capfd):
    C.compress(work["llama"], str(work["dir"] / "progress"), 0.5, **{**opts(work), "progress": True})
    err = capfd.readouterr().err
    for stage in ("calibration: tokenize the text and draw the windows: done in", "sensitivity: forward",
                  "sensitivity: backward", "factor (hybrid)",
                  "validate the written checkpoint: done in"):
        assert stage in err, stage
    C.compress(work["llama"], str(work["dir"] / "quiet"), 0.5, **opts(work))
    err = capfd.readouterr().err
    assert "done in" not in err and "factor (hybrid)" not in err
