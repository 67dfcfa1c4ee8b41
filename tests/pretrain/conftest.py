"""Fixtures for engine tests: a tiny run config on the shipped sample and tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

# Pay DeepSpeed's import (and the torch inductor import behind deepspeed.initialize) once in the parent, before
# the harness forks rank processes.
import deepspeed  # noqa: F401
import pytest
import torch._inductor  # noqa: F401

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def tiny_run_tree(run_dir: Path, **sections) -> dict:
    """A complete run config for a few fast steps on the shipped sample; `sections` deep-update it."""
    tree = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "seq_length": 32},
        "data": {
            "train_shards": [str(ASSETS / "pile-mini" / "train-*.jsonl.zst")],
            "valid_shards": [str(ASSETS / "pile-mini" / "val.jsonl.zst")],
            "num_workers": 0,
        },
        "tokenizer": {"model": str(ASSETS / "tokenizer" / "tokenizer.model")},
        "train": {"steps": 6, "global_batch_size": 4, "micro_batch_size": 1, "eval_interval": 0, "seed": 7},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"interval": 0, "keep_last": 3},
        "logging": {"log_interval": 1, "tensorboard": False},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def read_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (log_interval=1)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train":
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture
def run_tree(tmp_path):
    return lambda **sections: tiny_run_tree(tmp_path / "run", **sections)
