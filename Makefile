# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install llavamed with its dev extras into it. On a machine
# without an NVIDIA GPU the CPU build of torch is installed first, so pip never pulls a CUDA build.
# `make test` adds the `families` extra (torchvision, num2words: the Qwen-VL, SmolVLM and LLaVA-OneVision
# processors need them) so every model family is tested. PyPI's torchvision does not import beside the CPU
# torch build, so on a machine without a GPU it installs TORCH_VISION, a torch/torchvision pair that does
# (a CUDA build that also runs on the CPU, about 5.5 GB); `make demo` stays on the lean CPU torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0
TORCH_VISION ?= torch==2.14.1 torchvision==0.29.1
FAMILIES_STAMP := $(VENV)/.families
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast test-min install docs outputs configs clean-venv

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

$(FAMILIES_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q -e ".[dev,families]"; \
	else \
	  echo "no NVIDIA GPU: installing the torch/torchvision pair $(TORCH_VISION)"; \
	  $(PY) -m pip install -q $(TORCH_VISION) -e ".[dev,families]"; \
	fi
	@touch $(FAMILIES_STAMP)

demo: $(STAMP)
	$(BIN)/llavamed demo --out $(DEMO_OUT)

# Order matters: the package must match the notebooks, the notebooks must be clean, the README must
# match index.ipynb, configs/ must match the presets it is written from, every exported name needs a
# lesson that shows its value, the notebooks must run and still show the outputs stored in them, and
# pytest runs last (its summary ends the output). check_outputs.py executes the cells nbdev-test would
# (same processing, same skip flags) and also compares their outputs, so nbdev-test is not run twice.
test: $(FAMILIES_STAMP)
	$(PY) scripts/check_sync.py
	$(PY) scripts/readme.py --check
	$(PY) scripts/write_configs.py --check
	$(PY) scripts/check_docs.py --outputs
	$(PY) scripts/check_outputs.py --check
	$(PY) -m pytest -q -p no:cacheprovider --timeout 1200

# After editing a lesson: store the notebooks' fresh outputs (then commit the notebooks).
outputs: $(STAMP)
	$(PY) scripts/check_outputs.py --write

# After changing a stage preset or a DeepSpeed config in nbs/06_train.ipynb: rewrite configs/.
configs: $(STAMP)
	$(PY) scripts/write_configs.py

# Everything except the slow multi-process tests.
test-fast: $(FAMILIES_STAMP)
	$(PY) -m pytest -q -m "not slow"

# The fast tests in a second environment holding every direct dependency at the floor pyproject.toml declares
# (scripts/min_versions.py writes the pins from it; torch stays the pair TORCH_VISION, which the pinned torchvision
# floor needs). It proves the floors.
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed

$(MIN_STAMP): pyproject.toml scripts/min_versions.py
	@test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q $(TORCH_VISION)
	$(MIN_PY) scripts/min_versions.py --out $(MIN_VENV)/minimum.txt
	$(MIN_PY) -m pip install -q -c $(MIN_VENV)/minimum.txt -e ".[dev,families]"
	@touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_PY) scripts/min_versions.py --check-installed
	$(MIN_PY) -m pytest -q -p no:cacheprovider -m "not slow" --ignore tests/test_widgets_browser.py --timeout 600

docs: $(STAMP)
	$(BIN)/nbdev-docs

clean-venv:
	rm -rf $(VENV) $(MIN_VENV)
