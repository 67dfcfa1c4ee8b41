"""Saved activations per rank with megatron's sequence parallelism: TP 1, TP 2, TP 2 + SP, on gloo.

    python benchmarks/sequence_parallel.py                 # T = 8192, a small HGRN
    python benchmarks/sequence_parallel.py --seq 2048 --json out.json

Each configuration builds the same model (same seed, megatron's CPU initialisation gives the same full weights at
every TP size) and runs one forward pass with labels on one sequence with document resets while
`hgrn_megatron.testing.memory` counts the bytes autograd saves for the backward pass (per rank, weights
excluded), then the backward pass. Reported: saved bytes per rank and their ratio to TP 1, the replicated share
(TP 2 keeps replicated + split / 2), forward+backward seconds, the loss and the gradient norm (equal across the
three).
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

MODEL = dict(hidden_size=256, num_layers=2, ffn_hidden_size=512, num_attention_heads=4)
VOCAB = 256


def step(seq: int, sequence_parallel: bool) -> dict:
    """One forward+backward on this rank (a gloo rank of a TP-sized world)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model
    from hgrn_megatron.testing.memory import saved_tensor_bytes

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = ModelConfig.build({"preset": "tiny", **MODEL, "seq_length": seq, "reset_at_document_boundary": True})
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, sequence_parallel=sequence_parallel)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=g)
    doc_start = torch.zeros(1, seq, dtype=torch.bool)
    doc_start[0, [0, seq // 3, seq // 2 + 7]] = True
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    warm = slice(0, min(seq, 256))
    model(ids[:, warm], labels=labels[:, warm], doc_start=doc_start[:, warm]).sum().backward()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, saved = saved_tensor_bytes(lambda: model(ids, labels=labels, doc_start=doc_start), model.parameters())
    total = loss.sum() / seq
    total.backward()
    seconds = time.perf_counter() - start
    from hgrn_megatron.tp_rules import merge_state_dicts

    grads = {name: p.grad for name, p in model.named_parameters()}
    gathered = [None] * tp
    dist.all_gather_object(gathered, grads)
    merged = merge_state_dicts(gathered, replicated_atol=1e-6)
    norm = torch.sqrt(sum(v.double().square().sum() for v in merged.values())).item()
    return {"tp": tp, "sequence_parallel": sequence_parallel, "seq": seq, "saved_bytes": saved,
            "seconds": seconds, "loss": total.item(), "grad_norm": norm}


def run(seq: int) -> list[dict]:
    return [largest_rank_row(step, tp, (seq, sp)) for tp, sp in ((1, False), (2, False), (2, True))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

    configure_environment()
    patch_for_cpu()
    rows = run(args.seq)
    tp1, tp2 = rows[0]["saved_bytes"], rows[1]["saved_bytes"]
    replicated = 2 * tp2 - tp1  # tp2 = replicated + split / 2, tp1 = replicated + split
    print(f"T = {args.seq:,}; replicated share at TP 1: {replicated / 2**20:.1f} MiB ({100 * replicated / tp1:.1f} %)")
    print("| TP | SP | saved MiB / rank | / TP 1 | fwd+bwd s | loss | grad norm |")
    print("|---|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {'on' if r['sequence_parallel'] else 'off'} | {r['saved_bytes'] / 2**20:.1f} | "
              f"{r['saved_bytes'] / tp1:.3f} | {r['seconds']:.2f} | {r['loss']:.6f} | {r['grad_norm']:.6f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "replicated_bytes": replicated}, indent=1))


if __name__ == "__main__":
    main()
