"""Preemption: signals raise a flag; every rank agrees on it at the next step boundary (or eval batch)."""
from __future__ import annotations

import signal
import time

from .distributed import all_reduce_flag


class StopRequest:
    """Collects local reasons to stop (a signal, the wall-clock budget); `agreed()` is collective."""

    def __init__(self, signals: list[str], exit_after_minutes: float | None):
        self.received: str | None = None
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        for name in signals:
            try:
                signum = getattr(signal, name)
            except AttributeError:
                raise ValueError(f"train.preemption_signals: unknown signal {name!r}") from None
            signal.signal(signum, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.received:
            return f"received {self.received}"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "wall-clock budget (train.exit_after_minutes) reached"
        return None

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank wants to stop."""
        return all_reduce_flag(self.local_reason() is not None)
