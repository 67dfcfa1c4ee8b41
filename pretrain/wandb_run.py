"""The Weights & Biases run of a run directory: one W&B run id per RUN_DIR, continued by every resume."""
from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb_run_id"


def run_id(run_dir: Path) -> str:
    """The W&B run id of `run_dir`: the one recorded by an earlier attempt, or a new one, recorded now
    (tmp + rename, so a crash never leaves half an id)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file() and (recorded := path.read_text().strip()):
        return recorded
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


def start_wandb_run(run_dir: Path, cfg: Any, run_config: dict[str, Any]):
    """Start (or continue, resume="allow") the W&B run of `run_dir`; its files go to RUN_DIR/wandb."""
    import wandb

    run = wandb.init(
        project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.resolve().name, mode=cfg.mode,
        id=run_id(run_dir), resume="allow", dir=str(run_dir), config=run_config,
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def finish_wandb_run(run) -> None:
    """Finish the run and stop W&B's background service: `finish` alone can return before the service wrote
    the last records to the run file (seen with offline runs), so a run file could end short."""
    import wandb

    run.finish()
    wandb.teardown()
