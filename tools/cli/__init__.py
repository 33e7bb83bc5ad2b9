"""`vllm-neuronmlp`: the project's one console script.

Each subcommand lives in its own module of this package (`tools/cli/`) and exposes
`add_parser(subparsers)`, which registers the subcommand and sets `func` to a
callable taking the parsed arguments and returning an exit code. Heavy imports
(torch, vLLM) happen inside those callables so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# the subcommand modules of this package, in the order `--help` lists them
SUBCOMMAND_MODULES = [
    "compress",
    "eval",
    "inspect",
    "default_model",
    "setup_vllm_cpu",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-neuronmlp",
        description=(
            "SVD-compress the MLPs of a Hugging Face LLM into block-aligned low-rank factors "
            "(W ~ U V) and serve the result with vLLM (quantization method 'svd_neuron'). "
            "Serve a compressed checkpoint with:  vllm serve OUT"),
    )
    from vllm_neuronmlp import __version__
    parser.add_argument("--version", action="version", version=f"vllm-neuronmlp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from vllm_neuronmlp.checkpoint_format import CheckpointFormatError
    from vllm_neuronmlp.tools.errors import UserError
    from vllm_neuronmlp.tools.interrupt import Interrupted, Terminated

    from vllm_neuronmlp import vllm_cpu_shim

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "setup-vllm-cpu" and vllm_cpu_shim.needed():
        print(f"vllm-neuronmlp: warning: {vllm_cpu_shim.HINT}", file=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (UserError, CheckpointFormatError) as e:
        print(f"vllm-neuronmlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"vllm-neuronmlp {args.command}: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"vllm-neuronmlp {args.command}: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130

