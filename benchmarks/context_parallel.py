"""One long sequence trained with context parallelism: CP 1 on one rank against CP 2 on two, on gloo.

    python benchmarks/context_parallel.py                      # 65,536 tokens, a small HGRN, CP 1 and CP 2
    python benchmarks/context_parallel.py --seq 4096 --json out.json

Each run builds the same model (same seed), gives each CP rank its contiguous piece of one sequence, runs the
forward pass with labels while `hgrn_megatron.testing.memory` counts the bytes autograd saves for the backward
pass (per rank, weights excluded), then the backward pass of the loss normalised over the whole sequence, and
sums the gradients over the CP group. Reported per CP size: saved bytes per rank, forward+backward seconds
(one thread per rank, after an untimed warm-up step), the sequence loss and the gradient norm, which must agree between CP 1 and CP 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import largest_rank_row  # noqa: E402

MODEL = dict(hidden_size=128, num_layers=2, ffn_hidden_size=256, num_attention_heads=4)
VOCAB = 256


def train_step(seq: int, cp: int, model_fields: dict, loss_chunk_tokens: int | None) -> dict:
    """One forward+backward on this rank (runs on a gloo rank of a CP-sized world)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.context_parallel import exchange_counter, sequence_piece
    from hgrn_megatron.model import build_model
    from hgrn_megatron.testing.memory import saved_tensor_bytes

    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    group = parallel_state.get_context_parallel_group()
    cfg = ModelConfig.build({"preset": "tiny", **model_fields, "seq_length": seq, "reset_at_document_boundary": True})
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    model.loss_chunk_tokens = loss_chunk_tokens
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=g)
    doc_start = torch.zeros(1, seq, dtype=torch.bool)
    doc_start[0, [0, seq // 3, seq // 2 + 7]] = True  # documents cross the CP 2 boundary, and one starts near it
    ids, labels, doc_start = (sequence_piece(t, group) for t in (tokens[:, :-1], tokens[:, 1:], doc_start))
    warm_up = slice(0, min(ids.shape[1], 256))  # first calls load kernels and allocate: not timed
    model(ids[:, warm_up], labels=labels[:, warm_up], doc_start=doc_start[:, warm_up]).sum().backward()
    model.zero_grad(set_to_none=True)
    exchange_counter.reset()
    start = time.perf_counter()
    loss, saved = saved_tensor_bytes(lambda: model(ids, labels=labels, doc_start=doc_start), model.parameters())
    total = loss.sum() / seq
    total.backward()
    seconds = time.perf_counter() - start
    dist.all_reduce(total.detach_(), group=group)
    grads = [p.grad for p in model.parameters()]
    for grad in grads:
        dist.all_reduce(grad, group=group)
    norm = torch.sqrt(sum(grad.double().square().sum() for grad in grads)).item()
    return {"cp": cp, "seq": seq, "saved_bytes": saved, "seconds": seconds, "loss": total.item(),
            "grad_norm": norm, "exchanged_bytes": exchange_counter.bytes, "exchanges": exchange_counter.calls}


def run(seq: int, cp_sizes: list[int], model_fields: dict = MODEL, loss_chunk_tokens: int | None = None) -> list[dict]:
    return [largest_rank_row(train_step, cp, (seq, cp, model_fields, loss_chunk_tokens)) for cp in cp_sizes]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loss-chunk-tokens", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = run(args.seq, args.cp, loss_chunk_tokens=args.loss_chunk_tokens)
    base = rows[0]
    print(f"model {MODEL}, vocab {VOCAB}, one sequence of {args.seq} tokens, loss chunks {args.loss_chunk_tokens}")
    print("| CP | saved MiB / rank | ratio to first | fwd+bwd s | loss | grad norm | bytes exchanged / rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cp']} | {r['saved_bytes'] / 2**20:.1f} | {r['saved_bytes'] / base['saved_bytes']:.3f} | "
              f"{r['seconds']:.2f} | {r['loss']:.6f} | {r['grad_norm']:.6f} | {r['exchanged_bytes']} |")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"model": MODEL, "vocab": VOCAB, "rows": rows}, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
