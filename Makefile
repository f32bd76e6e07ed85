# Every target creates .venv and installs the pinned dependencies first, so a
# fresh machine needs nothing but Python 3.11 (see README: Quick start).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test soak lint format clean reproduce bench gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lego serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not soak" $(PYTEST_ARGS)

# Long fault and load tests against PostgreSQL + Redis + real Celery workers (about 20
# minutes on 2 cores; needs root for the tmpfs and restarts the local PostgreSQL and
# Redis). Figures go to .cache/reliability/last_run.json; see docs/RELIABILITY.md.
soak: $(STAMP)
	$(BIN)/python -m pytest -m soak tests/reliability -v $(PYTEST_ARGS)

# Trains the source models (cached in .cache/experiments), measures the paper's
# tables with lego_core and writes docs/RESULTS.md and docs/sensitivity.png
# (measured on the shared 2-core machine under load: about 50 minutes of training,
# then 26 for locating and the tables; a re-run with cached models takes the 26.
# `$(BIN)/python -m experiments.reproduce --quick` is a smoke run on little data
# that writes under .cache/experiments/quick instead).
reproduce: $(STAMP)
	$(BIN)/python -m experiments.reproduce

# Measures the performance figures against baselines run in the same process and
# writes bench/RESULTS.md and bench/results.json (about 10 minutes on 2 CPU cores;
# BENCH_ARGS="--quick" for a smaller run, BENCH_ARGS="--figures 1,3" for some).
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Contributions, locate, assemble and predict on CUDA against the CPU: masks identical,
# logits within 1e-4, with the timings (bench/gpu_check.py). Not a test: without CUDA
# it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .cache var
