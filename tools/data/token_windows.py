"""Token windows, each opened by the model's BOS token where its tokenizer adds one.

Some models must see `<bos>` first in every sequence (Gemma 3: without it the 270M
model's greedy text degenerates into "The The The"); their tokenizers add it when
encoding with the defaults. Calibration windows and evaluation windows are cut
from one long tokenized text, so a tokenizer's BOS would open only the first of
them: here every window of such a model is `[bos] + seq_len - 1 text tokens`
instead. Models whose tokenizers add no BOS (SmolLM2, Llama-style test models)
get plain `seq_len`-token windows, as before.
"""
from __future__ import annotations

from typing import List, Optional, Sequence


def leading_bos(tok) -> Optional[int]:
    """The BOS id `tok` opens every encoded text with (its default special tokens), or None."""
    ids = tok("a")["input_ids"]
    bos = getattr(tok, "bos_token_id", None)
    return bos if bos is not None and len(ids) > 0 and ids[0] == bos else None


def text_ids(tok, text: str) -> List[int]:
    """The text's token ids without any special token (windows add the BOS themselves)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def cut(ids: Sequence[int], seq_len: int, bos: Optional[int]) -> List[List[int]]:
    """Non-overlapping windows of `seq_len` tokens from `ids` (the remainder dropped); with
    `bos`, each window is that token followed by the next `seq_len - 1` text tokens."""
    body = seq_len - (bos is not None)
    if body < 1:
        raise ValueError(f"a window of {seq_len} tokens holds no text token after <bos>")
    head = [bos] if bos is not None else []
    return [head + list(ids[k * body:(k + 1) * body]) for k in range(len(ids) // body)]
