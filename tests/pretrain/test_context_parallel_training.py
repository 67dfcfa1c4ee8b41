"""Context-parallel training on real gloo ranks: each sequence split over 2 ranks trains as on one (losses,
validation), and a checkpoint saved at CP 2 resumes at CP 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import read_losses
from .test_engine import run

pytestmark = [pytest.mark.distributed]

# Document resets inside the pieces and across their boundary, validation every 3 steps.
COMMON = {"model": {"preset": "tiny", "seq_length": 32, "reset_at_document_boundary": True},
          "train": {"eval_interval": 3}, "schedule": {"decay_steps": 6}}


def _val_losses(run_dir) -> dict[int, float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["split"] == "val"}


@pytest.fixture(scope="module")
def cp1(tmp_path_factory):
    from .conftest import tiny_run_tree

    tree = tiny_run_tree(tmp_path_factory.mktemp("cp1") / "run", **COMMON)
    assert run(tree, 1) == (0, 6)
    return read_losses(tree["run_dir"]), _val_losses(tree["run_dir"])


def _close(got: dict, ref: dict, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(ref)
    for step, value in ref.items():
        assert abs(got[step] - value) <= tol * max(1.0, abs(value)), (step, got[step], value)


def test_two_context_parallel_ranks_train_as_one(run_tree, cp1):
    tree = run_tree(**COMMON, parallel={"context_parallel_size": 2})
    assert run(tree, 2) == (0, 6)
    _close(read_losses(tree["run_dir"]), cp1[0])
    _close(_val_losses(tree["run_dir"]), cp1[1])
    state = json.loads((Path(tree["run_dir"]) / "checkpoints" / "step-00000006" / "run_state.json").read_text())
    assert (state["cp_size"], state["dp_size"], state["world_size"]) == (2, 1, 2)


def test_a_context_parallel_checkpoint_resumes_at_cp1(run_tree, cp1):
    tree = run_tree(**{**COMMON, "train": {"eval_interval": 3, "steps": 3}}, parallel={"context_parallel_size": 2})
    assert run(tree, 2) == (0, 3)
    tree["train"]["steps"] = 6
    tree["parallel"] = {"context_parallel_size": 1}
    assert run(tree, 1) == (0, 6)  # ZeRO state partitioned over 2 ranks -> 1: through the universal format
    _close(read_losses(tree["run_dir"]), cp1[0])
