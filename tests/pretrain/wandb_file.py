"""Read a W&B offline run file (`run-ID.wandb`) back: a 7-byte header (":W&B", magic, version), then LevelDB-log
records (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each a
serialized `wandb_internal_pb2.Record`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        parts.append(raw[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
        elif kind == 0:
            break


def history(path: Path) -> list[dict]:
    """Every `log` call's scalars, in order."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def run_info(path: Path) -> tuple[str, dict]:
    """The run id and the config recorded with it."""
    run_id, config = None, {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return run_id, config
