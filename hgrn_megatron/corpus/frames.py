"""Frame indexes: a small JSON file beside a shard made of independent zstd frames, saying where each frame is.

    SHARD.jsonl.zst              frames of a few MiB each, every frame ending at a line boundary
    SHARD.jsonl.zst.frames.json  {"format", "shard_bytes", "lines", "text_bytes", "crc32", "fault", "source",
                                  "frames": [[offset, length, first_line, lines, text_bytes], ...]}

A frame is a standalone zstd frame, so any zstd reader still reads the shard as one stream; the index lets a
reader decompress one frame alone (seek to `offset`, read `length` bytes). `hgrn-data reshard` writes both; the
index is written last, so a shard with an index is a finished shard. `load_index` refuses an index that does not
fit its shard (a shard rewritten or cut since): a stale index would make readers skip or repeat data silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .shards import DataError

INDEX_FORMAT = "hgrn-frame-index/1"
INDEX_SUFFIX = ".frames.json"


@dataclass(frozen=True, slots=True)
class Frame:
    """One zstd frame of a shard: compressed bytes [offset, offset + length), lines [first_line, + lines),
    `text_bytes` of text once decompressed."""

    offset: int
    length: int
    first_line: int
    lines: int
    text_bytes: int


@dataclass(frozen=True)
class FrameIndex:
    shard_bytes: int
    lines: int
    text_bytes: int
    crc32: int
    frames: tuple[Frame, ...]
    fault: dict | None = None  # the input's stream fault, when resharding found one (its lines are lost)

    def to_json(self, source: str = "") -> dict:
        return {
            "format": INDEX_FORMAT,
            "source": source,
            "shard_bytes": self.shard_bytes,
            "lines": self.lines,
            "text_bytes": self.text_bytes,
            "crc32": self.crc32,
            "fault": self.fault,
            "frames": [[f.offset, f.length, f.first_line, f.lines, f.text_bytes] for f in self.frames],
        }


def index_path(shard: Path | str) -> Path:
    return Path(str(shard) + INDEX_SUFFIX)


def write_index(shard: Path | str, index: FrameIndex, source: str = "") -> Path:
    """Write the index beside `shard` (tmp + rename: an index on disk is always whole)."""
    path = index_path(shard)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index.to_json(source), separators=(",", ":")))
    os.replace(tmp, path)
    return path


def load_index(shard: Path | str) -> FrameIndex | None:
    """The shard's frame index, None when it has none; DataError when the index is damaged or does not fit."""
    path = index_path(shard)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        if obj.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {obj.get('format')!r}, expected {INDEX_FORMAT!r}")
        frames = tuple(Frame(*(int(v) for v in row)) for row in obj["frames"])
        index = FrameIndex(int(obj["shard_bytes"]), int(obj["lines"]), int(obj["text_bytes"]), int(obj["crc32"]),
                           frames, obj.get("fault"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a readable frame index ({err})") from None
    size = os.path.getsize(shard)
    if size != index.shard_bytes:
        raise DataError(f"{path}: the index describes a shard of {index.shard_bytes:,} bytes, but {shard} has "
                        f"{size:,}; the shard changed since it was indexed (rerun `hgrn-data reshard`)")
    _check_layout(path, index)
    return index


def _check_layout(path: Path, index: FrameIndex) -> None:
    offset = line = 0
    for i, f in enumerate(index.frames):
        if f.offset != offset or f.first_line != line or f.length <= 0 or f.lines < 0:
            raise DataError(f"{path}: frame {i} is {f}, expected offset {offset} and first line {line}")
        offset += f.length
        line += f.lines
    if offset != index.shard_bytes or line != index.lines:
        raise DataError(f"{path}: frames cover {offset:,} bytes and {line:,} lines, the index says "
                        f"{index.shard_bytes:,} and {index.lines:,}")
