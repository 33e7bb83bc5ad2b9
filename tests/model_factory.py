"""Tiny random Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 3 checkpoints built by the tests (nothing downloaded).

`make_dense_and_factored` writes a factored `svd_neuron` checkpoint and its dense
twin whose MLP weights are exactly `W = U V` (the product computed in float64,
stored in the model dtype), so both must give the same outputs.
`make_dense_and_compressed` does the same for any mix of factored MLP and (format
v3) attention projections and narrowed MLPs (format v2 widths).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import mlp_families

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")  # one per MLP family of mlp_families

TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank factors make the MLP smaller and faster.",
    "Trainium keeps the intermediate strip on chip.",
    "vLLM serves the compressed model with the svd_neuron method.",
    "One two three four five six seven eight nine ten.",
] * 4
HEAD_DIM = 32  # vLLM's CPU attention supports only some head sizes (24 is refused)
# Gemma 3's sliding-window layers see this many tokens (the query's own included): smaller than the
# tests' sequences, so the window changes the result. Every second layer is global (Gemma 3 270M: every sixth).
GEMMA3_SLIDING_WINDOW = 8


def make_tokenizer(path: str, vocab_size: int, add_bos: bool = False) -> None:
    """A small byte-level BPE tokenizer trained offline on fixed text; with `add_bos` it opens
    every encoded text with <s>, as Gemma's tokenizers do with <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(path)


def make_config(arch: str, hidden: int, intermediate: int, layers: int, vocab: int, dtype: torch.dtype,
                heads: Optional[int] = None, kv_heads: int = 2):
    """`heads` defaults to hidden / HEAD_DIM; with another count, only the families with an
    explicit head_dim (Qwen3, Gemma, Gemma 3) keep heads * HEAD_DIM != hidden."""
    from transformers import GemmaConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads or hidden // HEAD_DIM, num_key_value_heads=kv_heads, vocab_size=vocab,
                  max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, dtype=str(dtype).split(".")[-1])
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=HEAD_DIM, **common)
    if arch == "qwen2":  # q/k/v projections with bias, unlike the others
        return Qwen2Config(**common)
    if arch == "mistral":  # full attention, as Mistral-7B v0.2+ (no sliding window)
        return MistralConfig(sliding_window=None, **common)
    if arch == "gemma":  # GELU-tanh MLP; embeddings scaled by sqrt(hidden)
        return GemmaConfig(head_dim=HEAD_DIM, hidden_activation="gelu_pytorch_tanh", **common)
    if arch == "gemma3_text":  # Gemma 3: GELU-tanh, norms before and after attention and MLP, q/k norms,
        # embeddings scaled by sqrt(hidden), sliding-window and global layers with their own rotary bases,
        # tied embeddings (as Gemma 3 270M)
        common.update(tie_word_embeddings=True)
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
        return Gemma3TextConfig(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=GEMMA3_SLIDING_WINDOW,
                                layer_types=layer_types, hidden_activation="gelu_pytorch_tanh",
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                                 "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
                                **common)
    raise ValueError(f"no tiny config for {arch!r}; choose one of {ARCHS}")


def mlp_module(arch: str, layer: int, role: str) -> str:
    """HF name of one MLP projection of a tiny `arch` model, by role (mlp_families.GATE, UP, DOWN)."""
    family = mlp_families.family_for_model_type(arch)
    return mlp_families.module_name(family, layer, family.projection(role))


def attention_module(arch: str, layer: int, role: str) -> str:
    """HF name of one attention projection of a tiny `arch` model, by role (mlp_families.Q, K, V, O)."""
    family = mlp_families.family_for_model_type(arch)
    return mlp_families.attention_module_name(family, layer, family.attention_projection(role))


