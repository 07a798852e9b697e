# build-engine developer targets. `make demo` and `make test` work on a fresh machine: they create .venv
# and install what they need (torch pinned to the CPU build on local disk).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR := $(VENV)/share/build-engine
VADER_SDIST := $(DATA_DIR)/vaderSentiment-3.3.2.tar.gz
PYTEST_WORKERS ?= 2

.PHONY: setup demo test test-slow bench bench-gpu lint typecheck clean

setup: $(STAMP) $(VADER_SDIST)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[export,data,plugins,rtx,serve,dev]"
	touch $(STAMP)

# the human-rated VADER sentences ship only in the sdist (additional_resources/)
$(VADER_SDIST):
	mkdir -p $(DATA_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(DATA_DIR)

demo: setup
	$(BIN)/build-engine demo

lint: setup
	$(BIN)/ruff check builder calib plugins tests bench

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -m "not slow and not gpu" -n $(PYTEST_WORKERS) -q

test-slow: setup
	$(BIN)/pytest -m "slow" -q

bench: setup
	$(PY) -m bench.run

bench-gpu: setup
	$(PY) -m bench.gpu --out engines/bench/gpu_kernels.json
	$(PY) -m bench.gpu_latency --json engines/bench/gpu_latency.json

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
	find engines -mindepth 1 -not -name README.md -prune -exec rm -rf {} +
