"""`manifest.json`: every file of a checkpoint with its size and content digest, written last.

    {"format": 2, "hash": "xxh3_128",
     "files": {"ds/mp_rank_00_model_states.pt": {"bytes": 1234, "xxh3_128": "9f...", "rank": 0}, ...}}

Every rank digests the files it wrote as it writes them (`engine_io.HashingCheckpointEngine`, `record_file`);
rank 0 gathers the entries and writes the manifest. Format 1 (earlier versions) holds sizes, and sha256 digests
of files under 16 MiB only; it still verifies. A manifest of the wrong shape makes the checkpoint unusable, with
the reason, never a traceback.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .files import HASH_NAME, atomic_write_bytes, file_digest

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2


def record_file(path: Path, ckpt_dir: Path, rank: int) -> tuple[str, dict[str, Any]]:
    """(relative name, manifest entry) of a file this rank just wrote into `ckpt_dir`."""
    return path.relative_to(ckpt_dir).as_posix(), {"bytes": path.stat().st_size, HASH_NAME: file_digest(path),
                                                   "rank": rank}


def write_manifest(ckpt_dir: Path, entries: dict[str, dict] | None = None) -> None:
    """Write the manifest from the ranks' gathered `entries`, or (None) by digesting every file here, as a tool
    working on a finished checkpoint does."""
    if entries is None:
        entries = dict(record_file(p, ckpt_dir, 0) for p in sorted(ckpt_dir.rglob("*"))
                       if p.is_file() and p.name != MANIFEST)
    missing = sorted(rel for rel in entries if not (ckpt_dir / rel).is_file())
    if missing:
        raise FileNotFoundError(f"{ckpt_dir}: manifest entries without files: {missing[:3]}")
    body = {"format": MANIFEST_FORMAT, "hash": HASH_NAME, "files": dict(sorted(entries.items()))}
    atomic_write_bytes(ckpt_dir / MANIFEST, json.dumps(body, indent=1).encode())


def read_manifest(ckpt_dir: Path) -> tuple[dict[str, dict] | None, str | None]:
    """(files, None), or (None, why the manifest is missing or unusable)."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return None, "no manifest.json (torn write?)"
    try:
        body = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"unreadable manifest.json ({err})"
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict):
        return None, "manifest.json has no 'files' mapping"
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0):
            return None, f"manifest.json entry {rel!r} has no byte count"
        for key in (HASH_NAME, "sha256"):
            if key in entry and not isinstance(entry[key], str):
                return None, f"manifest.json entry {rel!r}: {key} is not a string"
    return files, None


def check_sizes(ckpt_dir: Path, files: dict[str, dict]) -> str | None:
    """Why the files on disk do not match the manifest's names and sizes (a cheap check: no reading)."""
    for rel, entry in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != entry["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, manifest says {entry['bytes']}"
    return None


def check_content(ckpt_dir: Path, files: dict[str, dict]) -> str | None:
    """Why a file's content does not match its digest (XXH3-128, or sha256 in format-1 manifests)."""
    for rel, entry in files.items():
        path = ckpt_dir / rel
        if HASH_NAME in entry and file_digest(path) != entry[HASH_NAME]:
            return f"{rel}: content does not match its {HASH_NAME} digest (corrupted after it was written)"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{rel}: content does not match its sha256 digest"
    return None


def share_of(files: dict[str, dict], rank: int, world: int) -> dict[str, dict]:
    """The entries rank `rank` verifies on resume: the files it wrote when the job has the world size that saved
    them (the files it is about to read), else every world-th entry; either way each file is read by one rank."""
    names = sorted(files)
    owners = [files[n].get("rank") for n in names]
    if all(isinstance(r, int) for r in owners) and max(owners, default=-1) + 1 == world:
        return {n: files[n] for n in names if files[n]["rank"] == rank}
    return {n: files[n] for i, n in enumerate(names) if i % world == rank}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
