"""Finding and streaming Pile-format shards: zstd-compressed (or plain) JSON Lines, one document per line.

    {"text": "...", "meta": {"pile_set_name": "Books3"}}

Shards are streamed chunk by chunk (never a whole shard in memory, nor a line longer than the caller's limit).
A stream that ends abnormally (corrupt or truncated zstd, an I/O error) ends the shard with one `StreamFault`;
what a line means is `records.py`'s business.
"""
from __future__ import annotations

import errno
import glob
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

# Why the rest of a shard was skipped.
STREAM_KINDS = ("corrupt_stream", "truncated_stream", "unreadable_shard")

READ_CHUNK_BYTES = 1 << 20


class DataError(ConfigError):
    """A data problem that stops the run (a missing path, an empty glob, a state that does not fit the data):
    names the file or config field and what was expected."""


@dataclass(frozen=True, slots=True)
class StreamFault:
    """The shard's stream ended abnormally after the lines already yielded; the rest of the shard is lost."""

    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class OversizedLine:
    """A line longer than the reader's limit, in place of its bytes (which were dropped as they arrived)."""

    size: int


# ---------------------------------------------------------------- finding shards
def resolve_shards(patterns: Sequence[str], *, field: str) -> list[Path]:
    """Expand globs, directories and plain paths into a sorted, de-duplicated shard list.

    Raises DataError naming `field` and the pattern for a path that does not exist, a glob that matches nothing,
    a directory without shards, a file that is not `*.jsonl[.zst]`, or a symlink that leads nowhere (dangling,
    or a loop) among the matches. Run before training starts.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    found: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            found.extend(_glob_shards(pattern, field))
        elif os.path.isdir(pattern):
            entries = sorted(p for p in Path(pattern).iterdir() if is_shard_name(p))
            _refuse_broken_links(entries, field, f"directory '{pattern}'")
            matches = [p for p in entries if p.is_file()]
            if not matches:
                raise DataError(f"{field}: directory '{pattern}' contains no {' or '.join(SHARD_SUFFIXES)} files")
            found.extend(matches)
        elif os.path.isfile(pattern):
            if not is_shard_name(Path(pattern)):
                raise DataError(f"{field}: '{pattern}' is not a shard (expected {' or '.join(SHARD_SUFFIXES)})")
            found.append(Path(pattern))
        else:
            _refuse_broken_links([Path(pattern)], field, "path")
            raise DataError(f"{field}: '{pattern}' does not exist")
    if not patterns:
        raise DataError(f"{field}: no shard paths given")
    unique = {p.resolve(): None for p in found}
    return sorted(unique)


def _glob_shards(pattern: str, field: str) -> list[Path]:
    matched = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    _refuse_broken_links(matched, field, f"glob '{pattern}'")
    matches = [p for p in matched if p.is_file()]  # directories a glob also matches are not shards
    if not matches:
        raise DataError(f"{field}: glob '{pattern}' matches no files")
    bad = [m for m in matches if not is_shard_name(m)]
    if bad:
        raise DataError(
            f"{field}: glob '{pattern}' matches {bad[0]}, which is not a shard ({' or '.join(SHARD_SUFFIXES)})"
        )
    return matches


def _refuse_broken_links(paths: Sequence[Path], field: str, where: str) -> None:
    """A symlink that leads nowhere is most likely a shard that should be there (an unmounted or moved data
    directory): dropping it would train on less data without a word."""
    for path in paths:
        problem = broken_link(path)
        if problem:
            raise DataError(f"{field}: {where} lists {path}, which is {problem}")


def broken_link(path: Path) -> str | None:
    """'a dangling symlink (-> target)' or 'a symlink loop' when `path` is a link that cannot be followed."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        return f"a dangling symlink (-> {os.readlink(path)}, {err.strerror or err})"
    return None


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
class _LineSplitter:
    """Cuts a byte stream into lines. A line longer than `max_bytes` comes out as an `OversizedLine`: its
    bytes are dropped as they arrive instead of collected, so one huge record costs no more memory than a
    read chunk (and none of the parsing and tokenizing that would follow)."""

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.pending: list[bytes] = []  # pieces of a line that spans chunks
        self.pending_bytes = 0
        self.oversized = False

    def feed(self, data: bytes) -> list[bytes | OversizedLine]:
        if b"\n" not in data:
            self._hold(data)
            return []
        lines = data.split(b"\n")
        tail = lines.pop()
        first = self._close(lines[0])
        limit = self.max_bytes
        if limit is not None:
            lines = [line if len(line) <= limit else OversizedLine(len(line)) for line in lines]
        lines[0] = first
        self._hold(tail)
        return lines

    def finish(self) -> bytes | OversizedLine | None:
        """The last line when the stream did not end with a newline (None if it did)."""
        if not self.pending_bytes:
            return None
        return self._close(b"")

    def _hold(self, piece: bytes) -> None:
        self.pending_bytes += len(piece)
        if self.oversized or not piece:
            return
        self.pending.append(piece)
        if self.max_bytes is not None and self.pending_bytes > self.max_bytes:
            self.pending.clear()
            self.oversized = True

    def _close(self, piece: bytes) -> bytes | OversizedLine:
        size = self.pending_bytes + len(piece)
        if self.oversized or (self.max_bytes is not None and size > self.max_bytes):
            line: bytes | OversizedLine = OversizedLine(size)
        else:
            line = b"".join([*self.pending, piece]) if self.pending else piece
        self.pending.clear()
        self.pending_bytes = 0
        self.oversized = False
        return line


