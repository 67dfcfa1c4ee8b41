"""The training engine on real gloo ranks, real DeepSpeed and real megatron-core: parallel equivalence, exact
resume, resume at another DP size, checkpoint fallback, non-finite skipping."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from hgrn_megatron.testing.distributed import DistributedTestError, run_distributed

from .conftest import read_losses

pytestmark = [pytest.mark.distributed]


def _train(tree: dict, resume: str = "auto"):
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    result = train(RunConfig.build(tree), resume=resume)
    return result.exit_code, result.step


def run(tree: dict, world_size: int, resume: str = "auto"):
    return run_distributed(_train, world_size=world_size, args=(tree, resume), timeout=240)[0]


@pytest.fixture(scope="module")
def baseline_losses(tmp_path_factory):
    from .conftest import tiny_run_tree

    tree = tiny_run_tree(tmp_path_factory.mktemp("baseline") / "run", parallel={"zero_stage": 1})
    assert run(tree, world_size=1) == (0, 6)
    return read_losses(tree["run_dir"])


@pytest.mark.parametrize(
    "zero_stage,tp", [(1, 1), (2, 1), (3, 1), (1, 2)], ids=["dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2-zero1"]
)
def test_two_ranks_match_one_rank(run_tree, baseline_losses, zero_stage, tp):
    tree = run_tree(parallel={"zero_stage": zero_stage, "tensor_parallel_size": tp})
    assert run(tree, world_size=2) == (0, 6)
    losses = read_losses(tree["run_dir"])
    assert sorted(losses) == list(range(1, 7))
    for step, ref in baseline_losses.items():
        assert abs(losses[step] - ref) <= 1e-5, (step, losses[step], ref)
    # The run learned something (the comparison above is not between two constant curves).
    assert losses[6] < losses[1]


def test_ranks_sharing_lanes_count_each_document_once(tmp_path):
    """data.lanes = 3 at DP 2: both ranks read every lane. The samples, hence the losses, and the documents
    reported per step are those of one rank; a plain sum over ranks would report about twice as many."""
    from .conftest import tiny_run_tree

    def documents(tree):
        records = [json.loads(line) for line in open(tree["run_dir"] + "/metrics.jsonl")]
        return {r["step"]: r["data_documents"] for r in records if r["split"] == "train"}

    one = tiny_run_tree(tmp_path / "dp1", data={"lanes": 3}, train={"steps": 4})
    two = tiny_run_tree(tmp_path / "dp2", data={"lanes": 3}, train={"steps": 4})
    assert run(one, 1) == (0, 4) and run(two, 2) == (0, 4)
    assert documents(two) == documents(one) and documents(one)[4] > 0
    ref, got = read_losses(one["run_dir"]), read_losses(two["run_dir"])
    assert all(abs(got[step] - ref[step]) <= 1e-5 for step in ref), (got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,tp", [(2, 1), (1, 2)], ids=["dp2-zero2", "tp2-zero1"])
def test_resume_is_bit_exact(tmp_path, zero_stage, tp):
    from .conftest import tiny_run_tree

    common = dict(parallel={"zero_stage": zero_stage, "tensor_parallel_size": tp}, schedule={"decay_steps": 6})
    straight = tiny_run_tree(tmp_path / "straight", **common)
    assert run(straight, 2) == (0, 6)
    split = tiny_run_tree(tmp_path / "split", **common, train={"steps": 3})
    assert run(split, 2) == (0, 3)
    split["train"]["steps"] = 6
    assert run(split, 2) == (0, 6)
    assert read_losses(split["run_dir"]) == read_losses(straight["run_dir"])  # bit-identical floats


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,tp", [(2, 1), (1, 2)], ids=["tp1-zero2", "tp2-zero1"])
def test_resume_at_smaller_data_parallel_size(tmp_path, zero_stage, tp):
    from .conftest import tiny_run_tree

    common = dict(parallel={"zero_stage": zero_stage, "tensor_parallel_size": tp}, schedule={"decay_steps": 6})
    straight = tiny_run_tree(tmp_path / "straight", **common)
    assert run(straight, 2 * tp) == (0, 6)
    split = tiny_run_tree(tmp_path / "split", **common, train={"steps": 3})
    assert run(split, 2 * tp) == (0, 3)
    split["train"]["steps"] = 6
    assert run(split, tp) == (0, 6)  # DP 2 -> 1 through DeepSpeed's universal checkpoint
    got, ref = read_losses(split["run_dir"]), read_losses(straight["run_dir"])
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000006" / "run_state.json").read_text())
    assert state["consumed_samples"] == 24 and state["dp_size"] == 1


@pytest.mark.parametrize("before,after", [((1, 1), (2, 1)), ((2, 2), (2, 1))],
                         ids=["tp1-to-tp2", "tp2dp1-to-tp1dp2"])
def test_resume_at_another_tensor_parallel_size(tmp_path, before, after):
    """A checkpoint saved at one TP size resumes at another (through DeepSpeed's universal format, with the
    merge rules of `tp_rules`): steps 4-6 match the uninterrupted TP 1 run, optimizer state included."""
    from .conftest import tiny_run_tree

    (world_before, tp_before), (world_after, tp_after) = before, after
    common = dict(schedule={"decay_steps": 6})
    straight = tiny_run_tree(tmp_path / "straight", **common)
    assert run(straight, 1) == (0, 6)
    split = tiny_run_tree(tmp_path / "split", **common, train={"steps": 3},
                          parallel={"tensor_parallel_size": tp_before})
    assert run(split, world_before) == (0, 3)
    split["train"]["steps"] = 6
    split["parallel"]["tensor_parallel_size"] = tp_after
    assert run(split, world_after) == (0, 6)
    got, ref = read_losses(split["run_dir"]), read_losses(straight["run_dir"])
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000006" / "run_state.json").read_text())
    assert state["tp_size"] == tp_after and state["consumed_samples"] == 24


def test_tp_change_from_a_checkpoint_without_merge_rules_is_refused(run_tree):
    """Checkpoints from before the rules were recorded (run-state format 1) resume only at their own TP size."""
    from hgrn_megatron.pretrain.checkpoint import write_manifest

    tree = run_tree(train={"steps": 2})
    assert run(tree, 1) == (0, 2)
    ckpt = next((Path(tree["run_dir"]) / "checkpoints").glob("step-*"))
    state = json.loads((ckpt / "run_state.json").read_text())
    del state["format"]
    (ckpt / "run_state.json").write_text(json.dumps(state))
    write_manifest(ckpt)
    tree["train"]["steps"] = 3
    tree["parallel"] = {"tensor_parallel_size": 2}
    with pytest.raises(DistributedTestError, match=r"changing TP \(1 -> 2\) needs a checkpoint that records"):
        run(tree, 2)


def test_resume_falls_back_past_torn_checkpoints(run_tree):
    from hgrn_megatron.pretrain.checkpoint import find_resume_checkpoint, verify_checkpoint

    tree = run_tree(checkpoint={"interval": 2, "keep_last": 3}, schedule={"decay_steps": 6})
    assert run(tree, 1) == (0, 6)
    ref = read_losses(tree["run_dir"])
    root = tree["run_dir"] + "/checkpoints"
    import pathlib

    root = pathlib.Path(root)
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-00000002", "step-00000004", "step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000006"
    # A crash mid-save leaves a .tmp folder: never a candidate.
    shutil.copytree(root / "step-00000006", root / "step-00000008.tmp")
    # The newest checkpoint has a truncated shard: rejected by its manifest.
    shard = next((root / "step-00000006" / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "bytes" in verify_checkpoint(root / "step-00000006")
    # The next one lost its manifest (torn before the rename can't happen, but a user may delete files).
    (root / "step-00000004" / "manifest.json").unlink()
    assert "manifest" in verify_checkpoint(root / "step-00000004")
    assert find_resume_checkpoint(root) == root / "step-00000002"
    # Resuming from step 2 replays steps 3..6 exactly.
    assert run(tree, 1) == (0, 6)
    assert read_losses(tree["run_dir"]) == ref


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nonfinite_step_is_skipped_and_counted(run_tree, zero_stage, monkeypatch):
    monkeypatch.setenv("HGRN_FAULT_INJECTION", json.dumps({"nonfinite_at_steps": [3]}))
    tree = run_tree(parallel={"zero_stage": zero_stage})
    assert run(tree, 1) == (0, 6)
    records = [json.loads(line) for line in open(tree["run_dir"] + "/metrics.jsonl")]
    by_step = {r["step"]: r for r in records if r["split"] == "train"}
    assert by_step[2]["skipped_steps"] == 0 and by_step[3]["skipped_steps"] == 1 and by_step[6]["skipped_steps"] == 1
    # The poisoned update never reached the weights: later losses are finite and still falling.
    assert all(math.isfinite(by_step[s]["loss"]) for s in (4, 5, 6))
    assert by_step[6]["loss"] < by_step[1]["loss"]


def test_nonfinite_steps_in_a_row_abort_without_checkpoint(run_tree, monkeypatch):
    monkeypatch.setenv("HGRN_FAULT_INJECTION", json.dumps({"nonfinite_at_steps": [2, 3]}))
    tree = run_tree(train={"max_nonfinite_in_a_row": 2}, checkpoint={"interval": 1})
    with pytest.raises(DistributedTestError, match="2 non-finite steps in a row"):
        run(tree, 1)
    import pathlib

    names = sorted(p.name for p in (pathlib.Path(tree["run_dir"]) / "checkpoints").glob("step-*"))
    assert names == ["step-00000001"]  # nothing saved after the poisoned steps


def test_wall_clock_budget_saves_and_exits_for_requeue(run_tree):
    from hgrn_megatron.pretrain import EXIT_REQUEUE

    tree = run_tree(train={"exit_after_minutes": 1e-6})
    assert run(tree, 2) == (EXIT_REQUEUE, 1)  # both ranks agree after the first step
    import pathlib

    root = pathlib.Path(tree["run_dir"]) / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert json.loads((root / "step-00000001" / "run_state.json").read_text())["consumed_samples"] == 4


def test_bf16_zero2_trains_on_two_ranks(run_tree):
    tree = run_tree(train={"precision": "bf16"}, parallel={"zero_stage": 2})
    assert run(tree, 2) == (0, 6)
    losses = read_losses(tree["run_dir"])
    assert all(math.isfinite(v) for v in losses.values()) and losses[6] < losses[1]


def test_validation_reports_loss_per_source(run_tree, tmp_path):
    import zstandard

    from .conftest import ASSETS

    # A validation shard with two sources: the shipped validation text, relabelled half and half.
    lines = zstandard.ZstdDecompressor().decompress(
        (ASSETS / "pile-mini" / "val.jsonl.zst").read_bytes(), max_output_size=1 << 30
    ).decode().splitlines()
    records = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        for j, part in enumerate(rec["text"].split("\n\n")[:40]):
            if part.strip():
                records.append({"text": part, "meta": {"pile_set_name": "SourceA" if (i + j) % 2 else "SourceB"}})
    shard = tmp_path / "val-two-sources.jsonl.zst"
    shard.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode()))

    tree = run_tree(train={"steps": 3, "eval_interval": 3}, data={"valid_shards": [str(shard)], "valid_samples": 8})
    assert run(tree, 2) == (0, 3)
    val = [json.loads(line) for line in open(tree["run_dir"] + "/metrics.jsonl") if '"split": "val"' in line]
    assert [r["step"] for r in val] == [3]
    a, b, overall = val[0]["val_loss/SourceA"], val[0]["val_loss/SourceB"], val[0]["val_loss"]
    assert min(a, b) <= overall <= max(a, b) and a != b
    assert val[0]["val_tokens"] == 8 * 32 and abs(val[0]["val_ppl"] - math.exp(overall)) < 1e-6 * val[0]["val_ppl"]


def test_a_checkpoint_resharded_ahead_of_the_job_resumes_at_another_size(run_tree):
    """`hgrn-checkpoint reshard` converts once, with a pool of workers, before the job; the resume at another DP
    size then loads the converted checkpoint instead of converting again."""
    import subprocess
    import sys

    tree = run_tree(train={"steps": 2})
    assert run(tree, 2) == (0, 2)
    cli = [sys.executable, "-m", "hgrn_megatron.pretrain.checkpoint.reshard", "reshard"]
    bad = subprocess.run([*cli, tree["run_dir"] + "/nowhere"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "no usable checkpoint" in bad.stderr
    done = subprocess.run([*cli, tree["run_dir"], "--workers", "2"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    universal = Path(tree["run_dir"]) / "checkpoints" / "step-00000002" / "ds_universal"
    assert "universal checkpoint ready (2 workers" in done.stdout and universal.is_dir()
    stamp = universal.stat().st_mtime_ns
    tree["train"]["steps"] = 3
    assert run(tree, 1) == (0, 3)
    assert universal.stat().st_mtime_ns == stamp  # not converted again
