import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hgrn_megatron.testing.distributed import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t.item(), "world": dist.get_world_size(), "pid": os.getpid()}


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one exploded on purpose")
    return "fine"


def _rank1_hangs():
    if dist.get_rank() == 1:
        time.sleep(3600)
    return "fine"


def _returns_tensor():
    return torch.full((3,), float(dist.get_rank()))


def test_two_ranks_all_reduce():
    results = run_distributed(_all_reduce_rank, world_size=2, timeout=60)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 3.0 and r["world"] == 2 for r in results)
    assert results[0]["pid"] != results[1]["pid"] != os.getpid()


def test_tensors_come_back():
    results = run_distributed(_returns_tensor, world_size=2, timeout=60)
    assert torch.equal(results[1], torch.ones(3))


def test_failing_rank_reports_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_rank1_raises, world_size=2, timeout=60)
    msg = str(info.value)
    assert "[rank 1]" in msg and "ValueError: rank one exploded on purpose" in msg and "_rank1_raises" in msg


def test_hanging_rank_is_killed_within_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"ranks \[.*1\] did not finish within 5 s"):
        run_distributed(_rank1_hangs, world_size=2, timeout=5)
    assert time.monotonic() - start < 15


def _start_a_child_and_leave_it():
    import multiprocessing

    multiprocessing.current_process().daemon = False  # ranks are daemonic; daemonic processes may not fork
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
    child.start()
    return child.pid


def _state(pid: int) -> str:
    """The process state letter from /proc (Z: exited, not yet reaped); "" if it is gone meanwhile."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, IndexError):
        return ""


def test_children_a_rank_leaves_behind_are_stopped():
    """A rank that starts a process and returns (as megatron's async checkpoint writer does with its Manager
    server) must not leave it running after the test."""
    pids = run_distributed(_start_a_child_and_leave_it, world_size=2, timeout=60)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]
        time.sleep(0.1)
    assert not alive, f"children still running: {alive}"
