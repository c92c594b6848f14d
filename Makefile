# `make demo` and `make test` work on a fresh machine: they create .venv, install the CPU wheel of
# torch 2.13.0 first when no torch is importable (so pip never pulls CUDA builds), then the package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dsv3-installed

.PHONY: setup demo post-training test test-all lint format clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/dsv3 demo

# after `make demo`: extend its context, SFT, and score every stage (docs/post-training.md)
post-training: setup
	$(PY) bench/post_training.py --base runs/demo/checkpoints/step_00000500 --work runs/post

# the suite but for the cells marked `slow` (their coverage is in the default run in cheaper form)
test: setup
	$(PY) -m pytest -m "not slow"

test-all: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check dsv3 tests bench
	$(VENV)/bin/ruff format --check dsv3 tests bench

format: setup
	$(VENV)/bin/ruff check --fix dsv3 tests bench
	$(VENV)/bin/ruff format dsv3 tests bench

clean:
	rm -rf $(VENV) build *.egg-info
