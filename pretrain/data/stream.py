"""Units of data and the lanes' record streams.

A unit is a run of lines that can be read alone: a frame of a shard that has a frame index (`hgrn-data reshard`),
or a whole shard without one. Pass p visits all U units in a seeded order (a hash of seed, pass, shard, frame);
over all passes the units form one endless sequence, and unit ordinal k (pass k // U, slot k mod U) belongs to
packing lane `k mod L`. A lane reads only its own units, lines in file order, so a worker decompresses only what
its lanes use, and a lane's position (unit ordinal, line) lets a reader start by seeking to that unit: with
frames, a resume decompresses at most one frame before its first record.

With fewer units than lanes (U < L, e.g. a few unindexed shards) lanes share units instead (`LaneShare`): unit
ordinal k belongs to the lanes l with l mod U = k mod U, and the S of them deal its records, record i of the
unit going to the one of rank i mod S. Every record still reaches exactly one lane per pass; each sharing lane
decompresses the whole unit, so `hgrn-data reshard` (more units) is what makes such a corpus cheap to read.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hgrn_megatron.corpus.frames import load_index
from hgrn_megatron.corpus.shards import DataError, OversizedLine, StreamFault, iter_lines

from .mixture import Mixture, hash_u64

log = logging.getLogger(__name__)

LANE_READ_CHUNK_BYTES = 64 << 10  # a lane's read size: small, since a worker holds one reader per lane


@dataclass(frozen=True, slots=True)
class Unit:
    """Compressed bytes [offset, offset + length) of shard `shard` (length None: to the end), lines from
    `first_line` (`lines` of them; None when unknown, i.e. a shard without an index)."""

    shard: int
    frame: int
    offset: int
    length: int | None
    first_line: int
    lines: int | None


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record is: its unit's ordinal in the endless unit sequence, (pass, slot in that pass's unit
    order) of that ordinal, and the record's line in its shard."""

    ordinal: int
    pass_index: int
    slot: int
    line: int

    def to_list(self) -> list[int]:
        return [self.ordinal, self.pass_index, self.slot, self.line]

    @classmethod
    def from_list(cls, values) -> Position:
        return cls(*(int(v) for v in values))


class UnitTable:
    """The units of a shard list and their seeded order per pass."""

    def __init__(self, paths: Sequence[str | Path], seed: int):
        self.paths = [str(p) for p in paths]
        self.seed = seed
        units: list[Unit] = []
        for s, path in enumerate(self.paths):
            index = load_index(path)
            if index is None:
                units.append(Unit(s, 0, 0, None, 0, None))
            else:
                units.extend(Unit(s, i, f.offset, f.length, f.first_line, f.lines) for i, f in enumerate(index.frames)
                             if f.lines)
        self.units = units
        self.indexed = sum(u.length is not None for u in units)
        self.warned_small_units = False
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.units)

    def layout(self) -> list[int] | None:
        """Frames per shard (0 = no index): part of the fingerprint, None when no shard has an index."""
        if not self.indexed:
            return None
        counts = [0] * len(self.paths)
        for u in self.units:
            counts[u.shard] += u.length is not None
        return counts

    def order(self, pass_index: int) -> list[int]:
        order = self._orders.get(pass_index)
        if order is None:
            units = self.units
            order = sorted(range(len(units)),
                           key=lambda i: (hash_u64("unit", self.seed, pass_index, units[i].shard, units[i].frame), i))
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[pass_index] = order
        return order

    def at(self, ordinal: int) -> tuple[int, int, Unit]:
        """(pass, slot, unit) of unit ordinal `ordinal`."""
        if not self.units:
            raise DataError(f"no records in any of the {len(self.paths)} training shards: {self.paths[:3]}...")
        p, slot = divmod(ordinal, len(self.units))
        return p, slot, self.units[self.order(p)[slot]]


@dataclass(frozen=True, slots=True)
class LaneShare:
    """Which units a lane reads and which of their records it takes: ordinals first, first + stride, ...; of
    each, the records whose index in the unit is `rank` mod `share` (share 1: all of them). A unit of n records
    with n <= `rank` gives the lane its record `rank` mod n instead: a corpus too small for its lanes repeats
    records within a pass rather than leave lanes without data (the loader warns)."""

    first: int
    stride: int
    share: int
    rank: int

    @classmethod
    def of(cls, lane: int, lanes: int, units: int) -> LaneShare:
        stride = max(1, min(lanes, units))
        first, rank = lane % stride, lane // stride
        return cls(first, stride, len(range(first, lanes, stride)), rank)


