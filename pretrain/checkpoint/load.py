"""Choosing and loading a checkpoint on resume.

Rank 0 lists the candidates (`resume_candidates`: the newest first, each passing the cheap check of its manifest's
names and sizes); every rank then checks the content of its share of the chosen one's files (`content_problem`,
the files it is about to read), and the ranks agree; a checkpoint whose content or load fails is skipped for the
next older one. Checkpoints that exist but of which none is usable are an error, never a silent fresh start.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .files import CheckpointError
from .manifest import check_content, check_sizes, read_manifest, share_of
from .retention import is_step_dir_name, list_checkpoints
from .save import DS_TAG, set_rng_state

log = logging.getLogger(__name__)

DS_UNIVERSAL_TAG = "ds_universal"


def verify_checkpoint(ckpt_dir: Path, content: bool = True) -> str | None:
    """None if `ckpt_dir` is complete and intact, else why not: the manifest, every file's size and (with
    `content`) every byte against its digest. One process reads everything: for tools; resume shares the work."""
    files, problem = read_manifest(ckpt_dir)
    if problem:
        return problem
    if not any(f.startswith(DS_TAG + "/") for f in files):
        return "no DeepSpeed shards"
    return check_sizes(ckpt_dir, files) or (check_content(ckpt_dir, files) if content else None)


def content_problem(ckpt_dir: Path, rank: int, world: int) -> str | None:
    """Why this rank's share of `ckpt_dir`'s files does not match the manifest's digests (None: it does)."""
    files, problem = read_manifest(ckpt_dir)
    return problem or check_content(ckpt_dir, share_of(files, rank, world))


def find_resume_checkpoint(ckpt_root: Path, content: bool = True) -> Path | None:
    """Newest checkpoint that verifies; older ones are tried, with a warning, if newer ones are torn."""
    for _, path in list_checkpoints(ckpt_root):
        problem = verify_checkpoint(path, content=content)
        if problem is None:
            return path
        log.warning("checkpoint %s is not usable (%s); trying an older one", path, problem)
    return None


