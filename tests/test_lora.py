"""LoRA recovery (tools/lora.py) on format-v2 checkpoints: every projection the
compression changed gets an adapter (factors through peft `target_parameters`,
the dense projections of narrowed layers as ordinary LoRA), the merge is
W + (alpha / r) B A at the stored shape and dtype, and the rewritten checkpoint
is still valid. Tiny hand-written checkpoints (model_factory), seconds each."""
import shutil

import pytest
import torch

import vllm_neuronmlp  # noqa: F401  (registers the HF quantizer)
from model_factory import make_dense_and_narrowed, mlp_module
from test_compress import digest, tensors as stored
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families as mf
from vllm_neuronmlp.hf_quantizer import SVDLinear
from vllm_neuronmlp.tools import lora
from vllm_neuronmlp.tools.evaluation.hf_model import load_model

R = 4
WIDTHS = {0: 96, 1: 160}  # layer 2 keeps the full 256 and stays dense: no adapter
FACTORED = {mlp_module("llama", 0, role): 32 for role in (mf.GATE, mf.UP)}  # narrowed layer 0, factored gate/up
DENSE_NARROWED = [mlp_module("llama", 0, mf.DOWN)] + [mlp_module("llama", 1, role) for role in mf.ROLES]
UNTOUCHED = [mlp_module("llama", 2, role) for role in mf.ROLES]
# one fixed window: every training step sees the same batch, so its loss must fall
TRAIN = torch.randint(2, 384, (1, 24), generator=torch.Generator().manual_seed(0))


def write_v2(root, dtype=torch.float32):
    return make_dense_and_narrowed(str(root), WIDTHS, "llama", hidden=64, intermediate=256, layers=3,
                                   ranks=FACTORED, dtype=dtype)[1]


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return write_v2(tmp_path_factory.mktemp("lora-v2"))


def test_adapted_modules_are_the_factored_and_the_narrowed_dense_projections(v2):
    factored, dense = lora.adapted_modules(v2)
    assert factored == sorted(FACTORED) and sorted(dense) == sorted(DENSE_NARROWED)


def test_lora_on_narrowed_and_factored_layers_merges_to_w_plus_scaled_ba(v2, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(v2, ckpt)
    before, config_before = stored(ckpt), cf.read_config(ckpt)
    factored, dense = lora.adapted_modules(ckpt)
    model, _ = load_model(ckpt)
    peft_model = lora.attach(model, factored, dense, R)

    # adapters exactly where the compression changed something
    wrapped_dense = {n.replace("base_model.model.", "", 1) for n, m in peft_model.named_modules()
                     if hasattr(m, "lora_A") and not hasattr(m, "parameter_name")}
    wrapped_params = {(n.replace("base_model.model.", "", 1).replace(".base_layer", ""), m.parameter_name)
                      for n, m in peft_model.named_modules() if hasattr(m, "parameter_name") and hasattr(m, "lora_A")}
    assert wrapped_dense == set(DENSE_NARROWED)
    assert wrapped_params == {(m, leaf) for m in FACTORED for leaf in (cf.U_SUFFIX, cf.V_SUFFIX)}
    for name in UNTOUCHED:
        assert type(peft_model.base_model.model.get_submodule(name)) is torch.nn.Linear, name

    losses = lora.train_steps(peft_model, TRAIN, steps=6, lr=1e-2, batch=1, seed=0, progress=False)
    assert losses[-1] < losses[0] - 0.05, losses

    # W' = W + (alpha / r) B A, from the adapter tensors in float64, against the stored W
    lcfg = peft_model.peft_config["default"]
    scale = lcfg.lora_alpha / lcfg.r
    want = {}
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in module.lora_A):
            continue
        owner = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        delta = scale * (module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double())
        tname = cf.weight_name(owner) if owner in DENSE_NARROWED else f"{owner}.{module.parameter_name}"
        want[tname] = before[tname].double() + delta
        assert delta.abs().max() > 1e-4, tname  # training moved every adapter
    assert len(want) == len(DENSE_NARROWED) + 2 * len(FACTORED)

    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=TRAIN).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=TRAIN).logits, unmerged, rtol=0, atol=1e-5)
    assert all(isinstance(merged.get_submodule(m), SVDLinear) for m in FACTORED)

    lora._rewrite_adapted(ckpt, merged, factored, dense, max_shard_bytes=2 ** 30)
    after = stored(ckpt)
    assert set(after) == set(before)
    for name, t in after.items():
        assert t.shape == before[name].shape and t.dtype == before[name].dtype, name
        if name in want:
            torch.testing.assert_close(t.double(), want[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(t, before[name]), name  # untouched layers, attention, embeddings
    assert cf.read_config(ckpt) == config_before  # same format, same quantization_config
    report = cf.validate(ckpt)
    assert report.quant.format_version == 2 and report.quant.widths == {
        f"model.layers.{i}.mlp": k for i, k in WIDTHS.items()}
    reloaded, _ = load_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=TRAIN).logits, unmerged, rtol=0, atol=1e-5)


def test_recover_rewrites_a_bf16_v2_checkpoint_in_place_and_says_what_it_adapted(tmp_path):
    ckpt = write_v2(tmp_path, dtype=torch.bfloat16)
    before, config_before = stored(ckpt), cf.read_config(ckpt)
    info = lora.recover(ckpt, TRAIN, None, steps=6, rank=R, lr=1e-2, batch=1, progress=False)
    assert (info["adapted_factored"], info["adapted_dense_narrowed"]) == (len(FACTORED), len(DENSE_NARROWED))
    assert info["final_loss"] < info["first_loss"] and info["ppl_after"] < info["ppl_before"]
    after = stored(ckpt)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == ({cf.weight_name(m) for m in DENSE_NARROWED}
                       | {n for m in FACTORED for n in (cf.u_name(m), cf.v_name(m))})
    assert all(after[n].dtype == torch.bfloat16 and after[n].shape == before[n].shape for n in after)
    assert cf.read_config(ckpt) == config_before
    cf.validate(ckpt)


@pytest.mark.parametrize("which", ["nothing compressed", "not svd_neuron"])
def test_nothing_compressed_gives_a_note_and_leaves_the_checkpoint_alone(tmp_path, which):
    dense_dir, empty_v1 = make_dense_and_narrowed(str(tmp_path), {}, "llama", hidden=64, intermediate=256)
    ckpt = empty_v1 if which == "nothing compressed" else dense_dir
    before = digest(ckpt)
    info = lora.recover(ckpt, TRAIN, None, steps=3, rank=R, progress=False)
    assert info == {"steps": 0, "adapted_factored": 0, "adapted_dense_narrowed": 0, "note": lora.NOTHING_TO_ADAPT}
    assert "nothing compressed to adapt" in info["note"]
    assert digest(ckpt) == before
