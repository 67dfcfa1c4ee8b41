"""`hgrn-pretrain --config configs/RUN.yaml [key.sub=value ...] [--resume auto|none|PATH]`

Run by torchrun, by srun (SLURM variables) or as a single process. Exit codes: see hgrn_megatron.pretrain.
"""
from __future__ import annotations

import argparse
import logging
import sys

from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgrn-pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config YAML (sections: model, data, tokenizer, train, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.preset=tiny")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    configure_environment()
    from hgrn_megatron.pretrain import EXIT_ABORTED, EXIT_CONFIG_ERROR
    from hgrn_megatron.pretrain.config import dump_config, load_config
    from hgrn_megatron.pretrain.distributed import launch_env

    from hgrn_megatron.config_base import ConfigError

    le = launch_env()
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.validate_world(le.world_size)
        cfg.data.check_paths()  # a missing shard path or an empty glob fails here, not on some rank later
    except ConfigError as err:
        print(f"hgrn-pretrain: invalid config:\n{err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    _setup_logging(le.rank)
    patch_for_cpu()
    import torch.distributed as dist
    from hgrn_megatron.pretrain.trainer import TrainingAborted, train

    try:
        result = train(cfg, resume=args.resume)
    except TrainingAborted as err:
        logging.getLogger("hgrn_megatron.pretrain").error("aborted: %s", err)
        return EXIT_ABORTED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logging.getLogger("hgrn_megatron.pretrain").info("exit %d: %s at step %d", result.exit_code, result.reason, result.step)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
