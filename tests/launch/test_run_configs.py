"""The shipped run configs (configs/*.yaml) load, and their batch arithmetic holds at the scale they state.

Each config's header names its submit command (`sbatch [--nodes=N] ...`, 8 GPUs per node as in
launch/slurm/pretrain.sbatch) and its tokens per step; both are checked against the config itself.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hgrn_megatron.pretrain.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("hgrn-*.yaml"))
GPUS_PER_NODE = 8  # the `--ntasks-per-node` of launch/slurm/pretrain.sbatch


def _sbatch_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.startswith("#") and "launch/slurm/pretrain.sbatch" in l]
    assert lines, "the header names no sbatch command"
    return lines[0]


def test_the_three_example_configs_ship():
    assert {p.stem for p in CONFIGS} >= {"hgrn-125m", "hgrn-1b", "hgrn-7b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_at_its_stated_scale(path):
    text = path.read_text()
    cfg = load_config(path)
    nodes = re.search(r"--nodes=(\d+)", _sbatch_line(text))
    world = (int(nodes.group(1)) if nodes else 1) * GPUS_PER_NODE
    cfg.validate_world(world)  # TP divides the world and the model; global batch divides into micro x DP
    dp = world // cfg.parallel.tensor_parallel_size
    assert cfg.data.lanes % dp == 0, "data.lanes must be a multiple of the data-parallel size"
    header = " ".join(l.lstrip("#").strip() for l in text.splitlines() if l.startswith("#"))
    stated = re.search(r"= ([\d,]+) tokens per step", header)
    assert stated, "the header states no tokens per step"
    assert int(stated.group(1).replace(",", "")) == cfg.train.global_batch_size * cfg.model.seq_length
    accumulated = re.search(r"so (\d+) micro-batches are accumulated", header)
    expected_accumulation = int(accumulated.group(1)) if accumulated else 1
    assert cfg.grad_accumulation_steps(dp) == expected_accumulation
    assert cfg.model.preset == path.stem
    assert cfg.run_dir == f"runs/{path.stem}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_global_batch_takes_each_lane_once_at_most(path):
    """Global sample j is a window of lane j mod L and a lane's samples are consecutive windows of its text:
    with fewer lanes than samples per step, a step holds global_batch_size / L adjacent windows of each lane's
    documents (64 lanes, 256 samples: 64 independent text streams per step, not 256)."""
    cfg = load_config(path)
    assert cfg.data.lanes >= cfg.train.global_batch_size, (
        f"data.lanes ({cfg.data.lanes}) < train.global_batch_size ({cfg.train.global_batch_size})")
