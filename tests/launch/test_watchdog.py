"""The hang watchdog (pretrain/watchdog.py) in real processes, and the collective timeout after start-up.

Each watchdog test runs a small script in a fresh interpreter: the watchdog ends its process with os._exit, which
must not take pytest with it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hgrn_megatron.pretrain import EXIT_HUNG
from hgrn_megatron.testing.distributed import free_port, run_distributed

PRELUDE = """
import sys, threading, time
from hgrn_megatron.pretrain.watchdog import Watchdog
run_dir, rank, timeout_s, startup_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
"""


def _run(tmp_path: Path, body: str, rank: int, timeout_s: float, startup_s: float) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(rank), str(timeout_s),
                           str(startup_s)], capture_output=True, text=True, timeout=120, check=False)


def _dumps(tmp_path: Path, rank: int) -> list[Path]:
    return sorted((tmp_path / "run" / "hangs").glob(f"rank-{rank}-*.txt"))


def _idle_reported(dump: Path) -> float:
    return float(re.search(r"no progress for (\d+) s", dump.read_text().splitlines()[0]).group(1))


def test_a_stuck_step_dumps_every_thread_and_exits_with_the_hang_code(tmp_path):
    proc = _run(tmp_path, """
        def stuck_waiting_for_a_peer():
            threading.Event().wait()          # never set: the step makes no progress

        def loader_thread():
            threading.Event().wait()

        threading.Thread(target=loader_thread, daemon=True).start()
        dog = Watchdog(run_dir, rank, timeout_s, startup_s)
        for step in range(1, 4):
            dog.step_started()
            time.sleep(0.05)
            dog.beat(step)
        dog.step_started()
        stuck_waiting_for_a_peer()
        """, rank=3, timeout_s=1.0, startup_s=30)
    assert proc.returncode == EXIT_HUNG, proc.stderr
    (dump,) = _dumps(tmp_path, 3)
    text = dump.read_text()
    assert text.startswith("rank 3 on "), text
    assert "in step 4 (limit 1 s)" in text
    assert 1 <= _idle_reported(dump) <= 3
    # Every thread, with the frame the main thread is stuck in and the other thread's frame.
    assert "stuck_waiting_for_a_peer" in text and "loader_thread" in text and "_watch" in text
    assert f"exiting with {EXIT_HUNG}" in proc.stderr and str(dump) in proc.stderr


def test_start_up_has_its_own_allowance(tmp_path):
    # Start-up (1.5 s) is longer than the step limit (0.5 s) but within the start-up allowance: no trip; the
    # steps after it are quick; the process ends normally.
    proc = _run(tmp_path, """
        dog = Watchdog(run_dir, rank, timeout_s, startup_s)
        time.sleep(1.5)
        for step in range(1, 6):
            dog.step_started()
            time.sleep(0.05)
            dog.beat(step)
        time.sleep(0.2)
        dog.stop()
        time.sleep(1.0)                       # stopped: idle time no longer counts
        print("finished")
        """, rank=0, timeout_s=0.5, startup_s=10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "finished"
    assert _dumps(tmp_path, 0) == []


def test_a_start_up_that_never_completes_a_step_trips_the_start_up_allowance(tmp_path):
    proc = _run(tmp_path, """
        dog = Watchdog(run_dir, rank, timeout_s, startup_s)
        def rendezvous_that_never_completes():
            time.sleep(60)
        rendezvous_that_never_completes()
        """, rank=1, timeout_s=30, startup_s=1.0)
    assert proc.returncode == EXIT_HUNG, proc.stderr
    (dump,) = _dumps(tmp_path, 1)
    assert "in start-up (before the first step completed) (limit 1 s)" in dump.read_text()
    assert "rendezvous_that_never_completes" in dump.read_text()


def test_a_zero_timeout_turns_the_watchdog_off(tmp_path):
    proc = _run(tmp_path, """
        dog = Watchdog(run_dir, rank, timeout_s, startup_s)
        dog.beat(1)
        time.sleep(1.0)
        print("alive")
        """, rank=0, timeout_s=0, startup_s=0.2)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr


GLOO_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from hgrn_megatron.pretrain.watchdog import Watchdog
rank, run_dir = int(os.environ["RANK"]), sys.argv[1]
dist.init_process_group("gloo", rank=rank, world_size=2)
dog = Watchdog(run_dir, rank, timeout_s=1.5 if rank == 0 else 600, startup_s=600)
for step in range(1, 4):
    dog.step_started()
    t = torch.ones(4)
    dist.all_reduce(t)
    dog.beat(step)
dog.step_started()
if rank == 1:
    print("rank 1 stops taking part", flush=True)
    time.sleep(120)                           # as a stopped (SIGSTOP) process: never reaches the collective
t = torch.ones(4)
dist.all_reduce(t)
"""


@pytest.mark.distributed
def test_the_peer_waiting_in_a_collective_names_it_in_its_dump(tmp_path):
    """A stopped rank cannot run its own watchdog: the rank waiting for it in the collective trips instead, and
    its dump shows the collective it waits in."""
    script = tmp_path / "peer.py"
    script.write_text(GLOO_PEER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        assert procs[0].wait(timeout=90) == EXIT_HUNG, procs[0].stdout.read()
    finally:
        procs[1].kill()
        procs[1].wait()
    (dump,) = _dumps(tmp_path, 0)
    text = dump.read_text()
    assert "in step 4" in text
    assert re.search(r'File ".*distributed_c10d\.py", line \d+ in all_reduce', text), text
    assert _dumps(tmp_path, 1) == []


def _collective_after_shorter_timeout():
    import torch
    import torch.distributed as dist

    from hgrn_megatron.pretrain.distributed import set_collective_timeout

    changed = set_collective_timeout(2 / 60)  # 2 s
    if dist.get_rank() == 1:
        time.sleep(6)  # misses the collective
        return changed, None
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(2))
    except RuntimeError as err:
        return changed, (time.monotonic() - started, str(err))
    return changed, "the collective returned"


@pytest.mark.distributed
def test_the_collective_timeout_can_be_shortened_after_start_up():
    """init_process_group's timeout (30 min by default) applies until set_collective_timeout changes it."""
    (changed0, outcome), (changed1, _) = run_distributed(_collective_after_shorter_timeout, world_size=2, timeout=90)
    assert changed0 >= 1 and changed1 >= 1
    assert isinstance(outcome, tuple), outcome
    waited, message = outcome
    assert waited < 60, f"the collective waited {waited:.0f} s: the 30-minute default still applied"
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
