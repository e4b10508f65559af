# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install llavamed with its dev extras into it. On a machine
# without an NVIDIA GPU the CPU build of torch is installed first, so pip never pulls a CUDA build.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast install docs clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: keeping pip's default torch"; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; \
	  $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llavamed demo --out $(DEMO_OUT)

# Order matters: the package must match the notebooks, the notebooks must be clean, the README must
# match index.ipynb, the notebook lessons must pass, and pytest runs last (its summary ends the output).
test: $(STAMP)
	$(PY) scripts/check_sync.py
	$(PY) scripts/readme.py --check
	$(PY) scripts/check_docs.py
	$(BIN)/nbdev-test --n-workers 2
	$(PY) -m pytest -q -p no:cacheprovider --timeout 1200

# Everything except the slow multi-process tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

docs: $(STAMP)
	$(BIN)/nbdev-docs

clean-venv:
	rm -rf $(VENV)
