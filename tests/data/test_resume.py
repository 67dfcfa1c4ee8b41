"""Resume: stop anywhere, save the state, rebuild (at another DP size or worker count), continue identically."""
from __future__ import annotations

import io
import json
import random
import time

import numpy as np
import pytest
import torch

from hgrn_megatron.pretrain.data import DataError, TrainLoader, merge_data_states
from tests.data.data_harness import data_config, run_ranks

S, MB, TOTAL = 32, 2, 320


@pytest.fixture(scope="module")
def uninterrupted(corpus, tokenizer):
    cfg = data_config(corpus["glob"])
    tokens, doc_start, _, stats = run_ranks(cfg, tokenizer, S, MB, 1, TOTAL // MB)
    assert stats[0]["pass_index"] >= 2
    return cfg, tokens, doc_start


def through_storage(state: dict) -> dict:
    """What the engine does: torch.save the merged state, torch.load it (weights_only) later; JSON works too."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert json.loads(json.dumps(loaded)) == loaded
    return loaded


def resume_chain(cfg, tokenizer, legs):
    """Run legs of (dp, workers, steps), each resumed from the previous leg's merged state; concatenate.

    Also returns the passes the lanes were in at each stop.
    """
    state, tokens, starts, passes = None, [], [], []
    for dp, workers, steps in legs:
        t, d, merged, _ = run_ranks(cfg, tokenizer, S, MB, dp, steps, state=state, workers=workers)
        tokens.append(t)
        starts.append(d)
        state = through_storage(merged)
        passes.append({lane["doc_pass"] for lane in state["lanes"]})
    return np.concatenate(tokens), np.concatenate(starts), state, passes


@pytest.mark.parametrize(
    "legs",
    [
        [(1, 0, 3), (1, 0, 40)],  # early, mid-document, same set-up
        [(2, 1, 9), (1, 2, 50)],  # DP 2 -> 1, mid-shard, the continuation crosses the first pass's end
        [(1, 1, 31), (4, 1, 12)],  # DP 1 -> 4
        [(4, 2, 8), (2, 0, 20), (1, 1, 30)],  # three legs, stopping right at the pass boundary
        [(2, 0, 35), (4, 2, 10)],  # stop while some lanes are in pass 1 and others still in pass 0
    ],
    ids=["same", "dp2to1", "dp1to4", "chain", "across-epoch"],
)
def test_resumed_sequence_equals_uninterrupted(uninterrupted, tokenizer, legs, request):
    cfg, ref_tokens, ref_starts = uninterrupted
    tokens, starts, state, passes = resume_chain(cfg, tokenizer, legs)
    if request.node.callspec.id == "across-epoch":
        assert {0, 1} <= passes[0]
    n = len(tokens)
    assert n == sum(dp * steps * MB for dp, _, steps in legs) <= TOTAL
    assert state["next_sample"] == n
    assert np.array_equal(tokens, ref_tokens[:n]) and np.array_equal(starts, ref_starts[:n])


def test_random_stop_points(uninterrupted, tokenizer):
    cfg, ref_tokens, ref_starts = uninterrupted
    rng = random.Random(2024)
    for _ in range(3):
        legs, used = [], 0
        while True:
            dp = rng.choice([1, 2, 4])
            steps = rng.randint(1, 12)
            if used + dp * steps * MB > TOTAL:
                break
            legs.append((dp, rng.choice([0, 1]), steps))
            used += dp * steps * MB
        tokens, starts, _, _ = resume_chain(cfg, tokenizer, legs)
        assert np.array_equal(tokens, ref_tokens[: len(tokens)]), legs
        assert np.array_equal(starts, ref_starts[: len(tokens)]), legs


def test_state_reflects_consumed_samples_not_prefetched_ones(uninterrupted, tokenizer):
    """Workers run ahead by `prefetch`; the saved state must still point just after what the trainer took."""
    cfg, ref_tokens, _ = uninterrupted
    cfg = cfg.model_copy(update={"num_workers": 2, "prefetch": 16})
    loader = TrainLoader(cfg, tokenizer, S, MB, 0, 1)
    try:
        for _ in range(5):
            next(loader)
        time.sleep(0.5)  # let the workers fill their queues
        state = loader.state_dict()
    finally:
        loader.close()
    assert state["consumed_samples"] == 5 * MB
    resumed = TrainLoader(cfg, tokenizer, S, MB, 0, 1, state=through_storage(merge_data_states([state])))
    try:
        batch = next(resumed)
    finally:
        resumed.close()
    assert np.array_equal(batch["tokens"].numpy(), ref_tokens[5 * MB : 6 * MB])


def test_mismatched_states_are_refused_with_a_reason(uninterrupted, corpus, tokenizer):
    cfg, _, _ = uninterrupted
    _, _, merged, _ = run_ranks(cfg, tokenizer, S, MB, 2, 3)
    with pytest.raises(DataError, match=r"seq_length: saved 32, now 64"):
        TrainLoader(cfg, tokenizer, 64, MB, 0, 1, state=merged)
    with pytest.raises(DataError, match=r"lanes: saved 8, now 16"):
        TrainLoader(cfg.model_copy(update={"lanes": 16}), tokenizer, S, MB, 0, 1, state=merged)
    fewer = data_config(str(corpus["root"] / "shard-0[01].jsonl.zst"))
    with pytest.raises(DataError, match=r"shards: 3 saved vs 2 now \(missing \['shard-02.jsonl.zst'\]"):
        TrainLoader(fewer, tokenizer, S, MB, 0, 1, state=merged)

    loaders = [TrainLoader(cfg, tokenizer, S, MB, r, 2) for r in range(2)]
    try:
        next(loaders[0])
        next(loaders[0])
        next(loaders[1])
        states = [ld.state_dict() for ld in loaders]
    finally:
        for ld in loaders:
            ld.close()
    with pytest.raises(DataError, match=r"ranks are at different points"):
        merge_data_states(states)
    with pytest.raises(DataError, match=r"need the states of ranks 0..1"):
        merge_data_states(states[:1])
    with pytest.raises(DataError, match=r"rank 1's data state of 2; merge all ranks' states"):
        TrainLoader(cfg, tokenizer, S, MB, 0, 1, state=states[1])


def test_resuming_into_an_unreadable_shard_says_so(tmp_path):
    """A shard that cannot be opened any more where the saved state resumes mid-shard: the error names the
    file and the failure, not a shard that merely got shorter."""
    import zstandard

    from hgrn_megatron.pretrain.data.mixture import Mixture
    from hgrn_megatron.pretrain.data.stream import LaneStream, Position, UnitTable

    shard = tmp_path / "a.jsonl.zst"
    shard.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 10))
    start = Position(ordinal=0, pass_index=0, slot=0, line=5)
    table = UnitTable([shard], 0)
    assert LaneStream(table, Mixture(1, 0), 0, 1, start, None).next()[0].line == 5
    shard.unlink()  # e.g. a file system that is not mounted on this node
    with pytest.raises(DataError, match=r"a\.jsonl\.zst: resuming at line 6 of this shard, but it fails after 0 "
                                        r"lines \(unreadable_shard: cannot open"):
        LaneStream(table, Mixture(1, 0), 0, 1, start, None).next()


# The fingerprint keys of the first state format: a key beyond these needs a FINGERPRINT_DEFAULTS entry.
FIRST_FINGERPRINT_KEYS = {"seq_length", "lanes", "seed", "shards", "shard_weights", "source_weights", "text_field",
                          "source_field", "tokenizer_sha256"}


def test_a_state_saved_before_a_fingerprint_key_existed_resumes(uninterrupted, tokenizer):
    """A key added to the fingerprint (with its default) does not refuse earlier runs' states; a value that
    differs from what the state stands for still does."""
    from hgrn_megatron.pretrain.data.state import FINGERPRINT_DEFAULTS

    cfg, ref_tokens, _ = uninterrupted
    _, _, merged, _ = run_ranks(cfg, tokenizer, S, MB, 1, 4)
    assert set(merged["fingerprint"]) - FIRST_FINGERPRINT_KEYS <= set(FINGERPRINT_DEFAULTS)
    older = through_storage(merged)
    # lanes_share_units is the one key whose absence is refused: earlier versions read shared units otherwise
    assert merged["fingerprint"]["lanes_share_units"] is True  # this fixture has fewer shards than lanes
    for key in set(merged["fingerprint"]) - FIRST_FINGERPRINT_KEYS - {"lanes_share_units"}:
        del older["fingerprint"][key]  # as an earlier version saved it
    assert "max_document_bytes" not in older["fingerprint"]
    after, _, _, _ = run_ranks(cfg, tokenizer, S, MB, 2, 3, state=older)
    assert np.array_equal(after, ref_tokens[4 * MB : 10 * MB])
    with TrainLoader(cfg, tokenizer, S, MB, 0, 1, state=older) as loader:
        assert np.array_equal(next(loader)["tokens"].numpy(), ref_tokens[4 * MB : 5 * MB])
        assert loader.state_dict()["fingerprint"] == merged["fingerprint"]  # saved again with every key
    changed = cfg.model_copy(update={"max_document_bytes": 4096})
    with pytest.raises(DataError, match=r"max_document_bytes: saved 8388608, now 4096"):
        TrainLoader(changed, tokenizer, S, MB, 0, 1, state=older)
    with pytest.raises(DataError, match=r"max_document_bytes: saved 8388608, now 4096"):
        TrainLoader(changed, tokenizer, S, MB, 0, 1, state=merged)
    before_sharing = through_storage(older)
    del before_sharing["fingerprint"]["lanes_share_units"]
    with pytest.raises(DataError, match=r"lanes_share_units: saved False, now True"):
        TrainLoader(cfg, tokenizer, S, MB, 0, 1, state=before_sharing)
    unknown = {**older, "fingerprint": {**older["fingerprint"], "from_a_newer_version": 1}}
    with pytest.raises(DataError, match=r"from_a_newer_version: saved 1, now None"):
        TrainLoader(cfg, tokenizer, S, MB, 0, 1, state=unknown)
