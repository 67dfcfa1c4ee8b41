"""The DeepSpeed checkpoint engine this project saves and loads through.

DeepSpeed writes every model and optimizer shard through `engine.checkpoint_engine` (its pluggable checkpoint
engines); this one is DeepSpeed's torch.save engine with three additions:
- the rank that wrote a file fsyncs it (nothing calls a node-wide `os.sync()`, which would also flush every other
  filesystem of the node, NFS homes included);
- it records each file's size and XXH3-128 digest for the manifest, so a resume can check every byte;
- a write error (a full disk, a quota) is recorded instead of raised: the rank goes on through DeepSpeed's
  remaining collectives without writing, and the save fails on every rank together afterwards.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from .files import describe_write_error, os_error_behind
from .manifest import record_file


class HashingCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.begin(None, 0)

    def begin(self, ckpt_dir: Path | None, rank: int) -> None:
        """Start recording the files this rank writes into `ckpt_dir`."""
        self.ckpt_dir, self.rank = ckpt_dir, rank
        self.entries: dict[str, dict] = {}
        self.error: str | None = None

    def save(self, state_dict, path: str) -> None:
        if self.error is not None:  # this save has failed already: write nothing more, fail together later
            return
        target = Path(path)
        try:
            with open(target, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:
            if (cause := os_error_behind(err)) is None:
                raise
            target.unlink(missing_ok=True)
            self.error = describe_write_error(cause, target)
            return
        if self.ckpt_dir is not None:
            rel, entry = record_file(target, self.ckpt_dir, self.rank)
            self.entries[rel] = entry


def install(engine) -> HashingCheckpointEngine:
    """Make `engine` (a DeepSpeedEngine) save through a `HashingCheckpointEngine`."""
    if not isinstance(engine.checkpoint_engine, HashingCheckpointEngine):
        engine.checkpoint_engine = HashingCheckpointEngine(engine._config)
    return engine.checkpoint_engine
