"""Packing lanes: documents -> token streams -> samples of `seq_length + 1` tokens with a doc-start mask.

The global sample order (independent of data-parallel size and worker count):
- unit ordinal k (see `stream.py`: a frame of an indexed shard, or a whole shard) belongs to lane `k mod L`; a lane
  reads, parses, weights and tokenizes only its own units' records, appends EOS to each document and concatenates
  them into one token stream;
- lane l's m-th sample is tokens [m*S, m*S + S] of its stream (S + 1 tokens; consecutive samples share one
  token so every token is a label once, as in Megatron-LM's GPT dataset, megatron/core/datasets/gpt_dataset.py);
- global sample j is sample `j // L` of lane `j mod L`.

A lane's state is small: how many samples it produced, the position of the document its next sample starts in
and the token offset there (re-tokenizing that one document on resume rebuilds the leftover tokens, which are
always a suffix of one document), plus its counters. A `LaneGroup` serves several lanes (one worker's share),
each lane with its own reader over its own units, and counts what the worker read (`IoCounters`).
"""
from __future__ import annotations

import logging
import operator
import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.records import UNKNOWN_SOURCE, BadRecord, RecordFormat, RecordParser, SkipWarner
from hgrn_megatron.corpus.shards import DataError, OversizedLine, StreamFault

from .mixture import Mixture
from .stream import LaneShare, LaneStream, Position, UnitTable

log = logging.getLogger(__name__)

MAX_PASSES_WITHOUT_DOCUMENT = 3


@dataclass
class PackingSpec:
    """Everything needed to rebuild the sample streams; picklable, sent to loader workers."""

    paths: list[str]
    names: list[str]
    shard_weights: list[float]
    source_weights: dict[str, float]
    seed: int
    lanes: int
    seq_length: int
    record_format: RecordFormat
    warn_limit: int = 5
    _mixture: Mixture | None = field(default=None, repr=False, compare=False)
    _units: UnitTable | None = field(default=None, repr=False, compare=False)

    @property
    def mixture(self) -> Mixture:
        if self._mixture is None:
            self._mixture = Mixture(len(self.paths), self.seed, self.shard_weights, self.source_weights)
        return self._mixture

    @property
    def units(self) -> UnitTable:
        if self._units is None:
            self._units = UnitTable(self.paths, self.seed)
        return self._units

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mixture"] = None
        return state


IO_KEYS = ("read_bytes", "decompressed_bytes", "lines_scanned", "documents_tokenized", "seek_decompressed_bytes")


class IoCounters:
    """What a worker's readers cost: bytes read from disk, text decompressed, lines scanned, documents
    tokenized, and the text decompressed only to reach the saved positions when the lanes were opened."""

    __slots__ = IO_KEYS

    def __init__(self):
        for key in IO_KEYS:
            setattr(self, key, 0)

    def add_read(self, n: int) -> None:
        self.read_bytes += n

    def add_decompressed(self, n: int) -> None:
        self.decompressed_bytes += n

    def add_seek(self, n: int) -> None:
        self.seek_decompressed_bytes += n

    def as_tuple(self) -> tuple[int, ...]:
        return _io_counts(self)


_io_counts = operator.attrgetter(*IO_KEYS)  # an IoCounters' counts in IO_KEYS order (once per sample: kept cheap)


def fresh_lane_state(lane: int) -> dict:
    return {"lane": lane, "samples": 0, "doc": None, "offset": 0, "doc_pass": 0, "counters": []}


