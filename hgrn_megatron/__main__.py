"""`hgrn-model`: facts about model presets, without building anything (unless asked to).

    hgrn-model presets                              # every preset: size, parameters, FLOPs per token
    hgrn-model info --preset hgrn-1b                # one preset in detail
    hgrn-model info --preset hgrn-1b --mixer attention --vocab-size 32000 --set seq_length=4096
    hgrn-model info --preset hgrn-7b --verify       # also build it on the meta device and count
"""
from __future__ import annotations

import argparse
import sys

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.flops import count_parameters, flops_per_token, forward_flops_per_token, matmul_flops_per_token
from hgrn_megatron.mixers import MIXERS, get_mixer
from hgrn_megatron.presets import PRESETS, REFERENCE_VOCAB_SIZE
from hgrn_megatron.runtime_env import exit_quietly_on_broken_pipe


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _config(args) -> ModelConfig:
    fields = {"preset": args.preset}
    if args.mixer:
        fields["mixer"] = args.mixer
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        fields[key.strip()] = _parse_value(value)
    return ModelConfig.build(fields, where="model")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


def count_on_meta(cfg: ModelConfig, vocab_size: int) -> int:
    """Build the model on the meta device (TP = 1, a one-process gloo group) and count its parameters."""
    from hgrn_megatron.runtime_env import configure_environment

    configure_environment()
    from hgrn_megatron.model import build_model, single_process_model_parallel

    with single_process_model_parallel():
        return sum(p.numel() for p in build_model(cfg, vocab_size, meta=True).parameters())


def cmd_info(args) -> int:
    cfg = _config(args)
    vocab, seq = args.vocab_size, cfg.seq_length
    params = count_parameters(cfg, vocab)
    embedding = vocab * cfg.hidden_size * (1 if cfg.share_embeddings_and_output_weights else 2)
    details = get_mixer(cfg.mixer).details
    print(f"preset            {cfg.preset}   mixer {cfg.mixer}" + (f" ({details(cfg)})" if details else ""))
    print(f"shape             d={cfg.hidden_size}  layers={cfg.num_layers}  ffn={cfg.ffn_hidden_size}  "
          f"heads={cfg.num_attention_heads}  seq={seq}  vocab={vocab}  "
          f"tied={cfg.share_embeddings_and_output_weights}")
    print(f"parameters        {params:,}  ({_human(params)}; non-embedding {_human(params - embedding)})")
    total = flops_per_token(cfg, vocab, seq)
    matmuls = matmul_flops_per_token(cfg, vocab, seq)
    print(f"train FLOPs/token {total:.4e}  (forward + backward; matmuls alone {matmuls:.4e})")
    print(f"6 x parameters    {6 * params:.4e}  (the usual estimate, for comparison)")
    for part, value in forward_flops_per_token(cfg, vocab, seq).items():
        print(f"  forward {part:<17s} {value:.4e}")
    if args.verify:
        counted = count_on_meta(cfg, vocab)
        status = "matches" if counted == params else "DIFFERS FROM"
        print(f"built on meta     {counted:,} parameters: {status} the analytic count")
        return 0 if counted == params else 1
    return 0


def cmd_presets(args) -> int:
    print(f"{'preset':<11s} {'d':>5s} {'L':>3s} {'ffn':>5s} {'tied':>5s} {'params':>12s} {'FLOPs/token':>12s}  "
          f"(vocab {args.vocab_size})")
    for name in PRESETS:
        cfg = ModelConfig.build({"preset": name})
        params = _human(count_parameters(cfg, args.vocab_size))
        print(f"{name:<11s} {cfg.hidden_size:>5d} {cfg.num_layers:>3d} {cfg.ffn_hidden_size:>5d} "
              f"{cfg.share_embeddings_and_output_weights!s:>5s} {params:>12s} "
              f"{flops_per_token(cfg, args.vocab_size):>12.4e}")
    return 0


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgrn-model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter count and FLOPs per token of one model")
    info.add_argument("--preset", required=True, choices=list(PRESETS))
    info.add_argument("--mixer", choices=list(MIXERS), help="override the mixer: "
                      + "; ".join(f"{name} = {spec.description}" for name, spec in MIXERS.items()))
    info.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a ModelConfig field")
    info.add_argument("--verify", action="store_true", help="also build on the meta device and count")
    for p in (info, sub.add_parser("presets", help="one line per preset")):
        p.add_argument("--vocab-size", type=int, default=REFERENCE_VOCAB_SIZE,
                       help=f"padded vocabulary size (default {REFERENCE_VOCAB_SIZE})")
    args = parser.parse_args(argv)
    try:
        return cmd_info(args) if args.command == "info" else cmd_presets(args)
    except ConfigError as err:
        print(f"hgrn-model: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
