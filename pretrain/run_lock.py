"""One trainer per run directory: an exclusive lock on RUN_DIR/.lock, held by rank 0 for the whole run.

Two trainers in one run directory would log every step twice and write (and delete) the same temporary
checkpoint folders. The lock is a POSIX record lock (`fcntl.lockf`), not `flock`, for two reasons:
- the kernel releases it when the holding process dies, however it dies (kill -9 included), and a forked
  child does not inherit it: the data-loader workers forked by the trainer would otherwise keep a killed
  trainer's lock until they noticed and exited themselves;
- on NFS it is the lock the server arbitrates (NLM with NFSv3's lockd, built into NFSv4), where `flock` is
  emulated by it anyway. It does not exclude trainers on other nodes where the filesystem keeps locks local
  to each client: NFSv3 mounted `nolock` (or without lockd), Lustre mounted `localflock`, BeeGFS without
  global file locks. docs/LAUNCH.md lists them.
A POSIX lock is dropped when the holder closes any descriptor of the file, so only this module opens it, once.
The holder writes its host, pid and start time into the file, so the refusal names it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from hgrn_megatron.config_base import ConfigError

LOCK_FILE = ".lock"
# Errors of filesystems that have no (working) lock service: the run goes on unlocked, with a warning.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Locks this process holds, by lock file: a second POSIX lock by the same process would succeed, and closing its
# descriptor would drop the first.
_held: dict[str, RunLock] = {}


class RunDirLocked(ConfigError):
    """Another live trainer holds the run directory (exit 2, like any start that does not fit)."""


class RunLock:
    """A held lock: it lasts until `release()` or the end of the process (this module keeps a reference)."""

    def __init__(self, path: Path, fd: int | None, warning: str | None = None):
        self.path, self._fd, self.warning = path, fd, warning

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            _held.pop(str(self.path.resolve()), None)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file (best effort: it may be mid-write)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Take the run directory's lock (creating run_dir if needed) or raise RunDirLocked naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    if str(path.resolve()) in _held:
        raise RunDirLocked(f"run_dir {run_dir} is in use by another trainer in this process (pid {os.getpid()})")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            holder = _holder(fd)
            os.close(fd)
            raise RunDirLocked(
                f"run_dir {run_dir} is in use by another trainer ({holder}); stop it first, or choose another "
                "run_dir") from None
        os.close(fd)
        if err.errno in _NO_LOCKING:
            return RunLock(path, None, warning=f"{path}: this filesystem does not support locks ({err.strerror}); "
                                              "nothing stops a second trainer in this run_dir")
        raise
    # The holder's note is rewritten in place (truncate, then one write): the lock belongs to this file's inode,
    # so a write-to-temp-and-rename would hand the next trainer a different, unlocked file.
    note = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    lock = RunLock(path, fd)
    _held[str(path.resolve())] = lock
    return lock


def lock_run_dir(run_dir: str | Path, rank: int) -> RunLock | None:
    """Collective: rank 0 takes the lock; every rank raises the same RunDirLocked if it cannot.

    Call it once the process group exists and before anything is written to run_dir. The lock lasts until the
    process ends (or `release()`)."""
    import torch.distributed as dist

    lock, outcome = None, [None]
    if rank == 0:
        try:
            lock = acquire_run_lock(run_dir)
        except RunDirLocked as err:
            outcome = [str(err)]
        if lock is not None and lock.warning:
            logging.getLogger("hgrn_megatron.pretrain").warning(lock.warning)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunDirLocked(outcome[0])
    return lock
