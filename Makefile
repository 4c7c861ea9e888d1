# Two commands on a fresh machine: `make demo` and `make test`. Each creates what it needs on
# first use: .venv (Python 3.12, the pinned JAX stack) and, for the parity tests only,
# .venv-torch (Python 3.11 with HF transformers' PyTorch model).
SHELL := /bin/bash
PY312 ?= $(shell command -v python3.12 2>/dev/null || ls -1d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
PY311 ?= $(shell command -v python3.11 2>/dev/null || ls -1d $$HOME/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | tail -n 1)
VENV := .venv
TORCH_VENV := .venv-torch
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: demo test test-fast venv torch-venv notebooks clean

$(VENV)/.stamp: requirements.txt pyproject.toml
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found (install it or set PY312=/path/to/python3.12)"; exit 1; }
	$(PY312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(TORCH_VENV)/.stamp: requirements-torch.txt
	@test -n "$(PY311)" || { echo "error: Python 3.11 not found for the parity side environment (set PY311=...)"; exit 1; }
	$(PY311) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --upgrade pip
	$(TORCH_VENV)/bin/pip install -q -r requirements-torch.txt
	touch $@

venv: $(VENV)/.stamp
torch-venv: $(TORCH_VENV)/.stamp

demo: $(VENV)/.stamp
	$(PY) -m moa_jax demo --config=configs/demo.py --workdir=runs/demo

test: $(VENV)/.stamp $(TORCH_VENV)/.stamp
	MOA_TORCH_PYTHON=$(abspath $(TORCH_VENV))/bin/python $(PY) -m pytest -q

test-fast: $(VENV)/.stamp
	$(PY) -m pytest -q -m "not slow and not torch"

clean:
	rm -rf $(VENV) $(TORCH_VENV) runs
