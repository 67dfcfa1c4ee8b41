"""`hgrn-eval` end to end on checkpoints written by the trainer (TP 1 / ZeRO 1 and TP 2 / ZeRO 3): the local
harness task, results files, `--shards` against the trainer's own validation loss, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hgrn_megatron.evaluation.__main__ import main
from tests.evaluation.conftest import REPO, STEPS, TASK_DIR

pytestmark = pytest.mark.distributed  # the fixtures train with real gloo ranks


def trainer_validation(run_dir: Path, step: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if r["split"] == "val" and r["step"] == step]
    return val


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`--shards` in its own process: it sets up megatron's parallel state, after which this test process
    could no longer fork working gloo ranks for later tests (megatron keeps state past its own teardown)."""
    return subprocess.run([sys.executable, "-m", "hgrn_megatron.evaluation", *args], capture_output=True,
                          text=True, timeout=300, check=False, cwd=REPO)


def check_shards_equal_trainer(run_dir: Path, tmp_path: Path, rel_tol: float) -> None:
    out = tmp_path / "ppl.json"
    shard = run_dir.parent / "mixed-val.jsonl.zst"  # the run's validation shard
    proc = run_cli("--checkpoint", str(run_dir), "--shards", str(shard), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = json.loads(out.read_text()), trainer_validation(run_dir, STEPS)
    sources = sorted(k for k in want if k.startswith("val_loss/"))
    assert len(sources) >= 3  # several sources and documents inside the samples
    assert sorted(k for k in got if k.startswith("val_loss/")) == sources
    assert got["val_tokens"] == want["val_tokens"] and got["step"] == STEPS
    for key in ["val_loss", *sources]:
        assert got[key] == pytest.approx(want[key], rel=rel_tol, abs=0), key


def test_shards_equal_the_trainers_validation_tp1(tp1_run, tmp_path):
    check_shards_equal_trainer(tp1_run, tmp_path, rel_tol=1e-9)


def test_shards_equal_the_trainers_validation_tp2_zero3(tp2_zero3_run, tmp_path):
    # fp32 master weights merged from 2 TP ranks and run at TP 1: reduction order differs in the last bits
    check_shards_equal_trainer(tp2_zero3_run, tmp_path, rel_tol=1e-6)


def test_shards_table_on_other_shards(tp1_run):
    """Any Pile-format shards (here the training shards), --samples and --batch-size: the printed table."""
    shards = str(REPO / "tests" / "assets" / "pile-mini" / "train-*.jsonl.zst")
    proc = run_cli("--checkpoint", str(tp1_run), "--shards", shards, "--samples", "6", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"step {STEPS}: 6 samples, {6 * 32} tokens"
    assert lines[2].split()[0] == "(all)" and float(lines[2].split()[1]) > 0


def run_local_task(checkpoint: Path, capsys, *extra: str) -> dict:
    args = ["--checkpoint", str(checkpoint), "--tasks", "tiny_qa", "--task-dir", str(TASK_DIR), "--limit", "6",
            "--batch-size", "4", *extra]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tiny_qa" in printed and "acc" in printed and "requests/s" in printed
    path = checkpoint / "eval" / f"step-{STEPS:08d}.json"
    results = json.loads(path.read_text())
    assert not list(path.parent.glob(".*tmp*"))  # written as a temporary file and renamed
    assert results["hgrn_checkpoint"]["step"] == STEPS
    assert results["n-samples"]["tiny_qa"]["effective"] == 6
    assert 0.0 <= results["results"]["tiny_qa"]["acc,none"] <= 1.0
    assert results["hgrn_throughput"]["loglikelihood_requests"] >= 12  # 6 items, 2-4 choices each
    return results


def test_local_task_from_a_tp1_checkpoint(tp1_run, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    reused = run_local_task(tp1_run, capsys, "--out", str(tmp_path / "copy.json"), "--device", "cpu")
    assert json.loads((tmp_path / "copy.json").read_text())["results"] == reused["results"]
    whole = run_local_task(tp1_run, capsys, "--no-prefix-reuse")
    assert whole["hgrn_throughput"]["reuse_prefix"] is False and reused["hgrn_throughput"]["reuse_prefix"]
    for metric in ("acc,none", "acc_norm,none"):
        assert whole["results"]["tiny_qa"][metric] == reused["results"]["tiny_qa"][metric]


def test_local_task_from_a_tp2_zero3_checkpoint(tp2_zero3_run, tp1_run, capsys, monkeypatch):
    """Same training data and seed at TP 2 / ZeRO 3: the same model up to float rounding, so the same answers."""
    monkeypatch.chdir(REPO)
    tp2 = run_local_task(tp2_zero3_run, capsys)
    tp1 = run_local_task(tp1_run, capsys)
    assert tp2["results"]["tiny_qa"]["acc,none"] == tp1["results"]["tiny_qa"]["acc,none"]


def test_local_task_from_an_exported_directory(tp1_hf_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    out = tmp_path / "hf-results.json"
    assert main(["--hf", str(tp1_hf_dir), "--tasks", "tiny_qa", "--task-dir", str(TASK_DIR), "--limit", "4",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n-samples"]["tiny_qa"]["effective"] == 4
    assert "tiny_qa" in capsys.readouterr().out


def test_missing_lm_eval_gives_a_one_line_install_hint(tmp_path):
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # import lm_eval now raises ImportError
            "from hgrn_megatron.evaluation.__main__ import main\n"
            f"sys.exit(main(['--hf', {str(tmp_path)!r}, '--tasks', 'tiny_qa']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'hgrn-megatron[eval]'" in lines[0], proc.stderr


@pytest.mark.parametrize("args,message", [
    # an unknown name makes the harness index all of its ~15,000 task configs (about 20 s)
    pytest.param(["--tasks", "no_such_task", "--task-dir", str(TASK_DIR)], "unknown task(s) no_such_task",
                 marks=pytest.mark.slow),
    (["--shards", "/nonexistent/*.jsonl.zst"], "--shards"),
])
def test_bad_input_is_one_line_and_exit_2(tp1_run, capsys, args, message):
    assert main(["--checkpoint", str(tp1_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hgrn-eval: error:") and message in err[-1]


def test_not_a_checkpoint_and_bad_arguments(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--tasks", "tiny_qa"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--hf", str(tmp_path), "--shards", "x"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path), "--tasks", "tiny_qa", "--limit", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path), "--tasks", "tiny_qa", "--device", "abacus"])
    assert exc.value.code == 2 and "--device abacus" in capsys.readouterr().err


def test_tasks_at_one_step_accumulate_and_absolute_data_paths_work_anywhere(tp1_run, capsys, tmp_path, monkeypatch):
    """A task YAML with an absolute data_files path runs from any working directory; a second run at the same
    step adds its task to RUN_DIR/eval/step-N.json, keeping the first."""
    monkeypatch.chdir(REPO)
    run_local_task(tp1_run, capsys)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml_text = (TASK_DIR / "tiny_qa.yaml").read_text().replace("task: tiny_qa", "task: tiny_qa_abs").replace(
        "test: tests/assets/eval/tiny_qa.jsonl", f"test: {TASK_DIR / 'tiny_qa.jsonl'}")
    (task_dir / "tiny_qa_abs.yaml").write_text(yaml_text)
    monkeypatch.chdir(tmp_path)
    assert main(["--checkpoint", str(tp1_run), "--tasks", "tiny_qa_abs", "--task-dir", str(task_dir),
                 "--limit", "3"]) == 0
    results = json.loads((tp1_run / "eval" / f"step-{STEPS:08d}.json").read_text())
    assert set(results["results"]) == {"tiny_qa", "tiny_qa_abs"}
    assert results["n-samples"]["tiny_qa"]["effective"] == 6 and results["n-samples"]["tiny_qa_abs"]["effective"] == 3


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "hgrn_megatron.evaluation", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--shards" in proc.stdout and "--tasks" in proc.stdout


def test_throughput_benchmark_runs():
    """benchmarks/eval_throughput.py stays runnable (tiny settings; no timing is checked)."""
    proc = subprocess.run([sys.executable, "benchmarks/eval_throughput.py", "--items", "3", "--batch-sizes", "2",
                           "--threads", "1", "--vocab", "256"], capture_output=True, text=True, timeout=120,
                          check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [r[:2] for r in rows] == [["2", "no"], ["2", "yes"]] and all(float(r[2]) > 0 for r in rows)
