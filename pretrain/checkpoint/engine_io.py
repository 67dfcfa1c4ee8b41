"""The DeepSpeed checkpoint engine this project saves and loads through.

DeepSpeed writes every model and optimizer shard through `engine.checkpoint_engine` (its pluggable checkpoint
engines); this one is DeepSpeed's torch.save engine with four additions:
- the rank that wrote a file fsyncs it (nothing calls a node-wide `os.sync()`, which would also flush every other
  filesystem of the node, NFS homes included);
- it records each file's size and XXH3-128 digest for the manifest, so a resume can check every byte;
- a write error (a full disk, a quota) is recorded instead of raised: the rank goes on through DeepSpeed's
  remaining collectives without writing, and the save fails on every rank together afterwards;
- `background=True`: `save` only snapshots the state to host memory (tensors cloned to the CPU: the one part a
  training step waits for) and a writer thread serialises, writes, fsyncs and digests it while training goes on.
DeepSpeed's own asynchronous engine (`DecoupledCheckpointEngine`) was not used: it switches the whole process
to the `spawn` start method (the data loader forks its workers) and pickles every shard through a queue into a
second process.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from .files import describe_write_error, os_error_behind
from .manifest import record_file


class HashingCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params=None, background: bool = False):
        super().__init__(config_params)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background else None
        self._futures: list[Future] = []
        self._queued: list[tuple] = []  # snapshots taken, not yet handed to the writer
        self.begin(None, 0)

    @property
    def background(self) -> bool:
        return self._pool is not None

    def begin(self, ckpt_dir: Path | None, rank: int) -> None:
        """Start recording the files this rank writes into `ckpt_dir` (after the previous save finished)."""
        self.wait()
        self.ckpt_dir, self.rank = ckpt_dir, rank
        self.entries: dict[str, dict] = {}
        self.error: str | None = None

    def save(self, state_dict, path: str) -> None:
        if self._pool is None:
            self._write(state_dict, Path(path))
        else:  # device -> host now; written once the whole snapshot is taken (`start_writes`), so that the writer
            # thread does not compete with the snapshot for the interpreter
            self._queued.append((clone_tensors_for_torch_save(state_dict), Path(path)))

    def start_writes(self) -> None:
        """Hand the snapshots taken since `begin` to the background writer."""
        queued, self._queued = self._queued, []
        self._futures += [self._pool.submit(self._write, *item) for item in queued]

    def _write(self, state_dict, target: Path) -> None:
        if self.error is not None:  # this save has failed already: write nothing more, fail together later
            return
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

    def idle(self) -> bool:
        """True when no background write is left (always, without a background writer)."""
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Block until the background writes finished; an unexpected error of theirs is raised here."""
        if self._queued:
            self.start_writes()
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()


def install(engine, background: bool = False) -> HashingCheckpointEngine:
    """Make `engine` (a DeepSpeedEngine) save through a `HashingCheckpointEngine`."""
    current = engine.checkpoint_engine
    if not isinstance(current, HashingCheckpointEngine) or current.background != background:
        if isinstance(current, HashingCheckpointEngine):
            current.wait()
        engine.checkpoint_engine = HashingCheckpointEngine(engine._config, background=background)
    return engine.checkpoint_engine
