"""Source proportions of the training stream against the mixture's intended ones, counted over real loaders.

Four plain shards of different sizes, one source each (the shape of a `train_groups` group of a few small shards
beside large ones), the smallest weighted 3: over one epoch's worth of tokens the stream should hold each source
in proportion to (its tokens x its weight). One lane reads the units in order and meets that exactly; with more
lanes than one, lanes move through units rather than bytes, so small units are over-represented within the
first passes (docs/DATA.md, "Units of unequal size skew the mixture"): that case is marked as a known defect.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

from hgrn_megatron.corpus.records import RecordParser, iter_documents
from hgrn_megatron.pretrain.data import TrainLoader
from hgrn_megatron.tokenizer import Tokenizer
from tests.data.data_harness import ASSETS, data_config, make_text, record, write_zst

SIZES = {"Large": 120, "Medium": 90, "Small": 30, "Tiny": 9}  # documents per shard, one source each
WEIGHTS = {"Tiny": 3.0}
S = 128


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(ASSETS / "tokenizer")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(5)
    for source, docs in SIZES.items():
        write_zst(root / f"{source}.jsonl.zst", [record(make_text(rng, 150, 250, source), source) for _ in range(docs)])
    return root


def intended_and_streamed(shards, tokenizer, lanes: int) -> tuple[dict, dict]:
    cfg = data_config(str(shards / "*.jsonl.zst"), lanes=lanes, source_weights=WEIGHTS)
    parser = RecordParser(cfg.record_format())
    tokens = Counter()
    for path in cfg.resolve_train()[0]:
        for _, doc in iter_documents(path, parser):
            tokens[doc.source] += len(tokenizer.encode_document(doc.text)) * WEIGHTS.get(doc.source, 1.0)
    epoch = sum(tokens.values())
    loader = TrainLoader(cfg, tokenizer, S, 1)
    try:
        for _ in range(int(epoch) // S):
            next(loader)
        streamed = loader.stats()["tokens_by_source"]
    finally:
        loader.close()
    total = sum(streamed.values())
    return ({s: tokens[s] / epoch for s in SIZES}, {s: streamed.get(s, 0) / total for s in SIZES})


def test_one_lane_streams_the_intended_source_proportions(shards, tokenizer):
    intended, streamed = intended_and_streamed(shards, tokenizer, lanes=1)
    assert all(abs(streamed[s] - intended[s]) < 0.01 for s in SIZES), (intended, streamed)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="known defect: with plain shards of unequal size, lanes move through units "
                   "rather than bytes and small shards are over-represented within the first passes")
def test_many_lanes_stream_the_intended_source_proportions(shards, tokenizer):
    intended, streamed = intended_and_streamed(shards, tokenizer, lanes=8)
    assert all(abs(streamed[s] - intended[s]) < 0.02 for s in SIZES), (intended, streamed)


def test_plain_shards_of_unequal_size_are_warned_about(shards, tokenizer, caplog):
    """Until lanes take shares of a pass in proportion to bytes, the skew above is at least said at start-up."""
    for lanes, warned in ((8, True), (1, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            TrainLoader(data_config(str(shards / "*.jsonl.zst"), lanes=lanes), tokenizer, S, 1).close()
        assert ("plain shards of unequal size" in caplog.text) is warned, lanes
