"""Preemption through the real command line: two `hgrn-pretrain` ranks (as srun starts them), SIGUSR1 to one of
them mid-run → both agree, checkpoint at the next step boundary and exit 75; a restart resumes and finishes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from hgrn_megatron.pretrain import EXIT_OK, EXIT_REQUEUE
from hgrn_megatron.testing.distributed import free_port

from .conftest import read_losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _launch(config_path, world_size=2):
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "hgrn_megatron.pretrain", "--config", str(config_path)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait_all(procs, timeout=240):
    codes, outputs = [], []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        codes.append(p.returncode)
        outputs.append(out)
    return codes, outputs


def _train_steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"split": "train"' in line)


def test_sigusr1_saves_exits_for_requeue_and_resume_finishes(tmp_path, run_tree):
    tree = run_tree(train={"steps": 40}, schedule={"decay_steps": 40})
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))

    procs = _launch(config)
    deadline = time.monotonic() + 180
    while _train_steps_logged(run_dir) < 3:
        assert time.monotonic() < deadline, "training did not start"
        assert all(p.poll() is None for p in procs), _wait_all(procs)[1]
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGUSR1)  # only rank 1 is signalled: the ranks must agree
    codes, outputs = _wait_all(procs)
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], outputs
    stopped_at = max(read_losses(run_dir))
    assert stopped_at < 40
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:08d}"
    assert "received SIGUSR1" in outputs[0] or "stop requested by a peer" in outputs[0]

    codes, outputs = _wait_all(_launch(config))
    assert codes == [EXIT_OK, EXIT_OK], outputs
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped_at:08d}'}" in outputs[0]
    losses = read_losses(run_dir)  # asserts no step was logged twice
    assert sorted(losses) == list(range(1, 41))
    final = json.loads((run_dir / "checkpoints" / "step-00000040" / "run_state.json").read_text())
    assert final["consumed_samples"] == 40 * 4
