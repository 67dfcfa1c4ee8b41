"""What a shard's line means: a `Document`, or a `BadRecord` of a kind from `SKIP_KINDS`.

Bad input never stops a reader and is never silent: every line becomes either a `Document` or a `BadRecord`,
and a stream that ends abnormally ends its shard with one `StreamFault` (see `shards.py`). Callers count these
(see `counters.py`) and warn through `SkipWarner`, which names the shard and line and is rate-limited.

`RecordFormat` says how to read a line (which fields, how long a record may be); it is built once from the run
config (`DataConfig.record_format()`) and carried whole to every reader, the state fingerprint and `hgrn-data`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .shards import STREAM_KINDS, OversizedLine, StreamFault, iter_lines

log = logging.getLogger(__name__)

UNKNOWN_SOURCE = "unknown"

# Why a record (or the rest of a shard) was skipped. Record kinds first, then stream kinds.
RECORD_KINDS = ("invalid_utf8", "invalid_json", "missing_text", "non_string_text", "empty_text", "oversized_document")
SKIP_KINDS = RECORD_KINDS + STREAM_KINDS


@dataclass(frozen=True)
class RecordFormat:
    """How one JSON line becomes a document; built once from the run config and carried whole.

    `text_field` and `source_field` are dotted paths into the JSON object. `max_document_bytes` caps a record's
    line (the JSON as stored, escapes included): a longer one is skipped as `oversized_document`, never held
    whole, parsed or tokenized. A worker tokenizes a document in one piece, at a cost that grows with it
    (measured: a 50 MB document took a process to 2.3 GB peak RSS); 8 MiB keeps book-length documents (the
    Pile's books average about 0.5 MB) and bounds what one record can cost (docs/DATA.md has the figures).
    """

    text_field: str = "text"
    source_field: str = "meta.pile_set_name"
    max_document_bytes: int = 8 << 20

    def __post_init__(self):
        if self.max_document_bytes < 1:
            raise ValueError(f"max_document_bytes must be >= 1, got {self.max_document_bytes}")


DEFAULT_FORMAT = RecordFormat()


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    source: str


@dataclass(frozen=True, slots=True)
class BadRecord:
    kind: str
    source: str
    detail: str


# ---------------------------------------------------------------- parsing records
def _lookup(obj, dotted: tuple[str, ...]):
    for key in dotted:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


class RecordParser:
    """Turns one raw line (or an `OversizedLine` in its place) into a `Document` or a `BadRecord`."""

    def __init__(self, record_format: RecordFormat = DEFAULT_FORMAT):
        self.format = record_format
        self.text_path = tuple(record_format.text_field.split("."))
        self.source_path = tuple(record_format.source_field.split("."))
        self.text_field = record_format.text_field

    def __call__(self, line: bytes | OversizedLine) -> Document | BadRecord:
        limit = self.format.max_document_bytes
        size = line.size if isinstance(line, OversizedLine) else len(line)
        if size > limit:  # its source is not known: finding it would mean parsing the record
            return BadRecord("oversized_document", UNKNOWN_SOURCE,
                             f"{size:,} bytes, over the limit of {limit:,} (data.max_document_bytes)")
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return BadRecord("invalid_utf8", UNKNOWN_SOURCE, f"byte {err.start} is not UTF-8")
        try:
            obj = json.loads(decoded)
        except ValueError as err:
            return BadRecord("invalid_json", UNKNOWN_SOURCE, f"invalid JSON: {err}")
        except RecursionError:  # valid JSON nested deeper than the parser's recursion limit (~1000 levels)
            return BadRecord("invalid_json", UNKNOWN_SOURCE, "JSON nested too deeply to parse")
        if not isinstance(obj, dict):
            return BadRecord("invalid_json", UNKNOWN_SOURCE, f"a JSON {type(obj).__name__}, not an object")
        source = _lookup(obj, self.source_path)
        source = source if isinstance(source, str) and source else UNKNOWN_SOURCE
        text = _lookup(obj, self.text_path)
        if text is None:
            return BadRecord("missing_text", source, f"no '{self.text_field}' field")
        if not isinstance(text, str):
            return BadRecord("non_string_text", source, f"'{self.text_field}' is a {type(text).__name__}")
        if not text:
            return BadRecord("empty_text", source, f"'{self.text_field}' is empty")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a JSON escape of a lone surrogate, e.g. "\ud800"
                return BadRecord("invalid_utf8", source, f"character {err.start} is a lone surrogate")
        return Document(text, source)


# ---------------------------------------------------------------- warnings
class SkipWarner:
    """Rate-limited warnings about skipped records, each naming the shard and line.

    The first `limit` skips of each (shard, kind) are logged one by one; after that only the 10th, 100th,
    1000th... of that (shard, kind), with the count, so a badly broken shard cannot flood the log.
    """

    def __init__(self, limit: int = 5, logger: logging.Logger = log):
        self.limit = limit
        self.logger = logger
        self.seen: dict[tuple[str, str], int] = {}

    def __call__(self, shard: str, line: int, kind: str, detail: str) -> None:
        key = (shard, kind)
        n = self.seen.get(key, 0) + 1
        self.seen[key] = n
        if n <= self.limit:
            self.logger.warning("%s line %d: skipped (%s): %s", shard, line + 1, kind, detail)
            if n == self.limit:
                self.logger.warning("%s: further '%s' skips are reported only at 10, 100, 1000, ...", shard, kind)
        elif n >= 10 and _is_power_of_ten(n):
            self.logger.warning("%s line %d: %d records skipped as '%s' so far", shard, line + 1, n, kind)


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


# ---------------------------------------------------------------- convenience: documents of one shard
def iter_documents(
    path: Path | str,
    parser: RecordParser,
    *,
    shard_name: str | None = None,
    counters=None,
    warner: SkipWarner | None = None,
    on_read: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, Document]]:
    """Yield `(line_index, Document)` for the good records of one shard, counting and warning about the rest.

    `counters` (a `DataCounters`) receives every skip; used by tokenizer training, `hgrn-data` and validation.
    The training pipeline reads through `stream.RecordStream` instead, which interleaves shards by lane.
    """
    name = shard_name or str(path)
    line = -1
    for line, raw in enumerate(iter_lines(path, on_read=on_read, max_line_bytes=parser.format.max_document_bytes)):
        rec = as_record(raw, parser)
        if isinstance(rec, BadRecord):
            if counters is not None:
                counters.add_skip(rec.kind, name, rec.source)
            if warner is not None:
                warner(name, line, rec.kind, rec.detail)
            if isinstance(raw, StreamFault):
                return
            continue
        yield line, rec


def as_record(item: bytes | OversizedLine | StreamFault, parser: RecordParser) -> Document | BadRecord:
    """What `iter_lines` yielded, as a document or a skipped record (a stream fault's source is unknown)."""
    if isinstance(item, StreamFault):
        return BadRecord(item.kind, UNKNOWN_SOURCE, item.detail)
    return parser(item)
