#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Idempotent: a stamp records the hash of setup.py + constraints.txt; when unchanged, this takes < 1 s.
# Usage: source launch/setup_env.sh   (or run it; it leaves .venv ready either way)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HGRN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

STAMP="$VENV/.hgrn-setup-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && python -c "import hgrn_megatron" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
else
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "[setup] CUDA device found: installing torch (CUDA build)"
      pip install --quiet "torch>=2.4"
    else
      # A bare `torch` would pull a multi-GB CUDA build on a CPU machine: pin the CPU build.
      echo "[setup] no CUDA device: installing torch==2.13.0 (CPU build)"
      pip install --quiet "torch==2.13.0"
    fi
  fi
  echo "[setup] installing hgrn-megatron (editable) with constraints.txt"
  pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  echo "$WANT" > "$STAMP"
  echo "[setup] done"
fi
