"""Weights & Biases beside TensorBoard: a real offline W&B run (files under RUN_DIR/wandb, read back from the
run file), the same scalars as TensorBoard, one W&B run id per run directory across resumes, the resolved
config as the run config; TensorBoard tags without the repeated prefix and without the non-curves."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.pretrain import EXIT_CONFIG_ERROR
from hgrn_megatron.pretrain.config import WandbConfig, load_config
from hgrn_megatron.pretrain.metrics import MetricsWriter, scalar_tags

from .wandb_file import history, run_info

pytest.importorskip("wandb")
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "hgrn-1b.yaml")


def _train_record(step: int) -> dict:
    return {"split": "train", "step": step, "total_steps": 4, "loss": 10.0 / step, "lr": 1e-3 * step,
            "mfu": None, "eta_s": 4.0 - step}


def _log(run_dir: Path, steps, start_step: int, run_config: dict) -> None:
    writer = MetricsWriter(run_dir, tensorboard=True, enabled=True, start_step=start_step,
                           wandb=WandbConfig(mode="offline", project="test"), run_config=run_config)
    for step in steps:
        writer.write(_train_record(step))
    writer.write({"split": "val", "step": steps[-1], "val_loss": 1.5, "val_ppl": 4.48, "val_loss/Pile-CC": 1.25},
                 prefix="val")
    writer.close()


def _tensorboard_tags(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_offline_wandb_run_has_the_scalars_and_a_resume_continues_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    _log(run_dir, [1, 2, 3], 0, {"model": {"preset": "tiny"}})
    _log(run_dir, [3, 4], 2, {"model": {"preset": "tiny"}})  # resumed from a step-2 checkpoint: 3 is re-logged
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    first, second = (run_info(f) for f in files)
    assert first[0] == second[0] == run_id
    assert first[1]["model"] == {"preset": "tiny"}
    logged = [h for f in files for h in history(f)]
    train = [(h["step"], h["train/loss"], h["train/lr"]) for h in logged if "train/loss" in h]
    assert train == [(s, 10.0 / s, pytest.approx(1e-3 * s)) for s in (1, 2, 3, 3, 4)]
    assert all("train/total_steps" not in h and "train/eta_s" not in h and "train/mfu" not in h for h in logged)
    val = [h for h in logged if "val/loss" in h]
    assert [(h["step"], h["val/loss"], h["val/loss/Pile-CC"], h["val/ppl"]) for h in val] == [
        (3, 1.5, 1.25, 4.48), (4, 1.5, 1.25, 4.48)]
    # TensorBoard: the same tags; the resume purged the re-logged step
    tags = _tensorboard_tags(run_dir)
    assert set(tags) == {"train/loss", "train/lr", "val/loss", "val/ppl", "val/loss/Pile-CC"}
    assert [s for s, _ in tags["train/loss"]] == [1, 2, 3, 4]
    # metrics.jsonl keeps its keys
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"total_steps", "eta_s", "val_loss", "val_loss/Pile-CC"} <= {k for r in records for k in r}


def test_scalar_tags_drop_the_repeated_prefix_only():
    assert scalar_tags({"step": 5, "val_loss": 1.0, "val_loss/a": 2.0, "val_tokens": 7, "split": "val"}, "val") == {
        "val/loss": 1.0, "val/loss/a": 2.0, "val/tokens": 7}
    assert scalar_tags({"step": 5, "loss": 1.0, "valid": True, "eta_s": 3.0, "total_steps": 9}, "train") == {
        "train/loss": 1.0}


def test_a_missing_wandb_package_is_a_one_line_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what the import system sees without the package
    with pytest.raises(ConfigError, match=r"logging\.wandb.*pip install 'hgrn-megatron\[wandb\]'"):
        load_config(CONFIG, ["logging.wandb.mode=offline"])
    from hgrn_megatron.pretrain.__main__ import main

    assert main(["--config", CONFIG, "--dry-run", "--world-size", "64", "logging.wandb.mode=offline"]) == \
        EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "pip install 'hgrn-megatron[wandb]'" in err and "Traceback" not in err
    assert load_config(CONFIG, ["logging.wandb.mode=disabled"]).logging.wandb.mode == "disabled"


def test_a_wandb_run_that_cannot_start_is_reported_and_training_logs_on(tmp_path, monkeypatch, caplog):
    """Online without an API key (HOME without a netrc): W&B refuses before any network access."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir, tensorboard=False, enabled=True, wandb=WandbConfig(mode="online"))
    writer.write(_train_record(1))
    writer.close()
    assert "Weights & Biases not started" in caplog.text and "API key" in caplog.text
    assert json.loads((run_dir / "metrics.jsonl").read_text())["loss"] == 10.0
