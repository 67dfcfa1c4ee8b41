"""Sharded, atomic checkpoints and resume.

Layout of one checkpoint (`RUN_DIR/checkpoints/step-NNNNNNNN/`):
    ds/                  DeepSpeed's own tag folder: per-rank model and ZeRO optimizer shards
    rng/rank-RRRRR.pt    every rank's python/numpy/torch/cuda RNG states
    data_state.pt        the data pipeline's global state (merged from every rank)
    run_state.json       the run's progress and layout (`pretrain.train_state`: step, consumed samples/tokens,
                         world and parallel sizes, tokenizer sha256, ...)
    config.yaml          the resolved run config
    manifest.json        every file with its size, and sha256 of the small files; written last
The folder is written as `step-NNNNNNNN.tmp/` and renamed only after every rank has finished; `latest` (a text
file naming the folder) is replaced atomically after the rename. Resume picks the newest folder whose manifest
checks out and falls back to older ones, with a warning, when the newest is torn or corrupt.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ..tokenizer import sha256_file

if TYPE_CHECKING:
    from .config import CheckpointConfig

log = logging.getLogger(__name__)

DS_TAG = "ds"
DS_UNIVERSAL_TAG = "ds_universal"
MANIFEST = "manifest.json"
SMALL_FILE_BYTES = 16 * 2**20  # files below this get a checksum in the manifest (shards get a size)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------- small atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's (its entries') writes to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- RNG
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


# ---------------------------------------------------------------- manifest
def write_manifest(ckpt_dir: Path) -> None:
    files = {}
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(ckpt_dir).as_posix()
        if rel == MANIFEST:
            continue
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if entry["bytes"] < SMALL_FILE_BYTES:
            entry["sha256"] = sha256_file(path)
        files[rel] = entry
    atomic_write_bytes(ckpt_dir / MANIFEST, json.dumps({"files": files}, indent=1).encode())


def verify_checkpoint(ckpt_dir: Path) -> str | None:
    """None if `ckpt_dir` is complete and intact, else the reason it is not."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (torn write?)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest.json ({err})"
    for rel, entry in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"missing file {rel}"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{rel} has {size} bytes, manifest says {entry['bytes']}"
        if "sha256" in entry and sha256_file(path) != entry["sha256"]:
            return f"{rel} checksum mismatch"
    if not any(f.startswith(DS_TAG + "/") for f in files):
        return "no DeepSpeed shards"
    return None


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished-looking checkpoint folder, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_resume_checkpoint(ckpt_root: Path) -> Path | None:
    """Newest checkpoint that verifies; older ones are tried, with a warning, if newer ones are torn."""
    for _step, path in list_checkpoints(ckpt_root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is not usable (%s); trying an older one", path, problem)
    return None


def resolve_checkpoint_arg(resume: str, ckpt_root: Path) -> Path | None:
    """`auto` → newest valid checkpoint (or None for a fresh run); `none` → None; a path → that checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume_checkpoint(ckpt_root)
    path = Path(resume)
    if path.is_dir() and not _STEP_DIR.match(path.name):
        chosen = find_resume_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if chosen is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint found there")
        return chosen
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"--resume {resume}: checkpoint is not usable ({problem})")
    return path


# ---------------------------------------------------------------- save
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


def save_checkpoint(
    engine, ckpt_root: Path, step: int, run_state: dict, data_state: Any, config_yaml: str,
    retention: RetentionPolicy,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    rank = dist.get_rank()
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    names = [name for name, _ in engine.module.named_parameters()]
    info = universal_checkpoint_info(names, run_state["vocab_size"])
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={UNIVERSAL_CHECKPOINT_INFO: info}, save_latest=False)
    atomic_torch_save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        atomic_torch_save(data_state, tmp / "data_state.pt")
        atomic_write_bytes(tmp / "run_state.json", json.dumps(run_state, indent=1).encode())
        atomic_write_bytes(tmp / "config.yaml", config_yaml.encode())
    # DeepSpeed does not sync its writes, and retention deletes the previous checkpoint right after this one is
    # renamed into place: every rank flushes its node's dirty data first (one call per rank, where an fsync
    # per file would cost every rank an open of every shard on a shared filesystem).
    os.sync()
    dist.barrier()
    if rank == 0:
        write_manifest(tmp)
        if final.exists():  # an earlier, possibly torn, save of the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_root)
        atomic_write_bytes(ckpt_root / "latest", (final.name + "\n").encode())
        apply_retention(ckpt_root, retention)
    dist.barrier()
    return final


# ---------------------------------------------------------------- retention
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


def apply_retention(ckpt_root: Path, policy: RetentionPolicy) -> None:
    """Delete the checkpoints `policy` drops, and the `.tmp` folders of saves that never finished. Rank 0."""
    by_step = dict(list_checkpoints(ckpt_root))
    for step in policy.steps_to_delete(list(by_step)):
        shutil.rmtree(by_step[step], ignore_errors=True)
    for stale in ckpt_root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


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
    _fsync(ckpt_root)
    return target


# ---------------------------------------------------------------- load
def read_run_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "run_state.json").read_text())


def convert_to_universal(ckpt_dir: Path) -> None:
    """Rank 0: DeepSpeed's universal checkpoint (world-size independent), written once beside `ds/`."""
    out = ckpt_dir / DS_UNIVERSAL_TAG
    if out.is_dir():
        return
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = ckpt_dir / (DS_UNIVERSAL_TAG + ".tmp")
    source = ckpt_dir / (DS_TAG + ".universal-input")
    for stale in (tmp, source):
        shutil.rmtree(stale, ignore_errors=True)
    # megatron modules keep an `_extra_state` entry (None) in their state dicts, which the converter cannot
    # write; it reads a view of `ds/` whose model-state files drop those entries (ZeRO shards are symlinked).
    source.mkdir()
    for path in (ckpt_dir / DS_TAG).iterdir():
        if path.name.endswith("model_states.pt"):
            state = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(state.get("module"), dict):
                state["module"] = {k: v for k, v in state["module"].items() if v is not None}
            torch.save(state, source / path.name)
        else:
            os.symlink(path.resolve(), source / path.name)
    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    try:
        ds_to_universal(args)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    os.replace(tmp, out)


def load_checkpoint(engine, ckpt_dir: Path, universal: bool) -> None:
    """Collective: load model + optimizer shards (universal format when the world size changed) and this
    rank's RNG state (same world size only: otherwise the RNG streams are re-seeded by the caller)."""
    rank = dist.get_rank()
    if universal:
        if rank == 0:
            convert_to_universal(ckpt_dir)
        dist.barrier()
        tag = DS_UNIVERSAL_TAG
    else:
        tag = DS_TAG
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    if not universal:
        set_rng_state(torch.load(ckpt_dir / "rng" / f"rank-{rank:05d}.pt", weights_only=False))


def load_data_state(ckpt_dir: Path) -> Any:
    return torch.load(ckpt_dir / "data_state.pt", weights_only=True)