class Lane:
    """One packing lane: its token buffer, its position, its counters since the last snapshot."""

    def __init__(self, group: LaneGroup, state: dict):
        self.group = group
        self.index = int(state["lane"])
        self.samples = int(state["samples"])
        self.doc = Position.from_list(state["doc"]) if state["doc"] is not None else None
        self.offset = int(state["offset"])
        self.doc_pass = int(state.get("doc_pass", 0))
        self.restoring = self.doc is not None
        first = LaneShare.of(self.index, group.spec.lanes, len(group.spec.units)).first
        self.doc_unit = self.doc.ordinal if self.doc is not None else first  # the unit of its last document
        self.chunks: deque[list] = deque()  # [tokens int32 array, read offset, document position]
        self.available = 0
        self.delta = DataCounters()

    # ------------------------------------------------------------ documents
    def _pull_document(self) -> None:
        g = self.group
        spec = g.spec
        while True:
            pos, item, shard = g.next_record(self.index)
            name = spec.names[shard]
            if self.restoring:
                self._restore(pos, item, shard)
                return
            if (pos.ordinal - self.doc_unit) // g.unit_stride >= g.units_without_document:
                raise DataError(
                    f"packing lane {self.index} found no usable document in {g.passes_without_document} passes' "
                    f"worth of its units over {len(spec.paths)} shards (too few good records for {spec.lanes} "
                    f"lanes, or mixture weights near 0?); use fewer data.lanes or check the shards with "
                    f"`hgrn-data verify`"
                )
            if isinstance(item, StreamFault):
                self.delta.add_skip(item.kind, name, UNKNOWN_SOURCE)
                g.warner(name, pos.line, item.kind, item.detail)
                continue
            rec = g.parser(item)
            if isinstance(rec, BadRecord):
                self.delta.add_skip(rec.kind, name, rec.source)
                g.warner(name, pos.line, rec.kind, rec.detail)
                continue
            if not spec.mixture.includes(pos.pass_index, shard, pos.line, rec.source):
                self.delta.add_dropped(rec.source)
                continue
            tokens = g.encode(rec.text)
            self.delta.add_document(rec.source, len(tokens))
            self.doc_pass = pos.pass_index
            self.doc_unit = pos.ordinal
            self.chunks.append([tokens, 0, pos])
            self.available += len(tokens)
            return

    def _restore(self, pos: Position, item, shard: int) -> None:
        """Rebuild the leftover tokens: the saved document from the saved offset (not counted again)."""
        self.restoring = False
        rec = None if isinstance(item, StreamFault) else self.group.parser(item)
        if pos != self.doc or rec is None or isinstance(rec, BadRecord):
            raise DataError(
                f"{self.group.spec.paths[shard]} line {pos.line + 1}: the saved data state expects lane "
                f"{self.index}'s current document here ({self.doc}), but found {pos} / {rec or item}; "
                f"were the shards changed since the checkpoint?"
            )
        tokens = self.group.encode(rec.text)
        if self.offset >= len(tokens):
            raise DataError(
                f"{self.group.spec.paths[shard]} line {pos.line + 1}: saved offset {self.offset} is past the "
                f"document's {len(tokens)} tokens; was the tokenizer or the shard changed?"
            )
        self.chunks.append([tokens, self.offset, pos])
        self.available += len(tokens) - self.offset

    # ------------------------------------------------------------ samples
    def next_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The lane's next sample: (tokens int32[S+1], doc_start bool[S+1]); advances the lane by S tokens."""
        S = self.group.spec.seq_length
        while self.available < S + 1:
            self._pull_document()
        tokens = np.empty(S + 1, dtype=np.int32)
        doc_start = np.zeros(S + 1, dtype=np.bool_)
        filled = 0
        for chunk in self.chunks:
            arr, start, _ = chunk
            if start == 0:
                doc_start[filled] = True
            take = min(len(arr) - start, S + 1 - filled)
            tokens[filled : filled + take] = arr[start : start + take]
            filled += take
            if filled == S + 1:
                break
        # Advance by S tokens: the sample's last token is the next sample's first.
        advance = S
        while advance:
            chunk = self.chunks[0]
            left = len(chunk[0]) - chunk[1]
            if left > advance:
                chunk[1] += advance
                break
            advance -= left
            self.chunks.popleft()
        self.available -= S
        self.samples += 1
        # What remains is a suffix of the last document pulled: the state needs only its position and offset.
        assert len(self.chunks) == 1, "packing invariant: leftover tokens span one document"
        self.doc, self.offset = self.chunks[0][2], self.chunks[0][1]
        return tokens, doc_start

    def snapshot(self) -> dict:
        """The lane's state after its latest sample (counters excluded: they travel as deltas)."""
        return {
            "lane": self.index,
            "samples": self.samples,
            "doc": self.doc.to_list() if self.doc is not None else None,
            "offset": self.offset,
            "doc_pass": self.doc_pass,
        }

    def take_delta(self) -> DataCounters:
        delta, self.delta = self.delta, DataCounters()
        return delta


