"""Preemption: stop signals raise a flag; every rank agrees on it at the next step boundary (or eval batch).

A stop signal must never be lost, nor kill the process, from the first line of the entry point to its exit:

1. start-up: `record_early_signals()` is the entry point's first act, before torch and DeepSpeed are imported
   (seconds, minutes from a shared filesystem). It records the default stop signals instead of dying of them
   (or, under launch/slurm/worker.sh, which starts the trainer with them ignored, instead of dropping them).
2. training: `StopRequest` (built by the trainer from `train.preemption_signals`) adopts what was recorded, so a
   signal received during set-up stops the run at the first step boundary, with a checkpoint.
3. shutdown: `hold_stop_signals()` ignores the stop signals once the exit code is decided. Python resets its own
   handlers to the default action late in interpreter shutdown, so without this a TERM or USR1 arriving then
   would kill the process and hide the requeue code.

SIGINT (Ctrl-C) is a stop signal by default too. The first one also gives SIGINT back its default action, so a
second one aborts at once, whatever the process is doing (a long collective, a save), without a checkpoint: the
process dies of SIGINT (a shell reports 130).

This module imports neither torch nor anything heavy at import time: the entry point imports it first.
"""
from __future__ import annotations

import os
import signal
import threading
import time

DEFAULT_STOP_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
# Raised by the process's own faults, not sent by a scheduler to ask for a stop; a Python handler cannot resume.
_FAULTS = {"SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL"}

# Process-wide state: what the start-up recorder replaced and received, whether Ctrl-C was pressed, the signals
# handled here.
_originals: dict[int, object] = {}
_pending: list[int] = []
_interrupted = False
_handled: set[int] = set()


def signal_name_problem(name: object) -> str | None:
    """Why `name` cannot be a stop signal (None if it can): it must be a catchable signal of this platform."""
    if not isinstance(name, str) or not isinstance(getattr(signal, name, None), signal.Signals):
        valid = ", ".join(DEFAULT_STOP_SIGNALS + ("SIGHUP", "SIGUSR2", "SIGQUIT"))
        return f"unknown signal {name!r} (names like {valid})"
    if name in _UNCATCHABLE:
        return f"{name} cannot be caught: a process cannot checkpoint on it"
    if name in _FAULTS:
        return f"{name} is raised by a crash, not sent to ask for a stop"
    return None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _arm_abort_on_next_interrupt(signum: int) -> None:
    """After the first Ctrl-C, the next one ends the process in the kernel: no Python code has to run for it."""
    global _interrupted
    if signum != signal.SIGINT or _interrupted:
        return
    _interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # os.write, not print: this runs between two bytecodes of whatever the main thread was doing, maybe a print.
    os.write(2, b"hgrn-pretrain: interrupted (SIGINT): stopping with a checkpoint at the next step boundary; "
                b"interrupt again to stop now without one\n")


def _record(signum, frame) -> None:
    _arm_abort_on_next_interrupt(signum)
    _pending.append(signum)


def record_early_signals(names: tuple[str, ...] = DEFAULT_STOP_SIGNALS) -> None:
    """Record `names` from now on instead of acting on them, until a `StopRequest` adopts them."""
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        return
    for name in names:
        signum = getattr(signal, name)
        if signum not in _originals:
            _originals[signum] = signal.getsignal(signum)
            signal.signal(signum, _record)
        _handled.add(signum)


def release_early_signals() -> None:
    """Undo `record_early_signals` when no trainer adopted it (a dry run, a config error): the previous handlers
    return, and a signal recorded meanwhile is delivered to them now, meeting the fate it would have met."""
    global _interrupted
    if not _in_main_thread():
        return
    pending = list(_pending)
    _pending.clear()
    _interrupted = False
    for signum, original in _originals.items():
        signal.signal(signum, original)
        _handled.discard(signum)
    _originals.clear()
    for signum in pending:
        os.kill(os.getpid(), signum)


def hold_stop_signals() -> None:
    """Ignore every stop signal from now until the process exits: the exit code is decided."""
    if not _in_main_thread():
        return
    for signum in _handled | set(_originals):
        if not (signum == signal.SIGINT and _interrupted):  # an armed second Ctrl-C still aborts
            signal.signal(signum, signal.SIG_IGN)
    _originals.clear()  # nothing is given back or delivered later: the exit code stands
    _pending.clear()


class StopRequest:
    """Collects local reasons to stop (a signal, the wall-clock budget); `agreed()` is collective."""

    def __init__(self, signals: list[str], exit_after_minutes: float | None):
        self.received: str | None = None
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        wanted = set()
        for name in signals:
            if problem := signal_name_problem(name):
                raise ValueError(f"train.preemption_signals: {problem}")
            wanted.add(getattr(signal, name))
        if _in_main_thread():
            for signum in wanted:
                if not (signum == signal.SIGINT and _interrupted):  # already armed to abort
                    signal.signal(signum, self._handler)
            _handled.update(wanted)
            self._adopt_early_signals(wanted)

    def _adopt_early_signals(self, wanted: set[int]) -> None:
        """Signals recorded at start-up: stop requests if they are stop signals here, else delivered as before."""
        for signum, original in _originals.items():
            if signum not in wanted:
                signal.signal(signum, original)
                _handled.discard(signum)
        pending = list(_pending)
        _pending.clear()
        _originals.clear()
        for signum in pending:
            if signum in wanted:
                self._note(signum)
            else:  # not a stop signal in this config: it gets the fate it would have had without the recorder
                os.kill(os.getpid(), signum)

    def _note(self, signum: int) -> None:
        if self.received is None:  # the first reason is the one reported
            self.received = signal.Signals(signum).name

    def _handler(self, signum, frame) -> None:
        _arm_abort_on_next_interrupt(signum)
        self._note(signum)

    def local_reason(self) -> str | None:
        if self.received == "SIGINT":
            return "interrupted (SIGINT)"
        if self.received:
            return f"received {self.received}"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "wall-clock budget (train.exit_after_minutes) reached"
        return None

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank wants to stop."""
        from .distributed import all_reduce_flag  # torch: imported here, not at start-up

        return all_reduce_flag(self.local_reason() is not None)
