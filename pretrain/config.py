"""The run config: one typed tree (model, data, tokenizer, optimizer, schedule, parallel, checkpoint, logging).

Read from YAML plus dotted overrides (`optimizer.lr=3e-4`), validated before any process group starts, saved
resolved in the run directory and in every checkpoint. The DeepSpeed JSON is generated from it (`deepspeed_config`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.config_base import ConfigError, ConfigNode, field_annotation, is_list_of_str
from hgrn_megatron.tokenizer.config import TokenizerConfig

from .data.config import DataConfig
from .preemption import DEFAULT_STOP_SIGNALS, signal_name_problem


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
        list(DEFAULT_STOP_SIGNALS),
        description="Signals that request save-and-exit (requeue code) at the next step; a second SIGINT aborts.",
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

    @field_validator("preemption_signals")
    @classmethod
    def _catchable(cls, names: list[str]) -> list[str]:
        for name in names:
            if problem := signal_name_problem(name):
                raise ValueError(problem)
        return names


class OptimizerConfig(ConfigNode):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-4, ge=0, description="Floor the schedule decays to.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay; never applied to norms, biases, θ, lower bounds.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay, in [0, 1).")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's second-moment decay, in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW's denominator term.")
    clip_grad: float = Field(1.0, ge=0, description="Global gradient-norm clipping; 0 = off.")


class ScheduleConfig(ConfigNode):
    warmup_steps: int = Field(20, ge=0, description="Linear warmup from 0 to optimizer.lr.")
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = Field(
        None, gt=0, description="Steps of decay after warmup; default: the rest of train.steps."
    )


class ParallelConfig(ConfigNode):
    tensor_parallel_size: int = Field(1, gt=0)
    context_parallel_size: int = Field(
        1, gt=0, description="Ranks that share one sequence, each holding a contiguous piece of it (world = TP x "
        "CP x DP); the HGRU passes only its recurrent state between them. model.seq_length must divide by it."
    )
    sequence_parallel: bool = Field(
        False, description="Megatron sequence parallelism: norms and the residual stream split along the sequence "
        "over the TP ranks (all-gather before the column-parallel projections, reduce-scatter after the row-parallel "
        "ones); every rank then keeps 1/TP of the activations TP alone replicates. A no-op at TP 1. "
        "model.seq_length / context_parallel_size must divide by TP."
    )
    zero_stage: Literal[0, 1, 2, 3] = 1
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl with CUDA, gloo without.")
    deepspeed_extra: dict[str, Any] = Field(
        {}, description="Extra DeepSpeed JSON keys, deep-merged over the generated config (passed through unchanged)."
    )


class CheckpointConfig(ConfigNode):
    interval: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end/preemption.")
    interval_minutes: float | None = Field(
        None, gt=0, description="Also save when this many minutes passed since the last save (agreed by all ranks "
        "at a step boundary): bounds the work a crash loses when step times vary."
    )
    async_save: bool = Field(
        False, description="Write the shards in a background thread: a step waits only for the snapshot of the "
        "state to host memory (buffers that stay allocated for the run: the rank's share of the checkpoint); the "
        "checkpoint is committed once every rank's writes succeeded."
    )
    init_from: str | None = Field(
        None, description="Start a new training phase from the weights of this checkpoint (a step folder or a run "
        "directory: its newest usable checkpoint), at any TP/DP/CP size, with this run's own data, schedule and "
        "step counter (context extension, annealing, a new mixture). Used only while this run has no checkpoint "
        "of its own; the architecture must match (seq_length may differ)."
    )
    init_optimizer: bool = Field(
        False, description="With init_from: also take the AdamW moments (else they start at zero, as Megatron's "
        "--finetune does)."
    )
    keep_last: int = Field(2, gt=0, description="Keep the newest K checkpoints...")
    keep_every: int | None = Field(None, gt=0, description="...plus every checkpoint whose step is a multiple of M.")
    save_at_end: bool = True


class WandbConfig(ConfigNode):
    project: str = Field("hgrn-megatron", description="Weights & Biases project.")
    entity: str | None = Field(None, description="W&B team or user; None: the account's default.")
    name: str | None = Field(None, description="Run name shown in W&B; None: the run directory's name.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline: write the run under RUN_DIR/wandb only (upload later with `wandb sync`)."
    )

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        # Checked when the config is read, before any process group: a missing package is one line, not a
        # traceback on rank 0 after the model was built.
        import importlib.util

        if self.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ValueError("the wandb package is not installed: pip install 'hgrn-megatron[wandb]' "
                             "(or set logging.wandb=null)")
        return self


class LoggingConfig(ConfigNode):
    log_interval: int = Field(10, gt=0, description="Steps between console lines / metrics.jsonl records.")
    tensorboard: bool = True
    wandb: WandbConfig | None = Field(
        None, description="Also log the scalars to Weights & Biases from rank 0 (None: off); a resumed run "
        "continues the same W&B run (its id is kept in RUN_DIR/wandb_run_id)."
    )


class EvalConfig(ConfigNode):
    """lm-evaluation-harness tasks on the live model during training (`pretrain/harness_eval.py`)."""

    harness_tasks: list[str] = Field(
        [], description="Harness task or group names evaluated in the loop (empty: off); needs the eval extra."
    )
    harness_interval: int | None = Field(
        None, gt=0, description="Steps between harness evaluations; None: at the steps checkpoint.interval saves. "
        "Always at the last step."
    )
    harness_task_dir: str | None = Field(None, description="Folder of extra task YAMLs (local data).")
    harness_limit: int | None = Field(None, gt=0, description="At most N documents per task.")
    harness_batch_size: int = Field(16, gt=0, description="Requests per forward on each data-parallel replica.")
    harness_num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: each task's own).")
    harness_log_samples: bool = Field(
        False, description="Keep the per-request records (arguments, log-likelihoods) in RUN_DIR/eval/step-N.json."
    )

    @field_validator("harness_tasks")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        names = [n.strip() for n in names]
        if any(not n for n in names):
            raise ValueError("an empty task name")
        # Checked when the config is read: a missing package is one line now, not an error at the first evaluation.
        import importlib.util

        from hgrn_megatron.harness.tasks import INSTALL_HINT

        if names and importlib.util.find_spec("lm_eval") is None:
            raise ValueError(f"{INSTALL_HINT}; or leave this list empty")
        return names

    def check_paths(self) -> None:
        if self.harness_tasks and self.harness_task_dir and not Path(self.harness_task_dir).is_dir():
            raise ConfigError(f"eval.harness_task_dir: {self.harness_task_dir} is not a directory")


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
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.eval.harness_tasks and self.parallel.context_parallel_size > 1:
            raise ValueError("eval.harness_tasks: harness evaluation in the loop needs parallel.context_parallel_size "
                             "1 (evaluate the checkpoints with hgrn-eval instead)")
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
        tp, cp = self.parallel.tensor_parallel_size, self.parallel.context_parallel_size
        if world_size % (tp * cp):
            raise ConfigError(f"parallel.tensor_parallel_size x context_parallel_size ({tp} x {cp}) does not divide "
                              f"the world size ({world_size})")
        dp = world_size // (tp * cp)
        if self.model.seq_length % cp:
            raise ConfigError(f"model.seq_length ({self.model.seq_length}) is not divisible by "
                              f"parallel.context_parallel_size ({cp})")
        if self.parallel.sequence_parallel and tp > 1 and self.model.seq_length % (cp * tp):
            raise ConfigError(f"parallel.sequence_parallel: model.seq_length ({self.model.seq_length}) is not "
                              f"divisible by context_parallel_size x tensor_parallel_size ({cp} x {tp}), as "
                              "sequence parallelism splits each piece over the TP ranks")
        if cp > 1:
            from hgrn_megatron.mixers import MIXERS

            if not MIXERS[self.model.mixer].context_parallel:
                raise ConfigError(f"parallel.context_parallel_size: the {self.model.mixer} mixer does not run "
                                  "context-parallel (only mixers whose description says so)")
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

    def check_start_files(self) -> None:
        """What a training start needs from the filesystem, checked on every rank before any process group:
        the shards resolve, the tokenizer loads, and run_dir is (or can become) a directory."""
        from hgrn_megatron.tokenizer import Tokenizer, TokenizerError

        self.data.check_paths()
        self.eval.check_paths()
        try:
            Tokenizer.load(self.tokenizer.model)
        except (TokenizerError, OSError) as err:
            raise ConfigError(f"tokenizer.model: {err}") from None
        run_dir = Path(self.run_dir)
        for path in (run_dir, *run_dir.parents):
            if path.exists() and not path.is_dir():
                raise ConfigError(f"run_dir: {path} is a file, not a directory" +
                                  ("" if path == run_dir else f" (so {run_dir} cannot be created)"))

    def grad_accumulation_steps(self, dp_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp_size)

    def deepspeed_config(self, dp_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON, generated from this tree; `parallel.deepspeed_extra` is deep-merged last.

        DeepSpeed's data-parallel group is DP x CP (gradients are averaged over every piece of every sequence),
        so in its batch arithmetic each of a sequence's CP pieces counts as one sample."""
        cfg: dict[str, Any] = {
            "train_batch_size": self.train.global_batch_size * self.parallel.context_parallel_size,
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
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed by `override_value`."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value = override_value(item, raw, field_annotation(RunConfig, parts))
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def override_value(item: str, raw: str, annotation: Any) -> Any:
    """The value of one override: YAML (safe_load: tags never construct objects), except where that cannot be
    what was meant for a text field. Paths and globs are text: `*.zst` is a YAML alias and `[ab]` a YAML list,
    so a field of type str takes the text as written unless YAML reads it as a string or null, and a list of
    strings falls back to splitting `[a, b]` at the commas outside brackets (or to the one item as written)."""
    if raw == "":
        return ""
    text_list = is_list_of_str(annotation)
    text = annotation is str or annotation == (str | None)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        if (text or text_list) and not isinstance(err, yaml.constructor.ConstructorError):  # a tag stays an error
            return _split_list(raw) if text_list else raw
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override '{item}': not a valid YAML value ({problem})") from None
    if text and value is not None and not isinstance(value, str):
        return raw
    if text_list and isinstance(value, list) and not all(isinstance(v, str) for v in value):
        return _split_list(raw)
    return value


def _split_list(raw: str) -> list[str]:
    """`[a/[ab]*.zst, b]` -> ['a/[ab]*.zst', 'b']: commas inside brackets belong to a glob's character class."""
    inner = raw.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        return [raw]
    items, depth, current = [], 0, ""
    for ch in inner[1:-1]:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += (ch == "[") - (ch == "]")
        current += ch
    items.append(current)
    items = [item.strip() for item in items]
    return [item[1:-1] if len(item) > 1 and item[0] == item[-1] and item[0] in "'\"" else item
            for item in items if item]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                              "save it as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    tree = apply_overrides(tree, list(overrides))
    return RunConfig.build(tree)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
