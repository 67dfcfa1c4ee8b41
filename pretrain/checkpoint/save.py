"""Saving a checkpoint: every rank writes and digests its own files into `step-N.tmp/`, rank 0 gathers the
manifest entries, writes the manifest and renames the folder into place."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import all_reduce_flag
from . import engine_io
from .files import (
    CheckpointWriteError,
    atomic_write_bytes,
    describe_write_error,
    fsync_path,
)
from .manifest import write_manifest
from .retention import RetentionPolicy, apply_retention, step_dir_name

DS_TAG = "ds"
log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def universal_checkpoint_info(param_names: list[str], vocab_size: int) -> dict:
    """How DeepSpeed's universal-checkpoint converter merges each parameter's TP shards (and the optimizer
    state beside it) into one tensor, from `hgrn_megatron.tp_rules`; loading re-splits them for any TP size.

    Default: concatenate along dim 0 (column-parallel weights, per-channel HGRU vectors). Listed: row-parallel
    weights and the lower-bound table (dim 1), the SwiGLU fc1 ([gate_r; up_r] per rank: two sub-parameters),
    the vocabulary (padding stripped to `vocab_size`, re-padded for the new TP size), replicated tensors
    (must agree across ranks). Patterns are exact names: the converter's strict mode rejects unused ones.
    """
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        VOCABULARY_PARAMETER_PATTERNS,
    )

    from hgrn_megatron.tp_rules import rule_for

    groups = {TP_REPLICATED_PARAMETER_PATTERNS: [], PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [],
              PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [], VOCABULARY_PARAMETER_PATTERNS: []}
    for name in param_names:
        rule = rule_for(name)
        pattern = re.escape(name) + "$"
        if rule.kind == "replicated":
            groups[TP_REPLICATED_PARAMETER_PATTERNS].append(pattern)
        elif rule.kind == "vocab":
            groups[VOCABULARY_PARAMETER_PATTERNS].append(pattern)
        elif rule.stride == 2 and rule.dim == 0:
            groups[PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0].append(pattern)
        elif rule.stride != 1:
            raise ValueError(f"universal checkpoint: no DeepSpeed merge for '{name}' (stride {rule.stride})")
        elif rule.dim == 1:
            groups[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS].append(pattern)
    info = {key: patterns for key, patterns in groups.items() if patterns}
    info[UNIVERSAL_CHECKPOINT_VERSION_KEY] = UNIVERSAL_CHECKPOINT_VERSION_VALUE
    info["original_vocab_size"] = vocab_size
    return info


def _write_own_files(writer, tmp: Path, rank: int, run_state: dict, data_state: Any, config_yaml: str) -> None:
    """The files that are ours rather than DeepSpeed's, through `writer` (now, or snapshotted for the background
    writer, which records their manifest entries with DeepSpeed's): this rank's RNG states (as they are now), and
    on rank 0 the run and data state and the config."""
    writer.save_object(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        writer.save_object(data_state, tmp / "data_state.pt")
        writer.save_bytes(json.dumps(run_state, indent=1).encode(), tmp / "run_state.json")
        writer.save_bytes(config_yaml.encode(), tmp / "config.yaml")


def _start_shards(writer, engine, tmp: Path, rank: int, run_state: dict, data_state: Any, config_yaml: str):
    """This rank's part of a save, started through `writer` (written now, or snapshotted for the background
    writer): DeepSpeed's shards, then our own files. Returns None, or why it failed."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    writer.begin(tmp, rank)
    info = universal_checkpoint_info([n for n, _ in engine.module.named_parameters()], run_state["vocab_size"])
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={UNIVERSAL_CHECKPOINT_INFO: info},
                               save_latest=False)
    except OSError as err:
        # DeepSpeed's own small writes (its recovery scripts) failed on this rank after its opening barrier: meet
        # the other ranks at its closing one, so that the collectives stay paired, and fail together later.
        dist.barrier()
        return describe_write_error(err, Path(err.filename or tmp))
    _write_own_files(writer, tmp, rank, run_state, data_state, config_yaml)
    return None


@dataclass
class _Pending:
    step: int
    tmp: Path
    problem: str | None