class _ChunkFile:
    """Reads a file from an offset on, holding it open or opening it again for each read."""

    def __init__(self, path: str, start: int, hold_open: bool):
        self.path, self.pos, self.hold_open = path, start, hold_open
        self.fh = open(path, "rb")
        if start:
            self.fh.seek(start)
        if not hold_open:
            self.fh.close()

    def read(self, n: int) -> bytes:
        if self.hold_open:
            return self.fh.read(n)
        with open(self.path, "rb") as fh:
            fh.seek(self.pos)
            data = fh.read(n)
        self.pos += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def iter_decompressed(
    path: Path | str,
    chunk_bytes: int = READ_CHUNK_BYTES,
    on_read: Callable[[int], None] | None = None,
    start: int = 0,
    length: int | None = None,
    on_decompressed: Callable[[int], None] | None = None,
    compressed: bool | None = None,
    hold_open: bool = True,
) -> Iterator[bytes | StreamFault]:
    """Yield the shard's text in pieces, then a `StreamFault` if the stream ended abnormally.

    Reads compressed bytes [start, start + length) (to the end when `length` is None): with a frame index, one
    frame or a run of frames is decompressed alone. zstd shards are decompressed with a streaming decompression
    object, frame after frame. Unlike zstandard's `stream_reader`, which ends quietly at a truncated frame, this
    notices truncation (a frame started but never finished) and reports it. `on_read(n)` is told about every n
    bytes read from the file, `on_decompressed(n)` about every n bytes of text produced. `compressed` overrides
    what the file name says. `hold_open=False` opens the file for each read instead of holding it open between
    reads: a process with thousands of paused readers (one per packing lane) holds no file descriptors.
    """
    path = str(path)
    try:
        fh = _ChunkFile(path, start, hold_open)
    except OSError as err:
        yield StreamFault("unreadable_shard", f"cannot open: {err.strerror or err}")
        return
    with fh:
        if compressed is None:
            compressed = path.endswith(ZSTD_SUFFIXES)
        dctx = zstandard.ZstdDecompressor() if compressed else None
        dobj = dctx.decompressobj() if compressed else None
        frame_open = False  # a frame has been fed but has not ended
        left = length
        while left is None or left > 0:
            try:
                chunk = fh.read(chunk_bytes if left is None else min(chunk_bytes, left))
            except OSError as err:
                yield StreamFault("unreadable_shard", f"read error: {err.strerror or err}")
                return
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            if on_read is not None:
                on_read(len(chunk))
            if not compressed:
                data, fault = chunk, None
            else:
                out = []
                fault = None
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
                data = b"".join(out) if len(out) != 1 else out[0]
            if on_decompressed is not None:
                on_decompressed(len(data))
            if data:
                yield data
            if fault is not None:
                yield fault
                return
        if frame_open:
            yield StreamFault("truncated_stream", "zstd stream ends inside a frame (file truncated?)")


def iter_lines(
    path: Path | str,
    chunk_bytes: int = READ_CHUNK_BYTES,
    on_read: Callable[[int], None] | None = None,
    max_line_bytes: int | None = None,
    start: int = 0,
    length: int | None = None,
    on_decompressed: Callable[[int], None] | None = None,
    compressed: bool | None = None,
    hold_open: bool = True,
) -> Iterator[bytes | OversizedLine | StreamFault]:
    """Yield each line of a shard (without its newline), then a `StreamFault` if the shard ended abnormally.

    The bytes read are those of `iter_decompressed` (a run of frames with `start`/`length`). A truncated or
    corrupt stream drops the partial line before the cut as part of the fault. A plain `.jsonl` shard's last
    line may lack its newline. A line longer than `max_line_bytes` is yielded as an `OversizedLine` (its size),
    never held whole.
    """
    splitter = _LineSplitter(max_line_bytes)
    for data in iter_decompressed(path, chunk_bytes, on_read, start, length, on_decompressed, compressed, hold_open):
        if isinstance(data, StreamFault):  # the complete lines before the damage were yielded; the partial one is lost
            yield data
            return
        yield from splitter.feed(data)
    tail = splitter.finish()
    if tail is not None:
        yield tail
