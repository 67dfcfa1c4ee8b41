"""Writing and hashing checkpoint files: atomic writes, fsync, content digests, and write errors that say why.

The digest is xxHash's XXH3-128 (the `xxhash` package): a non-cryptographic hash built for checking data at
memory speed (tens of GB/s per core), where sha256 managed 1.5 GB/s here; a checkpoint needs protection from
bit flips and torn writes, not from an adversary.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import xxhash

HASH_NAME = "xxh3_128"
_READ_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message names the checkpoint and the reason."""


class CheckpointWriteError(CheckpointError):
    """Saving failed (e.g. the disk filled up); the partial save was removed and older checkpoints are intact."""


def file_digest(path: Path) -> str:
    """XXH3-128 of a file's content, hex."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') writes to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a partial temp file behind (a full disk stays full otherwise)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (temp file, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def os_error_behind(err: BaseException) -> OSError | None:
    """The OSError that caused `err`, if any: torch's zip writer reports a full disk as a RuntimeError ("unexpected
    pos ...") raised while it handles the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def describe_write_error(err: OSError, path: Path) -> str:
    """One line: what failed where, with the free space of the filesystem when it is full."""
    what = os.strerror(err.errno) if err.errno else str(err)
    line = f"{what} writing {path}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        probe = next((p for p in (path, *path.parents) if p.exists()), None)
        if probe is not None:
            free = shutil.disk_usage(probe).free
            line += f" ({free / 2**20:,.1f} MiB free on that filesystem)"
    return line
