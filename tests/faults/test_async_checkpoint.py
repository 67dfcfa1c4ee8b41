"""Checkpoints written in the background (checkpoint.async_save): the same checkpoints and exact resume as
synchronous saves, and a rank killed while its shards are being written costs only the work since the last
committed checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hgrn_megatron.pretrain.checkpoint import verify_checkpoint
from hgrn_megatron.testing.distributed import DistributedTestError
from tests.faults.test_checkpoint_faults import run, straight  # noqa: F401 - `straight` is a fixture
from tests.pretrain.conftest import read_losses, tiny_run_tree

pytestmark = [pytest.mark.distributed]


def _tree(tmp_path: Path, steps: int) -> dict:
    return tiny_run_tree(tmp_path / "run", schedule={"decay_steps": 6}, train={"steps": steps},
                         checkpoint={"interval": 2, "keep_last": 3, "async_save": True})


@pytest.mark.parametrize("world", [1, 2], ids=["dp1", "dp2"])
def test_background_saves_resume_exactly(tmp_path, straight, world):  # noqa: F811
    tree = _tree(tmp_path, steps=4)
    assert run(tree, world) == (0, 4)
    root = Path(tree["run_dir"]) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert all(verify_checkpoint(root / name) is None for name in ("step-00000002", "step-00000004"))
    tree["train"]["steps"] = 6
    assert run(tree, world) == (0, 6)
    losses = read_losses(tree["run_dir"])
    for step, ref in straight.items():
        assert abs(losses[step] - ref) <= (0 if world == 1 else 1e-5), (step, losses[step], ref)


def test_a_rank_killed_during_a_background_write_resumes_from_the_last_commit(tmp_path, straight,  # noqa: F811
                                                                               monkeypatch):
    tree = _tree(tmp_path, steps=6)
    monkeypatch.setenv("HGRN_FAULT_INJECTION", json.dumps({"kill_during_save_at_step": 4}))
    with pytest.raises(DistributedTestError):
        run(tree)
    root = Path(tree["run_dir"]) / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert not (root / "step-00000004").exists()  # never committed: its writes may be torn
    monkeypatch.delenv("HGRN_FAULT_INJECTION")
    assert run(tree) == (0, 6)
    assert read_losses(tree["run_dir"]) == straight  # each step once, the same losses
    assert not list(root.glob("*.tmp"))
