"""What the batch script does when a training step ends: finish, stop, or requeue (bounded), and why.

    python -m hgrn_megatron.pretrain.failure_policy run-dir CONFIG [ARGS...]
    python -m hgrn_megatron.pretrain.failure_policy decide --run-dir D --exits DIR --status RC [...]

`decide` reads the exit records each rank's wrapper (launch/slurm/worker.sh) leaves in DIR (`rank-R`: a
`start TIME NODE PID` line, then `exit TIME NODE STATUS`), names the first rank that failed and why, counts
crashes across restarts of the job in RUN_DIR/launch/failures.json (reset when a newer checkpoint exists than at
the last failure), appends one line to RUN_DIR/restarts.jsonl and prints the decision for the shell on stdout:
`ACTION EXIT_CODE SUSPECT_NODE` (ACTION `requeue` or `end`; SUSPECT_NODE `-` when there is none). Its
explanation goes to stderr, i.e. the job log. Imports nothing heavy: it runs in the batch shell.

The policy (docs/LAUNCH.md, "Failures"):
    finished (0)                              end, exit 0
    config or data refusal (2)                end, exit 2: a restart would refuse again
    non-finite abort (3)                      end, exit 3: a restart would reach the same state
    preemption (75), batch shell not TERMed   requeue; not counted as a failure
    anything after a TERM (scancel, limit)    end: a cancelled job must stay cancelled
    crash, hang (76), lost node, ...          requeue while failures <= max; then end with the step's status
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import EXIT_ABORTED, EXIT_CONFIG_ERROR, EXIT_HUNG, EXIT_OK, EXIT_REQUEUE

NEVER_REQUEUE = {EXIT_CONFIG_ERROR: "config or data refusal", EXIT_ABORTED: "non-finite abort"}


@dataclass
class RankExit:
    rank: int
    node: str
    started: float | None = None
    ended: float | None = None
    status: int | None = None


def describe_status(status: int) -> str:
    """Why a process ended, in words (bash reports death by signal N as 128 + N)."""
    known = {EXIT_OK: "finished", EXIT_CONFIG_ERROR: "config or data refusal (exit 2)",
             EXIT_ABORTED: "non-finite abort (exit 3)", EXIT_REQUEUE: "checkpointed for a requeue (exit 75)",
             EXIT_HUNG: f"hang watchdog: no progress within train.hang_timeout_minutes (exit {EXIT_HUNG})"}
    if status in known:
        return known[status]
    if 128 < status < 128 + 65:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = f"signal {status - 128}"
        return f"killed by {name} (status {status})"
    return f"exit code {status}"


def read_exits(directory: Path) -> list[RankExit]:
    exits = []
    for path in sorted(directory.glob("rank-*")) if directory.is_dir() else []:
        record = RankExit(rank=int(path.name.split("-", 1)[1]), node="?")
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] in ("start", "exit"):
                record.node = parts[2]
                if parts[0] == "start":
                    record.started = float(parts[1])
                else:
                    record.ended, record.status = float(parts[1]), int(parts[3])
        exits.append(record)
    return sorted(exits, key=lambda e: e.rank)


def first_failure(exits: list[RankExit]) -> RankExit | None:
    """The rank that ended first with a status other than finished or checkpointed-for-requeue."""
    failed = [e for e in exits if e.status not in (None, EXIT_OK, EXIT_REQUEUE)]
    return min(failed, key=lambda e: (e.ended, e.rank)) if failed else None


def silent_ranks(exits: list[RankExit]) -> list[RankExit]:
    """Ranks that started and recorded no end: killed together with their wrapper (by SLURM at the end of the
    step, e.g. a stopped or wedged process) or lost with their node."""
    return [e for e in exits if e.status is None]


def latest_checkpoint(run_dir: Path) -> str:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return ""


def last_logged_step(run_dir: Path) -> int | None:
    """The newest step in metrics.jsonl (logged every logging.log_interval steps)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    steps = [int(m) for m in re.findall(r'"step":\s*(\d+)', tail)]
    return max(steps) if steps else None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def count_failure(run_dir: Path, job: str, checkpoint: str) -> int:
    """This failure's number in the current streak: 1 after a new checkpoint (or in a new job), else one more."""
    state_path = run_dir / "launch" / "failures.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    same_streak = state.get("job") == job and state.get("checkpoint") == checkpoint
    count = int(state.get("count", 0)) + 1 if same_streak else 1
    _atomic_write(state_path, json.dumps({"job": job, "checkpoint": checkpoint, "count": count}) + "\n")
    return count


