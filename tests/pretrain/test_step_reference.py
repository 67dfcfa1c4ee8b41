"""The trainer's first optimizer step against a hand-written reference: a float64 next-token cross-entropy, the
mean over every token of the global batch, its gradient clipped to `optimizer.clip_grad`, and one AdamW step at the
schedule's first learning rate with weight decay only where `no_weight_decay` says so.

The run splits the global batch over 2 data-parallel ranks and 2 micro-batches each (gradient accumulation), so a
loss or gradient normalised per micro-batch, per rank or per step instead of per token, a missing or doubled
clipping, a wrong learning rate or decay on a norm shows here, where the parallel tests only compare the trainer
with itself. AdamW's eps is large so that the update depends on the gradient's scale (at the usual 1e-8 the first
step is about lr x sign(g) and would hide the clipping).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hgrn_megatron.testing.distributed import run_distributed

from .conftest import tiny_run_tree

pytestmark = [pytest.mark.distributed]

GLOBAL_BATCH, CLIP, EPS, PEAK_LR, WARMUP = 8, 0.1, 1e-3, 4e-2, 4


def _train(tree: dict) -> int:
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    return train(RunConfig.build(tree), resume="none").exit_code


def _tree(run_dir: Path, lr: float, micro_batch: int, context_parallel: int = 1) -> dict:
    return tiny_run_tree(
        run_dir,
        train={"steps": 1, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": micro_batch, "eval_interval": 0,
               "seed": 7},
        optimizer={"lr": lr, "min_lr": 0.0, "weight_decay": 0.5, "clip_grad": CLIP, "eps": EPS},
        schedule={"warmup_steps": WARMUP}, parallel={"zero_stage": 1, "context_parallel_size": context_parallel},
        checkpoint={"interval": 0, "keep_last": 1, "save_at_end": True},
        data={"lanes": 8},
    )


def _reference_step(initial_run: str, tree: dict) -> dict:
    """(loss, gradient norm, worst parameter error against the run's step) computed by hand in float64."""
    import torch
    from megatron.core import parallel_state

    from hgrn_megatron.export.checkpoint_reader import read_checkpoint
    from hgrn_megatron.model import build_model, no_weight_decay
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.data import TrainLoader, model_inputs
    from hgrn_megatron.tokenizer import Tokenizer, padded_vocab_size

    cfg = RunConfig.build(tree)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tokenizer = Tokenizer.load(cfg.tokenizer.model)
    model = build_model(cfg.model, padded_vocab_size(tokenizer.vocab_size, 1))
    model.load_state_dict(read_checkpoint(initial_run).state_dict)
    after = read_checkpoint(tree["run_dir"]).state_dict
    with TrainLoader(cfg.data, tokenizer, cfg.model.seq_length, GLOBAL_BATCH) as loader:
        x = model_inputs(next(loader))  # the whole global batch: samples 0 .. GLOBAL_BATCH - 1
    logits = model(x.input_ids, doc_start=x.doc_start).double()
    loss = -torch.log_softmax(logits, -1).gather(-1, x.labels[..., None]).mean()
    loss.backward()
    params = dict(model.named_parameters())
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values())).item()
    scale = min(1.0, CLIP / (norm + 1e-6))  # DeepSpeed's clip coefficient
    o, lr = cfg.optimizer, PEAK_LR / WARMUP  # first step of the linear warmup
    worst = 0.0
    for name, p in params.items():
        g = p.grad.double() * scale
        m_hat, v_hat = g, g * g  # AdamW's bias-corrected moments after one step
        decay = 0.0 if no_weight_decay(name, p) else o.weight_decay
        expected = p.detach().double() * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + o.eps)
        worst = max(worst, (after[name].double() - expected).abs().max().item())
    return {"loss": loss.item(), "grad_norm": norm, "worst": worst, "scale": scale}


@pytest.mark.parametrize("micro_batch,context_parallel", [(2, 1), (4, 2)], ids=["dp2", "cp2"])
def test_first_step_equals_a_float64_reference(tmp_path, micro_batch, context_parallel):
    """2 ranks, 2 micro-batches each: data parallel (2 samples per micro-batch), or context parallel (each rank
    half of every sequence of 4-sample micro-batches)."""
    initial = _tree(tmp_path / "initial", 1e-30, 4)  # one rank; a step of 1e-30 leaves the initial weights
    stepped = _tree(tmp_path / "stepped", PEAK_LR, micro_batch, context_parallel)
    assert run_distributed(_train, world_size=1, args=(initial,), timeout=240) == [0]
    assert run_distributed(_train, world_size=2, args=(stepped,), timeout=240) == [0, 0]
    logged = json.loads((tmp_path / "stepped" / "metrics.jsonl").read_text().splitlines()[0])
    run_state = json.loads(next((tmp_path / "stepped" / "checkpoints").glob("step-*/run_state.json")).read_text())
    assert (run_state["dp_size"], run_state["cp_size"]) == (2 // context_parallel, context_parallel)
    ref = run_distributed(_reference_step, world_size=1, args=(initial["run_dir"], stepped), timeout=240)[0]
    assert ref["scale"] < 0.5  # clipping is active
    assert logged["lr"] == pytest.approx(PEAK_LR / WARMUP, rel=1e-12)
    assert logged["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert logged["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert ref["worst"] < 1e-6  # the update itself is about lr = 1e-2 per element
