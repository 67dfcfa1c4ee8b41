"""Sequence-parallel training on real gloo ranks with DeepSpeed ZeRO: TP 2 with `parallel.sequence_parallel` trains
as TP 2 without it (losses and validation, document resets), a checkpoint saved with it resumes without it, and
a sequence that does not split over the TP ranks is a config error."""
from __future__ import annotations

import pytest

from hgrn_megatron.pretrain import EXIT_CONFIG_ERROR

from .conftest import read_losses
from .test_context_parallel_training import _close, _val_losses
from .test_engine import run

pytestmark = [pytest.mark.distributed]

COMMON = {"model": {"preset": "tiny", "seq_length": 32, "reset_at_document_boundary": True},
          "train": {"eval_interval": 3}, "schedule": {"decay_steps": 6}}


def _parallel(zero_stage: int, sp: bool) -> dict:
    return {"tensor_parallel_size": 2, "zero_stage": zero_stage, "sequence_parallel": sp}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    from .conftest import tiny_run_tree

    tree = tiny_run_tree(tmp_path_factory.mktemp("tp2") / "run", **COMMON, parallel=_parallel(1, False))
    assert run(tree, 2) == (0, 6)
    return read_losses(tree["run_dir"]), _val_losses(tree["run_dir"])


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_sequence_parallel_ranks_train_as_tensor_parallel_ones(run_tree, tp2, zero_stage):
    tree = run_tree(**COMMON, parallel=_parallel(zero_stage, True))
    assert run(tree, 2) == (0, 6)
    losses = read_losses(tree["run_dir"])
    _close(losses, tp2[0])
    _close(_val_losses(tree["run_dir"]), tp2[1])
    assert losses[6] < losses[1]


def test_a_sequence_parallel_checkpoint_resumes_without_it(run_tree, tp2):
    tree = run_tree(**{**COMMON, "train": {"eval_interval": 3, "steps": 3}}, parallel=_parallel(1, True))
    assert run(tree, 2) == (0, 3)
    tree["train"]["steps"] = 6
    tree["parallel"] = _parallel(1, False)
    assert run(tree, 2) == (0, 6)
    _close(read_losses(tree["run_dir"]), tp2[0])


@pytest.mark.slow
def test_sequence_parallelism_inside_context_parallel_pieces_trains_as_tp2(run_tree, tp2):
    """TP 2 x CP 2 with SP on 4 ranks: each CP piece split again over TP."""
    tree = run_tree(**COMMON, parallel={**_parallel(1, True), "context_parallel_size": 2})
    assert run(tree, 4) == (0, 6)
    _close(read_losses(tree["run_dir"]), tp2[0])
    _close(_val_losses(tree["run_dir"]), tp2[1])


def test_sequence_not_divisible_by_tp_is_a_config_error(capsys, tmp_path, run_tree, monkeypatch):
    import yaml

    from hgrn_megatron.pretrain.__main__ import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_tree(model={"preset": "tiny", "seq_length": 30},
                                            parallel={"tensor_parallel_size": 2, "context_parallel_size": 2,
                                                      "sequence_parallel": True})))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["--config", str(path)]) == EXIT_CONFIG_ERROR
    assert ("parallel.sequence_parallel: model.seq_length (30) is not divisible by context_parallel_size x "
            "tensor_parallel_size (2 x 2)") in capsys.readouterr().err
