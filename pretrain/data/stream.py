"""The endless record stream: pass after pass, each pass reading every shard in a seeded order, lines in order.

Every record (a line, or the fault that ended a damaged shard) gets a `Position`; its `ordinal` counts records
since the start of training over all passes, and record k belongs to packing lane `k mod lanes`. Positions are
what the pipeline state stores, so a reader can be rebuilt at any record.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hgrn_megatron.corpus.shards import DataError, OversizedLine, StreamFault, iter_lines

from .mixture import Mixture


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record is: its ordinal in the endless stream, and (pass, slot in that pass's order, line)."""

    ordinal: int
    pass_index: int
    slot: int
    line: int

    def to_list(self) -> list[int]:
        return [self.ordinal, self.pass_index, self.slot, self.line]

    @classmethod
    def from_list(cls, values) -> Position:
        return cls(*(int(v) for v in values))


START = Position(0, 0, 0, 0)


class RecordStream:
    """Reads records from `start` onward; `next()` returns (position, raw line or StreamFault, shard index).

    A line longer than `max_line_bytes` comes as an `OversizedLine` (never held whole). Starting mid-shard
    decompresses the shard from its beginning and skips lines (no parsing).
    """

    def __init__(self, paths: Sequence[str | Path], names: Sequence[str], mixture: Mixture, start: Position = START,
                 max_line_bytes: int | None = None):
        self.paths = [str(p) for p in paths]
        self.names = list(names)
        self.mixture = mixture
        self.max_line_bytes = max_line_bytes
        self._ordinal, self._pass, self._slot, self._line = start.ordinal, start.pass_index, start.slot, start.line
        self._pass_records = 0
        self._full_pass = start.slot == 0 and start.line == 0
        self._lines: Iterator | None = None
        self._open()

    @property
    def position(self) -> Position:
        """The position of the record `next()` returns next (its line may turn out to be past the shard's end)."""
        return Position(self._ordinal, self._pass, self._slot, self._line)

    def shard_at(self, pass_index: int, slot: int) -> int:
        return self.mixture.shard_order(pass_index)[slot]

    def _open(self) -> None:
        shard = self.shard_at(self._pass, self._slot)
        self._shard = shard
        self._lines = iter_lines(self.paths[shard], max_line_bytes=self.max_line_bytes)
        for skipped in range(self._line):
            item = next(self._lines, None)
            if isinstance(item, StreamFault):  # resuming would silently read other data than the saved state's
                raise DataError(f"{self.paths[shard]}: resuming at line {self._line + 1} of this shard, but it "
                                f"fails after {skipped} lines ({item.kind}: {item.detail})")
            if item is None:
                raise DataError(
                    f"{self.paths[shard]}: the saved data state points at line {self._line + 1}, but the shard "
                    f"has only {skipped} records now; was the shard changed or replaced since the checkpoint?"
                )

    def next(self) -> tuple[Position, bytes | OversizedLine | StreamFault, int]:
        while True:
            item = next(self._lines, None)
            if item is not None:
                break
            self._slot += 1
            self._line = 0
            if self._slot == len(self.paths):
                if self._full_pass and self._pass_records == 0:
                    raise DataError(f"no records in any of the {len(self.paths)} training shards: {self.paths[:3]}...")
                self._pass += 1
                self._slot = 0
                self._pass_records = 0
                self._full_pass = True
            self._open()
        pos = Position(self._ordinal, self._pass, self._slot, self._line)
        self._ordinal += 1
        self._line += 1
        self._pass_records += 1
        return pos, item, self._shard
