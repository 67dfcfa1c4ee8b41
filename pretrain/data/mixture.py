"""Mixture weights: which documents a pass includes, a deterministic function of (seed, pass, shard, line) only.

Weights follow the Pile's own convention (Gao et al. 2020, "The Pile", Table 1, column "Epochs"): a weight is
how many times each document of a source or shard group is used per epoch. 2.0 doubles a source, 0.5 keeps a
seeded half of it, 0 drops it. A record's weight is its shard group's weight times its source's weight
(`pile_set_name`; sources not listed weigh 1).

An epoch is `passes_per_epoch = ceil(max weight)` passes over the shards; pass p of an epoch includes a record of
weight w if p < floor(w), and in pass floor(w) with probability frac(w), decided by a hash of (seed, epoch,
shard, line). Copies of an up-weighted document therefore land in different passes (as in the Pile, where
repeated components recur across the dataset) instead of back to back. The order in which a pass visits the
data is `stream.UnitTable`'s. Nothing depends on the data-parallel size, the worker count or the reading order.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence


def hash_u64(*parts) -> int:
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0]


class Mixture:
    """Which records a pass includes."""

    def __init__(
        self,
        num_shards: int,
        seed: int,
        shard_weights: Sequence[float] | None = None,
        source_weights: dict[str, float] | None = None,
    ):
        self.num_shards = num_shards
        self.seed = seed
        self.shard_weights = [float(w) for w in (shard_weights or [1.0] * num_shards)]
        if len(self.shard_weights) != num_shards:
            raise ValueError(f"{len(self.shard_weights)} shard weights for {num_shards} shards")
        self.source_weights = {k: float(v) for k, v in (source_weights or {}).items()}
        weights = self.shard_weights + list(self.source_weights.values())
        if any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"mixture weights must be finite and >= 0, got {weights}")
        max_shard = max(self.shard_weights, default=1.0)
        max_source = max([1.0, *self.source_weights.values()])
        self.passes_per_epoch = max(1, math.ceil(max_shard * max_source - 1e-12))
        self.uniform = all(w == 1.0 for w in weights)

    def weight(self, shard: int, source: str) -> float:
        return self.shard_weights[shard] * self.source_weights.get(source, 1.0)

    def includes(self, pass_index: int, shard: int, line: int, source: str) -> bool:
        """Whether the document at (shard, line) is part of pass `pass_index`."""
        if self.uniform:
            return True
        w = self.weight(shard, source)
        epoch, p = divmod(pass_index, self.passes_per_epoch)
        whole = math.floor(w)
        if p < whole:
            return True
        if p > whole:
            return False
        frac = w - whole
        return frac > 0 and hash_u64("keep", self.seed, epoch, shard, line) < frac * 2.0**64

