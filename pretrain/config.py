"""The run config: one typed tree (model, data, tokenizer, optimizer, schedule, parallel, checkpoint, logging).

Read from YAML plus dotted overrides (`optimizer.lr=3e-4`), validated before any process group starts, saved
resolved in the run directory and in every checkpoint. The DeepSpeed JSON is generated from it (`deepspeed_config`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.config_base import ConfigError, ConfigNode
from hgrn_megatron.tokenizer.config import TokenizerConfig

from .data.config import DataConfig


# ---------------------------------------------------------------- training loop
class TrainConfig(ConfigNode):
    steps: int = Field(300, gt=0, description="Optimizer steps to train for (the run's total, across resumes).")
    global_batch_size: int = Field(8, gt=0, description="Samples per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = Field(2, gt=0, description="Samples per forward/backward on one rank.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 needs a GPU.")
    seed: int = Field(1234, description="Seeds weights (identical at any TP size) and every rank's RNG.")
    eval_interval: int = Field(100, ge=0, description="Steps between validation passes; 0 = never.")
    max_nonfinite_in_a_row: int = Field(
        5, gt=0, description="Non-finite loss/grad-norm steps are skipped; this many in a row abort the run."
    )
    exit_after_minutes: float | None = Field(
        None, gt=0, description="Wall-clock budget: save and exit with the requeue code once exceeded."
    )
    preemption_signals: list[str] = Field(
        ["SIGUSR1", "SIGTERM"], description="Signals that request save-and-exit (requeue code) at the next step."
    )
    inject_nonfinite_at_steps: list[int] = Field(
        [], description="Testing aid: multiply the loss by NaN at these steps (1-based) to exercise skipping."
    )
    # Hang detection (pretrain/watchdog.py, docs/LAUNCH.md "Failures"): a rank without progress for this long
    # dumps its threads' stacks to run_dir/hangs/ and exits 76, which the sbatch script requeues.
    hang_timeout_minutes: float = Field(
        10.0, ge=0, description="Watchdog limit after the first step: longer than any step, eval pass or "
        "checkpoint save; 0 = no watchdog."
    )
    hang_startup_minutes: float = Field(
        30.0, gt=0, description="Watchdog limit until the first step completes (rendezvous, engine, resume, "
        "first compilation)."
    )
    collective_timeout_minutes: float = Field(
        15.0, gt=0, description="Timeout of every gloo/NCCL collective once the first step completed (start-up "
        "keeps 30 min); a collective waiting longer fails instead of hanging."
    )


class OptimizerConfig(ConfigNode):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-4, ge=0, description="Floor the schedule decays to.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay; never applied to norms, biases, θ, lower bounds.")
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = Field(1.0, ge=0, description="Global gradient-norm clipping; 0 = off.")


class ScheduleConfig(ConfigNode):
    warmup_steps: int = Field(20, ge=0, description="Linear warmup from 0 to optimizer.lr.")
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = Field(
        None, gt=0, description="Steps of decay after warmup; default: the rest of train.steps."
    )


class ParallelConfig(ConfigNode):
    tensor_parallel_size: int = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl with CUDA, gloo without.")
    deepspeed_extra: dict[str, Any] = Field(
        {}, description="Extra DeepSpeed JSON keys, deep-merged over the generated config (passed through unchanged)."
    )


class CheckpointConfig(ConfigNode):
    interval: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end/preemption.")
    keep_last: int = Field(2, gt=0, description="Keep the newest K checkpoints...")
    keep_every: int | None = Field(None, gt=0, description="...plus every checkpoint whose step is a multiple of M.")
    save_at_end: bool = True


class LoggingConfig(ConfigNode):
    log_interval: int = Field(10, gt=0, description="Steps between console lines / metrics.jsonl records.")
    tensorboard: bool = True


class RunConfig(ConfigNode):
    run_dir: str = Field(
        "runs/default", description="Checkpoints, metrics.jsonl, tensorboard/ and config.yaml go here."
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig
    tokenizer: TokenizerConfig
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.optimizer.min_lr > self.optimizer.lr:
            raise ValueError(f"optimizer.min_lr ({self.optimizer.min_lr}) exceeds optimizer.lr ({self.optimizer.lr})")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) is not a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size})"
            )
        return self

    # ------------------------------------------------------------ derived quantities
    def validate_world(self, world_size: int) -> None:
        """Check the parallel arithmetic for `world_size` ranks; one ConfigError line per problem."""
        tp = self.parallel.tensor_parallel_size
        if world_size % tp:
            raise ConfigError(f"parallel.tensor_parallel_size ({tp}) does not divide the world size ({world_size})")
        dp = world_size // tp
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) is not divisible by "
                f"micro_batch_size x data-parallel size ({self.train.micro_batch_size} x {dp} = {per_step})"
            )
        self.model.validate_parallel(tp)
        if self.train.precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("train.precision: fp16 needs a CUDA device (use fp32 or bf16 on CPU)")

    def grad_accumulation_steps(self, dp_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp_size)

    def deepspeed_config(self, dp_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON, generated from this tree; `parallel.deepspeed_extra` is deep-merged last."""
        cfg: dict[str, Any] = {
            "train_batch_size": self.train.global_batch_size,
            "train_micro_batch_size_per_gpu": self.train.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accumulation_steps(dp_size),
            "gradient_clipping": self.optimizer.clip_grad,
            "zero_optimization": {"stage": self.parallel.zero_stage},
            "bf16": {"enabled": self.train.precision == "bf16"},
            "fp16": {"enabled": self.train.precision == "fp16", "initial_scale_power": 16},
            # The client optimizer is torch's AdamW: nothing to JIT-compile.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(cfg, self.parallel.deepspeed_extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------- loading
def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    tree = apply_overrides(tree, list(overrides))
    return RunConfig.build(tree)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
