# The two commands a newcomer runs: `make demo` (set up, train the default model on the
# Python standard library, observe it) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/default

.PHONY: setup demo test test-fast lint bench

setup: $(VENV)/.installed

# torch is pinned and installed first: a loose requirement with no torch present would pull
# the CUDA build (several GB); with 2.13.0 in place the project's own range is satisfied.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/nnobs train --preset default --out $(RUN)
	$(BIN)/nnobs observe --model $(RUN) --out $(RUN)/observe

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check nnobs tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_probe.py
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_observe.py
	$(BIN)/python benchmarks/bench_patching.py
	$(BIN)/python benchmarks/bench_trajectory.py
	$(BIN)/python benchmarks/bench_calibration.py
	$(BIN)/python benchmarks/bench_routing.py
	$(BIN)/python benchmarks/bench_seeding.py
	$(BIN)/python benchmarks/bench_features.py
