# bytelm: the README's commands. `make demo` and `make test` set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bytelm-installed
export DS_BUILD_OPS := 0
export WANDB_SILENT := true

.PHONY: setup demo byteify test test-slow test-distributed test-slurm lint bench results gpu-check clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP)  ## create .venv and install bytelm with its dev extras

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# no GPU: take the CPU build of torch first so no multi-GB CUDA build is pulled
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e ".[dev,distill,deepspeed]"
	@touch $(STAMP)

demo: setup  ## train hierarchical + flat byte models on CPU, compare bpb, generate, export
	$(PY) scripts/demo.py

byteify: setup  ## byteify SmolLM2-135M on CPU: boundary phase + stage 1 + stage 2, evaluation against the teacher per segmenter, HF export (runs/byteify)
	$(PY) scripts/byteify.py $(BYTEIFY_ARGS)

test: setup  ## the CPU test suite (what CI runs)
	$(PY) -m pytest -q -x --durations=15

test-slow: setup  ## slow tests (longer training runs, heavier multi-process runs)
	$(PY) -m pytest -q -m slow

test-distributed: setup  ## only the multi-process strategy tests (gloo on CPU)
	$(PY) -m pytest -q -m "distributed and not gpu"

test-slurm: setup  ## real Slurm on this host (root): installs slurm-wlm + munge if missing, one-node and two-node (network namespaces) clusters, pytest -m slurm
	PY=$(PY) bash scripts/slurm_cluster.sh test

lint: setup  ## ruff check, ruff format --check, mypy (what CI runs before the tests)
	$(VENV)/bin/ruff check bytelm tests scripts
	$(VENV)/bin/ruff format --check bytelm tests scripts
	$(VENV)/bin/mypy

bench: setup  ## CPU benchmarks (ratios measured side by side), JSON under out/
	$(PY) scripts/bench_models.py
	$(PY) scripts/bench_splitter.py
	$(PY) scripts/bench_mrt5.py
	$(PY) scripts/bench_byteify.py

results: setup  ## train every compared model and regenerate docs/results.md, its plots and the README table (~45 min CPU)
	bash scripts/make_results.sh

gpu-check:  ## on a CUDA machine: GPU extras, gpu tests, benchmarks with MFU (results in $$OUT)
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs out .pytest_cache .mypy_cache .ruff_cache
