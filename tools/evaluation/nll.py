"""The next-token negative log-likelihood, written once: perplexity
evaluation, LoRA validation, the allocation scoring pass and the Fisher pass
all score a window of token ids the same way (every token after the first,
given the ones before it; docs/evaluation.md)."""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `ids[..., 1:]` under `logits[..., :-1, :]` (float32,
    differentiable). `logits` [..., S, vocab], `ids` [..., S] (on any device)."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, vocab).float(),
                                             ids[..., 1:].reshape(-1).to(logits.device), reduction="sum")


def scored_tokens(ids: torch.Tensor) -> int:
    return int(ids[..., 1:].numel())


@torch.no_grad()
def windows_nll(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch: int = 1,
                progress=None) -> Tuple[float, int]:
    """(summed NLL, scored tokens) of `windows` [n, S] under `logits_of(ids)`,
    `batch` windows at a time; `progress` optionally wraps the batch iterator."""
    nll, n = 0.0, 0
    starts = range(0, windows.shape[0], batch)
    for k in (progress(starts) if progress else starts):
        ids = windows[k:k + batch]
        nll += float(next_token_nll(logits_of(ids), ids))
        n += scored_tokens(ids)
    return nll, n


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)
