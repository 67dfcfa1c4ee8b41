"""The loader's worker side: producing a rank's samples of some lanes and handing them to the trainer.

A worker produces the samples of its lanes in the rank's order (`rank_samples`) and sends them through its own
pipe, several to a message (`SampleGroup`), at most `prefetch` ahead: it takes a credit per sample, and the
trainer returns one per sample it takes. `loader.TrainLoader` is the trainer's side.
"""
from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
from collections import Counter
from typing import NamedTuple

import numpy as np

from hgrn_megatron.corpus.shards import DataError

from .packing import LaneGroup

QUEUE_POLL_S = 0.5
CLOSE_GRACE_S = 2.0
# Samples a worker hands over in one message at most. Each message costs both processes a pickle, a pipe write
# and read and a wake-up: about 100 us of CPU together, a tenth of producing a sample of 2,048 tokens (measured,
# docs/BENCHMARKS.md). A worker with room (credits) to spare fills a message before sending it, and sends what
# it holds whenever it runs out of room.
SAMPLES_PER_MESSAGE = 16


class WorkerSample(NamedTuple):
    """What a worker sends per sample: the sample, its lane's state after it, and the worker's costs."""

    index: int  # global sample index j
    tokens: np.ndarray  # int32 [S+1]
    doc_start: np.ndarray  # bool [S+1]
    snapshot: dict  # the lane's state after this sample (packing.Lane.snapshot)
    counts: Counter | None  # the lane's counter increments since its previous sample (None: nothing to add)
    busy_s: float  # wall seconds spent producing it
    cpu_s: float  # CPU seconds spent producing it
    readers: int  # shard readers open in the worker
    io: tuple  # the worker's reading costs so far (packing.IO_KEYS)


class SampleGroup(NamedTuple):
    """One message from a worker: consecutive samples of its own, their arrays stacked (one pickle each)."""

    tokens: np.ndarray  # int32 [n, S+1]
    doc_start: np.ndarray  # bool [n, S+1]
    samples: list  # n WorkerSamples without their arrays (tokens and doc_start None)

    @classmethod
    def pack(cls, samples: list[WorkerSample]) -> SampleGroup:
        return cls(np.stack([s.tokens for s in samples]), np.stack([s.doc_start for s in samples]),
                   [s._replace(tokens=None, doc_start=None) for s in samples])

    def unpack(self) -> list[WorkerSample]:
        return [s._replace(tokens=t, doc_start=d) for s, t, d in zip(self.samples, self.tokens, self.doc_start)]


class WorkerError(NamedTuple):
    """What a failing worker sends instead (a DataError stays a DataError in the trainer)."""

    is_data_error: bool
    message: str
    traceback: str


def rank_samples(start: int, dp_rank: int, dp_size: int):
    """Global sample indices of one rank, in order: start + dp_rank, start + dp_rank + dp_size, ..."""
    j = start + dp_rank
    while True:
        yield j
        j += dp_size


def produce_sample(group: LaneGroup, j: int) -> WorkerSample:
    """Global sample j from the group holding its lane, with the lane's state and what producing it cost."""
    t0, c0 = time.perf_counter(), time.process_time()
    lane = j % group.spec.lanes
    tokens, doc_start, snapshot, delta = group.produce(lane, j // group.spec.lanes)
    return WorkerSample(j, tokens, doc_start, snapshot, delta.counts or None, time.perf_counter() - t0,
                        time.process_time() - c0, group.num_readers(), group.io.as_tuple())


def _wait_for_credit(credits, stop, parent_pid) -> bool:
    """Wait for a credit (the trainer's room for one more sample); False when told to stop."""
    while not credits.acquire(timeout=QUEUE_POLL_S):
        if stop.is_set() or os.getppid() != parent_pid:
            return False
    return not stop.is_set()  # close() hands out a credit to wake us up


def _send(conn, item) -> bool:
    """Send one message; False when the trainer has closed its end (it is shutting down)."""
    try:
        conn.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        return False
    return True


class _Outbox:
    """A worker's samples on their way: one credit taken per sample, sent in groups (see SAMPLES_PER_MESSAGE)."""

    def __init__(self, conn, credits, stop, parent_pid):
        self.conn, self.credits, self.stop, self.parent_pid = conn, credits, stop, parent_pid
        self.held: list[WorkerSample] = []

    def put(self, sample: WorkerSample) -> bool:
        """Queue `sample` once there is room for it; False when told to stop."""
        if not self.credits.acquire(block=False):  # no room: hand over what is ready before waiting
            if not self.flush() or not _wait_for_credit(self.credits, self.stop, self.parent_pid):
                return False
        self.held.append(sample)
        return len(self.held) < SAMPLES_PER_MESSAGE or self.flush()

    def flush(self) -> bool:
        if not self.held:
            return True
        if self.stop.is_set():
            return False
        group, self.held = SampleGroup.pack(self.held), []
        return _send(self.conn, group)


def worker_main(worker, spec, lane_states, tokenizer, start, dp_rank, dp_size, conn, credits, stop, parent_pid,
                 trainer_ends):
    """Loader worker: produce this worker's lanes' samples in the rank's order, `prefetch` ahead at most."""
    for end in trainer_ends:  # inherited copies of the trainer's read ends: without them, a closed trainer end
        end.close()  # makes our send fail instead of block
    # Ctrl-C and preemption signals (SLURM sends SIGTERM/SIGUSR1 to every process of the job) are for the trainer,
    # which may still need samples to finish its step and checkpoint; it closes us when done.
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    outbox = _Outbox(conn, credits, stop, parent_pid)
    try:
        group = LaneGroup(spec, lane_states, tokenizer)
        mine = set(group.lanes)
        for j in rank_samples(start, dp_rank, dp_size):
            if j % spec.lanes in mine and not outbox.put(produce_sample(group, j)):
                return
    except BaseException as err:  # noqa: BLE001 - report everything to the trainer
        # The samples produced before the failure come first, as they would have one by one; an error report
        # never waits for room.
        if outbox.flush():
            _send(conn, WorkerError(isinstance(err, DataError), f"{type(err).__name__}: {err}",
                                    traceback.format_exc()))
    finally:
        conn.close()
