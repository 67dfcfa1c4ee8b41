"""The LM head + cross-entropy: megatron's full logits against `chunked_cross_entropy`, memory and time.

    python benchmarks/chunked_loss.py                                  # T = 16384, vocab 32768, h = 512
    python benchmarks/chunked_loss.py --seq 2048 --vocab 4096 --chunk-tokens 512

Each variant runs in a fresh one-rank gloo process (TP 1, fp32): forward (output layer and vocab-parallel
cross-entropy) and backward for one sequence. Reported: the bytes autograd saves for the backward pass
(`hgrn_megatron.testing.memory`, weights excluded), the growth of the process's peak RSS over the step (what
the step really needs, temporaries of the backward included), and seconds (one thread, after a warm-up).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def head_step(seq: int, vocab: int, hidden_size: int, chunk_tokens: int | None) -> dict:
    """One forward+backward of the LM head and loss on a gloo rank."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from hgrn_megatron.chunked_loss import chunked_cross_entropy
    from hgrn_megatron.testing.memory import saved_tensor_bytes

    parallel_state.initialize_model_parallel()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq, 1, hidden_size, generator=g).requires_grad_(True)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size, generator=g) * hidden_size**-0.5)
    labels = torch.randint(0, vocab, (1, seq), generator=g)

    def loss_fn(x, y):
        if chunk_tokens:
            return chunked_cross_entropy(x, weight, y, chunk_tokens=chunk_tokens)
        logits = torch.matmul(x, weight.t())  # megatron's output layer at TP 1
        return tensor_parallel.vocab_parallel_cross_entropy(logits, y.t().contiguous()).t()

    loss_fn(hidden[:64], labels[:, :64]).sum().backward()  # warm-up: first-call allocations are not timed
    hidden.grad = weight.grad = None
    base = _rss_bytes()
    start = time.perf_counter()
    loss, saved = saved_tensor_bytes(lambda: loss_fn(hidden, labels), [weight])
    loss.mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"saved_bytes": saved, "peak_growth_bytes": max(0, peak - base), "seconds": seconds,
            "loss": loss.mean().item(), "weight_grad_norm": weight.grad.norm().item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[4096, 1024])
    args = parser.parse_args(argv)
    from hgrn_megatron.testing.distributed import run_distributed

    print(f"T = {args.seq}, vocab {args.vocab}, hidden {args.hidden}, fp32, TP 1")
    print("| loss | saved MiB | peak RSS growth MiB | fwd+bwd s | loss value | ‖dW‖ |")
    print("|---|---|---|---|---|---|")
    for chunk in (None, *args.chunk_tokens):
        r = run_distributed(head_step, world_size=1, args=(args.seq, args.vocab, args.hidden, chunk),
                            timeout=1800)[0]
        name = "full logits (megatron)" if chunk is None else f"chunked, {chunk} tokens"
        print(f"| {name} | {r['saved_bytes'] / 2**20:.0f} | {r['peak_growth_bytes'] / 2**20:.0f} | "
              f"{r['seconds']:.2f} | {r['loss']:.6f} | {r['weight_grad_norm']:.6f} |")


if __name__ == "__main__":
    main()
