"""`vllm-neuronmlp eval MODEL --text FILE`: token-level perplexity through vLLM."""
from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Token-level perplexity of MODEL (a dense or svd_neuron checkpoint directory) on
a text, through vLLM's serving path (prompt logprobs), with the protocol of the
SVD-LLM papers: the text is tokenized once, cut into non-overlapping windows of
--seq-len tokens (the remainder dropped), and every token after the first of a
window is scored; ppl = exp(mean NLL). The window and token counts are printed.
Compressed checkpoints load through the svd_neuron plugin automatically.
"""


def add_parser(subparsers) -> None:
    from vllm_neuronmlp.tools.perplexity import DEFAULT_SEQ_LEN

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
                   help="vllm (the serving path, default) or hf (transformers, float32)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="activation dtype (default auto: the checkpoint's for vllm, float32 for hf); on CPUs "
                        "without native bf16 GEMMs float32 is several times faster")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.set_defaults(func=run)


def run(args) -> int:
    from vllm_neuronmlp.tools.perplexity import evaluate

    kwargs = {}
    if args.dtype != "auto":
        kwargs["dtype"] = args.dtype
    if args.backend == "vllm":
        from vllm_neuronmlp import checkpoint_format as cf

        try:
            if cf.has_svd_config(cf.read_config(args.model)):
                kwargs["model_loader_extra_config"] = {"enable_weights_track": True}
        except cf.CheckpointFormatError:
            pass
    res = evaluate(args.model, text=args.text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                   backend=args.backend, **kwargs)
    print(res.describe())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_dict(), f, indent=2)
    return 0
