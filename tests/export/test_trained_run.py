"""End to end: `hgrn-pretrain`'s own training loop (TP 2, ZeRO 3, document resets, validation) writes a run;
`hgrn-export-hf` exports it; the exported model, fed the trainer's validation batches without any document
mask (it finds the boundaries from EOS itself), reproduces the trainer's validation loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hgrn_megatron.export.__main__ import main as export_main
from hgrn_megatron.testing.distributed import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def run_tree(run_dir: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "seq_length": 128, "reset_at_document_boundary": True},
        # 100 validation samples = 12,800 tokens: past the first validation document, so resets happen.
        "data": {"train_shards": [str(ASSETS / "pile-mini" / "train-*.jsonl.zst")],
                 "valid_shards": [str(ASSETS / "pile-mini" / "val.jsonl.zst")], "valid_samples": 100,
                 "num_workers": 0},
        "tokenizer": {"model": str(ASSETS / "tokenizer" / "tokenizer.model")},
        "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 4, "seed": 3},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"warmup_steps": 1},
        "parallel": {"tensor_parallel_size": 2, "zero_stage": 3},
        "checkpoint": {"interval": 0},
        "logging": {"log_interval": 1, "tensorboard": False},
    }


def _train(tree: dict):
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    result = train(RunConfig.build(tree), resume="none")
    return result.exit_code


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    if not (ASSETS / "tokenizer" / "tokenizer.model").is_file():
        pytest.skip("the shipped test tokenizer (tests/assets/tokenizer) is missing")
    tree = run_tree(tmp_path_factory.mktemp("trained") / "run")
    assert run_distributed(_train, world_size=2, args=(tree,), timeout=300, threads_per_rank=1) == [0, 0]
    return tree


def test_exported_model_reproduces_the_trainers_validation_loss(trained_run, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.data import build_validation_batches, model_inputs
    from hgrn_megatron.tokenizer import Tokenizer

    run_dir = Path(trained_run["run_dir"])
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    step_dir = run_dir / "checkpoints" / "step-00000004"
    run_state = json.loads((step_dir / "run_state.json").read_text())
    assert f"{run_state['last_val_loss']:.4f}" in (out / "README.md").read_text()

    cfg = RunConfig.build(trained_run)
    tokenizer = Tokenizer.load(cfg.tokenizer.model)
    batches = build_validation_batches(cfg.data, tokenizer, cfg.model.seq_length, 2)["batches"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.reset_at_document_boundary and model.config.eos_token_id == tokenizer.eos_id
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            x = model_inputs(batch)
            logits = model(x.input_ids).logits  # document starts found from EOS, not from the data's mask
            loss = F.cross_entropy(logits.transpose(1, 2).double(), x.labels, reduction="sum")
            total, count = total + loss.item(), count + x.labels.numel()
    assert batches and any(b["doc_start"][:, 1:].any() for b in batches)  # the resets were exercised
    assert abs(total / count - run_state["last_val_loss"]) <= 1e-5 * run_state["last_val_loss"]
