"""launch/slurm/cluster.sh: a cluster of its own, torn down while a job runs, leaves no process behind."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.launch.slurm_harness import live_cluster_processes, start_cluster, stop_cluster

pytestmark = pytest.mark.slurm


def _start_sleeping_job(cluster, directory: Path) -> None:
    cluster.run("sbatch", "--output=/dev/null", "--wrap", "srun sleep 300")
    deadline = time.monotonic() + 60
    while not any("sleep 300" in p for p in live_cluster_processes(directory)):
        assert time.monotonic() < deadline, live_cluster_processes(directory)
        time.sleep(0.2)


def test_teardown_with_a_running_job_leaves_no_daemon(tmp_path):
    directory = tmp_path / "cluster"
    cluster = start_cluster(directory)
    try:
        assert cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip() == "idle"
        _start_sleeping_job(cluster, directory)
        # The job's slurmstepd daemons and its processes (the batch shell, srun, `sleep`) count as the cluster's.
        running = live_cluster_processes(directory)
        assert any("slurmstepd" in p for p in running), running
    finally:
        stop_cluster(directory)  # asserts that nothing of the cluster is still running
    assert live_cluster_processes(directory) == []


def test_teardown_after_the_daemons_died_stops_the_orphaned_job(tmp_path):
    directory = tmp_path / "cluster"
    cluster = start_cluster(directory)
    try:
        _start_sleeping_job(cluster, directory)
        for name in ("slurmctld", "slurmd"):
            os.kill(int((directory / "run" / f"{name}.pid").read_text()), signal.SIGKILL)
        # Nothing is left to cancel the job: its slurmstepd, batch shell and `sleep` run on without the daemons.
        assert any("sleep 300" in p for p in live_cluster_processes(directory))
    finally:
        stop_cluster(directory)
    assert live_cluster_processes(directory) == []
