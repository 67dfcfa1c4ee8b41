"""Run a function on N real torch.distributed ranks (gloo) and collect each rank's result.

    results = run_distributed(fn, world_size=2, args=(cfg,), timeout=120)

Each rank is a forked process (imports paid once in the parent) with MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK set and a gloo process group initialised before `fn(*args)` runs. Results travel back as pickled
bytes (tensors included). A rank that raises fails the call with that rank's traceback; a group that does not
finish within `timeout` seconds is killed and reported. This is the one way the tests start ranks.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any


class DistributedTestError(RuntimeError):
    pass


ERROR_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, args, kwargs, rank, world_size, port, threads, env, conn) -> None:
    try:
        os.environ.update(env)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
        )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(*args, **kwargs)
        finally:
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()
        message = ("ok", result)
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        message = ("error", traceback.format_exc())
    # Before reporting: once every rank has reported, the parent kills the ranks that are still alive.
    _stop_children()
    try:
        try:
            payload = pickle.dumps(message)
        except Exception:  # noqa: BLE001 - e.g. a result that does not pickle: report that instead
            payload = pickle.dumps(("error", traceback.format_exc()))
        conn.send_bytes(payload)
    finally:
        conn.close()
        os._exit(0)


def _stop_children() -> None:
    """End what the rank started and left running before `os._exit` skips the interpreter's exit handlers:
    e.g. the Manager server that megatron's async checkpoint writer spawns, which would otherwise outlive the
    test as an orphan (about 270 MB each)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=5)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results in rank order."""
    ctx = mp.get_context("fork")
    port = free_port()
    # One intra-op thread per rank by default: a child forked from a parent whose OpenMP pool is already running
    # can deadlock in its first multi-threaded kernel.
    threads = threads_per_rank or 1
    procs, conns = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_rank_main,
            args=(fn, tuple(args), kwargs or {}, rank, world_size, port, threads, env or {}, child_conn),
            daemon=True,
        )
        p.start()
        child_conn.close()
        procs.append(p)
        conns.append(parent_conn)

    results: list[Any] = [None] * world_size
    done = [False] * world_size
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while not all(done):
            if time.monotonic() >= deadline:
                if errors:
                    break  # peers of a failed rank wait in a collective forever; the errors say why
                hung = [r for r in range(world_size) if not done[r]]
                raise DistributedTestError(
                    f"ranks {hung} did not finish within {timeout:.0f} s and were killed"
                    + ("".join(f"\n--- rank error ---\n{e}" for e in errors))
                )
            for r in range(world_size):
                if done[r]:
                    continue
                if conns[r].poll(0.05):
                    try:
                        status, payload = pickle.loads(conns[r].recv_bytes())
                    except EOFError:
                        status, payload = "error", f"rank {r} exited without a result (exit code {procs[r].exitcode})"
                    done[r] = True
                    if status == "ok":
                        results[r] = payload
                    else:
                        errors.append(f"[rank {r}]\n{payload}")
                elif not procs[r].is_alive() and not conns[r].poll(0):
                    done[r] = True
                    errors.append(f"[rank {r}] died with exit code {procs[r].exitcode} and no result")
            if errors:
                # Give the other ranks a moment to report their own errors, then stop waiting.
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        for c in conns:
            c.close()
    if errors:
        raise DistributedTestError(f"{len(errors)} rank(s) failed:\n" + "\n".join(errors))
    return results
