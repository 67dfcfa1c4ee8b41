"""One trainer per run directory: the lock of hgrn_megatron.pretrain.run_lock between real processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.pretrain.run_lock import RunDirLocked, acquire_run_lock, lock_run_dir
from hgrn_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.faults

HOLDER = textwrap.dedent("""
    import os, sys, time
    from hgrn_megatron.pretrain.run_lock import acquire_run_lock
    lock = acquire_run_lock(sys.argv[1])
    child = os.fork() if sys.argv[2] == "fork" else -1  # a data-loader worker: forked after the lock was taken
    if child == 0:
        time.sleep(600)
        os._exit(0)
    print("locked", child, flush=True)
    time.sleep(600)
""")
SECOND = textwrap.dedent("""
    import sys
    from hgrn_megatron.pretrain.run_lock import RunDirLocked, acquire_run_lock
    try:
        acquire_run_lock(sys.argv[1])
    except RunDirLocked as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    print("acquired")
""")


def _hold(run_dir, mode="plain") -> tuple[subprocess.Popen, int]:
    """A process holding the lock (and, with mode "fork", the pid of a child it forked after taking it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("locked"), line
    return proc, int(line.split()[1])


def _second(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SECOND, str(run_dir)], check=False, capture_output=True, text=True,
                          timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_second_trainer_is_refused_naming_the_holder_and_a_killed_holder_releases(tmp_path):
    run_dir = tmp_path / "run"
    holder, child = _hold(run_dir, mode="fork")  # its child (as a data-loader worker is) outlives it
    try:
        second = _second(run_dir)
        assert second.returncode == 2 and second.stdout == ""
        message = second.stderr.strip()
        assert "\n" not in message
        assert message.startswith(f"run_dir {run_dir} is in use by another trainer (host {socket.gethostname()}, "
                                  f"pid {holder.pid}, started ")
        with pytest.raises(RunDirLocked) as refused:  # from this process too; a config-class error: exit 2
            acquire_run_lock(run_dir)
        assert isinstance(refused.value, ConfigError)

        holder.kill()  # kill -9: no exit handler runs
        holder.wait(timeout=30)
        assert _alive(child)
        second = _second(run_dir)
        assert second.returncode == 0 and second.stdout.strip() == "acquired", second.stderr
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_one_process_cannot_take_it_twice_and_release_hands_it_on(tmp_path):
    lock = acquire_run_lock(tmp_path / "run")
    try:
        with pytest.raises(RunDirLocked, match="in use by another trainer in this process"):
            acquire_run_lock(tmp_path / "run")
        assert _second(tmp_path / "run").returncode == 2  # the refused attempt did not drop the lock
    finally:
        lock.release()
    assert _second(tmp_path / "run").returncode == 0


def _lock_on_every_rank(run_dir):
    import torch.distributed as dist

    try:
        lock = lock_run_dir(run_dir, dist.get_rank())
    except RunDirLocked as err:
        return "refused: " + str(err)
    return "held" if lock is not None and lock.held else "not rank 0"


@pytest.mark.distributed
def test_every_rank_learns_that_rank_0_was_refused(tmp_path):
    run_dir = tmp_path / "run"
    holder, _ = _hold(run_dir)
    try:
        results = run_distributed(_lock_on_every_rank, world_size=2, args=(str(run_dir),), timeout=120)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert results[0] == results[1] and results[0].startswith(f"refused: run_dir {run_dir} is in use")
    assert f"pid {holder.pid}" in results[0]
    assert run_distributed(_lock_on_every_rank, world_size=2, args=(str(run_dir),), timeout=120) == \
        ["held", "not rank 0"]


def test_a_second_hgrn_pretrain_on_a_running_run_dir_exits_2_naming_the_first(tmp_path):
    from hgrn_megatron.pretrain import EXIT_REQUEUE

    from .harness import HGRN_PRETRAIN, Trainer, tiny_config

    config = tiny_config(tmp_path, steps=100000)
    first = Trainer([HGRN_PRETRAIN, "--config", str(config)])
    try:
        first.wait_for("step       2/")
        # (3 steps: without the lock it would finish quickly instead of training alongside the first)
        second = subprocess.run([HGRN_PRETRAIN, "--config", str(config), "train.steps=3"], check=False,
                                capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is in use by another trainer (host {socket.gethostname()}, pid {first.proc.pid}, started " in \
            second.stdout + second.stderr
        first.proc.send_signal(signal.SIGUSR1)
        assert first.finish() == EXIT_REQUEUE, first.output
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # each step once: nothing logged by the second trainer
