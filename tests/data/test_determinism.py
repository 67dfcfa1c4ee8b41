"""The global sample sequence is the same at every data-parallel size and worker count, byte for byte."""
from __future__ import annotations

import numpy as np
import pytest

from tests.data.data_harness import data_config, run_ranks

S, MB, GLOBAL_SAMPLES = 32, 2, 192
MIXTURES = {
    "uniform": {},
    "weighted": {"source_weights": {"Source-A": 2.0, "Source-B": 0.5}},
}


@pytest.fixture(scope="module", params=sorted(MIXTURES))
def reference(request, corpus, tokenizer):
    """DP 1, no workers: the sequence every other set-up must reproduce."""
    cfg = data_config(corpus["glob"], **MIXTURES[request.param])
    tokens, doc_start, state, stats = run_ranks(cfg, tokenizer, S, MB, 1, GLOBAL_SAMPLES // MB)
    assert stats[0]["pass_index"] >= 1, "the reference must cross a pass (epoch) boundary"
    assert doc_start.sum() > 20
    if request.param == "weighted":
        assert stats[0]["dropped_by_mixture"] > 0
    return cfg, tokens, doc_start, state, stats[0]


@pytest.mark.parametrize("dp,workers", [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (3, 1)])
def test_sequence_is_identical_for_any_dp_and_worker_count(reference, tokenizer, dp, workers):
    cfg, ref_tokens, ref_starts, ref_state, ref_stats = reference
    steps = GLOBAL_SAMPLES // (MB * dp)
    n = steps * MB * dp
    tokens, doc_start, state, stats = run_ranks(cfg, tokenizer, S, MB, dp, steps, workers=workers)
    assert np.array_equal(tokens, ref_tokens[:n]) and np.array_equal(doc_start, ref_starts[:n])
    if n == GLOBAL_SAMPLES:
        # Same lanes, same positions, same counters, whoever read them.
        assert state["lanes"] == ref_state["lanes"] and state["next_sample"] == ref_state["next_sample"]
    if 8 % dp == 0:  # ranks own disjoint lanes: their counts add up to the single-rank count
        for key in ("documents", "document_tokens", "skipped_total", "dropped_by_mixture"):
            assert sum(s[key] for s in stats) == ref_stats[key], key
    # Per-lane counts combined as the trainer does (max over ranks): exact also when ranks share lanes
    # (DP 3 over 8 lanes: every rank reads every lane, none of them to the end of all).
    per_lane = np.max([s["lane_counts"] for s in stats], axis=0)
    assert per_lane[:, 0].sum() == ref_stats["documents"]
    assert per_lane[:, 1:].sum() == ref_stats["skipped_total"]
    if 8 % dp:
        assert sum(s["documents"] for s in stats) > ref_stats["documents"]  # what a plain sum would report


def test_samples_are_contiguous_document_text(reference, tokenizer):
    """Each lane's samples overlap by one token and split at EOS into whole corpus documents."""
    cfg, tokens, doc_start, _, _ = reference
    L = cfg.lanes
    for lane in range(L):
        samples = tokens[lane::L]
        assert np.array_equal(samples[1:, 0], samples[:-1, -1]), "consecutive samples share one token"
        starts = doc_start[lane::L]
        for row, flags in zip(samples, starts):
            after_eos = np.flatnonzero(row[:-1] == tokenizer.eos_id) + 1
            assert flags[after_eos].all(), "a document starts right after every EOS"
            assert flags.sum() == len(after_eos) + int(flags[0]), "and nowhere else"
