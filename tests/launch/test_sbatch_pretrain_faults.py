"""Faults on the real trainer under the shipped pretrain.sbatch on a real SLURM (2 tasks, gloo, the tiny model):
a rank killed with SIGKILL, and a rank stopped with SIGSTOP (its peer's hang watchdog trips). Each job must be
requeued, resume from its newest checkpoint and complete with every step logged once and the losses of an
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.test_sbatch_pretrain import _write_config

pytestmark = [pytest.mark.slurm, pytest.mark.heavy]  # about 6 minutes together: three real-trainer jobs

STEPS = 40
CHECKPOINT_INTERVAL = 10
HANG_TIMEOUT_S = 15


def _config(tmp_path: Path, **train) -> tuple[Path, Path]:
    path, run_dir = _write_config(tmp_path, STEPS)
    config = yaml.safe_load(path.read_text())
    config["checkpoint"]["interval"] = CHECKPOINT_INTERVAL
    config["train"].update(train)
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


def _train_records(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") == "train"]


@pytest.fixture(scope="module")
def reference_losses(slurm_cluster, tmp_path_factory) -> dict[int, float]:
    """Loss per step of the same run without faults."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config, run_dir = _config(tmp_path, hang_timeout_minutes=HANG_TIMEOUT_S / 60)
    log = tmp_path / "job.out"
    info = slurm_cluster.wait_finished(slurm_cluster.submit(str(config), options=(f"--output={log}",)), 300, log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    return {r["step"]: r["loss"] for r in _train_records(run_dir)}


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _trainer_pid(run_dir: Path, job_id: int, rank: int) -> int:
    """The trainer process of `rank` in the job's first attempt: the child of the wrapper that recorded its start."""
    record = run_dir / "launch" / f"exits-{job_id}-0" / f"rank-{rank}"
    wrapper = int(record.read_text().split()[3])
    (trainer,) = [pid for pid in _children(wrapper) if b"hgrn_megatron.pretrain" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return trainer


def _wait_for_step(slurm_cluster, job_id: int, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not any(r["step"] >= step for r in _train_records(run_dir)):
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"step {step} not reached after 240 s: {info}"
        time.sleep(0.02)


def _assert_resumed_and_equal(run_dir: Path, reference: dict[int, float], output: str) -> dict:
    records = _train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "every step exactly once"
    losses = {r["step"]: r["loss"] for r in records}
    assert losses == reference, "the losses of the uninterrupted run, bit for bit"
    (record,) = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert record["action"] == "requeue" and record["restart"] == 0
    assert re.fullmatch(r"step-000000[1-3]0", record["checkpoint"]), record
    assert f"resumed from {run_dir / 'checkpoints' / record['checkpoint']}" in output
    ckpt_step = int(record["checkpoint"].split("-")[1])
    assert record["steps_lost"] == record["last_logged_step"] - ckpt_step
    return record


def test_a_rank_killed_mid_run_is_requeued_and_resumes_with_the_same_losses(slurm_cluster, tmp_path,
                                                                             reference_losses):
    config, run_dir = _config(tmp_path, hang_timeout_minutes=HANG_TIMEOUT_S / 60)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), options=(f"--output={log}",))
    _wait_for_step(slurm_cluster, job_id, run_dir, CHECKPOINT_INTERVAL + 2, log)
    victim = _trainer_pid(run_dir, job_id, rank=1)
    os.kill(victim, signal.SIGKILL)
    info = slurm_cluster.wait_finished(job_id, timeout=300, log=log)

    output = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), output[-6000:]
    assert "first failure: rank 1 on node localhost" in output and "killed by SIGKILL (status 137)" in output
    record = _assert_resumed_and_equal(run_dir, reference_losses, output)
    assert record["cause"] == "crash" and record["first_failure"]["rank"] == 1


def test_a_stopped_rank_trips_the_peer_watchdog_and_the_job_resumes(slurm_cluster, tmp_path, reference_losses):
    """SIGSTOP stops every thread of that rank, its watchdog included: rank 0, waiting for it in a collective,
    trips its own watchdog, dumps its stacks and exits 76; the batch shell cancels the step HGRN_FAILURE_GRACE
    seconds later (srun alone would wait HGRN_STEP_WAIT, 300 s), killing the stopped rank; the job is requeued."""
    config, run_dir = _config(tmp_path, hang_timeout_minutes=HANG_TIMEOUT_S / 60)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env={"HGRN_FAILURE_GRACE": "5"}, options=(f"--output={log}",))
    _wait_for_step(slurm_cluster, job_id, run_dir, CHECKPOINT_INTERVAL + 2, log)
    os.kill(_trainer_pid(run_dir, job_id, rank=1), signal.SIGSTOP)
    info = slurm_cluster.wait_finished(job_id, timeout=300, log=log)

    output = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), output[-6000:]
    (dump,) = sorted((run_dir / "hangs").glob("rank-0-*.txt"))
    text = dump.read_text()
    idle = int(re.search(r"no progress for (\d+) s in step \d+ \(limit (\d+) s\)", text).group(1))
    assert HANG_TIMEOUT_S <= idle < 2 * HANG_TIMEOUT_S, text.splitlines()[0]
    # The frame rank 0 is stuck in: a collective of torch.distributed, waiting for the stopped rank.
    assert re.search(r'distributed_c10d\.py", line \d+ in (all_reduce|all_gather\w*|reduce_scatter\w*|broadcast\w*|'
                     r'barrier|reduce|gather|scatter)\n', text), text
    assert not list((run_dir / "hangs").glob("rank-1-*")), "the stopped rank's own watchdog could not run"
    assert "first failure: rank 0 on node localhost" in output and "hang watchdog" in output
    assert "a rank failed 5 s ago and step " in output and "cancelling the step (HGRN_FAILURE_GRACE)" in output
    record = _assert_resumed_and_equal(run_dir, reference_losses, output)
    assert record["cause"] == "hang" and record["first_failure"]["status"] == 76
    assert record["silent_ranks"] == [1], "the stopped rank never recorded an exit: it is the suspect"
