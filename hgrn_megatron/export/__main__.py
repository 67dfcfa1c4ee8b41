"""`hgrn-export-hf`: export a training checkpoint to a Hugging Face directory.

    hgrn-export-hf --checkpoint RUN_DIR_OR_STEP_DIR --out DIR [--dtype fp32|bf16] [--format native|fla]

Exit codes: 0 written; 2 bad input (not a checkpoint, torn checkpoint, missing tokenizer, ...), one line on
stderr saying what and where.
"""
from __future__ import annotations

import argparse
import sys

from hgrn_megatron.export.checkpoint_reader import ExportError
from hgrn_megatron.runtime_env import exit_quietly_on_broken_pipe

EXIT_BAD_INPUT = 2


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgrn-export-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (its newest complete checkpoint) or a checkpoint step folder")
    parser.add_argument("--out", required=True, help="output directory (written as .NAME.tmp-PID, then renamed)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--format", choices=("native", "fla"), default="native",
                        help="native: self-contained model code (trust_remote_code); fla: flash-linear-attention's "
                             "HGRNForCausalLM (real variant, RMSNorm, SwiGLU, no biases)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece model (or its folder) if not where the run's config says")
    parser.add_argument("--max-shard-size", default="5GiB", type=parse_size,
                        help="largest safetensors file before sharding (e.g. 2GB, 500MiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)

    from hgrn_megatron.runtime_env import configure_environment

    configure_environment()  # before deepspeed (ZeRO consolidation) is imported
    from hgrn_megatron.export.exporter import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, fmt=args.format, tokenizer=args.tokenizer,
                          max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                          log=lambda msg: print(msg, file=sys.stderr))
    except ExportError as err:
        print(f"hgrn-export-hf: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
