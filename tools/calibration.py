"""Calibration data: token windows cut from the calibration text, and the
random subsets the passes use.

`calib_samples` non-overlapping windows of `calib_seq_len` tokens are drawn
at random (seeded) from the tokenized text (each opened by the model's `<bos>`
where its tokenizer adds one, data/token_windows.py); the windows not drawn are
"unused". Subsets are again seeded random draws (each from its own stream):
the fisher method's backward pass uses `fisher_samples` of the calibration
windows, and the allocation scoring and LoRA validation use
VALIDATION_WINDOWS of the unused ones. Windows are kept in text order, so a
subset taken as "the first k" would see only the start of the text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from vllm_neuronmlp.tools.data import text_data, token_windows
from vllm_neuronmlp.tools.errors import UserError

VALIDATION_WINDOWS = 8  # unused windows that score the allocation candidates and judge LoRA

# distinct seeded streams, so each subset is a random draw independent of the others
FISHER_STREAM, VALIDATION_STREAM = 1, 2


@dataclass
class Calibration:
    windows: torch.Tensor  # [samples, seq_len], the statistics' windows
    validation: Optional[torch.Tensor]  # [<= VALIDATION_WINDOWS, seq_len] from the unused windows, or None
    seed: int
    info: Dict = field(default_factory=dict)  # recorded in the provenance

    def fisher_windows(self, k: int) -> torch.Tensor:
        return random_subset(self.windows, k, self.seed, FISHER_STREAM)


def load(src_path: str, texts: Sequence[str], samples: int, seq_len: int, seed: int) -> Calibration:
    chosen, unused, info = calibration_tokens(src_path, texts, samples, seq_len, seed)
    val = random_subset(unused, VALIDATION_WINDOWS, seed, VALIDATION_STREAM) if unused.shape[0] else None
    return Calibration(chosen, val, seed, info)


def calibration_tokens(src_path: str, texts: Sequence[str], samples: int, seq_len: int, seed: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """(chosen windows [samples, seq_len], unused windows [k, seq_len], info), both in text order."""
    from transformers import AutoTokenizer

    parts = []
    for name in texts:
        try:
            parts.append(text_data.read_text(name))
        except text_data.TextDataError as e:
            raise UserError(f"--calib-text: {e}") from None
    text = "\n\n".join(parts)
    try:
        tok = AutoTokenizer.from_pretrained(src_path)
    except Exception as e:
        raise UserError(f"{src_path}: cannot load its tokenizer, needed to tokenize --calib-text ({e})") from None
    bos = token_windows.leading_bos(tok)
    ids = token_windows.text_ids(tok, text)
    cut = token_windows.cut(ids, seq_len, bos)
    n_windows = len(cut)
    if n_windows < samples:
        per_window = seq_len - (bos is not None)
        raise UserError(
            f"--calib-text {', '.join(texts)}: {len(ids)} tokens make only {n_windows} windows of --calib-seq-len "
            f"{seq_len}, fewer than --calib-samples {samples} (needs {samples * per_window} tokens"
            f"{' after each window opens with <bos>' if bos is not None else ''}); give more text "
            f"or ask for fewer/shorter samples")
    windows = torch.tensor(cut, dtype=torch.long).view(n_windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_windows, generator=g)
    chosen = windows[perm[:samples].sort().values]
    unused = windows[perm[samples:].sort().values]
    info = {"source": [text_name(t) for t in texts], "tokens_available": len(ids), "samples": samples,
            "seq_len": seq_len, "tokens_used": samples * seq_len, "seed": seed}
    if bos is not None:
        info["bos_first"] = bos  # every window opens with it
    return chosen, unused, info


def text_name(text: str) -> str:
    """How the provenance names a calibration text: the built-in split with its
    origin, or a file's name (not this machine's path)."""
    return text_data.describe(text) if text_data.is_builtin(text) else os.path.basename(text)


def random_subset(windows: torch.Tensor, k: int, seed: int, stream: int) -> torch.Tensor:
    """`min(k, len(windows))` windows drawn uniformly at random (seeded) from
    `windows` [n, seq_len], returned in their original order."""
    g = torch.Generator().manual_seed(seed * 1000 + stream)
    pick = torch.randperm(windows.shape[0], generator=g)[:k]
    return windows[pick.sort().values]
