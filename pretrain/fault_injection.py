"""Faults injected on purpose, for the tests that prove the trainer survives them. Never part of the run config.

`HGRN_FAULT_INJECTION` holds a JSON object; unknown keys are an error, so a typo cannot silently test nothing:
    {"nonfinite_at_steps": [3, 4]}        multiply the loss of these (1-based) steps by NaN
    {"kill_at_step": 5, "kill_rank": 1}   that rank sends itself SIGKILL when step 5 starts (a dead rank)
    {"preempt_validation_at_step": 2}     every rank sends itself SIGUSR1 as the validation of step 2 starts
    {"kill_during_save_at_step": 4, "kill_rank": 0}   that rank is SIGKILLed right after the save of step 4
                                          started (with checkpoint.async_save, while its shards are being written)
"""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field, fields

ENV_VAR = "HGRN_FAULT_INJECTION"


@dataclass(frozen=True)
class FaultInjection:
    nonfinite_at_steps: frozenset[int] = field(default_factory=frozenset)
    kill_at_step: int | None = None
    kill_rank: int = 0
    preempt_validation_at_step: int | None = None
    kill_during_save_at_step: int | None = None

    @classmethod
    def from_env(cls) -> FaultInjection:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        try:
            spec = json.loads(raw)
            unknown = set(spec) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            return cls(**{**spec, "nonfinite_at_steps": frozenset(int(s) for s in spec.get("nonfinite_at_steps", []))})
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{ENV_VAR}={raw!r}: {err}") from None

    def poisons(self, step: int) -> bool:
        """Whether the loss of optimizer step `step` (1-based) is to be made non-finite."""
        return step in self.nonfinite_at_steps

    def maybe_kill(self, step: int, rank: int) -> None:
        """SIGKILL this process if it is the rank chosen to die when `step` (1-based) starts."""
        if self.kill_at_step == step and self.kill_rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_preempt_validation(self, step: int) -> None:
        """SIGUSR1 to this process if the validation of `step` is to be interrupted by a preemption notice."""
        if self.preempt_validation_at_step == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    def maybe_kill_during_save(self, step: int, rank: int) -> None:
        """SIGKILL this process if it is the rank chosen to die just after the save of `step` started."""
        if self.kill_during_save_at_step == step and self.kill_rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)
