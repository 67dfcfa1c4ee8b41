"""`hgrn-pretrain --config configs/RUN.yaml [key.sub=value ...] [--resume auto|none|PATH]`

Run by torchrun, by srun (SLURM variables) or as a single process. Exit codes: see hgrn_megatron.pretrain.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hgrn_megatron.runtime_env import configure_environment, exit_quietly_on_broken_pipe, patch_for_cpu

from . import EXIT_ABORTED, EXIT_CONFIG_ERROR
from .preemption import hold_stop_signals, record_early_signals, release_early_signals


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def plan(cfg, world_size: int, machine=None) -> str:
    """What a run of `cfg` on `world_size` ranks would do, computed without building anything: the batch
    arithmetic, memory per GPU, the longest sequence that fits, time and nodes (`sizing.py`: the model)."""
    import json

    from hgrn_megatron.config_base import ConfigError
    from hgrn_megatron.flops import count_parameters, flops_per_token
    from hgrn_megatron.tokenizer import Tokenizer, TokenizerError, padded_vocab_size

    from . import sizing

    tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    dp = world_size // (tp * cp)
    try:
        vocab = Tokenizer.load(cfg.tokenizer.model).vocab_size
        vocab_note = f"tokenizer {cfg.tokenizer.model}: {vocab} pieces"
    except (TokenizerError, OSError) as err:
        from hgrn_megatron.presets import REFERENCE_VOCAB_SIZE

        vocab = REFERENCE_VOCAB_SIZE
        vocab_note = f"tokenizer not loadable ({err}); counting with the reference vocabulary {vocab}"
    padded = padded_vocab_size(vocab, tp)
    try:
        cfg.data.check_paths()
        data_note = "shard paths resolve"
    except ConfigError as err:
        data_note = f"not checkable here ({err})"
    seq, steps = cfg.model.seq_length, cfg.train.steps
    tokens_per_step = cfg.train.global_batch_size * seq
    m = cfg.model
    params, flops = count_parameters(cfg.model, padded), flops_per_token(cfg.model, padded, seq)
    cp_part = f"CP {cp} x " if cp > 1 else ""
    recompute = (f"{m.recompute_granularity} ({m.recompute_method}, {m.recompute_num_layers} layer"
                 f"{'s' if m.recompute_num_layers > 1 else ''})" if m.recompute_granularity else "off")
    return "\n".join([
        f"model: {cfg.model.preset or 'custom'} ({cfg.model.mixer}), "
        f"{params / 1e6:,.1f} M parameters, {flops:.3e} training FLOPs/token at seq {seq}",
        f"vocabulary: {vocab_note}; padded to {padded} (multiple of 128 x TP {tp})",
        f"world {world_size} = TP {tp} x {cp_part}DP {dp}; ZeRO {cfg.parallel.zero_stage}; {cfg.train.precision}; "
        f"activation recompute {recompute}",
        f"batch: {cfg.train.global_batch_size} samples = micro-batch {cfg.train.micro_batch_size} x DP {dp} x "
        f"accumulation {cfg.grad_accumulation_steps(dp)}; {tokens_per_step:,} tokens/step, "
        f"{tokens_per_step * steps / 1e9:.3f} B tokens in {steps:,} steps",
        *sizing.report(cfg, world_size, params, padded, flops, machine or sizing.Machine()),
        f"data: {data_note}",
        f"run dir: {cfg.run_dir}",
        "DeepSpeed config:",
        json.dumps(cfg.deepspeed_config(dp), indent=2),
    ])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hgrn-pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config YAML (sections: model, data, tokenizer, train, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.preset=tiny")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config for --world-size ranks, print the plan (parameters, FLOPs, batch "
                             "arithmetic, DeepSpeed JSON) and exit; starts no process group, needs no GPU")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: the number of ranks to plan for (default: the launcher's; on one "
                             "process, the config's tensor_parallel_size)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="with --dry-run: GPU memory to size for (default 80)")
    parser.add_argument("--mfu", type=float, default=0.45,
                        help="with --dry-run: model FLOP utilisation to estimate the time with (default 0.45)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="with --dry-run: dense peak TFLOP/s per GPU (default 989: H100/H200 bf16)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="with --dry-run: GPUs per node (default 8)")
    return parser


def _command_line_problem(args) -> str | None:
    """The mistakes a first command line makes, in words (before the config is even read)."""
    if args.config is None and not args.overrides:
        return "no config given: hgrn-pretrain --config FILE.yaml [key.sub=value ...] (see configs/)"
    for item in args.overrides:
        if "=" not in item and (item.endswith((".yaml", ".yml")) or Path(item).is_file()):
            return (f"'{item}' is not an override (key.sub=value); to train with the config file, pass it as "
                    f"--config {item}")
    return None


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    # First, before the imports of torch and DeepSpeed (seconds; minutes from a shared filesystem): a stop signal
    # received from now on is kept for the trainer, not lost and not fatal.
    record_early_signals()
    try:
        return _main(argv)
    finally:
        release_early_signals()  # nothing to undo once the trainer adopted them


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # overrides and flags in any order
    if problem := _command_line_problem(args):
        parser.print_usage(sys.stderr)
        print(f"hgrn-pretrain: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    from hgrn_megatron.config_base import ConfigError

    from .config import dump_config, load_config

    try:
        cfg = load_config(args.config, args.overrides)  # before torch is imported: a mistake is reported at once
    except ConfigError as err:
        return _config_error(err)
    configure_environment()
    from .distributed import launch_env

    try:
        le = launch_env()
    except RuntimeError as err:
        print(f"hgrn-pretrain: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        # --print-config shows a config from anywhere; a dry run plans for --world-size ranks, by default the
        # launcher's, or on one process the smallest world the config fits (its TP size).
        world_size = args.world_size or (le.world_size if le.world_size > 1 or not args.dry_run
                                         else cfg.parallel.tensor_parallel_size)
        if not args.print_config:
            _validate_world(cfg, world_size, explain=args.dry_run)
        if not (args.dry_run or args.print_config):  # a dry run reports the data and tokenizer instead
            cfg.check_start_files()  # a missing shard or tokenizer fails here, once, not on every rank later
    except ConfigError as err:
        return _config_error(err)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.dry_run:
        from .sizing import Machine

        print(plan(cfg, world_size, Machine(args.gpu_memory_gib, args.gpus_per_node, args.mfu,
                                             args.peak_tflops * 1e12)))
        return 0
    return _train(cfg, args.resume, le.rank)


def _validate_world(cfg, world_size: int, explain: bool) -> None:
    """cfg.validate_world; for a dry run, a batch that does not split over the ranks also says what would."""
    from hgrn_megatron.config_base import ConfigError

    try:
        cfg.validate_world(world_size)
    except ConfigError as err:
        tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
        t, replica = cfg.train, tp * cp
        per_pass = t.micro_batch_size * world_size // replica
        if not explain or world_size % replica or t.global_batch_size % per_pass == 0:
            raise  # not the batch arithmetic
        from .sizing import batch_fixes

        fixes = batch_fixes(t.global_batch_size, t.micro_batch_size, world_size // replica, replica)
        raise ConfigError(f"{err}\n  would work: " + "\n  would work: ".join(fixes)) from None


def _config_error(err: Exception) -> int:
    print(f"hgrn-pretrain: invalid config:\n{err}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def _train(cfg, resume: str, rank: int) -> int:
    _setup_logging(rank)
    patch_for_cpu()
    import torch.distributed as dist

    from hgrn_megatron.config_base import ConfigError

    from .checkpoint import CheckpointError, CheckpointWriteError
    from .trainer import TrainingAborted, train

    log = logging.getLogger("hgrn_megatron.pretrain")
    try:
        result = train(cfg, resume=resume)
    except TrainingAborted as err:
        log.error("aborted: %s", err)
        return EXIT_ABORTED
    except CheckpointWriteError as err:  # e.g. a full disk: the environment failed, not the config
        log.error("checkpoint not written: %s", err)
        return 1
    except (CheckpointError, ConfigError) as err:  # the checkpoint or data do not fit this config / command
        log.error("cannot start: %s", err)
        return EXIT_CONFIG_ERROR
    finally:
        # The exit code is decided: a stop signal from now on (a late notice, a burst) must not turn it into a
        # death by that signal during the teardown or the interpreter's shutdown.
        hold_stop_signals()
        if dist.is_initialized():
            dist.destroy_process_group()
    log.info("exit %d: %s at step %d", result.exit_code, result.reason, result.step)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
