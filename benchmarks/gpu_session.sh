#!/usr/bin/env bash
# One device call, several measurements, each with its own time limit and its own log
# under $OUT (what ran before a limit still comes back). Steps are named on the command
# line; `all` runs them in this order:
#   tests   CUDA tests (graphs, compile, kernels, parity): 270 s reached 47% on an H100
#   speed   benchmarks.engine_speed with --compile (issue 13), batches from $SPEED_BATCHES
#   long    benchmarks.engine_speed at batch 8 x 32K (static cache only, where it fits)
#   e2e     benchmarks.engine_speed at batch 8 x 32K, old blocks int4 against full (issue 14)
#   kernel  benchmarks.decode_kernel (issue 14)
#   gluon   the 8-bit Gluon kernel's tests and the routing test of every Gluon kernel
#           (int4, int8, fp8 against the reference; TESTS_G replaces the selection)
#   k8      int8 and fp8: the Triton kernel (t8) against the Gluon 8-bit kernel (g8, g8ps),
#           with each format's read floor (issue 14)
#   k4      int4, int4+full and int8+full: a grouped table's two launches on two streams
#           (ov) against one after the other, with the read floor (issue 14)
#   multi   benchmarks.multiturn, 8 chats to ~32K, reuse then full (issue 16)
#   tiers   benchmarks.multiturn --budget-mb: 4 chats taking turns under a 3 GB GPU-tier
#           budget, idle sessions' bytes by tier over time (issue 16)
#   head    benchmarks.headline.gpu (issue 15): by default the reduced run of 2026-12-06
#           (10 GiB, 4x pressure, none / int4 / adaptive); HEAD_ARGS='' for the full suite
#   cap     benchmarks.headline.capacity (sequences at once in one budget; 8K by default;
#           CAP_CONFIGS, CAP_COUNTS pick configs and counts)
#   split   benchmarks.step_split (where a step's time goes)
#   offload benchmarks.offload at 32K: all on the GPU, exact offload, top-k pages (issue 13)
#   daemon  benchmarks.status_latency, 64 clients streaming from the daemon (issue 13)
#   fit     benchmarks.fit_cost at an 8B shape, 2K tokens: the Triton 2-bit fit against
#           the torch passes (issue 15: adaptive's prompt steps)
#   quant   the Triton slot conversion (KVCTL_FUSED_QUANT) on the GPU: its tests, the
#           engine's CUDA tests with it routed, then benchmarks.quantize_cost (a batch of
#           64 blocks of an 8B shape, torch path against it; issue 15: the moves lap)
# NO_PNG=1 drops the plots at the end (a call brings back a limited number of files)
# Usage on the device: bash benchmarks/gpu_session.sh tests speed kernel
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
python -m pip install -q --no-deps .whl/*.whl >"$OUT/pip.txt" 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
steps=("$@")
[ "${steps[0]:-all}" = all ] && steps=(tests speed kernel multi head)
for s in "${steps[@]}"; do
  t0=$(date +%s)
  case $s in
    tests) timeout "${T_TESTS:-560}" python -m pytest -q ${TESTS_X-} -p no:cacheprovider \
             ${TESTS:-tests/engine/test_cuda.py tests/engine/test_cuda_graphs.py tests/kernels} ;;
    speed) timeout "${T_SPEED:-300}" python -m benchmarks.engine_speed --model random:llama3-8b \
             --device cuda --dtype bfloat16 --batches "${SPEED_BATCHES:-1,8,32,64}" \
             --prompt 1024 --new 64 --kv-budget-gb 20 --compile --json "$OUT/speed.json" ;;
    long) timeout "${T_LONG:-300}" python -m benchmarks.engine_speed --model random:llama3-8b \
             --device cuda --dtype bfloat16 --batches 8 --prompt 32768 --new 32 \
             --kv-budget-gb 34 --hf static --no-eager --compile --json "$OUT/long.json" ;;
    e2e) timeout "${T_E2E:-200}" python -m benchmarks.engine_speed --model random:llama3-8b \
             --device cuda --dtype bfloat16 --batches 8 --prompt 32768 --new 32 \
             --kv-budget-gb 34 --hf '' --no-eager --no-in-order --kv-formats int4,full \
             --json "$OUT/e2e.json" ;;
    kernel) timeout "${T_KERNEL:-200}" python -m benchmarks.decode_kernel --batches 1 8 \
             --contexts 32768 131072 --formats full int8 fp8 int4 int4+full --iters 30 \
             --json "$OUT/kernel.json" ;;
    k8) timeout "${T_K8:-130}" python -m benchmarks.decode_kernel --batches 1 8 \
             --contexts 32768 131072 --formats int8 fp8 --floor --variants t8 g8 g8ps \
             --iters 20 --json "$OUT/k8.json" ;;
    k4) timeout "${T_K4:-100}" python -m benchmarks.decode_kernel --batches 1 8 \
             --contexts 32768 131072 --formats int4 int4+full int8+full --floor \
             --variants default ov --iters 20 --json "$OUT/k4.json" ;;
    gluon) timeout "${T_GLUON:-240}" python -m pytest -q -p no:cacheprovider \
             ${TESTS_G:-tests/kernels/test_gluon_int8.py \
             tests/kernels/test_gluon_int4.py::test_triton_wrapper_routes_to_gluon} ;;
    multi) for m in reuse full; do timeout "${T_MULTI:-200}" python -m benchmarks.multiturn \
             --model random:llama3-8b --device cuda --dtype bfloat16 --chats 8 \
             --first-tokens 6000 --turn-tokens 6000 --turns 5 --kv-budget-gb 40 \
             --max-batch-tokens 8192 --mode $m --json "$OUT/multi-$m.json"; done ;;
    tiers) timeout "${T_TIERS:-200}" python -m benchmarks.multiturn --model random:llama3-8b \
             --device cuda --dtype bfloat16 --chats 4 --turns 3 --first-tokens 6000 \
             --turn-tokens 2000 --reply-tokens 32 --kv-budget-gb 20 --host-budget-gb 16 \
             --max-batch-tokens 8192 --budget-mb 3000 --json "$OUT/tiers.json" ;;
    head) timeout "${T_HEAD:-400}" python -m benchmarks.headline.gpu ${HEAD_ARGS---kv-budget-gb 10 \
             --pressure 4 --configs none,quantize_int4,adaptive:balanced --host-gb 32 \
             --timeout-s 140} --out "$OUT/headline-gpu" ;;
    cap) timeout "${T_CAP:-400}" python -m benchmarks.headline.capacity --kv-budget-gb \
             "${CAP_GB:-5}" --context "${CAP_CONTEXT:-8192}" --settle-s 10 \
             --configs "${CAP_CONFIGS:-none,quantize_int4,adaptive:balanced}" \
             ${CAP_COUNTS:+--counts "$CAP_COUNTS"} --out "$OUT/capacity" ;;
    split) timeout "${T_SPLIT:-200}" python -m benchmarks.step_split --batches 1,64 ;;
    offload) timeout "${T_OFFLOAD:-300}" python -m benchmarks.offload --model random:llama3-8b \
             --context 32768 ;;
    daemon) timeout "${T_DAEMON:-200}" python -m benchmarks.status_latency --clients 64 \
             --seconds 15 --model random:llama3-8b --max-tokens 128 ;;
    fit) timeout "${T_FIT:-120}" python -m benchmarks.fit_cost --layers 32 --kv-heads 8 \
             --head-dim 128 --block 32 --tokens 2048 --reps 2 --device cuda ;;
    quant) timeout "${T_QUANT:-200}" bash -c "python -m pytest -q -p no:cacheprovider \
             tests/kernels/test_quantize_slots.py && KVCTL_FUSED_QUANT=1 python -m pytest -q \
             -p no:cacheprovider tests/engine/test_cuda.py tests/engine/test_cuda_graphs.py; \
             python -m benchmarks.quantize_cost --device cuda" ;;
    *) echo "unknown step $s" ;;
  esac >"$OUT/$s.txt" 2>&1
  echo "== $s: rc $? in $(( $(date +%s) - t0 )) s"; tail -n "${TAIL:-25}" "$OUT/$s.txt"
done
[ -n "${NO_PNG-}" ] && find "$OUT" -name "*.png" -delete
true
