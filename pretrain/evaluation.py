"""Validation loss and perplexity, overall and per source, on fixed samples (identical at any DP size)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(engine, batches: list[dict], source_names: list[str], dp_group, stop=None) -> dict | None:
    """Token-weighted mean loss over this rank's validation batches, all-reduced over data-parallel ranks.

    Returns {"val_loss", "val_ppl", "val_tokens", "val_loss/<source>"...}, or None when `stop.agreed()` asked to
    stop part-way (checked between batches so a preemption is not delayed by a long evaluation).
    """
    engine.eval()
    n = len(source_names)
    sums = torch.zeros(n + 1, dtype=torch.float64)  # per source, then overall
    counts = torch.zeros(n + 1, dtype=torch.float64)
    # Every rank must run the same number of collective checks: the batch count is all-reduced first.
    local_batches = torch.tensor([float(len(batches))])
    dist.all_reduce(local_batches, op=dist.ReduceOp.MAX)
    for i in range(int(local_batches.item())):
        if stop is not None and stop.agreed():
            engine.train()
            return None
        if i >= len(batches):
            continue
        batch = batches[i]
        tokens = batch["tokens"]
        loss = engine(
            tokens[:, :-1], labels=tokens[:, 1:], doc_start=batch["doc_start"][:, :-1]
        ).double().cpu()
        src = batch["source_ids"][:, 1:].cpu()
        sums[:n] += torch.zeros(n, dtype=torch.float64).index_add_(0, src.reshape(-1), loss.reshape(-1))
        counts[:n] += torch.bincount(src.reshape(-1), minlength=n).double()
        sums[n] += loss.sum()
        counts[n] += loss.numel()
    engine.train()
    for t in (sums, counts):
        dist.all_reduce(t, group=dp_group)
    overall = (sums[n] / counts[n]).item()
    out = {"val_loss": overall, "val_ppl": math.exp(min(overall, 50.0)), "val_tokens": int(counts[n].item())}
    for i, name in enumerate(source_names):
        if counts[i] > 0:
            out[f"val_loss/{name}"] = (sums[i] / counts[i]).item()
    return out
