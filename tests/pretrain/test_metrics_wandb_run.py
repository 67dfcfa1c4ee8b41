"""A real training run with `logging.wandb` in offline mode: rank 0 writes one W&B run under RUN_DIR/wandb with
the run's scalars and its resolved config, and a resume continues the same W&B run id."""
from __future__ import annotations

from pathlib import Path

import pytest

from hgrn_megatron.testing.distributed import run_distributed

from .conftest import read_losses
from .wandb_file import history, run_info

pytest.importorskip("wandb")
pytestmark = [pytest.mark.distributed]


def _train(tree: dict):
    import os

    os.environ["WANDB_SILENT"] = "true"
    from hgrn_megatron.pretrain import trainer
    from hgrn_megatron.pretrain.config import RunConfig

    result = trainer.train(RunConfig.build(tree))
    return result.exit_code, result.step


def test_a_run_and_its_resume_log_to_one_offline_wandb_run(run_tree):
    tree = run_tree(train={"steps": 3}, checkpoint={"interval": 3},
                    logging={"log_interval": 1, "wandb": {"mode": "offline", "project": "test"}})
    run_dir = Path(tree["run_dir"])
    assert run_distributed(_train, world_size=2, args=(tree,), timeout=240) == [(0, 3), (0, 3)]
    tree["train"]["steps"] = 5
    assert run_distributed(_train, world_size=2, args=(tree,), timeout=240) == [(0, 5), (0, 5)]

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # rank 0 only, one per attempt
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    infos = [run_info(f) for f in files]
    assert [i[0] for i in infos] == [run_id, run_id]
    assert infos[0][1]["model"]["preset"] == "tiny" and infos[0][1]["train"]["steps"] == 3
    logged = {h["step"]: h["train/loss"] for f in files for h in history(f) if "train/loss" in h}
    losses = read_losses(run_dir)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    assert logged == pytest.approx(losses)  # the same scalars as metrics.jsonl and TensorBoard
