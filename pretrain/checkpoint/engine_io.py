"""The DeepSpeed checkpoint engine this project saves and loads through.

DeepSpeed writes every model and optimizer shard through `engine.checkpoint_engine` (its pluggable checkpoint
engines); this one is DeepSpeed's torch.save engine with four additions:
- the rank that wrote a file fsyncs it (nothing calls a node-wide `os.sync()`, which would also flush every other
  filesystem of the node, NFS homes included);
- it records each file's size and XXH3-128 digest for the manifest, so a resume can check every byte;
- a write error (a full disk, a quota) is recorded instead of raised: the rank goes on through DeepSpeed's
  remaining collectives without writing, and the save fails on every rank together afterwards;
- `background=True`: `save` only snapshots the state to host memory (`snapshot.HostSnapshot`: each tensor copied
  into a host buffer kept from the previous save, the one part a training step waits for) and a writer thread
  serialises, writes, fsyncs and digests it while training goes on.
`save_object`/`save_bytes` write this project's own files (RNG, data and run state, config) the same way.
DeepSpeed's own asynchronous engine (`DecoupledCheckpointEngine`) was not used: it switches the whole process
to the `spawn` start method (the data loader forks its workers) and pickles every shard through a queue into a
second process.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from .files import describe_write_error, os_error_behind
from .manifest import record_file
from .snapshot import HostSnapshot


class HashingCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params=None, background: bool = False):
        super().__init__(config_params)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background else None
        self._futures: list[Future] = []
        self._queued: list[tuple] = []  # snapshots taken, not yet handed to the writer
        self._snapshot = HostSnapshot()
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
        """DeepSpeed's call for each of its shards."""
        self.save_object(state_dict, Path(path))

    def save_object(self, obj, target: Path) -> None:
        """`torch.save(obj)` into `target`: now, or (background) from a host snapshot taken now."""
        if self._pool is None:
            self._write(obj, target)
        else:  # written once the whole snapshot is taken (`start_writes`), so that the writer thread does not
            # compete with the copy for the interpreter and the memory bus
            self._queued.append((self._snapshot.take(obj, self._key(target)), target))

    def save_bytes(self, data: bytes, target: Path) -> None:
        """`data` (immutable: nothing to snapshot) into `target`, now or in the background."""
        if self._pool is None:
            self._write(data, target)
        else:
            self._queued.append((data, target))

    def _key(self, target: Path) -> str:
        """The same file of every save (its name inside the checkpoint) reuses the same host buffers."""
        try:
            return target.relative_to(self.ckpt_dir).as_posix()
        except (TypeError, ValueError):  # no checkpoint folder recorded, or a file outside it
            return target.name

    def start_writes(self) -> None:
        """Hand the snapshots taken since `begin` to the background writer."""
        queued, self._queued = self._queued, []
        self._futures += [self._pool.submit(self._write, *item) for item in queued]

    def _write(self, obj, target: Path) -> None:
        if self.error is not None:  # this save has failed already: write nothing more, fail together later
            return
        try:
            with open(target, "wb") as f:
                if isinstance(obj, bytes):
                    f.write(obj)
                else:
                    torch.save(obj, f, _use_new_zipfile_serialization=self.zipfile_serialization)
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
