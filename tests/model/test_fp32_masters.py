"""Under bf16 training the HGRU reads θ and the lower-bound table as the optimizer's fp32 masters.

Real DeepSpeed engines (the trainer's `build_engine`) on real gloo ranks take bf16 steps; a spy around the
HGRU's scan and forget gate records the θ and γ the forward pass used, which must equal the fp32 master copy
(`safe_get_full_fp32_param`; ZeRO 0: the unfused optimizer's fp32 copy) bit for bit, not its bf16 rounding.
"""
from __future__ import annotations

from pathlib import Path

import deepspeed  # noqa: F401  (imported once in the parent, before the ranks fork)
import pytest
import torch
import torch._inductor  # noqa: F401

from hgrn_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _run_config(zero_stage: int, tp: int, precision: str, micro: int = 2, accumulation: int = 1):
    from hgrn_megatron.pretrain.config import RunConfig

    return RunConfig.build({
        "run_dir": "unused",
        "model": {"preset": "tiny", "num_layers": 3, "seq_length": 16},
        "data": {"train_shards": [str(ASSETS / "pile-mini" / "train-*.jsonl.zst")], "num_workers": 0},
        "tokenizer": {"model": str(ASSETS / "tokenizer" / "tokenizer.model")},
        "train": {"steps": 100, "global_batch_size": micro * 2 // tp * accumulation, "micro_batch_size": micro,
                  "precision": precision, "eval_interval": 0},
        "optimizer": {"lr": 3e-2, "min_lr": 3e-2},  # large: θ and the table move by more than a bf16 ulp
        "schedule": {"warmup_steps": 0, "decay_style": "constant"},
        "parallel": {"zero_stage": zero_stage, "tensor_parallel_size": tp},
        "checkpoint": {"interval": 0, "save_at_end": False},
        "logging": {"tensorboard": False},
    })


def _bf16_steps_then_record(zero_stage: int, tp: int, accumulation: int = 1) -> dict:
    import hgrn_megatron.hgru as hgru
    from hgrn_megatron.model import lower_bounds_from_table
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.pretrain.engine import build_engine, fp32_master

    init_model_parallel(tp)
    engine = build_engine(_run_config(zero_stage, tp, "bf16", accumulation=accumulation), 256, dp_size=2 // tp)
    used = {"theta": [], "gamma": []}
    scan, gate = hgru.context_parallel_scan, hgru.forget_gate

    def spy_scan(*args, theta=None, **kwargs):
        used["theta"].append(theta.detach().clone())
        return scan(*args, theta=theta, **kwargs)

    def spy_gate(f, lower_bound):
        used["gamma"].append(None if lower_bound is None else lower_bound.detach().clone())
        return gate(f, lower_bound)

    hgru.context_parallel_scan, hgru.forget_gate = spy_scan, spy_gate
    try:
        gen = torch.Generator().manual_seed(torch.distributed.get_rank() // tp)
        for _ in range(3 * accumulation):  # three optimizer steps
            used["theta"].clear(), used["gamma"].clear()
            tokens = torch.randint(0, 256, (2, 17), generator=gen)
            loss = engine(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
            engine.backward(loss)
            engine.step()
        used["theta"].clear(), used["gamma"].clear()
        with torch.no_grad():
            engine(tokens[:, :-1])  # the forward after the last step
    finally:
        hgru.context_parallel_scan, hgru.forget_gate = scan, gate
    layers = engine.module.decoder.layers
    masters = [fp32_master(engine, layer.self_attention.theta).clone() for layer in layers]
    table = fp32_master(engine, engine.module.lower_bounds.table)
    gamma = lower_bounds_from_table(table)  # γ from the fp32 master table
    return {"used_theta": used["theta"], "used_gamma": used["gamma"], "masters": masters, "gamma": gamma,
            "table": table, "module_dtype": layers[0].self_attention.theta.dtype}


@pytest.mark.parametrize("zero_stage,tp,accumulation", [(0, 1, 1), (1, 1, 1), (2, 1, 2), (3, 1, 1), (1, 2, 1)],
                         ids=["zero0", "zero1", "zero2-accumulation2", "zero3", "tp2-zero1"])
def test_forward_uses_the_fp32_masters_after_bf16_steps(zero_stage, tp, accumulation):
    results = run_distributed(_bf16_steps_then_record, world_size=2, args=(zero_stage, tp, accumulation),
                              timeout=240)
    for rank in results:
        assert rank["module_dtype"] == torch.bfloat16  # DeepSpeed did cast the module
        assert len(rank["used_theta"]) == len(rank["masters"]) == 3
        for used, master in zip(rank["used_theta"], rank["masters"]):
            assert used.dtype == torch.float32 and torch.equal(used, master)
            # The fp32 master is not a bf16 value: the forward would have differed with the module's copy.
            assert not torch.equal(master, master.bfloat16().float())
        assert not torch.equal(rank["table"], rank["table"].bfloat16().float())  # trained off the bf16 grid
        assert rank["used_gamma"][0] is None  # layer 0: γ = 0
        for k, used in enumerate(rank["used_gamma"][1:], start=1):
            assert torch.equal(used, rank["gamma"][k])
    if tp == 2:  # each TP rank holds its own channels' θ
        assert not torch.equal(results[0]["masters"][1], results[1]["masters"][1])


def test_fp32_view_reads_the_master_and_passes_the_gradient_to_the_bf16_parameter():
    from hgrn_megatron.fp32_params import fp32_view, keep_fp32, set_master

    exact = torch.tensor([0.1, 1.0 / 3.0, 10000.0 ** -0.5], dtype=torch.float64)
    param = keep_fp32(torch.nn.Parameter(exact.to(torch.bfloat16)))
    assert torch.equal(fp32_view(param), param.float())  # no master recorded: the parameter itself
    set_master(param, exact.float())
    view = fp32_view(param)
    assert view.dtype == torch.float32 and torch.equal(view, exact.float())
    assert not torch.equal(view, param.float())
    (view * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert param.grad.dtype == torch.bfloat16 and torch.equal(param.grad.float(), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(RuntimeError, match="shape"):
        set_master(param, torch.zeros(2))
        fp32_view(param)


def _train(tree: dict):
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    result = train(RunConfig.build(tree), resume="auto")
    return result.exit_code, result.step


@pytest.mark.slow
def test_bf16_resume_is_bit_exact(tmp_path):
    """A resumed bf16 run reads θ and the table from the loaded masters: its losses equal the straight run's
    bit for bit (a forward still reading the freshly built model's values would differ from step 4 on)."""
    from tests.pretrain.conftest import read_losses, tiny_run_tree

    common = dict(train={"precision": "bf16", "steps": 6}, parallel={"zero_stage": 1},
                  schedule={"decay_steps": 6}, optimizer={"lr": 3e-2, "min_lr": 3e-3})
    straight = tiny_run_tree(tmp_path / "straight", **common)
    assert run_distributed(_train, world_size=2, args=(straight,), timeout=240)[0] == (0, 6)
    split = tiny_run_tree(tmp_path / "split", **common)
    split["train"]["steps"] = 3
    assert run_distributed(_train, world_size=2, args=(split,), timeout=240)[0] == (0, 3)
    split["train"]["steps"] = 6
    assert run_distributed(_train, world_size=2, args=(split,), timeout=240)[0] == (0, 6)
    assert read_losses(split["run_dir"]) == read_losses(straight["run_dir"])
