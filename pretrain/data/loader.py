"""`TrainLoader`: a rank's micro-batches from background workers, in the global sample order, resumable exactly.

Rank r of a data-parallel group of size DP takes global samples J + r, J + r + DP, ... (J = where the run
resumed; see `packing.py` for the global order). Those samples come from lanes `rank_lanes(...)` only; the rank's
lanes are dealt to workers round-robin (worker w gets the rank's lanes w, w + W, ...), so each lane lives in
exactly one worker and each worker reads the shards once for all its lanes. A worker produces the samples of its
lanes in the rank's order and sends them through its own pipe, several to a message (`worker.SAMPLES_PER_MESSAGE`;
fewer when it runs out of room), at most `prefetch` ahead (credits: the trainer returns one per sample taken); the
trainer takes sample j from the worker owning lane `j mod L`.

Exact state with prefetch: every sample arrives with its lane's snapshot after that sample (position, token
offset, samples produced) and the lane's counter increments since its previous sample. The trainer side applies
them only when the trainer consumes the sample, so `state_dict()` and `stats()` describe exactly the samples
consumed, whatever the workers have read ahead. `num_workers=0` runs the same code in the training process.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import time
from collections import deque
from typing import Any

import numpy as np

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.shards import DataError

from .batch import collate
from .config import DataConfig
from .packing import IO_KEYS, LaneGroup, PackingSpec
from .state import (
    STATE_FORMAT,
    as_global_state,
    check_fingerprint,
    fingerprint,
    initial_global_state,
    rank_lanes,
)
from .worker import (
    CLOSE_GRACE_S,
    QUEUE_POLL_S,
    SampleGroup,
    WorkerError,
    WorkerSample,
    produce_sample,
    worker_main,
)

log = logging.getLogger(__name__)


def check_data_state(cfg: DataConfig, tokenizer, seq_length: int, state: dict) -> None:
    """Raise DataError, naming what differs, unless the saved `state` continues this data set-up (the check a
    `TrainLoader` makes, without building one: a resume asks before it loads or converts anything)."""
    current = fingerprint(build_packing_spec(cfg, seq_length), tokenizer.sha256)
    check_fingerprint(as_global_state(state)["fingerprint"], current)


def build_packing_spec(cfg: DataConfig, seq_length: int) -> PackingSpec:
    paths, names, weights = cfg.resolve_train()
    return PackingSpec(
        paths=[str(p) for p in paths],
        names=names,
        shard_weights=weights,
        source_weights=dict(cfg.source_weights),
        seed=cfg.seed,
        lanes=cfg.lanes,
        seq_length=seq_length,
        record_format=cfg.record_format(),
        warn_limit=cfg.warn_limit,
    )


class TrainLoader:
    """Iterator of micro-batches `{"tokens": Long[mb, S+1], "doc_start": Bool[mb, S+1]}` for one DP rank.

    `batch.model_inputs(batch)` gives the model's inputs, labels and the inputs' document starts.
    `state` is a global state (`merge_data_states` of all ranks' `state_dict()`s, or a single-rank run's
    state); any dp_size and num_workers continue the same global sequence from it.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, state: dict | None = None):
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"TrainLoader: dp_rank {dp_rank} is not in [0, {dp_size})")
        if seq_length < 1 or micro_batch_size < 1:
            raise ValueError(
                f"TrainLoader: seq_length ({seq_length}) and micro_batch_size ({micro_batch_size}) must be >= 1"
            )
        self.cfg = cfg
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.spec = build_packing_spec(cfg, seq_length)
        self.fingerprint = fingerprint(self.spec, tokenizer.sha256)
        if state is None:
            gstate = initial_global_state(self.fingerprint)
        else:
            gstate = as_global_state(state)
            check_fingerprint(gstate["fingerprint"], self.fingerprint)
        self.start_sample = int(gstate["next_sample"])
        L = self.spec.lanes
        self.lanes = rank_lanes(L, self.start_sample, dp_rank, dp_size)
        if L % dp_size and dp_rank == 0:
            log.warning(
                "data.lanes (%d) is not a multiple of the data-parallel size (%d): ranks share lanes and each "
                "tokenizes %d/%d of the data instead of 1/%d", L, dp_size, len(self.lanes), L, dp_size,
            )
        saved = {int(s["lane"]): s for s in gstate["lanes"]}
        self._snapshots = {lane: {k: v for k, v in saved[lane].items() if k != "counters"} for lane in self.lanes}
        self._counters = {lane: DataCounters.from_state(saved[lane].get("counters", [])) for lane in self.lanes}
        self._consumed = 0
        self._wait_s = 0.0
        self._closed = False
        self.num_workers = min(cfg.num_workers, len(self.lanes))
        W = self.num_workers
        self._worker_busy = [0.0] * max(W, 1)  # seconds spent producing (wall clock, and CPU)
        self._worker_cpu = [0.0] * max(W, 1)
        self._worker_samples = [0] * max(W, 1)
        self._readers = [1] * max(W, 1)
        self._io = [(0,) * len(IO_KEYS) for _ in range(max(W, 1))]
        self._owner = {lane: i % max(W, 1) for i, lane in enumerate(self.lanes)}
        self._procs, self._conns, self._credits = [], [], []
        self._ready = [deque() for _ in range(W)]  # samples received from each worker, not yet taken
        if W == 0:
            self._group = LaneGroup(self.spec, [self._snapshots[lane] for lane in self.lanes], tokenizer)
            return
        ctx = multiprocessing.get_context(cfg.worker_start_method)
        self._stop = ctx.Event()
        self._credits = [ctx.Semaphore(cfg.prefetch) for _ in range(W)]
        for w in range(W):
            # Each pipe is made just before its worker starts, so no worker forks with another's write end.
            reader, writer = ctx.Pipe(duplex=False)
            self._conns.append(reader)
            mine = [self._snapshots[lane] for lane in self.lanes[w::W]]
            p = ctx.Process(
                target=worker_main,
                args=(w, self.spec, mine, tokenizer, self.start_sample, dp_rank, dp_size, writer, self._credits[w],
                      self._stop, os.getpid(), list(self._conns)),
                name=f"data-worker-{dp_rank}-{w}",
                daemon=True,
            )
            p.start()
            # Only the worker holds the write end now: if it dies, even mid-message, reading ends in EOFError
            # instead of waiting forever.
            writer.close()
            self._procs.append(p)
        # Workers ignore SIGTERM (see worker_main), and multiprocessing's exit handler terminates daemon children
        # with SIGTERM before joining them: a loader never closed would keep the process from exiting. This
        # handler runs first (exit handlers run last-registered first).
        atexit.register(self.close)

    # ------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        return collate([self._next_sample() for _ in range(self.micro_batch_size)])

    def _next_sample(self) -> tuple[np.ndarray, np.ndarray]:
        j = self.start_sample + self.dp_rank + self._consumed * self.dp_size
        lane = j % self.spec.lanes
        w = self._owner[lane]
        t0 = time.perf_counter()
        sample = produce_sample(self._group, j) if self.num_workers == 0 else self._get(w)
        if sample.index != j:
            raise RuntimeError(f"data worker {w} sent sample {sample.index}, expected {j} (loader bug)")
        self._wait_s += time.perf_counter() - t0
        self._worker_busy[w] += sample.busy_s
        self._worker_cpu[w] += sample.cpu_s
        self._worker_samples[w] += 1
        self._readers[w] = sample.readers
        self._io[w] = sample.io
        self._snapshots[lane] = sample.snapshot
        if sample.counts:
            self._counters[lane].counts.update(sample.counts)
        self._consumed += 1
        return sample.tokens, sample.doc_start

    def _get(self, w: int) -> WorkerSample:
        ready = self._ready[w]
        if not ready:
            ready.extend(self._receive(w).unpack())
        self._credits[w].release()
        return ready.popleft()

    def _receive(self, w: int) -> SampleGroup:
        conn, proc = self._conns[w], self._procs[w]
        try:
            while not conn.poll(QUEUE_POLL_S):
                if not proc.is_alive() and not conn.poll(0):
                    raise EOFError
            item = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            proc.join(timeout=QUEUE_POLL_S)
            self.close()
            raise RuntimeError(f"data worker {w} ({proc.name}) died with exit code {proc.exitcode}") from None
        if isinstance(item, WorkerError):
            self.close()
            if item.is_data_error:
                raise DataError(item.message)
            raise RuntimeError(f"data worker {w} failed: {item.message}\n--- worker traceback ---\n{item.traceback}")
        return item

    # ------------------------------------------------------------ state and stats
    def state_dict(self) -> dict:
        """This rank's state after the last consumed micro-batch (plain types; merge all ranks' to save)."""
        lanes = []
        for lane in self.lanes:
            entry = dict(self._snapshots[lane])
            entry["counters"] = self._counters[lane].to_state()
            lanes.append(entry)
        return {
            "format": STATE_FORMAT,
            "kind": "rank",
            "fingerprint": self.fingerprint,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "start_sample": self.start_sample,
            "consumed_samples": self._consumed,
            "lanes": lanes,
        }

    def lane_counts(self, kinds: tuple[str, ...]) -> np.ndarray:
        """[lanes, 1 + len(kinds)]: documents and skipped records of each kind, per lane; zeros for lanes this
        rank does not read. A lane's counts only grow as it is read, so the element-wise max over ranks is the
        global count even when ranks share lanes (data.lanes not a multiple of DP): the rank furthest along a
        shared lane has counted everything the others have. A plain sum would count shared lanes twice."""
        out = np.zeros((self.spec.lanes, 1 + len(kinds)), dtype=np.float64)
        for lane in self.lanes:
            summary = self._counters[lane].summary()
            by_kind = summary.get("skipped_by_kind", {})
            out[lane] = [summary["documents"]] + [by_kind.get(kind, 0) for kind in kinds]
        return out

    def stats(self) -> dict:
        """Counts over this rank's lanes (documents, tokens, skips by kind/shard/source) and loader speed.

        Counts cover everything the lanes read since the start of training (they travel in the state). With
        data.lanes a multiple of the DP size, the sum over ranks is the global count (otherwise combine
        `lane_counts` over ranks).
        """
        out = DataCounters.total(self._counters.values()).summary()
        passes = [s["doc_pass"] for s in self._snapshots.values() if s["doc"] is not None] or [0]
        per_epoch = self.spec.mixture.passes_per_epoch

        def rate(seconds):  # production rate of each worker, summed: what the loader could deliver
            return sum(n * self.seq_length / b for n, b in zip(self._worker_samples, seconds) if n and b > 0)

        out.update(
            samples=self._consumed,
            sample_tokens=self._consumed * self.seq_length,
            next_global_sample=self.start_sample + self.dp_rank + self._consumed * self.dp_size,
            pass_index=max(passes),
            epoch=max(passes) // per_epoch,
            loader_tokens_per_s=rate(self._worker_busy),
            loader_tokens_per_cpu_s=rate(self._worker_cpu),
            loader_busy_s=sum(self._worker_busy),
            loader_cpu_s=sum(self._worker_cpu),
            wait_s=self._wait_s,
            workers=self.num_workers,
            readers=sum(self._readers[: max(self.num_workers, 1)]),
        )
        # What the workers read to produce the samples taken so far (since this loader was built; not in the
        # state): totals, and per worker, so that a worker reading more than its share shows.
        workers = self._io[: max(self.num_workers, 1)]
        for i, key in enumerate(IO_KEYS):
            out[key] = sum(io[i] for io in workers)
            out[f"worker_{key}"] = [io[i] for io in workers]
        return out

    # ------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop and reap the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if not self._procs:
            return
        self._stop.set()
        for conn, credits in zip(self._conns, self._credits):
            credits.release()  # wakes a worker waiting for room; it sees `stop` and exits
            conn.close()  # a worker blocked sending gets an error and exits
        deadline = time.monotonic() + CLOSE_GRACE_S
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():  # busy with a long document; it ignores SIGTERM and holds nothing worth saving
                p.kill()
                p.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
