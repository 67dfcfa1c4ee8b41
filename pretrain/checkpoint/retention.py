"""Which checkpoints stay on disk: the retention policy, and setting aside the checkpoints of an abandoned run."""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import fsync_path

if TYPE_CHECKING:
    from ..config import CheckpointConfig

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_step_dir_name(name: str) -> bool:
    return bool(_STEP_DIR.match(name))


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished-looking checkpoint folder, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep: the newest `keep_last`, plus every one whose step is a multiple of
    `keep_every` (milestones a later analysis or a rollback may want)."""

    keep_last: int
    keep_every: int | None = None

    def __post_init__(self):
        if self.keep_last < 1:
            raise ValueError(f"RetentionPolicy: keep_last must be >= 1 (got {self.keep_last}); the newest "
                             "checkpoint is what a requeued job resumes from")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"RetentionPolicy: keep_every must be >= 1 or None (got {self.keep_every})")

    @classmethod
    def from_config(cls, cfg: CheckpointConfig) -> RetentionPolicy:
        return cls(cfg.keep_last, cfg.keep_every)

    def steps_to_delete(self, steps: list[int]) -> list[int]:
        """The steps among `steps` (any order) that this policy drops, in ascending order."""
        newest = sorted(steps, reverse=True)[: self.keep_last]
        kept = set(newest) | {s for s in steps if self.keep_every and s % self.keep_every == 0}
        return sorted(s for s in steps if s not in kept)


def remove_unfinished_saves(ckpt_root: Path) -> None:
    """Delete the `.tmp` folders of saves that never finished (a crash, a full disk). Rank 0."""
    for stale in ckpt_root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def apply_retention(ckpt_root: Path, policy: RetentionPolicy) -> None:
    """Delete the checkpoints `policy` drops, and unfinished saves. Rank 0."""
    by_step = dict(list_checkpoints(ckpt_root))
    for step in policy.steps_to_delete(list(by_step)):
        shutil.rmtree(by_step[step], ignore_errors=True)
    remove_unfinished_saves(ckpt_root)


def set_aside_later_checkpoints(ckpt_root: Path, step: int) -> Path | None:
    """Move the checkpoints of steps after `step` (a run resumed from an older checkpoint, or started afresh
    with --resume none, in a folder that has them) to `abandoned/after-step-N-<time>/`: kept, but neither
    resumed by a later --resume auto nor counted by retention, which would otherwise delete the new run's
    checkpoints in their favour. Rank 0 only. Returns the folder they went to, if any."""
    later = [path for s, path in list_checkpoints(ckpt_root) if s > step]
    if not later:
        return None
    target = ckpt_root / "abandoned" / f"after-{step_dir_name(step)}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(parents=True)
    for path in later:
        os.replace(path, target / path.name)
    fsync_path(ckpt_root)
    return target
