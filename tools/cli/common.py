"""What the subcommands share: one meaning of `--json` and the default dtype."""
from __future__ import annotations

import json
import sys
from typing import Dict


def add_json_argument(parser, what: str) -> None:
    parser.add_argument("--json", metavar="PATH",
                        help=f"also write {what} as JSON to PATH; '-' prints the JSON on stdout instead of the text")


def emit(args, text: str, data: Dict) -> None:
    """Print `text`, or the JSON on stdout with `--json -`; write it to `--json PATH`."""
    if args.json == "-":
        json.dump(data, sys.stdout, indent=2)
        print()
        return
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype() -> str:
    """The activation dtype that runs fastest here: float32 on a CPU without
    native bf16 (bf16 GEMMs are emulated and several times slower there, for
    dense and compressed models alike); otherwise the checkpoint's own ("auto")."""
    return "auto" if cpu_has_native_bf16() else "float32"