class Checkpointer:
    """Saves the trainer's checkpoints, synchronously or with the shard writes in the background.

    Synchronous: `save` returns once the checkpoint is in place. Background (`checkpoint.async_save`): `save`
    returns once the state is snapshotted; the checkpoint becomes `step-N/` and `latest` only when every rank's
    writes succeeded, which `poll` (collective, once per step) agrees on; a failed background save is reported
    and training goes on from the last good checkpoint. A save waits for the previous one to finish first.
    """

    def __init__(self, engine, ckpt_root: Path, retention: RetentionPolicy, background: bool = False):
        self.engine, self.ckpt_root, self.retention = engine, ckpt_root, retention
        self.writer = engine_io.install(engine, background=background)
        self.pending: _Pending | None = None

    def save(self, step: int, run_state: dict, data_state: Any, config_yaml: str) -> None:
        """Collective. Synchronous: raises CheckpointWriteError on every rank when any rank could not write."""
        self.finish(raise_on_failure=False)
        self.engine.checkpoint_engine = self.writer  # (back) in place: another Checkpointer may have saved since
        rank = dist.get_rank()
        tmp = self.ckpt_root / (step_dir_name(step) + ".tmp")
        problem = None
        if rank == 0:
            try:
                self.ckpt_root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
            except OSError as err:
                problem = describe_write_error(err, tmp)
        failed = [problem]
        dist.broadcast_object_list(failed, src=0)
        problem = failed[0]
        if problem is None:
            problem = _start_shards(self.writer, self.engine, tmp, rank, run_state, data_state, config_yaml)
        self.pending = _Pending(step, tmp, problem)
        if self.writer.background:
            self.writer.start_writes()
        else:
            self.finish(raise_on_failure=True)

    def poll(self) -> int | None:
        """Collective and cheap: commit the background save once every rank's writes are done; the step it
        committed, or None."""
        if self.pending is None or all_reduce_flag(not self.writer.idle()):
            return None
        return self.finish(raise_on_failure=False)

    def finish(self, raise_on_failure: bool = True) -> int | None:
        """Collective: wait for the pending save and commit it (rank 0: manifest, rename, `latest`, retention).
        Returns the committed step; on failure raises CheckpointWriteError, or (not `raise_on_failure`) logs it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        self.writer.wait()
        problem = pending.problem or self.writer.error
        entries = None if problem else dict(self.writer.entries)
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((entries, problem), parts, dst=0)  # every rank's entries, or its reason for failing
        outcome = [None]
        if dist.get_rank() == 0:
            final = self.ckpt_root / step_dir_name(pending.step)
            outcome = [_commit(pending.tmp, final, self.ckpt_root, parts, self.retention, pending.step)]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is None:
            return pending.step
        if raise_on_failure:
            raise CheckpointWriteError(outcome[0])
        log.error("%s; training goes on", outcome[0])
        return None


def save_checkpoint(
    engine, ckpt_root: Path, step: int, run_state: dict, data_state: Any, config_yaml: str,
    retention: RetentionPolicy,
) -> Path:
    """Collective, synchronous: a checkpoint of `step`; returns its folder. Raises CheckpointWriteError on every
    rank when any rank could not write (the partial save is removed, older checkpoints are untouched)."""
    Checkpointer(engine, ckpt_root, retention).save(step, run_state, data_state, config_yaml)
    return ckpt_root / step_dir_name(step)


def _commit(tmp: Path, final: Path, ckpt_root: Path, parts: list, retention: RetentionPolicy, step: int) -> str | None:
    """Rank 0: write the manifest and rename the folder into place, or remove it; None, or why the save failed."""
    errors = [f"rank {r}: {problem}" for r, (_, problem) in enumerate(parts) if problem]
    if not errors:
        try:
            write_manifest(tmp, {rel: e for entries, _ in parts for rel, e in entries.items()})
            if final.exists():  # an earlier, possibly torn, save of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(ckpt_root)
            atomic_write_bytes(ckpt_root / "latest", (final.name + "\n").encode())
        except OSError as err:
            errors.append(f"rank 0: {describe_write_error(err, Path(err.filename or tmp))}")
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in sorted(ckpt_root.glob("step-*")) if not p.name.endswith(".tmp")]
        return (f"could not save the checkpoint of step {step}: {errors[0]}"
                f"{f' (and {len(errors) - 1} more ranks)' if len(errors) > 1 else ''}; the partial save was "
                f"removed; the newest checkpoint on disk is {kept[-1] if kept else 'none'}")
    apply_retention(ckpt_root, retention)
    return None
