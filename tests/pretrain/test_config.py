"""Config errors are one-line messages from `hgrn-pretrain`, before any process group starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hgrn_megatron.pretrain import EXIT_CONFIG_ERROR
from hgrn_megatron.pretrain.__main__ import main
from hgrn_megatron.pretrain.config import load_config


@pytest.fixture
def config_file(tmp_path, run_tree):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_tree()))
    return path


def _error(capsys, config_file, *overrides, world_size=None, monkeypatch=None):
    if world_size:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", "0")
    assert main(["--config", str(config_file), *overrides]) == EXIT_CONFIG_ERROR
    return capsys.readouterr().err


def test_resolved_config_loads_with_preset(config_file):
    cfg = load_config(config_file, ["optimizer.lr=1e-3", "model.num_layers=3"])
    assert cfg.optimizer.lr == 1e-3 and cfg.model.num_layers == 3 and cfg.model.seq_length == 32
    ds = cfg.deepspeed_config(dp_size=2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 4


def test_deepspeed_extra_keys_pass_through(config_file):
    cfg = load_config(config_file, ['parallel.deepspeed_extra={"zero_optimization": {"reduce_bucket_size": 1000}, "x": 1}'])
    ds = cfg.deepspeed_config(dp_size=1)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000} and ds["x"] == 1


def test_unknown_key_names_closest(capsys, config_file):
    err = _error(capsys, config_file, "train.stpes=5")
    assert "train.stpes: unknown key; did you mean 'steps'?" in err


def test_unknown_section_key(capsys, config_file):
    err = _error(capsys, config_file, "optimizer.weight_decy=0.1")
    assert "optimizer.weight_decy: unknown key; did you mean 'weight_decay'?" in err


def test_wrong_type(capsys, config_file):
    err = _error(capsys, config_file, "train.steps=many")
    assert "train.steps:" in err and "integer" in err and "'many'" in err


def test_global_batch_not_divisible(capsys, config_file, monkeypatch):
    err = _error(capsys, config_file, "train.global_batch_size=6", "train.micro_batch_size=2", world_size=2,
                 monkeypatch=monkeypatch)
    assert "train.global_batch_size (6) is not divisible by micro_batch_size x data-parallel size (2 x 2 = 4)" in err


def test_tp_must_divide_hidden(capsys, config_file, monkeypatch):
    err = _error(capsys, config_file, "parallel.tensor_parallel_size=3", world_size=3, monkeypatch=monkeypatch)
    assert "3" in err and "hidden" in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == EXIT_CONFIG_ERROR
    assert "does not exist" in capsys.readouterr().err


def test_unknown_preset(capsys, config_file):
    err = _error(capsys, config_file, "model.preset=hgrn-13b")
    assert "model: unknown preset 'hgrn-13b'; choose one of: tiny," in err


def test_missing_shards_fail_before_training(capsys, config_file):
    err = _error(capsys, config_file, "data.train_shards=[/nonexistent/shards/*.jsonl.zst]")
    assert "/nonexistent/shards/*.jsonl.zst" in err


def test_dry_run_plans_a_cluster_job_without_starting_anything(capsys):
    config = str(Path(__file__).resolve().parents[2] / "configs" / "hgrn-1b.yaml")
    assert main(["--config", config, "--dry-run", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "world 64 = TP 1 x DP 64" in out and "micro-batch 4 x DP 64 x accumulation 2" in out
    assert "1,048,576 tokens/step" in out and '"gradient_accumulation_steps": 2' in out
    assert "activation recompute off" in out
    assert main(["--config", config, "--dry-run", "--world-size", "64", "model.recompute_granularity=full",
                 "model.recompute_num_layers=2"]) == 0
    assert "activation recompute full (uniform, 2 layers)" in capsys.readouterr().out
    # 512 samples do not split over 48 ranks of micro-batch 4: the same one-line error as a real launch.
    assert main(["--config", config, "--dry-run", "--world-size", "48"]) == EXIT_CONFIG_ERROR
    assert "(4 x 48 = 192)" in capsys.readouterr().err


def test_print_config_and_dry_run_work_from_a_laptop_for_a_tp2_config(capsys, monkeypatch):
    """configs/hgrn-7b.yaml has TP 2 and cluster data paths: --print-config shows it anyway, and a dry run
    without --world-size plans for its smallest world (2 ranks), on one process."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    config = str(Path(__file__).resolve().parents[2] / "configs" / "hgrn-7b.yaml")
    assert main(["--config", config, "--print-config"]) == 0
    assert "tensor_parallel_size: 2" in capsys.readouterr().out
    assert main(["--config", config, "--dry-run"]) == 0
    assert "world 2 = TP 2 x DP 1" in capsys.readouterr().out
