"""launch/local.sh (torchrun on one machine) with the stand-in trainer: ranks, checkpoint-and-stop, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch.standin import read_jsonl, setup_run

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


WORKER_SH = REPO / "launch" / "slurm" / "worker.sh"


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def test_torchrun_under_the_worker_script_leaves_sigterm_to_the_trainer(tmp_path):
    """SLURM sends TERM to every process of a step. The trainer checkpoints on it; torchrun would otherwise
    catch it and kill the trainers 30 s later, so the worker script keeps it ignored there (and gives
    torchrun this task's node rank for its static rendezvous)."""
    from hgrn_megatron.testing.distributed import free_port

    trainer = tmp_path / "trainer.py"
    trainer.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('trainer got TERM', flush=True))\n"
        "print('node rank', os.environ.get('GROUP_RANK'), flush=True)\n"
        "time.sleep(4)\n"
        "print('trainer finished', flush=True)\n"
    )
    cmd = ["bash", str(WORKER_SH), sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
           "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "--no-python", sys.executable, str(trainer)]
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_NODEID", "PET_NODE_RANK")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()  # the trainer is up (torchrun's own log lines go to the same pipe)
    while first and not first.startswith("node rank"):
        first = proc.stdout.readline()
    for pid in _process_tree(proc.pid):  # as SLURM does: every process of the step (torchrun's workers run
        os.kill(pid, signal.SIGTERM)       # in sessions of their own)
    out, _ = proc.communicate(timeout=60)
    out = first + out
    assert proc.returncode == 0, out
    assert "trainer got TERM" in out and "trainer finished" in out and "node rank 0" in out

    node = subprocess.run(["bash", str(WORKER_SH), "printenv", "PET_NODE_RANK"], env={**env, "SLURM_NODEID": "3"},
                          check=False, capture_output=True, text=True)
    assert node.stdout.strip() == "3"


def test_local_sh_counts_gpus_unless_cuda_visible_devices_is_set_even_empty(tmp_path):
    """NPROC: the devices in CUDA_VISIBLE_DEVICES when it is set (empty: 1, the CPU), else nvidia-smi's list.
    nvidia-smi is a stand-in here (no GPU on this machine) that lists two devices."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\necho 'GPU 1: stand-in'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    rank = tmp_path / "rank.sh"
    rank.write_text('echo "rank $RANK of $WORLD_SIZE"\n')
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    base = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HGRN_VENV": sys.prefix,
            "HGRN_TRAINER": f"bash {rank}"}
    base.pop("NPROC", None)
    for visible, world in ((None, 2), ("", 1), ("0", 1)):
        env = {k: v for k, v in base.items() if k != "CUDA_VISIBLE_DEVICES"}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        done = subprocess.run(["bash", str(LOCAL_SH), str(config)], cwd=REPO, env=env, check=False,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"rank 0 of {world}" in done.stdout, (visible, done.stdout)
