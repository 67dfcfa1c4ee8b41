"""launch/local.sh (torchrun on one machine) with the stand-in trainer: ranks, checkpoint-and-stop, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from standin import read_jsonl, setup_run

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "launch" / "local.sh"


def _start(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    full_env = {**os.environ, **env, "NPROC": "2", "HGRN_VENV": sys.prefix}
    return subprocess.Popen(["bash", str(LOCAL_SH), str(config)], cwd=REPO, env=full_env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_usr1_checkpoints_exits_75_and_a_rerun_resumes(tmp_path):
    steps = 30
    run_dir, config, env = setup_run(tmp_path, steps=steps, step_seconds=0.2)
    log = tmp_path / "local.log"
    proc = _start(config, env, log)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while not (metrics.exists() and len(read_jsonl(metrics)) >= 3):
            assert proc.poll() is None, f"local.sh ended early ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 75, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = len(read_jsonl(run_dir / "metrics.jsonl"))
    assert 3 <= stopped_at < steps

    rerun = _start(config, env, log)
    assert rerun.wait(timeout=90) == 0, log.read_text()
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    for rank in (0, 1):
        first, second = read_jsonl(run_dir / "launches" / f"rank-{rank}.jsonl")
        assert (first["world"], first["torchrun"], first["start_step"]) == (2, True, 0)
        assert second["start_step"] == stopped_at