# ---------------------------------------------------------------- the decision
@dataclass
class Attempt:
    """How a training step ended, as the batch shell saw it."""
    status: int  # the step's exit status (srun: the highest of its tasks)
    preempted_marker: bool = False  # a torchrun worker exited with the requeue code (torchrun then exits 1)
    terminating: bool = False  # the batch shell got TERM: cancelled, out of time, or preempted by SLURM
    no_requeue: bool = False  # HGRN_NO_REQUEUE=1
    job: str = "0"
    restart: int = 0
    max_failures: int = 3


def _log(message: str) -> None:
    print(f"[sbatch {time.strftime('%F %T')}] {message}", file=sys.stderr, flush=True)


def _cause(attempt: Attempt, first: RankExit | None) -> str:
    if attempt.status == EXIT_REQUEUE or attempt.preempted_marker:
        return "preemption"
    if attempt.status == EXIT_OK and first is None:
        return "finished"
    code = first.status if first else attempt.status
    if code in NEVER_REQUEUE:
        return NEVER_REQUEUE[code]
    return "hang" if code == EXIT_HUNG else "crash"


def _suspect(cause: str, first: RankExit | None, silent: list[RankExit]) -> str | None:
    """The node to blame: a hang's first failure is a rank that waited for the culprit, so a rank that never
    reported its end (stopped, wedged, lost) is the better suspect there."""
    if cause == "hang" and silent:
        return silent[0].node
    if first is not None:
        return first.node
    return silent[0].node if silent else None


def _explain(attempt: Attempt, cause: str, first: RankExit | None, exits: list[RankExit]) -> None:
    _log(f"training step ended with status {attempt.status}: {cause}")
    if first is not None:
        others = sum(1 for e in exits if e is not first and e.status not in (None, EXIT_OK, EXIT_REQUEUE))
        when = time.strftime("%T", time.localtime(first.ended)) + f".{int(first.ended % 1 * 1000):03d}"
        _log(f"first failure: rank {first.rank} on node {first.node} at {when}: {describe_status(first.status)}"
             + (f" ({others} other rank(s) failed after it)" if others else ""))
    silent = silent_ranks(exits)
    if silent and cause not in ("finished", "preemption"):
        named = ", ".join(f"{e.rank} ({e.node})" for e in silent[:8]) + (" ..." if len(silent) > 8 else "")
        _log(f"ranks that recorded no exit (stopped or wedged and killed with the step, or lost with their "
             f"node): {named}")


def decide(run_dir: Path, exits_dir: Path, attempt: Attempt) -> tuple[str, int, str | None]:
    """(action, exit code, node to exclude) for the shell; logs why and appends to restarts.jsonl."""
    exits = read_exits(exits_dir)
    first = first_failure(exits)
    cause = _cause(attempt, first)
    if cause == "finished":
        return "end", EXIT_OK, None
    _explain(attempt, cause, first, exits)
    checkpoint = latest_checkpoint(run_dir)
    record = {"time": time.strftime("%FT%T%z"), "job": attempt.job, "restart": attempt.restart, "cause": cause,
              "status": attempt.status, "first_failure": None, "silent_ranks": [e.rank for e in silent_ranks(exits)],
              "checkpoint": checkpoint or None, "last_logged_step": last_logged_step(run_dir)}
    if first is not None:
        record["first_failure"] = {**asdict(first), "why": describe_status(first.status)}
    ckpt_step = int(checkpoint.rsplit("-", 1)[1]) if re.fullmatch(r"step-\d+", checkpoint) else 0
    if record["last_logged_step"] is not None:
        record["steps_lost"] = max(0, record["last_logged_step"] - ckpt_step)
    action, code, suspect = _act(run_dir, attempt, cause, first, exits, checkpoint)
    record.update(action=action, suspect_node=suspect)
    _append_jsonl(run_dir / "restarts.jsonl", record)
    return action, code, suspect


