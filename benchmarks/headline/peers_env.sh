#!/usr/bin/env bash
# The peers' environment: kvpress (which pins transformers < 5.3, older than kvctl's)
# and optimum-quanto for transformers' QuantizedCache, apart from kvctl's own venv.
#
#   bash benchmarks/headline/peers_env.sh [VENV]      # default .venv-peers
#
# torch is pinned to 2.13.0 first and held there by a constraints file: that exact pin
# takes the CPU build from local disk; anything looser (kvpress asks torch>=2.3.1, peft
# and quanto ask their own) may pull a multi-GB CUDA build. gguf + accelerate let
# transformers read the default model's GGUF if the exported HF directory is missing.
set -euo pipefail
VENV=${1:-.venv-peers}
PY=${PYTHON:-python3}
STAMP=$VENV/.peers-installed
if [ -f "$STAMP" ]; then exit 0; fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
CONS=$VENV/constraints.txt
printf 'torch==2.13.0\n' > "$CONS"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -c "$CONS" "kvpress==0.5.5" "optimum-quanto==0.2.7" \
    "gguf>=0.10" "accelerate>=1.0"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("torch", "transformers", "kvpress", "optimum-quanto"):
    print(p, m.version(p))
PY
touch "$STAMP"
