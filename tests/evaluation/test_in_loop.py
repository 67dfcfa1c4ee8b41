"""Harness evaluation inside the training loop (`eval.harness_tasks`): the fixture runs evaluate the local task
on the live model at their last step (TP 1; TP 2 / ZeRO 3 on 2 ranks; DP 2 / ZeRO 3 with the requests split);
here those results are checked against `hgrn-eval --checkpoint` on the checkpoint of that step (the exported
model, scored with prefix reuse), request by request; then the metrics record, the schedule and the config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hgrn_megatron.evaluation.__main__ import main
from tests.evaluation.conftest import IN_LOOP_LIMIT, REPO, STEPS, TASK_DIR, in_loop_results

RUNS = ["tp1", "tp2_zero3", "dp2_zero3"]
LAYOUT = {"tp1": (1, 1, 1), "tp2_zero3": (2, 1, 3), "dp2_zero3": (1, 2, 3)}  # tp, dp, ZeRO stage


def standalone(run_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / "standalone.json"
    assert main(["--checkpoint", str(run_dir), "--tasks", "tiny_qa", "--task-dir", str(TASK_DIR), "--limit",
                 str(IN_LOOP_LIMIT), "--log-samples", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def responses(results: dict) -> dict[tuple[int, int], tuple[float, bool]]:
    """(document, choice) -> (log-likelihood, is greedy), as the harness received them."""
    return {(s["doc_id"], k): tuple(r[0]) for s in results["samples"]["tiny_qa"] for k, r in enumerate(s["resps"])}


@pytest.mark.distributed
@pytest.mark.parametrize("name", RUNS)
def test_in_loop_results_equal_standalone_at_the_same_step(trained_runs, name, tmp_path, monkeypatch):
    check_in_loop_equals_standalone(trained_runs[name], LAYOUT[name], tmp_path, monkeypatch)


@pytest.mark.distributed
@pytest.mark.slow  # 4 ranks on 2 cores
def test_in_loop_results_equal_standalone_tp2_dp2_zero3(tmp_path_factory, tmp_path, monkeypatch):
    from tests.evaluation.conftest import _trained

    run_dir = _trained(tmp_path_factory, "tp2dp2z3", tp=2, zero=3, world=4, harness_batch_size=1,
                       all_gathered=True)
    check_in_loop_equals_standalone(run_dir, (2, 2, 3), tmp_path, monkeypatch)


def check_in_loop_equals_standalone(run_dir: Path, layout: tuple[int, int, int], tmp_path, monkeypatch) -> None:
    in_loop = json.loads(in_loop_results(run_dir).read_text())
    assert in_loop["hgrn_training"]["step"] == STEPS
    tp, dp, zero = layout
    assert (in_loop["hgrn_training"]["tp_size"], in_loop["hgrn_training"]["dp_size"]) == (tp, dp)
    assert in_loop["hgrn_training"]["zero_stage"] == zero
    assert in_loop["hgrn_throughput"]["reuse_prefix"] is False  # the live model: whole sequences
    monkeypatch.chdir(REPO)
    alone = standalone(run_dir, tmp_path)
    assert alone["hgrn_checkpoint"]["step"] == STEPS and alone["hgrn_throughput"]["reuse_prefix"] is True
    got, want = responses(in_loop), responses(alone)
    assert len(got) == in_loop["hgrn_throughput"]["loglikelihood_requests"] >= 2 * IN_LOOP_LIMIT
    assert got.keys() == want.keys()
    for key, (lp, greedy) in got.items():
        assert lp == pytest.approx(want[key][0], rel=1e-5, abs=1e-5), key
        assert greedy == want[key][1], key
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert in_loop["results"]["tiny_qa"][metric] == alone["results"]["tiny_qa"][metric], metric


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp1", "dp2_zero3"])
def test_in_loop_metrics_reach_metrics_jsonl_and_tensorboard(trained_runs, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = trained_runs[name]
    results = json.loads(in_loop_results(run_dir).read_text())["results"]["tiny_qa"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["split"] == "eval"]
    assert record["step"] == STEPS and record["eval/requests"] >= 2 * IN_LOOP_LIMIT and record["eval/seconds"] > 0
    assert record["eval/tiny_qa/acc"] == results["acc,none"]
    assert record["eval/tiny_qa/acc_norm"] == results["acc_norm,none"]
    assert record["eval/tiny_qa/acc_stderr"] == results["acc_stderr,none"]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    (point,) = events.Scalars("eval/tiny_qa/acc")
    assert point.step == STEPS and point.value == pytest.approx(results["acc,none"])
    assert "eval/seconds" in events.Tags()["scalars"]


def test_when_the_harness_runs():
    from hgrn_megatron.pretrain.harness_eval import harness_due

    # None: at the checkpoint steps (every 100) and the last step
    assert [s for s in range(1, 251) if harness_due(s, 250, None, 100)] == [100, 200, 250]
    assert [s for s in range(1, 251) if harness_due(s, 250, 60, 100)] == [60, 120, 180, 240, 250]
    assert [s for s in range(1, 251) if harness_due(s, 250, None, 0)] == [250]  # no periodic checkpoints


def test_metric_record_names():
    from hgrn_megatron.pretrain.harness_eval import metric_record
    from hgrn_megatron.pretrain.metrics import scalar_tags

    results = {"results": {"qa": {"alias": "qa", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                  "exact_match,strict-match": 0.25, "samples": 3}}}
    record = metric_record(results, 7)
    assert record == {"split": "eval", "step": 7, "eval/qa/acc": 0.5, "eval/qa/exact_match_strict-match": 0.25}
    assert scalar_tags(record, "eval") == {"eval/qa/acc": 0.5, "eval/qa/exact_match_strict-match": 0.25}


def test_the_harness_leaves_the_random_streams_where_they_were():
    import random

    import numpy as np
    import torch

    from hgrn_megatron.harness.tasks import preserved_rng

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    with preserved_rng():
        random.seed(0), np.random.seed(1234), torch.manual_seed(1234)  # what the harness does
        random.random(), np.random.rand(), torch.rand(1)
    got = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    assert got == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def write_config(tmp_path: Path, **eval_section) -> Path:
    from tests.pretrain.conftest import tiny_run_tree

    tree = tiny_run_tree(tmp_path / "run", eval=eval_section)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def hgrn_pretrain(*args: str, without_lm_eval: bool = False) -> subprocess.CompletedProcess:
    code = ("import sys\n" + ("sys.modules['lm_eval'] = None\n" if without_lm_eval else "") +
            "from hgrn_megatron.pretrain.__main__ import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          check=False, cwd=REPO)


def test_missing_lm_eval_is_a_one_line_hint_before_training(tmp_path):
    config = write_config(tmp_path, harness_tasks=["tiny_qa"])
    proc = hgrn_pretrain("--config", str(config), without_lm_eval=True)
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if "eval.harness_tasks" in x or "lm-evaluation" in x]
    assert "pip install 'hgrn-megatron[eval]'" in line and line.startswith("eval.harness_tasks: "), proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started
    off = hgrn_pretrain("--config", str(config), "eval.harness_tasks=[]", "--print-config", without_lm_eval=True)
    assert off.returncode == 0, off.stderr  # off (the default): lm-eval not needed


@pytest.mark.parametrize("overrides,message", [
    (["eval.harness_task_dir=/nonexistent/tasks"], "eval.harness_task_dir: /nonexistent/tasks is not a directory"),
    (["parallel.context_parallel_size=2"], "eval.harness_tasks: harness evaluation in the loop needs"),
    (["eval.harness_tasks=[tiny_qa, ' ']"], "an empty task name"),
    (["eval.harness_limit=0"], "eval.harness_limit"),
])
def test_bad_eval_settings_are_config_errors(tmp_path, overrides, message):
    from hgrn_megatron.config_base import ConfigError
    from hgrn_megatron.pretrain.config import load_config

    config = write_config(tmp_path, harness_tasks=["tiny_qa"], harness_task_dir=str(TASK_DIR))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(config, overrides).check_start_files()


@pytest.mark.slow  # an unknown name makes the harness index its ~15,000 task configs (about 20 s)
def test_an_unknown_task_stops_the_start_with_exit_2(tmp_path):
    config = write_config(tmp_path, harness_tasks=["no_such_task"], harness_task_dir=str(TASK_DIR))
    proc = hgrn_pretrain("--config", str(config))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot start: eval.harness_tasks: unknown task(s) no_such_task" in proc.stdout + proc.stderr
    assert not list((tmp_path / "run").glob("metrics.jsonl"))


def _train_and_read(tree: dict) -> dict:
    import os

    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    os.chdir(REPO)
    result = train(RunConfig.build(tree), resume="none")
    return {"exit_code": result.exit_code, "step": result.step}


@pytest.mark.distributed
def test_a_harness_failure_during_training_is_logged_and_training_goes_on(tmp_path):
    """The task exists at the start (its YAML), but its data file is gone when the evaluation runs."""
    from hgrn_megatron.testing.distributed import run_distributed
    from tests.pretrain.conftest import tiny_run_tree

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "gone_qa.yaml").write_text((TASK_DIR / "tiny_qa.yaml").read_text().replace(
        "task: tiny_qa", "task: gone_qa").replace("test: tests/assets/eval/tiny_qa.jsonl", f"test: {tmp_path}/gone.jsonl"))
    tree = tiny_run_tree(tmp_path / "run", train={"steps": 2, "global_batch_size": 2, "micro_batch_size": 2,
                                                  "eval_interval": 0, "seed": 3},
                         eval={"harness_tasks": ["gone_qa"], "harness_task_dir": str(task_dir)})
    (result,) = run_distributed(_train_and_read, world_size=1, args=(tree,), timeout=300)
    assert result == {"exit_code": 0, "step": 2}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert not [r for r in records if r["split"] == "eval"] and not (tmp_path / "run" / "eval").exists()


@pytest.mark.slow  # a torchrun training start
def test_in_loop_cost_benchmark_runs():
    """benchmarks/eval_in_loop.py stays runnable (one layout, 3 items; no timing is checked)."""
    proc = subprocess.run([sys.executable, "benchmarks/eval_in_loop.py", "--layouts", "1x1x1", "--limit", "3"],
                          capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = proc.stdout.splitlines()[-1].split()
    assert row[:2] == ["1x1x1", "8"] and float(row[2]) > 0  # 3 items of 2, 3 and 3 choices


@pytest.mark.distributed
def test_evaluating_in_the_loop_leaves_training_unchanged(tmp_path):
    """Every step evaluated (harness_interval 1, one task manager reused): the same losses as without."""
    from hgrn_megatron.testing.distributed import run_distributed
    from tests.pretrain.conftest import read_losses, tiny_run_tree

    train = {"steps": 3, "global_batch_size": 2, "micro_batch_size": 2, "eval_interval": 0, "seed": 3}
    with_eval = tiny_run_tree(tmp_path / "with", train=train, eval={
        "harness_tasks": ["tiny_qa"], "harness_task_dir": str(TASK_DIR), "harness_limit": 2, "harness_interval": 1})
    without = tiny_run_tree(tmp_path / "without", train=train)
    for tree in (with_eval, without):
        (result,) = run_distributed(_train_and_read, world_size=1, args=(tree,), timeout=300)
        assert result == {"exit_code": 0, "step": 3}
    records = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "with" / "eval").iterdir()) == [f"step-{s:08d}.json" for s in (1, 2, 3)]
    assert read_losses(tmp_path / "with") == read_losses(tmp_path / "without")
