"""Model + optimizer + DeepSpeed engine, built from the run config. ZeRO stage, precision, micro-batching and
clipping come from the generated DeepSpeed JSON; TP comes from megatron's parallel_state via `MegatronMpu`."""
from __future__ import annotations

import math

import torch

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
    model = build_model(cfg.model, padded_vocab_size, initialize=initialize)
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
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
