"""The batch shell's failure policy (pretrain/failure_policy.py) on exit records as worker.sh writes them.

The same decisions run on the real SLURM in test_sbatch_failures.py; here each rule is pinned on its own.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hgrn_megatron.pretrain.failure_policy import Attempt, decide, describe_status, run_dir_of

REPO = Path(__file__).resolve().parents[2]
WORKER_SH = REPO / "launch" / "slurm" / "worker.sh"


def _records(exits: Path, **ranks: tuple) -> None:
    """rank_R=(node, started, ended, status) or (node, started) for a rank that never recorded its end."""
    exits.mkdir(parents=True, exist_ok=True)
    for key, rec in ranks.items():
        lines = [f"start {rec[1]} {rec[0]} 100"]
        if len(rec) == 4:
            lines.append(f"exit {rec[2]} {rec[0]} {rec[3]}")
        (exits / key.replace("_", "-")).write_text("\n".join(lines) + "\n")


def _checkpoint(run_dir: Path, step: int) -> None:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


def _restarts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]


def test_the_first_rank_to_fail_is_named_with_its_signal(tmp_path, capsys):
    run_dir, exits = tmp_path / "run", tmp_path / "exits"
    _checkpoint(run_dir, 20)
    (run_dir / "metrics.jsonl").write_text('{"split": "train", "step": 20}\n{"split": "train", "step": 25}\n')
    # rank 1 killed first; rank 0 then fails in its collective; rank 2 finished its own work (status 0).
    _records(exits, rank_0=("n1", 1.0, 12.5, 1), rank_1=("n2", 1.0, 10.25, 137), rank_2=("n2", 1.0, 13.0, 0))
    action, code, suspect = decide(run_dir, exits, Attempt(status=137, job="7", restart=0, max_failures=3))
    assert (action, code, suspect) == ("requeue", 137, "n2")
    log = capsys.readouterr().err
    assert "first failure: rank 1 on node n2 at " in log and "killed by SIGKILL (status 137)" in log
    assert "(1 other rank(s) failed after it)" in log
    assert "crash: failure 1 of at most 3 since checkpoint step-00000020" in log
    (record,) = _restarts(run_dir)
    assert record["cause"] == "crash" and record["action"] == "requeue" and record["suspect_node"] == "n2"
    assert record["first_failure"]["rank"] == 1 and record["first_failure"]["status"] == 137
    assert (record["checkpoint"], record["last_logged_step"], record["steps_lost"]) == ("step-00000020", 25, 5)


def test_a_crash_at_the_same_checkpoint_counts_up_and_a_new_checkpoint_resets_the_count(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 10)
    attempt = lambda restart: Attempt(status=1, job="7", restart=restart, max_failures=2)
    outcomes = []
    for restart in range(3):
        exits = tmp_path / f"exits-{restart}"
        _records(exits, rank_0=("n1", 1.0, 2.0, 1))
        outcomes.append(decide(run_dir, exits, attempt(restart))[0])
    assert outcomes == ["requeue", "requeue", "end"]
    assert ("giving up: 3 failures in a row since checkpoint step-00000010 (HGRN_MAX_FAILURES=2); last: rank 0 "
            "on node n1: exit code 1; ending the job with status 1") in capsys.readouterr().err
    # Progress since the last failure: the count starts again.
    _checkpoint(run_dir, 12)
    assert decide(run_dir, tmp_path / "exits-0", attempt(3))[0] == "requeue"
    assert [r["action"] for r in _restarts(run_dir)] == ["requeue", "requeue", "end", "requeue"]
    # A new submission (another job id) starts its own count.
    _checkpoint(run_dir, 12)
    for _ in range(2):
        decide(run_dir, tmp_path / "exits-0", attempt(4))
    assert decide(run_dir, tmp_path / "exits-0", Attempt(status=1, job="8", max_failures=2))[0] == "requeue"


@pytest.mark.parametrize("code", [2, 3])
def test_a_refusal_or_an_abort_never_requeues(tmp_path, code):
    exits = tmp_path / "exits"
    _records(exits, rank_0=("n1", 1.0, 2.0, code), rank_1=("n1", 1.0, 2.1, code))
    assert decide(tmp_path / "run", exits, Attempt(status=code, max_failures=100)) == ("end", code, None)
    assert _restarts(tmp_path / "run")[0]["action"] == "end"


def test_a_hang_blames_the_rank_that_never_reported_its_end(tmp_path, capsys):
    """The watchdog fires on the rank that waits (exit 76); the stopped rank was killed with its wrapper."""
    exits = tmp_path / "exits"
    _records(exits, rank_0=("n1", 1.0, 50.0, 76), rank_1=("n2", 1.0))
    action, code, suspect = decide(tmp_path / "run", exits, Attempt(status=137, max_failures=3))
    assert (action, suspect) == ("requeue", "n2")
    log = capsys.readouterr().err
    assert "hang watchdog" in log and "ranks that recorded no exit" in log and "1 (n2)" in log
    assert _restarts(tmp_path / "run")[0]["silent_ranks"] == [1]


def test_preemption_requeues_without_counting_unless_terminated_or_told_not_to(tmp_path):
    exits = tmp_path / "exits"
    _records(exits, rank_0=("n1", 1.0, 2.0, 75), rank_1=("n1", 1.0, 2.0, 75))
    run_dir = tmp_path / "run"
    assert decide(run_dir, exits, Attempt(status=75)) == ("requeue", 75, None)
    assert decide(run_dir, exits, Attempt(status=75, terminating=True)) == ("end", 75, None)
    assert decide(run_dir, exits, Attempt(status=75, no_requeue=True)) == ("end", 0, None)
    # torchrun exits 1 when its worker exits 75; the worker's marker says what happened.
    assert decide(run_dir, tmp_path / "none", Attempt(status=1, preempted_marker=True))[0] == "requeue"
    assert not (run_dir / "launch" / "failures.json").exists()
    # A crash after TERM (scancel) is not requeued either.
    _records(tmp_path / "crash", rank_0=("n1", 1.0, 2.0, 139))
    assert decide(run_dir, tmp_path / "crash", Attempt(status=139, terminating=True)) == ("end", 139, None)


def test_a_finished_step_writes_nothing(tmp_path):
    _records(tmp_path / "exits", rank_0=("n1", 1.0, 2.0, 0))
    assert decide(tmp_path / "run", tmp_path / "exits", Attempt(status=0)) == ("end", 0, None)
    assert not (tmp_path / "run" / "restarts.jsonl").exists()


def test_describe_status():
    assert describe_status(139) == "killed by SIGSEGV (status 139)"
    assert describe_status(76).startswith("hang watchdog")
    assert describe_status(1) == "exit code 1"


def test_run_dir_follows_overrides_and_skips_trainer_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run_dir: runs/a\nmodel: {preset: tiny}\n")
    assert run_dir_of(str(config), []) == "runs/a"
    assert run_dir_of(str(config), ["--resume", "none", "run_dir=runs/b", "train.steps=3"]) == "runs/b"
    config.write_text("model: {preset: tiny}\n")
    assert run_dir_of(str(config), []) == "runs/default"


def test_the_worker_records_start_and_exit_status(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HGRN_EXIT_DIR": str(tmp_path), "SLURM_PROCID": "3", "SLURMD_NODENAME": "n9"}
    done = subprocess.run(["bash", str(WORKER_SH), sys.executable, "-c", "import os, signal; "
                           "os.kill(os.getpid(), signal.SIGSEGV)"], env=env, check=False)
    assert done.returncode == 139
    start, end = (tmp_path / "rank-3").read_text().splitlines()
    assert start.startswith("start ") and start.split()[2] == "n9"
    assert end.startswith("exit ") and end.split()[2:] == ["n9", "139"]
    assert (tmp_path / "failed").exists(), "the one file the batch shell polls for a failed rank"
    (tmp_path / "failed").unlink()
    # torchrun's own process (one per node, no RANK yet) records nothing; its workers do, by RANK.
    env.update(HGRN_LAUNCHER="torchrun", SLURM_PROCID="0")
    subprocess.run(["bash", str(WORKER_SH), "true"], env=env, check=True)
    assert not (tmp_path / "rank-0").exists()
    subprocess.run(["bash", str(WORKER_SH), "true"], env={**env, "RANK": "5"}, check=True)
    assert (tmp_path / "rank-5").read_text().splitlines()[1].endswith(" 0")
    subprocess.run(["bash", str(WORKER_SH), "bash", "-c", "exit 75"], env={**env, "RANK": "6"}, check=False)
    assert not (tmp_path / "failed").exists(), "finished and checkpointed-for-requeue ranks are no failure"
