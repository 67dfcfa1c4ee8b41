"""launch/slurm/cluster.sh: a cluster of its own, torn down while a job runs, leaves no process behind."""
from __future__ import annotations

import time

import pytest

from slurm_harness import live_cluster_processes, start_cluster, stop_cluster

pytestmark = pytest.mark.slurm


def test_teardown_with_a_running_job_leaves_no_daemon(tmp_path):
    directory = tmp_path / "cluster"
    cluster = start_cluster(directory)
    try:
        assert cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip() == "idle"
        job_id = int(cluster.run("sbatch", "--parsable", "--output=/dev/null", "--wrap", "srun sleep 300").stdout.strip())
        deadline = time.monotonic() + 30
        while cluster.job(job_id)["JobState"] != "RUNNING":
            assert time.monotonic() < deadline, cluster.job(job_id)
            time.sleep(0.2)
        # The job's batch shell, slurmstepd and `sleep` are cluster processes too.
        assert len(live_cluster_processes(directory)) > 2
    finally:
        stop_cluster(directory)  # asserts that nothing of the cluster is still running
    assert live_cluster_processes(directory) == []
