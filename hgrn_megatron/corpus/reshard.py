"""Rewriting a shard as independent zstd frames of a few MiB each, with a frame index beside it.

The text is copied byte for byte (bad records included: the training reader still counts them); only the frame
layout changes. Streaming with constant memory: text is decompressed in 1 MiB pieces and fed to a compressor
that is finished at the first line end after every `frame_bytes` of text, so a frame always ends at a line
boundary (a line longer than a frame stretches its frame; it is never held whole). The output is written to a
temporary name, checked by reading it back (every frame alone: its length, its lines, the text's CRC-32 against
the input's) and renamed; the index is written last, so a shard whose index exists is finished and a rerun skips
it. A corrupt or truncated input ends its output with what was readable (a line cut by the damage stays as a last
line without its newline, which the reader counts as a bad record), and the fault is reported and recorded in the
index.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from .frames import Frame, FrameIndex, index_path, load_index, write_index
from .shards import DataError, StreamFault, iter_decompressed

DEFAULT_FRAME_BYTES = 4 << 20
DEFAULT_LEVEL = 3


@dataclass
class ReshardResult:
    source: str
    output: str
    skipped: bool  # already finished by an earlier run
    lines: int
    text_bytes: int
    frames: int
    input_bytes: int
    output_bytes: int
    fault: dict | None


class _FrameWriter:
    """Compresses text into standalone frames cut at line ends, recording each frame for the index."""

    def __init__(self, fh, frame_bytes: int, level: int):
        self.fh = fh
        self.frame_bytes = frame_bytes
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.frames: list[Frame] = []
        self.offset = 0
        self.lines = 0  # complete lines written
        self.crc = 0
        self.text_bytes = 0
        self._start()

    def _start(self) -> None:
        self.cobj = self.cctx.compressobj()
        self.frame_text = 0
        self.frame_first_line = self.lines
        self.frame_out = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self.fh.write(data)
            self.frame_out += len(data)

    def write(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.text_bytes += len(data)
        while data:
            room = self.frame_bytes - self.frame_text
            cut = data.find(b"\n", max(0, room - 1)) if room <= len(data) else -1
            piece, data = (data, b"") if cut < 0 else (data[: cut + 1], data[cut + 1 :])
            self._emit(self.cobj.compress(piece))
            self.frame_text += len(piece)
            self.lines += piece.count(b"\n")
            if cut >= 0:
                self.close_frame()

    def close_frame(self, partial_line: bool = False) -> None:
        if not self.frame_text:
            return
        self._emit(self.cobj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        lines = self.lines - self.frame_first_line + int(partial_line)
        self.frames.append(Frame(self.offset, self.frame_out, self.frame_first_line, lines, self.frame_text))
        self.offset += self.frame_out
        self.lines += int(partial_line)
        self._start()


def reshard_one(source: Path | str, output: Path | str, frame_bytes: int = DEFAULT_FRAME_BYTES,
                level: int = DEFAULT_LEVEL, on_read=None) -> ReshardResult:
    """Rewrite `source` as `output` (+ its index); skipped when `output` is already finished."""
    source, output = Path(source), Path(output)
    if frame_bytes < 1:
        raise ValueError(f"frame size must be >= 1 byte, got {frame_bytes}")
    done = _finished(output)
    if done is not None:
        if on_read is not None:
            on_read(os.path.getsize(source))
        return ReshardResult(str(source), str(output), True, done.lines, done.text_bytes, len(done.frames),
                             os.path.getsize(source), done.shard_bytes, done.fault)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    fault = None
    with open(tmp, "wb") as fh:
        writer = _FrameWriter(fh, frame_bytes, level)
        ends_line = True
        for data in iter_decompressed(source, on_read=on_read):
            if isinstance(data, StreamFault):
                fault = {"kind": data.kind, "detail": data.detail}
                break
            writer.write(data)
            ends_line = data.endswith(b"\n")
        writer.close_frame(partial_line=not ends_line)
        fh.flush()
        os.fsync(fh.fileno())
    index = FrameIndex(writer.offset, writer.lines, writer.text_bytes, writer.crc, tuple(writer.frames), fault)
    verify_frames(tmp, index)
    os.replace(tmp, output)
    write_index(output, index, source=source.name)
    return ReshardResult(str(source), str(output), False, index.lines, index.text_bytes, len(index.frames),
                         os.path.getsize(source), index.shard_bytes, fault)


def _finished(output: Path) -> FrameIndex | None:
    if not (output.is_file() and index_path(output).is_file()):
        return None
    try:
        return load_index(output)
    except DataError:  # an index that does not fit: redo the shard
        return None


def verify_frames(path: Path | str, index: FrameIndex) -> None:
    """Read every frame of `path` alone; DataError unless each holds its lines and the text matches the CRC."""
    if os.path.getsize(path) != index.shard_bytes:
        raise DataError(f"{path}: {os.path.getsize(path):,} bytes written, expected {index.shard_bytes:,}")
    crc = 0
    text = 0
    for i, frame in enumerate(index.frames):
        lines = size = 0
        last = b""
        for data in iter_decompressed(path, start=frame.offset, length=frame.length, compressed=True):
            if isinstance(data, StreamFault):
                raise DataError(f"{path}: frame {i} does not read alone ({data.kind}: {data.detail})")
            crc = zlib.crc32(data, crc)
            text += len(data)
            size += len(data)
            lines += data.count(b"\n")
            last = data[-1:]
        lines += int(last != b"\n" and i == len(index.frames) - 1 and bool(last))
        if lines != frame.lines or size != frame.text_bytes:
            raise DataError(f"{path}: frame {i} holds {lines} lines ({size:,} bytes), the index says {frame.lines} "
                            f"({frame.text_bytes:,} bytes)")
    if crc != index.crc32 or text != index.text_bytes:
        raise DataError(f"{path}: the text read back ({text:,} bytes, CRC-32 {crc:08x}) differs from the input "
                        f"({index.text_bytes:,} bytes, CRC-32 {index.crc32:08x})")
