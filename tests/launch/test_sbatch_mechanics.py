"""The sbatch script's own logic on a real SLURM, with a stand-in for the trainer.

The stand-in (standin.py) keeps the trainer's launch contract and nothing else: rank and world from torchrun's
or SLURM's variables, one `{"step": n}` line per step in RUN_DIR/metrics.jsonl, USR1 = save at the next step
boundary and exit 75, resume from its checkpoint on start. It isolates what this file tests: the rank environment each launch pattern provides, the signal path batch shell → step → trainer, the
requeue on exit 75 and nothing else, and the restart bookkeeping. The real trainer goes through the same path
in test_sbatch_pretrain.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.launch.standin import read_jsonl, setup_run

pytestmark = pytest.mark.slurm


def _wait_for_steps(run_dir: Path, n: int, timeout: float, cluster, job_id: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(read_jsonl(metrics)) >= n):
        info = cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), f"job ended before step {n}: {info}"
        assert time.monotonic() < deadline, f"fewer than {n} steps after {timeout} s: {info}"
        time.sleep(0.2)


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_launch_pattern_gives_each_rank_its_environment(slurm_cluster, tmp_path, launcher):
    run_dir, config, env = setup_run(tmp_path)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env={**env, "HGRN_LAUNCHER": launcher}, options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=120, log=log)

    assert info["JobState"] == "COMPLETED", log.read_text()
    assert info["Restarts"] == "0"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    launches = [read_jsonl(run_dir / "launches" / f"rank-{r}.jsonl") for r in (0, 1)]
    for rank, records in enumerate(launches):
        assert len(records) == 1
        (rec,) = records
        assert (rec["rank"], rec["world"], rec["torchrun"]) == (rank, 2, launcher == "torchrun")
        # The port is derived from the job id so that jobs sharing a node do not collide.
        assert rec["master_port"] == 10000 + job_id % 20000
        assert rec["master_addr"] == "localhost"
        assert rec["triton_cache"].endswith("hgrn-triton-cache-" + __import__("getpass").getuser())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preemption_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, launcher):
    steps = 20
    run_dir, config, env = setup_run(tmp_path, steps=steps, step_seconds=0.2, save_seconds=1.5)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env={**env, "HGRN_LAUNCHER": launcher}, options=(f"--output={log}",))
    _wait_for_steps(run_dir, 3, timeout=90, cluster=slurm_cluster, job_id=job_id)
    slurm_cluster.signal_batch_shell(job_id, "USR1")
    info = slurm_cluster.wait_finished(job_id, timeout=150, log=log)

    output = log.read_text()
    assert info["JobState"] == "COMPLETED", output
    assert info["Restarts"] == "1", output
    assert "requeueing job" in output
    steps_logged = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps_logged == list(range(1, steps + 1)), "every step exactly once across the two runs"
    first, second = read_jsonl(run_dir / "launches" / "rank-0.jsonl")
    assert (first["restart"], first["start_step"]) == (0, 0)
    assert second["restart"] == 1
    assert 3 <= second["start_step"] < steps, "the restart resumed from the checkpoint saved on the signal"


def test_scancel_lets_the_trainer_checkpoint_and_does_not_requeue(slurm_cluster, tmp_path):
    # scancel sends TERM to the batch shell and to the trainer: the trainer checkpoints (3 s, within the
    # cluster's KillWait) and the job ends CANCELLED; requeueing it would bring a cancelled job back.
    run_dir, config, env = setup_run(tmp_path, steps=100, step_seconds=0.2, save_seconds=3)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env=env, options=(f"--output={log}",))
    _wait_for_steps(run_dir, 3, timeout=90, cluster=slurm_cluster, job_id=job_id)
    slurm_cluster.run("scancel", str(job_id))
    info = slurm_cluster.wait_finished(job_id, timeout=60, log=log)
    time.sleep(1.0)  # a requeue, if the script wrongly asked for one, would show by now
    info = slurm_cluster.job(job_id)
    assert info["JobState"] == "CANCELLED", log.read_text()
    assert info["Restarts"] == "0"
    checkpoint = run_dir / "checkpoint.json"
    assert checkpoint.exists(), log.read_text()
    assert json.loads(checkpoint.read_text())["step"] == len(read_jsonl(run_dir / "metrics.jsonl"))
    assert "not requeueing" in log.read_text()


def test_failed_trainer_is_not_requeued(slurm_cluster, tmp_path):
    run_dir, config, env = setup_run(tmp_path, fail_with=3)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env=env, options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=60, log=log)
    assert info["JobState"] == "FAILED", log.read_text()
    assert info["ExitCode"] == "3:0"
    assert info["Restarts"] == "0"


def test_a_root_without_the_launch_scripts_fails_at_once(slurm_cluster, tmp_path):
    """HGRN_ROOT (or the submit directory) that is not the repository: the batch shell says so and exits 2,
    instead of every task failing to find the worker script."""
    _, config, env = setup_run(tmp_path)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env={**env, "HGRN_ROOT": str(tmp_path)}, options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=60, log=log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log.read_text()
    assert "launch/slurm/worker.sh not found: submit from the repository root or set HGRN_ROOT" in log.read_text()
