"""The streamed per-layer forward (tools/streaming.py) is the model's forward.

Every pass of the compressor (statistics, Fisher, allocation scoring, factoring)
runs the model one decoder layer at a time from the safetensors files. For each
family's tiny random model, the streamed embedding, layers, final norm and head
must give the logits of the transformers model's own forward. Gemma 3 is the hard
case: embeddings scaled by sqrt(hidden), norms before and after attention and
MLP, q/k norms, and sliding-window layers (window 8 < the 24-token sequence)
between global ones, each kind with its own rotary base.
"""
import json
import os

import pytest
import torch

from model_factory import ARCHS, GEMMA3_SLIDING_WINDOW, write_random_model
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.source import SourceCheckpoint

SEQ, VOCAB = 24, 384
IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def hf_logits(path, **config_changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        return model(IDS).logits


def streamed_logits(path):
    src = SourceCheckpoint(path)
    sk = st.build_skeleton(src)
    x = st.embed(sk, src, IDS)
    runner = st.LayerRunner(sk, SEQ)
    for i in range(sk.num_layers):
        layer = st.materialize_layer(sk, src, i)
        with torch.no_grad():
            x = runner.forward(layer, x)
        st.release_layer(sk, i)
    norm, head = st.materialize_head(sk, src)
    with torch.no_grad():
        return norm(x) @ head.T


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    paths = {}
    for arch in ARCHS:
        paths[arch] = str(root / arch)
        write_random_model(paths[arch], arch, hidden=128, intermediate=160, layers=3, vocab=VOCAB, heads=4,
                           kv_heads=1 if arch != "mistral" else 2, tokenizer=False)
    return paths


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_logits_equal_the_transformers_forward(models, arch):
    # the reference is transformers' eager attention, an implementation independent of the sdpa the stream uses
    want = hf_logits(models[arch])
    torch.testing.assert_close(streamed_logits(models[arch]), want, rtol=0, atol=2e-5)


def test_gemma3_test_model_exercises_both_layer_kinds_and_both_rotary_bases(models):
    """The equality above would not notice a missing window or a shared rotary base unless
    they changed the logits: here they do, by far more than its tolerance."""
    path = models["gemma3_text"]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["sliding_window"] == GEMMA3_SLIDING_WINDOW < SEQ
    thetas = {kind: p["rope_theta"] for kind, p in config["rope_parameters"].items()}
    assert thetas["sliding_attention"] != thetas["full_attention"]
    want = hf_logits(path)
    all_global = hf_logits(path, layer_types=["full_attention"] * config["num_hidden_layers"])
    one_base = hf_logits(path, rope_parameters={k: dict(p, rope_theta=thetas["full_attention"])
                                                for k, p in config["rope_parameters"].items()})
    assert (all_global - want).abs().max() > 1e-2
    assert (one_base - want).abs().max() > 1e-2


def test_sliding_window_mask_counts_the_query_itself():
    mask = st.sliding_window_mask(5, 2, torch.device("cpu"))[0, 0]
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [False, True, True, False, False], [False, False, True, True, False],
                             [False, False, False, True, True]]


@pytest.mark.parametrize("key", ["final_logit_softcapping", "attn_logit_softcapping"])
def test_softcapping_is_refused_by_name(models, tmp_path, key):
    import shutil

    path = tmp_path / "capped"
    shutil.copytree(models["gemma3_text"], path)
    with open(path / "config.json") as f:
        config = json.load(f)
    config[key] = 30.0
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match=rf"capped/config.json: {key} = 30.0 is not supported"):
        st.build_skeleton(SourceCheckpoint(str(path)))
