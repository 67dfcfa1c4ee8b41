"""Lanes own units of data: each worker decompresses about its share of the corpus, and a resume seeks to one
frame per lane instead of decompressing shards from their beginning."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from hgrn_megatron.corpus.frames import load_index
from hgrn_megatron.corpus.reshard import reshard_one
from hgrn_megatron.corpus.shards import resolve_shards
from hgrn_megatron.pretrain.data import DataError, TrainLoader
from hgrn_megatron.pretrain.data.loader import build_packing_spec
from hgrn_megatron.pretrain.data.packing import LaneGroup, fresh_lane_state
from hgrn_megatron.pretrain.data.state import rank_lanes
from tests.data.data_harness import data_config, run_ranks, write_corpus

S, MB = 32, 2


@pytest.fixture(scope="module")
def framed(tmp_path_factory):
    """About 1 MB of text in three shards, resharded into frames of ~2 KiB (a few hundred units)."""
    root = tmp_path_factory.mktemp("plain")
    corpus = write_corpus(root, shard_docs=(250, 200, 300), min_words=50, max_words=400, seed=7)
    out = tmp_path_factory.mktemp("framed")
    for path in resolve_shards([corpus["glob"]], field="test"):
        reshard_one(path, out / path.name, frame_bytes=2048)
    indexes = [load_index(p) for p in sorted(out.glob("*.jsonl.zst"))]
    return {"glob": str(out / "*.jsonl.zst"), "text_bytes": sum(i.text_bytes for i in indexes),
            "max_frame": max(f.text_bytes for i in indexes for f in i.frames),
            "units": sum(len(i.frames) for i in indexes), "lines": sum(i.lines for i in indexes)}


def test_a_pass_at_dp8_with_two_workers_decompresses_each_byte_about_once(framed, tokenizer):
    """16 workers (8 ranks x 2, simulated in this process): together they decompress about the corpus once,
    each about a sixteenth of it (every worker decompressed the whole corpus before lanes owned units)."""
    L, dp, workers = 32, 8, 2
    spec = build_packing_spec(data_config(framed["glob"], lanes=L), S)
    groups, owner = [], {}
    for r in range(dp):
        mine = rank_lanes(L, 0, r, dp)
        for w in range(workers):
            group = LaneGroup(spec, [fresh_lane_state(lane) for lane in mine[w::workers]], tokenizer)
            owner.update(dict.fromkeys(group.lanes, group))
            groups.append(group)
    pass_tokens = framed["text_bytes"] / 4.2  # about a pass: bytes per token of the test tokenizer on this text
    samples = int(0.95 * pass_tokens / S)
    documents = 0
    for j in range(samples):
        documents += sum(n for key, n in owner[j % L].produce(j % L, j // L)[3].counts.items() if key[0] == "doc")
    decompressed = [g.io.decompressed_bytes for g in groups]
    share = framed["text_bytes"] / len(groups)
    assert 0.5 * framed["text_bytes"] < sum(decompressed) <= 1.2 * framed["text_bytes"], decompressed
    assert max(decompressed) <= 1.5 * share, (max(decompressed), share)
    assert sum(g.io.read_bytes for g in groups) <= 1.2 * sum(os.path.getsize(p) for p in spec.paths)
    # Each line is scanned by one worker only, and each document packed was tokenized once.
    assert sum(g.io.lines_scanned for g in groups) <= 1.2 * framed["lines"]
    assert sum(g.io.documents_tokenized for g in groups) == documents


@pytest.mark.parametrize("legs", [[(2, 12), (2, 15)], [(2, 9), (1, 14), (4, 5)]], ids=["same-dp", "dp2to1to4"])
def test_a_resume_decompresses_at_most_one_frame_per_lane_and_continues_identically(framed, tokenizer, legs):
    cfg = data_config(framed["glob"], lanes=8)
    total = sum(dp * steps for dp, steps in legs)
    ref, ref_starts, _, _ = run_ranks(cfg, tokenizer, S, MB, 1, total)
    state, got, got_starts = None, [], []
    for dp, steps in legs:
        tokens, starts, merged, stats = run_ranks(cfg, tokenizer, S, MB, dp, steps, state=state)
        for r, st in enumerate(stats):
            lanes = len(rank_lanes(8, 0 if state is None else state["next_sample"], r, dp))
            assert st["seek_decompressed_bytes"] <= lanes * framed["max_frame"]
            if state is None:
                assert st["seek_decompressed_bytes"] == 0
        state = merged
        got.append(tokens)
        got_starts.append(starts)
    assert any(lane["doc"][3] > 0 for lane in state["lanes"])  # lanes stopped inside their units
    assert np.array_equal(np.concatenate(got), ref) and np.array_equal(np.concatenate(got_starts), ref_starts)


def test_indexed_data_gives_the_same_sequence_at_any_dp_and_worker_count(framed, tokenizer):
    cfg = data_config(framed["glob"], lanes=8)
    ref, _, _, _ = run_ranks(cfg, tokenizer, S, MB, 1, 24)
    got, _, _, stats = run_ranks(cfg, tokenizer, S, MB, 4, 6, workers=2)
    assert np.array_equal(ref, got)
    assert all(st["decompressed_bytes"] > 0 and st["workers"] == 2 for st in stats)
    assert all(len(st["worker_decompressed_bytes"]) == 2 for st in stats)


def test_the_frame_layout_is_part_of_the_fingerprint(framed, tokenizer, tmp_path):
    """Resharding with other frames changes which lane reads what: a state of the old layout is refused."""
    cfg = data_config(framed["glob"], lanes=8)
    _, _, state, _ = run_ranks(cfg, tokenizer, S, MB, 1, 2)
    assert sum(state["fingerprint"]["frame_layout"]) == framed["units"]
    for path in resolve_shards([framed["glob"]], field="test"):
        reshard_one(path, tmp_path / path.name, frame_bytes=4096)
    other = data_config(str(tmp_path / "*.jsonl.zst"), lanes=8)
    with pytest.raises(DataError, match="frame_layout: saved"):
        TrainLoader(other, tokenizer, S, MB, 0, 1, state=state)


def test_fewer_units_than_lanes_warns_once(corpus, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        with TrainLoader(data_config(corpus["glob"], lanes=8), tokenizer, S, MB, 0, 1) as loader:
            next(loader)
    assert sum("3 units of data" in r.message and "8 lanes" in r.message for r in caplog.records) == 1


def test_lanes_sharing_fewer_units_deal_their_records_without_repeats(corpus, tokenizer):
    """Three unindexed shards (three units) for eight lanes: the lanes sharing a unit deal its records, so
    pass 0's records reach the lanes exactly once, and the lanes' first samples are all different (lanes used
    to read whole units of later passes, i.e. the same shard heads, at once)."""
    from hgrn_megatron.pretrain.data.mixture import Mixture
    from hgrn_megatron.pretrain.data.stream import LaneStream, UnitTable

    L = 8
    paths = resolve_shards([corpus["glob"]], field="test")
    table = UnitTable(paths, seed=5)
    assert len(table) == 3 < L
    seen = []
    for lane in range(L):
        stream = LaneStream(table, Mixture(len(paths), 5), lane, L, None, None)
        while True:
            pos, item, shard = stream.next()
            if pos.pass_index > 0:
                break
            seen.append((shard, pos.line))
    assert sorted(seen) == sorted((s, i) for s, docs in enumerate(corpus["docs"]) for i in range(len(docs)))

    cfg = data_config(corpus["glob"], lanes=L, seed=5)
    tokens, _, _, _ = run_ranks(cfg, tokenizer, S, L, 1, 1)
    firsts = {row.tobytes() for row in tokens}
    assert len(firsts) == L


def test_lanes_outnumbering_a_units_records_repeat_them_and_resume_exactly(tmp_path, tokenizer, caplog):
    """Five records in three units for 64 lanes: the lanes of rank >= a unit's records take record rank mod n, so
    every lane has data, the first pass delivers every record, a warning says so, and a resume (also from a
    repeated record's position) continues the same sequence."""
    corpus = write_corpus(tmp_path / "tiny", shard_docs=(2, 1, 2))
    cfg = data_config(corpus["glob"], lanes=64)
    with caplog.at_level("WARNING"):
        tokens, _, _, _ = run_ranks(cfg, tokenizer, S, 64, 1, 2)
    assert "some lanes repeat records within a pass" in caplog.text
    heads = {row[:4].tobytes() for row in tokens[:64]}
    assert len(heads) == 5  # the lanes' first samples start with each of the five documents
    _, _, state, _ = run_ranks(cfg, tokenizer, S, 64, 1, 1)
    resumed, _, _, _ = run_ranks(cfg, tokenizer, S, 64, 1, 1, state=state)
    assert np.array_equal(resumed, tokens[64:])
