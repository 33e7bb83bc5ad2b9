"""`vllm-neuronmlp eval MODEL --text FILE`: token-level perplexity through vLLM."""
from __future__ import annotations

import argparse

from vllm_neuronmlp.tools.cli.common import add_json_argument, emit

DESCRIPTION = """\
Token-level perplexity of MODEL (a dense or svd_neuron checkpoint directory) on
a text, through vLLM's serving path (prompt logprobs), with the protocol of the
SVD-LLM papers (docs/evaluation.md): the text is tokenized once, cut into
non-overlapping windows of --seq-len tokens (the remainder dropped), and every
token after the first of a window is scored; ppl = exp(mean NLL). The window
and token counts are printed. Compressed checkpoints load through the
svd_neuron plugin automatically.
"""
DTYPES = ("fast", "auto", "bfloat16", "float16", "float32")


def add_parser(subparsers) -> None:
    from vllm_neuronmlp.tools.evaluation.perplexity import DEFAULT_SEQ_LEN

    p = subparsers.add_parser("eval", help="perplexity of a checkpoint through vLLM (prompt logprobs)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n  vllm-neuronmlp eval smollm2-svd20 --text builtin:heldout "
                                     "--max-tokens 32768")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (dense or svd_neuron)")
    p.add_argument("--text", default="builtin:heldout", metavar="FILE",
                   help="UTF-8 text file, or builtin:heldout, the bundled held-out Wikipedia split never used for "
                        "calibration (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score at most this many tokens (whole windows; default: the whole text)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="vllm (the serving path, default) or hf (transformers)")
    p.add_argument("--dtype", choices=DTYPES, default="fast",
                   help="activation dtype. fast (default): float32 on a CPU without native bf16 instructions "
                        "(AVX512-BF16/AMX), where bf16 runs several times slower, else the checkpoint's own; "
                        "auto: the checkpoint's own")
    add_json_argument(p, "the result")
    p.set_defaults(func=run)


def run(args) -> int:
    from vllm_neuronmlp.tools.cli.common import fast_dtype
    from vllm_neuronmlp.tools.evaluation.perplexity import evaluate

    dtype = fast_dtype() if args.dtype == "fast" else args.dtype
    kwargs = {}
    if args.backend == "hf":
        kwargs["dtype"] = "float32" if dtype == "auto" else dtype
    elif dtype != "auto":
        kwargs["dtype"] = dtype
    res = evaluate(args.model, text=args.text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                   backend=args.backend, **kwargs)
    used = kwargs.get("dtype", "auto")
    emit(args, f"{res.describe()}  [dtype {used}]", {**res.to_dict(), "dtype": used})
    return 0
