"""`hgrn-checkpoint reshard CHECKPOINT [--workers N]`: convert a checkpoint once into DeepSpeed's universal format,
so a job at another DP, TP or CP size can load it.

The trainer does this on rank 0 when it resumes at another size (in a subprocess running this command); for a
large checkpoint, run it as its own step before the job (e.g. in the sbatch script) with a worker per core of
the node: the conversion is then neither repeated by a retry nor waited for by every rank of the job.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgrn-checkpoint", description="Checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    reshard = commands.add_parser("reshard", help=__doc__.split("\n")[0].split(": ", 1)[1])
    reshard.add_argument("checkpoint", help="a checkpoint step folder, or a run directory (its newest checkpoint)")
    reshard.add_argument("--workers", type=int, default=None,
                         help="processes extracting and merging parameters (default: the cores, up to 8)")
    args = parser.parse_args(argv)
    from hgrn_megatron.runtime_env import configure_environment

    configure_environment()
    from . import CheckpointError, convert_to_universal, resume_candidates
    from .load import conversion_workers

    path = Path(args.checkpoint)
    try:
        found = resume_candidates(str(path), path) if path.is_dir() else []
        if not found:
            raise CheckpointError(f"{path}: no usable checkpoint there")
    except CheckpointError as err:
        print(f"hgrn-checkpoint reshard: {err}", file=sys.stderr)
        return 2
    workers = args.workers or conversion_workers()
    t0 = time.perf_counter()
    convert_to_universal(found[0], workers=workers)
    print(f"{found[0]}: universal checkpoint ready ({workers} workers, {time.perf_counter() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
