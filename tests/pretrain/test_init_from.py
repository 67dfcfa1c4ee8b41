"""A new training phase from a checkpoint (`checkpoint.init_from`): another sequence length, other shards, another
TP size, a step counter from 0; the first step's loss is the parent model's loss on that batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hgrn_megatron.testing.distributed import DistributedTestError, run_distributed

from .conftest import ASSETS, read_losses, tiny_run_tree
from .test_engine import run

pytestmark = [pytest.mark.distributed]


def _parent_loss_on_child_batch(parent_run: str, child_tree: dict) -> float:
    """The parent checkpoint's model (TP 1) on the child's first optimizer step: the mean over its micro-batches
    of the per-token mean loss, as the trainer logs it."""
    import torch

    from hgrn_megatron.export.checkpoint_reader import read_checkpoint
    from hgrn_megatron.model import build_model
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.data import TrainLoader, model_inputs
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.runtime_env import patch_for_cpu
    from hgrn_megatron.tokenizer import Tokenizer, padded_vocab_size

    patch_for_cpu()
    init_model_parallel(1)
    cfg = RunConfig.build(child_tree)
    tokenizer = Tokenizer.load(cfg.tokenizer.model)
    model = build_model(cfg.model, padded_vocab_size(tokenizer.vocab_size, 1))
    weights = read_checkpoint(parent_run).state_dict
    model.load_state_dict({k: v for k, v in weights.items() if not k.endswith("_extra_state")}, strict=False)
    losses = []
    with TrainLoader(cfg.data, tokenizer, cfg.model.seq_length, cfg.train.micro_batch_size) as loader, \
            torch.no_grad():
        for _ in range(cfg.train.global_batch_size // cfg.train.micro_batch_size):
            x = model_inputs(next(loader))
            losses.append(model(x.input_ids, labels=x.labels, doc_start=x.doc_start).float().mean())
    return torch.stack(losses).mean().item()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tree = tiny_run_tree(tmp_path_factory.mktemp("parent") / "run", train={"steps": 4})
    assert run(tree, 1) == (0, 4)
    return tree


def _child(tmp_path: Path, parent_tree: dict, **checkpoint) -> dict:
    return tiny_run_tree(
        tmp_path / "child",
        model={"preset": "tiny", "seq_length": 64},
        data={"train_shards": [str(ASSETS / "pile-mini" / "val.jsonl.zst")], "valid_shards": [], "num_workers": 0},
        train={"steps": 2}, checkpoint={"interval": 1, "init_from": parent_tree["run_dir"], **checkpoint},
        parallel={"tensor_parallel_size": 2},
    )


def test_a_new_phase_at_twice_the_length_on_other_shards_starts_from_the_parent_weights(tmp_path, parent):
    child = _child(tmp_path, parent)
    assert run(child, 2) == (0, 2)  # TP 2 from a TP 1 parent: through the universal format
    expected = run_distributed(_parent_loss_on_child_batch, world_size=1, args=(parent["run_dir"], child))[0]
    losses = read_losses(child["run_dir"])
    assert sorted(losses) == [1, 2]  # its own step counter
    assert abs(losses[1] - expected) <= 1e-5 * expected, (losses[1], expected)
    records = [json.loads(line) for line in Path(child["run_dir"], "metrics.jsonl").read_text().splitlines()]
    (init,) = [r for r in records if r["split"] == "init"]
    assert init["init_from"].endswith("step-00000004") and init["init_from_step"] == 4
    state = json.loads((Path(child["run_dir"]) / "checkpoints" / "step-00000002" / "run_state.json").read_text())
    assert state["consumed_samples"] == 8  # counted from the new phase's start
    # A requeue of the new phase continues from its own checkpoint, not from the parent again.
    child["train"]["steps"] = 3
    assert run(child, 2) == (0, 3)
    assert sorted(read_losses(child["run_dir"])) == [1, 2, 3]


def test_the_optimizer_state_comes_along_when_asked(tmp_path, parent):
    child = _child(tmp_path, parent, init_optimizer=True)
    child["parallel"] = {"tensor_parallel_size": 1}
    assert run(child, 1) == (0, 2)
    plain = _child(tmp_path / "plain", parent)
    plain["parallel"] = {"tensor_parallel_size": 1}
    assert run(plain, 1) == (0, 2)
    with_moments, without = read_losses(child["run_dir"]), read_losses(plain["run_dir"])
    assert with_moments[1] == without[1]  # the same weights...
    assert with_moments[2] != without[2]  # ...but a different first update


def test_another_architecture_is_refused_naming_what_differs(tmp_path, parent):
    child = _child(tmp_path, parent)
    child["model"]["hidden_size"] = 128
    with pytest.raises(DistributedTestError, match=r"model\.hidden_size: saved 64, now 128"):
        run(child, 2)
