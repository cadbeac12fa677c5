# Two commands from a fresh clone: `make demo` and `make test`. Setup is idempotent and a no-op when done.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.segevo-setup
OPEN_CLIP := open-clip-torch==3.3.0
PIP := $(BIN)/python -m pip install -q -c constraints.txt
# This machine's pip config lists extra local indexes that do not exist: drop pip's warnings about them.
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }

# Keep every tool's caches and side files inside the checkout.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export HF_HOME := $(CURDIR)/.cache/huggingface
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch first, from the pinned wheel, so nothing else can pull a multi-GB CUDA build on a CPU machine.
# open-clip-torch only provides the CLIP BPE vocabulary file: installed without its dependencies.
$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -e '.[dev]' $(QUIET)
	$(PIP) --no-deps $(OPEN_CLIP) $(QUIET)
	@touch $@

demo: setup
	dvc repro

test: setup
	pytest

# All benchmarks, each writing bench/results/<name>.json with machine and commit (about 20 minutes on 2 cores).
bench: setup
	python bench/model_forward.py
	python bench/pseudomask.py
	python bench/preprocess.py
	python bench/preprocess_large.py
	python bench/stale_cache.py
	python bench/loader.py
	python bench/model_step.py --size full --steps 5 --out bench/results/model_step_cpu_full.json
	python bench/inference.py --size tiny --out bench/results/inference_cpu_tiny.json
	python bench/inference.py --size full --repeats 2 --out bench/results/inference_cpu_full.json

lint: setup
	ruff check segevo pipeline segevo_pipeline tests bench setup.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
