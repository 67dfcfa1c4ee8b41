"""What an in-loop harness evaluation (`eval.harness_tasks`) costs: requests and seconds per evaluation.

    python benchmarks/eval_in_loop.py [--layouts 1x1x1,1x2x1,2x1x1] [--task tiny_qa] [--limit N] [--threads 1]

Trains the quickstart model (hidden 128, 2 layers, seq 128; the shipped test tokenizer, vocabulary 2048) for 2
steps with `hgrn-pretrain` under torchrun for each layout TPxDPxZeRO, evaluating the shipped local task at the
last step, and prints from the run's records: the loglikelihood requests, the seconds the whole evaluation took
on rank 0 (task loading, scoring, metrics), and the seconds of the scoring calls alone. Run from the repository
root (the task's data path is relative to it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(layout: str, task: str, limit: int | None, scratch: Path, threads: int) -> dict:
    tp, dp, zero = (int(x) for x in layout.split("x"))
    run_dir = scratch / layout
    overrides = [f"run_dir={run_dir}", f"tokenizer.model={REPO / 'tests/assets/tokenizer/tokenizer.model'}",
                 "train.steps=2", "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_at_end=false",
                 "logging.tensorboard=false", f"parallel.tensor_parallel_size={tp}", f"parallel.zero_stage={zero}",
                 f"eval.harness_tasks=[{task}]", f"eval.harness_task_dir={REPO / 'tests/assets/eval'}"]
    if limit:
        overrides.append(f"eval.harness_limit={limit}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * dp}",
           "-m", "hgrn_megatron.pretrain", "--config", str(REPO / "configs/quickstart.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # per rank (torchrun sets 1 only for several ranks)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        raise SystemExit(f"{layout}: hgrn-pretrain exited {proc.returncode}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["split"] == "eval"]
    results = json.loads((run_dir / "eval" / "step-00000002.json").read_text())
    return {"requests": record["eval/requests"], "seconds": record["eval/seconds"],
            "scoring_s": results["hgrn_throughput"]["seconds"], "acc": record.get(f"eval/{task}/acc")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="1x1x1,1x2x1,1x2x3,2x1x1", help="TPxDPxZeRO, comma-separated")
    p.add_argument("--task", default="tiny_qa")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    print(f"{'TPxDPxZeRO':>11} {'requests':>9} {'eval s':>7} {'scoring s':>10} {'requests/s':>11}")
    with tempfile.TemporaryDirectory(prefix="eval-in-loop-") as scratch:
        for layout in args.layouts.split(","):
            r = run(layout, args.task, args.limit, Path(scratch), args.threads)
            print(f"{layout:>11} {r['requests']:>9} {r['seconds']:>7.2f} {r['scoring_s']:>10.2f} "
                  f"{r['requests'] / r['scoring_s']:>11.1f}")


if __name__ == "__main__":
    main()
