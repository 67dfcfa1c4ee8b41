"""Hang watchdog: a per-rank thread that ends a process whose training step stopped making progress.

A hung rank (a dead peer's collective that never returns, a wedged loader, a stuck device) would otherwise idle
the whole job until the collective timeout. The training loop reports progress (`step_started()` before a step,
`beat(step)` after it); when nothing has been reported for longer than the limit, the thread writes every
thread's Python stack to RUN_DIR/hangs/rank-R-<time>.txt and ends the process with EXIT_HUNG, which the batch
script requeues.

The limit is `startup_s` until the first `beat` (process groups, engine, checkpoint loading, the first step's
compilation) and `timeout_s` after it, so it must exceed the longest step, evaluation pass or checkpoint save.

A process that is stopped (SIGSTOP) or wedged while holding the GIL stops its own watchdog too; its peers then
wait for it inside a collective, and their watchdogs fire instead: their stack dumps name the collective.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path

from . import EXIT_HUNG


class Watchdog:
    """`Watchdog(run_dir, rank, timeout_s, startup_s)`; `.step_started()`, `.beat(step)`, `.stop()`.
    A `timeout_s` of 0 (or less) turns it off."""

    def __init__(self, run_dir: str | Path, rank: int, timeout_s: float, startup_s: float):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.timeout_s = float(timeout_s)
        self.startup_s = float(startup_s)
        self.step: int | None = None  # the last step completed, None during start-up
        self._last_progress = time.monotonic()
        self._started = False
        self._stop = threading.Event()
        self._thread = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name=f"hang-watchdog-rank{rank}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ called by the training loop
    def step_started(self) -> None:
        self._last_progress = time.monotonic()

    def beat(self, step: int) -> bool:
        """A step completed: from now on the limit is `timeout_s`. True on the first beat (start-up is over)."""
        first = not self._started
        self.step = step
        self._started = True
        self._last_progress = time.monotonic()
        return first

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------ the thread
    def limit_s(self) -> float:
        return self.timeout_s if self._started else self.startup_s

    def _watch(self) -> None:
        while True:
            # Wake often enough to fire within ~5 % of the limit, but never spin.
            if self._stop.wait(max(0.05, min(self.limit_s() / 20, 10.0))):
                return
            idle = time.monotonic() - self._last_progress
            if idle > self.limit_s():
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        where = f"step {self.step + 1}" if self._started else "start-up (before the first step completed)"
        path = self.dump_stacks(f"no progress for {idle:.0f} s in {where} (limit {self.limit_s():.0f} s)")
        sys.stderr.write(f"[watchdog rank {self.rank}] no progress for {idle:.0f} s in {where}; stacks of every "
                         f"thread in {path}; exiting with {EXIT_HUNG}\n")
        sys.stderr.flush()
        # os._exit: the main thread is stuck, so neither an exception nor atexit handlers could run.
        os._exit(EXIT_HUNG)

    def dump_stacks(self, reason: str) -> Path:
        """Every thread's Python stack (faulthandler: needs no lock the stuck thread might hold) to a new file."""
        hangs = self.run_dir / "hangs"
        hangs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = hangs / f"rank-{self.rank}-{stamp}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}): {reason}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        return path
