"""Bad input through the whole pipeline: exact skip counts per kind/shard/source, and every good document arrives."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import zstandard

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.shards import iter_lines, resolve_shards, shard_display_names
from hgrn_megatron.pretrain.data import SKIP_KINDS, TrainLoader, build_validation_batches
from hgrn_megatron.pretrain.data.stream import UnitTable
from tests.data.data_harness import data_config, make_text, record, run_ranks, write_zst

S = 16
MAX_DOC = 4096  # data.max_document_bytes for the broken corpus, so that an oversized record stays small


@pytest.fixture(scope="module")
def broken_corpus(tmp_path_factory):
    """Six shards, one of each kind of damage; returns the glob and every record's expected fate, per shard."""
    root = tmp_path_factory.mktemp("broken")
    rng = random.Random(5)

    def good(tag, source="Src-A"):
        # Documents longer than S tokens: a sample never needs more than one new document (see the count test).
        text = make_text(rng, 30, 60, tag)
        return record(text, source), (None, source, text)

    fates = {}

    def shard(name, items, frames=1):
        write_zst(root / name, [line for line, _ in items], frames=frames)
        fates[name] = [fate for _, fate in items]

    shard("a-good.jsonl.zst", [good(f"a{i}", "Src-A" if i % 2 else "Src-B") for i in range(5)], frames=2)
    bad_items = [
        good("b0"),
        (b"{not json", ("invalid_json", "unknown", None)),
        good("b1", "Src-B"),
        (b"\xff\xfebad bytes", ("invalid_utf8", "unknown", None)),
        (record(None, "Src-B").replace(b'"text": null', b'"txt": 1'), ("missing_text", "Src-B", None)),
        (record("", "Src-A"), ("empty_text", "Src-A", None)),
        (b'{"text": ["a"], "meta": {"pile_set_name": "Src-C"}}', ("non_string_text", "Src-C", None)),
        good("b2"),
        (b'{"text": "\\udc00", "meta": {"pile_set_name": "Src-A"}}', ("invalid_utf8", "Src-A", None)),
        (b"", ("invalid_json", "unknown", None)),
        (record("long " * 1000, "Src-B"), ("oversized_document", "unknown", None)),  # > MAX_DOC: never parsed
        good("b3"),
    ]
    shard("b-bad-records.jsonl.zst", bad_items)

    # A truncated shard (written as several zstd frames, cut inside one): the complete lines before the cut
    # arrive, then one truncated_stream fault.
    items = [good(f"c{i}", "Src-C") for i in range(60)]
    write_zst(root / "c-truncated.jsonl.zst", [line for line, _ in items], frames=6)
    data = (root / "c-truncated.jsonl.zst").read_bytes()
    (root / "c-truncated.jsonl.zst").write_bytes(data[: len(data) * 3 // 5])
    kept = sum(1 for x in iter_lines(root / "c-truncated.jsonl.zst") if isinstance(x, bytes))
    assert 0 < kept < 60
    fates["c-truncated.jsonl.zst"] = [fate for _, fate in items[:kept]] + [("truncated_stream", "unknown", None)]

    (root / "d-garbage.jsonl.zst").write_bytes(bytes(rng.randrange(256) for _ in range(3000)))
    fates["d-garbage.jsonl.zst"] = [("corrupt_stream", "unknown", None)]

    plain = [good("e0"), (b"[1, 2]", ("invalid_json", "unknown", None)), good("e1", "Src-C")]
    (root / "e-plain.jsonl").write_bytes(b"\n".join(line for line, _ in plain))  # no final newline
    fates["e-plain.jsonl"] = [fate for _, fate in plain]

    tail = [good("f0"), good("f1")]
    (root / "f-tail-garbage.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(line + b"\n" for line, _ in tail)) + b"\x00 trailing garbage"
    )
    fates["f-tail-garbage.jsonl.zst"] = [fate for _, fate in tail] + [("corrupt_stream", "unknown", None)]
    return {"glob": str(root / "*.jsonl*"), "fates": fates}


def pass_zero_records(glob: str, seed: int, fates: dict) -> list[tuple[str, tuple]]:
    """Every record of pass 0 in the order one lane reads it: (shard name, (kind|None, source, text))."""
    paths = resolve_shards([glob], field="test")
    names = shard_display_names(paths)
    table = UnitTable(paths, seed)  # unindexed shards: one unit each
    order = [table.units[u].shard for u in table.order(0)]
    return [(names[s], fate) for s in order for fate in fates[names[s]]]


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_counts_are_exact_when_the_last_good_document_of_a_pass_is_read(broken_corpus, tokenizer, workers):
    cfg = data_config(broken_corpus["glob"], lanes=1, num_workers=workers, seed=11, max_document_bytes=MAX_DOC)
    records = pass_zero_records(broken_corpus["glob"], 11, broken_corpus["fates"])
    good = [i for i, (_, fate) in enumerate(records) if fate[0] is None]
    expected = Counter(("skip", fate[0], shard, fate[1]) for shard, fate in records[: good[-1]] if fate[0])
    # With seed 11 every kind of damage lies before the pass's last good document.
    assert {k[1] for k in expected} == set(SKIP_KINDS) - {"unreadable_shard"}

    loader = TrainLoader(cfg, tokenizer, S, 1, 0, 1)
    try:
        while loader.stats()["documents"] < len(good):
            next(loader)  # each sample reads at most one new document: the count hits len(good) exactly
        stats = loader.stats()
        counters = DataCounters.from_state(loader.state_dict()["lanes"][0]["counters"]).counts
    finally:
        loader.close()
    assert stats["documents"] == len(good)
    assert Counter({k: v for k, v in counters.items() if k[0] == "skip"}) == expected
    assert stats["skipped_total"] == sum(expected.values())
    want_sources = Counter(records[i][1][1] for i in good)
    assert stats["documents_by_source"] == dict(want_sources)
    assert stats["skipped_by_kind"]["invalid_json"] == sum(n for k, n in expected.items() if k[1] == "invalid_json")
    assert stats["skipped_by_shard"]["d-garbage.jsonl.zst"]["corrupt_stream"] == 1
    assert stats["workers"] == workers and stats["loader_tokens_per_s"] > 0 and stats["wait_s"] >= 0


def test_every_good_document_arrives_and_nothing_else(broken_corpus, tokenizer):
    """Over two ranks, one worker each, four lanes: each lane's stream splits at EOS into exactly the good texts."""
    L, seed = 4, 3
    cfg = data_config(broken_corpus["glob"], lanes=L, seed=seed, max_document_bytes=MAX_DOC)
    records = pass_zero_records(broken_corpus["glob"], seed, broken_corpus["fates"])
    good_texts = Counter(fate[2] for _, fate in records if fate[0] is None)
    total_tokens = sum(len(tokenizer.encode(t)) + 1 for t in good_texts)
    # Enough for every lane to finish its units of pass 0, even a lane that holds nearly all the good text.
    steps = (2 * total_tokens) // S + 8
    tokens, _, _, _ = run_ranks(cfg, tokenizer, S, 1, 2, steps, workers=1)
    seen = Counter()
    for lane in range(L):
        samples = tokens[lane::L]
        stream = np.concatenate([samples[0], *[s[1:] for s in samples[1:]]])
        eos = np.flatnonzero(stream == tokenizer.eos_id)
        for a, b in zip(eos[:-1], eos[1:]):  # complete documents only (the lane starts at a document start)
            seen[tokenizer.decode(stream[a + 1 : b].tolist())] += 1
        seen[tokenizer.decode(stream[: eos[0]].tolist())] += 1
    assert set(seen) == set(good_texts), "only good documents arrive"
    assert all(seen[t] >= 1 for t in good_texts), "every good document arrives"


@pytest.mark.parametrize("workers", [0, 1])
def test_an_oversized_document_is_skipped_and_counted_and_the_others_arrive(tmp_path, tokenizer, workers):
    """One record over data.max_document_bytes among good ones: counted as its own kind (unparsed, so its source
    is unknown), in training and validation alike; every other document arrives, in order."""
    rng = random.Random(9)
    texts = [make_text(rng, 20, 40, f"d{i}") for i in range(12)]
    huge = record("word " * 400_000)  # 2 MB
    lines = [record(t) for t in texts]
    lines.insert(5, huge)
    shard = str(write_zst(tmp_path / "a.jsonl.zst", lines))
    cfg = data_config(shard, lanes=1, num_workers=workers, max_document_bytes=1 << 20, valid_shards=[shard])
    want = np.concatenate([np.array(tokenizer.encode(t) + [tokenizer.eos_id]) for t in texts])
    steps = (len(want) - 1) // S
    loader = TrainLoader(cfg, tokenizer, S, 1, 0, 1)
    try:
        got = [next(loader)["tokens"][0].numpy() for _ in range(steps)]
        stats = loader.stats()
    finally:
        loader.close()
    assert np.array_equal(np.concatenate([got[0], *[g[1:] for g in got[1:]]]), want[: steps * S + 1])
    assert stats["skipped_by_kind"] == {"oversized_document": 1}
    assert stats["skipped_by_source"] == {"unknown": {"oversized_document": 1}}
    assert stats["documents"] == len(texts)
    assert build_validation_batches(cfg, tokenizer, S, 1)["skipped"] == {"oversized_document": 1}
