"""Run lifecycle on real gloo ranks: rolling back to an older checkpoint, the last interval checkpoint without
save_at_end, validation without samples, uneven validation under ZeRO-3, a bad --resume path, a preemption
signal during set-up, TensorBoard on resume, and srun without a rendezvous address."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hgrn_megatron.pretrain import EXIT_CONFIG_ERROR, EXIT_REQUEUE
from hgrn_megatron.testing.distributed import DistributedTestError, run_distributed

from .conftest import read_losses

pytestmark = [pytest.mark.distributed]


def _train(tree: dict, resume: str = "auto", signal_during_setup: bool = False):
    from hgrn_megatron.pretrain import resume as resume_module
    from hgrn_megatron.pretrain import trainer
    from hgrn_megatron.pretrain.config import RunConfig

    if signal_during_setup:  # as launch/slurm/worker.sh leaves it: SIGUSR1 ignored until the trainer installs
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # its handler; the notice then comes while the engine builds
        real_build = resume_module.build_engine

        def build_after_a_notice(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)
            return real_build(*args, **kwargs)

        resume_module.build_engine = build_after_a_notice
    result = trainer.train(RunConfig.build(tree), resume=resume)
    return result.exit_code, result.step


def run(tree: dict, world_size: int, resume: str = "auto", **kwargs):
    return run_distributed(_train, world_size=world_size, args=(tree, resume), kwargs=kwargs, timeout=240)[0]


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step-*"))


def test_rolling_back_sets_later_checkpoints_aside_and_keeps_the_new_ones(run_tree):
    """Resume from step 2 of a run that reached 6, to stop at 3 (keep_last 2): the old 4 and 6 move to
    abandoned/ instead of outranking, and so deleting, the new step 3; resume auto then finds step 3; TensorBoard
    and metrics.jsonl show each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tree = run_tree(checkpoint={"interval": 2, "keep_last": 2}, schedule={"decay_steps": 6},
                    logging={"log_interval": 1, "tensorboard": True})
    assert run(tree, 1) == (0, 6)
    root = Path(tree["run_dir"]) / "checkpoints"
    assert _steps(root) == ["step-00000004", "step-00000006"]
    first = read_losses(tree["run_dir"])

    tree["checkpoint"]["interval"] = 1
    tree["train"]["steps"] = 5
    assert run(tree, 1, resume=str(root / "step-00000004")) == (0, 5)
    assert _steps(root) == ["step-00000004", "step-00000005"]
    (abandoned,) = (root / "abandoned").iterdir()
    assert abandoned.name.startswith("after-step-00000004-") and _steps(abandoned) == ["step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000005"
    state = json.loads((root / "step-00000005" / "run_state.json").read_text())
    assert state["nonfinite_in_a_row"] == 0

    again = read_losses(tree["run_dir"])  # raises if a step was logged twice
    assert sorted(again) == [1, 2, 3, 4, 5] and again[5] == pytest.approx(first[5], abs=1e-5)
    events = EventAccumulator(str(Path(tree["run_dir"]) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_last_interval_checkpoint_is_written_without_save_at_end(run_tree):
    tree = run_tree(train={"steps": 4}, checkpoint={"interval": 2, "save_at_end": False})
    assert run(tree, 1) == (0, 4)
    assert _steps(Path(tree["run_dir"]) / "checkpoints") == ["step-00000002", "step-00000004"]


def test_evaluation_without_validation_samples_is_off_not_nan(run_tree):
    tree = run_tree(train={"steps": 2, "eval_interval": 1}, data={"valid_shards": []},
                    checkpoint={"interval": 2})
    assert run(tree, 1) == (0, 2)
    records = [json.loads(line) for line in Path(tree["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train"]
    state = json.loads((Path(tree["run_dir"]) / "checkpoints" / "step-00000002" / "run_state.json").read_text())
    assert state["last_val_loss"] is None


def test_uneven_validation_under_zero3_completes(run_tree):
    """3 validation samples over 2 data-parallel ranks: rank 0 has two batches, rank 1 one. Under ZeRO-3 the
    forward gathers parameters across ranks, so rank 1 must run (and discard) a second forward too."""
    tree = run_tree(train={"steps": 1, "eval_interval": 1}, data={"valid_samples": 3}, parallel={"zero_stage": 3})
    assert run(tree, 2) == (0, 1)
    (val,) = [json.loads(line) for line in Path(tree["run_dir"], "metrics.jsonl").read_text().splitlines()
              if '"split": "val"' in line]
    assert val["val_tokens"] == 3 * 32


def test_bad_resume_path_fails_on_every_rank_and_exits_2(run_tree, tmp_path):
    tree = run_tree(train={"steps": 1})
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(DistributedTestError, match=r"--resume .*no-such-checkpoint: no such checkpoint directory"):
        run(tree, 2, resume=missing)  # before, rank 1 waited for rank 0's choice until the harness timed out
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    cli = subprocess.run([sys.executable, "-m", "hgrn_megatron.pretrain", "--config", str(config), "--resume",
                          missing], check=False, capture_output=True, text=True, timeout=300)
    assert cli.returncode == EXIT_CONFIG_ERROR, cli.stderr[-2000:]
    assert "cannot start: --resume" in cli.stdout + cli.stderr


def test_preemption_notice_during_set_up_is_kept(run_tree):
    """SIGUSR1 while the engine is being built (the trainer inherits it ignored, as from worker.sh): the run
    saves after its first step and exits for requeue instead of training on until it is killed."""
    tree = run_tree(train={"steps": 6})
    assert run(tree, 1, signal_during_setup=True) == (EXIT_REQUEUE, 1)
    assert (Path(tree["run_dir"]) / "checkpoints" / "latest").read_text().strip() == "step-00000001"


def test_srun_tasks_without_a_rendezvous_address_are_refused(monkeypatch):
    from hgrn_megatron.pretrain.distributed import launch_env

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(RuntimeError, match=r"srun as task 3 of 8, but MASTER_ADDR is not set"):
        launch_env()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # the batch script itself (no job step): one process
    assert launch_env().launcher == "single"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert (launch_env().rank, launch_env().world_size, launch_env().launcher) == (3, 8, "slurm")


def test_logged_loss_after_an_off_grid_resume_covers_the_same_steps(run_tree):
    """A resume at step 1 (not a multiple of log_interval 4): the record at step 4 still averages steps 1-4,
    because the interval's partial sums travel in the checkpoint."""
    straight = run_tree(train={"steps": 8}, logging={"log_interval": 4, "tensorboard": False})
    straight["run_dir"] += "-straight"
    assert run(straight, 1) == (0, 8)
    split = run_tree(train={"steps": 8, "exit_after_minutes": 1e-6},
                     logging={"log_interval": 4, "tensorboard": False})
    assert run(split, 1) == (EXIT_REQUEUE, 1)
    del split["train"]["exit_after_minutes"]
    assert run(split, 1) == (0, 8)
    assert read_losses(split["run_dir"]) == read_losses(straight["run_dir"])  # steps 4 and 8, bit-identical


def test_preempted_validation_runs_after_the_resume(run_tree, monkeypatch):
    """A preemption notice during the validation of step 2: the run saves step 2 and exits for requeue without a
    validation record; the resumed run validates step 2 first (the same loss an uninterrupted run logs)."""
    def val_losses(tree):
        lines = Path(tree["run_dir"], "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["split"] == "val"}

    common = {"train": {"steps": 4, "eval_interval": 2}, "data": {"valid_samples": 4}}
    straight = run_tree(**common)
    straight["run_dir"] += "-straight"
    assert run(straight, 1) == (0, 4)
    tree = run_tree(**common)
    monkeypatch.setenv("HGRN_FAULT_INJECTION", json.dumps({"preempt_validation_at_step": 2}))
    assert run(tree, 1) == (EXIT_REQUEUE, 2)
    assert val_losses(tree) == {}
    state = json.loads((Path(tree["run_dir"]) / "checkpoints" / "step-00000002" / "run_state.json").read_text())
    assert state["validation_due"] is True
    monkeypatch.delenv("HGRN_FAULT_INJECTION")
    assert run(tree, 1) == (0, 4)
    assert val_losses(tree) == val_losses(straight) and sorted(val_losses(tree)) == [2, 4]


def test_checkpoints_by_wall_clock_interval(run_tree):
    """checkpoint.interval_minutes saves when the time since the last save passed it, agreed by the ranks at a
    step boundary, independently of the step interval (0 here)."""
    tree = run_tree(train={"steps": 3}, checkpoint={"interval": 0, "interval_minutes": 1e-6, "keep_last": 5,
                                                    "save_at_end": False})
    assert run(tree, 2) == (0, 3)
    assert _steps(Path(tree["run_dir"]) / "checkpoints") == ["step-00000001", "step-00000002", "step-00000003"]
