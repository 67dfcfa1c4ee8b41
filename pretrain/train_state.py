"""What a run is, and how far it got: the one schema `run_state.json` holds in every checkpoint.

`RunLayout` describes the job that wrote a checkpoint (world, TP/DP sizes, ZeRO stage, tokenizer, vocabulary);
`TrainState` is the progress that a resume continues (step, consumed samples and tokens, skipped steps, the
non-finite streak, the last validation, a validation that a preemption interrupted, and the partial sums of the
current logging interval). The trainer owns one `TrainState`; the checkpoint writes both as one JSON object and
resume and export read them back with `from_run_state`, which gives every key an older checkpoint lacks its
default. The data pipeline's position travels beside them in `data_state.pt` (see `pretrain.data.state`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RUN_STATE_FORMAT = 3
"""1: first version; 2: the DeepSpeed checkpoint records its TP merge rules (a TP change can resume from it);
3: the logging interval's partial sums and an interrupted validation are saved."""


@dataclass(frozen=True)
class RunLayout:
    """The job that wrote a checkpoint: what a resume at another size or with another tokenizer must compare."""

    world_size: int
    dp_size: int  # data-parallel replicas of the model (sequences read in parallel)
    tp_size: int
    zero_stage: int
    tokenizer_sha256: str
    vocab_size: int
    padded_vocab_size: int
    cp_size: int = 1  # ranks sharing each sequence (run-state format 3; earlier runs had none)

    @property
    def zero_partitions(self) -> int:
        """Ranks over which DeepSpeed averages gradients and partitions ZeRO state: DP x CP."""
        return self.dp_size * self.cp_size


@dataclass
class TrainState:
    """Progress of a run, identical on every rank (every field is agreed by a collective or counted alike)."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0  # a streak goes on across a requeue
    last_val_loss: float | None = None
    validation_due: bool = False  # the validation of `step` was preempted: run it first after the resume
    # The logging interval in progress (steps since the last train record), so that the mean loss logged after a
    # resume covers the same steps as an uninterrupted run's.
    interval_loss_sum: float = 0.0
    interval_applied: int = 0
    interval_skipped: int = 0

    def record_step(self, loss: float, applied: bool, samples: int, tokens: int) -> None:
        """Count one optimizer step; `applied` is False for a skipped (non-finite) update."""
        self.step += 1
        self.consumed_samples += samples
        self.consumed_tokens += tokens
        if applied:
            self.nonfinite_in_a_row = 0
            self.interval_loss_sum += loss
            self.interval_applied += 1
        else:
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            self.interval_skipped += 1

    def take_interval(self) -> tuple[float, int]:
        """(mean loss of the applied steps, skipped steps) since the last call; starts the next interval."""
        mean = self.interval_loss_sum / self.interval_applied if self.interval_applied else float("nan")
        skipped = self.interval_skipped
        self.interval_loss_sum, self.interval_applied, self.interval_skipped = 0.0, 0, 0
        return mean, skipped

    @classmethod
    def from_run_state(cls, saved: dict[str, Any]) -> TrainState:
        """The progress in a `run_state.json` of any format; keys an older format lacks take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def run_state_dict(state: TrainState, layout: RunLayout) -> dict[str, Any]:
    """The JSON object a checkpoint writes as `run_state.json`."""
    return {"format": RUN_STATE_FORMAT, **dataclasses.asdict(state), **dataclasses.asdict(layout)}


def saved_layout(saved: dict[str, Any]) -> RunLayout:
    """The layout recorded in a `run_state.json`; fields newer than its format take their defaults."""
    return RunLayout(**{f.name: saved[f.name] for f in dataclasses.fields(RunLayout) if f.name in saved})
