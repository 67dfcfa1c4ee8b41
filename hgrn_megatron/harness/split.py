"""Scoring shared by data-parallel ranks: the harness runs on rank 0 alone, every rank scores a share.

    scorer = SplitScorer(LocalScorer(model, tokenizer, 16, False), ReplicaLayout(...))
    if rank == 0:
        try:
            results = run_tasks(scorer, tokenizer, tasks)      # loglikelihood / generate: collective calls
        finally:
            scorer.stop()
    else:
        scorer.serve()                                         # answers rank 0's calls until it stops

Rank 0 builds the harness's requests and computes its metrics; each call it makes broadcasts the token
requests to every rank (`broadcast_object_list` over the default group). Requests are ordered by length and
dealt round-robin to the data-parallel replicas, so each replica scores a similar number of tokens; the ranks
of one replica (its tensor-parallel shards) score the same requests together, and its first rank sends the
results to rank 0 (`gather_object`), which puts them back in the harness's order.

Under ZeRO-3 every forward gathers parameters over the data-parallel group, so the replicas must run the same
number of forwards although their shares differ. With `lockstep`, every forward is preceded by a one-element
all-reduce (MAX) of "I have a forward to run"; a replica done with its share answers 0 and runs a one-token
filler forward for as long as another answers 1.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .scorer import LocalScorer

LEADER = 0  # the global rank that runs the harness


@dataclass
class ReplicaLayout:
    dp_rank: int
    dp_size: int
    reports: bool  # this rank sends its replica's results (one rank per replica)
    dp_group: Any = None  # the group whose ranks must run forwards in step (ZeRO-3's gathers)
    lockstep: bool = False
    device: torch.device | str = "cpu"  # of the all-reduce's tensor (a GPU under NCCL)


class SplitScorer:
    """`loglikelihood` and `generate` (on rank 0, as `LocalScorer`'s), `serve` on the other ranks, `stop` on
    rank 0 when the harness is done. `progress()` runs on every rank after each call (a watchdog's beat)."""

    def __init__(self, local: LocalScorer, layout: ReplicaLayout, progress: Callable[[], None] | None = None):
        self.local, self.layout, self.progress = local, layout, progress
        self.failed = False  # a scoring call failed part-way on this rank (the ranks are no longer in step)
        self._forward = local.model.forward
        if layout.lockstep:
            local.model = dataclasses.replace(local.model, forward=self._lockstep_forward)

    # the scorer interface (rank 0)
    @property
    def batch_size(self) -> int:
        return self.local.batch_size

    @property
    def reuses_prefix(self) -> bool:
        return self.local.reuses_prefix

    def loglikelihood(self, pairs: Sequence) -> list:
        return self._command("loglikelihood", list(pairs))

    def generate(self, requests: Sequence) -> list:
        return self._command("generate", list(requests))

    def stop(self) -> None:
        dist.broadcast_object_list([("stop", None)], src=LEADER)

    def serve(self) -> None:
        """Answer rank 0's calls until it stops."""
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=LEADER)
            kind, items = message[0]
            if kind == "stop":
                return
            self._work(kind, items)

    # the work (every rank)
    def _command(self, kind: str, items: list) -> list:
        dist.broadcast_object_list([(kind, items)], src=LEADER)
        try:
            return self._work(kind, items)
        except BaseException:
            # the other ranks may be inside a collective of this call: only a new start recovers from that
            self.failed = True
            raise

    def _work(self, kind: str, items: list) -> list | None:
        layout = self.layout
        order = sorted(range(len(items)), key=lambda i: -_size(kind, items[i]))
        mine = order[layout.dp_rank :: layout.dp_size]
        share = [items[i] for i in mine]
        out = self.local.loglikelihood(share) if kind == "loglikelihood" else self.local.generate(share)
        self._drain()
        gathered = [None] * dist.get_world_size() if dist.get_rank() == LEADER else None
        dist.gather_object((mine, out) if layout.reports else None, gathered, dst=LEADER)
        if self.progress is not None:
            self.progress()
        if gathered is None:
            return None
        results: list = [None] * len(items)
        for part in gathered:
            for i, value in zip(*(part or ((), ()))):
                results[i] = value
        missing = sum(r is None for r in results)
        if missing:
            raise RuntimeError(f"{missing} of {len(items)} requests came back from no data-parallel replica")
        return results

    def _round(self, wants: int) -> int:
        flag = torch.tensor([wants], dtype=torch.int32, device=self.layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.layout.dp_group)
        return int(flag.item())

    def _lockstep_forward(self, ids, mask, state):
        self._round(1)
        return self._forward(ids, mask, state)

    def _drain(self) -> None:
        if not self.layout.lockstep:
            return
        filler = torch.tensor([[self.local.tokenizer.eos_id]], dtype=torch.long)
        with torch.no_grad():
            while self._round(0):
                self._forward(filler, None, None)


def _size(kind: str, item) -> int:
    """Tokens a request costs: context + continuation, or context + most new tokens."""
    if kind == "loglikelihood":
        return len(item[0]) + len(item[1])
    return len(item[0]) + item[2]
