"""The README's main job, end to end on the shipped sample (shortened): tokenizer → pretrain → export →
generate through transformers."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "qs"
    env = dict(os.environ, RUN_DIR=str(run_dir))
    proc = subprocess.run(
        ["bash", "launch/quickstart.sh", "train.steps=12", "train.eval_interval=6", "checkpoint.interval=6",
         "logging.log_interval=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6, 9, 12]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [6, 12]
    per_source = {k for k in val[-1] if k.startswith("val_loss/")}
    assert per_source and val[-1]["val_ppl"] > 1  # one val_loss/<pile_set_name> per source present
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "hf" / "model.safetensors").is_file()
    sample = [line for line in proc.stdout.splitlines() if line.startswith("[quickstart] sample: And God said,")]
    assert sample and len(sample[0]) > len("[quickstart] sample: And God said,") + 10
