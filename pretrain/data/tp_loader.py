"""One loader per tensor-parallel group: TP rank 0 loads each micro-batch and broadcasts it to the group.

The TP ranks of one data-parallel replica consume the same samples; loading them on every TP rank tokenizes
each document TP times. `GroupLoader` builds the `TrainLoader` on the group's first rank only (as Megatron-LM
broadcasts its batches within the TP group) and sends each batch over the group: a status flag, then the tokens
and the document starts (as uint8: gloo broadcasts no bool tensors). A loader failure on the first rank is sent
as the flag, so the other ranks raise instead of waiting for a batch that never comes.

`state_dict()`, `stats()` and `lane_counts()` are local, never collective: the first rank answers with its
loader's, the others with None, {} and zeros (callers use the first TP rank's state, as the trainer's save does;
summed or max-reduced counts over the data-parallel group of another TP rank are then 0).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from hgrn_megatron.corpus.shards import DataError

OK, FAILED = 0, 1


class GroupLoader:
    """Iterator of micro-batches for every rank of `group` (a TP group; None = the whole world)."""

    def __init__(self, make_loader: Callable[[], object], group, seq_length: int, micro_batch_size: int,
                 lanes: int, device: torch.device | str = "cpu"):
        self.group = group
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.is_source = dist.get_rank() == self.src
        self.shape = (micro_batch_size, seq_length + 1)
        self.lanes = lanes
        self.device = torch.device(device)
        self.loader = make_loader() if self.is_source else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        flag = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.is_source:
            try:
                batch = next(self.loader)
            except BaseException:
                flag[0] = FAILED
                dist.broadcast(flag, src=self.src, group=self.group)
                raise
            tokens = batch["tokens"].to(self.device)
            starts = batch["doc_start"].to(self.device, torch.uint8)
        else:
            tokens = torch.empty(self.shape, dtype=torch.int64, device=self.device)
            starts = torch.empty(self.shape, dtype=torch.uint8, device=self.device)
        dist.broadcast(flag, src=self.src, group=self.group)
        if flag.item() != OK:
            raise DataError(f"the data loader on rank {self.src} (the first of this tensor-parallel group) failed; "
                            f"its log has the reason")
        dist.broadcast(tokens, src=self.src, group=self.group)
        dist.broadcast(starts, src=self.src, group=self.group)
        return {"tokens": tokens.cpu(), "doc_start": starts.cpu().bool()}

    def state_dict(self) -> dict | None:
        return self.loader.state_dict() if self.is_source else None

    def stats(self) -> dict:
        return self.loader.stats() if self.is_source else {}

    def lane_counts(self, kinds: tuple[str, ...]) -> np.ndarray:
        if self.is_source:
            return self.loader.lane_counts(kinds)
        return np.zeros((self.lanes, 1 + len(kinds)), dtype=np.float64)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