def _act(run_dir, attempt, cause, first, exits, checkpoint) -> tuple[str, int, str | None]:
    failed_code = attempt.status or (first.status if first else 1)
    if cause == "preemption":
        if attempt.terminating:
            _log("trainer checkpointed; the job was sent TERM (cancelled, out of time, or preempted by SLURM): "
                 "not requeueing")
            return "end", EXIT_REQUEUE, None
        if attempt.no_requeue:
            _log("trainer checkpointed and exited with the requeue code; HGRN_NO_REQUEUE=1: ending the job")
            return "end", EXIT_OK, None
        _log(f"trainer checkpointed and exited with the requeue code {EXIT_REQUEUE}")
        return "requeue", EXIT_REQUEUE, None
    if cause in NEVER_REQUEUE.values():
        _log(f"not requeueing: a {cause} would happen again on restart; ending with status {failed_code}")
        return "end", failed_code, None
    if attempt.terminating:
        _log(f"the job was sent TERM (cancelled, out of time, or preempted by SLURM): not requeueing after a {cause}")
        return "end", failed_code, None
    count = count_failure(run_dir, attempt.job, checkpoint)
    since = f"checkpoint {checkpoint}" if checkpoint else "the start (no checkpoint yet)"
    if count > attempt.max_failures:
        who = f"rank {first.rank} on node {first.node}: {describe_status(first.status)}" if first else \
            f"step status {attempt.status}"
        _log(f"giving up: {count} failures in a row since {since} (HGRN_MAX_FAILURES={attempt.max_failures}); "
             f"last: {who}; ending the job with status {failed_code}")
        return "end", failed_code, None
    _log(f"{cause}: failure {count} of at most {attempt.max_failures} since {since}; requeueing to resume from it")
    return "requeue", failed_code, _suspect(cause, first, silent_ranks(exits))


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per ended attempt, written by the batch shell only
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- command line
def run_dir_of(config: str, args: list[str]) -> str:
    """The run_dir a trainer started with `--config CONFIG ARGS` writes to: the config file's `run_dir` after
    the dotted overrides among ARGS (trainer flags such as --resume are skipped), or the config default."""
    import yaml

    from .config import RunConfig, apply_overrides

    tree = yaml.safe_load(Path(config).read_text()) or {}
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    tree = apply_overrides(tree if isinstance(tree, dict) else {}, overrides)
    return str(tree.get("run_dir") or RunConfig.model_fields["run_dir"].default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hgrn_megatron.pretrain.failure_policy")
    sub = parser.add_subparsers(dest="command", required=True)
    rd = sub.add_parser("run-dir", help="print the run directory of a trainer command line")
    rd.add_argument("config")
    rd.add_argument("args", nargs=argparse.REMAINDER)
    de = sub.add_parser("decide", help="decide what the batch shell does after a training step")
    de.add_argument("--run-dir", type=Path, required=True)
    de.add_argument("--exits", type=Path, required=True, help="the exit records of this attempt's ranks")
    de.add_argument("--status", type=int, required=True)
    for flag in ("preempted-marker", "terminating", "no-requeue"):
        de.add_argument(f"--{flag}", type=int, choices=(0, 1), default=0)
    de.add_argument("--job", default="0")
    de.add_argument("--restart", type=int, default=0)
    de.add_argument("--max-failures", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "run-dir":
        try:
            print(run_dir_of(args.config, args.args))
        except Exception as err:  # noqa: BLE001 - any unreadable config: one line, exit 2
            print(f"cannot read run_dir from {args.config}: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        return 0
    attempt = Attempt(args.status, bool(args.preempted_marker), bool(args.terminating), bool(args.no_requeue),
                      args.job, args.restart, args.max_failures)
    action, code, suspect = decide(args.run_dir, args.exits, attempt)
    print(action, code, suspect or "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
