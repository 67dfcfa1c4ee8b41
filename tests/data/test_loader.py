"""Loader mechanics: a reader per lane, spawned workers, dying workers, unusable data."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hgrn_megatron.pretrain.data import DataError, TrainLoader
from hgrn_megatron.pretrain.data.loader import build_packing_spec
from hgrn_megatron.pretrain.data.packing import LaneGroup, fresh_lane_state
from hgrn_megatron.pretrain.data.worker import SAMPLES_PER_MESSAGE
from tests.data.data_harness import data_config, record, run_ranks, write_corpus, write_zst


def test_a_worker_with_some_lanes_gives_those_lanes_samples_unchanged(tmp_path, tokenizer):
    """Each lane reads its own units with its own reader: which other lanes share its worker changes nothing."""
    corpus = write_corpus(tmp_path, shard_docs=(30, 30), min_words=2, max_words=300)
    spec = build_packing_spec(data_config(corpus["glob"]), 16)
    every = LaneGroup(spec, [fresh_lane_state(lane) for lane in range(8)], tokenizer)
    some = LaneGroup(spec, [fresh_lane_state(lane) for lane in (1, 6)], tokenizer)
    assert every.num_readers() == 8 and some.num_readers() == 2
    for j in range(400):
        sample = every.produce(j % 8, j // 8)[0]
        if j % 8 in (1, 6):
            assert np.array_equal(sample, some.produce(j % 8, j // 8)[0])
    assert some.io.decompressed_bytes < every.io.decompressed_bytes


def test_spawned_workers_match_in_process_loading(corpus, tokenizer):
    cfg = data_config(corpus["glob"])
    ref, _, _, _ = run_ranks(cfg, tokenizer, 32, 2, 1, 6)
    got, _, _, _ = run_ranks(cfg.model_copy(update={"worker_start_method": "spawn"}), tokenizer, 32, 2, 1, 6, workers=2)
    assert np.array_equal(ref, got)


def test_a_dead_worker_is_reported_not_waited_for(corpus, tokenizer):
    loader = TrainLoader(data_config(corpus["glob"], num_workers=2), tokenizer, 32, 1, 0, 1)
    try:
        next(loader)
        os.kill(loader._procs[1].pid, signal.SIGKILL)
        loader._procs[1].join(5)
        with pytest.raises(RuntimeError, match=r"data worker 1 .* died with exit code -9"):
            for _ in range(200):  # drain what worker 1 had queued, then notice
                next(loader)
    finally:
        loader.close()


def test_a_worker_dying_mid_message_is_reported(corpus, tokenizer):
    """Samples larger than a pipe's buffer (64 KiB): a worker waiting for room dies with half a sample sent.
    No other worker may hold its pipe's write end (forked workers inherited them when all pipes were made
    first), or reading the rest of that message would wait forever."""

    class Hung(Exception):  # not an OSError, which the loader would take for the worker's death
        pass

    def timeout(signum, frame):
        raise Hung("next(loader) hung on a dead worker's pipe")

    loader = TrainLoader(data_config(corpus["glob"], num_workers=2, lanes=2), tokenizer, 32768, 1, 0, 1)
    previous = signal.signal(signal.SIGALRM, timeout)
    try:
        next(loader)
        deadline = time.monotonic() + 30
        while loader._conns[1].poll() is False:  # worker 1 has started to send its next sample
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # ... and is blocked in the middle of it
        os.kill(loader._procs[1].pid, signal.SIGKILL)
        loader._procs[1].join(5)
        signal.alarm(60)
        with pytest.raises(RuntimeError, match=r"data worker 1 .* died with exit code -9"):
            for _ in range(20):
                next(loader)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        loader.close()


def test_a_loader_never_closed_does_not_keep_the_process_alive(corpus, tokenizer):
    """Workers ignore SIGTERM (preemption notices are for the trainer), which multiprocessing's exit handler
    sends them before joining: the loader stops its workers at exit itself, so an error before close() ends
    the process instead of leaving it hanging."""
    script = (
        "from hgrn_megatron.pretrain.data import DataConfig, TrainLoader\n"
        "from hgrn_megatron.tokenizer import Tokenizer\n"
        f"cfg = DataConfig.build({{'train_shards': [{corpus['glob']!r}], 'num_workers': 2}})\n"
        f"loader = TrainLoader(cfg, Tokenizer.load({str(tokenizer.model_path)!r}), 32, 1)\n"
        "next(loader)\n"
        "raise SystemExit(7)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 7, done.stderr[-2000:]


def test_shards_without_a_usable_document_stop_with_a_clear_error(tmp_path, tokenizer):
    write_zst(tmp_path / "bad.jsonl.zst", [b"{nope", record(""), b"\xff"])
    for workers in (0, 1):
        loader = TrainLoader(data_config(str(tmp_path / "bad.jsonl.zst"), num_workers=workers), tokenizer, 8, 1, 0, 1)
        with pytest.raises(DataError, match=r"packing lane 0 found no usable document in 3 passes"):
            next(loader)
        loader.close()
    write_zst(tmp_path / "empty.jsonl.zst", [])
    loader = TrainLoader(data_config(str(tmp_path / "empty.jsonl.zst")), tokenizer, 8, 1, 0, 1)
    with pytest.raises(DataError, match=r"no records in any of the 1 training shards"):
        next(loader)


def test_a_shard_changed_under_a_saved_state_is_detected(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path, shard_docs=(40,))
    cfg = data_config(corpus["glob"], lanes=1)
    _, _, state, _ = run_ranks(cfg, tokenizer, 16, 1, 1, 60)
    assert state["lanes"][0]["doc"][3] > 5
    write_zst(tmp_path / "shard-00.jsonl.zst", [record("replaced") for _ in range(3)])
    for workers in (0, 1):
        cfg_w = cfg.model_copy(update={"num_workers": workers})
        with pytest.raises(DataError, match=r"shard-00.jsonl.zst: the saved data state points at line \d+, but"):
            with TrainLoader(cfg_w, tokenizer, 16, 1, 0, 1, state=state) as loader:
                next(loader)


def test_workers_survive_the_preemption_signals_meant_for_the_trainer(corpus, tokenizer):
    """SLURM signals every process of a job; the trainer may still need samples to finish its step and save."""
    cfg = data_config(corpus["glob"], num_workers=2)
    ref, _, _, _ = run_ranks(cfg, tokenizer, 32, 1, 1, 30, workers=0)
    loader = TrainLoader(cfg, tokenizer, 32, 1, 0, 1)
    try:
        got = [next(loader)["tokens"].numpy()[0] for _ in range(2)]
        for p in loader._procs:
            os.kill(p.pid, signal.SIGTERM)
            os.kill(p.pid, signal.SIGUSR1)
        got += [next(loader)["tokens"].numpy()[0] for _ in range(28)]
        assert all(p.is_alive() for p in loader._procs)
    finally:
        loader.close()
    assert not any(p.is_alive() for p in loader._procs)
    assert np.array_equal(np.stack(got), ref)


@pytest.mark.parametrize("prefetch", [1, 3, 32])
def test_samples_sent_several_to_a_message_arrive_as_loaded_in_process(corpus, tokenizer, prefetch):
    """A worker hands over up to SAMPLES_PER_MESSAGE samples per message, fewer when the trainer's room
    (`prefetch`) runs out first: batches, the state after every step and the reading counters are exactly those
    of loading in the training process."""
    assert 1 < SAMPLES_PER_MESSAGE < 32  # both regimes: messages cut short by the room left, and full ones
    cfg = data_config(corpus["glob"], prefetch=prefetch)
    ref = TrainLoader(cfg, tokenizer, 24, 3, 0, 1)
    got = TrainLoader(cfg.model_copy(update={"num_workers": 2}), tokenizer, 24, 3, 0, 1)
    try:
        for _ in range(30):
            want, have = next(ref), next(got)
            assert torch.equal(want["tokens"], have["tokens"]) and torch.equal(want["doc_start"], have["doc_start"])
            assert got.state_dict()["lanes"] == ref.state_dict()["lanes"]
            for key in ("documents", "decompressed_bytes", "lines_scanned", "documents_tokenized"):
                assert got.stats()[key] == ref.stats()[key], key
    finally:
        ref.close()
        got.close()


def test_a_failing_worker_first_hands_over_the_samples_it_made(corpus, tokenizer, monkeypatch):
    """A worker that fails while it holds samples for its next message sends them before the error: the
    trainer gets every sample up to the one that failed, as when loading in process, and then the error."""
    calls = {"n": 0}
    encode = LaneGroup.encode

    def failing_encode(self, text):
        calls["n"] += 1
        if calls["n"] == 12:
            raise DataError("injected: document 12 cannot be read")
        return encode(self, text)

    monkeypatch.setattr(LaneGroup, "encode", failing_encode)  # forked workers inherit it, counter included
    taken = {}
    for workers in (0, 1):
        calls["n"] = 0
        loader = TrainLoader(data_config(corpus["glob"], num_workers=workers, prefetch=32), tokenizer, 24, 1, 0, 1)
        taken[workers] = []
        with pytest.raises(DataError, match="injected: document 12"):
            for _ in range(100):
                taken[workers].append(next(loader)["tokens"].numpy()[0])
        loader.close()
    assert 0 < len(taken[0]) < SAMPLES_PER_MESSAGE * 4
    assert np.array_equal(np.stack(taken[1]), np.stack(taken[0]))
