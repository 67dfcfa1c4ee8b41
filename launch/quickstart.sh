#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, train a SentencePiece tokenizer on the sample that ships
# in tests/assets, pretrain a tiny HGRN on CPU (configs/quickstart.yaml), checkpoint, export to Hugging Face and
# print a generated sample. Extra arguments are config overrides (key.sub=value), e.g. train.steps=50;
# RUN_DIR (default runs/quickstart) moves everything the job writes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
RUN_DIR="${RUN_DIR:-runs/quickstart}"

echo "[quickstart] 1/4 tokenizer: SentencePiece BPE (4096 pieces) on tests/assets/pile-mini"
if [ ! -f "$RUN_DIR/tokenizer/tokenizer.model" ]; then
  hgrn-tokenizer train --shards 'tests/assets/pile-mini/train-*.jsonl.zst' --out "$RUN_DIR/tokenizer" \
    --vocab-size 4096 --quiet
else
  echo "[quickstart] reusing $RUN_DIR/tokenizer"
fi

echo "[quickstart] 2/4 pretraining (resumes if $RUN_DIR/checkpoints has a checkpoint)"
hgrn-pretrain --config configs/quickstart.yaml run_dir="$RUN_DIR" tokenizer.model="$RUN_DIR/tokenizer" "$@"

echo "[quickstart] 3/4 export to Hugging Face format: $RUN_DIR/hf"
hgrn-export-hf --checkpoint "$RUN_DIR" --out "$RUN_DIR/hf" --overwrite

echo "[quickstart] 4/4 generate with transformers (trust_remote_code)"
python - "$RUN_DIR/hf" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
prompt = "And God said,"
ids = tok(prompt, return_tensors="pt").input_ids
torch.manual_seed(0)
out = model.generate(ids, max_new_tokens=60, do_sample=True, top_k=40, temperature=0.8)
# On one line: a briefly trained model samples many line breaks.
print("[quickstart] sample:", " ".join(tok.decode(out[0], skip_special_tokens=True).split()))
PY
echo "[quickstart] done: metrics in $RUN_DIR/metrics.jsonl, tensorboard --logdir $RUN_DIR/tensorboard"
