"""Model + optimizer + DeepSpeed engine, built from the run config. ZeRO stage, precision, micro-batching and
clipping come from the generated DeepSpeed JSON; TP comes from megatron's parallel_state via `MegatronMpu`."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from hgrn_megatron.fp32_params import fp32_parameters, set_master
from hgrn_megatron.model import build_model, no_weight_decay

from .config import RunConfig
from .distributed import MegatronMpu


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything `no_weight_decay` names (norms, biases, θ, bounds)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    # torch's AdamW: fused kernels on CUDA, the foreach path on CPU; DeepSpeed needs no JIT-built op for either.
    kwargs = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kwargs
    )


def learning_rate(cfg: RunConfig, step: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr, then min_lr.

    A pure function of the step, so skipped updates and resumes can never shift the schedule.
    """
    peak, floor = cfg.optimizer.lr, cfg.optimizer.min_lr
    warmup = cfg.schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule.decay_style == "constant":
        return peak
    decay_steps = cfg.schedule.decay_steps or max(1, cfg.train.steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.schedule.decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (peak - floor) * coeff


def build_engine(cfg: RunConfig, padded_vocab_size: int, dp_size: int, load_universal: bool = False,
                 initialize: bool = True):
    """Build the megatron model, torch AdamW and the DeepSpeed engine around them. `initialize=False` when a
    checkpoint will overwrite every weight (a resume): the random initialisation is skipped."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, padded_vocab_size, initialize=initialize,
                        sequence_parallel=cfg.parallel.sequence_parallel)
    initial_fp32 = {name: p.detach().float().clone() for name, p in fp32_parameters(model)}
    optimizer = build_optimizer(cfg, model)
    ds_config = cfg.deepspeed_config(dp_size)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        mpu=MegatronMpu(),
        dist_init_required=False,
    )
    keep_fp32_masters_in_forward(engine, initial_fp32)
    return engine


def keep_fp32_masters_in_forward(engine, initial: dict[str, torch.Tensor]) -> None:
    """Under bf16/fp16 the forward pass reads the marked parameters (θ, the lower-bound table:
    `hgrn_megatron.fp32_params`) as the optimizer's fp32 masters rather than the module's low-precision copies.

    DeepSpeed builds its fp32 masters from the already-cast module, so first they get back the exact fp32
    initial values; then every rank's copy of each master is refreshed after each optimizer step and after a
    checkpoint load. Both are collectives over the data-parallel group (every rank calls `step` and
    `load_checkpoint`). In fp32 training the module's parameters are the values the optimizer updates.
    """
    params = fp32_parameters(engine.module)
    if not params or not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return
    for name, param in params:
        set_fp32_master(engine, param, initial[name])

    def refresh() -> None:
        for _, param in params:
            set_master(param, fp32_master(engine, param))

    refresh()
    step, load_checkpoint = engine.step, engine.load_checkpoint

    def step_then_refresh(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()  # the step updates parameters only there
        result = step(*args, **kwargs)
        if boundary:
            refresh()
        return result

    def load_then_refresh(*args, **kwargs):
        result = load_checkpoint(*args, **kwargs)
        refresh()
        return result

    # Instance attributes: every caller of engine.step / engine.load_checkpoint keeps the masters current.
    engine.step, engine.load_checkpoint = step_then_refresh, load_then_refresh


def fp32_master(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The optimizer's fp32 master of `param` under bf16/fp16: ZeRO 1-3 and DeepSpeed's BF16 optimizer through
    `safe_get_full_fp32_param` (a collective over the data-parallel group: a full copy), ZeRO 0's unfused
    optimizer (`fp16_groups` / `fp32_groups`, one fp32 copy per parameter) directly (the copy itself)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is not None:
        return value
    optimizer = engine.optimizer
    for low, high in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        for candidate, master in zip(low, high):
            if candidate is param:
                return master
    raise RuntimeError(f"fp32_master: no fp32 master copy of a {tuple(param.shape)} parameter in "
                       f"{type(optimizer).__name__}")


def set_fp32_master(engine, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite the optimizer's fp32 master of `param` with `value` (the full tensor of this TP rank)."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3, BF16 optimizer: partitioned
        safe_set_full_fp32_param(param, value.to(engine.device))
        return
    with torch.no_grad():
        fp32_master(engine, param).copy_(value)


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def seed_rank_rngs(seed: int, rank: int, step: int) -> None:
    """Seed python, numpy and torch for `rank` at `step` (a fresh run, or a resume whose RNG states cannot be
    restored because the layout changed)."""
    s = seed + 1000003 * rank + step
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def grad_norm(engine) -> float:
    """Global L2 norm of the (already data-parallel-reduced) gradients, counting TP-replicated ones once."""
    from deepspeed.runtime.utils import clip_grad_norm_

    params = [p for p in engine.module.parameters() if p.grad is not None]
    return float(clip_grad_norm_(params, max_norm=float("inf"), mpu=engine.mpu)) if params else 0.0


def step_without_update(engine) -> None:
    """engine.step() (micro-step counters, zeroed gradients) without touching parameters or AdamW state."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()  # finite, so DeepSpeed's clipping pass computes a norm of 0
    optimizer = engine.optimizer
    optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the bound method once
    try:
        engine.step()
    finally:
        del optimizer.step
