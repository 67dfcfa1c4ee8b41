"""The launch tests' SLURM cluster: one per session, stood up by launch/slurm/cluster.sh (see slurm_harness)."""
from __future__ import annotations

import pytest

from tests.launch.slurm_harness import SlurmCluster, start_cluster, stop_cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    directory = tmp_path_factory.mktemp("slurm-cluster")
    cluster = start_cluster(directory)
    try:
        yield cluster
    finally:
        stop_cluster(directory)
