"""Decode cost of the exported HGRN model against context length: ms per generated token after a prompt of
128 tokens and after 4096 (goal: ratio <= 1.1, since each step carries only an O(d) state per layer).

    python benchmarks/decode.py                       # small model, contexts 128 and 4096
    python benchmarks/decode.py --hidden-size 768 --layers 12 --ffn 1408 --vocab 32000 --threads 2

Both contexts are measured in the same process on the same model (random weights: cost does not depend on
them). For contrast it also times one step without the cache (a full forward over the context), which is
what a model without a recurrent state would pay per token.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build_model(args):
    from hgrn_megatron.export.hf_files.configuration_hgrn import HGRNConfig
    from hgrn_megatron.export.hf_files.modeling_hgrn import HGRNForCausalLM

    config = HGRNConfig(vocab_size=args.vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                        intermediate_size=args.ffn, variant=args.variant, eos_token_id=2, scan_backend="torch")
    torch.manual_seed(0)
    return HGRNForCausalLM(config).eval()


@torch.no_grad()
def prefill(model, context: int):
    ids = torch.randint(4, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    out = model(ids, use_cache=True, logits_to_keep=1)
    return ids, out.cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_ms(model, cache, token, new_tokens: int) -> float:
    """ms per cached decode step, continuing from `cache` (left untouched)."""
    cache = copy.deepcopy(cache)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) * 1e3 / new_tokens


@torch.no_grad()
def uncached_ms(model, ids, token) -> float:
    """ms of one step that re-reads the whole context (no recurrent state)."""
    start = time.perf_counter()
    model(torch.cat([ids, token], dim=1), logits_to_keep=1)
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--variant", choices=("complex", "real"), default="complex")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a batch-1 decode step is latency-bound: 1 is steadiest on a busy host)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"HGRN {args.variant}: d={args.hidden_size}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab} "
          f"({params / 1e6:.1f} M parameters), {torch.get_num_threads()} threads, "
          f"{args.new_tokens} tokens x {args.repeats} repeats")
    states = {c: prefill(model, c) for c in args.contexts}
    decode_ms(model, states[args.contexts[0]][1], states[args.contexts[0]][2], 4)  # warm-up
    # Contexts alternate within each repeat, so drifting machine load hits both alike; medians are reported.
    samples = {c: [] for c in args.contexts}
    for _ in range(args.repeats):
        for c, (_, cache, token) in states.items():
            samples[c].append(decode_ms(model, cache, token, args.new_tokens))
    uncached = {c: uncached_ms(model, ids, token) for c, (ids, _, token) in states.items()}
    base = args.contexts[0]
    cached = {c: statistics.median(v) for c, v in samples.items()}
    print(f"{'context':>8} {'ms/token (cache)':>17} {'ratio':>6} {'ms/token (no cache)':>20} {'ratio':>6}")
    for c in args.contexts:
        print(f"{c:>8} {cached[c]:>17.2f} {cached[c] / cached[base]:>6.2f} {uncached[c]:>20.1f} "
              f"{uncached[c] / uncached[base]:>6.1f}")


if __name__ == "__main__":
    main()
