"""A stand-in for the trainer that keeps its launch contract and nothing else, for testing launch scripts.

Rank and world come from torchrun's or SLURM's variables; each step appends `{"step": n}` to
RUN_DIR/metrics.jsonl (rank 0); USR1 or TERM means save at the next step boundary and exit 75; a start resumes from
the saved step. Each process also records what the launcher gave it in RUN_DIR/launches/rank-R.jsonl.
The config is a JSON file (`run_dir`, `steps`, `step_seconds`, optional `save_seconds`: how long a save takes,
and `fail_with`: exit at once with that code); `key=value` arguments after it override its keys.
Crashes for the failure policy: `checkpoint_every` K also saves every K steps (with checkpoints/latest, as the
trainer); `crash_at_step` N makes rank `crash_rank` (default 1) die with `crash_signal` (default SIGKILL) at step
N, in the restarts listed in `crash_in_restarts` (default: every one); the other ranks then fail with exit 1 at
their next step, as a collective with a dead peer would.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STANDIN_TRAINER = r'''
import json, os, signal, sys, time

args = sys.argv[1:]
if args[:1] != ["--config"]:
    sys.exit(f"stand-in trainer: expected --config FILE, got {args}")
cfg = json.load(open(args[1]))
cfg.update(a.split("=", 1) for a in args[2:])
run_dir, steps, step_s = cfg["run_dir"], int(cfg["steps"]), float(cfg["step_seconds"])
env = os.environ
torchrun = "RANK" in env
rank = int(env["RANK"] if torchrun else env["SLURM_PROCID"])
world = int(env["WORLD_SIZE"] if torchrun else env["SLURM_NTASKS"])

# As the trainer: USR1 and TERM both mean "save at the next step boundary, exit 75". (torchrun sends TERM to
# the other workers as soon as one has exited.)
preempted = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: preempted.append(signum))

ckpt = os.path.join(run_dir, "checkpoint.json")
start = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
os.makedirs(os.path.join(run_dir, "launches"), exist_ok=True)
with open(os.path.join(run_dir, "launches", f"rank-{rank}.jsonl"), "a") as f:
    f.write(json.dumps({
        "rank": rank, "world": world, "torchrun": torchrun, "start_step": start,
        "restart": int(env.get("SLURM_RESTART_COUNT", 0)), "master_addr": env["MASTER_ADDR"],
        "master_port": int(env["MASTER_PORT"]), "triton_cache": env.get("TRITON_CACHE_DIR", ""),
    }) + "\n")

def save(step):
    time.sleep(float(cfg.get("save_seconds", 0)))  # a real checkpoint takes a while: the launcher must wait
    tmp = ckpt + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
    os.replace(tmp, ckpt)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    with open(os.path.join(run_dir, "checkpoints", "latest.tmp"), "w") as f:
        f.write(f"step-{step:08d}\n")
    os.replace(os.path.join(run_dir, "checkpoints", "latest.tmp"), os.path.join(run_dir, "checkpoints", "latest"))

restart = int(env.get("SLURM_RESTART_COUNT", 0))
crash_at = int(cfg.get("crash_at_step", 0))
crashes_now = crash_at and restart in cfg.get("crash_in_restarts", [restart])
peer_dead = os.path.join(run_dir, f"peer-died-{restart}")

if crash_at:
    # Start together, as ranks leaving a rendezvous do: the crash then lands at the same step on every rank.
    open(os.path.join(run_dir, f"ready-{restart}-{rank}"), "w").close()
    deadline = time.monotonic() + 60
    while not all(os.path.exists(os.path.join(run_dir, f"ready-{restart}-{r}")) for r in range(world)):
        if time.monotonic() > deadline:
            sys.exit("stand-in trainer: the other ranks did not start within 60 s")
        time.sleep(0.01)

def maybe_crash(step):
    if os.path.exists(peer_dead):
        time.sleep(0.5)  # as a collective whose peer died: it notices the closed connection a little later
        sys.exit(1)
    if crashes_now and step == crash_at and rank == int(cfg.get("crash_rank", 1)):
        open(peer_dead, "w").close()
        os.kill(os.getpid(), getattr(signal, cfg.get("crash_signal", "SIGKILL")))

if cfg.get("fail_with"):
    sys.exit(int(cfg["fail_with"]))
for step in range(start + 1, steps + 1):
    maybe_crash(step)
    time.sleep(step_s)
    if rank == 0:
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
    if preempted:
        if rank == 0:
            save(step)
        sys.exit(75)
    if rank == 0 and int(cfg.get("checkpoint_every", 0)) and step % int(cfg["checkpoint_every"]) == 0:
        save(step)
if rank == 0:
    save(steps)
'''


def setup_run(tmp_path: Path, **cfg) -> tuple[Path, Path, dict[str, str]]:
    trainer = tmp_path / "standin_trainer.py"
    trainer.write_text(STANDIN_TRAINER)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tmp_path / "standin.json"
    config.write_text(json.dumps({"run_dir": str(run_dir), "steps": 6, "step_seconds": 0.1, **cfg}))
    return run_dir, config, {"HGRN_TRAINER": f"{sys.executable} {trainer}"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
