"""The shipped pretrain.sbatch running the real trainer on a real SLURM: 2 tasks (srun, gloo), the tiny model on
the sample in tests/assets. One run to completion; one preempted mid-run with `scancel -b -s USR1` (what
`--signal=B:USR1@...` does before a time limit), which must checkpoint, requeue, resume and complete with every
step logged exactly once."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"


def _write_config(tmp_path: Path, steps: int) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    config = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny"},
        "tokenizer": {"model": str(ASSETS / "tokenizer")},
        "data": {
            "train_shards": [str(ASSETS / "pile-mini" / "train-*.jsonl.zst")],
            "valid_shards": [],
            "lanes": 4,
            # A loader process per rank, as in real runs: SLURM signals it too.
            "num_workers": 1,
        },
        "train": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 0},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"interval": 0},
        "logging": {"log_interval": 1, "tensorboard": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def _latest_checkpoint(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def test_tiny_model_on_two_tasks_completes(slurm_cluster, tmp_path):
    steps = 4
    config, run_dir = _write_config(tmp_path, steps)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=240, log=log)

    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert info["ExitCode"] == "0:0"
    assert _logged_steps(run_dir) == list(range(1, steps + 1))
    assert _latest_checkpoint(run_dir) == f"step-{steps:08d}"


def test_preempted_run_checkpoints_requeues_resumes_and_completes(slurm_cluster, tmp_path):
    steps = 60  # 0.05-0.15 s each here: the signal lands well before the end
    config, run_dir = _write_config(tmp_path, steps)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), options=(f"--output={log}",))
    deadline = time.monotonic() + 240
    while len(_logged_steps(run_dir)) < 2:
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no training steps after 240 s: {info}"
        time.sleep(0.05)
    slurm_cluster.signal_batch_shell(job_id, "USR1")
    info = slurm_cluster.wait_finished(job_id, timeout=300, log=log)

    output = log.read_text()
    assert info["JobState"] == "COMPLETED", output[-4000:]
    assert info["Restarts"] == "1", output[-4000:]
    assert "requeueing job" in output
    assert "restart 1 on" in output  # the second run's banner: SLURM_RESTART_COUNT=1 reached the job
    logged = _logged_steps(run_dir)
    assert logged == list(range(1, steps + 1)), f"every step exactly once across both runs, got {logged}"
    assert _latest_checkpoint(run_dir) == f"step-{steps:08d}"
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    assert saved[0] < steps, f"no checkpoint from the preemption (saved steps: {saved})"
