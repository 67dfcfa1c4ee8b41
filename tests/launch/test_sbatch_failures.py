"""The sbatch script's failure policy on a real SLURM, with the stand-in trainer (standin.py): crashes requeue up
to HGRN_MAX_FAILURES times without a new checkpoint, refusals and aborts never, every ended attempt is one line
of restarts.jsonl, and the failing node is excluded before the requeue when the partition has nodes to spare.
The real trainer goes through the same path (a killed rank, a stopped rank) in test_sbatch_pretrain_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.launch.standin import read_jsonl, setup_run

pytestmark = pytest.mark.slurm


@pytest.mark.slow
def test_a_crash_repeating_at_the_same_step_gives_up_after_max_failures(slurm_cluster, tmp_path):
    # Rank 1 is killed at step 5 in every attempt; the newest checkpoint stays step 3.
    run_dir, config, env = setup_run(tmp_path, steps=8, step_seconds=0.25, checkpoint_every=3, crash_at_step=5)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env={**env, "HGRN_MAX_FAILURES": "2"}, options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=180, log=log)

    output = log.read_text()
    assert info["JobState"] == "FAILED", output
    assert info["Restarts"] == "2", output
    assert info["ExitCode"] == "137:0", output
    final = output.strip().splitlines()[-1]
    assert final.endswith("giving up: 3 failures in a row since checkpoint step-00000003 (HGRN_MAX_FAILURES=2); "
                          "last: rank 1 on node localhost: killed by SIGKILL (status 137); ending the job with "
                          "status 137"), final
    assert output.count("first failure: rank 1 on node localhost") == 3
    # One node: nothing to exclude it in favour of.
    assert "not excluding node localhost: partition debug has 1 node(s), the job needs 1" in output
    restarts = read_jsonl(run_dir / "restarts.jsonl")
    assert [(r["restart"], r["cause"], r["action"]) for r in restarts] == [
        (0, "crash", "requeue"), (1, "crash", "requeue"), (2, "crash", "end")]
    for record in restarts:
        assert record["job"] == str(job_id) and record["checkpoint"] == "step-00000003"
        assert record["first_failure"]["rank"] == 1 and record["first_failure"]["why"].startswith("killed by SIGKILL")
        assert record["steps_lost"] == record["last_logged_step"] - 3 >= 1
    assert not list((run_dir / "launch").glob("exits-*")), "exit records are removed once summarised"


@pytest.mark.parametrize("code", [2, 3])
def test_a_refusal_or_a_non_finite_abort_is_never_requeued(slurm_cluster, tmp_path, code):
    run_dir, config, env = setup_run(tmp_path, fail_with=code)
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(str(config), env={**env, "HGRN_MAX_FAILURES": "5"}, options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=60, log=log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", f"{code}:0", "0"), log.read_text()
    assert "not requeueing" in log.read_text()
    (record,) = read_jsonl(run_dir / "restarts.jsonl")
    assert record["action"] == "end" and record["first_failure"]["status"] == code


@pytest.mark.slow
def test_a_crash_excludes_the_node_when_the_partition_has_spares_then_resumes(slurm_cluster, tmp_path):
    """The test cluster has one node: stand-ins for `sinfo` (4 nodes) and for `scontrol update` (recorded, not
    applied: excluding the only node would leave the job pending) check the command the script builds."""
    # Rank 1 crashes at the start of step 3, rank 0 a step later at the latest: the newest checkpoint is step 2.
    run_dir, config, env = setup_run(tmp_path, steps=8, step_seconds=0.25, checkpoint_every=2, crash_at_step=3,
                                     crash_in_restarts=[0], crash_signal="SIGSEGV")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-updates.txt"
    (bin_dir / "sinfo").write_text('#!/bin/bash\necho 4\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = update ]; then echo "$*" >>{calls}; exit 0; fi\n'
        f'exec {shutil.which("scontrol")} "$@"\n')
    for tool in ("sinfo", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "job.out"
    env = {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    job_id = slurm_cluster.submit(str(config), env=env, options=(f"--output={log}",))
    info = slurm_cluster.wait_finished(job_id, timeout=120, log=log)

    output = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), output
    assert calls.read_text().splitlines() == [f"update JobId={job_id} ExcNodeList=localhost"]
    assert f"excluded node localhost from job {job_id} (ExcNodeList=localhost)" in output
    assert "killed by SIGSEGV (status 139)" in output
    (record,) = read_jsonl(run_dir / "restarts.jsonl")
    assert (record["cause"], record["action"], record["suspect_node"]) == ("crash", "requeue", "localhost")
    assert record["checkpoint"] == "step-00000002"
    # The second attempt resumed from the checkpoint and finished the run.
    assert json.loads((run_dir / "checkpoint.json").read_text())["step"] == 8
    starts = [r["start_step"] for r in read_jsonl(run_dir / "launches" / "rank-0.jsonl")]
    assert starts == [0, 2]
