"""Evaluation tests: tiny runs trained by `hgrn-pretrain`'s own loop (with validation), at TP 1 and at TP 2 /
ZeRO 3, shared by every test in this folder; the shipped local harness task."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.pretrain.conftest import tiny_run_tree

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tests" / "assets" / "eval"
STEPS = 4


def eval_run_tree(run_dir: Path, tp: int, zero: int) -> dict:
    """4 steps, validated and checkpointed at step 4; document resets on, so validation crosses documents."""
    return tiny_run_tree(
        run_dir,
        model={"preset": "tiny", "seq_length": 32, "reset_at_document_boundary": True},
        data={"valid_samples": 12},
        train={"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": STEPS, "seed": 5},
        parallel={"tensor_parallel_size": tp, "zero_stage": zero},
    )


def _train(tree: dict) -> int:
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    return train(RunConfig.build(tree), resume="none").exit_code


def _trained(tmp_path_factory, name: str, tp: int, zero: int) -> Path:
    from hgrn_megatron.testing.distributed import run_distributed

    if not (REPO / "tests" / "assets" / "tokenizer" / "tokenizer.model").is_file():
        pytest.skip("the shipped test tokenizer (tests/assets/tokenizer) is missing")
    tree = eval_run_tree(tmp_path_factory.mktemp(name) / "run", tp, zero)
    assert run_distributed(_train, world_size=tp, args=(tree,), timeout=300, threads_per_rank=1) == [0] * tp
    return Path(tree["run_dir"])


@pytest.fixture(scope="session")
def tp1_run(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "tp1", tp=1, zero=1)


@pytest.fixture(scope="session")
def tp2_zero3_run(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "tp2z3", tp=2, zero=3)


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
