"""Exact counts of what the pipeline read: documents and tokens per source, skipped records per kind/shard/source.

One `DataCounters` per packing lane travels in the pipeline state, so counts survive resumes (also at another
data-parallel size) and the global totals are the sum over lanes: each record belongs to exactly one lane, so
nothing is counted twice. `summary()` turns counts into the nested dict `TrainLoader.stats()` reports.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Counter keys (tuples):
#   ("doc", source)                  documents packed
#   ("tok", source)                  their tokens, EOS included
#   ("skip", kind, shard, source)    records (or stream faults) skipped
#   ("drop", source)                 good documents left out by mixture weights in this pass


class DataCounters:
    __slots__ = ("counts",)

    def __init__(self, counts: Counter | None = None):
        self.counts = counts if counts is not None else Counter()

    def add_document(self, source: str, tokens: int) -> None:
        self.counts[("doc", source)] += 1
        self.counts[("tok", source)] += tokens

    def add_skip(self, kind: str, shard: str, source: str) -> None:
        self.counts[("skip", kind, shard, source)] += 1

    def add_dropped(self, source: str) -> None:
        self.counts[("drop", source)] += 1

    def __iadd__(self, other: DataCounters) -> DataCounters:
        self.counts.update(other.counts)
        return self

    def __bool__(self) -> bool:
        return bool(self.counts)

    # ------------------------------------------------------------ serialisation (JSON/torch.load-safe types)
    def to_state(self) -> list[list]:
        return [[*key, n] for key, n in sorted(self.counts.items()) if n]

    @classmethod
    def from_state(cls, rows: Iterable[list]) -> DataCounters:
        return cls(Counter({tuple(row[:-1]): int(row[-1]) for row in rows}))

    @classmethod
    def total(cls, parts: Iterable[DataCounters]) -> DataCounters:
        out = cls()
        for part in parts:
            out += part
        return out

    # ------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Nested totals: documents, document_tokens, per-source counts, skips by kind/shard/source."""
        docs_by_source: Counter = Counter()
        tokens_by_source: Counter = Counter()
        dropped_by_source: Counter = Counter()
        by_kind: Counter = Counter()
        by_shard: dict[str, Counter] = {}
        by_source: dict[str, Counter] = {}
        for key, n in self.counts.items():
            tag = key[0]
            if tag == "doc":
                docs_by_source[key[1]] += n
            elif tag == "tok":
                tokens_by_source[key[1]] += n
            elif tag == "drop":
                dropped_by_source[key[1]] += n
            elif tag == "skip":
                _, kind, shard, source = key
                by_kind[kind] += n
                by_shard.setdefault(shard, Counter())[kind] += n
                by_source.setdefault(source, Counter())[kind] += n
        return {
            "documents": sum(docs_by_source.values()),
            "document_tokens": sum(tokens_by_source.values()),
            "documents_by_source": dict(sorted(docs_by_source.items())),
            "tokens_by_source": dict(sorted(tokens_by_source.items())),
            "skipped_total": sum(by_kind.values()),
            "skipped_by_kind": dict(sorted(by_kind.items())),
            "skipped_by_shard": {s: dict(sorted(c.items())) for s, c in sorted(by_shard.items())},
            "skipped_by_source": {s: dict(sorted(c.items())) for s, c in sorted(by_source.items())},
            "dropped_by_mixture": sum(dropped_by_source.values()),
            "dropped_by_source": dict(sorted(dropped_by_source.items())),
        }

