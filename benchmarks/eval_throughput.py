"""Loglikelihood requests per second of hgrn-eval's scorer on the exported HGRN model, with and without
prefix-state reuse, at several batch sizes.

    python benchmarks/eval_throughput.py                           # the quickstart model's size, 2 threads
    python benchmarks/eval_throughput.py --hidden-size 768 --layers 12 --ffn 1408 --vocab 32000

The requests are shaped like zero-shot multiple-choice items (HellaSwag-like: a context of --context tokens,
--choices continuations of --continuation tokens each; random ids and random weights, since the cost does not
depend on them). Every configuration scores the same requests in the same process.
"""
from __future__ import annotations

import argparse
import time

import torch


def build_model(args):
    from hgrn_megatron.export.hf_files.configuration_hgrn import HGRNConfig
    from hgrn_megatron.export.hf_files.modeling_hgrn import HGRNForCausalLM

    config = HGRNConfig(vocab_size=args.vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                        intermediate_size=args.ffn, variant="complex", eos_token_id=2,
                        reset_at_document_boundary=True, scan_backend="torch")
    torch.manual_seed(0)
    return HGRNForCausalLM(config).eval()


def make_requests(args) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(args.items):
        ctx_len = int(torch.randint(args.context // 2, args.context * 3 // 2 + 1, (1,), generator=g))
        context = torch.randint(4, args.vocab, (ctx_len,), generator=g).tolist()
        for _ in range(args.choices):
            cont_len = int(torch.randint(max(1, args.continuation // 2), args.continuation * 3 // 2 + 1, (1,),
                                         generator=g))
            pairs.append((context, torch.randint(4, args.vocab, (cont_len,), generator=g).tolist()))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--context", type=int, default=64, help="mean context tokens (uniform 0.5x-1.5x)")
    p.add_argument("--continuation", type=int, default=16, help="mean continuation tokens")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from hgrn_megatron.evaluation.hf_model import stateful_hf_model
    from hgrn_megatron.harness.scoring import score_pairs

    model = stateful_hf_model(build_model(args))
    pairs = make_requests(args)
    score_pairs(model, pairs[:8], batch_size=8)  # warm-up
    print(f"{len(pairs)} requests ({args.items} items x {args.choices} choices), hidden {args.hidden_size}, "
          f"{args.layers} layers, vocab {args.vocab}, {args.threads} threads")
    print(f"{'batch':>6} {'prefix reuse':>13} {'requests/s':>11}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for reuse in (False, True):
            start = time.perf_counter()
            score_pairs(model, pairs, batch_size=batch, reuse_prefix=reuse)
            rate = len(pairs) / (time.perf_counter() - start)
            print(f"{batch:>6} {'yes' if reuse else 'no':>13} {rate:>11.1f}")


if __name__ == "__main__":
    main()
