"""Read a training checkpoint back as one full (TP-merged) megatron state dict of fp32 master weights.

A checkpoint (`RUN_DIR/checkpoints/step-NNNNNNNN/`, layout in `hgrn_megatron.pretrain.checkpoint`) holds
DeepSpeed's tag folder `ds/` with, per tensor-parallel rank XX:
- ZeRO 0-2: `mp_rank_XX_model_states.pt` (the megatron state dict under `module`, in the training dtype);
- ZeRO 3:   `zero_pp_rank_D_mp_rank_XX_model_states.pt` per data-parallel rank D, whose `module` holds only
            empty placeholders;
- ZeRO 1-3: `[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt`, the fp32 master weights split over D.
Wherever ZeRO optimizer shards exist, DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`) rebuilds
the exact fp32 weights of each TP rank; it expects one TP rank's files alone in a folder, so each rank's files
are linked into a scratch folder first. The TP ranks are then merged by the model's partition table
(`hgrn_megatron.tp_rules.merge_state_dicts`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from hgrn_megatron.pretrain.checkpoint import DS_TAG, find_resume_checkpoint, verify_checkpoint

_MP_RANK = re.compile(r"mp_rank_(\d+)_(model|optim)_states\.pt$")


class ExportError(RuntimeError):
    """A problem with the export's input or output, as one readable message."""


@dataclass
class CheckpointContents:
    step_dir: Path
    run_state: dict
    config: dict  # the resolved run config, as saved with the checkpoint
    state_dict: dict[str, torch.Tensor]  # full megatron state dict (TP merged), fp32, padded vocabulary


def resolve_step_dir(path: str | Path) -> Path:
    """A step folder from `path`: a step folder itself, a run directory or its `checkpoints/` folder (newest
    complete checkpoint). Raises ExportError naming what is wrong when there is no usable checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ExportError(f"{path}: not a checkpoint (expected a run directory or a checkpoint step folder)")
    if (path / "manifest.json").exists() or (path / DS_TAG).is_dir():
        problem = verify_checkpoint(path)
        if problem:
            raise ExportError(f"{path}: checkpoint is not usable: {problem}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_resume_checkpoint(root)
    if found is None:
        raise ExportError(
            f"{path}: not a checkpoint: no complete step-NNNNNNNN folder (with manifest.json and DeepSpeed "
            f"shards) under {root}")
    return found


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Everything the exporter needs from a checkpoint, with TP shards merged."""
    step_dir = resolve_step_dir(path)
    try:
        run_state = json.loads((step_dir / "run_state.json").read_text())
        config = yaml.safe_load((step_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ExportError(f"{step_dir}: cannot read run_state.json / config.yaml ({err})") from None
    shards = read_tp_shards(step_dir / DS_TAG)
    if len(shards) != run_state.get("tp_size", len(shards)):
        raise ExportError(f"{step_dir}: found {len(shards)} tensor-parallel shards, run_state.json says "
                          f"tp_size={run_state['tp_size']}")
    return CheckpointContents(step_dir, run_state, config, merge_tp_shards(shards))


# Replicated tensors (block norms, row-parallel biases) are updated identically on every TP rank; a tolerance
# only absorbs last-bit differences a reduction order could introduce in a long run.
REPLICATED_ATOL = 1e-6


def merge_tp_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return shards[0]
    from hgrn_megatron.tp_rules import merge_state_dicts

    try:
        return merge_state_dicts(shards, replicated_atol=REPLICATED_ATOL)
    except (KeyError, ValueError) as err:
        reason = err.args[0] if err.args else err
        raise ExportError(f"cannot merge {len(shards)} tensor-parallel shards: {reason}") from None


def read_tp_shards(ds_dir: Path) -> list[dict[str, torch.Tensor]]:
    """One fp32 state dict per tensor-parallel rank, in rank order."""
    files: dict[int, dict[str, list[Path]]] = {}
    for f in sorted(ds_dir.iterdir()):
        m = _MP_RANK.search(f.name)
        if m:
            files.setdefault(int(m.group(1)), {"model": [], "optim": []})[m.group(2)].append(f)
    if not files:
        raise ExportError(f"{ds_dir}: no DeepSpeed model states (*mp_rank_XX_model_states.pt)")
    if sorted(files) != list(range(len(files))):
        raise ExportError(f"{ds_dir}: tensor-parallel ranks {sorted(files)} are not 0..{len(files) - 1}")
    return [_read_tp_rank(ds_dir, rank, files[rank]) for rank in range(len(files))]


def _read_tp_rank(ds_dir: Path, rank: int, files: dict[str, list[Path]]) -> dict[str, torch.Tensor]:
    zero_shards = [f for f in files["optim"] if "zero_pp_rank_" in f.name]
    if zero_shards:
        return _consolidate_zero(ds_dir, rank, files["model"] + zero_shards)
    if len(files["model"]) != 1:
        raise ExportError(f"{ds_dir}: TP rank {rank} has {len(files['model'])} model-state files and no ZeRO "
                          "optimizer shards to rebuild the weights from")
    state = _torch_load(files["model"][0])
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ExportError(f"{files['model'][0]}: no megatron state dict under 'module'")
    return {k: v.float() for k, v in module.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which one
        raise ExportError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def _consolidate_zero(ds_dir: Path, rank: int, rank_files: list[Path]) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="hgrn-export-zero-") as scratch:
        tag_dir = Path(scratch) / "tag"
        tag_dir.mkdir()
        for f in rank_files:
            os.symlink(f.resolve(), tag_dir / f.name)
        # DeepSpeed prints its progress; the exporter reports its own.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(scratch, tag="tag")
            except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
                raise ExportError(f"{ds_dir}: cannot consolidate the ZeRO shards of TP rank {rank} "
                                  f"({type(err).__name__}: {err})") from None
    return {k: v.float() for k, v in state.items()}