# Plain shards whose sizes differ by more than this factor skew the mixture noticeably within the first passes.
UNEQUAL_SHARDS_FACTOR = 2.0


def warn_unequal_plain_shards(units: UnitTable) -> None:
    """Lanes move through units, not bytes: a small plain shard is finished early and its lanes go on to the next
    pass while large ones are still read, so small shards are over-represented until many passes even it out."""
    plain = [units.paths[u.shard] for u in units.units if u.length is None]
    sizes = sorted((os.path.getsize(path), path) for path in plain if os.path.exists(path))
    if len(sizes) > 1 and sizes[-1][0] > UNEQUAL_SHARDS_FACTOR * max(sizes[0][0], 1):
        log.warning("plain shards of unequal size (%s: %.1f MB, %s: %.1f MB): within the first passes the lanes "
                    "over-represent the small ones in the mixture; reshard with `hgrn-data reshard` into frames of "
                    "equal size", sizes[-1][1], sizes[-1][0] / 1e6, sizes[0][1], sizes[0][0] / 1e6)


class LaneGroup:
    """Produces the samples of a set of lanes (one loader worker's share), each lane reading its own units."""

    def __init__(self, spec: PackingSpec, lane_states: list[dict], tokenizer):
        self.spec = spec
        self.parser = RecordParser(spec.record_format)
        self.warner = SkipWarner(spec.warn_limit)
        self._encode_document = tokenizer.encode_document_array
        self.io = IoCounters()
        units = spec.units
        self.unit_stride = LaneShare.of(0, spec.lanes, len(units)).stride  # the same for every lane
        self.lanes = {int(s["lane"]): Lane(self, s) for s in lane_states}
        # How far a lane reads without a usable document before it gives up, counted in epochs: when the heaviest
        # source is not in the heaviest shard group, the last passes of each epoch (ceil(max group weight x max
        # source weight) of them) include no record at all. A lane reads about U / L units per pass (one, shared
        # with other lanes, when units are fewer than lanes).
        self.passes_without_document = MAX_PASSES_WITHOUT_DOCUMENT * spec.mixture.passes_per_epoch
        self.units_without_document = self.passes_without_document * -(-len(units) // self.unit_stride)
        if self.lanes and min(self.lanes) == 0:  # warned once, by the group holding lane 0
            if len(units) < spec.lanes:
                log.warning("%d units of data (frames of indexed shards, whole shards otherwise) for %d lanes: "
                            "about %.0f lanes share each unit, each decompressing all of it to take its share of "
                            "the records; reshard with `hgrn-data reshard` for more units", len(units), spec.lanes,
                            spec.lanes / max(len(units), 1))
            if spec.lanes > 1:
                warn_unequal_plain_shards(units)
        empty: set = set()
        self.streams = {}
        for index, lane in self.lanes.items():
            self.streams[index] = LaneStream(units, spec.mixture, index, spec.lanes, lane.doc,
                                             spec.record_format.max_document_bytes, self.io.add_read,
                                             self.io.add_decompressed, empty, self.io.add_seek)

    def encode(self, text: str) -> np.ndarray:
        self.io.documents_tokenized += 1
        return self._encode_document(text)

    def next_record(self, lane: int) -> tuple[Position, bytes | OversizedLine | StreamFault, int]:
        """The next record of `lane`'s units."""
        self.io.lines_scanned += 1
        return self.streams[lane].next()

    def produce(self, lane: int, sample_index: int) -> tuple[np.ndarray, np.ndarray, dict, DataCounters]:
        """Sample `sample_index` of `lane` (skipping earlier ones another rank takes), its snapshot and counts."""
        state = self.lanes[lane]
        if sample_index < state.samples:
            raise RuntimeError(f"lane {lane} already produced sample {sample_index}")
        while state.samples < sample_index:
            state.next_sample()
        tokens, doc_start = state.next_sample()
        return tokens, doc_start, state.snapshot(), state.take_delta()

    def num_readers(self) -> int:
        return len(self.streams)
