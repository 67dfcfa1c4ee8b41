"""HGRN against its Transformer baseline: forward + backward time per token of the model alone, by length.

    python benchmarks/model_mixer.py                         # d=256, 4 layers, seq 512, 2048 and 8192
    python benchmarks/model_mixer.py --hidden 512 --seq 1024 4096 16384 --json out.json

Both models are `hgrn_megatron.model.build_model` of the same config except `mixer` (megatron-core layers,
SwiGLU MLP, vocab-parallel head and loss, TP = 1), fed the same synthetic tokens; no optimizer, no data
loader. The baseline of each ratio is the attention model at the same sequence length, measured in the same
process, interleaved with the HGRN runs (so load on a shared host hits both). Achieved FLOP/s use the
analytic count of `hgrn_megatron.flops.flops_per_token`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.flops import flops_per_token
from hgrn_megatron.model import build_model, single_process_model_parallel
from hgrn_megatron.pretrain.data import model_inputs
from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

MIXERS = ("attention", "hgrn")  # the first is the baseline of every ratio


def step_seconds(model, tokens) -> float:
    """Wall seconds of one forward + backward (per-token loss, mean) and gradient reset."""
    start = time.perf_counter()
    x = model_inputs(tokens)
    model(x.input_ids, labels=x.labels).mean().backward()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(args) -> list[dict]:
    """Interleaved timings of both models at every length; one row per (mixer, length)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fields = dict(hidden_size=args.hidden, num_layers=args.layers, ffn_hidden_size=2 * args.hidden,
                  num_attention_heads=max(1, args.hidden // 64), seq_length=max(args.seq))
    cfgs = {mixer: ModelConfig(mixer=mixer, **fields) for mixer in MIXERS}
    models = {}
    for mixer, cfg in cfgs.items():
        torch.manual_seed(0)
        models[mixer] = build_model(cfg, args.vocab).to(device)

    rows = []
    for seq in args.seq:
        tokens = torch.randint(0, args.vocab, (args.batch, seq + 1), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)
        times = {mixer: [] for mixer in models}
        for model in models.values():
            step_seconds(model, tokens)  # warm-up
        for _ in range(args.repeats):
            for mixer, model in models.items():  # interleaved, so host load hits both alike
                times[mixer].append(step_seconds(model, tokens))
        base = statistics.median(times[MIXERS[0]])
        for mixer, samples in times.items():
            med = statistics.median(samples)
            tokens_per_s = args.batch * seq / med
            rows.append({
                "mixer": mixer, "seq": seq, "median_s": med, "tokens_per_s": tokens_per_s,
                "ratio_vs_attention": med / base,
                "achieved_gflops": flops_per_token(cfgs[mixer], args.vocab, seq) * tokens_per_s / 1e9,
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared host, OpenMP threads that lose their "
                             "core spin and make every op 10x slower; use the core count on an idle machine)")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    configure_environment()
    patch_for_cpu()
    torch.set_num_threads(args.threads)
    with single_process_model_parallel():
        rows = measure(args)
    print(f"d={args.hidden} layers={args.layers} vocab={args.vocab} batch={args.batch} threads={args.threads}")
    print(f"{'mixer':<10s} {'seq':>6s} {'s/step':>8s} {'tokens/s':>9s} {'time vs attention':>18s} {'GFLOP/s':>8s}")
    for r in rows:
        print(f"{r['mixer']:<10s} {r['seq']:>6d} {r['median_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['ratio_vs_attention']:>18.2f} {r['achieved_gflops']:>8.2f}")
    if args.json:
        info = {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
                "load_average_1m": os.getloadavg()[0],
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
