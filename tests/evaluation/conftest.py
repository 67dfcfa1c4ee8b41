"""Evaluation tests: tiny runs trained by `hgrn-pretrain`'s own loop (with validation), at TP 1 and at TP 2 /
ZeRO 3, shared by every test in this folder; the shipped local harness task."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.pretrain.conftest import tiny_run_tree

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tests" / "assets" / "eval"
STEPS = 4


def write_mixed_validation_shard(path: Path, piece_chars: int = 300) -> Path:
    """A real zstd Pile-format shard of short documents whose sources alternate: the shipped validation text cut
    into pieces, taken round-robin over its sources, so a few samples span several documents and sources."""
    import io
    import json

    import zstandard

    by_source: dict[str, list[str]] = {}
    with open(REPO / "tests" / "assets" / "pile-mini" / "val.jsonl.zst", "rb") as fh:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8"):
            record = json.loads(line)
            pieces = [record["text"][i : i + piece_chars] for i in range(0, 6 * piece_chars, piece_chars)]
            by_source.setdefault(record["meta"]["pile_set_name"], []).extend(p for p in pieces if p.strip())
    lines = []
    for k in range(max(len(v) for v in by_source.values())):
        for source, pieces in sorted(by_source.items()):
            if k < len(pieces):
                lines.append(json.dumps({"text": pieces[k], "meta": {"pile_set_name": source}}))
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return path


# The in-loop harness evaluation every fixture run makes at its last step (its checkpoint step): 9 items, 27
# requests, so two data-parallel replicas get 14 and 13 (at one request per forward, ZeRO-3 needs the lockstep).
IN_LOOP_LIMIT = 9
IN_LOOP_EVAL = {"harness_tasks": ["tiny_qa"], "harness_task_dir": str(TASK_DIR), "harness_limit": IN_LOOP_LIMIT,
                "harness_batch_size": 3, "harness_log_samples": True}


def eval_run_tree(run_dir: Path, tp: int, zero: int, harness_batch_size: int = 3, all_gathered: bool = False,
                  sequence_parallel: bool = False) -> dict:
    """4 steps, validated (on several sources, across documents), evaluated on the local harness task in the
    loop and checkpointed at step 4."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    valid = write_mixed_validation_shard(run_dir.parent / "mixed-val.jsonl.zst")
    return tiny_run_tree(
        run_dir,
        model={"preset": "tiny", "seq_length": 32, "reset_at_document_boundary": True},
        data={"valid_shards": [str(valid)], "valid_samples": 12},
        train={"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": STEPS, "seed": 5},
        parallel={"tensor_parallel_size": tp, "zero_stage": zero, "sequence_parallel": sequence_parallel,
                  "deepspeed_extra": {
            # ZeRO-3 keeps a model this small gathered (parameters under 1e5 elements stay whole, and gathered
            # ones stay live up to 1e9 elements): without those allowances every forward gathers its parameters
            # over the data-parallel ranks, as a real model's forward does
            "zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                                  "stage3_max_reuse_distance": 0}} if all_gathered else {}},
        logging={"log_interval": 1, "tensorboard": True},
        eval={**IN_LOOP_EVAL, "harness_batch_size": harness_batch_size},
    )


def _train(tree: dict) -> int:
    import os

    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    os.chdir(REPO)  # (a forked rank) the local task's data_files path is relative to the repository root
    return train(RunConfig.build(tree), resume="none").exit_code


def in_loop_results(run_dir: Path) -> Path:
    """Where the fixture keeps the in-loop results file (the standalone tests rewrite RUN_DIR/eval/)."""
    return run_dir.parent / "in-loop-results.json"


def _trained(tmp_path_factory, name: str, tp: int, zero: int, world: int | None = None, **eval_kw) -> Path:
    import shutil

    from hgrn_megatron.testing.distributed import run_distributed

    if not (REPO / "tests" / "assets" / "tokenizer" / "tokenizer.model").is_file():
        pytest.skip("the shipped test tokenizer (tests/assets/tokenizer) is missing")
    world = world or tp
    tree = eval_run_tree(tmp_path_factory.mktemp(name) / "run", tp, zero, **eval_kw)
    assert run_distributed(_train, world_size=world, args=(tree,), timeout=300, threads_per_rank=1) == [0] * world
    run_dir = Path(tree["run_dir"])
    shutil.copy(run_dir / "eval" / f"step-{STEPS:08d}.json", in_loop_results(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """The runs, trained together on first use: rank processes are forked before this test process has run
    any model or process group of its own (a fork after that hung the TP 2 ranks)."""
    return {"tp1": _trained(tmp_path_factory, "tp1", tp=1, zero=1),
            # with sequence parallelism: the harness's sequences of any length are padded to a multiple of TP
            "tp2_zero3": _trained(tmp_path_factory, "tp2z3", tp=2, zero=3, sequence_parallel=True),
            "dp2_zero3": _trained(tmp_path_factory, "dp2z3", tp=1, zero=3, world=2, harness_batch_size=1,
                                  all_gathered=True)}


@pytest.fixture(scope="session")
def tp1_run(trained_runs) -> Path:
    return trained_runs["tp1"]


@pytest.fixture(scope="session")
def tp2_zero3_run(trained_runs) -> Path:
    return trained_runs["tp2_zero3"]


@pytest.fixture(scope="session")
def tp1_hf_dir(tp1_run, tmp_path_factory) -> Path:
    """The TP 1 run exported to Hugging Face."""
    from hgrn_megatron.export.exporter import export_checkpoint

    return export_checkpoint(tp1_run, tmp_path_factory.mktemp("hf") / "hf", log=lambda msg: None)


@pytest.fixture(scope="session")
def tp1_hf_model(tp1_hf_dir):
    from hgrn_megatron.evaluation.hf_model import load_hf_dir

    return load_hf_dir(tp1_hf_dir)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Many tiny forwards: on a shared 2-core machine one thread is faster. Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
