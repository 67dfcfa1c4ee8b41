"""Real `hgrn-pretrain` processes on a tiny config (the shipped sample and tokenizer), for the fault tests."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"
HGRN_PRETRAIN = str(Path(sys.prefix) / "bin" / "hgrn-pretrain")
WORKER_SH = REPO / "launch" / "slurm" / "worker.sh"


def tiny_config(tmp_path: Path, steps: int = 200, **sections) -> Path:
    """A config file for a tiny run (steps of ~10 ms after a start-up of seconds); `sections` update it."""
    tree = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "seq_length": 32},
        "data": {"train_shards": [str(ASSETS / "pile-mini" / "train-*.jsonl.zst")], "num_workers": 0},
        "tokenizer": {"model": str(ASSETS / "tokenizer" / "tokenizer.model")},
        "train": {"steps": steps, "global_batch_size": 2, "micro_batch_size": 1, "eval_interval": 0},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"interval": 0, "keep_last": 2},
        "logging": {"log_interval": 1, "tensorboard": False},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


class Trainer:
    """A running trainer whose combined output is collected by a thread (so a test can wait for a line)."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            full_env.pop(key, None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before '{text}':\n{self.output}"
            assert time.monotonic() < deadline, f"no '{text}' within {timeout} s:\n{self.output}"
            time.sleep(0.01)

    def signal_at(self, seconds_after_start: float, sig: int, pid: int | None = None) -> None:
        time.sleep(max(0.0, self.started + seconds_after_start - time.monotonic()))
        os.kill(pid or self.proc.pid, sig)

    def finish(self, timeout: float = 180) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=10)
        return rc


def latest_checkpoint(config: Path) -> str | None:
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def child_pid(pid: int, timeout: float = 10) -> int:
    """The first child of `pid` (the trainer under a wrapper script)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"process {pid} started no child")