def write_random_model(path: str, arch: str = "llama", hidden: int = 192, intermediate: int = 200,
                       layers: int = 2, vocab: int = 384, dtype: torch.dtype = torch.float32,
                       seed: int = 0, tokenizer: bool = True, heads: Optional[int] = None,
                       kv_heads: int = 2) -> Dict[str, torch.Tensor]:
    """A dense random model saved like HF does; returns its state dict."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, hidden, intermediate, layers, vocab, dtype, heads=heads, kv_heads=kv_heads)
    config.initializer_range = 0.08  # peaky enough that greedy tokens are not near ties
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # HF initializes biases (Qwen2's q/k/v) to zero, which would test nothing
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, config.initializer_range)
            elif arch == "gemma3_text" and name.endswith("norm.weight"):  # zero (a scale of 1 + w) would hide
                param.normal_(0.0, 0.3)                                    # a norm that is skipped or misplaced
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        make_tokenizer(path, vocab, add_bos=arch == "gemma3_text")  # Gemma 3 needs <bos> first
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _factor_pair(n_in: int, n_out: int, rank: int, dtype: torch.dtype, gen: torch.Generator):
    u = (torch.randn(n_in, rank, generator=gen, dtype=torch.float64) / n_in ** 0.5).to(dtype)
    v = (torch.randn(rank, n_out, generator=gen, dtype=torch.float64) * 0.08).to(dtype)
    return u, v


def make_dense_and_factored(root: str, arch: str = "llama", hidden: int = 192, intermediate: int = 200,
                            layers: int = 2, rank: int = 32, ranks: Optional[Dict[str, int]] = None,
                            dtype: torch.dtype = torch.float32, block_size: int = 32, seed: int = 0,
                            factored_layers: Optional[Sequence[int]] = None):
    """Write `root/dense` and `root/factored`; MLP weights of listed layers are U V exactly."""
    dense_dir, fact_dir = os.path.join(root, "dense"), os.path.join(root, "factored")
    write_random_model(dense_dir, arch, hidden, intermediate, layers, dtype=dtype, seed=seed)
    state = load_file(os.path.join(dense_dir, cf.SAFETENSORS_SINGLE_FILE))
    gen = torch.Generator().manual_seed(seed + 1)
    factored_layers = range(layers) if factored_layers is None else factored_layers
    all_ranks: Dict[str, int] = {}
    fact_state = dict(state)
    for i in factored_layers:
        for role in mlp_families.ROLES:
            module = mlp_module(arch, i, role)
            r = (ranks or {}).get(module, rank)
            n_in, n_out = (hidden, intermediate) if role != mlp_families.DOWN else (intermediate, hidden)
            u, v = _factor_pair(n_in, n_out, r, dtype, gen)
            state[cf.weight_name(module)] = (u.double() @ v.double()).T.contiguous().to(dtype)
            del fact_state[cf.weight_name(module)]
            fact_state[cf.u_name(module)] = u.contiguous()
            fact_state[cf.v_name(module)] = v.contiguous()
            all_ranks[module] = r
    _write_twins(dense_dir, state, fact_dir, fact_state, cf.QuantizationConfig(block_size=block_size, ranks=all_ranks))
    return dense_dir, fact_dir


def _write_twins(dense_dir: str, state, out_dir: str, out_state, quant: "cf.QuantizationConfig") -> None:
    """Save the dense twin's state, and beside it the svd_neuron checkpoint (same other files, `quant`)."""
    save_file(state, os.path.join(dense_dir, cf.SAFETENSORS_SINGLE_FILE), metadata={"format": "pt"})
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(dense_dir):
        if name != cf.SAFETENSORS_SINGLE_FILE:
            with open(os.path.join(dense_dir, name), "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
                dst.write(src.read())
    save_file(out_state, os.path.join(out_dir, cf.SAFETENSORS_SINGLE_FILE), metadata={"format": "pt"})
    config = cf.read_config(out_dir)
    config[cf.QUANTIZATION_CONFIG_KEY] = quant.to_dict()
    with open(os.path.join(out_dir, cf.CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def make_dense_and_narrowed(root: str, widths: Dict[int, int], arch: str = "llama", hidden: int = 192,
                            intermediate: int = 256, layers: int = 2, ranks: Optional[Dict[str, int]] = None,
                            dtype: torch.dtype = torch.float32, block_size: int = 32, seed: int = 0):
    """Write `root/dense` and `root/narrowed` (format v2): layer i of `widths` keeps
    its first k intermediate channels; the dense twin has the same weights with
    the other channels' down-projection columns zero, so both compute the same.
    Modules in `ranks` are factored at their layer's width (U V exactly in the twin)."""
    return make_dense_and_compressed(root, ranks or {}, widths, arch, hidden, intermediate, layers, dtype=dtype,
                                     block_size=block_size, seed=seed, out="narrowed")


def make_dense_and_compressed(root: str, ranks: Dict[str, int], widths: Optional[Dict[int, int]] = None,
                              arch: str = "llama", hidden: int = 192, intermediate: int = 256, layers: int = 2,
                              dtype: torch.dtype = torch.float32, block_size: int = 32, seed: int = 0,
                              heads: Optional[int] = None, kv_heads: int = 2, out: str = "compressed"):
    """Write `root/dense` and `root/<out>`: every module of `ranks` (MLP or attention
    projections, any mix; attention makes it format v3) is stored as random factors
    U [in, r], V [r, out] and its twin's weight is (U V)^T (float64 product); layer i
    of `widths` keeps its first k intermediate channels, the twin's other channels
    feeding zero down-projection columns. Biases (Qwen2's q/k/v) stay as they are."""
    widths = widths or {}
    dense_dir, out_dir = os.path.join(root, "dense"), os.path.join(root, out)
    write_random_model(dense_dir, arch, hidden, intermediate, layers, dtype=dtype, seed=seed, heads=heads,
                       kv_heads=kv_heads)
    state = load_file(os.path.join(dense_dir, cf.SAFETENSORS_SINGLE_FILE))
    model_config = cf.read_config(dense_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    out_state = dict(state)
    fmt_widths = {}
    for i, k in widths.items():
        fmt_widths[cf.mlp_module(mlp_module(arch, i, mlp_families.DOWN))] = k
        down = cf.weight_name(mlp_module(arch, i, mlp_families.DOWN))
        state[down] = state[down].clone()
        state[down][:, k:] = 0
        for role in mlp_families.ROLES:
            name = cf.weight_name(mlp_module(arch, i, role))
            out_state[name] = (state[name][:, :k] if role == mlp_families.DOWN else state[name][:k]).contiguous()
    for module, r in ranks.items():
        k = None if cf.is_attention_module(module) else widths.get(int(module.split(".")[2]))
        n_in, n_out = cf.expected_shape(model_config, module, k)
        u, v = _factor_pair(n_in, n_out, r, dtype, gen)
        w = (u.double() @ v.double()).T.contiguous().to(dtype)
        name = cf.weight_name(module)
        state[name] = state[name].clone()
        state[name][:n_out, :n_in] = w  # the twin's weight is full width; a narrowed layer's is its first k
        del out_state[name]
        out_state[cf.u_name(module)] = u.contiguous()
        out_state[cf.v_name(module)] = v.contiguous()
    _write_twins(dense_dir, state, out_dir, out_state,
                 cf.QuantizationConfig(block_size=block_size, ranks=dict(ranks), widths=fmt_widths))
    return dense_dir, out_dir


def v3_ranks(arch: str) -> Dict[str, int]:
    """A format-v3 mix for a 3-layer model: layer 0 q/k/v (each its own rank) and the MLP
    factored; layer 1 o factored (its MLP narrowed by V3_WIDTHS); layer 2 q/k/v and o
    factored, MLP dense. Ranks are multiples of 32 (the factory's block size)."""
    ranks = {attention_module(arch, 0, mlp_families.Q): 64, attention_module(arch, 0, mlp_families.K): 32,
             attention_module(arch, 0, mlp_families.V): 32, attention_module(arch, 1, mlp_families.O): 64}
    ranks.update({attention_module(arch, 2, role): 32 for role in mlp_families.ATTENTION_ROLES})
    ranks.update({mlp_module(arch, 0, role): 32 for role in mlp_families.ROLES})
    return ranks


V3_WIDTHS = {1: 128}  # with intermediate 256: layer 1's MLP keeps half its channels (v2 widths beside v3)


def edit_checkpoint(path: str, drop: Sequence[str] = (), replace: Optional[Dict[str, torch.Tensor]] = None,
                    quant_update: Optional[dict] = None) -> None:
    """Break a checkpoint on purpose (for the bad-input tests)."""
    file = os.path.join(path, cf.SAFETENSORS_SINGLE_FILE)
    state = load_file(file)
    for name in drop:
        del state[name]
    state.update(replace or {})
    save_file(state, file, metadata={"format": "pt"})
    if quant_update:
        config = cf.read_config(path)
        config[cf.QUANTIZATION_CONFIG_KEY].update(quant_update)
        with open(os.path.join(path, cf.CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)


def write_unsupported_model(path: str) -> None:
    """A tiny Phi-3 (its HF MLP stores gate and up as one `gate_up_proj`: no known
    family) whose config claims an svd_neuron factorization."""
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    config = Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tokenizer(path, config.vocab_size)
    raw = cf.read_config(path)
    raw[cf.QUANTIZATION_CONFIG_KEY] = cf.QuantizationConfig(
        block_size=32, ranks={"model.layers.0.mlp.down_proj": 32}).to_dict()
    with open(os.path.join(path, cf.CONFIG_FILE), "w") as f:
        json.dump(raw, f)
