"""Validation loss and perplexity, overall and per source, on fixed samples (identical at any DP size)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(engine, batches: list[dict], source_names: list[str], dp_group, stop=None,
             filler: dict | None = None, piece=None) -> dict | None:
    """Token-weighted mean loss over this rank's validation batches, all-reduced over data-parallel ranks.
    `filler`: a batch to run (and discard) under ZeRO-3 on a rank past its own batches while others go on.
    `piece`: takes this rank's piece of a tuple of [b, s] tensors under context parallelism (`dp_group` is then
    DP x CP, so the sums cover every piece).

    Returns {"val_loss", "val_ppl", "val_tokens", "val_loss/<source>"...}, or None when `stop.agreed()` asked to
    stop part-way (checked between batches so a preemption is not delayed by a long evaluation).
    """
    from .data import label_sources, model_inputs
    from .distributed import comm_device

    engine.eval()
    n = len(source_names)
    sums = torch.zeros(n + 1, dtype=torch.float64)  # per source, then overall
    counts = torch.zeros(n + 1, dtype=torch.float64)
    # Ranks may hold different numbers of batches; every rank runs the largest count, so that the collective
    # checks, and under ZeRO-3 the forward's own parameter gathers, pair up.
    rounds = torch.tensor([float(len(batches))], device=comm_device())
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    gathers_in_forward = engine.zero_optimization_stage() == 3
    for i in range(int(rounds.item())):
        if stop is not None and stop.agreed():
            engine.train()
            return None
        if i >= len(batches) and not (gathers_in_forward and filler):
            continue
        batch = batches[i] if i < len(batches) else filler
        x = model_inputs(batch, engine.device)
        if piece is not None:
            x = piece(x)
        loss = engine(x.input_ids, labels=x.labels, doc_start=x.doc_start).double().cpu()
        if i >= len(batches):
            continue
        src = label_sources(batch)
        if piece is not None:
            (src,) = piece((src,))
        sums[:n] += torch.zeros(n, dtype=torch.float64).index_add_(0, src.reshape(-1), loss.reshape(-1))
        counts[:n] += torch.bincount(src.reshape(-1), minlength=n).double()
        sums[n] += loss.sum()
        counts[n] += loss.numel()
    engine.train()
    totals = torch.stack([sums, counts]).to(comm_device())
    dist.all_reduce(totals, group=dp_group)
    sums, counts = totals.cpu()
    overall = (sums[n] / counts[n]).item()
    out = {"val_loss": overall, "val_ppl": math.exp(min(overall, 50.0)), "val_tokens": int(counts[n].item())}
    for i, name in enumerate(source_names):
        if counts[i] > 0:
            out[f"val_loss/{name}"] = (sums[i] / counts[i]).item()
    return out