class LaneStream:
    """The records of one lane's units from `start` on; `next()` returns (position, raw line or StreamFault,
    shard index). `on_read`/`on_decompressed` count bytes read from disk and bytes of text produced."""

    def __init__(self, table: UnitTable, mixture: Mixture, lane: int, lanes: int, start: Position | None,
                 max_line_bytes: int | None, on_read: Callable[[int], None] | None = None,
                 on_decompressed: Callable[[int], None] | None = None, empty_units: set | None = None,
                 on_seek: Callable[[int], None] | None = None):
        self.table, self.mixture = table, mixture
        self.max_line_bytes = max_line_bytes
        self.on_read, self.on_decompressed, self.on_seek = on_read, on_decompressed, on_seek
        self.empty_units = empty_units if empty_units is not None else set()
        self.share = LaneShare.of(lane, lanes, len(table))
        self._ordinal = start.ordinal if start is not None else self.share.first
        self._start_line = start.line if start is not None else None
        self._take_next = start is not None  # the saved position is a record this lane took, whatever its index
        self._decompressed = 0
        self._lines: Iterator | None = None  # opened at the first record: a lane costs nothing until it is read

    def _count_decompressed(self, n: int) -> None:
        self._decompressed += n
        if self.on_decompressed is not None:
            self.on_decompressed(n)

    def _open(self, skip_to: int | None = None, seek: bool = True) -> None:
        self._pass, self._slot, unit = self.table.at(self._ordinal)
        self._unit = unit
        self._line = unit.first_line
        self._records = 0
        self._taken = 0
        self._faulted = False
        self._lines = iter_lines(self.table.paths[unit.shard], LANE_READ_CHUNK_BYTES, self.on_read,
                                 self.max_line_bytes, unit.offset, unit.length, self._count_decompressed,
                                 compressed=True if unit.length is not None else None, hold_open=False)
        if skip_to is not None:
            before = self._decompressed
            self._skip(skip_to)
            if seek and self.on_seek is not None:  # text decompressed only to reach the saved line (and its chunk)
                self.on_seek(self._decompressed - before)

    def _skip(self, line: int) -> None:
        """Position the reader at shard line `line` of the current unit (a resume): read, never parse."""
        path = self.table.paths[self._unit.shard]
        while self._line < line:
            item = next(self._lines, None)
            if isinstance(item, StreamFault):  # resuming would silently read other data than the saved state's
                raise DataError(f"{path}: resuming at line {line + 1} of this shard, but it fails after "
                                f"{self._line} lines ({item.kind}: {item.detail})")
            if item is None:
                raise DataError(f"{path}: the saved data state points at line {line + 1}, but the shard has only "
                                f"{self._line} records now; was the shard changed or replaced since the checkpoint?")
            self._line += 1
            self._records += 1

    def next(self) -> tuple[Position, bytes | OversizedLine | StreamFault, int]:
        if self._lines is None:
            self._open(skip_to=self._start_line)
        share = self.share
        while True:
            item = next(self._lines, None)
            if item is None:
                if share.share > 1 and not self._taken and self._records and not self._faulted:
                    # fewer records than lanes sharing the unit: read it again up to record rank mod n
                    if not self.table.warned_small_units:
                        self.table.warned_small_units = True
                        log.warning("%s holds %d records for the %d lanes sharing it: some lanes repeat records "
                                    "within a pass; use fewer data.lanes for a corpus this small",
                                    self.table.paths[self._unit.shard], self._records, share.share)
                    self._open(skip_to=self._unit.first_line + share.rank % self._records, seek=False)
                    self._take_next = True
                    continue
                self._end_of_unit()
                self._ordinal += share.stride
                self._open()
                continue
            if isinstance(item, StreamFault):
                self._faulted = True  # the unit ends here; the lane it is dealt to counts it
            if (self._take_next or share.share == 1
                    or (self._line - self._unit.first_line) % share.share == share.rank):
                break
            self._line += 1  # another lane's record
            self._records += 1
        self._take_next = False
        pos = Position(self._ordinal, self._pass, self._slot, self._line)
        self._line += 1
        self._records += 1
        self._taken += 1
        return pos, item, self._unit.shard

    def _end_of_unit(self) -> None:
        unit = self._unit
        if unit.lines is not None and not self._faulted and self._records != unit.lines:
            raise DataError(f"{self.table.paths[unit.shard]}: frame {unit.frame} holds {self._records} lines, its "
                            f"index says {unit.lines}; the shard changed since it was indexed")
        if self._records == 0:
            self.empty_units.add((unit.shard, unit.frame))
            if len(self.empty_units) >= len(self.table):
                paths = self.table.paths
                raise DataError(f"no records in any of the {len(paths)} training shards: {paths[:3]}...")
