"""Small random checkpoints built locally (for tests, benchmarks and demos;
nothing is downloaded).

`make_tokenizer` trains a byte-level BPE tokenizer on a few lines of text, so
any input can be tokenized; `make_model` writes a random Llama or Qwen3
checkpoint (safetensors + config.json + tokenizer) with `save_pretrained`.
"""
from __future__ import annotations

import os
from typing import Optional

_SEED_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model compresses its layers into factors. "
    "Calibration text flows through every layer, and the whitened weights are split by the SVD. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) appear too.\n"
)


def make_tokenizer(path: str, vocab_size: int = 512):
    """Byte-level BPE tokenizer trained on a fixed seed text; saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_SEED_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def make_model(path: str, arch: str = "llama", hidden: int = 128, intermediate: int = 384, layers: int = 2,
               heads: int = 2, kv_heads: int = 1, vocab: Optional[int] = None, dtype: str = "bfloat16",
               seed: int = 0, max_shard_size: Optional[str] = None, tokenizer: bool = True,
               tie_embeddings: bool = True, init_std: float = 0.02) -> str:
    """Write a random `arch` ("llama" or "qwen3") checkpoint to `path`. The
    defaults give head_dim 64, which vLLM's CPU attention supports (16 is not)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    os.makedirs(path, exist_ok=True)
    tok = make_tokenizer(path) if tokenizer else None
    vocab = vocab or (len(tok) if tok is not None else 512)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                  tie_word_embeddings=tie_embeddings, initializer_range=init_std, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // heads, **common))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path