def resume_candidates(resume: str, ckpt_root: Path) -> list[Path]:
    """Rank 0: the checkpoints to try, newest first: `none` → none; `auto` → every checkpoint under `ckpt_root`
    whose manifest, names and sizes check out (CheckpointError if some exist and none does); a run directory or
    a checkpoint folder → that one (or its newest)."""
    if resume == "none":
        return []
    path = Path(resume)
    if resume != "auto" and not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if resume != "auto" and is_step_dir_name(path.name):
        problem = verify_checkpoint(path, content=False)
        if problem:
            raise CheckpointError(f"--resume {resume}: checkpoint is not usable ({problem})")
        return [path]
    root = ckpt_root if resume == "auto" else (path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    found, skipped = [], []
    for _, candidate in list_checkpoints(root):
        problem = verify_checkpoint(candidate, content=False)
        if problem:
            log.warning("checkpoint %s is not usable (%s); trying an older one", candidate, problem)
            skipped.append(f"{candidate.name}: {problem}")
        else:
            found.append(candidate)
    if skipped and not found:
        raise unusable_error(root, skipped)
    if resume != "auto" and not found:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint found there")
    return found


def unusable_error(root: Path, reasons: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{root}: {len(reasons)} checkpoint(s) exist but none is usable ({'; '.join(reasons[:3])}); to start the "
        "run afresh, pass --resume none (the checkpoints are then set aside under checkpoints/abandoned/)"
    )


# Model settings a resume may change: they decide how the same parameters are computed or stored, not what they are.
RESUMABLE_MODEL_CHANGES = frozenset(
    {"preset", "scan_backend", "recompute_granularity", "recompute_method", "recompute_num_layers",
     "loss_chunk_tokens"}
)


# A new training phase from a checkpoint may also change the sequence length and the document handling.
NEW_PHASE_MODEL_CHANGES = RESUMABLE_MODEL_CHANGES | {"seq_length", "reset_at_document_boundary"}


def model_differences(ckpt_dir: Path, model_cfg, allowed: frozenset[str] = RESUMABLE_MODEL_CHANGES) -> list[str]:
    """`field: saved X, now Y` for every model setting that differs from the checkpoint's `config.yaml` (other than
    those in `allowed`); settings newer than the checkpoint compare as their defaults."""
    import yaml

    try:
        saved = (yaml.safe_load((ckpt_dir / "config.yaml").read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []  # no readable config (a hand-made checkpoint): the load itself will say what does not fit
    saved = {**type(model_cfg)().model_dump(mode="json"), **saved}
    now = model_cfg.model_dump(mode="json")
    return [f"model.{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in sorted(now)
            if k not in allowed and saved.get(k) != now[k]]


def read_run_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "run_state.json").read_text())


def convert_to_universal(ckpt_dir: Path, workers: int = 1) -> None:
    """DeepSpeed's universal checkpoint (world-size independent), written once beside `ds/`, by `workers`
    processes (`universal.convert`). More than one worker forks: call it from a fresh process (`hgrn-checkpoint
    reshard`), not one whose OpenMP or communication threads a forked worker could find locked."""
    from .universal import convert

    out = ckpt_dir / DS_UNIVERSAL_TAG
    if out.is_dir():
        return
    tmp = ckpt_dir / (DS_UNIVERSAL_TAG + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(ckpt_dir / DS_TAG, tmp, workers)
    os.replace(tmp, out)


def conversion_workers() -> int:
    """Processes for a universal conversion: the node's cores, up to 8."""
    return max(1, min(8, os.cpu_count() or 1))


CONVERSION_FAILED = DS_UNIVERSAL_TAG + ".failed"
_POLL_S = 2.0


def convert_in_subprocess(ckpt_dir: Path, workers: int | None = None) -> None:
    """Rank 0 of a resume: the universal conversion in a fresh process (`hgrn-checkpoint reshard`), whose worker
    pool forks safely (a trainer process holds communication and OpenMP threads that a forked worker could find
    locked); a failure is written to `ds_universal.failed` for the waiting ranks and raised here."""
    import subprocess
    import sys

    (ckpt_dir / CONVERSION_FAILED).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hgrn_megatron.pretrain.checkpoint.reshard", "reshard", str(ckpt_dir),
           "--workers", str(workers or conversion_workers())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        (ckpt_dir / CONVERSION_FAILED).write_text(reason + "\n")
        raise CheckpointError(f"{ckpt_dir}: universal conversion failed: {reason}")


def wait_for_conversion(ckpt_dir: Path) -> None:
    """Ranks other than 0: wait for rank 0's conversion by watching the folder, not in a collective whose
    timeout a long conversion could outlive."""
    import time

    while not (ckpt_dir / DS_UNIVERSAL_TAG).is_dir():
        if (ckpt_dir / CONVERSION_FAILED).is_file():
            raise CheckpointError(f"{ckpt_dir}: universal conversion failed on rank 0: "
                                  f"{(ckpt_dir / CONVERSION_FAILED).read_text().strip()}")
        time.sleep(_POLL_S)


def load_checkpoint(engine, ckpt_dir: Path, universal: bool, weights_only: bool = False,
                    optimizer: bool = True) -> None:
    """Collective: load model + optimizer shards (universal format when the layout changed) and this rank's RNG
    state (same layout only: otherwise the RNG streams are re-seeded by the caller). `weights_only`: the start of
    a new phase: the weights (and with `optimizer` the AdamW state), never the RNG."""
    rank = dist.get_rank()
    if universal:
        if (ckpt_dir / DS_UNIVERSAL_TAG).is_dir():
            pass  # converted before (an earlier attempt, or `hgrn-checkpoint reshard` ahead of the job)
        elif rank == 0:
            convert_in_subprocess(ckpt_dir)
        else:
            wait_for_conversion(ckpt_dir)
        dist.barrier()
        tag = DS_UNIVERSAL_TAG
    else:
        tag = DS_TAG
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False,
                                          load_optimizer_states=optimizer, load_module_only=not optimizer)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    if not universal and not weights_only:
        set_rng_state(torch.load(ckpt_dir / "rng" / f"rank-{rank:05d}.pt", weights_only=False))


def load_data_state(ckpt_dir: Path) -> Any:
    return torch.load(ckpt_dir / "data_state.pt", weights_only=True)
