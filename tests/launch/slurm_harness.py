"""Driving a real single-node SLURM cluster from the tests (stood up by launch/slurm/cluster.sh).

`start_cluster(DIR)` gives a `SlurmCluster`: submit the shipped sbatch, read job state through `scontrol`,
signal the batch shell like a preemption would. `stop_cluster(DIR)` stops the daemons and checks, independently
of the script, that none of the cluster's processes is left running.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "launch" / "slurm" / "cluster.sh"
PRETRAIN_SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
# Resources that fit the test node (its CPUs, no GPUs) instead of the template's 8 GPUs x 12 CPUs per task.
TEST_RESOURCES = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0")


class SlurmCluster:
    """Client side of a running test cluster: every command gets SLURM_CONF pointing at its config."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.conf = directory / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def submit(self, *args: str, env: dict[str, str] | None = None, options: tuple[str, ...] = ()) -> int:
        """`sbatch --parsable OPTIONS launch/slurm/pretrain.sbatch ARGS` from the repository root; the job id."""
        cmd = ["sbatch", "--parsable", *TEST_RESOURCES, *options, str(PRETRAIN_SBATCH), *args]
        proc = subprocess.run(cmd, env=self.env(**(env or {})), cwd=REPO, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def signal_batch_shell(self, job_id: int, sig: str = "USR1") -> None:
        """What a preemption notice does: the signal to the batch shell only (not to the job's steps)."""
        self.run("scancel", "--batch", f"--signal={sig}", str(job_id))

    def wait_finished(self, job_id: int, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait for a final state; a requeued job passes through non-final states and keeps its id."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no output file)"
                raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {info}\n--- output ---\n{tail}")
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------ process checks
def _proc_state(pid: int) -> str | None:
    """Process state letter, or None when the pid is gone. Zombies ('Z') have exited and count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def live_cluster_processes(directory: Path) -> list[str]:
    """Live processes of the cluster in `directory`, described for error messages: its daemons (by pid file and
    by the marker variable cluster.sh starts them with), the slurmstepd daemons of its jobs (slurm* processes
    working inside the directory) and every descendant of those (the jobs' own processes)."""
    marker = f"HGRN_SLURM_CLUSTER={directory}".encode()
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for name in ("slurmctld", "slurmd"):
        pidfile = directory / "run" / f"{name}.pid"
        if pidfile.exists() and pidfile.read_text().strip():
            roots.add(int(pidfile.read_text().strip()))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            parent[pid] = int(stat[stat.rindex(")") + 2:].split()[1])
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                roots.add(pid)
            comm = (entry / "comm").read_text().strip()
            cwd = Path(os.readlink(entry / "cwd"))
            if comm.startswith("slurm") and (cwd == directory or directory in cwd.parents):
                roots.add(pid)
        except (OSError, ValueError):
            continue
    members = set(roots)
    grew = True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in members and pid not in members}
        members |= children
        grew = bool(children)
    found = []
    for pid in sorted(members):
        state = _proc_state(pid)
        if state in (None, "Z", "X"):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append(f"pid {pid} ({state}): {cmdline}")
    return found


def start_cluster(directory: Path) -> SlurmCluster:
    """`cluster.sh up DIR` (installs Slurm with apt-get first when it is missing; that needs root)."""
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it (apt-get) needs root")
    proc = subprocess.run(["bash", str(CLUSTER_SH), "up", str(directory)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"cluster.sh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return SlurmCluster(directory)


def stop_cluster(directory: Path) -> None:
    proc = subprocess.run(["bash", str(CLUSTER_SH), "down", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"cluster.sh down failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    left = live_cluster_processes(directory)
    assert not left, f"processes of the test cluster still running after teardown: {left}"
