#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Idempotent: a stamp records the hash of setup.py + constraints.txt; when unchanged, this takes < 1 s.
# Usage: source launch/setup_env.sh   (leaves .venv active in your shell)
#    or: bash launch/setup_env.sh     (leaves .venv ready)
# Sourced, it changes nothing else in the calling shell: the work runs in a subshell with strict error
# handling, then only the venv is activated.
# On a machine without CUDA, torch is pinned to the CPU build of 2.13.0. On Linux that build comes from
# PyTorch's CPU index when it is reachable (PyPI's Linux wheel of the same version bundles CUDA); set
# HGRN_TORCH_INDEX_URL to another index, or to an empty string to use pip's own configuration only.

_hgrn_setup() (
  set -euo pipefail
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${HGRN_VENV:-$root/.venv}"
  py="${PYTHON:-python3}"
  cpu_torch="2.13.0"

  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$py" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"

  stamp="$venv/.hgrn-setup-stamp"
  want="$(cat "$root/setup.py" "$root/constraints.txt" | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import hgrn_megatron" 2>/dev/null; then
    echo "[setup] environment up to date ($venv)"
    return 0
  fi
  have_torch="$(python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    if [ -z "$have_torch" ]; then
      echo "[setup] CUDA device found: installing torch (CUDA build)"
      pip install --quiet "torch>=2.4"
    fi
  elif [ "$have_torch" != "$cpu_torch" ]; then
    # Any other version (or none): a later unpinned resolution could pull a multi-GB CUDA build.
    index=()
    url="${HGRN_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
    if [ -n "$url" ] && [ "$(uname -s)" = Linux ] \
        && python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$url" 2>/dev/null; then
      index=(--extra-index-url "$url")
    fi
    echo "[setup] no CUDA device: installing torch==$cpu_torch (CPU build)${index:+ from ${index[1]}}"
    pip install --quiet "${index[@]}" "torch==$cpu_torch"
  fi
  echo "[setup] installing hgrn-megatron (editable) with constraints.txt"
  pip install --quiet -c "$root/constraints.txt" -e "$root[dev]"
  echo "$want" > "$stamp"
  echo "[setup] done"
)

if (return 0 2>/dev/null); then  # sourced
  _hgrn_setup && . "${HGRN_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}/bin/activate"
  unset -f _hgrn_setup
else
  set -euo pipefail
  _hgrn_setup
fi
