#!/usr/bin/env bash
# The GPU suite, one command on one GPU (under 8 minutes on one H200): the Triton scan benchmark, then training
# steps of hgrn-1b and hgrn-125m and their Transformer baselines (bf16, ZeRO-1, sequence 2048, the largest
# micro-batch that fits), then one table of every figure next to its goal. Results, at most 8 files, in
# $OUT_DIR: env.txt (versions, install log), scan.json, scan.log, train.json, train.log, suite.json.
#
#   bash benchmarks/gpu_suite.sh                           # on a GPU machine with the project installed
#   bash benchmarks/gpu_suite.sh --bundle .gpu-bundle      # on a node without network: first installs the bundle
#                                                          #   of benchmarks/gpu_bundle.sh offline (see below)
#   bash benchmarks/gpu_suite.sh --cpu-smoke [--bundle D]  # no GPU: every part at toy sizes on CPU (training
#                                                          #   steps in bf16, the scan benchmark interpreted, its
#                                                          #   kernels lowered to sm_90); checks code paths only
#   OUT_DIR=/some/dir PROFILE=hgrn-1b:hgrn bash benchmarks/gpu_suite.sh   # also profile one model's step
#
# --bundle DIR: `pip install --no-index --no-deps` of the bundle's wheels into a fresh temporary folder (removed
# at exit) put first on PYTHONPATH, so the image's torch and Triton are used and never replaced; refused when
# the bundle was built for another Python or from other sources than this tree. The interpreter is $PYTHON
# (default python3). Each part has its own time limit, cut to what is left of SUITE_BUDGET seconds (480 on a
# GPU, 1500 for the smoke run), so a hang cannot eat the whole slot; a part that fails is reported in the
# table and the others still run.
set -uo pipefail
CALLER=$(pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=gpu
BUNDLE=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-smoke) MODE=smoke; shift ;;
        --bundle) [[ -n "${2:-}" ]] || { echo "gpu_suite: --bundle needs a folder" >&2; exit 2; }
                  BUNDLE=$2; [[ "$BUNDLE" == /* ]] || BUNDLE="$CALLER/$BUNDLE"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite: unknown argument '$1' (expected --cpu-smoke, --bundle DIR)" >&2; exit 2 ;;
    esac
done
if [[ -n "$BUNDLE" && ! -f "$BUNDLE/manifest.json" ]]; then
    echo "gpu_suite: --bundle '$BUNDLE': no manifest.json there (build it with: bash benchmarks/gpu_bundle.sh)" >&2
    exit 2
fi
OUT_DIR=${OUT_DIR:-runs/gpu-suite/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
if [[ -n "$BUNDLE" ]]; then
    PYTHON=${PYTHON:-python3}
else
    PYTHON=${PYTHON:-python}
    if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
fi
# Fewer allocator-fragmentation OOMs when the micro-batch search fills the device.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.cache/triton}
unset TRITON_INTERPRET
started=$(date +%s)
if [[ "$MODE" == smoke ]]; then BUDGET=${SUITE_BUDGET:-1500}; else BUDGET=${SUITE_BUDGET:-480}; fi
# limit DEFAULT: a part's time limit, never past the suite's budget (20 s kept for the report).
limit() {
    local left=$(( BUDGET - 20 - ($(date +%s) - started) ))
    if (( left < ${1} )); then echo $(( left > 5 ? left : 5 )); else echo "$1"; fi
}
echo "gpu_suite: results in $OUT_DIR" | tee "$OUT_DIR/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT_DIR/env.txt" \
    || echo "(no nvidia-smi)" | tee -a "$OUT_DIR/env.txt"

if [[ -n "$BUNDLE" ]]; then
    TARGET=$(mktemp -d "${TMPDIR:-/tmp}/hgrn-gpu-bundle.XXXXXX")
    trap 'rm -rf "$TARGET"' EXIT
    TOOL=(env PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$ROOT/benchmarks/gpu_bundle_tool.py")
    PLAN=$("${TOOL[@]}" plan "$BUNDLE" 2> >(tee -a "$OUT_DIR/env.txt" >&2)) || exit 2
    # --isolated: no pip configuration or environment (indexes, find-links, constraints) but what is given here.
    # An image without pip gets the wheels unzipped (they need no build step, and --no-deps resolves nothing).
    INSTALL=("$PYTHON" -m pip --isolated install --no-index --find-links "$BUNDLE" --no-deps --target "$TARGET"
             --disable-pip-version-check --quiet)
    if ! "$PYTHON" -m pip --version > /dev/null 2>&1; then
        echo "gpu_suite: no pip in this image: unpacking the wheels instead" | tee -a "$OUT_DIR/env.txt"
        INSTALL=("${TOOL[@]}" unpack "$BUNDLE" "$TARGET")
    fi
    # shellcheck disable=SC2086 - PLAN is NAME==VERSION words
    if ! timeout "$(limit 120)" "${INSTALL[@]}" $PLAN >> "$OUT_DIR/env.txt" 2>&1; then
        echo "gpu_suite: offline install of $BUNDLE failed (see $OUT_DIR/env.txt)" >&2
        tail -n 5 "$OUT_DIR/env.txt" >&2
        exit 1
    fi
    "${TOOL[@]}" check-target "$TARGET" || exit 1
    export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_suite: installed $BUNDLE offline into $TARGET in $(( $(date +%s) - started )) s" | tee -a "$OUT_DIR/env.txt"
fi
"$PYTHON" "$ROOT/benchmarks/gpu_bundle_tool.py" versions ${TARGET:+"$TARGET"} 2>&1 | grep -v -i warn \
    | tee -a "$OUT_DIR/env.txt"

if [[ "$MODE" == smoke ]]; then
    # The scan benchmark's own CPU modes: its whole script at toy sizes under Triton's interpreter (writes
    # scan.json), and the kernels lowered to sm_90 cubins without a GPU.
    timeout "$(limit "${SCAN_TIMEOUT:-300}")" "$PYTHON" benchmarks/scan_gpu.py --dry-run --quick \
        --out "$OUT_DIR/scan.json" > "$OUT_DIR/scan.log" 2>&1; echo "scan (dry run, interpreted): exit $?"
    timeout "$(limit "${SCAN_TIMEOUT:-300}")" "$PYTHON" benchmarks/scan_gpu.py --compile-only 90 --variants core \
        > "$OUT_DIR/scan_compile.log" 2>&1
    echo "scan (compile-only, sm_90): exit $? ($(tail -n 1 "$OUT_DIR/scan_compile.log"))"
    # A nominal 1 TFLOP/s peak and an out-of-memory simulated above micro-batch 3 take the MFU and OOM-retry paths.
    timeout "$(limit "${TRAIN_TIMEOUT:-600}")" "$PYTHON" benchmarks/gpu_train_step.py --cpu-smoke \
        --out "$OUT_DIR/train.json" --peak-tflops 1 --max-micro-batch 8 --simulate-oom-above 3 \
        ${PROFILE:+--profile "$PROFILE"} 2>&1 | grep -v -i warn | tee "$OUT_DIR/train.log"
    echo "training steps (smoke): exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s"
else
    # --quick: the default kernel configuration only; SCAN_SWEEP=1 adds the block/chunk/warp sweep (minutes more).
    SCAN_ARGS=(--quick)
    if [[ -n "${SCAN_SWEEP:-}" ]]; then SCAN_ARGS=(); fi
    timeout "$(limit "${SCAN_TIMEOUT:-150}")" "$PYTHON" benchmarks/scan_gpu.py "${SCAN_ARGS[@]}" \
        --out "$OUT_DIR/scan.json" 2>&1 | tee "$OUT_DIR/scan.log"
    echo "scan benchmark: exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s"
    timeout "$(limit "${TRAIN_TIMEOUT:-300}")" "$PYTHON" benchmarks/gpu_train_step.py --out "$OUT_DIR/train.json" \
        ${PROFILE:+--profile "$PROFILE"} 2>&1 | grep -v -i warn | tee "$OUT_DIR/train.log"
    echo "training steps: exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s"
fi
"$PYTHON" benchmarks/gpu_suite_report.py "$OUT_DIR"
echo "gpu_suite: done in $(( $(date +%s) - started )) s; $(find "$OUT_DIR" -type f | wc -l) files in $OUT_DIR"
