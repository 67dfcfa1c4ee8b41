"""Reading Pile-format shards: zstd-compressed (or plain) JSON Lines, one document per line.

    {"text": "...", "meta": {"pile_set_name": "Books3"}}

Shards are streamed chunk by chunk (never a whole shard in memory). Bad input never stops a reader and is never
silent: every line becomes either a `Document` or a `BadRecord` with a kind from `SKIP_KINDS`, and a stream that
ends abnormally (corrupt or truncated zstd, an I/O error) ends the shard with one `StreamFault`. Callers count
these (see `counters.py`) and warn through `SkipWarner`, which names the shard and line and is rate-limited.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from hgrn_megatron.config_base import ConfigError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl")
ZSTD_SUFFIXES = (".jsonl.zst", ".jsonl.zstd")
UNKNOWN_SOURCE = "unknown"

# Why a record (or the rest of a shard) was skipped. Record kinds first, then stream kinds.
RECORD_KINDS = ("invalid_utf8", "invalid_json", "missing_text", "non_string_text", "empty_text")
STREAM_KINDS = ("corrupt_stream", "truncated_stream", "unreadable_shard")
SKIP_KINDS = RECORD_KINDS + STREAM_KINDS

READ_CHUNK_BYTES = 1 << 20


class DataError(ConfigError):
    """A data problem that stops the run (a missing path, an empty glob, a state that does not fit the data):
    names the file or config field and what was expected."""


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    source: str


@dataclass(frozen=True, slots=True)
class BadRecord:
    kind: str
    source: str
    detail: str


@dataclass(frozen=True, slots=True)
class StreamFault:
    """The shard's stream ended abnormally after the lines already yielded; the rest of the shard is lost."""

    kind: str
    detail: str


# ---------------------------------------------------------------- finding shards
def resolve_shards(patterns: Sequence[str], *, field: str) -> list[Path]:
    """Expand globs, directories and plain paths into a sorted, de-duplicated shard list.

    Raises DataError naming `field` and the pattern for a path that does not exist, a glob that matches nothing,
    a directory without shards, or a file that is not `*.jsonl[.zst]`. Run before training starts.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    found: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
            if not matches:
                raise DataError(f"{field}: glob '{pattern}' matches no files")
            bad = [m for m in matches if not is_shard_name(m)]
            if bad:
                raise DataError(
                    f"{field}: glob '{pattern}' matches {bad[0]}, which is not a shard ({' or '.join(SHARD_SUFFIXES)})"
                )
            found.extend(matches)
        elif os.path.isdir(pattern):
            matches = sorted(p for p in Path(pattern).iterdir() if p.is_file() and is_shard_name(p))
            if not matches:
                raise DataError(f"{field}: directory '{pattern}' contains no {' or '.join(SHARD_SUFFIXES)} files")
            found.extend(matches)
        elif os.path.isfile(pattern):
            if not is_shard_name(Path(pattern)):
                raise DataError(f"{field}: '{pattern}' is not a shard (expected {' or '.join(SHARD_SUFFIXES)})")
            found.append(Path(pattern))
        else:
            raise DataError(f"{field}: '{pattern}' does not exist")
    if not patterns:
        raise DataError(f"{field}: no shard paths given")
    unique = {p.resolve(): None for p in found}
    return sorted(unique)


def is_shard_name(path: Path) -> bool:
    return path.name.endswith(SHARD_SUFFIXES)


def shard_display_names(paths: Sequence[Path]) -> list[str]:
    """Short, stable names for counters and state: paths relative to the shards' common directory."""
    if not paths:
        return []
    if len(paths) == 1:
        return [paths[0].name]
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [str(p.relative_to(root)) for p in paths]


# ---------------------------------------------------------------- streaming lines
def iter_lines(
    path: Path | str, chunk_bytes: int = READ_CHUNK_BYTES, on_read: Callable[[int], None] | None = None
) -> Iterator[bytes | StreamFault]:
    """Yield each line of a shard (without its newline), then a `StreamFault` if the shard ended abnormally.

    zstd shards are decompressed with a streaming decompression object, frame after frame. Unlike zstandard's
    `stream_reader`, which ends quietly at a truncated frame, this notices truncation (a frame started but never
    finished) and reports it; the partial line before the cut is dropped as part of the fault. A plain `.jsonl`
    shard's last line may lack its newline. `on_read(n)` is told about every n bytes read from the file.
    """
    path = str(path)
    try:
        fh = open(path, "rb")
    except OSError as err:
        yield StreamFault("unreadable_shard", f"cannot open: {err.strerror or err}")
        return
    with fh:
        compressed = path.endswith(ZSTD_SUFFIXES)
        dctx = zstandard.ZstdDecompressor() if compressed else None
        dobj = dctx.decompressobj() if compressed else None
        frame_open = False  # a frame has been fed but has not ended
        pending: list[bytes] = []  # pieces of a line that spans chunks
        while True:
            try:
                chunk = fh.read(chunk_bytes)
            except OSError as err:
                yield StreamFault("unreadable_shard", f"read error: {err.strerror or err}")
                return
            if not chunk:
                break
            if on_read is not None:
                on_read(len(chunk))
            fault = None
            if compressed:
                out = []
                try:
                    while chunk:
                        out.append(dobj.decompress(chunk))
                        frame_open = True
                        if dobj.eof:  # a frame ended; the rest of the chunk starts the next frame
                            chunk = dobj.unused_data
                            dobj = dctx.decompressobj()
                            frame_open = False
                        else:
                            chunk = b""
                except zstandard.ZstdError as err:
                    fault = StreamFault("corrupt_stream", f"zstd error: {err}")
                data = b"".join(out)
            else:
                data = chunk
            if b"\n" in data:
                if pending:
                    pending.append(data)
                    data = b"".join(pending)
                lines = data.split(b"\n")
                pending = [lines.pop()]
                yield from lines
            elif data:
                pending.append(data)
            if fault is not None:  # the complete lines before the damage were yielded; the partial one is lost
                yield fault
                return
        if frame_open:
            yield StreamFault("truncated_stream", "zstd stream ends inside a frame (file truncated?)")
            return
        tail = b"".join(pending)
        if tail:
            yield tail


# ---------------------------------------------------------------- parsing records
def _lookup(obj, dotted: tuple[str, ...]):
    for key in dotted:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


class RecordParser:
    """Turns one raw line into a `Document` or a `BadRecord`.

    `text_field` and `source_field` are dotted paths into the JSON object (`text`, `meta.pile_set_name`).
    """

    def __init__(self, text_field: str = "text", source_field: str = "meta.pile_set_name"):
        self.text_path = tuple(text_field.split("."))
        self.source_path = tuple(source_field.split("."))
        self.text_field = text_field

    def __call__(self, line: bytes) -> Document | BadRecord:
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
    for line, raw in enumerate(iter_lines(path, on_read=on_read)):
        if isinstance(raw, StreamFault):
            if counters is not None:
                counters.add_skip(raw.kind, name, UNKNOWN_SOURCE)
            if warner is not None:
                warner(name, line, raw.kind, raw.detail)
            return
        rec = parser(raw)
        if isinstance(rec, BadRecord):
            if counters is not None:
                counters.add_skip(rec.kind, name, rec.source)
            if warner is not None:
                warner(name, line, rec.kind, rec.detail)
            continue
        yield line, rec
