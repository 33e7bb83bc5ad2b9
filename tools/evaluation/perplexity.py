"""Token-level perplexity, the protocol of the SVD-LLM papers (docs/evaluation.md).

The text is tokenized once as a whole, cut into non-overlapping windows of
`seq_len` tokens (the remainder is dropped), and every token of a window but
the first is scored given the ones before it: `ppl = exp(sum NLL / scored
tokens)`. A model whose tokenizer adds a BOS token (Gemma 3) gets it at the
start of every window, followed by `seq_len - 1` text tokens
(data/token_windows.py); the BOS itself is never scored.

Two backends, same windows:
- `vllm` (the product's number): `LLM(...).generate` on token-id prompts with
  `SamplingParams(max_tokens=1, prompt_logprobs=0)`, i.e. the serving path.
  Compressed checkpoints load through the `svd_neuron` plugin.
- `hf`: a transformers forward (hf_model.py: from_pretrained with the
  svd_neuron quantizer), used where starting vLLM per point costs too much
  (the accuracy benchmark); it is cross-checked against `vllm` on a dense and
  a compressed point.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from vllm_neuronmlp.tools.data import text_data, token_windows
from vllm_neuronmlp.tools.errors import UserError

DEFAULT_SEQ_LEN = 2048


@dataclass
class PerplexityResult:
    model: str
    text: str
    backend: str
    seq_len: int
    windows: int
    tokens_total: int  # tokens in the text
    tokens_scored: int  # windows * (seq_len - 1)
    nll_sum: float
    ppl: float
    seconds: float

    def to_dict(self) -> Dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"perplexity {self.ppl:.4f}  ({self.backend}; {self.windows} windows of {self.seq_len} tokens, "
                f"{self.tokens_scored} tokens scored of {self.tokens_total} in {self.text}; {self.seconds:.1f} s)")


def eval_windows(model_path: str, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: Optional[int] = None):
    """(windows as lists of token ids, total token count)."""
    from transformers import AutoTokenizer

    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    try:
        body = text_data.read_text(text)
    except text_data.TextDataError as e:
        raise UserError(f"--text: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:
        raise UserError(f"{model_path}: cannot load its tokenizer ({e})") from None
    ids: List[int] = token_windows.text_ids(tok, body)
    windows = token_windows.cut(ids, seq_len, token_windows.leading_bos(tok))
    n = len(windows)
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise UserError(f"--max-tokens {max_tokens} is below one window of --seq-len {seq_len}")
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise UserError(f"--text {text}: {len(ids)} tokens, not one full window of --seq-len {seq_len}")
    return windows[:n], len(ids)


def perplexity_vllm(model_path: str, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: Optional[int] = None,
                    llm=None, **llm_kwargs) -> PerplexityResult:
    """Perplexity through vLLM's serving path. Pass an existing `llm`
    (vllm.LLM) to reuse it; otherwise one is started with `llm_kwargs`.
    Call from under `if __name__ == "__main__":` (vLLM spawns workers)."""
    from vllm_neuronmlp import checkpoint_format as cf
    from vllm_neuronmlp.tools.evaluation import nll

    windows, total = eval_windows(model_path, text, seq_len, max_tokens)
    t0 = time.time()
    owned = llm is None
    if owned:
        if cf.has_svd_config(cf.read_config(model_path)):
            cf.read_quantization_config(model_path)  # a malformed quantization_config is named here
            llm_kwargs.setdefault("model_loader_extra_config", {"enable_weights_track": True})
        llm = start_llm(model_path, max_model_len=seq_len + 1, **llm_kwargs)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=True)
    finally:
        if owned:  # free the engine's processes and KV cache now, not at interpreter exit
            shutdown_llm(llm)
    total_nll, scored = 0.0, 0
    for w, out in zip(windows, outs):  # vLLM's prompt logprobs: the same next-token NLL, from the serving path
        lps = out.prompt_logprobs
        for pos in range(1, len(w)):
            total_nll -= lps[pos][w[pos]].logprob
            scored += 1
    return PerplexityResult(model_path, text_data.describe(text), "vllm", seq_len, len(windows), total, scored,
                            total_nll, nll.perplexity(total_nll, scored), time.time() - t0)


def shutdown_llm(llm) -> None:
    """Stop the engine-core process of a `vllm.LLM` (vLLM 0.32 has no public close)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def start_llm(model_path: str, max_model_len: int = DEFAULT_SEQ_LEN, **kwargs):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    args = dict(model=model_path, max_model_len=max_model_len, max_num_batched_tokens=max(max_model_len, 4096),
                max_num_seqs=4, enforce_eager=True, seed=0)
    args.update(kwargs)
    return LLM(**args)


def perplexity_hf(model_path: str, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: Optional[int] = None,
                  model=None, dtype: str = "float32", batch: int = 1, progress: bool = True) -> PerplexityResult:
    """Same protocol through a transformers forward (float32 by default)."""
    import torch

    from vllm_neuronmlp.tools.evaluation import nll
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    windows, total = eval_windows(model_path, text, seq_len, max_tokens)
    t0 = time.time()
    if model is None:
        model, _ = load_model(model_path, dtype=getattr(torch, dtype))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, desc="perplexity (hf)", unit="batch")  # noqa: E731
    total_nll, scored = nll.windows_nll(lambda ids: model(input_ids=ids).logits, torch.tensor(windows), batch, bar)
    return PerplexityResult(model_path, text_data.describe(text), "hf", seq_len, len(windows), total, scored,
                            total_nll, nll.perplexity(total_nll, scored), time.time() - t0)


def evaluate(model_path: str, text: str = text_data.BUILTIN_PREFIX + "heldout", seq_len: int = DEFAULT_SEQ_LEN,
             max_tokens: Optional[int] = None, backend: str = "vllm", **kwargs) -> PerplexityResult:
    """Perplexity of the checkpoint at `model_path` on `text` (a file or `builtin:heldout`)."""
    if not os.path.isdir(model_path):
        raise UserError(f"{model_path}: no such checkpoint directory")
    if backend == "vllm":
        return perplexity_vllm(model_path, text, seq_len, max_tokens, **kwargs)
    if backend == "hf":
        return perplexity_hf(model_path, text, seq_len, max_tokens, **kwargs)
    raise UserError(f"--backend must be vllm or hf, got {backend!r}")
