#!/usr/bin/env bash
# The GPU suite, one command on one GPU (under 8 minutes on one H200): the Triton scan benchmark, then training
# steps of hgrn-1b and hgrn-125m and their Transformer baselines (bf16, ZeRO-1, sequence 2048, the largest
# micro-batch that fits), then one table of every figure next to its goal. Results: $OUT_DIR/{scan,train,suite}.json.
#
#   bash benchmarks/gpu_suite.sh                 # on a GPU machine
#   bash benchmarks/gpu_suite.sh --cpu-smoke     # no GPU: every part at toy sizes on CPU (training steps in bf16,
#                                                #   the scan benchmark interpreted, its kernels lowered to sm_90);
#                                                #   checks the code paths only, the figures mean nothing
#   OUT_DIR=/some/dir PROFILE=hgrn-1b:hgrn bash benchmarks/gpu_suite.sh   # also profile one model's step
#
# Each part has its own time limit, so a hang cannot eat the whole slot; a part that fails is reported in the
# table and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-gpu}
OUT_DIR=${OUT_DIR:-runs/gpu-suite/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python}
if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
# Fewer allocator-fragmentation OOMs when the micro-batch search fills the device.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.cache/triton}
unset TRITON_INTERPRET
started=$(date +%s)
echo "gpu_suite: results in $OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

if [[ "$MODE" == "--cpu-smoke" ]]; then
    # The scan benchmark's own CPU modes: its whole script at toy sizes under Triton's interpreter (writes
    # scan.json), and the kernels lowered to sm_90 cubins without a GPU.
    timeout "${SCAN_TIMEOUT:-300}" "$PYTHON" benchmarks/scan_gpu.py --dry-run --quick --out "$OUT_DIR/scan.json" \
        > "$OUT_DIR/scan.log" 2>&1; echo "scan (dry run, interpreted): exit $?"
    timeout "${SCAN_TIMEOUT:-300}" "$PYTHON" benchmarks/scan_gpu.py --compile-only 90 --variants core \
        > "$OUT_DIR/scan_compile.log" 2>&1; echo "scan (compile-only, sm_90): exit $? ($(tail -n 1 "$OUT_DIR/scan_compile.log"))"
    # A nominal 1 TFLOP/s peak and an out-of-memory simulated above micro-batch 3 take the MFU and OOM-retry paths.
    timeout "${TRAIN_TIMEOUT:-600}" "$PYTHON" benchmarks/gpu_train_step.py --cpu-smoke --out "$OUT_DIR/train.json" \
        --peak-tflops 1 --max-micro-batch 8 --simulate-oom-above 3 ${PROFILE:+--profile "$PROFILE"} 2>&1 \
        | grep -v -i warn | tee "$OUT_DIR/train.log"
else
    # --quick: the default kernel configuration only; SCAN_SWEEP=1 adds the block/chunk/warp sweep (minutes more).
    SCAN_ARGS=(--quick)
    if [[ -n "${SCAN_SWEEP:-}" ]]; then SCAN_ARGS=(); fi
    timeout "${SCAN_TIMEOUT:-150}" "$PYTHON" benchmarks/scan_gpu.py "${SCAN_ARGS[@]}" --out "$OUT_DIR/scan.json" \
        2>&1 | tee "$OUT_DIR/scan.log"
    echo "scan benchmark: exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s"
    timeout "${TRAIN_TIMEOUT:-300}" "$PYTHON" benchmarks/gpu_train_step.py --out "$OUT_DIR/train.json" \
        ${PROFILE:+--profile "$PROFILE"} 2>&1 | grep -v -i warn | tee "$OUT_DIR/train.log"
    echo "training steps: exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s"
fi
"$PYTHON" benchmarks/gpu_suite_report.py "$OUT_DIR"
echo "gpu_suite: done in $(( $(date +%s) - started )) s; results in $OUT_DIR"
