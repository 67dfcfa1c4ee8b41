"""Logit drift of bf16 training's forward pass against fp32, with θ and the lower-bound table in bf16 or fp32.

    python benchmarks/bf16_drift.py                       # 4 layers, d = 128, T = 512 and 8192
    python benchmarks/bf16_drift.py --seq 512 8192 32768 --json out.json

One HGRN (`build_model`, TP = 1) with θ at its initial values (10000^(−2j/d), not representable in bf16) and
a lower-bound table like a trained one (γ rising with depth to about 0.99 in the last layer, random per
channel: `--table-scale`). Its fp32 forward gives the reference logits; then, as DeepSpeed's bf16 training
runs it, the same model with every parameter cast to bf16:
- `bf16, θ/table bf16`: the forward reads θ and the table from their bf16 copies (before `fp32_params`);
- `bf16, θ/table fp32`: the forward reads them as the fp32 masters (what the engine now does);
and, to isolate the two parameters, the fp32 model with only θ and the table rounded to bf16.
Drift = ‖logits − reference‖ / ‖reference‖ over all tokens (and the largest absolute logit difference), for
the whole sequence and its last quarter (where a state has travelled furthest).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from hgrn_megatron.config import ModelConfig  # noqa: E402
from hgrn_megatron.fp32_params import fp32_parameters, set_master  # noqa: E402
from hgrn_megatron.model import build_model, single_process_model_parallel  # noqa: E402
from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu  # noqa: E402


def trained_like_table(num_layers: int, channels: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A table whose γ rises with depth (layer 0's softmax weight small) and varies per channel."""
    table = torch.randn(num_layers, channels, generator=gen) * scale
    table[0] -= 4.0
    return table


def drift(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    tail = reference.shape[1] * 3 // 4
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"relative": rel(logits, reference), "relative_last_quarter": rel(logits[:, tail:], reference[:, tail:]),
            "max_abs": float((logits - reference).abs().max())}


def build(cfg: ModelConfig, args) -> torch.nn.Module:
    """The benchmark's fp32 model (the same values on every call)."""
    torch.manual_seed(0)
    model = build_model(cfg, args.vocab).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lower_bounds.table.copy_(trained_like_table(args.layers, args.hidden, args.table_scale, gen))
    return model


def variants(cfg: ModelConfig, args):
    """(name, model) for each way of running the forward; all hold the reference model's parameter values."""
    rounded = build(cfg, args)
    with torch.no_grad():
        for _, p in fp32_parameters(rounded):
            p.copy_(p.bfloat16().float())
    before = build(cfg, args).bfloat16()
    after = build(cfg, args)
    exact = {name: p.detach().clone() for name, p in fp32_parameters(after)}
    after = after.bfloat16()  # casts in place: the same Parameter objects, now bf16
    for name, p in fp32_parameters(after):
        set_master(p, exact[name])
    return [("fp32, only θ/table rounded to bf16", rounded), ("bf16, θ/table bf16 (before)", before),
            ("bf16, θ/table fp32 (after)", after)]


def measure(args) -> list[dict]:
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, ffn_hidden_size=2 * args.hidden,
                      num_attention_heads=max(1, args.hidden // 64), seq_length=max(args.seq))
    model = build(cfg, args)
    runs = variants(cfg, args)
    rows = []
    for seq in args.seq:
        tokens = torch.randint(0, args.vocab, (1, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            reference = model(tokens).double()
            for name, variant in runs:
                rows.append({"seq": seq, "forward": name, **drift(variant(tokens).double(), reference)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--table-scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    configure_environment()
    patch_for_cpu()
    with single_process_model_parallel():
        rows = measure(args)
    print("\n| T | forward | relative drift | last quarter | max abs |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['forward']} | {r['relative']:.2e} | {r['relative_last_quarter']:.2e} "
              f"| {r['max_abs']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
